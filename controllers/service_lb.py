"""l2_learning plus ClusterIP Services load-balanced in the switch (kubeProxy.mode: openflow).

The approach of OVS-based CNIs (Antrea, OVN-Kubernetes) instead of kube-proxy's iptables:
the switch itself rewrites a packet for ``ClusterIP:port`` to a backend pod, and the pod's
reply back. Here the switch is the underlay's, between the nodes:
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import threading
import time
import zlib

from controllers import (CONFIG_DISPATCHER, MAIN_DISPATCHER, add_flow, arp, delete_flows, ethernet,
                         ether_types, export_state, hub, ipv4, ofp_event, packet, packet_out, set_ev_cls,
                         tcp, udp)
from controllers.l2_learning import L2Learning

log = logging.getLogger("controllers.service_lb")

SERVICES_ENV = "K8SNETLAB_SERVICES"
VIRTUAL_MAC = "0a:58:0a:60:00:01"      # answers ARP for every ClusterIP and for SNAT_IP
SNAT_IP = "169.254.100.1"              # source of hairpin connections (backend on the client's node)
SNAT_PORTS = (20000, 60000)
COOKIE = 0x5B
IDLE_TIMEOUT = 60
PRIO_CONN = 300                        # one connection, one direction (exact 5-tuple)
PRIO_ARP = 200                         # ARP for a ClusterIP / SNAT_IP -> controller
PRIO_SERVICE = 150                     # anything else to the service CIDR / SNAT_IP -> controller
POLL_S = 0.2                           # how often the services file is checked for changes


class ServiceLB(L2Learning):
    """The app: what happens to a connection to a ClusterIP.

    1. A pod (or node) sends to a ClusterIP. The node has no route for the service range, so the
       packet leaves ``eth0`` by the default route: the node asks ARP for the ClusterIP, and this
       app answers with a virtual MAC (``VIRTUAL_MAC``): Services "live" on the switch.
    2. The first packet of a connection (TCP or UDP 5-tuple) misses every flow and comes to the
       controller. The app picks a ready endpoint (round robin; ``sessionAffinity: ClientIP``
       keeps a client on one backend) and installs two exact flows with an idle timeout:
       forward (``dst ClusterIP:port -> podIP:targetPort``, to the backend's node) and reverse
       (``src podIP:targetPort -> ClusterIP:port``, for the reply). The backend's node routes the
       packet to its pod like any other; the pod sees the client's own address.
    3. A backend on the *client's own node* would answer the client directly inside that node,
       past the switch, and the client would see a reply from the pod's IP. For that case alone the
       forward flow also rewrites the source to ``SNAT_IP`` (a link-local address the app answers
       ARP for) and a port of its own, so the reply comes back to the switch, like kube-proxy's
       hairpin masquerade.

    A connection's state is its two flows (``ovs-ofctl dump-flows`` shows cookie ``0x5b``); when a
    backend leaves, its connections' flows are deleted. Everything else is switched by the
    l2_learning logic. What the app serves comes from the runtime: ``$K8SNETLAB_SERVICES`` names a
    JSON file (service CIDR, nodes with MAC and pod CIDR, services with their ready backends),
    rewritten by the ``openflow`` kube-proxy mode on every change and re-read here when it changes.
    ClusterIP only: nodePorts and load balancer IPs are not programmed by this mode.
    """
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lock = threading.RLock()          # the file watcher and the event loop share state
        self.dps: dict[int, object] = {}
        self.config: dict = {}
        self.services: dict[tuple[str, str, int], dict] = {}   # (ClusterIP, protocol, port) -> service
        self.service_cidr: ipaddress.IPv4Network | None = None
        self.conns: dict[tuple, dict] = {}     # forward match -> the connection (backend, flows, actions)
        self.by_reply: dict[tuple, tuple] = {} # reverse match -> forward match
        self.held: dict[int, tuple] = {}       # barrier xid -> (datapath, in_port, actions, frame)
        self.rr: dict[tuple, int] = {}
        self.next_snat_port = SNAT_PORTS[0]
        self.counters = {"connections": 0, "no_endpoints": 0, "arp_answered": 0}
        self.path = os.environ.get(SERVICES_ENV)

    def start(self):
        """The framework starts the app: its event loop, and our watcher of the services file."""
        super().start()
        if self.path:
            self.threads.append(hub.spawn(self._watch))

    # -- configuration from the runtime ----------------------------------------------------------
    def _watch(self) -> None:
        mtime = None
        while True:
            try:
                m = os.stat(self.path).st_mtime_ns if self.path else None
            except OSError:
                m = None
            if m is not None and m != mtime:
                mtime = m
                try:
                    with open(self.path) as f:
                        self.apply(json.load(f))
                except (OSError, ValueError) as e:
                    log.warning("services file %s: %s", self.path, e)
            time.sleep(POLL_S)

    def apply(self, config: dict) -> None:
        """New desired state: index the services, drop the connections of backends that left."""
        with self.lock:
            self.config = config
            cidr = ipaddress.ip_network(config["service_cidr"])
            new_cidr = cidr != self.service_cidr
            self.service_cidr = cidr
            self.services = {(s["ip"], s["protocol"], s["port"]): s for s in config.get("services", ())}
            live = {(b["ip"], b["port"]) for s in self.services.values() for b in s["backends"]}
            for key, conn in list(self.conns.items()):
                if (conn["backend"]["ip"], conn["backend"]["port"]) not in live:
                    self._drop_conn(key)
            if new_cidr:
                for dp in self.dps.values():
                    self._install_service_flows(dp)
            log.info("services: %d ClusterIP ports, %d backends", len(self.services), len(live))
            self._export()

    # -- switches --------------------------------------------------------------------------------
    @set_ev_cls(ofp_event.EventOFPSwitchFeatures, CONFIG_DISPATCHER)
    def switch_features(self, ev):
        super().switch_features(ev)
        dp = ev.msg.datapath
        with self.lock:
            self.dps[dp.id] = dp
            if self.service_cidr is not None:
                self._install_service_flows(dp)
            self._export()

    def _install_service_flows(self, dp) -> None:
        parser = dp.ofproto_parser
        to_ctl = [parser.OFPActionOutput(dp.ofproto.OFPP_CONTROLLER, dp.ofproto.OFPCML_NO_BUFFER)]
        cidr = (str(self.service_cidr.network_address), str(self.service_cidr.netmask))
        for target in (cidr, SNAT_IP):
            add_flow(dp, PRIO_ARP, parser.OFPMatch(eth_type=ether_types.ETH_TYPE_ARP, arp_tpa=target), to_ctl,
                     cookie=COOKIE)
            add_flow(dp, PRIO_SERVICE, parser.OFPMatch(eth_type=ether_types.ETH_TYPE_IP, ipv4_dst=target),
                     to_ctl, cookie=COOKIE)

    # -- packets ---------------------------------------------------------------------------------
    @set_ev_cls(ofp_event.EventOFPPacketIn, MAIN_DISPATCHER)
    def packet_in(self, ev):
        msg = ev.msg
        pkt = packet.Packet(msg.data)
        with self.lock:
            a = pkt.get_protocol(arp.arp)
            if a is not None and a.opcode == arp.ARP_REQUEST and self._ours(a.dst_ip):
                self._answer_arp(msg, pkt.get_protocol(ethernet.ethernet), a)
                return
            ip = pkt.get_protocol(ipv4.ipv4)
            if ip is not None and self._ours(ip.dst):
                self._connection(msg, pkt, ip)
                return
        super().packet_in(ev)

    @set_ev_cls(ofp_event.EventOFPFlowRemoved, MAIN_DISPATCHER)
    def flow_removed(self, ev):
        """A connection's flow idled out: the connection is over; remove its other flow too."""
        msg = ev.msg
        if msg.cookie != COOKIE:
            return
        key = tuple(sorted(msg.match.items()))
        with self.lock:
            fwd = key if key in self.conns else self.by_reply.get(key)
            if fwd in self.conns:
                self._drop_conn(fwd)
                self._export()

    @set_ev_cls(ofp_event.EventOFPBarrierReply, MAIN_DISPATCHER)
    def barrier_reply(self, ev):
        """The switch has applied a connection's flows: now send its first packet on."""
        with self.lock:
            held = self.held.pop(ev.msg.xid, None)
        if held is not None:
            dp, in_port, actions, data = held
            packet_out(dp, in_port, actions, data)

    def _ours(self, addr: str) -> bool:
        return addr == SNAT_IP or (self.service_cidr is not None and
                                   ipaddress.ip_address(addr) in self.service_cidr)

    def _answer_arp(self, msg, eth, req) -> None:
        dp, parser = msg.datapath, msg.datapath.ofproto_parser
        reply = packet.Packet()
        reply.add_protocol(ethernet.ethernet(dst=eth.src, src=VIRTUAL_MAC, ethertype=ether_types.ETH_TYPE_ARP))
        reply.add_protocol(arp.arp(opcode=arp.ARP_REPLY, src_mac=VIRTUAL_MAC, src_ip=req.dst_ip,
                                   dst_mac=req.src_mac, dst_ip=req.src_ip))
        reply.serialize()
        packet_out(dp, dp.ofproto.OFPP_CONTROLLER, [parser.OFPActionOutput(msg.match["in_port"])], reply.data)
        self.counters["arp_answered"] += 1

    def _connection(self, msg, pkt, ip) -> None:
        """A packet to a ClusterIP (or to SNAT_IP) that no connection flow matched: the first
        of a new connection, or one that overtook its connection's flows on their way into the
        switch's datapath cache (it is sent on as the flows would)."""
        dp = msg.datapath
        l4 = pkt.get_protocol(tcp.tcp) or pkt.get_protocol(udp.udp)
        if l4 is None:
            return          # ICMP to a ClusterIP: dropped, as kube-proxy's rules do
        l4set = "tcp" if isinstance(l4, tcp.tcp) else "udp"
        here = tuple(sorted(dict(eth_type=ether_types.ETH_TYPE_IP, ip_proto=ip.proto, ipv4_src=ip.src,
                                 ipv4_dst=ip.dst, **{f"{l4set}_src": l4.src_port,
                                                     f"{l4set}_dst": l4.dst_port}).items()))
        known = self.conns.get(here) or self.conns.get(self.by_reply.get(here))
        if known is not None:
            actions = known["fwd_actions"] if here in self.conns else known["rev_actions"]
            packet_out(dp, msg.match["in_port"], actions, msg.data)
            return
        if ip.dst == SNAT_IP:
            return          # a reply to a hairpin connection that is gone: dropped
        self._new_connection(msg, pkt, ip, l4, l4set)

    def _new_connection(self, msg, pkt, ip, l4, l4set: str) -> None:
        dp = msg.datapath
        ofp, parser = dp.ofproto, dp.ofproto_parser
        proto = l4set.upper()
        svc = self.services.get((ip.dst, proto, l4.dst_port))
        if svc is None or not svc["backends"]:
            self.counters["no_endpoints"] += 1
            log.info("no endpoints for %s:%d/%s (from %s)", ip.dst, l4.dst_port, proto, ip.src)
            return
        backend = self._choose(svc, ip.src)
        nodes = self.config.get("nodes", {})
        client_node, backend_node = self._node_of(ip.src), nodes.get(backend["node"])
        if backend_node is None:
            return
        in_port = msg.match["in_port"]
        out_port = self.mac_to_port.get(dp.id, {}).get(backend_node["mac"])
        if out_port is None:
            log.info("backend node %s not seen on switch %x yet: dropped, the client retries", backend["node"], dp.id)
            return
        snat = client_node == backend["node"]
        fwd_match = dict(eth_type=ether_types.ETH_TYPE_IP, ip_proto=ip.proto, ipv4_src=ip.src, ipv4_dst=ip.dst,
                         **{f"{l4set}_src": l4.src_port, f"{l4set}_dst": l4.dst_port})
        fwd = [parser.OFPActionSetField(ipv4_dst=backend["ip"]),
               parser.OFPActionSetField(**{f"{l4set}_dst": backend["port"]})]
        src_ip, src_port = ip.src, l4.src_port
        if snat:
            src_ip, src_port = SNAT_IP, self._snat_port()
            fwd += [parser.OFPActionSetField(ipv4_src=src_ip), parser.OFPActionSetField(**{f"{l4set}_src": src_port})]
        out = ofp.OFPP_IN_PORT if out_port == in_port else out_port
        fwd += [parser.OFPActionSetField(eth_src=VIRTUAL_MAC), parser.OFPActionSetField(eth_dst=backend_node["mac"]),
                parser.OFPActionOutput(out)]
        rev_match = dict(eth_type=ether_types.ETH_TYPE_IP, ip_proto=ip.proto, ipv4_src=backend["ip"],
                         ipv4_dst=src_ip, **{f"{l4set}_src": backend["port"], f"{l4set}_dst": src_port})
        rev = [parser.OFPActionSetField(ipv4_src=ip.dst), parser.OFPActionSetField(**{f"{l4set}_src": l4.dst_port})]
        if snat:   # the reply comes back in on the backend's (= client's) port and leaves by it
            rev += [parser.OFPActionSetField(ipv4_dst=ip.src), parser.OFPActionSetField(**{f"{l4set}_dst": l4.src_port}),
                    parser.OFPActionSetField(eth_src=VIRTUAL_MAC),
                    parser.OFPActionSetField(eth_dst=pkt.get_protocol(ethernet.ethernet).src),
                    parser.OFPActionOutput(ofp.OFPP_IN_PORT)]
        else:      # the reply is addressed to the client's node already: send it there
            rev.append(parser.OFPActionOutput(in_port if in_port != out_port else ofp.OFPP_IN_PORT))
        for match, actions in ((fwd_match, fwd), (rev_match, rev)):   # expiry is reported (flow removed)
            add_flow(dp, PRIO_CONN, parser.OFPMatch(**match), actions, idle=IDLE_TIMEOUT, cookie=COOKIE,
                     flags=ofp.OFPFF_SEND_FLOW_REM)
        # the first packet goes on once the switch has the flows (barrier), else the reply
        # could overtake the reverse flow and reach the client un-translated
        barrier = parser.OFPBarrierRequest(dp)
        self.held[dp.set_xid(barrier)] = (dp, in_port, fwd, msg.data)
        dp.send_msg(barrier)
        key = tuple(sorted(fwd_match.items()))
        self.conns[key] = {"backend": backend, "forward": fwd_match, "reverse": rev_match, "dp": dp.id,
                           "fwd_actions": fwd, "rev_actions": rev}
        self.by_reply[tuple(sorted(rev_match.items()))] = key
        self.counters["connections"] += 1
        log.info("%s %s:%d -> %s:%d/%s -> %s %s:%d%s", svc["key"], ip.src, l4.src_port, ip.dst, l4.dst_port,
                 proto, backend["pod"], backend["ip"], backend["port"], f" (SNAT {SNAT_IP}:{src_port})" if snat else "")
        self._export()

    def _choose(self, svc: dict, client: str) -> dict:
        backends = sorted(svc["backends"], key=lambda b: (b["ip"], b["port"]))
        if svc.get("affinity") == "ClientIP":
            return backends[zlib.crc32(client.encode()) % len(backends)]
        key = (svc["ip"], svc["protocol"], svc["port"])
        i = self.rr.get(key, 0)
        self.rr[key] = i + 1
        return backends[i % len(backends)]

    def _node_of(self, addr: str) -> str | None:
        a = ipaddress.ip_address(addr)
        for name, n in self.config.get("nodes", {}).items():
            if addr == n["ip"] or a in ipaddress.ip_network(n["pod_cidr"]):
                return name
        return None

    def _snat_port(self) -> int:
        port = self.next_snat_port
        self.next_snat_port = port + 1 if port + 1 < SNAT_PORTS[1] else SNAT_PORTS[0]
        return port

    def _drop_conn(self, key) -> None:
        conn = self.conns.pop(key)
        self.by_reply.pop(tuple(sorted(conn["reverse"].items())), None)
        dp = self.dps.get(conn["dp"])
        if dp is not None:
            for match in (conn["forward"], conn["reverse"]):
                delete_flows(dp, dp.ofproto_parser.OFPMatch(**match), table=0, cookie=COOKIE, priority=PRIO_CONN)

    def _export(self) -> None:
        export_state({"app": "service_lb", "switches": sorted(self.dps), "services": len(self.services),
                      "backends": {s["key"]: len(s["backends"]) for s in self.services.values()},
                      "open_connections": len(self.conns), **self.counters})
