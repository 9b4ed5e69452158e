"""``k8snetlab policy matrix`` and ``explain``: reachability probed, against the model's.

The truth table is the one Kubernetes' own policy e2e tests print: a row per source pod, a
column per destination pod (``ns/name``), ``.`` connected and ``X`` blocked; then the same
for what was observed, and a comparison where ``X`` marks a difference.

Probing works on any running cluster from its state (``policy.json``, written by the add-on):
for the probed port, a listener thread enters each destination pod's network namespace
(``setns`` moves only the calling thread) and answers TCP connects and echoes UDP datagrams,
unless something in the pod listens there already; a thread per source pod opens all its
connections at once (non-blocking) and waits at most ``timeout`` seconds, so a table costs
about one timeout however many pods there are.
"""

from __future__ import annotations

import errno
import ipaddress
import select
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from .. import proc
from ..errors import SpecError
from . import model as m

PAYLOAD = b"k8snetlab-policy-probe"


@dataclass
class Table:
    protocol: str
    port: int
    pods: list[str]                                   # ns/name
    expected: dict[tuple[str, str], bool]
    observed: dict[tuple[str, str], bool]

    @property
    def differences(self) -> list[tuple[str, str]]:
        return [k for k in self.expected if self.expected[k] != self.observed.get(k)]

    def format(self) -> str:
        def grid(title: str, cell: Any) -> list[str]:
            w = max(len(p) for p in self.pods) + 1
            lines = [f"{title} ({self.protocol}/{self.port}):",
                     "-".ljust(w) + " ".join(p.ljust(w) for p in self.pods).rstrip()]
            for a in self.pods:
                lines.append(a.ljust(w) + " ".join(cell(a, b).ljust(w) for b in self.pods).rstrip())
            return lines
        yes = lambda v: "." if v else "X"   # noqa: E731
        out = grid("Expected", lambda a, b: yes(self.expected[(a, b)]))
        out += grid("Observed", lambda a, b: yes(self.observed.get((a, b), False)))
        out += grid("Comparison", lambda a, b: "." if self.expected[(a, b)] == self.observed.get((a, b)) else "X")
        diffs = self.differences
        out.append(f"{len(diffs)} difference(s)" + (": " + ", ".join(f"{a} -> {b}" for a, b in diffs) if diffs else ""))
        return "\n".join(out)


def model_of(state: dict[str, Any]) -> tuple[m.PolicyModel, list[dict[str, Any]]]:
    pods = [m.PodInfo(p["name"], p["namespace"], p["labels"], p["ip"], p["node"],
                      tuple(tuple(x) for x in p["ports"]), p["host"]) for p in state["pods"]]
    pols = [m.parse_policy(doc, "policy") for doc in state["policies"]] if state.get("enabled", True) else []
    nodes = {n: set(v["ips"]) for n, v in state["nodes"].items()}
    return m.PolicyModel(state["namespaces"], pods, pols, nodes), state["pods"]


class _Listener(threading.Thread):
    """TCP accept + UDP echo on ``port`` inside one pod's network namespace."""

    def __init__(self, netns: str, port: int, protocols: tuple[str, ...]):
        super().__init__(daemon=True)
        self.netns, self.port, self.protocols = netns, port, protocols
        self.ready = threading.Event()
        self.stop = threading.Event()
        self.error: str | None = None

    def run(self) -> None:
        socks: list[socket.socket] = []
        try:
            proc.setns(self.netns)
            for proto in self.protocols:
                kind = socket.SOCK_STREAM if proto == "TCP" else socket.SOCK_DGRAM
                s = socket.socket(socket.AF_INET, kind)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind(("0.0.0.0", self.port))
                except OSError as e:
                    s.close()
                    if e.errno != errno.EADDRINUSE:     # in use: a container serves it
                        raise
                    continue
                if kind == socket.SOCK_STREAM:
                    s.listen(256)
                s.setblocking(False)
                socks.append(s)
        except OSError as e:
            self.error = str(e)
        finally:
            self.ready.set()
        try:
            while socks and not self.stop.is_set():
                r, _, _ = select.select(socks, [], [], 0.05)
                for s in r:
                    try:
                        if s.type == socket.SOCK_STREAM:
                            c, _ = s.accept()
                            c.close()
                        else:
                            data, addr = s.recvfrom(2048)
                            s.sendto(data, addr)
                    except OSError:
                        pass
        finally:
            for s in socks:
                s.close()


def _probe_from(netns: str, targets: list[tuple[str, str]], port: int, protocol: str,
                timeout: float, out: dict[str, bool]) -> None:
    """Open a connection (TCP) or send a datagram (UDP) to every target at once."""
    proc.setns(netns)
    pending: dict[socket.socket, str] = {}
    for key, ip in targets:
        out[key] = False
        if protocol == "TCP":
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            s.connect_ex((ip, port))
        else:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setblocking(False)
            s.connect((ip, port))
            try:
                s.send(PAYLOAD)
            except OSError:
                pass
        pending[s] = key
    deadline = time.monotonic() + timeout
    resent = False
    while pending and time.monotonic() < deadline:
        left = deadline - time.monotonic()
        if protocol == "TCP":
            _, w, _ = select.select([], list(pending), [], max(0.0, left))
            for s in w:
                out[pending.pop(s)] = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
                s.close()
        else:
            r, _, _ = select.select(list(pending), [], [], min(max(0.0, left), timeout / 2))
            for s in r:
                try:
                    out[pending[s]] = s.recv(2048) == PAYLOAD
                except OSError:
                    out[pending[s]] = False
                pending.pop(s)
                s.close()
            if not r and not resent:      # one retransmission, as a client would
                resent = True
                for s in pending:
                    try:
                        s.send(PAYLOAD)
                    except OSError:
                        pass
    for s in pending:
        s.close()


def probe(pods: list[dict[str, Any]], port: int, protocol: str, timeout: float = 1.0) -> dict[tuple[str, str], bool]:
    """Observed reachability between every pair of ``pods`` (state entries) on ``port``."""
    listeners = [_Listener(f"/proc/{p['pid']}/ns/net", port, (protocol,)) for p in pods]
    for t in listeners:
        t.start()
    for t in listeners:
        t.ready.wait(5)
    errors = [t.error for t in listeners if t.error]
    try:
        if errors:
            from ..errors import K8sNetLabError
            raise K8sNetLabError(f"policy matrix: cannot listen in a pod: {errors[0]}")
        results: dict[str, dict[str, bool]] = {}
        threads = []
        keys = [f"{p['namespace']}/{p['name']}" for p in pods]
        for p, key in zip(pods, keys):
            results[key] = {}
            targets = [(k, q["ip"]) for k, q in zip(keys, pods)]
            t = threading.Thread(target=_probe_from, args=(f"/proc/{p['pid']}/ns/net", targets, port, protocol,
                                                            timeout, results[key]), daemon=True)
            threads.append(t)
            t.start()
        for t in threads:
            t.join(timeout + 10)
        return {(a, b): results[a].get(b, False) for a in keys for b in keys}
    finally:
        for t in listeners:
            t.stop.set()
        for t in listeners:
            t.join(2)


def run_matrix(state: dict[str, Any], port: int = 80, protocols: tuple[str, ...] = ("TCP",),
               namespaces: list[str] | None = None, timeout: float = 1.0) -> list[Table]:
    model, pods = model_of(state)
    if namespaces:
        pods = [p for p in pods if p["namespace"] in namespaces]
    pods = sorted(pods, key=lambda p: (p["namespace"], p["name"]))
    infos = {f"{p.namespace}/{p.name}": p for p in model.pods}
    keys = [f"{p['namespace']}/{p['name']}" for p in pods]
    tables = []
    for proto in protocols:
        expected = {(a, b): model.allowed(infos[a], infos[b], port, proto) for a in keys for b in keys}
        observed = probe(pods, port, proto, timeout)
        tables.append(Table(proto, port, keys, expected, observed))
    return tables


def explain(state: dict[str, Any], src: str, dst: str, port: int, protocol: str = "TCP") -> str:
    """Which policy and rule allows the flow, or which isolation denies it; and the counters of
    the rules on the nodes involved."""
    from .dataplane import DATAPLANES, endpoint_chains, policy_chain, rule_comment
    from .plan import hash16
    model, _ = model_of(state)
    a, b = resolve(model, src), resolve(model, dst)
    v = model.verdict(a, b, port, protocol)
    name = lambda e: e.key if isinstance(e, m.PodInfo) else e   # noqa: E731
    lines = [f"{name(a)} -> {name(b)} {protocol}/{port}: {'ALLOWED' if v.allowed else 'DENIED'}"]
    if not state.get("enabled", True):
        lines.append("  networkPolicy.enabled is false: no policy is enforced")
    for d, direction, pod in ((v.egress, "Egress", a), (v.ingress, "Ingress", b)):
        lines.append(f"  {direction.lower()}: {d.why}")
        if not isinstance(pod, m.PodInfo) or not d.isolated or not state.get("running"):
            continue
        node = state["nodes"].get(pod.node or "")
        if node is None:
            continue
        dp = DATAPLANES.get(state["dataplane"])(NodeRef(pod.node or "", node["pid"]))
        tw, fw = endpoint_chains(hash16(pod.key))
        ep_chain = tw if direction == "Ingress" else fw
        lines.append(f"    node {pod.node} ({state['dataplane']}), chain {ep_chain}:")
        for pk, by, text in dp.counters(ep_chain):
            lines.append(f"      {pk:>8} pkts {by:>10} bytes  {text}")
        if d.match is not None:
            pc = policy_chain(hash16(d.match.policy), direction)
            want = rule_comment(direction, d.match.rule)
            lines.append(f"    chain {pc} ({d.match.policy}), lines of {want}:")
            for pk, by, text in dp.counters(pc):
                if want in text:
                    lines.append(f"      {pk:>8} pkts {by:>10} bytes  {text}")
    return "\n".join(lines)


class NodeRef:
    """A node by its namespace's PID (what the CLI has): ``run`` as NodeHost.run."""

    def __init__(self, name: str, pid: int):
        self.name, self.pid = name, pid

    @property
    def netns(self) -> str:
        return f"/proc/{self.pid}/ns/net"

    def run(self, args: list[str], **kw: Any) -> Any:
        from .. import proc
        kw.setdefault("where", self.name)
        return proc.run(args, netns=self.netns, **kw)


def resolve(model: m.PolicyModel, ref: str) -> m.Endpoint:
    """A pod by ``ns/name``, by host name (``web-0``, ``a.x``) or by address; else an address."""
    for p in model.pods:
        if ref in (p.key, p.host, p.ip):
            return p
    try:
        ipaddress.IPv4Address(ref)
    except ValueError:
        raise SpecError(f"{ref!r} is neither a pod (ns/name or its host name) nor an IPv4 address") from None
    return ref
