#!/usr/bin/env python3
"""The cost of NetworkPolicy: first packet, connection rate, throughput and sync time per dataplane.

One cluster from the cluster file's first two nodes (its own workloads left out): a client pod on
the first node, a server pod on the second (label ``app: ps-server``, an accept server on 7000)
and beside it a control pod that no policy selects (``app: ps-control``, the same server).
For each size in ``--sizes`` (default 0, 10, 100, 1,000 policies) and each dataplane (iptables:
felix's chains + ipsets; nftables: sets + verdict maps), switched on the same cluster, interleaved
round by round, N NetworkPolicies exist, each allowing ingress on 7000 and 5201 from one pod label.

The population (``policies_selecting`` in the CSV says how many select the server):

- ``spread`` (the targets' population): each policy selects a different set of pods
  (``app: ps-app-<j>``); ``--selecting`` of them (default 3) select the server, the last of these
  allows the client (``role: ps-client``). Policies that select no pod on a node cost that node
  nothing, as with felix (only the policies of its endpoints are programmed).
- ``worst`` (at the largest size, labelled so; ``--no-worst`` leaves it out): all N policies
  select the server, the client's is the last, so its first packet passes every policy.

With ``--large`` the server's node also runs ``--large`` pods (default 1,000; pod CIDRs of
/22), ``app: ps-app-<i>``, each selected by a spread policy: the 1,000-selected-pods run.

Per (dataplane, size, population, round), on the server's node or between the pods:

- ``first_packet_added`` (us): ``--probes`` fresh TCP connections to the server and as many
  to the control, interleaved one by one in ABBA order (microseconds apart, so the drift of a
  shared machine hits both alike); the median of the per-pair differences server - control
  (``path_difference``), minus the same with 0 policies in the same round (the two pods' own
  difference). ``connect_p50`` / ``connect_p50_control`` are the medians;
- ``rules_walked`` / ``set_lookups``: the rules the client's first packet (a SYN to 7000)
  is evaluated against on both nodes' policy rules, and the set/map lookups among them, from
  what the agents wrote (:mod:`k8snetlab.policy.walk`): the load-independent figure
  (``rules_walked_control``: the same to the control); ``walk_checked`` (iptables): the server
  node's rule counters for one new connection agree with that walk;
- ``conn_rate`` (connections/s), ``tcp_throughput`` (Gbit/s, iperf3);
- ``sync_full`` (s): one full sync of the server's node; ``sync_partial`` (s): the node's sync
  after the client's label is removed / put back (one set element), ``--partials`` times;
  ``sync_partial_total`` (s): the whole ``label_pod`` call (model, every node's plan and sync);
- ``rules`` / ``set_elements``: what the server's node holds.

The summary prints the issue's targets with 95 % intervals (bootstraps of the medians over the
probes pooled across rounds), for the spread
population: at 1,000 policies nftables adds <= 10 us to the first packet, iptables+ipsets
<= 100 us; one partial sync <= 0.2 s. An interval wholly below 0 (faster with policies than
without) is flagged as impossible, not reported as a finding.

    sudo python experiments/policy_scale.py [--quick] [--repeat N] [--sizes 0,10,100,1000] [--large]
"""

from __future__ import annotations

import json
import logging
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from k8snetlab import experiment_script, measure, proc, results, stats  # noqa: E402
from k8snetlab.cluster import Cluster  # noqa: E402
from k8snetlab.errors import K8sNetLabError, SpecError  # noqa: E402
from k8snetlab.policy import walk as walkmod  # noqa: E402
from k8snetlab.policy.dataplane import DATAPLANES, summary as dp_summary  # noqa: E402

log = logging.getLogger("policy_scale")

NAME = "policy_scale"
CLIENT, SERVER = "ps-client", "ps-server"
IPERF_PORT = 5201
ACCEPT_PORT, ACCEPT_SERVER, CONNECT_TIMES, CONN_RATE = (measure.ACCEPT_PORT, measure.ACCEPT_SERVER,
                                                   measure.CONNECT_TIMES, measure.CONN_RATE)
TARGETS = {"nftables": 10.0, "iptables": 100.0, "iptables-legacy": 100.0}   # us added to the first packet at 1,000 policies
PARTIAL_TARGET = 0.2                                 # s
APP = "ps-app"
LARGE_PODS = 1000
CONTROL = "ps-control"
BOOTSTRAP = 1000

# argv: ip_a ip_b port n. n rounds of one fresh connection to each address, A B then B A (the two
# measured microseconds apart): prints [[ns to a...], [ns to b...]]
CONNECT_PAIRS = ("import json, socket, struct, sys, time\n"
                 "a, b, port, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])\n"
                 "out = {a: [], b: []}\n"
                 "linger = struct.pack('ii', 1, 0)\n"
                 "for i in range(n):\n"
                 "    for ip in ((a, b) if i % 2 == 0 else (b, a)):\n"
                 "        s = socket.socket()\n"
                 "        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)\n"
                 "        s.settimeout(2)\n"
                 "        t0 = time.perf_counter_ns(); s.connect((ip, port)); out[ip].append(time.perf_counter_ns() - t0)\n"
                 "        s.close()\n"
                 "print(json.dumps([out[a], out[b]]))\n")


def build_parser():
    p = experiment_script.parser(__doc__.strip().splitlines()[0], default_repeat=3)
    p.add_argument("--dataplanes", default="iptables,nftables", help="comma-separated (default %(default)s)")
    p.add_argument("--sizes", default="0,10,100,1000", help="policy counts (default %(default)s)")
    p.add_argument("--selecting", type=int, default=3,
                   help="policies that select the server in the spread population (default %(default)s)")
    p.add_argument("--no-worst", action="store_true",
                   help="leave out the worst case (all policies select the server) at the largest size")
    p.add_argument("--large", type=int, nargs="?", const=LARGE_PODS, default=0, metavar="PODS",
                   help=f"the large run: PODS selected pods (default {LARGE_PODS}) on the server's node")
    p.add_argument("--probes", type=int, default=500, help="fresh connections per first-packet figure")
    p.add_argument("--partials", type=int, default=4, help="partial syncs per step (label off / on)")
    p.add_argument("--connections", type=int, default=500, help="connections per rate figure")
    p.add_argument("--duration", type=int, default=3, help="seconds per iperf3 run")
    return p


def experiment_spec(base, large: int = 0):
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
                         pod(SERVER, n2, {"app": SERVER}, [sys.executable, "-c", ACCEPT_SERVER]),
                         pod(CONTROL, n2, {"app": CONTROL}, [sys.executable, "-c", ACCEPT_SERVER])]}
    if large:
        # a /22 per node holds the large run's pods on the server's node
        raw["network"] = {"clusterCIDR": "10.244.0.0/16", "nodeCIDRMaskSize": 22, "serviceCIDR": "10.96.0.0/12"}
        raw["workloads"] += [pod(f"{APP}-{i:04d}", n2, {"app": f"{APP}-{i}"}, ["sleep", "infinity"])
                             for i in range(large)]
    if base.underlay.routers:
        raise SpecError(f"{base.source}: use a flat topology (one subnet), e.g. topologies/three_nodes.yaml")
    return specmod.from_dict(raw, base.source)


def policies(n: int, population: str = "spread", selecting: int = 3, apps: int = 0) -> list[dict[str, Any]]:
    """N policies. ``spread``: the first ``selecting`` select the server (the last of them allows
    the client), policy j of the others selects ``app: ps-app-<j mod apps>`` (one pod each in the
    large run; no pod otherwise). ``worst``: all select the server, the last allows the client."""
    k = n if population == "worst" else min(selecting, n)
    out = []
    for i in range(n):
        peer = {"role": CLIENT} if i == k - 1 else {"peer": f"p{i}"}
        j = i - k
        sel = {"app": SERVER} if i < k else {"app": f"{APP}-{j % apps if apps else j}"}
        out.append({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                    "metadata": {"name": f"ps-{i:05d}"},
                    "spec": {"podSelector": {"matchLabels": sel},
                             "ingress": [{"from": [{"podSelector": {"matchLabels": peer}}],
                                          "ports": [{"port": ACCEPT_PORT}, {"port": IPERF_PORT}]}]}})
    return out


class Bench:
    def __init__(self, c: Cluster, args):
        self.c, self.args = c, args
        self.client, self.server, self.control = c.pods[CLIENT], c.pods[SERVER], c.pods[CONTROL]
        self.node = c.nodes[self.server.node_name]
        self.current: tuple[int, str] | None = None
        deadline = time.monotonic() + 10
        for pod in (self.server, self.control):
            while not proc.listening(pod.pid, ACCEPT_PORT):
                if time.monotonic() > deadline:
                    raise K8sNetLabError(f"{pod.name}: nothing listens on {ACCEPT_PORT}")
                time.sleep(0.02)

    def set_size(self, n: int, population: str = "spread") -> None:
        if self.current == (n, population) or (n == 0 and self.current and self.current[0] == 0):
            return
        pol = self.c.policies
        have = sorted(pol.policies)
        if have:
            pol.delete(*have)
        if n:
            pol.add_all(policies(n, population, self.args.selecting, self.args.large))
        self.current = (n, population)

    def connect_pairs(self, probes: int) -> tuple[list[float], list[float]]:
        """(us to the server, us to the control): fresh connections interleaved one by one."""
        argv = [sys.executable, "-c", CONNECT_PAIRS, self.server.ip, self.control.ip, str(ACCEPT_PORT)]
        self.client.run([*argv, "10"])
        out = self.client.run([*argv, str(probes)], timeout=probes * 4 + 30).stdout
        a, b = json.loads(out)
        return [ns / 1000 for ns in a], [ns / 1000 for ns in b]

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

    def walk(self, dp: str, to: Any = None) -> tuple[int, int]:
        """(rules, lookups) of the client's SYN to the server (or ``to``) through both nodes'
        policy rules."""
        pkt = walkmod.Packet(self.client.ip, (to or self.server).ip, "tcp", ACCEPT_PORT)
        rules = lookups = 0
        for name in (self.client.node_name, self.server.node_name):
            written = self.c.policies.agents[name].written
            if written is not None:
                w = walkmod.walk(dp, written, pkt)
                if w.verdict == "drop":
                    raise K8sNetLabError(f"{name}: the rules written drop the client's first packet")
                rules, lookups = rules + w.rules, lookups + w.lookups
        return rules, lookups

    def walk_checked(self, dp: str) -> bool:
        """iptables: do the server node's rule counters for one new connection agree with the
        walk's path (each rule on it counted once, no other)? Other dataplanes: not checked."""
        if not dp.startswith("iptables"):
            return True
        agent = self.c.policies.agents[self.node.name]
        save = [agent.binary + "-save", "-c", "-t", "filter"]
        pkt = walkmod.Packet(self.client.ip, self.server.ip, "tcp", ACCEPT_PORT)
        w = walkmod.walk(dp, agent.written, pkt)
        before = walkmod.save_counters(self.node.run(save).stdout)
        self.client.run([sys.executable, "-c", CONNECT_TIMES, self.server.ip, str(ACCEPT_PORT), "1"])
        after = walkmod.save_counters(self.node.run(save).stdout)
        problems = walkmod.check_against_counters(w, before, after)
        if problems:
            log.warning("%s: the rule counters differ from the walk: %s", dp, "; ".join(problems[:5]))
        return not problems

    def selecting(self) -> int:
        model = self.c.policies.model()
        pod = next(p for p in model.pods if p.name == SERVER)
        return len(model.selecting(pod, "Ingress"))

    def syncs(self) -> tuple[float, list[float], list[float]]:
        """(full sync of the server's node, its partial syncs, the whole label_pod calls)."""
        pol = self.c.policies
        agent = pol.agents[self.node.name]
        with pol._lock:
            plan = pol.plans()[self.node.name]
            t0 = time.perf_counter()
            agent.sync(plan, full=True)
            full = time.perf_counter() - t0
        parts, totals = [], []
        for k in range(self.args.partials):
            t0 = time.perf_counter()
            self.c.label_pod(CLIENT, {"role": None} if k % 2 == 0 else {"role": CLIENT})
            totals.append(time.perf_counter() - t0)
            last = pol.last_sync[self.node.name]
            if last.full or (last.chains_written, last.elements_changed) == (0, 0):
                raise K8sNetLabError(f"the sync after a relabel was not a partial one: {last}")
            parts.append(last.seconds)
        if self.args.partials % 2:
            self.c.label_pod(CLIENT, {"role": CLIENT})
        return full, parts, totals


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
    if sizes[0] != 0:
        sizes.insert(0, 0)          # the baseline every figure is paired with
    dataplanes = [d.strip() for d in args.dataplanes.split(",") if d.strip()]
    for d in dataplanes:
        try:
            DATAPLANES.get(d)
        except SpecError as e:
            raise SpecError(f"--dataplanes: {e}") from None
    for opt in ("probes", "connections", "duration", "partials", "selecting"):
        if getattr(args, opt) < 1:
            raise SpecError(f"--{opt.replace('_', '-')}: must be at least 1")
    if args.large < 0:
        raise SpecError("--large: give a number of pods >= 1")
    cspec = experiment_spec(experiment_script.load_topology(args), args.large)
    proc.require_root(NAME)
    proc.require("iperf3", "ipset", "nft")
    steps = [(n, "spread") for n in sizes]
    if not args.no_worst and sizes[-1] > args.selecting:
        steps.append((sizes[-1], "worst"))
    out_dir, run_id, csv_path = experiment_script.output(args, NAME)
    kernel = results.kernel_release()
    progress = experiment_script.Progress(args.repeat * len(steps) * len(dataplanes))
    probes: dict[tuple[str, int, str], tuple[list[float], list[float]]] = {}
    partial: dict[str, list[float]] = {}

    with results.CsvWriter(csv_path) as csv:
        def row(dp: str, scenario: str, rnd: int, metric: str, value: float, unit: str) -> None:
            csv.write(results.Row(run_id=run_id, timestamp=results.utc_timestamp(), experiment=NAME,
                                  topology=cspec.name, mode=dp, datapath=cspec.cni.type,
                                  scenario=scenario, src=CLIENT, dst=SERVER, round=rnd,
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
                    for size, population in steps:
                        scen = scenario(size, population)
                        bench.set_size(size, population)
                        srv, ctl = bench.connect_pairs(args.probes)
                        got = probes.setdefault((dp, size, population), ([], []))
                        got[0].extend(srv)
                        got[1].extend(ctl)
                        diff = statistics.median(a - b for a, b in zip(srv, ctl))
                        row(dp, scen, rnd, "connect_p50", statistics.median(srv), "us")
                        row(dp, scen, rnd, "connect_p50_control", statistics.median(ctl), "us")
                        row(dp, scen, rnd, "path_difference", diff, "us")
                        if size == 0:
                            base_diff = diff
                        else:
                            row(dp, scen, rnd, "first_packet_added", diff - base_diff, "us")
                        row(dp, scen, rnd, "policies_selecting", bench.selecting() if size else 0, "count")
                        walked, lookups = bench.walk(dp)
                        row(dp, scen, rnd, "rules_walked", walked, "count")
                        row(dp, scen, rnd, "set_lookups", lookups, "count")
                        row(dp, scen, rnd, "rules_walked_control", bench.walk(dp, bench.control)[0], "count")
                        row(dp, scen, rnd, "walk_checked", float(bench.walk_checked(dp)), "bool")
                        row(dp, scen, rnd, "conn_rate", bench.conn_rate(), "conn/s")
                        row(dp, scen, rnd, "tcp_throughput", bench.throughput(), "Gbit/s")
                        if size:
                            full, parts, totals = bench.syncs()
                            row(dp, scen, rnd, "sync_full", full, "s")
                            for part, total in zip(parts, totals):
                                row(dp, scen, rnd, "sync_partial", part, "s")
                                row(dp, scen, rnd, "sync_partial_total", total, "s")
                            if size == sizes[-1] and population == "spread":
                                partial.setdefault(dp, []).extend(parts)
                        st = dp_summary(c.policies.agents[bench.node.name].written)
                        row(dp, scen, rnd, "rules", st["rules"], "count")
                        row(dp, scen, rnd, "set_elements", st["set_elements"], "count")
                        progress.step(f"{dp} {scen}, round {rnd}")
                    bench.set_size(0)

    rows = results.read_rows(csv_path)
    print(summary(rows, dataplanes, steps, probes, partial, args.large))
    print(f"\nCSV: {csv_path}")
    png = results.plot(rows, csv_path.with_suffix(".png"), metrics=("first_packet_added", "rules_walked", "sync_partial"),
                       modes=dataplanes, title="NetworkPolicy: cost per dataplane and policy count")
    if png:
        print(f"plot: {png}")
    return 0


def scenario(size: int, population: str) -> str:
    return f"policies-{size}" + ("-worst" if population == "worst" else "")


def added_interval(srv_n: list[float], ctl_n: list[float], srv_0: list[float], ctl_0: list[float],
                   seed: int = 1, samples: int = BOOTSTRAP) -> tuple[float, float, float]:
    """What N policies add to the server's first packet: the median of the per-pair differences
    (server - control, the two connections made one after the other) with N policies minus the
    same with 0, and a bootstrap 95 % interval (the pairs of each resampled)."""
    med = statistics.median
    d_n = [a - b for a, b in zip(srv_n, ctl_n)]
    d_0 = [a - b for a, b in zip(srv_0, ctl_0)]
    rng = random.Random(seed)
    boot = sorted(med(rng.choices(d_n, k=len(d_n))) - med(rng.choices(d_0, k=len(d_0))) for _ in range(samples))
    return med(d_n) - med(d_0), boot[int(0.025 * samples)], boot[int(0.975 * samples) - 1]


def first_packet_line(dp: str, size: int, population: str, value: float, low: float, high: float, n: int) -> str:
    """The target line: the figure with its interval, the verdict, and a flag when the interval
    lies wholly below 0 (policies cannot make a packet faster: a wrong baseline or noise)."""
    text = f"{dp}: first packet {stats.fmt_ci(value, low, high)} us (n = {n} probes a pod and size)"
    if stats.impossible(low, high, low=0.0):
        return text + ": IMPOSSIBLE (faster with policies than without): noise or drift, not a finding"
    if population == "worst":
        return text + ": the worst case, not the target's population"
    target = TARGETS.get(dp)
    if target is None:
        return text
    where = "" if size == 1000 else ", defined at 1,000 policies"
    return text + f" (target <= {target:.0f} us{where}): {stats.verdict(low, high, high=target)}"


def summary(rows, dataplanes, steps, probes, partial, large: int = 0) -> str:
    lines = ["median per dataplane and step (all rounds):"]
    headers = ["dataplane", "policies", "selecting", "walk rules/lookups", "connect_p50 us", "added us", "conn/s", "Gbit/s",
               "sync_full s", "sync_partial s", "partial total s", "rules", "set elements"]
    table = []
    for dp in dataplanes:
        for size, population in steps:
            scen = scenario(size, population)

            def med(metric: str) -> Any:
                vals = [r.value for r in rows if r.mode == dp and r.scenario == scen and r.metric == metric]
                return statistics.median(vals) if vals else None
            walk = f"{med('rules_walked'):.0f}/{med('set_lookups'):.0f}" if med("rules_walked") is not None else None
            table.append([dp, scen.removeprefix("policies-"), med("policies_selecting"), walk, med("connect_p50"),
                          med("first_packet_added"), med("conn_rate"), med("tcp_throughput"), med("sync_full"), med("sync_partial"),
                          med("sync_partial_total"), med("rules"), med("set_elements")])
    lines.append(results.format_table(headers, table))
    checked = [r.value for r in rows if r.metric == "walk_checked" and r.mode.startswith("iptables")]
    if checked:
        lines.append(f"iptables walks checked against the server node's rule counters for one new connection: "
                     f"{sum(1 for v in checked if v)} of {len(checked)} agree")
    top = max(size for size, _ in steps)
    lines.append(f"\ntargets (95 % intervals), {top} policies ({'spread' if top else ''} population"
                 f"{f', {large} selected pods on the server node' if large else ''}), paired with 0 policies:")
    def added(dp: str, size: int, population: str) -> str | None:
        got, base = probes.get((dp, size, population)), probes.get((dp, 0, "spread"))
        if not got or not base or not size:
            return None
        value, low, high = added_interval(got[0], got[1], base[0], base[1])
        return "  " + first_packet_line(dp, size, population, value, low, high, min(len(got[0]), len(base[0])))

    for dp in dataplanes:
        if (line := added(dp, top, "spread")):
            lines.append(line)
        if partial.get(dp):
            parts = partial[dp]
            p = stats.median_difference(parts, [0.0])
            v = stats.verdict(p.ci_low, p.ci_high, high=PARTIAL_TARGET)
            lines.append(f"  {dp}: partial sync median {stats.fmt_ci(p.mean, p.ci_low, p.ci_high)} s "
                         f"(n = {len(parts)}, max {max(parts):.3f} s) at {top} policies "
                         f"(target <= {PARTIAL_TARGET} s): {v}")
    worst = [(dp, size) for (dp, size, population) in probes if population == "worst"]
    if worst:
        lines.append("\nworst case, labelled as such (every policy selects the server, the client's is the last):")
        for dp, size in worst:
            lines.append(added(dp, size, "worst") or "")
    return "\n".join(lines)


def main(argv=None) -> int:
    return experiment_script.main(run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
