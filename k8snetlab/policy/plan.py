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
import hashlib
from dataclasses import dataclass
from ipaddress import IPv4Network
from typing import Iterable

from .model import IPBlock, NetworkPolicy, Peer, PodInfo, PolicyModel, PolicyPort

ACCEPT_MARK = 0x10000         # felix's "accepted by policy" mark bit


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
    peer: tuple[str, ...]                    # ("any",) | ("set", id) | ("block", id)
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


class _Builder:
    def __init__(self, model: PolicyModel):
        self.model = model
        self.sets: dict[str, SetPlan] = {}

    def peer(self, peer: Peer, policy_ns: str) -> tuple[str, ...]:
        if peer.ip_block is not None:
            b = peer.ip_block
            sid = hash16(f"block {b}")
            if sid not in self.sets:
                self.sets[sid] = SetPlan(sid, "net", _net_members(b), tuple(str(e) for e in b.excepts),
                                         f"ipBlock {b}")
            return ("block", sid)
        ns = f"ns[{peer.namespace_selector}]" if peer.namespace_selector is not None else f"ns={policy_ns}"
        pods = f"pods[{peer.pod_selector}]" if peer.pod_selector is not None else "pods[(all)]"
        sid = hash16(f"sel {ns} {pods}")
        if sid not in self.sets:
            ips = sorted({p.ip for p in self.model.peer_pods(peer, policy_ns) if p.ip},
                         key=lambda ip: tuple(int(x) for x in ip.split(".")))
            self.sets[sid] = SetPlan(sid, "ip", tuple(ips), (), peer.describe(policy_ns))
        return ("set", sid)

    def port(self, pp: PolicyPort) -> tuple[str, ...]:
        proto = pp.protocol.lower()
        if pp.port is None:
            return ("proto", proto)
        if isinstance(pp.port, str):
            sid = hash16(f"named {pp.port} {pp.protocol}")
            if sid not in self.sets:
                members = sorted({f"{p.ip},{proto},{n}" for p in self.model.pods
                                  if p.ip and (n := p.named_port(pp.port, pp.protocol)) is not None})
                self.sets[sid] = SetPlan(sid, "ipport", tuple(members), (), f"named port {pp.port}/{pp.protocol}")
            return ("named", proto, sid)
        return ("range", proto, str(pp.port), str(pp.end_port or pp.port))

    def chain(self, pol: NetworkPolicy, direction: str) -> PolicyChain:
        lines = []
        for i, rule in enumerate(pol.rules(direction)):
            peers = [self.peer(pe, pol.namespace) for pe in rule.peers] or [("any",)]
            ports = [self.port(pp) for pp in rule.ports] or [("any",)]
            lines += [Line(i, pe, po) for pe in peers for po in ports]
        return PolicyChain(pol.key, direction, tuple(lines))


def build(model: PolicyModel, node: str) -> NodePlan:
    b = _Builder(model)
    endpoints, chains = [], {}
    by_key = {p.key: p for p in model.policies}
    for pod in sorted((p for p in model.pods if p.node == node and p.ip), key=lambda p: p.key):
        isolation = {}
        for direction in ("Ingress", "Egress"):
            pols = model.selecting(pod, direction)
            isolation[direction] = tuple(p.key for p in pols) if pols else None
            for p in pols:
                if (p.key, direction) not in chains:
                    chains[(p.key, direction)] = b.chain(by_key[p.key], direction)
        endpoints.append(EndpointPlan(pod.key, pod.ip or "", isolation["Ingress"], isolation["Egress"]))
    return NodePlan(node, tuple(endpoints), tuple(chains[k] for k in sorted(chains)),
                    tuple(b.sets[k] for k in sorted(b.sets)))


def model_from(namespaces: dict[str, dict[str, str]], pods: Iterable[PodInfo],
               policies: Iterable[NetworkPolicy]) -> PolicyModel:
    return PolicyModel(namespaces, pods, policies)


def sorted_ips(ips: Iterable[str]) -> list[str]:
    return sorted(ips, key=lambda ip: IPv4Network(ip if "/" in ip else ip + "/32"))
