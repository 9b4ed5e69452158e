#!/usr/bin/env python3
"""BGP full mesh vs route reflectors: sessions, convergence, withdrawal and speaker memory by cluster size.

For each N in ``--nodes`` a flat cluster of N nodes is generated (one subnet, no pods: the
control plane is measured, not traffic) and run twice, interleaved round by round: Calico's
node-to-node mesh (N(N-1)/2 sessions) and route reflectors (``--reflectors``, default 2, the
first nodes; (N-R)R + R(R-1)/2 sessions). The speakers are started only after the cluster is
built (``defer_start``), all at once, so that what is timed is BGP alone:

- ``bgp_converge``: from the first speaker start until every node's kernel FIB holds every
  other node's pod CIDR (FIBs read from ``/proc/PID/net/route``, every 20 ms);
- ``bgp_sessions``: established sessions per node, and in total, asked of the speakers
  (``birdc show protocols all``), beside the formula (``bgp_sessions_expected``);
- ``bgp_withdraw`` / ``bgp_restore``: the last node's speaker is stopped (a graceful BGP
  shutdown) until its pod CIDR is gone from every other FIB, then started until it is back;
- ``speaker_rss`` / ``speaker_pss`` (from /proc) and ``speaker_mem`` (``birdc show memory``)
  per node;
- ``underlay_up`` (Mininet hosts and links), ``agents_up`` (configs rendered and dry-run),
  ``cluster_up``, ``cluster_down``: where the start time goes.

    sudo python experiments/bgp_mesh_vs_rr.py [--nodes 10,20,50] [--quick] [--repeat N] [--out DIR]
"""

from __future__ import annotations

import math
import random
import resource
import secrets
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from k8snetlab import experiment_script, framework, hoststat, proc, results, spec, stats  # noqa: E402
from k8snetlab.bgp import SPEAKERS, fib, plan as bgpplan  # noqa: E402
from k8snetlab.cluster import Cluster  # noqa: E402
from k8snetlab.errors import SpecError  # noqa: E402

NAME = "bgp_mesh_vs_rr"
MESH, RR = "bgp-mesh", "bgp-rr"
TOPOLOGIES = {MESH: "mesh", RR: "route-reflector"}
MAX_NODES = 200            # one /24 pod CIDR per node, one underlay /16: room to spare
POLL_S = 0.02


def build_parser():
    p = experiment_script.parser(__doc__.strip().splitlines()[0], default_repeat=3)
    p.add_argument("--nodes", default="10,20,50", help="cluster sizes, comma-separated (default %(default)s; "
                   f"at most {MAX_NODES})")
    p.add_argument("--reflectors", type=int, default=2, help="route reflectors (default %(default)s)")
    p.add_argument("--hold-time", type=int, default=30, help="BGP hold time in s (default %(default)s)")
    p.add_argument("--speaker", default="bird", choices=SPEAKERS.names(), help="BGP daemon (default %(default)s)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the order shuffled per round (default: a new one, printed)")
    p.add_argument("--timeout", type=float, default=60.0, help="longest wait for convergence, s (default %(default)s)")
    return p


def sizes(text: str, reflectors: int) -> list[int]:
    try:
        ns = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SpecError(f"--nodes: {text!r} is not a comma-separated list of numbers, e.g. 10,20,50") from None
    if not ns:
        raise SpecError("--nodes: give at least one cluster size, e.g. 10,20,50")
    for n in ns:
        if not reflectors < n <= MAX_NODES:
            raise SpecError(f"--nodes: {n} is out of range: between {reflectors + 1} (more nodes than "
                            f"--reflectors) and {MAX_NODES}")
    return ns


def flat_cluster(n: int, topology: str, args) -> spec.ClusterSpec:
    """N nodes on one L2 segment, no workloads, cni bgp."""
    nodes = [{"name": f"node{i + 1}", "ip": f"192.168.{1 + i // 200}.{10 + i % 200}"} for i in range(n)]
    bgp: dict[str, Any] = {"topology": topology, "holdTime": args.hold_time, "speaker": args.speaker}
    if topology == "route-reflector":
        bgp["reflectors"] = [nd["name"] for nd in nodes[:args.reflectors]]
    return spec.from_dict({"name": f"flat-{n}", "underlay": {"subnets": [{"name": "lan", "cidr": "192.168.0.0/16"}]},
                           "nodes": nodes, "cni": {"type": "bgp", "invoke": "inprocess", "bgp": bgp}},
                          source=f"<{NAME}: {n} nodes, {topology}>")


def expected_sessions(n: int, mode: str, reflectors: int) -> int:
    return bgpplan.mesh_sessions(n) if mode == MESH else bgpplan.rr_sessions(n, reflectors)


def wait_for(cond: Callable[[], bool], timeout: float) -> float:
    """Seconds until ``cond()`` held, NaN when it did not within ``timeout``."""
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            return math.nan
        time.sleep(POLL_S)
    return time.monotonic() - t0


def measure_one(n: int, mode: str, rnd: int, args, row) -> None:
    """One cluster: build, start the speakers, measure, tear down."""
    scenario = f"{n} nodes"
    c = Cluster(flat_cluster(n, TOPOLOGIES[mode], args))
    c.mode.defer_start = True
    try:
        c.start()
        for metric, key in (("cluster_up", "start_s"), ("underlay_up", "underlay_s"), ("agents_up", "agents_s")):
            row(mode, scenario, rnd, metric, c.timings[key], "s")
        t0 = time.monotonic()
        c.mode.start_speakers(wait=False)
        converge = wait_for(lambda: not c.mode.missing_routes(), args.timeout)
        row(mode, scenario, rnd, "bgp_converge", converge if math.isnan(converge) else time.monotonic() - t0, "s")
        # routes can be complete before every session is (a client needs one reflector)
        want = expected_sessions(n, mode, args.reflectors)
        status: dict[str, Any] = {}

        def all_up() -> bool:
            status.update(c.mode.status(list(c.nodes)))
            return sum(s.established() for s in status.values()) >= 2 * want
        wait_for(all_up, 10)
        for name, s in status.items():
            row(mode, scenario, rnd, "bgp_sessions", s.established(), "count", src=name)
        row(mode, scenario, rnd, "bgp_sessions_total", sum(s.established() for s in status.values()) / 2, "count")
        row(mode, scenario, rnd, "bgp_sessions_expected", want, "count")
        for name in c.nodes:
            drv = c.mode.speakers[name]
            row(mode, scenario, rnd, "speaker_rss", drv.rss_kb() / 1024, "MB", src=name)
            row(mode, scenario, rnd, "speaker_pss", drv.pss_kb() / 1024, "MB", src=name)
            mem = drv.daemon_memory_kb()
            if mem is not None:
                row(mode, scenario, rnd, "speaker_mem", mem / 1024, "MB", src=name)
        victim = list(c.nodes)[-1]
        cidr = str(c.nodes[victim].spec.pod_cidr)
        others = [h.pid for name, h in c.nodes.items() if name != victim]
        t1 = time.monotonic()
        c.mode.stop_speaker(victim)      # returns once the daemon exited: the Cease went out before
        gone = wait_for(lambda: not any(cidr in fib.prefixes(pid) for pid in others), args.timeout)
        row(mode, scenario, rnd, "bgp_withdraw", gone if math.isnan(gone) else time.monotonic() - t1, "s", src=victim)
        t2 = time.monotonic()
        c.mode.start_speaker(victim, wait=False)
        back = wait_for(lambda: all(cidr in fib.prefixes(pid) for pid in others), args.timeout)
        row(mode, scenario, rnd, "bgp_restore", back if math.isnan(back) else time.monotonic() - t2, "s", src=victim)
    finally:
        c.stop()
    row(mode, scenario, rnd, "cluster_down", c.timings.get("stop_s", math.nan), "s")


def run(args) -> int:
    if args.topology != experiment_script.DEFAULT_TOPOLOGY or getattr(args, "param", None):
        raise SpecError("--topology/--param: this experiment generates its flat clusters itself: use --nodes")
    if args.reflectors < 1:
        raise SpecError("--reflectors: at least 1")
    if not 3 <= args.hold_time <= 65535:
        raise SpecError("--hold-time: between 3 (BIRD's minimum) and 65535 seconds")
    if args.quick:
        args.nodes, args.repeat = "10", 1
    ns = sizes(args.nodes, args.reflectors)
    for n in ns:                      # every generated file is valid before anything is built
        for mode in TOPOLOGIES:
            flat_cluster(n, TOPOLOGIES[mode], args)
    proc.require_root(NAME)
    out_dir, run_id, csv_path = experiment_script.output(args, NAME)
    kernel = results.kernel_release()
    seed = args.seed if getattr(args, "seed", None) is not None else secrets.randbelow(2 ** 31)
    rng = random.Random(seed)
    machine_start = hoststat.machine()
    print(f"{NAME}: run {run_id}, seed {seed} (--seed {seed} repeats this order)", file=sys.stderr)

    with results.CsvWriter(csv_path) as csv:
        def row(mode: str, scenario: str, rnd: int, metric: str, value: float, unit: str, src: str = "") -> None:
            csv.write(results.Row(run_id=run_id, timestamp=results.utc_timestamp(),
                                  experiment=NAME, topology=f"flat-{scenario.split()[0]}" if scenario else "",
                                  mode=mode, datapath=args.speaker, scenario=scenario, src=src, dst="",
                                  round=rnd, metric=metric, value=value, unit=unit, mtu=None, kernel=kernel))

        progress = experiment_script.Progress(args.repeat * len(ns) * len(TOPOLOGIES))
        for rnd in range(1, args.repeat + 1):
            order = [(n, mode) for n in ns for mode in TOPOLOGIES]
            rng.shuffle(order)                    # neither mesh nor reflectors always first
            for n, mode in order:
                progress.step(f"round {rnd}: {n} nodes, {TOPOLOGIES[mode]}")
                measure_one(n, mode, rnd, args, row)
        row("all", "", 0, "runtime_peak_rss", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "MB")

    rows = results.read_rows(csv_path)
    text = summary(rows, ns, args.reflectors)
    print(text)
    png = results.plot(rows, csv_path.with_suffix(".png"), skip_scenarios=("",),
                       metrics=("bgp_sessions_total", "bgp_converge", "bgp_withdraw", "speaker_pss"),
                       title=f"BGP full mesh vs {args.reflectors} route reflectors ({args.speaker})")
    exp = framework.Experiment()
    exp.name, exp.description = NAME, __doc__.strip().splitlines()[0]
    exp.variants = tuple(framework.Variant(m, "") for m in TOPOLOGIES)
    how = (f"Seed {seed}. Per round every (size, topology) once, in an order shuffled per round; "
           "one cluster at a time.")
    summary_path, md = framework.write_outputs(exp, csv_path, run_id, text, png, seed, how, machine_start)
    print(f"\nCSV: {csv_path}\nsummary CSV: {summary_path}\nreport: {md}")
    if png:
        print(f"plot: {png}")
    return 0


def _agg(rows, mode: str, scenario: str, metric: str, how: Callable[[list[float]], float] = results.median) -> float | None:
    vals = [r.value for r in rows if r.mode == mode and r.scenario == scenario and r.metric == metric]
    return how(vals) if vals else None


def _per_round_max(rows, mode: str, scenario: str, metric: str) -> float | None:
    """The largest per-node value of each round, median over rounds."""
    by_round: dict[int, float] = {}
    for r in rows:
        if r.mode == mode and r.scenario == scenario and r.metric == metric:
            by_round[r.round] = max(by_round.get(r.round, r.value), r.value)
    return results.median(by_round.values()) if by_round else None


def summary(rows, ns: list[int], reflectors: int) -> str:
    """Per size: mesh and route reflectors side by side with rr/mesh, then the targets."""
    lines = []
    table = []
    what = [("sessions in total", "bgp_sessions_total", "count", _agg),
            ("sessions per node, max", "bgp_sessions", "count", _per_round_max),
            ("sessions per node, median", "bgp_sessions", "count", _agg),
            ("convergence", "bgp_converge", "s", _agg),
            ("withdrawal", "bgp_withdraw", "s", _agg),
            ("restore", "bgp_restore", "s", _agg),
            ("speaker PSS per node, max", "speaker_pss", "MB", _per_round_max),
            ("speaker RSS per node, max", "speaker_rss", "MB", _per_round_max),
            ("daemon's own count, median", "speaker_mem", "MB", _agg),
            ("Mininet underlay up", "underlay_up", "s", _agg),
            ("node agents up", "agents_up", "s", _agg),
            ("cluster up", "cluster_up", "s", _agg),
            ("cluster down", "cluster_down", "s", _agg)]
    for n in ns:
        sc = f"{n} nodes"
        for label, metric, unit, fn in what:
            m, r = fn(rows, MESH, sc, metric), fn(rows, RR, sc, metric)
            if m is None and r is None:
                continue
            ratio = r / m if m and r is not None and not math.isnan(m) else None
            table.append([n, label, unit, m, r, ratio])
    lines.append(results.format_table(["nodes", "measure", "unit", "mesh", f"{reflectors} RRs", "rr/mesh"], table))

    lines.append("\nTargets (met: the whole 95 % interval on the right side; MISSED: all of it on the wrong side; "
                 "inconclusive: it crosses the target; counts and the largest memory are exact, one value):")

    def line(label: str, lo: float | None, mid: float | None, hi: float | None, limit: float, n: int) -> str:
        if mid is None or math.isnan(mid):
            return f"  {'MISSED':<13} {label}: not measured (timed out)"
        if n < 2:
            return f"  {'met' if mid <= limit else 'MISSED':<13} {label}: {mid:.3g} (one value, no interval)"
        return f"  {stats.verdict(lo, hi, high=limit):<13} {label}: {stats.fmt_ci(mid, lo, hi)}"

    for n, limit in ((50, 10.0), (100, 15.0)):
        if n in ns:
            vals = [r.value for r in rows if r.mode == MESH and r.scenario == f"{n} nodes" and r.metric == "bgp_converge"]
            if vals and not any(math.isnan(v) for v in vals):
                d = stats.describe(vals)
                lines.append(line(f"{n}-node mesh converges <= {limit:.0f} s (s)", d.ci_low, d.mean, d.ci_high, limit, d.n))
            else:
                lines.append(line(f"{n}-node mesh converges <= {limit:.0f} s (s)", None, None, None, limit, 0))
    pss = [v for n in ns for m in (MESH, RR) if (v := _per_round_max(rows, m, f"{n} nodes", "speaker_pss")) is not None]
    rss = [v for n in ns for m in (MESH, RR) if (v := _per_round_max(rows, m, f"{n} nodes", "speaker_rss")) is not None]
    if pss:
        lines.append(line("speaker memory (PSS) <= 5 MB per node, largest (MB)", None, max(pss), None, 5.0, 1))
    if rss:
        lines.append(line("speaker memory (RSS, shared libraries counted in full) <= 5 MB per node, largest (MB)",
                          None, max(rss), None, 5.0, 1))
    at = 50 if 50 in ns else max(ns)      # the target is for 50 nodes (1,225 mesh sessions)
    m, r = _agg(rows, MESH, f"{at} nodes", "bgp_sessions_total"), _agg(rows, RR, f"{at} nodes", "bgp_sessions_total")
    if m and r is not None:
        note = "" if at == 50 else " (the target is set for 50 nodes)"
        lines.append(line(f"RR sessions <= 0.1 x mesh at {at} nodes{note} (ratio)", None, r / m, None, 0.1, 1))
    for n in ns:
        a, b = framework.paired(rows, RR, MESH, f"{n} nodes", "bgp_converge")
        if a and sum(b) and not any(math.isnan(x) for x in a + b):
            rt = stats.paired_ratio(a, b)
            lines.append(line(f"RR convergence <= 1.5 x mesh at {n} nodes (ratio)", rt.ci_low, rt.value, rt.ci_high,
                              1.5, rt.n))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(experiment_script.main(run, build_parser()))
