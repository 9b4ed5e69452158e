#!/usr/bin/env python3
"""Every CNI mode that applies to one underlay: the same probe pods, the same traffic, side by side.

One cluster per mode is built from the cluster file (same nodes, same addresses, separate
namespaces and underlay bridges): ``bridge`` (same-node traffic only: it wires nothing between
nodes), ``host-gw``, ``vxlan``, ``ipip`` (``ipipMode: Always``), ``ipip-crosssubnet``
(``ipipMode: CrossSubnet``) and ``bgp`` when this checkout has it. A mode whose ``validate``
refuses the underlay (host-gw across subnets...) or that cannot run on this machine is skipped
with the reason, logged and printed in the summary.

The file's workloads are left out; each cluster gets the same four probe pods instead, pinned
to nodes chosen from the underlay, so that the scenarios exist on every topology:

    pod-same-node       probe-a1 -> probe-a2   both on node A
    pod-cross-node      probe-a1 -> probe-b    B: another node on A's subnet (if there is one)
    pod-cross-subnet    probe-a1 -> probe-c    C: the first node on another subnet (if any)

Per round (rounds interleaved: every mode once per round, so drift of a shared machine hits
all alike) and scenario: RTT percentiles from ping and TCP throughput from iperf3. Once per
mode and cross-node scenario, the bytes on the wire: tcpdump on node A's ``eth0`` during a
ping of known size, parsed with scapy; the outer IPv4 length minus the pod's own packet inside
it is the encapsulation overhead (0 plain, 20 IPIP, 50 VXLAN).

Where the underlay has equal-cost paths (``leaf_spine`` with two spines), once per mode for
``pod-cross-subnet``: probe-a1 makes ``ECMP_ATTEMPTS`` connection attempts to a closed port of
probe-c (each SYN has its own source port, each is answered by a RST) and the SYNs each next
hop of A's router forwarded are counted. The routers hash the outer 5-tuple: VXLAN's outer UDP
source port follows the inner flow, so its SYNs spread over the paths; IPIP between two nodes
has no ports to hash and takes one; bgp's plain packets spread (BIRD merges the equal routes
learned through each spine into one ECMP route, ``merge paths on``, as Calico's config does).

Output: a tidy CSV (k8snetlab.results), a PNG beside it, and a summary with the
targets as ratios from this one run.

    sudo python experiments/cni_modes.py [--topology FILE] [--param NAME=VALUE] [--quick]
                                         [--repeat N] [--duration S] [--pings N] [--modes a,b]
"""

from __future__ import annotations

import dataclasses
import json
import logging
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from k8snetlab import experiment_script, framework, hoststat, measure, naming, proc, results, spec as specmod  # noqa: E402
from k8snetlab.errors import SpecError  # noqa: E402
from k8snetlab.framework import Comparison, Target  # noqa: E402
from k8snetlab.modes import MODES  # noqa: E402

log = logging.getLogger("cni_modes")

NAME = "cni_modes"
PING_SIZE = 1000            # ICMP payload of the captured ping: the inner packet is 1028 bytes
CAPTURE_PINGS = 5
CAPTURE_READY_S = 5.0       # bound on waiting for tcpdump to listen
SUMMARY_METRICS = ("rtt_p50", "rtt_p99", "tcp_throughput")
ECMP_ATTEMPTS = 64          # connection attempts counted per next hop
ECMP_USED_SHARE = 0.1       # a next hop carrying at least this share of them counts as used
# connection attempts to a closed port (9): one SYN each, with its own source port, and a RST
SYN_LOOP = ("import socket,sys\n"
            "for _ in range(int(sys.argv[2])):\n"
            "    s = socket.socket(); s.settimeout(2)\n"
            "    try: s.connect((sys.argv[1], 9))\n"
            "    except OSError: pass\n"
            "    s.close()\n")
PLOT_METRICS = ("rtt_p50", "tcp_throughput", "encap_overhead")


@dataclass(frozen=True)
class Variant(framework.Variant):
    """One column of the comparison: a CNI type with the options that make it this variant."""

    same_node_only: bool = False                 # wires nothing between nodes
    # merged in too when the nodes span several subnets (and the mode has these options)
    routed_options: dict[str, Any] = field(default_factory=dict)
    expected_overhead: dict[str, int] = field(default_factory=dict)   # scenario -> bytes


VARIANTS = (
    Variant("bridge", "bridge", same_node_only=True),
    Variant("host-gw", "host-gw", expected_overhead={"pod-cross-node": 0}),
    Variant("vxlan", "vxlan", expected_overhead={"pod-cross-node": 50, "pod-cross-subnet": 50}),
    Variant("ipip", "ipip", {"ipipMode": "Always"},
            expected_overhead={"pod-cross-node": 20, "pod-cross-subnet": 20}),
    Variant("ipip-crosssubnet", "ipip", {"ipipMode": "CrossSubnet"},
            expected_overhead={"pod-cross-node": 0, "pod-cross-subnet": 20}),
    # on a routed underlay Calico's nodes peer with their ToR routers: plain packets across racks
    Variant("bgp", "bgp", routed_options={"peerWithToR": True},
            expected_overhead={"pod-cross-node": 0, "pod-cross-subnet": 0}),
)

X = "pod-cross-node"
# speed targets on TCP throughput, with verdicts from paired intervals
TARGETS = (
    Target("vxlan cross-node TCP >= 0.7 x host-gw", "ratio", "vxlan", "host-gw", X, low=0.7),
    Target("ipip CrossSubnet in one subnet TCP within 0.95-1.05 x host-gw", "ratio", "ipip-crosssubnet",
           "host-gw", X, low=0.95, high=1.05),
    Target("bgp cross-node TCP within 0.95-1.05 x host-gw", "ratio", "bgp", "host-gw", X, low=0.95, high=1.05),
    Target("bgp / ipip-crosssubnet (one kernel path, the Calico layout) within 0.95-1.05", "ratio", "bgp",
           "ipip-crosssubnet", X, low=0.95, high=1.05),
)
COMPARISONS = (
    Comparison("vxlan", "host-gw", X), Comparison("ipip", "host-gw", X),
    Comparison("ipip-crosssubnet", "host-gw", X), Comparison("bgp", "host-gw", X),
    # headline: what --ci narrows (the two measure one kernel path; their ratio should hold 1.0)
    Comparison("bgp", "ipip-crosssubnet", X, headline=True, name="bgp / ipip-crosssubnet (same kernel path)"),
    Comparison("vxlan", "host-gw", "pod-cross-subnet"), Comparison("ipip", "bgp", "pod-cross-subnet"),
)


# ---------------------------------------------------------------- planning (pure)

@dataclass(frozen=True)
class Placement:
    """The nodes the probes go to: A, another node on A's subnet, a node on another subnet."""

    a: str
    b: str | None
    c: str | None

    def probes(self) -> dict[str, str]:
        """Probe pod name -> node name."""
        out = {"probe-a1": self.a, "probe-a2": self.a}
        if self.b:
            out["probe-b"] = self.b
        if self.c:
            out["probe-c"] = self.c
        return out


@dataclass(frozen=True)
class Scenario:
    name: str
    src: str         # probe pod names
    dst: str


def placement(spec) -> Placement:
    nodes = list(spec.nodes)
    if not nodes:
        raise SpecError(f"{spec.source}: the experiment needs at least one node")
    a = nodes[0]
    b = next((n.name for n in nodes[1:] if n.subnet == a.subnet), None)
    c = next((n.name for n in nodes if n.subnet != a.subnet), None)
    return Placement(a.name, b, c)


def scenarios(variant: Variant, where: Placement) -> list[Scenario]:
    out = [Scenario("pod-same-node", "probe-a1", "probe-a2")]
    if variant.same_node_only:
        return out
    if where.b:
        out.append(Scenario("pod-cross-node", "probe-a1", "probe-b"))
    if where.c:
        out.append(Scenario("pod-cross-subnet", "probe-a1", "probe-c"))
    return out


def probe_manifest(name: str, node: str) -> dict[str, Any]:
    """A pod with no process of its own: ping and iperf3 run in its namespace when measured."""
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": {"app": "cni-modes-probe"}},
            "spec": {"nodeName": node, "containers": [{"name": "probe", "command": []}]}}


def plan(base, wanted: Iterable[str], available: Iterable[str]) -> tuple[list[tuple[Variant, Any]], dict[str, str]]:
    """The variants to run, each with its cluster spec (the file's, without its workloads), and
    the skipped ones with the reason. ``available`` is ``MODES.names()``."""
    available = set(available)
    run, skipped = [], {}
    for v in VARIANTS:
        if v.label not in wanted:
            continue
        if v.cni not in available:
            skipped[v.label] = f"cni type {v.cni!r} is not installed (have: {', '.join(sorted(available))})"
            continue
        overrides = {}
        wanted_opts = dict(v.options)
        if len({n.subnet for n in base.nodes}) > 1 and v.routed_options:
            keys = {f.metadata.get("key") or f.name for f in dataclasses.fields(MODES.get(v.cni).Options)}
            wanted_opts.update({k: x for k, x in v.routed_options.items() if k in keys})
        if wanted_opts:
            overrides[v.cni] = {**(base.cni.sections.get(v.cni) or {}), **wanted_opts}
        try:
            s = specmod.with_cni(base, v.cni, **overrides)
        except SpecError as e:
            skipped[v.label] = str(e)
            continue
        run.append((v, dataclasses.replace(s, workloads=(), services=())))
    return run, skipped


# ---------------------------------------------------------------- the wire (pure parsing)

@dataclass(frozen=True)
class WirePacket:
    """One echo request as captured: its outer IPv4 length, the pod's packet inside, and how it
    was wrapped (plain, ipip, vxlan) with the VXLAN VNI and UDP port where there is one."""

    outer_len: int
    inner_len: int
    kind: str
    vni: int | None = None
    udp_dport: int | None = None

    @property
    def overhead(self) -> int:
        return self.outer_len - self.inner_len


def _scapy():
    """scapy's layers, imported when first needed (importing them registers Ethernet as the
    pcap link type and binds UDP 8472, flannel's port, to VXLAN)."""
    from scapy.layers.inet import ICMP, IP, UDP
    from scapy.layers.l2 import Ether  # noqa: F401
    from scapy.layers.vxlan import VXLAN
    return ICMP, IP, UDP, VXLAN


def wire_packets(packets: Iterable[Any], src_ip: str, dst_ip: str) -> list[WirePacket]:
    """The ICMP echo requests from ``src_ip`` to ``dst_ip`` among scapy packets, however they
    are wrapped: the first IPv4 header is the outer one, the last the pod's own."""
    ICMP, IP, UDP, VXLAN = _scapy()
    out = []
    for pkt in packets:
        ips, layer = [], pkt
        while layer is not None and layer.__class__.__name__ != "NoPayload":
            if isinstance(layer, IP):
                ips.append(layer)
            layer = layer.payload
        if not ips:
            continue
        inner = ips[-1]
        icmp = inner.getlayer(ICMP)
        if inner.src != src_ip or inner.dst != dst_ip or icmp is None or icmp.type != 8:
            continue
        outer = ips[0]
        if len(ips) == 1:
            kind, vni, dport = "plain", None, None
        elif outer.proto == 4:
            kind, vni, dport = "ipip", None, None
        elif VXLAN in outer:
            kind, vni, dport = "vxlan", outer[VXLAN].vni, outer[UDP].dport
        else:
            kind, vni, dport = "other", None, None
        out.append(WirePacket(outer.len, inner.len, kind, vni, dport))
    return out


# ---------------------------------------------------------------- measuring

def capture_wire(node, src, dst_ip: str, workdir: Path) -> list[WirePacket]:
    """tcpdump on ``node``'s eth0 while ``src`` pings ``dst_ip`` with a known size."""
    from scapy.utils import rdpcap
    _scapy()
    pcap = workdir / f"{node.name}-{src.name}-{dst_ip}.pcap"
    said = pcap.with_suffix(".log")
    dump = node.popen_ns(["tcpdump", "-i", naming.NODE_UPLINK, "-n", "-U", "--immediate-mode", "-s", "256", "-w", str(pcap),
                          "icmp or udp or ip proto 4"], log_path=said, what=f"{node.name}: tcpdump")
    try:
        deadline = time.monotonic() + CAPTURE_READY_S
        while "listening on" not in (said.read_text(errors="replace") if said.exists() else ""):
            if dump.poll() is not None or time.monotonic() > deadline:
                raise measure.MeasureError(f"tcpdump on {node.name} did not start: "
                                           f"{said.read_text(errors='replace').strip()[-200:]}")
            time.sleep(0.02)
        measure.ping(src.netns, dst_ip, count=CAPTURE_PINGS, interval_s=0.02, size=PING_SIZE)
        time.sleep(0.2)     # -U writes each packet at once; leave the last reply time to land
    finally:
        proc.end_child(dump, grace=3)
    return wire_packets(rdpcap(str(pcap)), src.ip, dst_ip)


def next_hops(route_json: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(device, gateway) of each next hop of the most specific route in ``ip -j route show
    ...`` output: several for an ECMP route, one otherwise, none for no route."""
    def prefix(r: dict[str, Any]) -> int:
        dst = r.get("dst", "")
        return 0 if dst == "default" else int(dst.split("/")[1]) if "/" in dst else 32
    for r in sorted(route_json, key=prefix, reverse=True):
        if r.get("nexthops"):
            return [(h["dev"], h.get("gateway", "")) for h in r["nexthops"]]
        if r.get("dev"):
            return [(r["dev"], r.get("gateway", ""))]
    return []


def ecmp_spread(per_hop: dict[str, int]) -> tuple[int, float]:
    """(next hops used, largest share) of packets counted per next hop."""
    total = sum(per_hop.values())
    if total == 0:
        return 0, 0.0
    return sum(n >= ECMP_USED_SHARE * total for n in per_hop.values()), max(per_hop.values()) / total


def measure_ecmp(c, src, dst, wire_dst: str) -> tuple[str, dict[str, int]] | None:
    """SYNs from pod ``src`` to pod ``dst`` per next hop of the router in front of src's node,
    following its route to ``wire_dst`` (dst's node for an overlay, dst itself for plain
    packets); None when the underlay has no equal-cost paths there."""
    node = c.nodes[src.node_name]
    gw = c.spec.underlay.subnet(node.spec.subnet).gateway
    router = next((r for r in c.spec.underlay.routers if gw in [ip for _, ip in r.interfaces]), None)
    if gw is None or router is None:
        return None
    host = c.routers[router.name]

    def route(addr: str) -> list[tuple[str, str]]:
        return next_hops(json.loads(host.run(["ip", "-j", "route", "show", "match", addr]).stdout or "[]"))

    if len(route(c.nodes[dst.node_name].ip)) < 2:       # the underlay itself has one path
        return None
    hops = route(wire_dst)
    before = hoststat.ns_counters(host.netns).ifaces
    src.run([sys.executable, "-c", SYN_LOOP, dst.ip, str(ECMP_ATTEMPTS)], timeout=ECMP_ATTEMPTS * 2 + 30)
    after = hoststat.ns_counters(host.netns).ifaces
    return router.name, {f"{dev} via {gw_ip}": after[dev].tx_packets - before[dev].tx_packets for dev, gw_ip in hops}


# ---------------------------------------------------------------- summary (pure)

def summary(rows: list, order: list[str], skipped: dict[str, str], seed: int = 1,
            link_rate: str | None = None, quick: bool = False) -> str:
    """Means with intervals per scenario and mode, the comparisons, the targets with
    verdicts, the bytes on the wire, the equal-cost paths, the skipped modes."""
    exp = CniModes(order)
    exp.skipped = dict(skipped)
    text = framework.summary(exp, rows, seed, quick=quick, link_rate=link_rate, targets=exp.targets_for(link_rate))
    extra = extras(rows, order)
    return text + ("\n" + "\n".join(extra) if extra else "")


def extras(rows: list, order: list[str]) -> list[str]:
    lines = []
    by_label = {v.label: v for v in VARIANTS}
    wire = {(r.mode, r.scenario, r.metric): r.value for r in rows if r.unit == "bytes"}
    wire_rows = []
    for label in order:
        for sc in ("pod-cross-node", "pod-cross-subnet"):
            if (label, sc, "encap_overhead") not in wire:
                continue
            got = wire[(label, sc, "encap_overhead")]
            want = by_label[label].expected_overhead.get(sc)
            wire_rows.append([label, sc, wire[(label, sc, "wire_ip_bytes")], wire[(label, sc, "inner_ip_bytes")],
                              got, "-" if want is None else ("yes" if got == want else f"NO (expected {want})")])
    if wire_rows:
        lines.append("\nOn the wire (a ping of known size, captured on the sender's eth0):")
        lines.append(results.format_table(["mode", "scenario", "outer IP bytes", "inner IP bytes",
                                           "overhead bytes", "as expected"], wire_rows))
    ecmp = {(r.mode, r.metric): r.value for r in rows if r.metric.startswith("ecmp_")}
    ecmp_rows = [[label, int(ecmp[(label, "ecmp_next_hops")]), int(ecmp[(label, "ecmp_paths_used")]),
                  round(ecmp[(label, "ecmp_max_share")], 2)]
                 for label in order if (label, "ecmp_next_hops") in ecmp]
    if ecmp_rows:
        lines.append(f"\nEqual-cost paths ({ECMP_ATTEMPTS} connection attempts, pod-cross-subnet, "
                     "counted at the source node's router):")
        lines.append(results.format_table(["mode", "next hops", "used", "largest share"], ecmp_rows))
    return lines


class CniModes(framework.Experiment):
    name = NAME
    description = __doc__.strip().splitlines()[0]
    comparisons = COMPARISONS
    targets = TARGETS
    table_ratios = ()
    table_metrics = ("rtt_p50", "rtt_p99", "tcp_throughput", "cpu_per_gbit", "proc_cpu_per_gbit", "rx_pps", "tcp_retransmits",
                     "qdisc_drops", "kernel_drops")
    plot_metrics = PLOT_METRICS
    tools = ("ping", "iperf3", "tcpdump")
    may_skip = True

    def __init__(self, order: Iterable[str] | None = None):
        super().__init__()
        wanted = list(order) if order is not None else [v.label for v in VARIANTS]
        self.variants = tuple(v for v in VARIANTS if v.label in wanted)
        self.where: Placement | None = None
        self.tmp: tempfile.TemporaryDirectory | None = None

    def targets_for(self, link_rate):
        if not link_rate:
            return self.targets
        from k8snetlab.shaping import goodput_fraction, parse_rate
        limit = parse_rate(link_rate, "--link-rate") / 1e9 * goodput_fraction(1500, 0)
        return (Target(f"host-gw cross-node goodput within 3 % of the limit {limit:.4f} Gbit/s", "value",
                       "host-gw", scenario=X, metric="tcp_throughput", low=0.97 * limit, high=1.03 * limit),
                Target("ipip / host-gw goodput within [0.97, 1.0] (limit 0.986)", "ratio", "ipip", "host-gw", X,
                       low=0.97, high=1.0),
                Target("vxlan / host-gw goodput within [0.95, 0.98] (limit 0.965)", "ratio", "vxlan", "host-gw", X,
                       low=0.95, high=0.98))

    def add_options(self, p):
        p.add_argument("--modes", default=None,
                       help=f"comma-separated subset of {','.join(v.label for v in VARIANTS)} (default: all that apply)")

    def check_options(self, args):
        labels = [v.label for v in VARIANTS]
        wanted = [m.strip() for m in args.modes.split(",") if m.strip()] if args.modes else labels
        bad = [m for m in wanted if m not in labels]
        if bad:
            raise SpecError(f"--modes: unknown mode {bad[0]!r}: use some of {', '.join(labels)}")
        self.variants = tuple(v for v in VARIANTS if v.label in wanted)

    def specs(self, args, base):
        todo, skipped = plan(base, [v.label for v in self.variants], MODES.names())
        if not todo:
            raise SpecError(f"{base.source}: none of the modes {', '.join(v.label for v in self.variants)} "
                            "applies to this underlay: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
        self.skipped.update(skipped)          # logged once the run starts
        self.where = placement(base)
        return todo

    def setup(self, run, variant, cluster):
        for name, node in self.where.probes().items():
            cluster.add_pod(probe_manifest(name, node))

    def scenarios(self, run, variant, cluster):
        ep = lambda p: experiment_script.Endpoint(p.name, p.netns, p.ip)
        return [framework.Path2(sc.name, ep(cluster.pods[sc.src]), ep(cluster.pods[sc.dst]), cluster.mode.mtu)
                for sc in scenarios(variant, self.where)]

    def once(self, run, clusters):
        """The wire (once per mode and cross-node scenario) and the equal-cost paths."""
        with tempfile.TemporaryDirectory(prefix="knl-cni-modes-") as tmp:
            for label, c in clusters.items():
                v = next(x for x in self.variants if x.label == label)
                for sc in self.scenarios(run, v, c):
                    if sc.name == "pod-same-node":
                        continue
                    src, dst = c.pods[sc.src.name], c.pods[sc.dst.name]
                    pkts = capture_wire(c.nodes[src.node_name], src, dst.ip, Path(tmp))
                    if not pkts:
                        log.warning("%s %s: no echo request captured on %s", label, sc.name, src.node_name)
                        continue
                    outer = statistics.median(p.outer_len for p in pkts)
                    inner = statistics.median(p.inner_len for p in pkts)
                    run.row(label, sc, 0, "wire_ip_bytes", outer, "bytes")
                    run.row(label, sc, 0, "inner_ip_bytes", inner, "bytes")
                    run.row(label, sc, 0, "encap_overhead", outer - inner, "bytes")
                    if sc.name != "pod-cross-subnet":
                        continue
                    overlay = v.expected_overhead.get(sc.name, 0) > 0
                    got = measure_ecmp(c, src, dst, c.nodes[dst.node_name].ip if overlay else dst.ip)
                    if got is None:
                        continue
                    router, per_hop = got
                    used, share = ecmp_spread(per_hop)
                    run.row(label, sc, 0, "ecmp_next_hops", len(per_hop), "count")
                    run.row(label, sc, 0, "ecmp_paths_used", used, "count")
                    run.row(label, sc, 0, "ecmp_max_share", share, "fraction")
                    log.info("%s %s: SYNs per next hop of %s: %s", label, sc.name, router, per_hop)

    def extra_summary(self, run, rows):
        return extras(rows, [v.label for v in self.variants if any(r.mode == v.label for r in rows)])


def build_parser():
    return framework.parser(CniModes())


if __name__ == "__main__":
    sys.exit(framework.main(CniModes()))
