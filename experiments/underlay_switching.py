#!/usr/bin/env python3
"""Linux bridge vs Open vSwitch + OpenFlow controller: the same pod traffic over both underlays.

Two clusters are built from one cluster file (same nodes, pods and addresses, separate
namespaces): one whose underlay switches are Linux bridges (the kernel learns MACs by itself),
one whose switches are Open vSwitch bridges driven by a controller app (``--controller``,
default ``l2_learning``; the datapath is userspace where the kernel has no OVS module, as on
our CI machines). Measured interleaved round by round, per path (node-to-node,
pod-same-node, pod-cross-node):

- RTT percentiles (ping, ``--pings`` samples at 10 ms) and TCP throughput (iperf3);
- **first-packet latency**: the RTT of the first ping after the path was made cold (both
  ends forget their neighbours, so the ARP broadcast goes first; with ``l2_learning`` its
  learned flows are deleted too, so the packets go to the controller: the packet-in cost);
- **flows per switch** after the round, once every node has pinged every other: OpenFlow
  flows on each OVS bridge, learned forwarding-database entries on each Linux bridge (the
  state each switch keeps: per pair of MACs for l2_learning, per MAC for a Linux bridge).

Each round measures every (underlay, path) once in an order shuffled per round (seeded:
``--seed`` repeats it; printed), with the other cluster's processes paused meanwhile
(``--no-pause`` leaves them running). One CSV row per measurement (``mode`` is ``linuxbridge``
or ``ovs+APP``; ``datapath`` is ``kernel`` or ``user``; the machine's load, steal time and the
iperf3 CPU placement ``--pin`` per row), a summary with the OVS / Linux bridge ratios and their
paired intervals, ``<name>-<run id>-summary.csv``, a PNG and a Markdown report.

    sudo python experiments/underlay_switching.py [--quick] [--controller fabric --topology topologies/ovs_fabric.yaml]
"""

from __future__ import annotations

import contextlib
import random
import re
import secrets
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from k8snetlab import experiment_script, framework, hoststat, measure, proc, results, spec  # noqa: E402
from k8snetlab.cluster import Cluster  # noqa: E402
from k8snetlab.errors import SpecError  # noqa: E402
from k8snetlab.netutil import Netns  # noqa: E402

NAME = "underlay_switching"
BASELINE = "linuxbridge"
# flows an app learns and can relearn at once: deleted to make a path cold (cookie, see the app).
# fabric's routes are kept: its first packet is the ARP broadcast it floods itself.
LEARNED_FLOW_COOKIE = {"l2_learning": "0x12"}
PLOT_METRICS = ("rtt_p50", "tcp_throughput", "first_packet_rtt")


def build_parser():
    p = experiment_script.parser(__doc__.strip().splitlines()[0], default_repeat=3)
    p.add_argument("--controller", default="l2_learning", help="controller app for the OVS underlay "
                   "(default %(default)s; 'k8snetlab controllers' lists them)")
    p.add_argument("--duration", type=float, default=3.0, help="seconds per iperf3 run (default %(default)s)")
    p.add_argument("--pings", type=int, default=200, help="ping samples per RTT measurement (default %(default)s)")
    p.add_argument("--first-packets", type=int, default=5,
                   help="cold first-packet samples per path and round (default %(default)s)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the order shuffled per round (default: a new one, printed)")
    p.add_argument("--no-pause", action="store_true",
                   help="leave the other cluster's processes running while one measures")
    return p


def variants(args) -> dict[str, spec.ClusterSpec]:
    base = experiment_script.load_topology(args)
    ovs_mode = f"ovs+{args.controller}"
    return {BASELINE: spec.with_underlay(base, "linuxbridge", "none"),
            ovs_mode: spec.with_underlay(base, "ovs", args.controller)}


def run(args) -> int:
    if args.quick:
        args.repeat, args.duration, args.pings, args.first_packets = 1, 1.0, 50, 3
    if args.pings < 50:
        raise SpecError("--pings: at least 50 samples are needed for p99")
    if args.first_packets < 1:
        raise SpecError("--first-packets: at least 1")
    specs = variants(args)
    modes = list(specs)
    proc.require_root(NAME)
    proc.require("ping", "iperf3", "bridge")
    out_dir, run_id, csv_path = experiment_script.output(args, NAME)
    kernel = results.kernel_release()
    seed = args.seed if getattr(args, "seed", None) is not None else secrets.randbelow(2 ** 31)
    rng = random.Random(seed)
    where = getattr(args, "placement", None) or measure.current_placement()
    pin = framework.pin_label(where)
    machine_start = hoststat.machine()
    print(f"{NAME}: run {run_id}, seed {seed} (--seed {seed} repeats this order); "
          f"CPU placement: {where.describe()}", file=sys.stderr)

    with contextlib.ExitStack() as stack, results.CsvWriter(csv_path) as csv:
        clusters: dict[str, Cluster] = {}
        for m, s in specs.items():
            clusters[m] = stack.enter_context(Cluster(s))
            c = clusters[m]
            print(f"{m}: cluster up in {c.timings['start_s']:.2f} s"
                  + (f" ({c.ovs.describe()})" if c.ovs else ""), file=sys.stderr)
        scenarios = {m: experiment_script.standard_scenarios(c) for m, c in clusters.items()}
        meta = {m: (c.spec.name, c.ovs.datapath if c.ovs else "kernel") for m, c in clusters.items()}

        freezer = hoststat.Freezer({m: hoststat.host_namespaces(c) for m, c in clusters.items()},
                                   enabled=not getattr(args, "no_pause", False))
        stack.callback(freezer.resume)
        ns_names = {m: framework.namespace_names(c) for m, c in clusters.items()}
        from k8snetlab import drops as dropsmod
        from k8snetlab.errors import CommandError
        try:
            counter = dropsmod.DropCounter().start()
            stack.callback(counter.stop)
            counter.watch({i for names in ns_names.values() for i in names})
        except (dropsmod.DropsUnavailable, CommandError, OSError) as e:
            counter = None
            print(f"kernel drop reasons not counted: {str(e).splitlines()[0]}", file=sys.stderr)

        def row(m: str, scenario: str, src: str, dst: str, rnd: int, metric: str, value: float, unit: str,
                mtu: int | None = 1500, load1: float | None = None, steal: float | None = None,
                pin: str | None = None) -> None:
            topology, datapath = meta[m]
            csv.write(results.Row(run_id=run_id, timestamp=results.utc_timestamp(), experiment=NAME,
                                  topology=topology, mode=m, datapath=datapath, scenario=scenario, src=src,
                                  dst=dst, round=rnd, metric=metric, value=value, unit=unit, mtu=mtu,
                                  kernel=kernel, load1=load1, steal=steal, pin=pin))

        for m, c in clusters.items():
            row(m, "lifecycle", "", "", 0, "cluster_up", c.timings["start_s"], "s", None)
        progress = experiment_script.Progress(args.repeat * len(modes) * 3)
        for rnd in range(1, args.repeat + 1):
            with freezer.only(None):
                baseline = framework.quiet_busy_rate()   # the machine's busy CPU when we are quiet
            order = [(m, sc) for m in modes for sc in scenarios[m]]
            rng.shuffle(order)                           # no underlay is always first in a round
            for m, sc in order:
                c = clusters[m]
                progress.step(f"round {rnd} {m} {sc.name}")
                load1 = hoststat.loadavg()
                with freezer.only(m):
                    for sample in first_packets(c, sc, args.first_packets):
                        row(m, sc.name, sc.src.name, sc.dst.name, rnd, "first_packet_rtt", sample, "ms")
                    measure.ping(sc.src.netns, sc.dst.ip, count=3, interval_s=0.01)   # warm
                    rtt = measure.ping(sc.src.netns, sc.dst.ip, count=args.pings, interval_s=0.01)
                    row(m, sc.name, sc.src.name, sc.dst.name, rnd, "rtt_loss", rtt.loss, "fraction", load1=load1)
                    if rtt.samples_ms:
                        for metric in ("rtt_min", "rtt_p50", "rtt_p90", "rtt_p99"):
                            row(m, sc.name, sc.src.name, sc.dst.name, rnd, metric, getattr(rtt, metric[4:]), "ms",
                                load1=load1)
                    got, steal = framework.tcp_signals(sc.src.netns, sc.dst.netns, sc.dst.ip, args.duration,
                                                       baseline_rate=baseline, placement=where, drops=counter,
                                                       drop_netns=ns_names[m])
                for metric, value, unit in got:           # throughput with its golden signals
                    row(m, sc.name, sc.src.name, sc.dst.name, rnd, metric, value, unit, load1=load1, steal=steal,
                        pin=pin)
            for m in modes:
                c = clusters[m]
                with freezer.only(m):
                    talk_all(c)
                    for sw, n in switch_entries(c).items():
                        row(m, "switch", sw, "", rnd, "flows_per_switch", n, "count", None)
        for m in reversed(modes):
            c = clusters.pop(m)
            c.stop()
            row(m, "lifecycle", "", "", 0, "cluster_down", c.timings["stop_s"], "s", None)

    rows = results.read_rows(csv_path)
    text = summary(rows, modes, seed)
    print(text)
    png = results.plot(rows, csv_path.with_suffix(".png"), metrics=PLOT_METRICS, modes=modes,
                       skip_scenarios=("lifecycle", "switch"),
                       title=f"{modes[1]} vs {modes[0]} ({meta[modes[1]][1]} datapath)")
    how = (f"Seed {seed}. Rounds interleaved, shuffled within each round; "
           f"{'the other cluster paused while one measures' if not getattr(args, 'no_pause', False) else 'both clusters running'}; "
           f"CPU placement: {where.describe()}.")
    summary_path, md = framework.write_outputs(describe(modes), csv_path, run_id, text, png, seed, how, machine_start)
    print(f"\nCSV: {csv_path}\nsummary CSV: {summary_path}\nreport: {md}")
    if png:
        print(f"plot: {png}")
    return 0


def first_packets(c: Cluster, sc, n: int) -> list[float]:
    """``n`` first-packet RTTs (ms) of the path, each after making it cold (see the docstring).
    A first ping that gets no reply within 2 s is not a sample (the loss rows cover loss)."""
    out = []
    for _ in range(n):
        make_cold(c, sc)
        r = proc.run(["ping", "-n", "-c", "1", "-W", "2", sc.dst.ip], netns=sc.src.netns, check=False,
                     env={"LC_ALL": "C", "PATH": "/usr/bin:/bin"})
        m = re.search(r"time=([\d.]+) ms", r.stdout)
        if m:
            out.append(float(m.group(1)))
    return out


def make_cold(c: Cluster, sc) -> None:
    for netns in {sc.src.netns, sc.dst.netns} | {n.netns for n in c.nodes.values()}:
        with Netns(netns) as ns:
            ns.flush_neigh()
    cookie = LEARNED_FLOW_COOKIE.get(c.ovs.app) if c.ovs else None
    if cookie:
        for sw in c.switches.values():
            c.ovs.ofctl("del-flows", sw.name, f"cookie={cookie}/-1")
    time.sleep(0.05)


def talk_all(c: Cluster) -> None:
    """Every node pings every other once: the switches then hold what a busy cluster makes
    them hold (pod traffic crosses the underlay with its nodes' MACs)."""
    for a in c.nodes.values():
        for b in c.nodes.values():
            if a is not b:
                a.run(["ping", "-c", "1", "-W", "2", b.ip], check=False)


def switch_entries(c: Cluster) -> dict[str, int]:
    """Per switch (its name in the cluster file): OpenFlow flows (OVS) or learned, non-local
    forwarding-database entries (Linux bridge)."""
    out = {}
    for name, sw in c.switches.items():
        if c.ovs:
            out[name] = len(c.ovs.flows(sw.name))
        else:
            fdb = proc.run(["bridge", "fdb", "show", "br", sw.name]).stdout.splitlines()
            out[name] = len([l for l in fdb if "permanent" not in l])
    return out


def describe(modes) -> framework.Experiment:
    """This experiment as the framework sees it (for the summary, the summary CSV, the report)."""
    base, ovs = modes
    exp = framework.Experiment()
    exp.name, exp.variants = NAME, tuple(framework.Variant(m, "") for m in modes)
    exp.description = __doc__.strip().splitlines()[0]
    exp.table_ratios = ((ovs, base),)
    exp.comparisons = tuple(framework.Comparison(ovs, base, sc, metric=m)
                            for sc in ("node-to-node", "pod-same-node", "pod-cross-node")
                            for m in ("tcp_throughput", "rtt_p50"))
    exp.table_metrics = ("first_packet_rtt", "rtt_p50", "rtt_p99", "tcp_throughput", "cpu_per_gbit", "rx_pps",
                         "tcp_retransmits", "kernel_drops")
    return exp


def summary(rows, modes, seed: int = 1) -> str:
    base, ovs = modes
    exp = describe(modes)
    lines = [framework.summary(exp, [r for r in rows if r.scenario != "switch"], seed=seed)]
    table = results.ratio_table(rows, numerator_mode=ovs, denominator_mode=base,
                                skip_scenarios=("lifecycle", "switch"))
    med = {(r["scenario"], r["metric"]): r for r in table}
    lines.append("\nPacket-in cost (median first-packet RTT minus median steady-state p50, pod-cross-node):")
    fp, p50 = med.get(("pod-cross-node", "first_packet_rtt")), med.get(("pod-cross-node", "rtt_p50"))
    if fp and p50:
        for label, key in ((base, "denominator"), (ovs, "numerator")):
            if fp[key] is not None and p50[key] is not None:
                lines.append(f"  {label:<24} {fp[key] - p50[key]:8.3f} ms  (first {fp[key]:.3f} ms, p50 {p50[key]:.3f} ms)")
    flows: dict[str, dict[str, list[float]]] = {}
    for r in rows:
        if r.metric == "flows_per_switch":
            flows.setdefault(r.mode, {}).setdefault(r.src, []).append(r.value)
    lines.append("\nFlows per switch (OVS: OpenFlow flows; Linux bridge: learned FDB entries), median over rounds:")
    for m in modes:
        per = {sw: results.median(v) for sw, v in flows.get(m, {}).items()}
        lines.append(f"  {m:<24} " + ", ".join(f"{sw} {v:.0f}" for sw, v in per.items()))
    life = {(r.mode, r.metric): r.value for r in rows if r.scenario == "lifecycle"}
    lines.append("\nCluster up / down (s): " + "; ".join(
        f"{m} {life.get((m, 'cluster_up'), float('nan')):.2f} / {life.get((m, 'cluster_down'), float('nan')):.2f}"
        for m in modes))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(experiment_script.main(run, build_parser()))
