#!/usr/bin/env python3
"""How the testbed scales: clusters of 10, 100, 1,000 pods (2,000 with --large), through the
default CNI exec path.

Per size and mode (host-gw, ipip, bgp; rounds interleaved): cluster up and down time, where the
up time goes (underlay, node agents, sandboxes, CNI, containers, readiness), the runtime's
memory and the kernel's (``/proc/meminfo`` Slab + Percpu before and after, per pod), routes on a
node, for bgp the time until every node has every pod CIDR; at 100 nodes a node joining and
leaving. At the largest size host-gw also runs ``inprocess`` (the exec path's cost as a ratio).
Then, on 20 nodes: one exec'd CNI ADD (median over 100, with the in-process call and the full
plugin without the node's CNI server beside it), pod startup latency while a Deployment scales
0 -> 200 (the ReplicaSet controller's slow-start batches; from the batch's request to the pod
observed ready, each pod on its own; ``--repeat`` rounds, with where each pod's time went),
pod delete latency, and churn with 200 pods in the background. Last, a cluster of the
largest size is killed with SIGKILL and ``clean`` removes it (timed, checked).

Writes ``scale-<run id>.csv`` (tidy rows), ``scale-<run id>.png`` (log-log up time against
pods with the fitted growth exponent) and prints a table and its targets, computed from
this run's own data with the machine's load average beside them: on a shared machine the
figures move with the load.

    sudo python3 experiments/scale.py --quick            # 10 and 100 pods, host-gw: ~2 min
    sudo python3 experiments/scale.py                    # 10, 100, 1000 pods x 3 modes x 3 rounds
    sudo python3 experiments/scale.py --startup-only --repeat 10  # pod startup latency alone: ~1 min
"""

from __future__ import annotations

import math
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from k8snetlab import cleanup, experiment_script, naming, proc, results, spec, stats  # noqa: E402
from k8snetlab.errors import SpecError  # noqa: E402

NAME = "scale"
MODES = ("host-gw", "ipip", "bgp")
PODS_PER_NODE = 10
STARTUP_NODES, STARTUP_REPLICAS = 20, 200
CHURN_BACKGROUND, CHURN_BATCH, CHURN_ROUNDS = 200, 20, 5
ADD_SAMPLES, FULL_EXEC_SAMPLES = 100, 10
# bgp: a node-to-node mesh up to here; beyond, two route reflectors (a 200-node mesh needs
# 39,800 ARP entries, more than the kernel's neighbour table holds: the mode refuses it)
BGP_MESH_MAX_NODES = 100

# metric -> unit, added to the results schema
STARTUP_PHASES = ("queued", "sandbox", "cni", "containers", "readiness")    # Pod.STARTUP_PHASES
UNITS = {"pods_up": "s", "pods_down": "s", "underlay_up": "s", "agents_up": "s", "pods_start": "s",
         "sandbox_cpu": "s", "cni_cpu": "s", "containers_cpu": "s", "readiness_cpu": "s",
         "runtime_rss": "MB", "kernel_mem_per_pod": "kB", "runtime_mem_per_pod": "kB",
         "routes_per_node": "count", "bgp_full_routes": "s", "node_join": "s", "node_leave": "s",
         "cni_add": "ms", "pod_startup_p50": "s", "pod_startup_p99": "s", "pod_delete_p50": "s",
         **{f"pod_startup_{ph}_p{q}": "s" for ph in STARTUP_PHASES for q in (50, 99)}, "kernel_settle": "s",
         "pod_delete_p99": "s", "churn_rate": "pods/s", "clean_time": "s", "clean_leftovers": "count",
         "growth_exponent": "ratio", "underlay_cpu": "s", "agents_cpu": "s", "pods_cpu": "s",
         "underlay_children_cpu": "s", "agents_children_cpu": "s", "pods_children_cpu": "s",
         "cni_servers_cpu": "s", "stop_cpu": "s", "stop_children_cpu": "s",
         "proxy_sync": "s", "proxy_rules": "count", "proxy_service_add": "s"}
results.METRIC_UNITS.update({k: v for k, v in UNITS.items() if k not in results.METRIC_UNITS})


def cluster_dict(pods: int, mode: str, invoke: str, replicas: int | None = None,
                 nodes: int | None = None) -> dict[str, Any]:
    """A flat L2 underlay, ``pods // 10`` nodes (at least 2), one Deployment of ``sleep`` pods."""
    n = nodes or max(2, pods // PODS_PER_NODE)
    node_list = [{"name": f"node{i + 1}", "ip": f"192.168.{1 + i // 200}.{10 + i % 200}"} for i in range(n)]
    cni: dict[str, Any] = {"type": mode, "invoke": invoke}
    if mode == "bgp":       # a full mesh up to 100 nodes, route reflectors beyond, as Calico advises
        cni["bgp"] = {"topology": "mesh"} if n <= BGP_MESH_MAX_NODES else \
            {"topology": "route-reflector", "reflectors": [node_list[0]["name"], node_list[1]["name"]]}
    return {"name": f"scale-{pods}", "underlay": {"subnets": [{"name": "lan", "cidr": "192.168.0.0/16"}]},
            "nodes": node_list, "network": {"clusterCIDR": "10.244.0.0/16", "nodeCIDRMaskSize": 24},
            "cni": cni,
            "workloads": [{"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "load"},
                           "spec": {"replicas": pods if replicas is None else replicas,
                                    "selector": {"matchLabels": {"app": "load"}},
                                    "template": {"metadata": {"labels": {"app": "load"}},
                                                 "spec": {"containers": [{"name": "sleep", "image": "busybox",
                                                                          "command": ["sleep", "3600"]}]}}}}]}


def meminfo_kb() -> float:
    """Slab + Percpu of /proc/meminfo (kB): where the kernel keeps namespaces, links, routes."""
    vals = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, v = line.split(":", 1)
            vals[k] = float(v.split()[0])
    return vals.get("Slab", 0.0) + vals.get("Percpu", 0.0)


SETTLE_TIMEOUT_S = 60.0     # at most this long for the kernel to end the last clusters' namespaces
SETTLE_QUIET_S = 1.0        # ... settled once it has not been at it for this long


def netns_cleanup_running() -> bool | None:
    """Is the kernel ending network namespaces now? A kworker executing an item of the
    ``netns`` workqueue is named ``kworker/...+netns`` while it does. None where no kworker
    is visible."""
    seen = False
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/comm") as f:
                comm = f.read()
        except OSError:
            continue
        if comm.startswith("kworker"):
            seen = True
            if "+netns" in comm:
                return True
    return False if seen else None


def settle_kernel(timeout: float = SETTLE_TIMEOUT_S, poll: float = 0.25) -> float:
    """Wait until the kernel has ended the namespaces of the clusters measured before: it
    does so in a worker thread for seconds after a teardown (3 s after 1,000 pods), holding
    the locks a new cluster's links need and freeing its memory, so a cluster started
    meanwhile would be charged for the last one's end. Settled: no netns work for
    :data:`SETTLE_QUIET_S`; where that cannot be seen, two seconds. Returns the seconds waited."""
    t0 = time.monotonic()
    quiet = 0.0
    while time.monotonic() - t0 < timeout:
        running = netns_cleanup_running()
        if running is None:
            time.sleep(2.0)
            break
        quiet = 0.0 if running else quiet + poll
        if quiet >= SETTLE_QUIET_S:
            break
        time.sleep(poll)
    return time.monotonic() - t0


def rss_mb(pid: int | str = "self") -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return float(line.split()[1]) / 1024
    return math.nan


def load1() -> float:
    return os.getloadavg()[0]


class Recorder:
    def __init__(self, writer: results.CsvWriter, run_id: str):
        self.writer, self.run_id, self.rows = writer, run_id, []

    def __call__(self, mode: str, scenario: str, rnd: int, metric: str, value: float,
                 load: float | None = None) -> None:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return
        row = results.Row(self.run_id, results.utc_timestamp(), NAME, "flat", mode, "", scenario, "", "",
                          rnd, metric, float(value), UNITS.get(metric, results.METRIC_UNITS.get(metric, "")),
                          None, results.kernel_release(), load if load is not None else load1())
        self.writer.write(row)
        self.rows.append(row)


# ------------------------------------------------------------------------------ one size
def measure_size(pods: int, mode: str, invoke: str, rnd: int, rec: Recorder, join_leave: bool) -> None:
    from k8snetlab.cluster import Cluster
    label = mode if invoke == "exec" else f"{mode}/{invoke}"
    scenario = f"{pods} pods"
    rec(label, scenario, rnd, "kernel_settle", settle_kernel())
    load = load1()
    kernel0, rss0 = meminfo_kb(), rss_mb()
    c = Cluster(spec.from_dict(cluster_dict(pods, mode, invoke), f"<{NAME}: {pods} pods, {mode}>"))
    try:
        c.start()
        t = c.timings
        rec(label, scenario, rnd, "pods_up", t["start_s"], load)
        rec(label, scenario, rnd, "underlay_up", t.get("underlay_s", math.nan), load)
        rec(label, scenario, rnd, "agents_up", t.get("agents_s", math.nan), load)
        rec(label, scenario, rnd, "pods_start", t.get("pods_s", math.nan), load)
        for phase, v in c.phase_timings().items():
            rec(label, scenario, rnd, phase.replace("_s", "_cpu"), v, load)
        for phase in ("underlay", "agents", "pods"):       # CPU seconds, not wall: see the table
            rec(label, scenario, rnd, f"{phase}_cpu", t.get(f"{phase}_cpu_s", math.nan), load)
            rec(label, scenario, rnd, f"{phase}_children_cpu", t.get(f"{phase}_children_cpu_s", math.nan), load)
        if c.cni_servers is not None:
            rec(label, scenario, rnd, "cni_servers_cpu", c.cni_servers.cpu_seconds(), load)
        rss = rss_mb()
        rec(label, scenario, rnd, "runtime_rss", rss, load)
        rec(label, scenario, rnd, "runtime_mem_per_pod", (rss - rss0) * 1024 / pods, load)
        rec(label, scenario, rnd, "kernel_mem_per_pod", (meminfo_kb() - kernel0) / pods, load)
        node1 = next(iter(c.nodes.values()))
        from k8snetlab.netutil import Netns
        with Netns(node1.netns, node1.name) as ns:
            rec(label, scenario, rnd, "routes_per_node", len(ns.routes()), load)
        if mode == "bgp":
            took = getattr(c.mode, "last_converge_s", None)
            rec(label, scenario, rnd, "bgp_full_routes", math.nan if took is None else took, load)
        if join_leave:
            n = len(c.nodes)
            t0 = time.monotonic()
            c.add_node(f"node{n + 1}", f"192.168.{1 + n // 200}.{10 + n % 200}")
            rec(label, f"{n} nodes", rnd, "node_join", time.monotonic() - t0, load)
            t0 = time.monotonic()
            c.remove_node(f"node{n + 1}")
            rec(label, f"{n} nodes", rnd, "node_leave", time.monotonic() - t0, load)
    finally:
        c.stop()
    rec(label, scenario, rnd, "pods_down", c.timings.get("stop_s", math.nan), load)
    rec(label, scenario, rnd, "stop_cpu", c.timings.get("stop_cpu_s", math.nan), load)
    rec(label, scenario, rnd, "stop_children_cpu", c.timings.get("stop_children_cpu_s", math.nan), load)


# ------------------------------------------------------------------------------ pods on 20 nodes
def measure_pods(rec: Recorder, quick: bool, startup_rounds: int = 1, startup_only: bool = False) -> dict[str, Any]:
    """CNI ADD latency, startup latency of a Deployment scaled 0 -> 200 (``startup_rounds``
    times), delete latency, churn; with ``startup_only`` the startup latency alone."""
    from k8snetlab.cluster import Cluster
    from k8snetlab.cni import CNIRuntime, NetworkConfigList
    from k8snetlab.cni_protocol import ExecInvoker
    from k8snetlab.manifests import PodSpec
    from cni_plugins.inprocess import InProcessInvoker
    nodes, replicas = (4, 40) if quick else (STARTUP_NODES, STARTUP_REPLICAS)
    scenario = f"{nodes} nodes"
    out: dict[str, Any] = {}
    c = Cluster(spec.from_dict(cluster_dict(replicas, "host-gw", "exec", replicas=0, nodes=nodes),
                               f"<{NAME}: pod latency>"))
    with c:
        k = c.kubelets["node1"]
        full_conf = NetworkConfigList(k.netconf.name, k.netconf.cni_version, k.netconf.plugins,
                                      bin_dirs=(str(c.state.cni_bin / ".full"),))
        runtimes = {"exec": (k.runtime, k.netconf),
                    "inprocess": (CNIRuntime(k.node.netns, k.node.state_dir / "results-inproc", InProcessInvoker()),
                                  k.netconf),
                    "exec-no-server": (CNIRuntime(k.node.netns, k.node.state_dir / "results-full", ExecInvoker()),
                                       full_conf)}
        samples = {"exec": 20 if quick else ADD_SAMPLES, "inprocess": 20 if quick else ADD_SAMPLES,
                   "exec-no-server": 3 if quick else FULL_EXEC_SAMPLES}
        # the runtime's own periodic work (agents' resync, container supervision) pauses: in a
        # real cluster it runs in other processes than the one that execs the plugin
        paused = [t for t in (c.agent_resync, c.supervisor) if t is not None]
        for t in paused:
            t.stop()
        for how, (runtime, conf) in ({} if startup_only else runtimes).items():
            # one ADD as a runtime sees it, with nothing queued beside it: the sandboxes are
            # made first, and torn down only after the last ADD (a namespace's end holds the
            # kernel's rtnl lock, which the next ADD's netlink requests would wait for)
            sandboxes = [k.create_sandbox(PodSpec(f"addbench-{how}-{i}")) for i in range(samples[how])]
            lat = []
            load = load1()
            try:
                time.sleep(0.5)
                for pod in sandboxes:
                    rt = k.runtime_conf(pod)
                    t0 = time.perf_counter()
                    runtime.add(conf, rt)
                    lat.append((time.perf_counter() - t0) * 1000)
                    pod.result = True           # DEL below
            finally:
                for pod in sandboxes:
                    if pod.result is not None:
                        runtime.delete(conf, k.runtime_conf(pod))
                        pod.result = None
                    k.delete_pod(pod.name)
            settle_kernel()                     # the namespaces' end, before the next variant
            for v in lat:
                rec(how, scenario, 0, "cni_add", v, load)
            out[f"cni_add_{how}"] = lat
        for t in paused:
            t.start()
        pods = measure_startup(c, rec, scenario, replicas, startup_rounds, out)
        if startup_only:
            return out
        # delete latency: one pod at a time
        dl = []
        for p in list(pods)[-(10 if quick else 50):]:
            t0 = time.monotonic()
            c.delete_pod(p.name)
            dl.append(time.monotonic() - t0)
        out["delete"] = dl
        rec("host-gw", scenario, 0, "pod_delete_p50", _pct(dl, 50), load1())
        rec("host-gw", scenario, 0, "pod_delete_p99", _pct(dl, 99), load1())
        # churn: pods made and removed per second, the others running
        c.scale("load", min(CHURN_BACKGROUND, replicas))
        churn = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "churn"},
                 "spec": {"replicas": 0, "selector": {"matchLabels": {"app": "churn"}},
                          "template": {"metadata": {"labels": {"app": "churn"}},
                                       "spec": {"containers": [{"name": "sleep", "image": "busybox",
                                                                "command": ["sleep", "3600"]}]}}}}
        c.add_pod(churn)
        load = load1()
        t0 = time.monotonic()
        rounds = 2 if quick else CHURN_ROUNDS
        for _ in range(rounds):
            c.scale("churn", CHURN_BATCH)
            c.scale("churn", 0)
        rate = 2 * CHURN_BATCH * rounds / (time.monotonic() - t0)
        out["churn"] = rate
        rec("host-gw", f"{scenario}, {min(CHURN_BACKGROUND, replicas)} pods running", 0, "churn_rate", rate, load)
    return out


def measure_startup(c: Any, rec: Recorder, scenario: str, replicas: int, rounds: int,
                    out: dict[str, Any]) -> list[Any]:
    """Pod startup latency as the SLI defines it (the pod asked for -> all its containers
    started and observed; here: ``pod.created_at`` -> ``pod.ready_at``), while the Deployment
    ``load`` scales 0 -> ``replicas`` in the ReplicaSet's slow-start batches, ``rounds`` times
    (back to 0 in between). Per round: p50 and p99; per pod: where its latency went
    (queued for a worker, sandbox, CNI ADD through the exec path, containers, readiness).
    Returns the last round's pods (left running)."""
    out["startup_rounds"], out["startup_phases"], out["startup_batches"] = [], {}, {}
    pods: list[Any] = []
    for rnd in range(1, rounds + 1):
        if rnd > 1:
            c.scale("load", 0)
            settle_kernel()         # the kernel ends the last round's namespaces
        load = load1()
        pods = c.scale("load", replicas)
        lat = [p.ready_at - p.created_at for p in pods]
        out["startup_rounds"].append(lat)
        rec("host-gw", scenario, rnd, "pod_startup_p50", _pct(lat, 50), load)
        rec("host-gw", scenario, rnd, "pod_startup_p99", _pct(lat, 99), load)
        batches: dict[float, list[float]] = {}
        for p, v in zip(pods, lat):
            batches.setdefault(p.created_at, []).append(v)
            for phase, took in p.phase_seconds().items():
                out["startup_phases"].setdefault(phase, []).append(took)
        for i, (_, vs) in enumerate(sorted(batches.items())):
            out["startup_batches"].setdefault(i, []).append((len(vs), max(vs)))
    for phase in STARTUP_PHASES:
        vs = out["startup_phases"].get(phase)
        if vs:
            rec("host-gw", scenario, 0, f"pod_startup_{phase}_p50", _pct(vs, 50))
            rec("host-gw", scenario, 0, f"pod_startup_{phase}_p99", _pct(vs, 99))
    out["startup"] = [v for r in out["startup_rounds"] for v in r]
    return pods


def startup_p99_est(rounds: list[list[float]]) -> tuple[tuple[float, float, float], int]:
    """The startup p99 with its 95 % interval: over rounds, the mean of the rounds' p99 and
    its t-interval (n = rounds: pods of one round are not independent, they share batches);
    one round: its p99 alone, n 1 (a bootstrap over its pods would claim an interval the
    shared batches do not give)."""
    if len(rounds) == 1:
        v = _pct(rounds[0], 99)
        return (v, v, v), 1
    s = stats.describe([_pct(r, 99) for r in rounds])
    return (s.mean, s.ci_low, s.ci_high), s.n


def startup_table(extra: dict[str, Any]) -> list[str]:
    """Where a pod's startup goes (ms per phase, p50 / p99 over every pod of every round) and
    how long each slow-start batch took (its slowest pod)."""
    phases = extra.get("startup_phases") or {}
    rounds = extra.get("startup_rounds") or []
    if not rounds:
        return []
    lines = ["", f"Pod startup, Deployment 0 -> {len(rounds[0])} ({len(rounds)} round(s); "
                 "per round p50 / p99 s: " + ", ".join(f"{_pct(r, 50):.2f} / {_pct(r, 99):.2f}" for r in rounds) + ")"]
    head = ["", *[p for p in STARTUP_PHASES if p in phases], "total"]
    lat = [v for r in rounds for v in r]
    row = lambda q: [f"p{q} ms", *[f"{1000 * _pct(phases[p], q):.0f}" for p in head[1:-1]],  # noqa: E731
                     f"{1000 * _pct(lat, q):.0f}"]
    lines.append(results.format_table(head, [row(50), row(99)]))
    batches = extra.get("startup_batches") or {}
    if batches:
        lines.append("  slow-start batches (pods: slowest pod s, per round): " + "; ".join(
            f"{b[0][0]}: " + " ".join(f"{t:.2f}" for _, t in b) for _, b in sorted(batches.items())))
    return lines


# ------------------------------------------------------------------------------ kube-proxy
PROXY_PODS_PER_SERVICE = 10


def proxy_dict(pods: int) -> dict[str, Any]:
    """``pods // 10`` nodes, ``pods // 10`` Services of 10 pods each (Deployments svc<i>),
    kube-proxy in iptables mode, no DNS (kube-proxy's own cost only)."""
    d = cluster_dict(pods, "host-gw", "exec", replicas=0)
    services = max(1, pods // PROXY_PODS_PER_SERVICE)
    d["name"] = f"scale-proxy-{pods}"
    d["network"]["serviceCIDR"] = "10.96.0.0/12"
    d["kubeProxy"] = {"mode": "iptables", "dns": False, "syncPeriod": 30}
    template = d["workloads"][0]
    d["workloads"] = []
    for i in range(services):
        w = {**template, "metadata": {"name": f"svc{i}"},
             "spec": {**template["spec"], "replicas": PROXY_PODS_PER_SERVICE,
                      "selector": {"matchLabels": {"app": f"svc{i}"}},
                      "template": {**template["spec"]["template"], "metadata": {"labels": {"app": f"svc{i}"}}}}}
        d["workloads"].append(w)
        d["workloads"].append(service_manifest(f"svc{i}", f"svc{i}"))
    return d


def service_manifest(name: str, app: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
            "spec": {"selector": {"app": app}, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}


def measure_proxy(pods: int, rec: Recorder) -> None:
    """kube-proxy (iptables) with ``pods`` pods behind ``pods // 10`` Services on ``pods // 10``
    nodes: the first sync of every node (the add-on's start), the rules on one node, and one
    Service added to a running cluster (a partial sync of every node)."""
    from k8snetlab.cluster import Cluster
    scenario = f"{pods} pods, {max(1, pods // PROXY_PODS_PER_SERVICE)} Services"
    load = load1()
    c = Cluster(spec.from_dict(proxy_dict(pods), f"<{NAME}: kube-proxy, {pods} pods>"))
    try:
        c.start()
        rec("iptables", scenario, 0, "proxy_sync", c.timings.get("addons_s", math.nan), load)
        node1 = next(iter(c.nodes.values()))
        saved = node1.run(["iptables-save", "-t", "nat"]).stdout
        rec("iptables", scenario, 0, "proxy_rules", sum(1 for l in saved.splitlines() if l.startswith("-A")), load)
        t0 = time.monotonic()
        c.services.add_service(service_manifest("extra", "svc0"))
        rec("iptables", scenario, 0, "proxy_service_add", time.monotonic() - t0, load)
    finally:
        c.stop()


def _pct(vals: list[float], q: float) -> float:
    s = sorted(vals)
    if not s:
        return math.nan
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


# ------------------------------------------------------------------------------ kill -9 + clean
CHILD = """
import sys, time
sys.path.insert(0, {repo!r})
from k8snetlab import spec
from k8snetlab.cluster import Cluster
c = Cluster(spec.from_dict({conf!r}, "<scale: kill -9>"))
c.start()
print(c.state.index, flush=True)
time.sleep(3600)
"""


def measure_kill_clean(pods: int, rec: Recorder) -> dict[str, Any]:
    repo = str(Path(__file__).resolve().parent.parent)
    child = subprocess.Popen([sys.executable, "-c", CHILD.format(repo=repo, conf=cluster_dict(pods, "host-gw", "exec"))],
                             stdout=subprocess.PIPE, text=True)
    try:
        line = child.stdout.readline().strip()
        if not line.isdigit():
            raise RuntimeError(f"the cluster to kill did not come up (it printed {line!r})")
        index = int(line)
    except BaseException:
        child.send_signal(signal.SIGKILL)
        child.wait()
        cleanup.clean()         # interrupted: what the child made goes all the same
        raise
    child.send_signal(signal.SIGKILL)
    child.wait()
    prefix = naming.cluster_prefix(index)
    state = Path(naming.STATE_ROOT) / prefix
    cleaned = False
    try:
        import json
        records = [json.loads(l) for l in (state / "pids.jsonl").read_text().splitlines() if l.strip()]
        load = load1()
        t0 = time.monotonic()
        cleanup.clean()
        cleaned = True
        took = time.monotonic() - t0
    finally:
        if not cleaned:
            cleanup.clean()
    left = [n for n in os.listdir("/sys/class/net") if naming.cluster_index_of(n) == index]
    left += [str(state)] if state.exists() else []
    # every process the dead cluster recorded (holders, shells, CNI server workers) is gone
    alive = [r["pid"] for r in records if proc.running(r["pid"], r.get("start", 0))]
    rec("host-gw", f"{pods} pods, kill -9", 0, "clean_time", took, load)
    rec("host-gw", f"{pods} pods, kill -9", 0, "clean_leftovers", len(left) + len(alive), load)
    return {"clean_s": took, "leftovers": left, "alive": alive}


# ------------------------------------------------------------------------------ report
def med(rows: list[results.Row], mode: str, scenario: str, metric: str) -> stats.Summary | None:
    vals = [r.value for r in rows if r.mode == mode and r.scenario == scenario and r.metric == metric]
    return stats.describe(vals) if vals else None


def fmt(s: stats.Summary | None, digits: int = 1) -> str:
    if s is None:
        return "-"
    if s.n == 1:
        return f"{s.median:.{digits}f}"
    return f"{s.median:.{digits}f} ({min_max(s, digits)})"


def min_max(s: stats.Summary, digits: int) -> str:
    return f"sd {s.sd:.{digits}f}, n {s.n}"


def exponent(rows: list[results.Row], mode: str, a: int, b: int) -> float:
    sa, sb = med(rows, mode, f"{a} pods", "pods_up"), med(rows, mode, f"{b} pods", "pods_up")
    if sa is None or sb is None or sa.median <= 0:
        return math.nan
    return math.log(sb.median / sa.median) / math.log(b / a)


def fit_exponent(xs: list[float], ys: list[float]) -> float:
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    den = sum((x - mx) ** 2 for x in lx)
    return math.nan if den == 0 else sum((x - mx) * (y - my) for x, y in zip(lx, ly)) / den


def plot(rows: list[results.Row], sizes: list[int], modes: list[str], path: Path) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no plot: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for mode in modes:
        pts = [(n, med(rows, mode, f"{n} pods", "pods_up")) for n in sizes]
        pts = [(n, s) for n, s in pts if s is not None]
        if len(pts) < 2:
            continue
        k = fit_exponent([n for n, _ in pts], [s.median for _, s in pts])
        ax.errorbar([n for n, _ in pts], [s.median for _, s in pts],
                    yerr=[[s.median - s.ci_low if s.n > 1 else 0 for _, s in pts],
                          [s.ci_high - s.median if s.n > 1 else 0 for _, s in pts]],
                    marker="o", capsize=3, label=f"{mode} (slope {k:.2f})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("pods (10 per node)")
    ax.set_ylabel("cluster up (s)")
    ax.set_title("k8snetlab: up time against pods, exec CNI path")
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def boot_ci(vals: list[float], stat: Callable[[list[float]], float], samples: int = 2000,
            seed: int = stats.DEFAULT_SEED) -> tuple[float, float, float]:
    """``stat`` of ``vals`` with a seeded bootstrap 95 % interval (one value: no interval)."""
    value = stat(vals)
    if len(vals) < 2:
        return value, value, value
    import random
    rng = random.Random(seed)
    boot = sorted(stat(rng.choices(vals, k=len(vals))) for _ in range(samples))
    return value, boot[int(0.025 * (samples - 1))], boot[int(0.975 * (samples - 1))]


def target(text: str, est: tuple[float, float, float] | None, limit: float, unit: str = "",
           n: int = 0, note: str = "") -> str:
    """One target line: the figure with its interval and the verdict the interval gives
    (met: all of it below the limit; MISSED: all of it above; inconclusive: it straddles)."""
    if est is None or any(math.isnan(x) for x in est):
        return f"  [    n/a     ] {text}: not measured"
    value, lo, hi = est
    verdict = stats.verdict(lo, hi, high=limit)
    spread = f" [{lo:.3g}, {hi:.3g}], n {n}" if n > 1 and hi > lo else f" (n {n or 1}: no interval)"
    return f"  [{verdict:^12}] {text}: {value:.3g}{unit}{spread}{note} (target <= {limit:g}{unit})"


def summary_est(s: stats.Summary | None) -> tuple[float, float, float] | None:
    return None if s is None else (s.median, s.ci_low, s.ci_high)


def values(rows: list[results.Row], mode: str, scenario: str, metric: str) -> list[float]:
    return [r.value for r in rows if r.mode == mode and r.scenario == scenario and r.metric == metric]


def exponent_est(rows: list[results.Row], mode: str, a: int, b: int) -> tuple[tuple[float, float, float], int] | None:
    """The growth exponent of up time from ``a`` to ``b`` pods, log(t_b/t_a)/log(b/a) of the
    medians, with a bootstrap interval over the rounds of each size."""
    va, vb = values(rows, mode, f"{a} pods", "pods_up"), values(rows, mode, f"{b} pods", "pods_up")
    if not va or not vb:
        return None
    k = lambda x, y: math.log(statistics.median(y) / statistics.median(x)) / math.log(b / a)  # noqa: E731
    n = min(len(va), len(vb))
    if n < 2:
        v = k(va, vb)
        return (v, v, v), n
    import random
    rng = random.Random(stats.DEFAULT_SEED)
    boot = sorted(k(rng.choices(va, k=len(va)), rng.choices(vb, k=len(vb))) for _ in range(2000))
    return (k(va, vb), boot[50], boot[1949]), n


def where_the_time_goes(rows: list[results.Row], sizes: list[int], labels: list[str]) -> str:
    """Wall seconds per phase, and CPU seconds per phase and process: the runtime (all its
    threads), the programs it ran and waited for, the CNI server workers."""
    head = ["mode", "pods", "up s", "underlay", "agents", "pods s", "down s", "cpu: runtime underlay",
            "agents", "pods", "children pods", "CNI servers", "stop", "children stop"]
    table = []
    for mode in labels:
        for n in sizes:
            sc = f"{n} pods"
            g = lambda m: "-" if med(rows, mode, sc, m) is None else f"{med(rows, mode, sc, m).median:.1f}"  # noqa: E731
            if med(rows, mode, sc, "pods_up") is None:
                continue
            table.append([mode, n, g("pods_up"), g("underlay_up"), g("agents_up"), g("pods_start"), g("pods_down"),
                          g("underlay_cpu"), g("agents_cpu"), g("pods_cpu"), g("pods_children_cpu"),
                          g("cni_servers_cpu"), g("stop_cpu"), g("stop_children_cpu")])
    return results.format_table(head, table)


def report(rows: list[results.Row], sizes: list[int], modes: list[str], extra: dict[str, Any]) -> str:
    if not any(r.metric == "pods_up" for r in rows):       # --startup-only: no cluster sizes
        sizes = []
    out = []
    labels = [m for m in modes] + sorted({r.mode for r in rows if "/" in r.mode})
    head = ["mode", "pods", "nodes", "up s", "down s", "underlay", "agents", "pods", "sandbox cpu",
            "CNI cpu", "runtime MB", "kernel kB/pod", "routes/node", "bgp routes s"]
    table = []
    for mode in labels:
        for n in sizes:
            sc = f"{n} pods"
            up = med(rows, mode, sc, "pods_up")
            if up is None:
                continue
            g = lambda m, d=1: fmt(med(rows, mode, sc, m), d)
            table.append([mode, n, max(2, n // PODS_PER_NODE), fmt(up), g("pods_down"), g("underlay_up"),
                          g("agents_up"), g("pods_start"), g("sandbox_cpu"), g("cni_cpu"), g("runtime_rss", 0),
                          g("kernel_mem_per_pod", 0), g("routes_per_node", 0), g("bgp_full_routes")])
    if table:
        out.append(results.format_table(head, table))
        out.append("  (median over rounds; in brackets the sd and the number of rounds; 'sandbox/CNI cpu' sum")
        out.append("   the wall seconds each phase took over all pods, which overlap in threads)")
        out.append("")
        out.append("Where the time goes (medians; wall s, then CPU s per phase: the runtime process, the")
        out.append("programs it ran and waited for, the CNI server workers over the cluster's life):")
        out.append(where_the_time_goes(rows, sizes, labels))
    loads = [r.load1 for r in rows if r.load1 is not None]
    out.append(f"  load average (1 min) during the run: {min(loads):.1f} .. {max(loads):.1f} on "
               f"{os.cpu_count()} CPUs" if loads else "")
    settle = [r.value for r in rows if r.metric == "kernel_settle"]
    if settle:
        out.append(f"  before each cluster, the kernel ended the last ones' namespaces in {min(settle):.1f} .. "
                   f"{max(settle):.1f} s (not counted in any time above)")
    proxy = sorted({r.scenario for r in rows if r.metric == "proxy_sync"}, key=lambda x: int(x.split()[0]))
    if proxy:
        out.append("")
        out.append("kube-proxy (iptables), 10 pods per Service:")
        ptable = []
        for sc in proxy:
            g = lambda m, d=2: fmt(med(rows, "iptables", sc, m), d)  # noqa: E731
            ptable.append([sc, g("proxy_sync"), g("proxy_rules", 0), g("proxy_service_add")])
        out.append(results.format_table(["scenario", "first sync, all nodes s", "nat rules/node",
                                         "one Service added s"], ptable))
    big = max(sizes, default=0)
    mid = max([n for n in sizes if n < big] or [big])
    lines = ["Targets (this run's data; verdicts from 95 % intervals: met / MISSED / inconclusive):"]
    for mode, limit in (("host-gw", 30), ("ipip", 40), ("bgp", 40)):
        if mode in modes:
            for n in sizes:
                if n < 1000:
                    continue
                s = med(rows, mode, f"{n} pods", "pods_up")
                lines.append(target(f"{mode} {n} pods up", summary_est(s), limit if n <= 1000 else 60, " s",
                                    s.n if s else 0))
    for n in sizes:
        if n >= 1000:
            s = med(rows, "host-gw", f"{n} pods", "pods_down")
            lines.append(target(f"host-gw {n} pods down", summary_est(s), 10, " s", s.n if s else 0))
    for how in ("exec", "inprocess", "exec-no-server"):
        lat = extra.get(f"cni_add_{how}")
        if lat:
            sp = f" (p10 {_pct(lat, 10):.0f}, p90 {_pct(lat, 90):.0f}, n {len(lat)})"
            if how == "exec":
                lines.append(target("one exec'd CNI ADD (flannel -> bridge -> host-local), median",
                                    boot_ci(lat, statistics.median), 50, " ms", len(lat), sp))
            else:
                lines.append(f"  [    info    ] one CNI ADD, {how}: median {statistics.median(lat):.0f} ms{sp}")
    e = values(rows, "host-gw", f"{big} pods", "pods_up")
    i = values(rows, "host-gw/inprocess", f"{big} pods", "pods_up")
    if e and i:
        if len(e) == len(i) and len(e) > 1:
            r = stats.paired_ratio(e, i)
            est = (r.value, r.ci_low, r.ci_high)
        else:
            v = statistics.median(e) / statistics.median(i)
            est = (v, v, v)
        lines.append(target(f"exec / inprocess up time at {big} pods", est, 1.5, "x", min(len(e), len(i))))
    st = extra.get("startup_rounds")
    if st:
        est, n = startup_p99_est(st)
        every = [v for r in st for v in r]
        lines.append(target(f"pod startup p99, Deployment 0 -> {len(st[0])}", est, 1.0, " s", n,
                            f" (p50 {_pct(every, 50):.2f} s over {len(every)} pods)"))
    # the target is the exponent from 100 to 1,000 pods; a larger pair is information
    judged = (100, 1000) if {100, 1000} <= set(sizes) else (mid, big)
    for a, b in sorted({judged, (mid, big)}):
        if a >= b:
            continue
        for mode in modes:
            got = exponent_est(rows, mode, a, b)
            what = f"{mode} growth exponent of up time, {a} -> {b} pods"
            if (a, b) == judged:
                lines.append(target(what, got[0] if got else None, 1.1, "", got[1] if got else 0))
            elif got:
                lines.append(f"  [    info    ] {what}: {got[0][0]:.3g} (n {got[1]})")
    if sizes:
        s = med(rows, "host-gw", f"{big} pods", "runtime_rss")
        lines.append(target(f"runtime RSS at {big} pods", summary_est(s), 300, " MB", s.n if s else 0))
    kc = extra.get("kill")
    if kc:
        lines.append(target(f"clean after kill -9 at {extra.get('kill_pods')} pods", (kc["clean_s"],) * 3, 15, " s", 1))
        left = len(kc["leftovers"]) + len(kc["alive"])
        lines.append(target("left after clean (links, state, live processes)", (left,) * 3, 0, "", 1))
    if len(proxy) >= 2:
        (a, sa), (b, sb) = [(int(sc.split()[0]), sc) for sc in proxy[:1] + proxy[-1:]]
        ta, tb = med(rows, "iptables", sa, "proxy_sync"), med(rows, "iptables", sb, "proxy_sync")
        ra, rb = med(rows, "iptables", sa, "proxy_rules"), med(rows, "iptables", sb, "proxy_rules")
        if ta and tb and ra and rb and ta.median > 0 and ra.median > 0:
            # every node holds every Service's rules: work = nodes x rules per node; per node and
            # rule the cost must stay flat (no quadratic step inside one node's sync)
            per = lambda t, r, n: t.median / (n // PODS_PER_NODE) / r.median  # noqa: E731
            ratio = per(tb, rb, b) / per(ta, ra, a)
            lines.append(target(f"kube-proxy sync cost per node and rule, {b} / {a} pods", (ratio,) * 3, 1.5, "x", 1,
                                f" ({rb.median:.0f} vs {ra.median:.0f} rules/node)"))
    if extra.get("delete"):
        d = extra["delete"]
        lines.append(f"  [    info    ] pod delete: p50 {_pct(d, 50):.2f} s, p99 {_pct(d, 99):.2f} s (n {len(d)})")
    if extra.get("churn"):
        lines.append(f"  [    info    ] churn: {extra['churn']:.1f} pods created+deleted per second, "
                     f"{CHURN_BATCH} at a time, 200 running")
    for r in rows:
        if r.metric in ("node_join", "node_leave"):
            lines.append(f"  [    info    ] {r.metric.replace('_', ' ')} at {r.scenario}: {r.value:.2f} s ({r.mode})")
    return "\n".join(out + startup_table(extra) + [""] + lines)


# ------------------------------------------------------------------------------ main
def run(args) -> int:
    sizes = sorted({int(s) for s in args.sizes.split(",")})
    if args.large and 2000 not in sizes:
        sizes.append(2000)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not sizes or min(sizes) < 2:
        raise SpecError(f"--modes: {', '.join(bad)} not one of {', '.join(MODES)}" if bad
                        else "--sizes: give pod counts of 2 or more, e.g. 10,100,1000")
    if args.quick:
        sizes, modes, args.repeat = [s for s in sizes if s <= 100] or [10], modes[:1], 1
    proc.require_root("running the scale experiment")
    out_dir, run_id, csv_path = experiment_script.output(args, NAME)
    big = max(sizes)
    plan = [(rnd, n, m, "exec") for rnd in range(1, args.repeat + 1) for n in sizes for m in modes]
    if args.startup_only:
        if args.skip_pods:
            raise SpecError("--startup-only measures the pods part, which --skip-pods skips: give one of them")
        plan, args.skip_kube_proxy, args.skip_kill = [], True, True
    if "host-gw" in modes and not args.quick and plan:
        plan += [(rnd, big, "host-gw", "inprocess") for rnd in range(1, args.repeat + 1)]
    plan.sort(key=lambda p: (p[0], p[1]))
    proxy_sizes = [] if args.quick or args.skip_kube_proxy else sorted({min(100, big), big})
    steps = len(plan) + (0 if args.skip_pods else 1) + (0 if args.quick or args.skip_kill else 1) + len(proxy_sizes)
    progress = experiment_script.Progress(steps)
    extra: dict[str, Any] = {}
    with results.CsvWriter(csv_path) as w:
        rec = Recorder(w, run_id)
        for rnd, n, mode, invoke in plan:
            join = rnd == 1 and invoke == "exec" and max(2, n // PODS_PER_NODE) >= 100 and mode == "host-gw"
            measure_size(n, mode, invoke, rnd, rec, join)
            progress.step(f"{n} pods {mode} {invoke} round {rnd}: up {med(rec.rows, mode if invoke == 'exec' else f'{mode}/{invoke}', f'{n} pods', 'pods_up').median:.1f} s")
        if not args.skip_pods:
            settle_kernel()
            extra.update(measure_pods(rec, args.quick, args.repeat, args.startup_only))
            progress.step("pod startup latency" if args.startup_only else "pod latency, CNI ADD, churn")
        for n in proxy_sizes:
            settle_kernel()
            measure_proxy(n, rec)
            progress.step(f"kube-proxy, {n} pods behind {max(1, n // PROXY_PODS_PER_SERVICE)} Services")
        if not (args.quick or args.skip_kill):
            settle_kernel()
            extra["kill"] = measure_kill_clean(big, rec)
            extra["kill_pods"] = big
            progress.step("kill -9 + clean")
        for mode in modes:
            pts = [(n, med(rec.rows, mode, f"{n} pods", "pods_up")) for n in sizes]
            pts = [(n, s.median) for n, s in pts if s is not None]
            if len(pts) >= 2:
                rec(mode, "all sizes", 0, "growth_exponent", fit_exponent([p[0] for p in pts], [p[1] for p in pts]))
        rows = rec.rows
    png = plot(rows, sizes, modes, out_dir / f"{NAME}-{run_id}.png")
    print(report(rows, sizes, modes, extra))
    print(f"\nrows: {csv_path}" + (f"\nplot: {png}" if png else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = experiment_script.parser(__doc__.split("\n\n")[0], default_repeat=3)
    p.add_argument("--sizes", default="10,100,1000", help="pod counts (10 per node), default %(default)s")
    p.add_argument("--large", action="store_true", help="add 2000 pods (200 nodes)")
    p.add_argument("--modes", default=",".join(MODES), help="CNI modes, default %(default)s")
    p.add_argument("--skip-pods", action="store_true", help="skip the 20-node latency part")
    p.add_argument("--skip-kill", action="store_true", help="skip kill -9 + clean")
    p.add_argument("--startup-only", action="store_true",
                   help="only pod startup latency (Deployment 0 -> 200 on 20 nodes, --repeat rounds) and "
                        "where it goes; no sizes, CNI ADD, delete, churn, kube-proxy or kill")
    p.add_argument("--skip-kube-proxy", action="store_true",
                   help="skip kube-proxy with 10 pods per Service (at 100 pods and the largest size)")
    return experiment_script.main(run, p, argv)


if __name__ == "__main__":
    sys.exit(main())
