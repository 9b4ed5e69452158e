"""Check the Kubernetes network model on a running cluster, with evidence.

The model asks three things of every cluster network:

(a) every pod reaches every pod, on any node, without NAT: the server sees the client's own IP;
(b) every node reaches every pod, and every pod every node, without NAT;
(c) the IP a pod sees on its own interface is the IP the others see it as.

and Kubernetes has four kinds of traffic: container to container in one pod (``localhost``),
pod to pod, pod to Service, external to Service.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from . import proc
from .errors import K8sNetLabError

log = logging.getLogger(__name__)

PROBE = str(Path(__file__).resolve().parent / "probe.py")
PROBE_PORT = 7007
PUBLISHED_BASE = 27000          # docker mode: host port of the i-th pod's probe
ASK_TIMEOUT = 0.7

REQUIREMENTS = {
    "a": "every pod reaches every pod without NAT",
    "b": "every node reaches every pod and back without NAT",
    "c": "a pod's own IP is the IP others see",
}
TRAFFIC = ("container-to-container", "pod-to-pod", "pod-to-service", "external-to-service")
CHECK_COLUMNS = ("mode", "check", "source", "target", "result", "evidence")


@dataclass(frozen=True)
class Check:
    check: str          # "a" | "b" | "c" | one of TRAFFIC
    source: str
    target: str
    passed: bool | None  # None: not applicable here (the evidence says why)
    evidence: str

    @property
    def result(self) -> str:
        return {True: "pass", False: "FAIL", None: "n/a"}[self.passed]


@dataclass(frozen=True)
class Answer:
    target: str
    ok: bool
    name: str = ""
    peer: str = ""
    error: str = ""


def sample_pairs(n: int, m: int, per_source: int) -> list[tuple[int, int]]:
    """Pairs (i, j), i in range(n) asking j in range(m), never i == j when both range over the
    same hosts (n == m): all of them when each source can ask every target within
    ``per_source``, else ``per_source`` targets per source spread so that every target is asked
    about as often (i + 1 + k * step, k < per_source, modulo m): linear in n, never n * m."""
    same = n == m
    others = m - 1 if same else m
    if others <= per_source:
        return [(i, j) for i in range(n) for j in range(m) if not (same and i == j)]
    step = max(1, others // per_source)
    pairs = []
    for i in range(n):
        for k in range(per_source):
            j = (i + 1 + k * step) % m if same else (i + k * step) % m
            if same and j == i:
                j = (j + 1) % m
            pairs.append((i, j))
    return pairs


class ModelChecker:
    """Runs every check on a started :class:`~k8snetlab.cluster.Cluster`.

    Every pod asks every other pod while that is at most ``per_source`` targets (all pairs);
    in bigger clusters each pod asks ``per_source`` of them, spread over all pods (1,000 pods:
    30,000 pairs of the 999,000), and the report says how many were sampled.

    How it is checked: a small probe server (:mod:`k8snetlab.probe`) runs in every pod and every
    node; it answers each connection with its own name and the source address it saw. A client in
    every pod and node asks the others. So a check fails with the evidence a person would look for:
    "no answer", "172.17.0.2 answered by web-0 on node1, not web-1 on node2" (Docker's per-node
    address range), "seen source 192.168.1.129, expected 172.17.0.2" (NAT).

    Service checks use the Services add-on when the cluster has one (a ClusterIP and a NodePort
    Service over every workload, asked from every pod and from the ``external`` host). In
    ``docker`` mode, where Services do not exist, the outside is reached the Docker way: through
    the port the node publishes for the container, and that is what is reported.
    """

    def __init__(self, cluster: Any, per_source: int = 30):
        self.cluster = cluster
        self.per_source = per_source
        self._servers: list[Any] = []
        self._published: dict[str, tuple[str, int]] = {}    # pod -> (node IP, host port), docker
        self.checks: list[Check] = []
        self.sampled = (0, 0)         # pod pairs asked, of all

    # -- probes ---------------------------------------------------------------------------------
    def _start_servers(self) -> None:
        hosts = [*self.cluster.pods.values(), *self.cluster.nodes.values()]
        for h in hosts:
            p = h.popen_ns([sys.executable, PROBE, "serve", h.name, str(PROBE_PORT)],
                           what=f"model probe in {h.name}")
            self._servers.append(p)
        for h, p in zip(hosts, self._servers):
            proc.wait_listening(p.pid, PROBE_PORT, 10, f"model probe in {h.name}", child=p)
        publish = getattr(self.cluster.mode, "publish", None)
        if publish is not None:   # docker: the only way in from outside a node
            for i, pod in enumerate(sorted(self.cluster.pods.values(), key=lambda p: p.name)):
                host_port = PUBLISHED_BASE + i
                publish(pod, host_port, PROBE_PORT, "TCP")
                self._published[pod.name] = (self.cluster.nodes[pod.node_name].ip, host_port)

    def _stop_servers(self) -> None:
        proc.end_children(self._servers, grace=5)
        self._servers.clear()
        unpublish = getattr(self.cluster.mode, "unpublish", None)
        if unpublish is not None:
            for name, (_, host_port) in self._published.items():
                if name in self.cluster.pods:
                    unpublish(self.cluster.pods[name], host_port, PROBE_PORT, "TCP")
        self._published.clear()

    def ask(self, host: Any, targets: Iterable[str]) -> list[Answer]:
        targets = list(targets)
        if not targets:
            return []
        out = host.run([sys.executable, PROBE, "ask", str(ASK_TIMEOUT), *targets], timeout=60).stdout
        answers = []
        for line in out.splitlines():
            d = json.loads(line)
            answers.append(Answer(d["target"], d["ok"], d.get("name", ""), d.get("peer", ""), d.get("error", "")))
        return answers

    # -- what each host is ------------------------------------------------------------------------
    @staticmethod
    def own_addresses(host: Any, dev: str | None = None) -> list[str]:
        args = ["ip", "-4", "-o", "addr", "show"] + (["dev", dev] if dev else [])
        out = host.run(args).stdout
        return [line.split()[3].split("/")[0] for line in out.splitlines() if " inet " in line]

    def _where(self, name: str) -> str:
        pod = self.cluster.pods.get(name)
        return f"{name} on {pod.node_name}" if pod is not None else name

    def _judge(self, check: str, src: str, dst: str, ans: Answer, expect_name: str,
               expect_peer: set[str], via: str = "") -> Check:
        how = f" via {via}" if via else ""
        if not ans.ok:
            return Check(check, src, dst, False, f"no answer from {ans.target}{how} ({ans.error})")
        if ans.name != expect_name:
            return Check(check, src, dst, False, f"{ans.target.rsplit(':', 1)[0]}{how} answered by "
                         f"{self._where(ans.name)}, not {self._where(expect_name)}")
        if ans.peer not in expect_peer:
            return Check(check, src, dst, False, f"seen source {ans.peer}, expected "
                         f"{' or '.join(sorted(expect_peer))}{how}")
        return Check(check, src, dst, True, f"{dst} saw {ans.peer}{how}")

    # -- the checks -----------------------------------------------------------------------------
    def run(self) -> list[Check]:
        self.checks = []
        self._start_servers()
        try:
            self._run()
        finally:
            self._stop_servers()
        return self.checks

    def _run(self) -> None:
        c = self.cluster
        pods = sorted(c.pods.values(), key=lambda p: p.name)
        nodes = list(c.nodes.values())
        pod_ip = {p.name: (self.own_addresses(p, "eth0") or [""])[0] for p in pods}
        node_ips = {n.name: set(self.own_addresses(n)) for n in nodes}
        seen: dict[str, list[tuple[str, str]]] = {p.name: [] for p in pods}   # pod -> (observer, source)

        def note(src: str, dst: str, ans: Answer, expect: str) -> None:
            if ans.ok and ans.name == expect and src in seen:
                seen[src].append((dst, ans.peer))

        # container to container: the probe answers on localhost in the pod's one namespace
        for p in pods:
            (ans,) = self.ask(p, [f"127.0.0.1:{PROBE_PORT}"])
            self.checks.append(self._judge("container-to-container", p.name, p.name, ans, p.name,
                                           {"127.0.0.1"}, "localhost"))
        # (a) pod to pod, directly to the pod IP; docker: else through the published port
        pairs = sample_pairs(len(pods), len(pods), self.per_source)
        targets: dict[int, list[Any]] = {}
        for i, j in pairs:
            targets.setdefault(i, []).append(pods[j])
        self.sampled = (len(pairs), len(pods) * (len(pods) - 1))
        for i, src in enumerate(pods):
            others = targets.get(i, [])
            for dst, ans in zip(others, self.ask(src, [f"{d.ip}:{PROBE_PORT}" for d in others])):
                chk = self._judge("a", src.name, dst.name, ans, dst.name, {pod_ip[src.name]})
                self.checks.append(chk)
                note(src.name, dst.name, ans, dst.name)
                if not chk.passed and dst.name in self._published:
                    ip, port = self._published[dst.name]
                    (ans2,) = self.ask(src, [f"{ip}:{port}"])
                    self.checks.append(self._judge("a", src.name, dst.name, ans2, dst.name,
                                                   {pod_ip[src.name]}, f"published port {ip}:{port}"))
                    note(src.name, dst.name, ans2, dst.name)
        # (b) node to pod and pod to node
        node_pod: dict[int, list[Any]] = {}
        for i, j in sample_pairs(len(nodes), len(pods), self.per_source):
            node_pod.setdefault(i, []).append(pods[j])
        for i, n in enumerate(nodes):
            its = node_pod.get(i, [])
            for dst, ans in zip(its, self.ask(n, [f"{d.ip}:{PROBE_PORT}" for d in its])):
                self.checks.append(self._judge("b", n.name, dst.name, ans, dst.name, node_ips[n.name]))
        for src in pods:
            for n, ans in zip(nodes, self.ask(src, [f"{n.ip}:{PROBE_PORT}" for n in nodes])):
                self.checks.append(self._judge("b", src.name, n.name, ans, n.name, {pod_ip[src.name]}))
                note(src.name, n.name, ans, n.name)
        # (c) the pod's own address is how the others see it
        for p in pods:
            obs = seen[p.name]
            if not obs:
                self.checks.append(Check("c", p.name, "*", False, "nobody could be reached to tell"))
                continue
            wrong = [(o, s) for o, s in obs if s != pod_ip[p.name]]
            if wrong:
                o, s = wrong[0]
                self.checks.append(Check("c", p.name, o, False, f"own eth0 {pod_ip[p.name]}, seen as {s} "
                                         f"by {o} ({len(wrong)} of {len(obs)} observers)"))
            else:
                self.checks.append(Check("c", p.name, "*", True, f"own eth0 {pod_ip[p.name]}, seen so "
                                         f"by all {len(obs)} observers"))
        # the four kinds of traffic: pod-to-pod sums up (a)
        direct = [x for x in self.checks if x.check == "a" and "via published port" not in x.evidence]
        good = sum(1 for x in direct if x.passed)
        asked, every = self.sampled
        of = f" (a sample: {asked} of the {every} pairs)" if asked < every else ""
        self.checks.append(Check("pod-to-pod", "*", "*", bool(direct) and good == len(direct),
                                 f"{good} of {len(direct)} pod pairs reached by pod IP without NAT{of}"))
        self._services(pods)

    def _services(self, pods: list[Any]) -> None:
        c = self.cluster
        addon = getattr(c, "services", None)
        workloads = [w for w in c.workloads.values() if w.selector]
        if addon is None:
            if self._published:
                self._external_published()
                self.checks.append(Check("pod-to-service", "*", "*", None,
                                         f"{c.spec.cni.type} has no Services (no kube-proxy): nothing to check"))
            else:
                for kind in ("pod-to-service", "external-to-service"):
                    self.checks.append(Check(kind, "*", "*", None, "no Services add-on in this cluster "
                                             "(add a kubeProxy section to the cluster file)"))
            return
        for w in workloads:
            members = {p.name for p in pods if p.spec.owner == f"{w.kind}/{w.name}"}
            made = []
            try:
                svc = addon.add_service({"apiVersion": "v1", "kind": "Service",
                                         "metadata": {"name": f"model-{w.name}", "namespace": w.namespace},
                                         "spec": {"type": "NodePort", "selector": dict(w.selector),
                                                  "ports": [{"port": 80, "targetPort": PROBE_PORT}]}})
                made.append(svc)
                for p in pods:
                    (ans,) = self.ask(p, [f"{svc.cluster_ip}:80"])
                    ok = ans.ok and ans.name in members
                    self.checks.append(Check("pod-to-service", p.name, svc.key, ok,
                                             f"{svc.cluster_ip}:80 answered by {self._where(ans.name)}" if ans.ok
                                             else f"no answer from {svc.cluster_ip}:80 ({ans.error})"))
                ext = addon.external
                node_port = svc.ports[0].node_port
                for n, ans in zip(c.nodes.values(),
                                  self.ask(ext, [f"{n.ip}:{node_port}" for n in c.nodes.values()])):
                    ok = ans.ok and ans.name in members
                    self.checks.append(Check("external-to-service", ext.name, f"{n.name}:{node_port}", ok,
                                             f"answered by {self._where(ans.name)}" if ans.ok
                                             else f"no answer ({ans.error})"))
            finally:
                for svc in made:
                    addon.delete_service(svc.key)

    def _external_published(self) -> None:
        """Docker: from a host outside the nodes, through each published port."""
        ext = self.cluster.hosts.get("external") or self.cluster.add_host("external", self._free_ip())
        targets = [f"{ip}:{port}" for ip, port in self._published.values()]
        ext_ip = self.own_addresses(ext, "eth0")
        for (pod, _), ans in zip(self._published.items(), self.ask(ext, targets)):
            self.checks.append(self._judge("external-to-service", ext.name, pod, ans, pod, set(ext_ip),
                                           f"published port {ans.target} (Docker has no Services)"))

    def _free_ip(self) -> str:
        c = self.cluster
        n0 = next(iter(c.nodes.values()))
        cidr = c.spec.underlay.subnet(n0.spec.subnet).cidr
        used = {str(n.spec.ip) for n in c.nodes.values()} | {str(ip) for r in c.spec.underlay.routers
                                                            for _, ip in r.interfaces}
        used |= {h.IP() for h in c.hosts.values()}
        for ip in reversed(list(cidr.hosts())):
            if str(ip) not in used:
                return str(ip)
        raise K8sNetLabError(f"no free address on {cidr} for an external host")


def summarize(checks: list[Check]) -> dict[str, tuple[int, int, bool | None]]:
    """Per check: (passed, applicable, verdict) — verdict None when nothing applied."""
    out: dict[str, tuple[int, int, bool | None]] = {}
    for key in (*REQUIREMENTS, *TRAFFIC):
        rows = [c for c in checks if c.check == key and c.passed is not None]
        passed = sum(1 for c in rows if c.passed)
        out[key] = (passed, len(rows), (passed == len(rows)) if rows else None)
    return out


def format_report(mode: str, checks: list[Check], details: bool = True) -> list[str]:
    lines = [f"Kubernetes network model, cni {mode}:"]
    summary = summarize(checks)
    for key, (passed, total, verdict) in summary.items():
        label = f"({key}) {REQUIREMENTS[key]}" if key in REQUIREMENTS else key
        word = {True: "pass", False: "FAIL", None: "n/a "}[verdict]
        first_bad = next((c for c in checks if c.check == key and c.passed is False), None)
        why = f"  e.g. {first_bad.source} -> {first_bad.target}: {first_bad.evidence}" if first_bad else ""
        if verdict is None:
            why = "  " + next((c.evidence for c in checks if c.check == key), "")
        lines.append(f"  {word}  {label:<52} {passed:>3}/{total:<3}{why}")
    if details:
        bad = [c for c in checks if c.passed is False]
        if bad:
            lines.append(f"  failures ({len(bad)}):")
            lines += [f"    [{c.check}] {c.source} -> {c.target}: {c.evidence}" for c in bad[:20]]
            if len(bad) > 20:
                lines.append(f"    ... and {len(bad) - 20} more (see the CSV)")
    return lines


def write_csv(path: str | Path, mode: str, checks: list[Check], append: bool = False) -> None:
    import csv
    path = Path(path)
    new = not (append and path.exists())
    with open(path, "a" if append else "w", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(CHECK_COLUMNS)
        for c in checks:
            w.writerow([mode, c.check, c.source, c.target, c.result, c.evidence])


def check_modes(spec: Any, modes: list[str], progress: Any = None) -> dict[str, list[Check]]:
    """Start the cluster of ``spec`` once per CNI mode, check it, tear it down."""
    from . import spec as specmod
    from .cluster import Cluster
    specs = {m: specmod.with_cni(spec, m) if m != spec.cni.type else spec for m in modes}   # all refusals first
    out: dict[str, list[Check]] = {}
    for mode, s in specs.items():
        with Cluster(s) as cluster:
            out[mode] = ModelChecker(cluster).run()
        if progress is not None:
            progress(mode)
    return out
