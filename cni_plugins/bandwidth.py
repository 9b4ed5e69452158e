"""CNI ``bandwidth``: a pod's rate limits as token buckets on its node-side veth.

A chained plugin, as the reference: rates and bursts (bits) from the config or, with
``capabilities: {bandwidth: true}``, from ``runtimeConfig.bandwidth``, which the kubelet fills
from the annotations ``kubernetes.io/ingress-bandwidth`` / ``egress-bandwidth``. How each
direction is shaped is at :func:`add`; the bucket's sizes at :func:`tbf_params`.
"""

from __future__ import annotations

import hashlib
import sys
from typing import Any

from cni_plugins import skel
from cni_plugins.common import host_ns, pod_ns
from k8snetlab import cni_protocol as cni
from k8snetlab.cni_protocol import CNIError, Interface, Result
from k8snetlab.errors import NetlinkError

LATENCY_MS = 25
IFB_PREFIX = "bwp"
MAX_IFNAME = 15
TICKS_PER_US = 15.625                   # /proc/net/psched on Linux: 1000 / 64
MAX_BUFFER_S = (2 ** 32 - 1) / TICKS_PER_US / 1e6   # the longest bucket a 32-bit tick count holds
FIELDS = ("ingressRate", "ingressBurst", "egressRate", "egressBurst")


def limits(conf: dict[str, Any]) -> dict[str, int]:
    """The four numbers, runtimeConfig.bandwidth winning over the config; checked as the
    reference checks them (a rate needs a burst and the other way round)."""
    rc = (conf.get("runtimeConfig") or {}).get("bandwidth")
    src = rc if isinstance(rc, dict) and rc else conf
    out = {}
    for key in FIELDS:
        v = src.get(key, 0) or 0
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            raise CNIError(cni.ERR_INVALID_CONFIG, f"{key} must be a number of bits >= 0, not {v!r}")
        out[key] = int(v)
    for d in ("ingress", "egress"):
        rate, burst = out[f"{d}Rate"], out[f"{d}Burst"]
        if rate and not burst:
            raise CNIError(cni.ERR_INVALID_CONFIG, f"{d}Rate is set but {d}Burst is not: set both")
        if burst and not rate:
            raise CNIError(cni.ERR_INVALID_CONFIG, f"{d}Burst is set but {d}Rate is not: set both")
        if burst // 8 >= 2 ** 32:
            raise CNIError(cni.ERR_INVALID_CONFIG, f"{d}Burst cannot be more than 4 GB")
        if rate and rate < 8:
            raise CNIError(cni.ERR_INVALID_CONFIG, f"{d}Rate must be at least 8 bits per second")
    return out


def tbf_params(rate_bits: int, burst_bits: int) -> dict[str, int]:
    """rate (bits/s), burst and limit (bytes) of the bucket, as the reference computes them:
    latency 25 ms, limit = rate x latency + burst. The request carries the burst as its time
    at the rate in ticks of a 32-bit field, so a longer burst is cut to fit (MAX_BUFFER_S; the
    reference's Go code would wrap). The kubelet's "no limit" burst (2^32-1 bits, 512 MiB)
    lets that much pass at line rate first, as on a containerd node."""
    rate_bytes = rate_bits // 8
    burst = min(burst_bits // 8, int(rate_bytes * MAX_BUFFER_S))
    limit = int(rate_bytes * LATENCY_MS / 1000) + burst
    return {"rate_bits": rate_bits, "burst_bytes": max(burst, 1), "limit_bytes": min(limit, 2 ** 32 - 1)}


def ifb_name(network: str, container_id: str) -> str:
    return (IFB_PREFIX + hashlib.sha512((network + container_id).encode()).hexdigest())[:MAX_IFNAME]


def host_interface(prev: Result, args: skel.CmdArgs) -> str:
    """The node-side end of the pod's veth: the result's interface (no sandbox) whose index
    is the peer of the pod's ``ifname``."""
    with pod_ns(args) as pod:
        peer = pod.peer_index(args.ifname) if pod.index(args.ifname) is not None else None
    if peer is None:
        raise CNIError(cni.ERR_INVALID_CONFIG, f"the pod has no veth {args.ifname}")
    with host_ns() as host:
        for itf in prev.interfaces:
            if not itf.sandbox:
                link = host.link(itf.name)
                if link is not None and link["index"] == peer:
                    return itf.name
    raise CNIError(cni.ERR_INVALID_CONFIG, f"no node-side interface of {args.ifname} in prevResult",
                   "bandwidth must follow a plugin that makes a veth pair")


def _prepare(conf: dict[str, Any], args: skel.CmdArgs) -> tuple[dict[str, int], Result, str | None]:
    """(limits, prevResult, node-side veth or None when there is nothing to shape)."""
    bw = limits(conf)
    prev = args.prev_result
    if prev is None:
        raise CNIError(cni.ERR_INVALID_CONFIG, "bandwidth must be chained after a plugin that makes the "
                       "pod's interface", "no prevResult")
    if not (bw["ingressRate"] or bw["egressRate"]):
        return bw, prev, None
    return bw, prev, host_interface(prev, args)


def add(conf: dict[str, Any], args: skel.CmdArgs) -> Result:
    """Ingress (into the pod) leaves the node through the node-side veth: a ``tbf`` root qdisc
    there. Egress enters the node through that veth, and Linux shapes only what leaves a
    device: the veth's ``ingress`` qdisc redirects every packet (u32 match-all, mirred egress
    redirect) to an ``ifb`` ``bwp<hash>`` with its own ``tbf``; the ifb joins the result's
    interfaces. DEL removes the ifb (the veth's qdiscs go with the veth)."""
    bw, prev, dev = _prepare(conf, args)
    if dev is None:
        return prev
    ifb = ifb_name(conf["name"], args.container_id)
    with host_ns() as host:
        try:
            if bw["ingressRate"]:
                p = tbf_params(bw["ingressRate"], bw["ingressBurst"])
                host.add_tbf(dev, p["rate_bits"], p["burst_bytes"], p["limit_bytes"])
            if bw["egressRate"]:
                mtu = host.link(dev)["mtu"]
                host.add_link(ifb, "ifb", mtu=mtu)
                host.link_up(ifb)
                host.add_ingress_qdisc(dev)
                host.add_redirect(dev, ifb)
                p = tbf_params(bw["egressRate"], bw["egressBurst"])
                host.add_tbf(ifb, p["rate_bits"], p["burst_bytes"], p["limit_bytes"])
                prev.interfaces.append(Interface(ifb, host.link(ifb)["mac"]))
        except NetlinkError as e:
            host.del_link(ifb)
            raise CNIError(cni.ERR_IO, f"bandwidth: {e}") from None
        except Exception:
            host.del_link(ifb)
            raise
    return prev


def delete(conf: dict[str, Any], args: skel.CmdArgs) -> None:
    limits(conf)
    with host_ns() as host:
        host.del_link(ifb_name(conf["name"], args.container_id))


def _check_tbf(host: Any, dev: str, rate_bits: int, burst_bits: int) -> None:
    tbf = [q for q in host.qdiscs(dev) if q["kind"] == "tbf" and q["parent"] == 0xFFFFFFFF]
    if not tbf:
        raise CNIError(cni.ERR_INVALID_CONFIG, f"{dev} has no tbf root qdisc")
    want = tbf_params(rate_bits, burst_bits)
    if tbf[0]["rate"] != want["rate_bits"] // 8 or tbf[0]["limit"] != want["limit_bytes"]:
        raise CNIError(cni.ERR_INVALID_CONFIG, f"the tbf of {dev} has rate {tbf[0]['rate'] * 8} bit/s, "
                       f"limit {tbf[0]['limit']} B; want {want['rate_bits']} bit/s, {want['limit_bytes']} B")


def check(conf: dict[str, Any], args: skel.CmdArgs) -> None:
    bw, _, dev = _prepare(conf, args)
    if dev is None:
        return
    with host_ns() as host:
        if bw["ingressRate"]:
            _check_tbf(host, dev, bw["ingressRate"], bw["ingressBurst"])
        if bw["egressRate"]:
            ifb = ifb_name(conf["name"], args.container_id)
            link = host.link(ifb)
            if link is None:
                raise CNIError(cni.ERR_INVALID_CONFIG, f"ifb device {ifb} is missing")
            if not any(f["redirect_to"] == link["index"] for f in host.filters(dev)):
                raise CNIError(cni.ERR_INVALID_CONFIG, f"nothing redirects {dev}'s ingress to {ifb}")
            _check_tbf(host, ifb, bw["egressRate"], bw["egressBurst"])


if __name__ == "__main__":
    skel.main(sys.modules[__name__])
