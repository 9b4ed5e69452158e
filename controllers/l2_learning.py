"""OpenFlow 1.3 learning switch: MACs learned at the controller, a flow per (port, src, dst) with idle timeout.

The classic reactive design, as taught with Ryu. Every switch starts with one flow, the table
miss, which sends packets to the controller. On a packet-in the app learns "source MAC is
behind this port" for that switch. When it already knows where the destination is, it installs
a flow ``in_port, eth_src, eth_dst -> output`` (so the next packets of that conversation never
leave the switch) and sends the packet on; otherwise it floods it (``OFPP_FLOOD``).
"""

from __future__ import annotations

import logging

from controllers import (App, CONFIG_DISPATCHER, MAIN_DISPATCHER, add_flow, ethernet, ether_types,
                         export_state, ofp_event, ofproto_v1_3, packet, packet_out, set_ev_cls,
                         table_miss_to_controller)

log = logging.getLogger("controllers.l2_learning")

IDLE_TIMEOUT = 60      # seconds without a packet before a learned flow is removed
PRIORITY = 10
COOKIE = 0x12          # marks our learned flows (ovs-ofctl dump-flows shows cookie=0x12)


class L2Learning(App):
    """So the first packet between two hosts pays a round trip to the controller (the "packet-in
    cost" the underlay_switching experiment measures), and later ones do not. Flows expire after
    ``IDLE_TIMEOUT`` seconds without traffic, and the conversation learns again.

    Matching the source too (not only the destination) is deliberate: a reply travelling on a
    destination-only flow would never reach the controller, which would then never learn where
    the replying host is. Flooding makes this app unsafe on an underlay with loops (the cluster
    file is refused); use ``fabric`` there.
    """
    OFP_VERSIONS = [ofproto_v1_3.OFP_VERSION]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.mac_to_port: dict[int, dict[str, int]] = {}   # dpid -> MAC -> port
        self.packet_ins = 0

    @set_ev_cls(ofp_event.EventOFPSwitchFeatures, CONFIG_DISPATCHER)
    def switch_features(self, ev):
        dp = ev.msg.datapath
        self.mac_to_port.setdefault(dp.id, {})
        table_miss_to_controller(dp)
        log.info("switch %016x connected: table miss -> controller", dp.id)
        export_state({"app": "l2_learning", "switches": sorted(self.mac_to_port)})

    @set_ev_cls(ofp_event.EventOFPPacketIn, MAIN_DISPATCHER)
    def packet_in(self, ev):
        msg = ev.msg
        dp = msg.datapath
        ofp, parser = dp.ofproto, dp.ofproto_parser
        in_port = msg.match["in_port"]
        eth = packet.Packet(msg.data).get_protocol(ethernet.ethernet)
        if eth is None or eth.ethertype == ether_types.ETH_TYPE_LLDP:
            return   # LLDP is a switch's business (topology discovery), never forwarded
        self.packet_ins += 1
        table = self.mac_to_port.setdefault(dp.id, {})
        if table.get(eth.src) != in_port:
            table[eth.src] = in_port
            log.debug("switch %016x: %s is on port %d", dp.id, eth.src, in_port)
        out_port = table.get(eth.dst, ofp.OFPP_FLOOD)
        actions = [parser.OFPActionOutput(out_port)]
        if out_port != ofp.OFPP_FLOOD:
            match = parser.OFPMatch(in_port=in_port, eth_src=eth.src, eth_dst=eth.dst)
            add_flow(dp, PRIORITY, match, actions, idle=IDLE_TIMEOUT, cookie=COOKIE)
        packet_out(dp, in_port, actions, msg.data)
