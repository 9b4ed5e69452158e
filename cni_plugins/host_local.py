"""CNI IPAM ``host-local``: addresses from ranges of the node's pod CIDR, state on disk.

Config (``ipam``): ``subnet`` or ``ranges`` (a list of range sets; the first set is used),
``routes``, ``dataDir`` (where ``k8snetlab.ipam`` keeps one file per address). GC (CNI 1.1)
releases every address whose attachment is not in ``cni.dev/valid-attachments``.
"""

from __future__ import annotations

import sys
from typing import Any

from cni_plugins import skel
from k8snetlab import cni_protocol as cni
from k8snetlab.cni_protocol import CNIError, IPConfig, Result, Route
from k8snetlab.ipam import HostLocalStore, IPAMError, Range

DEFAULT_DATA_DIR = "/var/lib/cni/networks"


def _ipam(conf: dict[str, Any]) -> tuple[HostLocalStore, list[Range], dict[str, Any]]:
    ipam = conf.get("ipam")
    if not isinstance(ipam, dict):
        raise CNIError(cni.ERR_INVALID_CONFIG, "host-local needs an 'ipam' object")
    try:
        if ipam.get("ranges"):
            ranges = [Range.from_conf(r) for r in ipam["ranges"][0]]
        elif ipam.get("subnet"):
            ranges = [Range.from_conf({k: ipam[k] for k in ("subnet", "rangeStart", "rangeEnd", "gateway") if k in ipam})]
        else:
            raise CNIError(cni.ERR_INVALID_CONFIG, "host-local needs 'ranges' or 'subnet'")
    except (IPAMError, ValueError, TypeError, KeyError) as e:
        raise CNIError(cni.ERR_INVALID_CONFIG, f"invalid IPAM range: {e}") from None
    store = HostLocalStore(ipam.get("dataDir", DEFAULT_DATA_DIR), conf.get("name", ""))
    return store, ranges, ipam


def add(conf: dict[str, Any], args: skel.CmdArgs) -> Result:
    store, ranges, ipam = _ipam(conf)
    try:
        alloc = store.allocate(args.container_id, args.ifname, ranges)
    except IPAMError as e:
        raise CNIError(getattr(e, "code", cni.ERR_TRY_AGAIN) or cni.ERR_TRY_AGAIN, str(e)) from None
    routes = [Route(r["dst"], r.get("gw")) for r in ipam.get("routes") or []]
    gw = str(alloc.gateway) if alloc.gateway else None
    return Result(ips=[IPConfig(str(alloc.address), gw)], routes=routes)


def delete(conf: dict[str, Any], args: skel.CmdArgs) -> None:
    store, _, _ = _ipam(conf)
    store.release(args.container_id, args.ifname)


def check(conf: dict[str, Any], args: skel.CmdArgs) -> None:
    store, _, _ = _ipam(conf)
    if store.get(args.container_id, args.ifname) is None:
        raise CNIError(cni.ERR_INVALID_CONFIG, f"no address held by {args.container_id}/{args.ifname}")


def gc(conf: dict[str, Any], args: skel.CmdArgs) -> None:
    store, _, _ = _ipam(conf)
    valid = {(a["containerID"], a["ifname"]) for a in conf.get("cni.dev/valid-attachments") or []}
    store.gc(valid)


def status(conf: dict[str, Any], args: skel.CmdArgs) -> None:
    _ipam(conf)


if __name__ == "__main__":
    skel.main(sys.modules[__name__])
