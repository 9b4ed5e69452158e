"""The policy agent's dataplanes: a :class:`NodePlan` -> rules on one node, one transaction a sync.

A dataplane keeps what it last wrote (chain -> rules, set -> elements). :meth:`Dataplane.sync`
writes only the difference (a *partial* sync: the chains whose rules changed, set elements
added and removed) unless a full one is asked for (the first, after a failure, and when
:meth:`Dataplane.intact` finds the node's rules differ from what was written: somebody
deleted a rule, a set element or the table by hand). Rendering is pure; the classes that
touch a node are small. Chosen by ``networkPolicy.dataplane``, registered in :data:`DATAPLANES`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Iterator

from ..registry import Registry

if TYPE_CHECKING:  # pragma: no cover
    from ..pod import NodeHost
    from .plan import EndpointPlan, NodePlan, PolicyChain

log = logging.getLogger(__name__)


@dataclass
class Rendered:
    """One node's programmed state: chain -> rule texts, set name -> (declaration, elements)."""
    chains: dict[str, tuple[str, ...]] = field(default_factory=dict)
    sets: dict[str, tuple[str, frozenset[str]]] = field(default_factory=dict)

    def rule_count(self) -> int:
        return sum(len(r) for r in self.chains.values())

    def element_count(self) -> int:
        return sum(len(e) for _, e in self.sets.values())

    def counted(self, rules: dict[str, int], elements: dict[str, int]) -> bool:
        """Does the node hold as many rules per chain and elements per set as this says?"""
        return all(rules.get(c) == len(r) for c, r in self.chains.items()) and \
            all(elements.get(s) == len(e) for s, (_, e) in self.sets.items())


@dataclass
class SyncStats:
    full: bool
    chains_written: int
    elements_changed: int
    seconds: float = 0.0


class Dataplane:
    """One node's policy rules in one dataplane."""

    name: ClassVar[str]
    tools: ClassVar[tuple[str, ...]] = ()

    def __init__(self, node: "NodeHost"):
        self.node = node
        self.written: Rendered | None = None      # None: the next sync is a full one

    def render(self, plan: "NodePlan") -> Rendered:
        raise NotImplementedError

    def sync(self, plan: "NodePlan", full: bool = False) -> SyncStats:
        """Program what ``plan`` renders to: the difference from what was written, or all of it
        (``full``, or nothing known); a failure leaves nothing known, so the next is full."""
        t0 = time.monotonic()
        new = self.render(plan)
        old = None if full else self.written
        if old is not None and old == new:
            return SyncStats(False, 0, 0, time.monotonic() - t0)
        self.written = None
        chains, elements = self.write(old, new)
        self.written = new
        return SyncStats(old is None, chains, elements, time.monotonic() - t0)

    def write(self, old: Rendered | None, new: Rendered) -> tuple[int, int]:
        """Go from ``old`` (None: unknown) to ``new`` on the node in one transaction; return
        (chains written, set elements changed)."""
        raise NotImplementedError

    def intact(self) -> bool:
        """Do the node's rules and sets still hold what was written (counted per chain/set)?"""
        raise NotImplementedError

    def counters(self, chain: str) -> list[tuple[int, int, str]]:
        """(packets, bytes, rule text) of each rule of one chain, as the node counted them."""
        raise NotImplementedError

    def listing(self) -> str:
        """The node's rules as its tool prints them (iptables-save / nft list)."""
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError


DATAPLANES: Registry[type[Dataplane]] = Registry("policy dataplane", "k8snetlab.network_policy_dataplanes",
                                                 base=Dataplane)


def endpoint_chains(ep_id: str) -> tuple[str, str]:
    """felix's per-endpoint chains: to the workload (ingress), from it (egress)."""
    return f"cali-tw-{ep_id}", f"cali-fw-{ep_id}"


def isolated(plan: "NodePlan") -> Iterator[tuple["EndpointPlan", str, str, list["PolicyChain"]]]:
    """(endpoint, direction, its chain, the policy chains that select it) for every local pod
    that policies isolate in that direction: what each dataplane renders, in its own syntax."""
    by_key = {(c.policy, c.direction): c for c in plan.chains}
    for ep in plan.endpoints:
        tw, fw = endpoint_chains(ep.id)
        for pols, chain, direction in ((ep.ingress, tw, "Ingress"), (ep.egress, fw, "Egress")):
            if pols is not None:
                yield ep, direction, chain, [by_key[(key, direction)] for key in pols]


def policy_chain(policy_id: str, direction: str) -> str:
    """felix's per-policy chains: cali-pi-* (inbound rules), cali-po-* (outbound)."""
    return f"cali-{'pi' if direction == 'Ingress' else 'po'}-{policy_id}"


def rule_comment(direction: str, rule: int) -> str:
    return f"{direction.lower()} rule {rule}"


def summary(rendered: Rendered | None) -> dict[str, Any]:
    if rendered is None:
        return {"rules": 0, "set_elements": 0, "chains": 0, "sets": 0}
    return {"rules": rendered.rule_count(), "set_elements": rendered.element_count(),
            "chains": len(rendered.chains), "sets": len(rendered.sets)}
