"""Small pieces the plugins share: opening the host and pod namespaces, config fields."""

from __future__ import annotations

import ipaddress
import os
from typing import Any

from cni_plugins import skel
from k8snetlab import cni_protocol as cni
from k8snetlab.cni_protocol import CNIError
from k8snetlab.netutil import Netns


def host_ns() -> Netns:
    """The namespace the plugin runs in: the node's (the runtime put us there)."""
    return Netns(None, "node")


def pod_ns(args: Any) -> Netns:
    if not os.path.exists(args.netns):
        raise CNIError(cni.ERR_UNKNOWN_CONTAINER, f"network namespace {args.netns} does not exist")
    return Netns(args.netns, f"pod {args.args.get('K8S_POD_NAME', args.container_id[:12])}")


def pod_ns_if_exists(args: Any) -> Netns | None:
    """For DEL: the pod's namespace may already be gone, which is fine."""
    if not args.netns or not os.path.exists(args.netns):
        return None
    try:
        return Netns(args.netns, "pod")
    except Exception:
        return None


def field(conf: dict[str, Any], key: str, kind: type, default: Any) -> Any:
    value = conf.get(key, default)
    if value is not None and not isinstance(value, kind):
        raise CNIError(cni.ERR_INVALID_CONFIG, f"network config field {key!r} must be a {kind.__name__}")
    return value


def check_routes(pod: Netns, routes: Any, ifname: str) -> None:
    """CHECK's route half, as the reference plugins' ``ip.ValidateExpectedRoute``: every
    route of the result (``prevResult.routes``) is in the pod's main table, with the result's
    gateway when it names one. Raises CNIError naming the first one missing."""
    have = set()
    for r in pod.routes():
        dst = "0.0.0.0/0" if r["dst"] == "default" else str(ipaddress.ip_network(r["dst"], strict=False))
        have.add((dst, r["gateway"]))
        have.add((dst, None))
    for r in routes:
        dst = str(ipaddress.ip_network(r.dst, strict=False))
        if (dst, r.gw or None) not in have:
            via = f" via {r.gw}" if r.gw else ""
            raise CNIError(cni.ERR_INVALID_CONFIG, f"route {dst}{via} of the result is missing in the pod",
                           f"the pod's routing table no longer matches what ADD set up on {ifname}")


def remove_attachment(conf: dict[str, Any], args: Any, host_ifname: str) -> None:
    """DEL of a veth-wired pod: the host end, the pod's interface (if its namespace is still
    there), then the IPAM reservation. Idempotent: what is gone already is fine."""
    with host_ns() as host:
        host.del_link(host_ifname)
    pod = pod_ns_if_exists(args)
    if pod is not None:
        with pod:
            pod.del_link(args.ifname)
    skel.ipam_del(conf, args)
