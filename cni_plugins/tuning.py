"""CNI ``tuning``: sysctls inside the pod's network namespace, as the reference plugin sets them.

A chained plugin: it makes nothing, it writes ``/proc/sys/net/...`` from inside the pod's
namespace (which is what makes those files the pod's own). The sysctls come from the config's
``sysctl`` map (node-wide, the same for every pod) and, per pod, from ``args.cni.sysctl``,
where the runtime puts the pod's ``securityContext.sysctls``; a per-pod value wins. ``IFNAME``
in a name stands for the pod's interface (``net.ipv4.conf.IFNAME.arp_filter``).

Only network sysctls are per namespace: any other name is refused (CNI error 7), and so is a
``net.*`` name the pod's namespace does not have. The old values are saved under ``dataDir``
and written back on DEL while the pod's namespace still exists; CHECK reads every value back.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from cni_plugins import skel
from cni_plugins.common import field, pod_ns_if_exists
from k8snetlab import cni_protocol as cni
from k8snetlab.cni_protocol import CNIError, Result
from k8snetlab.errors import NetlinkError
from k8snetlab.netutil import get_sysctl, set_sysctl

DEFAULT_DATA_DIR = "/run/cni/tuning"
UNSUPPORTED = ("mac", "mtu", "promisc", "allmulti", "txQLen")


def sysctls(conf: dict[str, Any], ifname: str) -> dict[str, str]:
    """The sysctls to set, config first, then the per-pod ``args.cni.sysctl``; checked."""
    for key in UNSUPPORTED:
        if key in conf:
            raise CNIError(cni.ERR_UNSUPPORTED_FIELD, f"tuning: {key!r} is not supported here, only sysctl")
    merged: dict[str, str] = {}
    per_pod = ((conf.get("args") or {}).get("cni") or {}).get("sysctl") or {}
    for src in (field(conf, "sysctl", dict, {}) or {}, per_pod):
        if not isinstance(src, dict):
            raise CNIError(cni.ERR_INVALID_CONFIG, "tuning: sysctl must be a map of name to value")
        for name, value in src.items():
            name = str(name).replace("IFNAME", ifname)
            if not name.startswith(("net.", "net/")) or ".." in name or "/.." in name:
                raise CNIError(cni.ERR_INVALID_CONFIG, f"tuning: {name!r} is not a network sysctl",
                               "only net.* sysctls belong to the pod's network namespace")
            merged[name] = str(value)
    return merged


def _saved(conf: dict[str, Any], args: skel.CmdArgs) -> Path:
    return Path(field(conf, "dataDir", str, DEFAULT_DATA_DIR)) / f"{args.container_id}-{args.ifname}.json"


def add(conf: dict[str, Any], args: skel.CmdArgs) -> Result:
    wanted = sysctls(conf, args.ifname)
    prev = args.prev_result
    if prev is None:
        raise CNIError(cni.ERR_INVALID_CONFIG, "tuning must be chained after a plugin that makes the pod's interface")
    if not wanted:
        return prev
    old: dict[str, str] = {}
    try:
        for name, value in wanted.items():
            old[name] = set_sysctl(name, value, args.netns, "pod")
    except NetlinkError as e:
        for name, value in old.items():          # ADD rolls back what it wrote
            set_sysctl(name, value, args.netns, "pod")
        raise CNIError(cni.ERR_INVALID_CONFIG, f"tuning: {e}",
                       "is it a sysctl of the network namespace?") from None
    path = _saved(conf, args)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(old))
    return prev


def delete(conf: dict[str, Any], args: skel.CmdArgs) -> None:
    path = _saved(conf, args)
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return                                   # never added, or already deleted
    ns = pod_ns_if_exists(args)
    if ns is not None:
        ns.close()
        for name, value in old.items():
            try:
                set_sysctl(name, value, args.netns, "pod")
            except NetlinkError:
                pass                             # the namespace went away meanwhile
    path.unlink(missing_ok=True)


def check(conf: dict[str, Any], args: skel.CmdArgs) -> None:
    for name, value in sysctls(conf, args.ifname).items():
        try:
            have = get_sysctl(name, args.netns, "pod")
        except NetlinkError as e:
            raise CNIError(cni.ERR_INVALID_CONFIG, f"tuning: {e}") from None
        if have.split() != value.split():
            raise CNIError(cni.ERR_INVALID_CONFIG, f"tuning: {name} is {have!r}, not {value!r}")


if __name__ == "__main__":
    skel.main(sys.modules[__name__])
