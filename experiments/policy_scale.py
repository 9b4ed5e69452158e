#!/usr/bin/env python3
"""The cost of NetworkPolicy: first packet, connection rate, throughput and sync time per dataplane.

One cluster from the cluster file's first two nodes (its own workloads left out): a client pod on
the first node, a server pod on the second (label ``app: ps-server``, an accept server on 7000).
For each size in ``--sizes`` (default 0, 10, 100, 1,000 policies) and each dataplane (iptables:
felix's chains + ipsets; nftables: sets + verdict maps), switched on the same cluster, interleaved
round by round: N NetworkPolicies all select the server and each allows ingress from one pod label
(``peer: p<i>``); the last one allows the client (``role: ps-client``), so the client's first packet
walks every policy: the worst place. With 0 policies the server is not isolated (no rules on its path).

Per (dataplane, size, round), on the server's node or between the pods:

- ``connect_p50`` / ``connect_p90`` (us): TCP connect time of ``--probes`` fresh connections
  (the first packet is the one policy is evaluated for; replies pass by conntrack), and
  ``first_packet_added``: connect_p50 minus the same dataplane's connect_p50 with 0 policies
  in the same round;
- ``conn_rate`` (connections/s): ``--connections`` sequential connect / 1-byte answer / close;
- ``tcp_throughput`` (Gbit/s): iperf3, one stream, ``--duration`` s;
- ``sync_full`` (s): one full sync of the server's node (iptables-restore + ipset restore, or
  one nft -f); ``sync_partial`` (s): the sync after the client's label is removed (one set
  element on the node changes), taken again when it is put back;
- ``rules`` / ``set_elements``: what the server's node holds.

The summary prints the issue's targets with 95 % intervals (k8snetlab.stats: a bootstrap of the
median difference over the probes pooled across rounds; Student's t for the partial syncs):
at 1,000 policies nftables adds <= 10 us to the first packet, iptables+ipsets
<= 100 us; one partial sync <= 0.2 s.

    sudo python experiments/policy_scale.py [--quick] [--repeat N] [--sizes 0,10,100,1000]
"""

from __future__ import annotations

import dataclasses
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from k8snetlab import experiment, measure, proc, results, stats  # noqa: E402
from k8snetlab.cluster import Cluster  # noqa: E402
from k8snetlab.errors import K8sNetLabError, SpecError  # noqa: E402
from k8snetlab.policy.dataplane import DATAPLANES, summary as dp_summary  # noqa: E402

log = logging.getLogger("policy_scale")

NAME = "policy_scale"
CLIENT, SERVER = "ps-client", "ps-server"
IPERF_PORT = 5201
ACCEPT_PORT, ACCEPT_SERVER, CONNECT_TIMES, CONN_RATE = (measure.ACCEPT_PORT, measure.ACCEPT_SERVER,
                                                   measure.CONNECT_TIMES, measure.CONN_RATE)
TARGETS = {"nftables": 10.0, "iptables": 100.0, "iptables-legacy": 100.0}   # us added to the first packet at 1,000 policies
PARTIAL_TARGET = 0.2                                 # s

def build_parser():
    p = experiment.parser(__doc__.strip().splitlines()[0], default_repeat=3)
    p.add_argument("--dataplanes", default="iptables,nftables", help="comma-separated (default %(default)s)")
    p.add_argument("--sizes", default="0,10,100,1000", help="policy counts (default %(default)s)")
    p.add_argument("--probes", type=int, default=500, help="fresh connections per first-packet figure")
    p.add_argument("--connections", type=int, default=500, help="connections per rate figure")
    p.add_argument("--duration", type=int, default=3, help="seconds per iperf3 run")
    return p


def experiment_spec(base):
    if len(base.nodes) < 2:
        raise SpecError(f"{base.source}: the experiment needs at least two nodes")
    n1, n2 = base.nodes[0].name, base.nodes[1].name
    pod = lambda name, node, labels, cmd: {  # noqa: E731
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels},
        "spec": {"nodeName": node, "containers": [{"name": "c", "command": cmd}]}}
    from k8snetlab import spec as specmod
    raw = {"name": "policy-scale", "underlay": {"subnets": [{"name": s.name, "cidr": str(s.cidr)} for s in base.underlay.subnets]},
           "nodes": [{"name": n.name, "ip": str(n.ip), "subnet": n.subnet} for n in base.nodes[:2]],
           "cni": {"type": "host-gw" if len({n.subnet for n in base.nodes[:2]}) == 1 else "vxlan"},
           "networkPolicy": {"dataplane": "iptables", "resyncPeriod": 3600},
           "workloads": [pod(CLIENT, n1, {"role": CLIENT}, ["sleep", "infinity"]),
                         pod(SERVER, n2, {"app": SERVER}, [sys.executable, "-c", ACCEPT_SERVER])]}
    if base.underlay.routers:
        raise SpecError(f"{base.source}: use a flat topology (one subnet), e.g. topologies/three_nodes.yaml")
    return specmod.from_dict(raw, base.source)


def policies(n: int) -> list[dict[str, Any]]:
    out = []
    for i in range(n):
        peer = {"role": CLIENT} if i == n - 1 else {"peer": f"p{i}"}
        out.append({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                    "metadata": {"name": f"ps-{i:05d}"},
                    "spec": {"podSelector": {"matchLabels": {"app": SERVER}},
                             "ingress": [{"from": [{"podSelector": {"matchLabels": peer}}],
                                          "ports": [{"port": ACCEPT_PORT}, {"port": IPERF_PORT}]}]}})
    return out


class Bench:
    def __init__(self, c: Cluster, args):
        self.c, self.args = c, args
        self.client, self.server = c.pods[CLIENT], c.pods[SERVER]
        self.node = c.nodes[self.server.node_name]
        deadline = time.monotonic() + 10
        while not proc.listening(self.server.pid, ACCEPT_PORT):
            if time.monotonic() > deadline:
                raise K8sNetLabError(f"{SERVER}: nothing listens on {ACCEPT_PORT}")
            time.sleep(0.02)

    def set_size(self, n: int) -> None:
        pol = self.c.policies
        have = sorted(pol.policies)
        if have:
            pol.delete(*have)
        if n:
            pol.add_all(policies(n))

    def connect_us(self) -> list[float]:
        ip = self.server.ip
        self.client.run([sys.executable, "-c", CONNECT_TIMES, ip, str(ACCEPT_PORT), "20"])
        out = self.client.run([sys.executable, "-c", CONNECT_TIMES, ip, str(ACCEPT_PORT), str(self.args.probes)],
                              timeout=self.args.probes * 2 + 30).stdout
        return [ns / 1000 for ns in json.loads(out)]

    def conn_rate(self) -> float:
        n = self.args.connections
        out = self.client.run([sys.executable, "-c", CONN_RATE, self.server.ip, str(ACCEPT_PORT), str(n)],
                              timeout=n * 2 + 30).stdout.split()
        if int(out[0]) != n:
            raise K8sNetLabError(f"connection rate: {out[0]} of {n} connections answered")
        return n / float(out[1])

    def throughput(self) -> float:
        return measure.iperf3(self.client.netns, self.server.netns, self.server.ip,
                              duration_s=self.args.duration, port=IPERF_PORT).gbit_s

    def syncs(self) -> tuple[float, float]:
        """(full sync of the server's node, the mean of two partial syncs: label off, label on)."""
        pol = self.c.policies
        agent = pol.agents[self.node.name]
        with pol._lock:
            plan = pol.plans()[self.node.name]
            t0 = time.perf_counter()
            agent.sync(plan, full=True)
            full = time.perf_counter() - t0
        parts = []
        for labels in ({"role": None}, {"role": CLIENT}):
            self.c.label_pod(CLIENT, labels)
            parts.append(pol.last_sync[self.node.name].seconds)
        return full, statistics.mean(parts)


def run(args) -> int:
    if args.quick:
        args.repeat, args.duration, args.probes, args.connections = 1, 1, 200, 200
        args.sizes = "0,10,100"
    try:
        sizes = sorted({int(x) for x in args.sizes.split(",") if x.strip()})
    except ValueError:
        raise SpecError(f"--sizes: {args.sizes!r} is not a comma-separated list of numbers") from None
    if not sizes or sizes[0] < 0:
        raise SpecError("--sizes: give policy counts >= 0, e.g. 0,10,100,1000")
    dataplanes = [d.strip() for d in args.dataplanes.split(",") if d.strip()]
    for d in dataplanes:
        try:
            DATAPLANES.get(d)
        except SpecError as e:
            raise SpecError(f"--dataplanes: {e}") from None
    for opt in ("probes", "connections", "duration"):
        if getattr(args, opt) < 1:
            raise SpecError(f"--{opt}: must be at least 1")
    cspec = experiment_spec(experiment.load_topology(args))
    proc.require_root(NAME)
    proc.require("iperf3", "ipset", "nft")
    out_dir, run_id, csv_path = experiment.output(args, NAME)
    kernel = results.kernel_release()
    progress = experiment.Progress(args.repeat * len(sizes) * len(dataplanes))
    samples: dict[tuple[str, int], list[float]] = {}
    partial: dict[str, list[float]] = {}

    with results.CsvWriter(csv_path) as csv:
        def row(dp: str, size: int, rnd: int, metric: str, value: float, unit: str) -> None:
            csv.write(results.Row(run_id=run_id, timestamp=results.utc_timestamp(), experiment=NAME,
                                  topology=cspec.name, mode=dp, datapath=cspec.cni.type,
                                  scenario=f"policies-{size}", src=CLIENT, dst=SERVER, round=rnd,
                                  metric=metric, value=value, unit=unit, mtu=None, kernel=kernel))

        with Cluster(cspec) as c:
            bench = Bench(c, args)
            for rnd in range(1, args.repeat + 1):
                order = dataplanes if rnd % 2 else list(reversed(dataplanes))
                for dp in order:
                    if c.policies.options.dataplane != dp or not c.policies.agents:
                        c.policies.set_dataplane(dp)
                        if not c.policies.agents:
                            c.policies._start_agents()
                    base_p50 = None
                    for size in sizes:
                        bench.set_size(size)
                        us = bench.connect_us()
                        samples.setdefault((dp, size), []).extend(us)
                        p50 = statistics.median(us)
                        base_p50 = p50 if size == sizes[0] else base_p50
                        row(dp, size, rnd, "connect_p50", p50, "us")
                        row(dp, size, rnd, "connect_p90", statistics.quantiles(us, n=10)[-1], "us")
                        if base_p50 is not None and size != sizes[0]:
                            row(dp, size, rnd, "first_packet_added", p50 - base_p50, "us")
                        row(dp, size, rnd, "conn_rate", bench.conn_rate(), "conn/s")
                        row(dp, size, rnd, "tcp_throughput", bench.throughput(), "Gbit/s")
                        if size:
                            full, part = bench.syncs()
                            row(dp, size, rnd, "sync_full", full, "s")
                            row(dp, size, rnd, "sync_partial", part, "s")
                            if size == sizes[-1]:
                                partial.setdefault(dp, []).append(part)
                        st = dp_summary(c.policies.agents[bench.node.name].written)
                        row(dp, size, rnd, "rules", st["rules"], "count")
                        row(dp, size, rnd, "set_elements", st["set_elements"], "count")
                        progress.step(f"{dp} {size} policies, round {rnd}")
                    bench.set_size(0)

    rows = results.read_rows(csv_path)
    print(summary(rows, dataplanes, sizes, samples, partial))
    print(f"\nCSV: {csv_path}")
    png = results.plot(rows, csv_path.with_suffix(".png"), metrics=("first_packet_added", "conn_rate", "sync_partial"),
                       modes=dataplanes, title="NetworkPolicy: cost per dataplane and policy count")
    if png:
        print(f"plot: {png}")
    return 0


def summary(rows, dataplanes, sizes, samples, partial) -> str:
    lines = ["median per dataplane and policy count (all rounds):"]
    headers = ["dataplane", "policies", "connect_p50 us", "conn/s", "Gbit/s", "sync_full s", "sync_partial s",
               "rules", "set elements"]
    table = []
    for dp in dataplanes:
        for size in sizes:
            def med(metric: str) -> Any:
                vals = [r.value for r in rows if r.mode == dp and r.scenario == f"policies-{size}" and r.metric == metric]
                return statistics.median(vals) if vals else None
            table.append([dp, size, med("connect_p50"), med("conn_rate"), med("tcp_throughput"), med("sync_full"),
                          med("sync_partial"), med("rules"), med("set_elements")])
    lines.append(results.format_table(headers, table))
    top, base = sizes[-1], sizes[0]
    lines.append(f"\ntargets (95 % intervals), {top} vs {base} policies:")
    for dp in dataplanes:
        a, b = samples.get((dp, top)), samples.get((dp, base))
        if a and b and dp in TARGETS:
            d = stats.median_difference(a, b)
            v = stats.verdict(d.ci_low, d.ci_high, high=TARGETS[dp])
            lines.append(f"  {dp}: first packet +{stats.fmt_ci(d.mean, d.ci_low, d.ci_high)} us "
                         f"(target <= {TARGETS[dp]:.0f} us{'' if top == 1000 else ', defined at 1,000 policies'}): {v}")
        if partial.get(dp):
            p = stats.describe(partial[dp])
            v = stats.verdict(p.ci_low, p.ci_high, high=PARTIAL_TARGET)
            lines.append(f"  {dp}: partial sync {stats.fmt_ci(p.mean, p.ci_low, p.ci_high)} s (mean of {p.n}) at "
                         f"{top} policies (target <= {PARTIAL_TARGET} s): {v}")
    return "\n".join(lines)


def main(argv=None) -> int:
    return experiment.main(run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
