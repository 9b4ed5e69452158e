"""CNI runtime: runs plugins by the CNI exec protocol (spec 1.1), as a kubelet's runtime does.

A plugin is found by its ``type`` on ``CNI_PATH`` and executed inside the *node's* network
namespace (the plugin's "host" side) with ``CNI_COMMAND``, ``CNI_CONTAINERID``, ``CNI_NETNS``,
``CNI_IFNAME``, ``CNI_ARGS`` and ``CNI_PATH`` in its environment and the network config on
stdin; it answers with a result or an error JSON on stdout. Network config lists run their
plugins in order for ADD (each gets the previous one's result as ``prevResult``) and in
reverse for DEL; the last ADD result is cached on disk (as libcni does under
``/var/lib/cni/results``) so that DEL and CHECK get ``prevResult`` too.

Two invokers share all of that:
- :class:`ExecInvoker` forks and executes the plugin binary: our own plugins (through small
  wrappers written into the cluster's state dir) and the reference plugins from Debian's
  ``containernetworking-plugins`` alike. This is the default.
- :class:`InProcessInvoker` hands the same environment and the same stdin bytes to our own
  plugins' skeleton inside this process (after entering the node's namespace on the calling
  thread) and parses the same stdout bytes. It skips only fork/exec and the interpreter's
  start (~150 ms a plugin here), for clusters of hundreds of pods.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from . import proc
from .errors import K8sNetLabError, SpecError

log = logging.getLogger(__name__)

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
# network configuration
@dataclass
class NetworkConfigList:
    """A CNI network configuration list (``.conflist``)."""

    name: str
    cni_version: str
    plugins: list[dict[str, Any]]
    disable_check: bool = False
    bin_dirs: tuple[str, ...] = ()   # where this list's plugin binaries live (CNI_PATH)

    @classmethod
    def from_dict(cls, d: dict[str, Any], bin_dirs: tuple[str, ...] = (), source: str = "") -> "NetworkConfigList":
        where = f"{source}: " if source else ""
        if not isinstance(d, dict):
            raise SpecError(f"{where}network config must be a JSON object")
        if "plugins" not in d:  # a single plugin config: wrap it, as runtimes do
            if "type" not in d:
                raise SpecError(f"{where}network config has neither 'plugins' nor 'type'")
            d = {"cniVersion": d.get("cniVersion", SPEC_VERSION), "name": d.get("name", ""),
                 "plugins": [{k: v for k, v in d.items() if k not in ("cniVersion", "name")}]}
        for key in ("name", "cniVersion"):
            if not d.get(key):
                raise SpecError(f"{where}network config list needs '{key}'")
        if d["cniVersion"] not in SUPPORTED_VERSIONS:
            raise SpecError(f"{where}cniVersion {d['cniVersion']!r} not supported: use one of "
                            f"{', '.join(SUPPORTED_VERSIONS)}")
        plugins = d["plugins"]
        if not isinstance(plugins, list) or not plugins or not all(
                isinstance(p, dict) and isinstance(p.get("type"), str) for p in plugins):
            raise SpecError(f"{where}'plugins' must be a non-empty list of objects with a 'type'")
        return cls(d["name"], d["cniVersion"], plugins, bool(d.get("disableCheck")), bin_dirs)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"cniVersion": self.cni_version, "name": self.name, "plugins": self.plugins}
        if self.disable_check:
            d["disableCheck"] = True
        return d

    def plugin_config(self, plugin: dict[str, Any], prev: dict[str, Any] | None) -> dict[str, Any]:
        conf = {"cniVersion": self.cni_version, "name": self.name, **plugin}
        if prev is not None:
            conf["prevResult"] = prev
        return conf


@dataclass
class RuntimeConf:
    """What the runtime knows about one attachment (container + interface)."""

    container_id: str
    netns: str            # path of the pod's network namespace
    ifname: str = "eth0"
    args: dict[str, str] = field(default_factory=dict)   # CNI_ARGS (K8S_POD_NAME...)

    def cni_args(self) -> str:
        return ";".join(f"{k}={v}" for k, v in self.args.items())


# ---------------------------------------------------------------------------------------
# invokers
class Invoker(Protocol):
    def invoke(self, plugin_type: str, env: dict[str, str], stdin: bytes, node_netns: str | None,
               bin_dirs: tuple[str, ...]) -> bytes: ...


def find_plugin(plugin_type: str, bin_dirs: tuple[str, ...]) -> str:
    for d in bin_dirs:
        path = os.path.join(d, plugin_type)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    raise CNIError(ERR_INVALID_CONFIG, f"failed to find plugin {plugin_type!r} in path "
                   f"{':'.join(bin_dirs)}", plugin=plugin_type)


def _decode_output(plugin_type: str, rc: int, out: bytes, err: bytes = b"") -> bytes:
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
        res = proc.run([path], input=stdin, env=full_env, netns=node_netns, check=False,
                       timeout=self.timeout)
        return _decode_output(plugin_type, res.returncode, res.stdout, res.stderr)


class InProcessInvoker:
    """Call our own plugins' skeleton in this process; exec anything else."""

    def __init__(self) -> None:
        self._exec = ExecInvoker()

    def invoke(self, plugin_type: str, env: dict[str, str], stdin: bytes, node_netns: str | None,
               bin_dirs: tuple[str, ...]) -> bytes:
        from cni_plugins import PLUGINS, skel
        if plugin_type not in PLUGINS:
            return self._exec.invoke(plugin_type, env, stdin, node_netns, bin_dirs)
        module = PLUGINS.get(plugin_type)
        with proc.netns(node_netns):
            rc, out = skel.dispatch(module, env, stdin, invoker=self)
        return _decode_output(plugin_type, rc, out)


INVOKERS: dict[str, Callable[[], Invoker]] = {"exec": ExecInvoker, "inprocess": InProcessInvoker}


# ---------------------------------------------------------------------------------------
# the runtime
class CNIRuntime:
    """Runs network config lists for attachments on one node, like libcni."""

    def __init__(self, node_netns: str | None, cache_dir: str | os.PathLike, invoker: Invoker | None = None):
        self.node_netns = node_netns
        self.cache_dir = Path(cache_dir)
        self.invoker: Invoker = invoker or ExecInvoker()
        self._lock = threading.Lock()

    # -- one plugin --------------------------------------------------------------------------
    def _env(self, command: str, rt: RuntimeConf | None, bin_dirs: tuple[str, ...]) -> dict[str, str]:
        env = {"CNI_COMMAND": command, "CNI_PATH": ":".join(bin_dirs)}
        if rt is not None:
            env.update(CNI_CONTAINERID=rt.container_id, CNI_NETNS=rt.netns, CNI_IFNAME=rt.ifname,
                       CNI_ARGS=rt.cni_args())
        return env

    def exec_plugin(self, command: str, conf: dict[str, Any], rt: RuntimeConf | None,
                    bin_dirs: tuple[str, ...]) -> dict[str, Any] | None:
        out = self.invoker.invoke(conf["type"], self._env(command, rt, bin_dirs),
                                  json.dumps(conf).encode(), self.node_netns, bin_dirs)
        if not out.strip():
            return None
        try:
            return json.loads(out)
        except ValueError:
            raise CNIError(ERR_DECODE, "plugin printed something that is not JSON",
                           out[:200].decode(errors="replace"), conf["type"]) from None

    # -- lists -------------------------------------------------------------------------------
    def add(self, net: NetworkConfigList, rt: RuntimeConf) -> Result:
        prev: dict[str, Any] | None = None
        done: list[dict[str, Any]] = []
        try:
            for plugin in net.plugins:
                conf = net.plugin_config(plugin, prev)
                prev = self.exec_plugin("ADD", conf, rt, net.bin_dirs)
                done.append(plugin)
                if prev is None:
                    raise CNIError(ERR_DECODE, "ADD returned no result", plugin=plugin["type"])
        except Exception:
            # a failed ADD leaves nothing behind: DEL what was added, newest first
            for plugin in reversed(done):
                try:
                    self.exec_plugin("DEL", net.plugin_config(plugin, prev), rt, net.bin_dirs)
                except K8sNetLabError as e:  # report the first error, not the rollback's
                    log.warning("rollback DEL of %s failed: %s", plugin["type"], e)
            raise
        assert prev is not None
        self._cache_write(net, rt, prev)
        return Result.from_dict(prev)

    def delete(self, net: NetworkConfigList, rt: RuntimeConf) -> None:
        """DEL in reverse order; idempotent (also when the pod's namespace is gone)."""
        prev = self._cache_read(net, rt)
        first_error: K8sNetLabError | None = None
        for plugin in reversed(net.plugins):
            try:
                self.exec_plugin("DEL", net.plugin_config(plugin, prev), rt, net.bin_dirs)
            except K8sNetLabError as e:
                first_error = first_error or e
        if first_error:
            raise first_error
        self._cache_path(net, rt).unlink(missing_ok=True)

    def check(self, net: NetworkConfigList, rt: RuntimeConf) -> None:
        if net.disable_check:
            return
        prev = self._cache_read(net, rt)
        if prev is None:
            raise CNIError(ERR_UNKNOWN_CONTAINER, f"no cached result for {rt.container_id}/{rt.ifname}")
        for plugin in net.plugins:
            self.exec_plugin("CHECK", net.plugin_config(plugin, prev), rt, net.bin_dirs)

    def status(self, net: NetworkConfigList) -> None:
        """STATUS (1.1): raises CNIError (code 50/51) if a plugin is not ready for ADDs."""
        if net.cni_version != "1.1.0":
            return
        for plugin in net.plugins:
            self.exec_plugin("STATUS", net.plugin_config(plugin, None), None, net.bin_dirs)

    def gc(self, net: NetworkConfigList, valid: list[RuntimeConf]) -> None:
        """GC (1.1): plugins release whatever belongs to attachments not in ``valid``."""
        if net.cni_version != "1.1.0":
            return
        attachments = [{"containerID": r.container_id, "ifname": r.ifname} for r in valid]
        for plugin in net.plugins:
            conf = net.plugin_config(plugin, None)
            conf["cni.dev/valid-attachments"] = attachments
            self.exec_plugin("GC", conf, None, net.bin_dirs)
        keep = {(r.container_id, r.ifname) for r in valid}
        if self.cache_dir.is_dir():
            for f in self.cache_dir.iterdir():
                try:   # match on the recorded network name: "net" must not take "net-b"'s files
                    entry = json.loads(f.read_text())
                except (OSError, ValueError):
                    continue
                if not isinstance(entry, dict) or entry.get("networkName") != net.name:
                    continue
                if (entry.get("containerId"), entry.get("ifName")) not in keep:
                    f.unlink(missing_ok=True)

    def version(self, plugin_type: str, bin_dirs: tuple[str, ...]) -> dict[str, Any]:
        out = self.exec_plugin("VERSION", {"cniVersion": SPEC_VERSION, "type": plugin_type}, None, bin_dirs)
        return out or {}

    # -- result cache ------------------------------------------------------------------------
    def _cache_path(self, net: NetworkConfigList, rt: RuntimeConf) -> Path:
        return self.cache_dir / f"{net.name}-{rt.container_id}-{rt.ifname}"

    def _cache_write(self, net: NetworkConfigList, rt: RuntimeConf, result: dict[str, Any]) -> None:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        path = self._cache_path(net, rt)
        tmp = path.parent / f".{path.name}.tmp"
        tmp.write_text(json.dumps({"kind": "cniCacheV1", "containerId": rt.container_id,
                                   "ifName": rt.ifname, "networkName": net.name, "result": result}))
        tmp.replace(path)

    def _cache_read(self, net: NetworkConfigList, rt: RuntimeConf) -> dict[str, Any] | None:
        try:
            return json.loads(self._cache_path(net, rt).read_text())["result"]
        except (OSError, ValueError, KeyError):
            return None
