#!/usr/bin/env python3
"""kube-proxy modes: what a Service costs per packet, per connection, and per thousand Services.

One cluster is built from the cluster file's underlay and nodes (its own workloads and Services
are left out, so that the baseline is a node with exactly one Service): a client pod on the
first node, a server pod on the second, and one Service ``kpm-probe`` in front of the server.
kube-proxy is switched between the modes this machine can run (``set_mode``: the old mode's
rules are removed, the new one programs every node), so every mode is measured on the same pod
pair, interleaved round by round (A B C, A B C, ...). Per mode and round, each metric is taken
straight to the pod IP and through the ClusterIP, one after the other:

- RTT: sockperf TCP ping-pong (full round trips, back to back, over one connection), ``rtt_*``;
- TCP throughput: iperf3, one stream, receiver's rate (``tcp_throughput``);
- connection set-up rate: ``--connections`` sequential connect / 1-byte answer / close
  (``conn_rate``, connections per second, one Python client).

Scaling: dummy Services (one endpoint each, the server pod) are added to reach 100, 1,000 and
5,000 Services (``--sizes``; nftables also 30,000, ``--nft-max``), created through the add-on with
one sync. At each size and for each mode:

- ``program_time``: one sync on the first node starting from an empty node (the proxier is
  stopped, its rules removed, started again): one ``iptables-restore`` / ``nft -f`` batch, for
  userspace also the proxy opening a socket per Service port; ``resync_time``: the same sync
  again (what the periodic resync costs; in iptables and nftables modes a partial sync, as
  kube-proxy's: nothing changed, so iptables rewrites its top-level chains only and nftables
  sends nothing); ``change_time``: a sync after one Service
  lost its endpoint (one Service's chains change); ``check_time``: the per-sync check that the
  node's rules are still as the proxier left them (a fingerprint of the ruleset; 50 samples),
  and ``repair_time``: the sync after ``iptables -t nat -F`` / ``nft flush table`` (a full one);
- ``connect_p50`` / ``connect_p90``: TCP connect time of ``--probes`` fresh connections to the
  Service placed last in the node's rule order (kpm-probe sorts after the dummies; checked in
  ``iptables-save``), and ``first_packet_added``: connect_p50 minus the same with one Service.
  In iptables mode the first packet of a connection walks ``KUBE-SERVICES`` rule by rule; in
  nftables mode it is one map lookup. In userspace mode the connect completes at the node's
  proxy, so the figure is not the same path as the others'.

One CSV row per measurement (``mode`` = kube-proxy mode, ``datapath`` = CNI type), a summary
with the targets as ratios/values from this run, and two PNG plots.

    sudo python experiments/kube_proxy_modes.py [--quick] [--repeat N] [--modes iptables,nftables]
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import resource
import secrets
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from k8snetlab import experiment_script, framework, hoststat, manifests, measure, proc, results, stats  # noqa: E402
from k8snetlab.framework import Target  # noqa: E402
from k8snetlab.cluster import Cluster  # noqa: E402
from k8snetlab.errors import K8sNetLabError, SpecError  # noqa: E402
from k8snetlab.services import available_modes  # noqa: E402
from k8snetlab.services.model import Snapshot, parse_service  # noqa: E402

log = logging.getLogger("kube_proxy_modes")

NAME = "kube_proxy_modes"
# modes that program the nodes, switched on one cluster; openflow (the underlay switch balances)
# needs an underlay of its own and is not compared here
NODE_MODES = ("userspace", "iptables", "nftables", "ipvs")
LEGACY = "iptables-legacy"   # the iptables mode with the iptables-legacy binaries (kubeProxy.iptablesBackend)
CLIENT, SERVER, PROBE = "kpm-client", "kpm-server", "kpm-probe"
SERVER_LABELS = {"app": SERVER}
IPERF_PORT, SOCKPERF_PORT = 5201, 11111
ACCEPT_PORT, ACCEPT_SERVER, CONNECT_TIMES, CONN_RATE = (measure.ACCEPT_PORT, measure.ACCEPT_SERVER,
                                                   measure.CONNECT_TIMES, measure.CONN_RATE)


def build_parser():
    p = experiment_script.parser(__doc__.strip().splitlines()[0])
    p.add_argument("--modes", default=None,
                   help="comma-separated kube-proxy modes (default: userspace, iptables, nftables, ipvs: "
                        "those this machine can run)")
    p.add_argument("--duration", type=int, default=5, help="seconds per iperf3 run (default %(default)s)")
    p.add_argument("--rtt-seconds", type=int, default=3, help="seconds per sockperf run (default %(default)s)")
    p.add_argument("--connections", type=int, default=1000,
                   help="connections per set-up rate measurement (default %(default)s)")
    p.add_argument("--probes", type=int, default=1000,
                   help="fresh connections per first-packet measurement (default %(default)s)")
    p.add_argument("--sizes", default="100,1000,5000", help="Service counts for scaling (default %(default)s)")
    p.add_argument("--nft-max", type=int, default=30000,
                   help="the extra size measured in nftables mode only (0: none; default %(default)s)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the mode order shuffled per round and the bootstrap (default: a new one, printed)")
    return p


# ---------------------------------------------------------------------------------- set-up
def experiment_spec(base, mode: str):
    """The cluster file's underlay and nodes, our two pods, no other Service, no DNS, and no
    periodic resync during the measurements."""
    if len(base.nodes) < 2:
        raise SpecError(f"{base.source}: the experiment needs at least two nodes")
    n1, n2 = base.nodes[0].name, base.nodes[1].name
    pod = lambda name, node, labels: manifests.parse_workload(   # noqa: E731
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels},
         "spec": {"nodeName": node, "containers": [{"name": "c", "command": ["sleep", "infinity"]}]}},
        f"{NAME}: pod {name}")
    kp = {**base.kube_proxy, "mode": "iptables" if mode == LEGACY else mode, "syncPeriod": 3600, "dns": False,
          "iptablesBackend": "legacy" if mode == LEGACY else "nft"}
    return dataclasses.replace(base, workloads=(pod(CLIENT, n1, {"app": CLIENT}), pod(SERVER, n2, SERVER_LABELS)),
                               services=(), kube_proxy=kp)


def service_manifest(name: str, ports: list[tuple[str, int]]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
            "spec": {"selector": dict(SERVER_LABELS),
                     "ports": [{"name": n, "port": p, "targetPort": p} for n, p in ports]}}


def add_services_in_bulk(addon, docs: list[dict[str, Any]]) -> None:
    """Create many Services with one sync instead of one per Service.

    ``add_service`` re-syncs every node after each Service (as kube-proxy follows the API
    server event by event); for thousands of dummies that is quadratic. Until the add-on has a
    batch call, this takes the path ``add_service`` takes (parse, allocate, record) for each
    Service and then builds and pushes one snapshot."""
    bulk = getattr(addon, "add_services", None)
    if callable(bulk):
        bulk(docs)
        return
    with addon._lock:
        for doc in docs:
            where = f"Service {doc['metadata']['name']}"
            svc = addon.allocator.allocate(parse_service(doc, where), where)
            addon._services[svc.key] = svc
        addon._changed(strict=True)


class Bench:
    """The cluster, the pod pair, the probe Service, and the measurements on them."""

    def __init__(self, cluster: Cluster, args):
        self.c, self.args = cluster, args
        self.addon = cluster.services
        self.client, self.server = cluster.pods[CLIENT], cluster.pods[SERVER]
        self.node = cluster.nodes[self.client.node_name]
        svc = self.addon.add_service(service_manifest(PROBE, [("iperf", IPERF_PORT), ("sockperf", SOCKPERF_PORT),
                                                               ("conn", ACCEPT_PORT)]))
        self.vip = svc.cluster_ip
        self.daemons = [self.server.popen_ns([sys.executable, "-c", ACCEPT_SERVER], what="accept server"),
                        self.server.popen_ns(["sockperf", "server", "--tcp", "-i", "0.0.0.0",
                                              "-p", str(SOCKPERF_PORT)], what="sockperf server")]
        for port in (ACCEPT_PORT, SOCKPERF_PORT):
            proc.wait_listening(self.server.pid, port, 10, SERVER)
        self.dummies = 0

    def close(self) -> None:
        proc.end_children(self.daemons, grace=3)

    @property
    def mode(self) -> str:
        return self.addon.options.mode

    def use(self, mode: str) -> None:
        """``iptables-legacy`` is the iptables mode on the iptables-legacy binaries."""
        real, backend = ("iptables", "legacy") if mode == LEGACY else (mode, "nft")
        if (self.mode, self.addon.options.iptables_backend) != (real, backend):
            self.addon.options.iptables_backend = backend
            self.addon.set_mode(real)

    def dst(self, path: str) -> str:
        return self.vip if path == "cluster-ip" else self.server.ip

    # -- per-path measurements ---------------------------------------------------------------
    def rtt(self, path: str) -> dict[str, float]:
        secs = self.args.rtt_seconds
        r = self.client.run(["sockperf", "ping-pong", "--tcp", "-i", self.dst(path), "-p", str(SOCKPERF_PORT),
                             "-t", str(secs), "--full-rtt"], timeout=secs + 30)
        return parse_sockperf(r.stdout + r.stderr)

    def throughput(self, path: str, baseline_rate: float) -> list[tuple[str, float, str]]:
        """iperf3 with its golden signals (k8snetlab.framework.tcp_signals)."""
        got, _steal = framework.tcp_signals(self.client.netns, self.server.netns, self.server.ip,
                                            self.args.duration, omit_s=1.0, connect_ip=self.dst(path),
                                            baseline_rate=baseline_rate, port=IPERF_PORT)
        return got

    def conn_rate(self, path: str) -> float:
        n = self.args.connections
        out = self.client.run([sys.executable, "-c", CONN_RATE, self.dst(path), str(ACCEPT_PORT), str(n)],
                              timeout=n * 2 + 30).stdout.split()
        ok, elapsed = int(out[0]), float(out[1])
        if ok != n:
            raise K8sNetLabError(f"connection rate: {ok} of {n} connections answered")
        return n / elapsed

    # -- scaling ---------------------------------------------------------------------------------
    def grow_to(self, total: int) -> None:
        """Add dummy Services until the cluster has ``total`` Services (the probe included)."""
        want = total - 1 - self.dummies
        if want <= 0:
            return
        docs = [{"apiVersion": "v1", "kind": "Service", "metadata": {"name": f"dummy-{i:05d}"},
                 "spec": {"selector": dict(SERVER_LABELS), "ports": [{"port": 80, "targetPort": ACCEPT_PORT}]}}
                for i in range(self.dummies, self.dummies + want)]
        add_services_in_bulk(self.addon, docs)
        self.dummies += want

    def program_time(self) -> tuple[float, float, float]:
        """One sync on the first node from an empty node, the same sync again, and a sync
        after one change: a Service (a dummy when there is one) loses its endpoint, as when
        its only pod is deleted; its rules are put back afterwards, not timed."""
        p = self.addon.proxiers[self.node.name]
        snap = self.addon.snapshot()
        key = next((s.key for s in snap.services if s.name.startswith("dummy-")), f"default/{PROBE}")
        changed = Snapshot(snap.services, {**snap.endpoints, key: ()}, snap.version + 1)
        with self.addon._lock:           # no other sync meanwhile
            p.stop()
            p.start()
            t0 = time.perf_counter()
            p.sync(snap)
            first = time.perf_counter() - t0
            t0 = time.perf_counter()
            p.sync(snap)
            again = time.perf_counter() - t0
            t0 = time.perf_counter()
            p.sync(changed)
            change = time.perf_counter() - t0
            p.sync(snap)
        return first, again, change

    CHECK_SAMPLES = 50

    def check_times_us(self) -> list[float]:
        """The cost of the proxier's per-sync check that the node's rules are as it left them
        (``rules_changed``: a fingerprint of the ruleset), ``CHECK_SAMPLES`` times; empty
        for modes without one."""
        p = self.addon.proxiers[self.node.name]
        check = getattr(p, "rules_changed", None)
        if check is None:
            return []
        out = []
        with self.addon._lock:
            p.sync(self.addon.snapshot())
            for _ in range(self.CHECK_SAMPLES):
                t0 = time.perf_counter()
                if check():
                    log.warning("%s: the node's rules changed under the check", self.mode)
                out.append((time.perf_counter() - t0) * 1e6)
        return out

    def repair_time(self) -> float | None:
        """Flush the mode's tables by hand on the first node, then time the sync that notices
        and repairs it (a full sync); None for modes without the check."""
        p = self.addon.proxiers[self.node.name]
        if getattr(p, "rules_changed", None) is None:
            return None
        damage = (["nft", "flush", "table", "ip", "kube-proxy"] if self.mode == "nftables"
                  else [getattr(p, "iptables", "iptables"), "-t", "nat", "-F"])
        with self.addon._lock:
            self.node.run(damage)
            t0 = time.perf_counter()
            p.sync(self.addon.snapshot())
            took = time.perf_counter() - t0
            if p.rules_changed():
                raise K8sNetLabError(f"{self.mode}: the sync after the flush left the rules unlike its own")
        return took

    def connect_times_us(self) -> list[float]:
        n = self.args.probes
        self.client.run([sys.executable, "-c", CONNECT_TIMES, self.vip, str(ACCEPT_PORT), "20"])   # warm-up
        out = self.client.run([sys.executable, "-c", CONNECT_TIMES, self.vip, str(ACCEPT_PORT), str(n)],
                              timeout=n * 2 + 30).stdout
        return [ns / 1000 for ns in json.loads(out)]

    def worst_placed(self) -> str:
        """Where the probe sits in the first node's rules: 'last' when its ClusterIP is the
        last one the first packet is matched against, 'map' for a lookup (nftables)."""
        chain = {"iptables": "KUBE-SERVICES", "userspace": "KUBE-PORTALS-CONTAINER"}.get(self.mode)
        if chain is None:
            return "map"
        saved = self.node.run([f"iptables-{self.addon.options.iptables_backend}-save", "-t", "nat"]).stdout
        rules = [line.split() for line in saved.splitlines() if line.startswith(f"-A {chain} -d ")]
        if not rules:
            return "none"
        last = rules[-1]
        return "last" if last[3] == f"{self.vip}/32" and str(ACCEPT_PORT) in last else f"not last ({last[3]})"


def parse_sockperf(text: str) -> dict[str, float]:
    """sockperf's ping-pong report -> RTT min/p50/p90/p99 in ms (it prints microseconds)."""
    import re
    out: dict[str, float] = {}
    for key, pattern in (("rtt_min", r"<MIN> observation =\s*([\d.]+)"),
                         ("rtt_p50", r"percentile 50\.000 =\s*([\d.]+)"),
                         ("rtt_p90", r"percentile 90\.000 =\s*([\d.]+)"),
                         ("rtt_p99", r"percentile 99\.000 =\s*([\d.]+)")):
        m = re.search(pattern, text)
        if m is None:
            last = text.strip().splitlines()[-1:] or ["<empty>"]
            raise measure.MeasureError(f"sockperf output lacks {key} (last line: {last[0]!r})")
        out[key] = float(m.group(1)) / 1000
    return out


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    k = (len(s) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


# ---------------------------------------------------------------------------------- the run
def run(args) -> int:
    if args.quick:
        args.repeat, args.duration, args.rtt_seconds = 1, 1, 2
        args.connections, args.probes = min(args.connections, 300), min(args.probes, 300)
        args.sizes, args.nft_max = "100,1000", 0
    try:
        sizes = sorted({int(x) for x in args.sizes.split(",") if x.strip()})
    except ValueError:
        raise SpecError(f"--sizes: {args.sizes!r} is not a comma-separated list of numbers") from None
    if any(n < 2 for n in sizes):
        raise SpecError("--sizes: every size must be at least 2 (the probe Service plus dummies)")
    for opt in ("duration", "rtt_seconds", "connections", "probes"):
        if getattr(args, opt) < 1:
            raise SpecError(f"--{opt.replace('_', '-')}: must be at least 1")
    can = [m for m in available_modes() if m in NODE_MODES]
    if "iptables" in can and shutil.which("iptables-legacy-restore"):
        can.insert(can.index("iptables") + 1, LEGACY)
    modes = [m.strip() for m in args.modes.split(",")] if args.modes else can
    bad = [m for m in modes if m not in can]
    if bad or not modes:
        raise SpecError(f"--modes: {', '.join(bad) or '(none)'} cannot be compared here: use some of "
                        f"{', '.join(can) or '(none: no kube-proxy mode can run on this machine)'}")
    base = experiment_script.load_topology(args)
    cspec = experiment_spec(base, modes[0])
    proc.require_root(NAME)
    proc.require("iperf3", "sockperf")

    out_dir, run_id, csv_path = experiment_script.output(args, NAME)
    kernel = results.kernel_release()
    args.seed = args.seed if getattr(args, "seed", None) is not None else secrets.randbelow(2 ** 31)
    machine_start = hoststat.machine()
    print(f"{NAME}: run {run_id}, seed {args.seed} (--seed {args.seed} repeats this order)", file=sys.stderr)
    scale_steps = [(n, modes) for n in [1, *sizes]]
    if args.nft_max and "nftables" in modes and args.nft_max > sizes[-1]:
        scale_steps.append((args.nft_max, ["nftables"]))
    progress = experiment_script.Progress(args.repeat * len(modes) * 3 + sum(len(ms) for _, ms in scale_steps))

    with results.CsvWriter(csv_path) as csv:
        meta: dict[str, Any] = {"topology": base.name, "cni": cspec.cni.type, "mtu": None}

        def row(mode: str, scenario: str, rnd: int, metric: str, value: float, unit: str,
                src: str = CLIENT, dst: str = "", load1: float | None = None, pin: str | None = None) -> None:
            csv.write(results.Row(run_id=run_id, timestamp=results.utc_timestamp(), experiment=NAME,
                                  topology=meta["topology"], mode=mode, datapath=meta["cni"], scenario=scenario,
                                  src=src, dst=dst, round=rnd, metric=metric, value=value, unit=unit,
                                  mtu=meta["mtu"], kernel=kernel, load1=load1, pin=pin))

        t0 = time.monotonic()
        with Cluster(cspec) as c:
            row("all", "lifecycle", 0, "cluster_up", time.monotonic() - t0, "s", src="", dst="")
            meta["mtu"] = c.mode.mtu
            bench = Bench(c, args)
            try:
                measure_paths(bench, modes, args, progress, row)
                measure_scaling(bench, scale_steps, progress, row)
            finally:
                bench.close()
            t1 = time.monotonic()
        row("all", "lifecycle", 0, "cluster_down", time.monotonic() - t1, "s", src="", dst="")
        row("all", "lifecycle", 0, "runtime_peak_rss", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "MB", src="", dst="")

    rows = results.read_rows(csv_path)
    text = summary(rows, modes, args.seed)
    print(text)
    how = (f"Seed {args.seed}. One cluster; per round every kube-proxy mode once, in an order shuffled per "
           "round, each measuring the pod IP and the ClusterIP in a shuffled order; then the scaling steps.")
    summary_path, md = framework.write_outputs(describe(modes), csv_path, run_id, text, None, args.seed, how,
                                               machine_start)
    print(f"\nCSV: {csv_path}\nsummary CSV: {summary_path}\nreport: {md}")
    for png in (results.plot(rows, csv_path.with_suffix(".png"), metrics=("tcp_throughput", "rtt_p50", "conn_rate"),
                             modes=modes, title="kube-proxy modes: straight to the pod IP vs through the ClusterIP"),
                results.plot(rows, out_dir / f"{NAME}-{run_id}-scaling.png",
                             metrics=("program_time", "first_packet_added"), modes=modes,
                             skip_scenarios=("lifecycle", "pod-ip", "cluster-ip"),
                             title="kube-proxy modes: Services on a node")):
        if png:
            print(f"plot: {png}")
    return 0


def measure_paths(bench: Bench, modes: list[str], args, progress, row: Callable) -> None:
    rng = random.Random(getattr(args, "seed", None))
    pin = framework.pin_label(getattr(args, "placement", None) or measure.current_placement())
    for rnd in range(1, args.repeat + 1):
        order = list(modes)
        rng.shuffle(order)                # no mode is always first (or right after the same one)
        for mode in order:
            bench.use(mode)
            paths = ["pod-ip", "cluster-ip"]
            rng.shuffle(paths)
            progress.step(f"round {rnd} {mode}: RTT")
            for path in paths:
                for metric, value in bench.rtt(path).items():
                    row(mode, path, rnd, metric, value, "ms", dst=SERVER if path == "pod-ip" else PROBE)
            progress.step(f"round {rnd} {mode}: TCP throughput")
            baseline = framework.quiet_busy_rate()
            for path in paths:
                dst = SERVER if path == "pod-ip" else PROBE
                load1 = hoststat.loadavg()
                for metric, value, unit in bench.throughput(path, baseline):
                    row(mode, path, rnd, metric, value, unit, dst=dst, load1=load1, pin=pin)
            progress.step(f"round {rnd} {mode}: connection rate")
            for path in paths:
                row(mode, path, rnd, "conn_rate", bench.conn_rate(path), "conn/s",
                    dst=SERVER if path == "pod-ip" else PROBE)


def measure_scaling(bench: Bench, steps: list[tuple[int, list[str]]], progress, row: Callable) -> None:
    baseline: dict[str, list[float]] = {}
    for total, modes in steps:
        # the mode in use first: growing is synced once in that mode, then each other mode
        ordered = sorted(modes, key=lambda m: m != bench.mode)
        if bench.mode not in modes:
            bench.use(ordered[0])
        bench.grow_to(total)
        scenario = f"services-{total}"
        for mode in ordered:
            progress.step(f"{total} Services: {mode}")
            bench.use(mode)
            first, again, change = bench.program_time()
            where = bench.worst_placed()
            if where not in ("last", "map"):
                log.warning("%s, %d Services: the probe is %s in the rules", mode, total, where)
            times = bench.connect_times_us()
            p50 = statistics.median(times)
            if total == 1:
                baseline[mode] = times
            row(mode, scenario, 0, "services", total, "count", dst=PROBE)
            row(mode, scenario, 0, "program_time", first, "s", src=bench.node.name, dst="")
            row(mode, scenario, 0, "resync_time", again, "s", src=bench.node.name, dst="")
            row(mode, scenario, 0, "change_time", change, "s", src=bench.node.name, dst="")
            for i, t in enumerate(bench.check_times_us(), 1):
                row(mode, scenario, i, "check_time", t, "us", src=bench.node.name, dst="")
            repair = bench.repair_time()
            if repair is not None:
                row(mode, scenario, 0, "repair_time", repair, "s", src=bench.node.name, dst="")
            row(mode, scenario, 0, "connect_p50", p50, "us", dst=PROBE)
            row(mode, scenario, 0, "connect_p90", pct(times, 90), "us", dst=PROBE)
            if mode in baseline:
                # a difference of two medians: its interval by bootstrap over the connect times
                d = stats.median_difference(times, baseline[mode])
                row(mode, scenario, 0, "first_packet_added", d.mean, "us", dst=PROBE)
                row(mode, scenario, 0, "first_packet_added_ci_low", d.ci_low, "us", dst=PROBE)
                row(mode, scenario, 0, "first_packet_added_ci_high", d.ci_high, "us", dst=PROBE)


# ---------------------------------------------------------------------------------- summary
def path_targets(mode: str) -> list[Target]:
    """ClusterIP against the pod IP it forwards to, paired by round. A ClusterIP faster than
    its own backend (beyond the interval) is impossible: flagged as noise."""
    return [Target(f"{mode}: ClusterIP throughput >= 0.9 x pod IP (ratio)", "ratio", mode, mode, "cluster-ip",
                   den_scenario="pod-ip", low=0.9, possible=(None, 1.0)),
            Target(f"{mode}: ClusterIP RTT p50 <= 1.1 x pod IP (ratio)", "ratio", mode, mode, "cluster-ip",
                   metric="rtt_p50", den_scenario="pod-ip", high=1.1, possible=(1.0, None))]


def value_line(rows: list[results.Row], what: str, mode: str, scenario: str, metric: str, high: float) -> str:
    """A one-off figure against an upper bound; first_packet_added carries its bootstrap
    interval (rows ..._ci_low/_ci_high), a timing of one sync is one sample."""
    got = {r.metric: r.value for r in rows if r.mode == mode and r.scenario == scenario}
    if metric not in got:
        return f"  {'n/a':<13} {what}: not measured in this run"
    value = got[metric]
    lo, hi = got.get(f"{metric}_ci_low"), got.get(f"{metric}_ci_high")
    if lo is None or hi is None:
        return f"  {'met' if value <= high else 'MISSED':<13} {what}: {value:.3g} (one sample, no interval)"
    shown = stats.fmt_ci(value, lo, hi)
    if metric == "first_packet_added" and stats.impossible(lo, hi, low=0):
        return f"  {'noise':<13} {what}: {shown}: a Service cannot make the first packet faster; disturbed, not a finding"
    return f"  {stats.verdict(lo, hi, high=high):<13} {what}: {shown}"


def describe(modes: list[str]) -> framework.Experiment:
    """This experiment as the framework sees it (summary CSV: ClusterIP / pod IP per mode)."""
    exp = framework.Experiment()
    exp.name, exp.description = NAME, __doc__.strip().splitlines()[0]
    exp.variants = tuple(framework.Variant(m, "") for m in modes)
    exp.comparisons = tuple(framework.Comparison(m, m, "cluster-ip", metric=metric, den_scenario="pod-ip")
                            for m in modes for metric in ("tcp_throughput", "rtt_p50", "conn_rate"))
    return exp


def summary(rows: list[results.Row], modes: list[str], seed: int = 1) -> str:
    med: dict[tuple[str, str, str], float] = {}
    groups: dict[tuple[str, str, str], list[float]] = {}
    for r in rows:
        groups.setdefault((r.mode, r.scenario, r.metric), []).append(r.value)
    for k, v in groups.items():
        med[k] = results.median(v)
    lines = ["Per mode, mean [95 % interval] over rounds: straight to the pod IP vs through the ClusterIP; "
             "the ratio paired by round"]
    table = []
    for mode in modes:
        for metric, unit in (("rtt_p50", "ms"), ("rtt_p99", "ms"), ("tcp_throughput", "Gbit/s"),
                             ("cpu_per_gbit", "s/Gbit"), ("conn_rate", "conn/s")):
            cells = []
            for path in ("pod-ip", "cluster-ip"):
                vals = groups.get((mode, path, metric))
                s = stats.describe(vals) if vals else None
                cells.append("-" if s is None else stats.fmt_ci(s.mean, s.ci_low, s.ci_high) if s.n > 1
                             else f"{s.mean:.4g}")
            a, b = framework.paired(rows, mode, mode, "cluster-ip", metric, "pod-ip")
            rt = stats.paired_ratio(a, b) if a and sum(b) else None
            table.append([mode, metric, unit, *cells,
                          "-" if rt is None else stats.fmt_ratio(rt) if rt.n > 1 else f"{rt.value:.3g}"])
    lines.append(results.format_table(["mode", "metric", "unit", "pod-ip", "cluster-ip", "cluster-ip/pod-ip"], table))
    sizes = sorted({int(r.value) for r in rows if r.metric == "services"})
    lines.append("\nServices on the first node (one sync from an empty node; connect time to the last-placed Service)")
    table = []
    for mode in modes:
        for n in sizes:
            sc = f"services-{n}"
            if (mode, sc, "program_time") in med:
                table.append([mode, n, med[(mode, sc, "program_time")], med[(mode, sc, "resync_time")],
                              med.get((mode, sc, "change_time")), med[(mode, sc, "connect_p50")],
                              med.get((mode, sc, "first_packet_added"))])
    lines.append(results.format_table(["mode", "services", "program s", "resync s", "change s",
                                       "connect p50 us", "added us"], table))
    table = []
    for mode in modes:
        for n in sizes:
            samples = groups.get((mode, f"services-{n}", "check_time"))
            if samples:
                table.append([mode, n, len(samples), pct(samples, 10), results.median(samples), pct(samples, 90),
                              med.get((mode, f"services-{n}", "repair_time"))])
    if table:
        lines.append("\nThe per-sync check that the node's rules are as the proxier left them, and the full "
                     "sync after 'iptables -t nat -F' / 'nft flush table'")
        lines.append(results.format_table(["mode", "services", "samples", "check p10 us", "check p50 us",
                                           "check p90 us", "repair s"], table))
    lines.append("\nTargets (met: the whole 95 % interval on the right side; MISSED: all of it on the wrong side; "
                 "inconclusive: it crosses the target; noise: physically impossible):")
    for mode in modes:
        for t in path_targets(mode):
            lines.append(framework.target_line(rows, t, seed=seed))
    for what, mode, size, metric, high in (
            ("iptables, 5,000 Services: first packet <= +120 us (us)", "iptables", 5000, "first_packet_added", 120),
            ("nftables, 30,000 Services: first packet <= +5 us (us)", "nftables", 30000, "first_packet_added", 5),
            ("iptables: programming 5,000 Services <= 0.5 s (s)", "iptables", 5000, "program_time", 0.5),
            ("iptables-legacy: programming 5,000 Services <= 0.5 s (s)", LEGACY, 5000, "program_time", 0.5),
            ("iptables-legacy, 5,000 Services: first packet <= +120 us (us)", LEGACY, 5000, "first_packet_added", 120),
            ("nftables: programming 5,000 Services <= 0.25 s (s)", "nftables", 5000, "program_time", 0.25)):
        lines.append(value_line(rows, what, mode, f"services-{size}", metric, high))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(experiment_script.main(run, build_parser()))
