"""Policy dataplane ``nftables``: one table, ``table ip calico``, sets and verdict maps.

The same plan as the iptables dataplane, where the dispatch to a pod's chain is one lookup in a
verdict map instead of a walk down a list::

    chain forward   (hook forward, priority filter - 5, policy accept)
        ct state established,related accept                  replies of allowed connections
        meta mark set meta mark & ~0x10000
        ip saddr vmap @from-wl                               pod -> jump cali-fw-<endpoint>
        meta mark set meta mark & ~0x10000
        ip daddr vmap @to-wl                                 pod -> jump cali-tw-<endpoint>
    chain cali-tw-<endpoint>    the pod itself: return; per policy: jump cali-pi-<policy>,
                                marked: return; last: counter drop
    chain cali-pi-<policy>      ip saddr @cali40s-<hash> tcp dport 80 counter
                                meta mark set meta mark | 0x10000 return
    set cali40s-<hash>   type ipv4_addr                          (pods a selector matches)
    set cali40c-<hash>   type ipv4_addr; flags interval           (an ipBlock's cidr; its
    set cali40e-<hash>   type ipv4_addr; flags interval            except in a second set)
    set cali40n-<hash>   type ipv4_addr . inet_proto . inet_service   (a named port)

An accept in this base chain ends only this chain: other tables' forward chains (kube-proxy's,
iptables-nft's) still see the packet; a drop is final. A full sync deletes and re-creates the
table in one ``nft -f`` transaction; a partial one flushes and rewrites the chains that changed,
adds and deletes single set and map elements, then deletes chains and sets no longer needed.
"""

from __future__ import annotations

import json
import logging
import time

from ..errors import K8sNetLabError
from .dataplane import (Dataplane, Rendered, SyncStats, endpoint_chains, policy_chain,
                        rule_comment)
from .plan import ACCEPT_MARK, NodePlan

log = logging.getLogger(__name__)

TABLE = "calico"
FAMILY = "ip"
BASE = "forward"
MAPS = ("from-wl", "to-wl")
MASK = f"0x{0xffffffff & ~ACCEPT_MARK:08x}"
SET_PREFIX = {"ip": "cali40s-", "net": "cali40c-", "except": "cali40e-", "ipport": "cali40n-"}
SET_DECL = {"ip": "type ipv4_addr", "net": "type ipv4_addr; flags interval",
            "except": "type ipv4_addr; flags interval",
            "ipport": "type ipv4_addr . inet_proto . inet_service"}
BASE_DECL = "type filter hook forward priority filter - 5; policy accept;"


def set_name(kind: str, sid: str) -> str:
    return SET_PREFIX[kind] + sid


def render(plan: NodePlan) -> Rendered:
    out = Rendered()
    sets = {s.id: s for s in plan.sets}
    for s in plan.sets:
        if s.kind == "ipport":
            elems = frozenset(" . ".join(m.split(",")) for m in s.members)
        else:
            elems = frozenset(s.members)
        out.sets[set_name(s.kind, s.id)] = (SET_DECL[s.kind], elems)
        if s.kind == "net" and s.excepts:
            out.sets[set_name("except", s.id)] = (SET_DECL["except"], frozenset(s.excepts))

    def peer(p: tuple[str, ...], direction: str) -> str:
        side = "saddr" if direction == "Ingress" else "daddr"
        if p[0] == "any":
            return ""
        s = sets[p[1]]
        text = f"ip {side} @{set_name(s.kind, s.id)} "
        if s.kind == "net" and s.excepts:
            text += f"ip {side} != @{set_name('except', s.id)} "
        return text

    def port(p: tuple[str, ...]) -> str:
        if p[0] == "any":
            return ""
        if p[0] == "proto":
            return f"meta l4proto {p[1]} "
        if p[0] == "named":
            return f"meta l4proto {p[1]} ip daddr . meta l4proto . th dport @{set_name('ipport', p[2])} "
        rng = p[2] if p[2] == p[3] else f"{p[2]}-{p[3]}"
        return f"{p[1]} dport {rng} "

    out.chains[BASE] = ('ct state established,related accept comment "replies of allowed connections"',
                        f"meta mark set meta mark & {MASK}", "ip saddr vmap @from-wl",
                        f"meta mark set meta mark & {MASK}", "ip daddr vmap @to-wl")
    vmaps: dict[str, set[str]] = {"from-wl": set(), "to-wl": set()}
    for ep in plan.endpoints:
        tw, fw = endpoint_chains(ep.id)
        for pols, chain, vmap, self_side in ((ep.ingress, tw, "to-wl", "saddr"), (ep.egress, fw, "from-wl", "daddr")):
            if pols is None:
                continue
            direction = "Ingress" if chain == tw else "Egress"
            vmap_elems = vmaps[vmap]
            vmap_elems.add(f"{ep.ip} : jump {chain}")
            rules = [f'ip {self_side} {ep.ip} return comment "a pod always reaches itself"']
            for key in pols:
                pc = plan.chain(key, direction)
                assert pc is not None
                rules += [f"jump {policy_chain(pc.id, direction)}",
                          f"meta mark & 0x{ACCEPT_MARK:08x} == 0x{ACCEPT_MARK:08x} return"]
            rules.append('counter drop comment "Drop if no policies passed packet"')
            out.chains[chain] = tuple(rules)
    for name, elems in vmaps.items():
        out.sets[name] = ("type ipv4_addr : verdict", frozenset(elems))
    for pc in plan.chains:
        rules = [f"{peer(ln.peer, pc.direction)}{port(ln.port)}counter meta mark set meta mark | "
                 f'0x{ACCEPT_MARK:08x} return comment "{rule_comment(pc.direction, ln.rule)}"'
                 for ln in pc.lines]
        out.chains[policy_chain(pc.id, pc.direction)] = tuple(rules)
    return out


def _elements(name: str, elems: frozenset[str] | set[str], verb: str = "add") -> list[str]:
    if not elems:
        return []
    return [f"{verb} element {FAMILY} {TABLE} {name} {{ {', '.join(sorted(elems))} }}"]


def transaction(old: Rendered | None, new: Rendered) -> tuple[str, int, int]:
    """One ``nft -f`` text from ``old`` (None: write the table anew) to ``new``; with the
    number of chains written and set elements changed."""
    t = f"{FAMILY} {TABLE}"
    lines: list[str] = []
    elements = 0
    if old is None:
        lines += [f"add table {t}", f"delete table {t}", f"add table {t}"]
        prev = Rendered()
    else:
        prev = old
    # chains first (maps' verdicts name them), then sets, then rules
    new_chains = [c for c in new.chains if c not in prev.chains]
    for c in new_chains:
        lines.append(f"add chain {t} {c}" + (f" {{ {BASE_DECL} }}" if c == BASE else ""))
    for name, (decl, elems) in new.sets.items():
        before = prev.sets.get(name)
        if before is None:
            lines.append(f"add {'map' if ': verdict' in decl else 'set'} {t} {name} {{ {decl}; }}")
            lines += _elements(name, elems)
            elements += len(elems)
    changed = [c for c in new.chains if c in new_chains or prev.chains.get(c) != new.chains[c]]
    for c in changed:
        if c not in new_chains:
            lines.append(f"flush chain {t} {c}")
        lines += [f"add rule {t} {c} {r}" for r in new.chains[c]]
    for name, (decl, elems) in new.sets.items():
        before = prev.sets.get(name)
        if before is not None:
            gone, added = before[1] - elems, elems - before[1]
            if ": verdict" in decl:
                gone_keys = {e.split(" : ")[0] for e in gone}
                lines += _elements(name, gone_keys, "delete")
            else:
                lines += _elements(name, gone, "delete")
            lines += _elements(name, added)
            elements += len(gone) + len(added)
    removed = [c for c in prev.chains if c not in new.chains]
    lines += [f"flush chain {t} {c}" for c in removed]
    lines += [f"delete set {t} {s}" for s in prev.sets if s not in new.sets]
    lines += [f"delete chain {t} {c}" for c in removed]
    return "\n".join(lines) + "\n", len(changed), elements


def counts_from_json(doc: dict) -> tuple[dict[str, int], dict[str, int]]:
    """(rules per chain, elements per set/map) of our table in ``nft -j list table`` output."""
    rules: dict[str, int] = {}
    elems: dict[str, int] = {}
    for item in doc.get("nftables", []):
        if "chain" in item:
            rules.setdefault(item["chain"]["name"], 0)
        elif "rule" in item:
            rules[item["rule"]["chain"]] = rules.get(item["rule"]["chain"], 0) + 1
        elif "set" in item or "map" in item:
            s = item.get("set") or item.get("map")
            elems[s["name"]] = len(s.get("elem", []))
    return rules, elems


class NftablesDataplane(Dataplane):
    name = "nftables"
    tools = ("nft",)

    def render(self, plan: NodePlan) -> Rendered:
        return render(plan)

    def nft(self, text: str) -> None:
        self.node.run(["nft", "-f", "-"], input=text)

    def sync(self, plan: NodePlan, full: bool = False) -> SyncStats:
        t0 = time.monotonic()
        new = render(plan)
        old = None if full else self.written
        if old is not None and old == new:
            return SyncStats(False, 0, 0, time.monotonic() - t0)
        text, chains, elements = transaction(old, new)
        self.written = None
        self.nft(text)
        self.written = new
        return SyncStats(old is None, chains, elements, time.monotonic() - t0)

    def intact(self) -> bool:
        if self.written is None:
            return False
        r = self.node.run(["nft", "-j", "list", "table", FAMILY, TABLE], check=False)
        if r.returncode != 0:
            return False
        rules, elems = counts_from_json(json.loads(r.stdout))
        return all(rules.get(c) == len(rs) for c, rs in self.written.chains.items()) and \
            all(elems.get(s) == len(e) for s, (_, e) in self.written.sets.items())

    def counters(self, chain: str) -> list[tuple[int, int, str]]:
        r = self.node.run(["nft", "-j", "list", "chain", FAMILY, TABLE, chain], check=False)
        if r.returncode != 0:
            return []
        rows = []
        for item in json.loads(r.stdout).get("nftables", []):
            rule = item.get("rule")
            if not rule:
                continue
            pk = by = 0
            for e in rule.get("expr", []):
                if "counter" in e:
                    pk, by = e["counter"]["packets"], e["counter"]["bytes"]
            rows.append((pk, by, rule.get("comment", "")))
        return rows

    def listing(self) -> str:
        return self.node.run(["nft", "list", "table", FAMILY, TABLE], check=False).stdout

    def stop(self) -> None:
        try:
            self.node.run(["nft", "-f", "-"], input=f"add table {FAMILY} {TABLE}\ndelete table {FAMILY} {TABLE}\n")
        except K8sNetLabError as e:
            log.debug("policy nftables on %s: %s", self.node.name, e)
        self.written = None
