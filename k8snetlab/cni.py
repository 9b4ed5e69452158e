"""CNI runtime: runs network config lists on a node, as a kubelet's container runtime does (libcni).

ADD runs a list's plugins in order (each gets the previous result as ``prevResult``) and
rolls back on failure; DEL runs them in reverse and is idempotent; the last ADD result is
cached on disk (as libcni does under ``/var/lib/cni/results``) so DEL and CHECK get
``prevResult`` too. How a plugin is run is the invoker's business
(:class:`~k8snetlab.cni_protocol.ExecInvoker` by default; our plugins can also be called
in-process by ``cni_plugins.inprocess.InProcessInvoker``).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .cni_protocol import (COMMANDS, ERR_DECODE, ERR_INCOMPATIBLE_VERSION, ERR_INVALID_CONFIG,  # noqa: F401
                           ERR_INVALID_ENV, ERR_IO, ERR_NOT_AVAILABLE, ERR_NOT_AVAILABLE_DAMAGED,
                           ERR_TRY_AGAIN, ERR_UNKNOWN_CONTAINER, ERR_UNSUPPORTED_FIELD, SPEC_VERSION,
                           SUPPORTED_VERSIONS, CNIError, ExecInvoker, Interface, Invoker, IPConfig,
                           Result, Route, find_plugin, plugin_env)
from .errors import K8sNetLabError, SpecError
from .registry import Registry

log = logging.getLogger(__name__)

# how the runtime runs a plugin (``cni.invoke`` in a cluster file)
INVOKERS: Registry[Callable[[], Invoker]] = Registry("CNI invoker", "k8snetlab.cni_invokers")


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

    def plugin_config(self, plugin: dict[str, Any], prev: dict[str, Any] | None,
                      rt: "RuntimeConf | None" = None) -> dict[str, Any]:
        """One plugin's config as the runtime hands it over (libcni's ``buildOneConfig``): the
        list's name and version, ``prevResult``, and the capability arguments of ``rt`` that
        the plugin declares in ``capabilities`` as its ``runtimeConfig``; the per-attachment
        ``args.cni`` of ``rt`` (CNI conventions) go to every plugin, which ignore what they
        do not know."""
        conf = {"cniVersion": self.cni_version, "name": self.name, **plugin}
        if prev is not None:
            conf["prevResult"] = prev
        if rt is not None:
            caps = plugin.get("capabilities") or {}
            runtime = {k: v for k, v in rt.capability_args.items() if caps.get(k) is True}
            if runtime:
                conf["runtimeConfig"] = {**(plugin.get("runtimeConfig") or {}), **runtime}
            if rt.config_args:
                args = dict(plugin.get("args") or {})
                args["cni"] = {**(args.get("cni") or {}), **rt.config_args}
                conf["args"] = args
        return conf


@dataclass
class RuntimeConf:
    """What the runtime knows about one attachment (container + interface)."""

    container_id: str
    netns: str            # path of the pod's network namespace
    ifname: str = "eth0"
    args: dict[str, str] = field(default_factory=dict)   # CNI_ARGS (K8S_POD_NAME...)
    capability_args: dict[str, Any] = field(default_factory=dict)   # portMappings, bandwidth, ...
    config_args: dict[str, Any] = field(default_factory=dict)       # args.cni of every plugin config


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
        if rt is None:
            return plugin_env(command, bin_dirs)
        return plugin_env(command, bin_dirs, rt.container_id, rt.netns, rt.ifname, rt.args)

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
                conf = net.plugin_config(plugin, prev, rt)
                prev = self.exec_plugin("ADD", conf, rt, net.bin_dirs)
                done.append(plugin)
                if prev is None:
                    raise CNIError(ERR_DECODE, "ADD returned no result", plugin=plugin["type"])
        except Exception:
            # a failed ADD leaves nothing behind: DEL what was added, newest first
            for plugin in reversed(done):
                try:
                    self.exec_plugin("DEL", net.plugin_config(plugin, prev, rt), rt, net.bin_dirs)
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
                self.exec_plugin("DEL", net.plugin_config(plugin, prev, rt), rt, net.bin_dirs)
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
            self.exec_plugin("CHECK", net.plugin_config(plugin, prev, rt), rt, net.bin_dirs)

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
