"""The CNI protocol both sides speak (spec 1.1): result types, error codes, and running a plugin.

Plugins (``cni_plugins``) and the runtime (:mod:`k8snetlab.cni`) both import this module and
nothing else of each other. :class:`ExecInvoker` runs a plugin binary by the exec protocol:
``CNI_*`` variables in the environment, the network config on stdin, a result or an error
JSON on stdout.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol

from . import proc
from .errors import K8sNetLabError

SPEC_VERSION = "1.1.0"
SUPPORTED_VERSIONS = ("0.4.0", "1.0.0", "1.1.0")

# error codes of the CNI specification
ERR_INCOMPATIBLE_VERSION = 1
ERR_UNSUPPORTED_FIELD = 2
ERR_UNKNOWN_CONTAINER = 3
ERR_INVALID_ENV = 4
ERR_IO = 5
ERR_DECODE = 6
ERR_INVALID_CONFIG = 7
ERR_TRY_AGAIN = 11
ERR_NOT_AVAILABLE = 50
ERR_NOT_AVAILABLE_DAMAGED = 51

COMMANDS = ("ADD", "DEL", "CHECK", "VERSION", "STATUS", "GC")


class CNIError(K8sNetLabError):
    """A CNI error result: ``code`` (spec error code), ``msg``, ``details``."""

    def __init__(self, code: int, msg: str, details: str = "", plugin: str = ""):
        self.code, self.msg, self.details, self.plugin = code, msg, details, plugin
        who = f"CNI plugin {plugin!r}: " if plugin else ""
        extra = f" ({details})" if details else ""
        super().__init__(f"{who}{msg}{extra} [CNI error {code}]")

    def to_dict(self, cni_version: str = SPEC_VERSION) -> dict[str, Any]:
        d: dict[str, Any] = {"cniVersion": cni_version, "code": self.code, "msg": self.msg}
        if self.details:
            d["details"] = self.details
        return d


# ---------------------------------------------------------------------------------------
# results
@dataclass
class Interface:
    name: str
    mac: str = ""
    sandbox: str = ""
    mtu: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name}
        if self.mac:
            d["mac"] = self.mac
        if self.sandbox:
            d["sandbox"] = self.sandbox
        if self.mtu:
            d["mtu"] = self.mtu
        return d


@dataclass
class IPConfig:
    address: str                 # CIDR notation, e.g. 10.244.1.2/24
    gateway: str | None = None
    interface: int | None = None  # index into Result.interfaces

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"address": self.address}
        if self.gateway:
            d["gateway"] = self.gateway
        if self.interface is not None:
            d["interface"] = self.interface
        return d


@dataclass
class Route:
    dst: str
    gw: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"dst": self.dst, **({"gw": self.gw} if self.gw else {})}


@dataclass
class Result:
    cni_version: str = SPEC_VERSION
    interfaces: list[Interface] = field(default_factory=list)
    ips: list[IPConfig] = field(default_factory=list)
    routes: list[Route] = field(default_factory=list)
    dns: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"cniVersion": self.cni_version}
        if self.interfaces:
            d["interfaces"] = [i.to_dict() for i in self.interfaces]
        d["ips"] = [i.to_dict() for i in self.ips]
        if self.routes:
            d["routes"] = [r.to_dict() for r in self.routes]
        d["dns"] = self.dns
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Result":
        try:
            return cls(
                cni_version=d.get("cniVersion", SPEC_VERSION),
                interfaces=[Interface(i["name"], i.get("mac", ""), i.get("sandbox", ""), i.get("mtu"))
                            for i in d.get("interfaces") or []],
                ips=[IPConfig(i["address"], i.get("gateway"), i.get("interface"))
                     for i in d.get("ips") or []],
                routes=[Route(r["dst"], r.get("gw")) for r in d.get("routes") or []],
                dns=d.get("dns") or {})
        except (KeyError, TypeError) as e:
            raise CNIError(ERR_DECODE, f"malformed CNI result: missing {e}") from None

    def sandbox_ip(self, ifname: str) -> str | None:
        """The first address on the sandbox interface ``ifname`` (CIDR form)."""
        for ip in self.ips:
            if ip.interface is not None and ip.interface < len(self.interfaces):
                itf = self.interfaces[ip.interface]
                if itf.name == ifname and itf.sandbox:
                    return ip.address
        return self.ips[0].address if self.ips else None


# ---------------------------------------------------------------------------------------
# invokers
class Invoker(Protocol):
    """Runs one plugin: ``env`` and ``stdin`` in, stdout bytes out (raises :class:`CNIError`)."""

    def invoke(self, plugin_type: str, env: dict[str, str], stdin: bytes, node_netns: str | None,
               bin_dirs: tuple[str, ...]) -> bytes: ...


def find_plugin(plugin_type: str, bin_dirs: tuple[str, ...]) -> str:
    for d in bin_dirs:
        path = os.path.join(d, plugin_type)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    raise CNIError(ERR_INVALID_CONFIG, f"failed to find plugin {plugin_type!r} in path "
                   f"{':'.join(bin_dirs)}", plugin=plugin_type)


def decode_output(plugin_type: str, rc: int, out: bytes, err: bytes = b"") -> bytes:
    if rc == 0:
        return out
    try:
        e = json.loads(out or b"{}")
        raise CNIError(int(e["code"]), str(e.get("msg", "")), str(e.get("details", "")), plugin_type)
    except (ValueError, KeyError, TypeError):
        text = (err or out).decode(errors="replace").strip()
        raise CNIError(ERR_IO, f"exited {rc} without an error result", text[-300:], plugin_type) from None


class ExecInvoker:
    """Fork and exec the plugin binary, in the node's network namespace."""

    timeout = 60.0

    def invoke(self, plugin_type: str, env: dict[str, str], stdin: bytes, node_netns: str | None,
               bin_dirs: tuple[str, ...]) -> bytes:
        path = find_plugin(plugin_type, bin_dirs)
        full_env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), **env}
        # The calling thread enters the node's namespace (setns is per thread) and spawns the
        # plugin from there: the child, vforked without a preexec_fn, starts in the namespace
        # and execs the plugin itself. A child entering it on its own (preexec_fn) costs a
        # full fork of the runtime (~90 ms at 200 MB); nsenter costs a second exec per plugin.
        with proc.netns(node_netns):
            res = proc.run([path], input=stdin, env=full_env, check=False, timeout=self.timeout)
        return decode_output(plugin_type, res.returncode, res.stdout, res.stderr)


def plugin_env(command: str, path: tuple[str, ...], container_id: str | None = None, netns: str = "",
               ifname: str = "", args: Mapping[str, str] | None = None) -> dict[str, str]:
    """The ``CNI_*`` environment of one plugin call (no container: STATUS, GC, VERSION)."""
    env = {"CNI_COMMAND": command, "CNI_PATH": ":".join(path)}
    if container_id is not None:
        env.update(CNI_CONTAINERID=container_id, CNI_NETNS=netns, CNI_IFNAME=ifname,
                   CNI_ARGS=";".join(f"{k}={v}" for k, v in (args or {}).items()))
    return env
