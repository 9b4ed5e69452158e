"""CNI ``bridge``: pods on a node-local Linux bridge (``cni0``), as the reference plugin.

Per pod: a veth pair, the node end (``veth<hash>``) enslaved to the bridge, the pod end
(``eth0``) addressed from IPAM with a default route via the bridge's gateway address. The
bridge carries the first address of the node's pod CIDR when ``isGateway`` is set; its MAC is
pinned when it is created, so it does not follow its ports as pods come and go. Packets
between pods of one node are switched by the bridge; anything else is routed by the node.

Config: ``bridge`` (cni0), ``isGateway``, ``isDefaultGateway``, ``mtu``, ``hairpinMode``,
``ipam``. ADD rolls back what it made; DEL is idempotent.
"""

from __future__ import annotations

import ipaddress
import sys
from typing import Any

from cni_plugins import skel
from cni_plugins.common import check_routes, field, host_ns, pod_ns, remove_attachment
from k8snetlab import cni_protocol as cni, naming
from k8snetlab.cni_protocol import CNIError, Interface, IPConfig, Result, Route

KNOWN = {"cniVersion", "name", "type", "bridge", "isGateway", "isDefaultGateway", "mtu",
         "hairpinMode", "ipam", "prevResult", "runtimeConfig", "args", "promiscMode", "ipMasq",
         "cni.dev/valid-attachments", "dns", "capabilities"}


def _conf(conf: dict[str, Any]) -> dict[str, Any]:
    unknown = set(conf) - KNOWN
    if unknown:
        raise CNIError(cni.ERR_UNSUPPORTED_FIELD, f"unsupported field(s) in network config: {', '.join(sorted(unknown))}")
    if conf.get("ipMasq"):
        raise CNIError(cni.ERR_UNSUPPORTED_FIELD, "ipMasq is not supported by this bridge plugin",
                       "pod traffic is never NATed in this testbed")
    return {"bridge": field(conf, "bridge", str, naming.BRIDGE),
            "is_gw": field(conf, "isGateway", bool, False),
            "default_gw": field(conf, "isDefaultGateway", bool, False),
            "mtu": field(conf, "mtu", int, None),
            "hairpin": field(conf, "hairpinMode", bool, False)}


def add(conf: dict[str, Any], args: skel.CmdArgs) -> Result:
    c = _conf(conf)
    host_veth = naming.host_veth("veth", args.container_id, args.ifname)
    with host_ns() as host, pod_ns(args) as pod:
        if pod.index(args.ifname) is not None:
            raise CNIError(cni.ERR_INVALID_CONFIG, f"container already has an interface {args.ifname!r}")
        br_index = host.ensure_bridge(c["bridge"], c["mtu"])
        ipam = skel.ipam_add(conf, args)
        try:
            ip = ipam.ips[0]
            iface = ipaddress.ip_interface(ip.address)
            gw = ip.gateway or str(next(iface.network.hosts()))
            # one request: the pair, both MTUs, the node end on the bridge and up
            hv_index = host.add_veth(host_veth, args.ifname, pod, mtu=c["mtu"], master=br_index, up=True)
            if c["hairpin"]:
                host.set_brport(hv_index, mode=1)   # IFLA_BRPORT_MODE: hairpin
            if c["is_gw"] or c["default_gw"]:
                host.ensure_addr(br_index, f"{gw}/{iface.network.prefixlen}")
            pv = pod.link_brief(args.ifname)     # by ioctls: what the result needs
            if pv is None:
                raise CNIError(cni.ERR_IO, f"{args.ifname} did not appear in the pod's namespace")
            pod.ensure_addr(pv["index"], str(iface))
            pod.link_up(args.ifname)
            routes = list(ipam.routes)
            if c["default_gw"]:
                routes = [r for r in routes if r.dst != "0.0.0.0/0"] + [Route("0.0.0.0/0", gw)]
            for r in routes:
                pod.add_route(r.dst, gateway=r.gw or gw, dev=pv["index"])
            bridge = host.link_brief(c["bridge"])
            hv = host.link_brief(host_veth)
        except Exception:
            host.del_link(host_veth)
            skel.ipam_del(conf, args)
            raise
    return Result(interfaces=[Interface(c["bridge"], bridge["mac"]), Interface(host_veth, hv["mac"]),
                              Interface(args.ifname, pv["mac"], args.netns, pv["mtu"])],
                  ips=[IPConfig(str(iface), gw, 2)], routes=routes, dns=ipam.dns)


def delete(conf: dict[str, Any], args: skel.CmdArgs) -> None:
    _conf(conf)
    remove_attachment(conf, args, naming.host_veth("veth", args.container_id, args.ifname))


def check(conf: dict[str, Any], args: skel.CmdArgs) -> None:
    c = _conf(conf)
    prev = args.prev_result
    if prev is None:
        raise CNIError(cni.ERR_INVALID_CONFIG, "CHECK needs prevResult")
    host_veth = naming.host_veth("veth", args.container_id, args.ifname)
    with host_ns() as host, pod_ns(args) as pod:
        br, hv = host.link(c["bridge"]), host.link(host_veth)
        if br is None or hv is None or hv["master"] != br["index"]:
            raise CNIError(cni.ERR_INVALID_CONFIG, f"{host_veth} is not on bridge {c['bridge']}")
        want = prev.sandbox_ip(args.ifname)
        if want not in pod.addrs(args.ifname):
            raise CNIError(cni.ERR_INVALID_CONFIG, f"{args.ifname} does not hold {want}")
        check_routes(pod, prev.routes, args.ifname)


if __name__ == "__main__":
    skel.main(sys.modules[__name__])
