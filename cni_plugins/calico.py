"""CNI ``calico``: the Calico pod layout (used by the ``ipip`` and ``bgp`` modes).

No bridge. Each pod gets a veth whose node end is ``cali<hash>`` with the MAC
``ee:ee:ee:ee:ee:ee`` and ``proxy_arp`` on; the pod holds its address as a ``/32`` and
routes everything via ``169.254.1.1``, an address nobody has: the node answers the pod's
ARP for it by proxy ARP, so every packet of the pod lands in the node's routing table,
which has a ``/32`` route per local pod (``ip dev cali...``). Between nodes the node agent
decides (IP-in-IP, or plain routes from BGP). Pod MTU from ``mtu`` (1480 for IPIP).
"""

from __future__ import annotations

import ipaddress
import sys
from typing import Any

from cni_plugins import skel
from cni_plugins.common import check_routes, field, host_ns, pod_ns, remove_attachment
from k8snetlab import cni_protocol as cni, naming
from k8snetlab.cni_protocol import CNIError, Interface, IPConfig, Result, Route

HOST_MAC = "ee:ee:ee:ee:ee:ee"


def add(conf: dict[str, Any], args: skel.CmdArgs) -> Result:
    mtu = field(conf, "mtu", int, 1480)
    cali = naming.host_veth("cali", args.container_id, args.ifname)
    with host_ns() as host, pod_ns(args) as pod:
        if pod.index(args.ifname) is not None:
            raise CNIError(cni.ERR_INVALID_CONFIG, f"container already has an interface {args.ifname!r}")
        ipam = skel.ipam_add(conf, args)
        try:
            ip = ipaddress.ip_interface(ipam.ips[0].address).ip
            host.add_veth(cali, args.ifname, pod, mtu=mtu)
            host.ipr.link("set", index=host.require_index(cali), address=HOST_MAC)
            host.set_sysctl(f"net.ipv4.conf.{cali}.proxy_arp", 1)
            host.set_sysctl(f"net.ipv4.neigh.{cali}.proxy_delay", 0)
            host.set_sysctl(f"net.ipv4.conf.{cali}.forwarding", 1)
            host.link_up(cali)
            host.add_route(f"{ip}/32", dev=cali)
            pod.ensure_addr(args.ifname, f"{ip}/32")
            pod.link_up(args.ifname)
            pod.add_route(f"{naming.CALICO_GATEWAY}/32", dev=args.ifname)
            pod.add_route("default", gateway=naming.CALICO_GATEWAY, dev=args.ifname)
            hv, pv = host.link_brief(cali), pod.link_brief(args.ifname)
        except Exception:
            host.del_link(cali)
            skel.ipam_del(conf, args)
            raise
    return Result(interfaces=[Interface(cali, hv["mac"]), Interface(args.ifname, pv["mac"], args.netns, pv["mtu"])],
                  ips=[IPConfig(f"{ip}/32", None, 1)], routes=[Route("0.0.0.0/0", naming.CALICO_GATEWAY)])


def delete(conf: dict[str, Any], args: skel.CmdArgs) -> None:
    remove_attachment(conf, args, naming.host_veth("cali", args.container_id, args.ifname))


def check(conf: dict[str, Any], args: skel.CmdArgs) -> None:
    prev = args.prev_result
    if prev is None:
        raise CNIError(cni.ERR_INVALID_CONFIG, "CHECK needs prevResult")
    cali = naming.host_veth("cali", args.container_id, args.ifname)
    want = prev.sandbox_ip(args.ifname)
    with host_ns() as host, pod_ns(args) as pod:
        if host.index(cali) is None:
            raise CNIError(cni.ERR_INVALID_CONFIG, f"host interface {cali} is missing")
        if want not in pod.addrs(args.ifname):
            raise CNIError(cni.ERR_INVALID_CONFIG, f"{args.ifname} does not hold {want}")
        if not any(r["dst"] == want for r in host.routes()):
            raise CNIError(cni.ERR_INVALID_CONFIG, f"node has no route to {want}")
        check_routes(pod, prev.routes, args.ifname)


if __name__ == "__main__":
    skel.main(sys.modules[__name__])
