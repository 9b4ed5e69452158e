"""What one node's policy agent must program, independent of the dataplane (pure).

From the :class:`~k8snetlab.policy.model.PolicyModel` and a node name, :func:`build` makes a
:class:`NodePlan` in felix's terms:

- a **workload endpoint** per local pod with an address, with the policies that isolate it
  per direction (``None``: not isolated, no chain, traffic passes);
- a **policy chain** per (policy, direction) that some local endpoint needs: one line per
  (peer, port) pair of each rule; a line that matches sets the accept mark and returns;
- **sets** named by a hash of what they hold (as felix's ``cali40s:...``): one per selector
  peer (the addresses of the pods it selects, cluster-wide), one per ``ipBlock`` (``cidr``
  minus ``except``), one per named port (address, protocol, port of every pod that has a
  container port of that name).

The iptables and nftables renderers turn the same plan into rules; so the two dataplanes
enforce the same thing, and the model's unit tests cover both.
"""

from __future__ import annotations

import base64
import functools
import hashlib
from dataclasses import dataclass
from ipaddress import IPv4Network
from typing import Any, Iterable

from .model import IPBlock, NetworkPolicy, Peer, PodInfo, PolicyModel

ACCEPT_MARK = 0x10000         # felix's "accepted by policy" mark bit


@functools.lru_cache(maxsize=1 << 16)
def hash16(text: str) -> str:
    return base64.b32encode(hashlib.sha256(text.encode()).digest()).decode()[:16]


@dataclass(frozen=True)
class SetPlan:
    id: str                                  # hash16 of what it is
    kind: str                                # "ip" | "net" | "ipport"
    members: tuple[str, ...]                 # ip: "10.0.0.1"; net: "10.0.0.0/8"; ipport: "10.0.0.1,tcp,80"
    excepts: tuple[str, ...] = ()            # net only: the ipBlock's except CIDRs
    what: str = ""                           # for people: "pods [app=web] in namespace x"


@dataclass(frozen=True)
class Line:
    """One rule line of a policy chain: peer AND port; rule = index of the policy's rule."""
    rule: int
    peer: tuple[str, ...]                    # ("any",) | ("set", id) | ("block", id, "except" or "")
    port: tuple[str, ...]                    # ("any",) | ("proto", P) | ("range", P, lo, hi) | ("named", P, id)


@dataclass(frozen=True)
class PolicyChain:
    policy: str                              # ns/name
    direction: str                           # Ingress | Egress
    lines: tuple[Line, ...]

    @property
    def id(self) -> str:
        return hash16(self.policy)


@dataclass(frozen=True)
class EndpointPlan:
    key: str                                 # ns/name of the pod
    ip: str
    ingress: tuple[str, ...] | None          # policy keys in order; None: not isolated
    egress: tuple[str, ...] | None

    @property
    def id(self) -> str:
        return hash16(self.key)


@dataclass(frozen=True)
class NodePlan:
    node: str
    endpoints: tuple[EndpointPlan, ...]
    chains: tuple[PolicyChain, ...]
    sets: tuple[SetPlan, ...]

    def set(self, id: str) -> SetPlan:
        return next(s for s in self.sets if s.id == id)

    def chain(self, policy: str, direction: str) -> PolicyChain | None:
        return next((c for c in self.chains if c.policy == policy and c.direction == direction), None)


def _net_members(block: IPBlock) -> tuple[str, ...]:
    # hash:net sets take prefixes 1..32: 0.0.0.0/0 is its two halves
    if block.cidr.prefixlen == 0:
        return tuple(str(n) for n in block.cidr.subnets(prefixlen_diff=1))
    return (str(block.cidr),)


@functools.lru_cache(maxsize=1 << 14)
def _lines(pol: NetworkPolicy, direction: str) -> tuple[PolicyChain, tuple[tuple[str, Any, str], ...]]:
    """A policy's chain (pure, cached: only a changed policy is compiled again) and the sets its
    lines name: (set id, what fills it: an IPBlock / a Peer / a PolicyPort, policy namespace)."""
    lines: list[Line] = []
    needs: dict[str, tuple[str, Any, str]] = {}
    for i, rule in enumerate(pol.rules(direction)):
        peers: list[tuple[str, ...]] = []
        for pe in rule.peers:
            if pe.ip_block is not None:
                sid = hash16(f"block {pe.ip_block}")
                needs[sid] = (sid, pe.ip_block, pol.namespace)
                peers.append(("block", sid, "except" if pe.ip_block.excepts else ""))
            else:
                ns = f"ns[{pe.namespace_selector}]" if pe.namespace_selector is not None else f"ns={pol.namespace}"
                pods = f"pods[{pe.pod_selector}]" if pe.pod_selector is not None else "pods[(all)]"
                sid = hash16(f"sel {ns} {pods}")
                needs[sid] = (sid, pe, pol.namespace)
                peers.append(("set", sid))
        ports: list[tuple[str, ...]] = []
        for pp in rule.ports:
            proto = pp.protocol.lower()
            if pp.port is None:
                ports.append(("proto", proto))
            elif isinstance(pp.port, str):
                sid = hash16(f"named {pp.port} {pp.protocol}")
                needs[sid] = (sid, pp, pol.namespace)
                ports.append(("named", proto, sid))
            else:
                ports.append(("range", proto, str(pp.port), str(pp.end_port or pp.port)))
        lines += [Line(i, pe, po) for pe in peers or [("any",)] for po in ports or [("any",)]]
    return PolicyChain(pol.key, direction, tuple(lines)), tuple(needs.values())


def _fill(model: PolicyModel, sid: str, what: Any, policy_ns: str) -> SetPlan:
    """A set's members from the current pods and namespaces."""
    if isinstance(what, IPBlock):
        return SetPlan(sid, "net", _net_members(what), tuple(str(e) for e in what.excepts), f"ipBlock {what}")
    if isinstance(what, Peer):
        ips = sorted({p.ip for p in model.peer_pods(what, policy_ns) if p.ip},
                     key=lambda ip: tuple(int(x) for x in ip.split(".")))
        return SetPlan(sid, "ip", tuple(ips), (), what.describe(policy_ns))
    proto = what.protocol.lower()
    members = sorted({f"{p.ip},{proto},{n}" for p in model.pods
                      if p.ip and (n := p.named_port(what.port, what.protocol)) is not None})
    return SetPlan(sid, "ipport", tuple(members), (), f"named port {what.port}/{what.protocol}")


def build(model: PolicyModel, node: str) -> NodePlan:
    endpoints, chains = [], {}
    needs: dict[str, tuple[str, Any, str]] = {}
    by_key = {p.key: p for p in model.policies}
    for pod in sorted((p for p in model.pods if p.node == node and p.ip), key=lambda p: p.key):
        isolation = {}
        for direction in ("Ingress", "Egress"):
            pols = model.selecting(pod, direction)
            isolation[direction] = tuple(p.key for p in pols) if pols else None
            for p in pols:
                if (p.key, direction) not in chains:
                    chains[(p.key, direction)], sets = _lines(by_key[p.key], direction)
                    needs.update((n[0], n) for n in sets)
        endpoints.append(EndpointPlan(pod.key, pod.ip or "", isolation["Ingress"], isolation["Egress"]))
    return NodePlan(node, tuple(endpoints), tuple(chains[k] for k in sorted(chains)),
                    tuple(_fill(model, *needs[k]) for k in sorted(needs)))


def model_from(namespaces: dict[str, dict[str, str]], pods: Iterable[PodInfo],
               policies: Iterable[NetworkPolicy]) -> PolicyModel:
    return PolicyModel(namespaces, pods, policies)


def sorted_ips(ips: Iterable[str]) -> list[str]:
    return sorted(ips, key=lambda ip: IPv4Network(ip if "/" in ip else ip + "/32"))
