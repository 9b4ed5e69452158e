#!/usr/bin/env python3
"""host-gw vs IPIP: the same cluster, the same traffic, both modes side by side.

Two clusters are built from one cluster file, one per mode (same nodes, same pods, same
addresses, separate namespaces and underlay bridges), and measured interleaved round by
round: node-to-node over the underlay (the baseline), pod-to-pod on one node, pod-to-pod
across nodes. RTT from ping (min, p50, p90, p99 over ``--pings`` samples) and TCP throughput
from iperf3 (receiver's rate, sender's retransmits). One CSV row per measurement, then a
summary with the ipip/host-gw ratios and the targets of the foundation issue.

    sudo python experiments/hostgw_vs_ipip.py [--quick] [--repeat N] [--duration S] [--out DIR]
"""

from __future__ import annotations

import contextlib
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from k8snetlab import experiment, measure, proc, results, spec  # noqa: E402
from k8snetlab.cluster import Cluster  # noqa: E402

NAME = "hostgw_vs_ipip"
MODES = ("host-gw", "ipip")


def build_parser():
    p = experiment.parser(__doc__.strip().splitlines()[0])
    p.add_argument("--duration", type=float, default=5.0, help="seconds per iperf3 run (default %(default)s)")
    p.add_argument("--pings", type=int, default=200, help="ping samples per measurement (default %(default)s)")
    p.add_argument("--datapath", default=None, choices=("auto", "kernel", "ebpf"),
                   help="ipip datapath (default: the cluster file's, else auto)")
    return p


def run(args) -> int:
    if args.quick:
        args.repeat, args.duration, args.pings = 1, 2.0, 50
    if args.pings < 50:
        raise spec.SpecError("--pings: at least 50 samples are needed for p99")
    base = experiment.load_topology(args)
    overrides = {"ipip": {**base.cni.sections.get("ipip", {}), "datapath": args.datapath}} if args.datapath else {}
    specs = {m: base.with_cni(m, **(overrides if m == "ipip" else {})) for m in MODES}
    proc.require_root(NAME)
    proc.require("ping", "iperf3")
    out_dir, run_id, csv_path = experiment.output(args, NAME)
    kernel = results.kernel_release()

    with contextlib.ExitStack() as stack, results.CsvWriter(csv_path) as csv:
        clusters: dict[str, Cluster] = {}
        for m, s in specs.items():
            t0 = time.monotonic()
            clusters[m] = stack.enter_context(Cluster(s))
            print(f"{m}: cluster up in {time.monotonic() - t0:.2f} s "
                  f"(datapath {clusters[m].mode.datapath}, pod MTU {clusters[m].mode.mtu})", file=sys.stderr)
        scenarios = {m: experiment.standard_scenarios(c) for m, c in clusters.items()}

        # what a row says about its mode, kept so rows written after teardown say it too
        meta = {m: (c.spec.name, c.mode.datapath, c.mode.mtu) for m, c in clusters.items()}

        def row(m: str, sc, rnd: int, metric: str, value: float, unit: str) -> None:
            topology, datapath, pod_mtu = meta.get(m, (base.name, "", None))
            mtu = 1500 if sc is not None and sc.name == "node-to-node" else (pod_mtu if sc else None)
            csv.write(results.Row(run_id=run_id, timestamp=time.strftime("%Y-%m-%dT%H:%M:%S"),
                                  experiment=NAME, topology=topology, mode=m, datapath=datapath,
                                  scenario=sc.name if sc else "lifecycle", src=sc.src.name if sc else "",
                                  dst=sc.dst.name if sc else "", round=rnd, metric=metric, value=value,
                                  unit=unit, mtu=mtu, kernel=kernel))

        for m, c in clusters.items():
            row(m, None, 0, "cluster_up", c.timings["start_s"], "s")
        progress = experiment.Progress(args.repeat * len(MODES) * 3)
        for rnd in range(1, args.repeat + 1):
            for m in MODES:
                for sc in scenarios[m]:
                    progress.step(f"round {rnd} {m} {sc.name}")
                    # warm-up: resolve ARP and fill caches so the first sample is not an outlier
                    measure.ping(sc.src.netns, sc.dst.ip, count=3, interval_s=0.01)
                    rtt = measure.ping(sc.src.netns, sc.dst.ip, count=args.pings, interval_s=0.01)
                    row(m, sc, rnd, "rtt_loss", rtt.loss, "fraction")
                    if rtt.samples_ms:   # total loss: the loss row says it; no invented RTT
                        for metric, value in (("rtt_min", rtt.min), ("rtt_p50", rtt.p50), ("rtt_p90", rtt.p90),
                                              ("rtt_p99", rtt.p99)):
                            row(m, sc, rnd, metric, value, "ms")
                    tcp = measure.iperf3(sc.src.netns, sc.dst.netns, sc.dst.ip, duration_s=args.duration)
                    row(m, sc, rnd, "tcp_throughput", tcp.gbit_s, "Gbit/s")
                    row(m, sc, rnd, "tcp_retransmits", tcp.retransmits, "count")
        for m in reversed(MODES):
            c = clusters.pop(m)
            c.stop()
            row(m, None, 0, "cluster_down", c.timings["stop_s"], "s")
        row("all", None, 0, "runtime_peak_rss", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "MB")

    rows = results.read_rows(csv_path)
    print(summary(rows))
    print(f"\nCSV: {csv_path}")
    png = results.plot(rows, csv_path.with_suffix(".png"))
    if png:
        print(f"plot: {png}")
    return 0


def summary(rows) -> str:
    """The per-scenario medians, ipip/host-gw ratios, and the foundation issue's targets."""
    table = results.ratio_table(rows, numerator_mode="ipip", denominator_mode="host-gw")
    headers = ["scenario", "metric", "unit", "host-gw", "ipip", "ipip/host-gw"]
    lines = [results.format_table(headers, [[r["scenario"], r["metric"], r["unit"], r["denominator"],
                                              r["numerator"], r["ratio"]] for r in table])]
    med = {(r["scenario"], r["metric"]): r for r in table}
    checks = []
    tp = lambda sc: med.get((sc, "tcp_throughput"), {})
    if tp("pod-cross-node") and tp("node-to-node"):
        hg, under = tp("pod-cross-node")["denominator"], tp("node-to-node")["denominator"]
        checks.append(("host-gw cross-node TCP >= 0.8 x node-to-node", hg / under if under else 0, 0.8, ">="))
        checks.append(("ipip cross-node TCP >= 0.85 x host-gw", tp("pod-cross-node")["ratio"] or 0, 0.85, ">="))
    p50 = med.get(("pod-cross-node", "rtt_p50"))
    if p50:
        checks.append(("ipip RTT p50 - host-gw p50 <= 10 us (in us)",
                       (p50["numerator"] - p50["denominator"]) * 1000, 10, "<="))
    life = {(r.mode, r.metric): r.value for r in rows if r.scenario == "lifecycle"}
    for m in MODES:
        if (m, "cluster_up") in life:
            checks.append((f"{m} cluster up <= 5 s (s)", life[(m, "cluster_up")], 5, "<="))
        if (m, "cluster_down") in life:
            checks.append((f"{m} cluster down <= 5 s (s)", life[(m, "cluster_down")], 5, "<="))
    if ("all", "runtime_peak_rss") in life:
        checks.append(("runtime peak memory <= 300 MB (MB, both clusters)", life[("all", "runtime_peak_rss")], 300, "<="))
    lines.append("\nTargets (from this run):")
    for what, value, target, op in checks:
        ok = value >= target if op == ">=" else value <= target
        lines.append(f"  {'met ' if ok else 'MISS'}  {what}: {value:.3g}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(experiment.main(run, build_parser()))
