#!/usr/bin/env python3
"""host-gw vs IPIP: the same cluster, the same traffic, with a control that splits the difference.

Three clusters are built from one cluster file (same nodes, same pods, same addresses,
separate namespaces and underlay bridges) and measured in shuffled, interleaved rounds
(k8snetlab.framework): node-to-node over the underlay (the baseline), pod-to-pod on one node,
pod-to-pod across nodes. RTT from ping, TCP throughput from iperf3 with its golden signals
(CPU per gigabit, packets/s, retransmits, drops, softirq share).

host-gw pods sit on a bridge, IPIP pods on routed ``cali*`` veths: ipip / host-gw mixes two
differences. The control, ``ipip-crosssubnet`` (Calico's layout and datapath, ``ipipMode:
CrossSubnet`` between nodes of one subnet: no encapsulation), splits the ratio into

    attachment = ipip-crosssubnet / host-gw   (routed cali veth vs bridge)
    tunnel     = ipip / ipip-crosssubnet      (IPIP encapsulation itself)

each with its own interval; their product is ipip / host-gw. By default rounds are added until
the headline ratio's 95 % interval is within 3 % (``--ci``), at most ``--max-repeat``.

    sudo python experiments/hostgw_vs_ipip.py [--quick] [--repeat N] [--ci PCT] [--duration S]
        [--rate 5G] [--link-rate 1gbit] [--datapath auto|kernel|ebpf] [--out DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from k8snetlab import framework, spec  # noqa: E402
from k8snetlab.framework import Comparison, Target, Variant  # noqa: E402

X = "pod-cross-node"


class HostGwVsIpip(framework.Experiment):
    name = "hostgw_vs_ipip"
    description = __doc__.strip().splitlines()[0]
    variants = (
        Variant("host-gw", "host-gw", what="flannel host-gw: pods on a bridge, plain routes"),
        Variant("ipip-crosssubnet", "ipip", {"ipipMode": "CrossSubnet"},
                what="control: Calico layout (routed cali veths), no encapsulation inside one subnet"),
        Variant("ipip", "ipip", {"ipipMode": "Always"}, what="Calico IPIP: routed cali veths, IP-in-IP"),
    )
    comparisons = (
        Comparison("ipip", "host-gw", X, headline=True, name="ipip / host-gw"),
        Comparison("ipip-crosssubnet", "host-gw", X, headline=True,
                   name="attachment: ipip-crosssubnet / host-gw (routed veth vs bridge)"),
        Comparison("ipip", "ipip-crosssubnet", X, headline=True,
                   name="tunnel: ipip / ipip-crosssubnet (IPIP vs the control)"),
        Comparison("host-gw", "host-gw", X, den_scenario="node-to-node",
                   name="host-gw pod-cross-node / node-to-node"),
        Comparison("ipip", "host-gw", X, metric="cpu_per_gbit", name="ipip / host-gw CPU per Gbit"),
    )
    targets = (
        Target("host-gw cross-node TCP >= 0.8 x node-to-node", "ratio", "host-gw", "host-gw", X,
               den_scenario="node-to-node", low=0.8),
        Target("ipip cross-node TCP >= 0.85 x host-gw", "ratio", "ipip", "host-gw", X, low=0.85),
        Target("tunnel: ipip TCP <= ipip-crosssubnet (encapsulation only adds work)", "ratio", "ipip",
               "ipip-crosssubnet", X, high=1.0, possible=(None, 1.0)),
        Target("ipip RTT p50 - host-gw p50 <= 10 us (in us)", "difference", "ipip", "host-gw", X,
               metric="rtt_p50", high=10, scale=1000, possible=(0, None)),
        Target("host-gw cluster up <= 5 s (s)", "value", "host-gw", metric="cluster_up", high=5),
        Target("ipip cluster up <= 5 s (s)", "value", "ipip", metric="cluster_up", high=5),
        Target("host-gw cluster down <= 5 s (s)", "value", "host-gw", metric="cluster_down", high=5),
        Target("ipip cluster down <= 5 s (s)", "value", "ipip", metric="cluster_down", high=5),
        Target("runtime peak memory <= 300 MB (MB, all clusters)", "value", "all",
               metric="runtime_peak_rss", high=300),
    )
    table_ratios = (("ipip", "host-gw"),)
    table_metrics = ("rtt_p50", "rtt_p99", "tcp_throughput", "cpu_per_gbit", "proc_cpu_per_gbit", "rx_pps", "tcp_retransmits",
                     "softirq_share", "qdisc_drops", "kernel_drops")
    default_ci = 3.0
    # this VM's veth TCP varies ~10 % per 5-s sample (a plain veth pair too): 16 rounds (3 full,
    # 13 of the headline scenario only) bring the ratio's interval to about +-6 %
    default_max_repeat = 16

    def targets_for(self, link_rate):
        if not link_rate:
            return self.targets
        from k8snetlab.shaping import goodput_fraction, parse_rate
        limit = parse_rate(link_rate, "--link-rate") / 1e9 * goodput_fraction(1500, 0)
        return (
            Target(f"host-gw cross-node goodput within 3 % of the limit {limit:.4f} Gbit/s", "value", "host-gw",
                   scenario=X, metric="tcp_throughput", low=0.97 * limit, high=1.03 * limit),
            Target("ipip / host-gw goodput within [0.97, 1.0] (limit 0.986)", "ratio", "ipip", "host-gw", X,
                   low=0.97, high=1.0),
            *self.targets[1:])

    def add_options(self, p):
        p.add_argument("--datapath", default=None, choices=("auto", "kernel", "ebpf"),
                       help="ipip datapath (default: the cluster file's, else auto)")

    def specs(self, args, base):
        out = []
        for v in self.variants:
            opts = dict(v.options)
            if v.cni == "ipip" and args.datapath:
                opts["datapath"] = args.datapath
            section = {**base.cni.sections.get(v.cni, {}), **opts}
            out.append((v, spec.with_cni(base, v.cni, **({v.cni: section} if section else {}))))
        return out


EXPERIMENT = HostGwVsIpip()


def build_parser():
    return framework.parser(EXPERIMENT)


if __name__ == "__main__":
    sys.exit(framework.main(EXPERIMENT))
