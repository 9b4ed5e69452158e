"""The plugin side of the CNI exec protocol (our analogue of CNI's ``pkg/skel``).

:func:`dispatch` takes the environment and stdin bytes a runtime gives a plugin, checks them
the way the spec asks (missing ``CNI_*`` variables: error 4; undecodable stdin: 6; a
``cniVersion`` the plugin does not speak: 1), calls the plugin module's ``add`` / ``delete``
/ ``check`` / ``status`` / ``gc``, and returns the exit status and stdout bytes: a result
JSON, or an error JSON with the spec's code. :func:`main` does the same for a real process.

A plugin that delegates (flannel to bridge, any plugin to its IPAM) calls :func:`delegate`
with its :class:`CmdArgs`, which carry the invoker that reached the plugin: by exec when the
plugin is a process, in-process when the runtime called it in-process.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Mapping

from k8snetlab import cni_protocol as cni
from k8snetlab.cni_protocol import CNIError, ExecInvoker, Invoker, Result, plugin_env
from k8snetlab.errors import K8sNetLabError

_REQUIRED = {
    "ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
    "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
    "DEL": ("CNI_CONTAINERID", "CNI_IFNAME", "CNI_PATH"),
    "STATUS": ("CNI_PATH",),
    "GC": ("CNI_PATH",),
    "VERSION": (),
}


@dataclass
class CmdArgs:
    command: str
    container_id: str
    netns: str
    ifname: str
    args: dict[str, str]
    path: tuple[str, ...]
    conf: dict[str, Any]
    invoker: Invoker = field(default_factory=ExecInvoker)   # how delegates are run

    @property
    def prev_result(self) -> Result | None:
        prev = self.conf.get("prevResult")
        return Result.from_dict(prev) if prev else None


def _parse_cni_args(raw: str) -> dict[str, str]:
    out = {}
    for part in filter(None, raw.split(";")):
        if "=" not in part:
            raise CNIError(cni.ERR_INVALID_ENV, f"CNI_ARGS entry {part!r} is not KEY=VALUE")
        k, v = part.split("=", 1)
        out[k] = v
    return out


def parse(env: Mapping[str, str], stdin: bytes, invoker: Invoker | None = None) -> CmdArgs:
    command = env.get("CNI_COMMAND", "")
    if command not in cni.COMMANDS:
        raise CNIError(cni.ERR_INVALID_ENV, f"CNI_COMMAND is {command!r}: must be one of "
                       f"{', '.join(cni.COMMANDS)}")
    missing = [v for v in _REQUIRED[command] if not env.get(v)]
    if missing:
        raise CNIError(cni.ERR_INVALID_ENV, f"required environment variables missing: {', '.join(missing)}")
    conf: dict[str, Any] = {}
    if command != "VERSION" or stdin.strip():
        try:
            conf = json.loads(stdin)
            if not isinstance(conf, dict):
                raise ValueError("not an object")
        except ValueError as e:
            raise CNIError(cni.ERR_DECODE, "failed to decode network config from stdin", str(e)) from None
    return CmdArgs(command, env.get("CNI_CONTAINERID", ""), env.get("CNI_NETNS", ""),
                   env.get("CNI_IFNAME", ""), _parse_cni_args(env.get("CNI_ARGS", "")),
                   tuple(filter(None, env.get("CNI_PATH", "").split(":"))), conf, invoker or ExecInvoker())


def _check_version(conf: dict[str, Any], supported: tuple[str, ...]) -> str:
    version = conf.get("cniVersion", "")
    if version not in supported:
        raise CNIError(cni.ERR_INCOMPATIBLE_VERSION, f"incompatible CNI version {version!r}",
                       f"plugin supports {', '.join(supported)}")
    return version


def dispatch(module: ModuleType, env: Mapping[str, str], stdin: bytes,
             invoker: Invoker | None = None) -> tuple[int, bytes]:
    """Run one CNI command against ``module``; return (exit status, stdout bytes).

    ``invoker`` runs the plugins this one delegates to (default: by exec)."""
    supported = getattr(module, "SUPPORTED_VERSIONS", cni.SUPPORTED_VERSIONS)
    version = cni.SPEC_VERSION
    try:
        args = parse(env, stdin, invoker)
        if args.command == "VERSION":
            body: Any = {"cniVersion": args.conf.get("cniVersion", cni.SPEC_VERSION),
                         "supportedVersions": list(supported)}
        else:
            version = _check_version(args.conf, supported)
            if args.command == "ADD":
                result = module.add(args.conf, args)
                result.cni_version = version
                body = result.to_dict()
            elif args.command == "DEL":
                module.delete(args.conf, args)
                body = None
            elif args.command == "CHECK":
                module.check(args.conf, args)
                body = None
            elif args.command == "STATUS":
                getattr(module, "status", lambda c, a: None)(args.conf, args)
                body = None
            else:  # GC
                getattr(module, "gc", lambda c, a: None)(args.conf, args)
                body = None
        return 0, (json.dumps(body).encode() if body is not None else b"")
    except CNIError as e:
        return 1, json.dumps(e.to_dict(version)).encode()
    except K8sNetLabError as e:
        return 1, json.dumps({"cniVersion": version, "code": 999, "msg": str(e)}).encode()
    except Exception as e:  # a bug: still answer in the protocol, with the traceback as details
        return 1, json.dumps({"cniVersion": version, "code": 999, "msg": f"internal error: {e!r}",
                              "details": traceback.format_exc(limit=5)}).encode()


def main(module: ModuleType) -> None:
    """Entry point of a plugin process: os.environ + stdin in, JSON out, exit status."""
    rc, out = dispatch(module, os.environ, sys.stdin.buffer.read())
    sys.stdout.buffer.write(out)
    sys.stdout.flush()
    sys.exit(rc)


def delegate(command: str, plugin_type: str, conf: dict[str, Any], args: CmdArgs,
             ifname: str | None = None) -> dict[str, Any] | None:
    """Run another plugin (IPAM or a main plugin) with this plugin's environment."""
    env = plugin_env(command, args.path, args.container_id, args.netns, ifname or args.ifname, args.args)
    conf = {**conf, "type": plugin_type}
    # node_netns None: a delegate runs in the namespace its caller is in
    out = args.invoker.invoke(plugin_type, env, json.dumps(conf).encode(), None, args.path)
    return json.loads(out) if out.strip() else None


def ipam_add(conf: dict[str, Any], args: CmdArgs) -> Result:
    ipam = conf.get("ipam") or {}
    if not ipam.get("type"):
        raise CNIError(cni.ERR_INVALID_CONFIG, "network config has no ipam.type")
    sub = {"cniVersion": conf["cniVersion"], "name": conf["name"], "ipam": ipam}
    res = delegate("ADD", ipam["type"], sub, args)
    if not res or not res.get("ips"):
        raise CNIError(cni.ERR_INVALID_CONFIG, f"IPAM plugin {ipam['type']} returned no IP")
    return Result.from_dict(res)


def ipam_del(conf: dict[str, Any], args: CmdArgs) -> None:
    ipam = conf.get("ipam") or {}
    if ipam.get("type"):
        delegate("DEL", ipam["type"], {"cniVersion": conf["cniVersion"], "name": conf["name"],
                                       "ipam": ipam}, args)
