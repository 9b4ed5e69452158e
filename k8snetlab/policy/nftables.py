"""Policy dataplane ``nftables``: one table, ``table ip calico``, sets and verdict maps.

The same plan as the iptables dataplane, where the dispatch to a pod's chain is one lookup in a
verdict map instead of a walk down a list. Table layout and sync: :class:`NftablesDataplane`.
"""

from __future__ import annotations

import functools
import json
import logging

from ..errors import K8sNetLabError
from .dataplane import Dataplane, Rendered, isolated, policy_chain, rule_comment
from .plan import ACCEPT_MARK, NodePlan, PolicyChain

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


MAX_EXPAND = 64          # port ranges up to this many ports are compiled into set elements


def _compile(pc: PolicyChain, direction: str, ep_ip: str, members: dict[str, tuple[str, ...]]
             ) -> tuple[set[str], set[str], set[str], bool] | None:
    """A policy chain as elements of the endpoint's three lookup sets -- peer addresses (any
    port), protocol . port (any peer), peer . protocol . port -- and whether it allows all;
    None when a line cannot be (an ipBlock, a protocol without port, a wide range): then the
    policy stays a chain of its own that the endpoint jumps to."""
    peers_only, ports_only, both = set(), set(), set()
    allow_all = False
    for ln in pc.lines:
        if ln.peer[0] == "block" or ln.port[0] == "proto":
            return None
        if ln.port[0] == "range":
            lo, hi = int(ln.port[2]), int(ln.port[3])
            if hi - lo >= MAX_EXPAND:
                return None
            ports = [(None, f"{ln.port[1]} . {n}") for n in range(lo, hi + 1)]
        elif ln.port[0] == "named":      # (address, "proto . port") of the pods that name it
            ports = [(ip, f"{proto} . {n}") for ip, proto, n in (m.split(",") for m in members[ln.port[2]])]
            if direction == "Ingress":    # the destination is this endpoint
                ports = [(None, pp) for ip, pp in ports if ip == ep_ip]
        else:
            ports = None
        peer_ips = None if ln.peer[0] == "any" else members[ln.peer[1]]
        if ports is None and peer_ips is None:
            allow_all = True
        elif ports is None:
            peers_only.update(peer_ips or ())
        else:
            for dst_ip, pp in ports:
                if dst_ip is None and peer_ips is None:
                    ports_only.add(pp)
                elif dst_ip is None:
                    both.update(f"{ip} . {pp}" for ip in peer_ips or ())
                elif peer_ips is None or dst_ip in peer_ips:
                    both.add(f"{dst_ip} . {pp}")
    return peers_only, ports_only, both, allow_all


def render(plan: NodePlan) -> Rendered:
    """The table. Per endpoint, policies whose rules are exact (selector peers, single ports or
    short ranges, named ports) are compiled into three hashed sets looked up once each, so the
    first packet's cost does not grow with the number of policies; the others keep felix's
    per-policy chain."""
    out = Rendered()
    members = {s.id: s.members for s in plan.sets}
    used_chains: set[PolicyChain] = set()
    out.chains[BASE] = ('ct state established,related accept comment "replies of allowed connections"',
                        f"meta mark set meta mark & {MASK}", "ip saddr vmap @from-wl",
                        f"meta mark set meta mark & {MASK}", "ip daddr vmap @to-wl")
    vmaps: dict[str, set[str]] = {"from-wl": set(), "to-wl": set()}
    for ep, direction, chain, chains in isolated(plan):
        vmap, side = ("to-wl", "saddr") if direction == "Ingress" else ("from-wl", "daddr")
        vmaps[vmap].add(f"{ep.ip} : jump {chain}")
        rules = [f'ip {side} {ep.ip} return comment "a pod always reaches itself"']
        peers_only: set[str] = set()
        ports_only: set[str] = set()
        both: set[str] = set()
        allow_all = False
        fallback = []
        for pc in chains:
            got = _compile(pc, direction, ep.ip, members)
            if got is None:
                fallback.append(pc)
                continue
            peers_only |= got[0]
            ports_only |= got[1]
            both |= got[2]
            allow_all |= got[3]
        if allow_all:
            rules.append('counter return comment "a rule allows every peer and port"')
        for suffix, elems, decl, match in (
                ("a", peers_only, "type ipv4_addr", f"ip {side}"),
                ("p", ports_only, "type inet_proto . inet_service", "meta l4proto . th dport"),
                ("ap", both, "type ipv4_addr . inet_proto . inet_service", f"ip {side} . meta l4proto . th dport")):
            if elems:
                name = f"{chain}-{suffix}"
                out.sets[name] = (decl, frozenset(elems))
                rules.append(f'{match} @{name} counter return comment "compiled rules"')
        for pc in fallback:
            used_chains.add(pc)
            rules += [f"jump {policy_chain(pc.id, direction)}",
                      f"meta mark & 0x{ACCEPT_MARK:08x} == 0x{ACCEPT_MARK:08x} return"]
        rules.append('counter drop comment "Drop if no policies passed packet"')
        out.chains[chain] = tuple(rules)
    for name, elems in vmaps.items():
        out.sets[name] = ("type ipv4_addr : verdict", frozenset(elems))
    wanted: set[str] = set()
    for pc in sorted(used_chains, key=lambda c: (c.policy, c.direction)):
        out.chains[policy_chain(pc.id, pc.direction)] = _policy_rules(pc)
        for ln in pc.lines:
            wanted.update(x for x in (ln.peer[1] if len(ln.peer) > 1 else None,
                                      ln.port[2] if ln.port[0] == "named" else None) if x)
    for s in plan.sets:
        if s.id not in wanted:
            continue
        if s.kind == "ipport":
            elems = frozenset(" . ".join(m.split(",")) for m in s.members)
        else:
            elems = frozenset(s.members)
        out.sets[set_name(s.kind, s.id)] = (SET_DECL[s.kind], elems)
        if s.kind == "net" and s.excepts:
            out.sets[set_name("except", s.id)] = (SET_DECL["except"], frozenset(s.excepts))
    return out


def _peer(p: tuple[str, ...], direction: str) -> str:
    if p[0] == "any":
        return ""
    side = "saddr" if direction == "Ingress" else "daddr"
    if p[0] == "set":
        return f"ip {side} @{set_name('ip', p[1])} "
    text = f"ip {side} @{set_name('net', p[1])} "
    if p[2]:
        text += f"ip {side} != @{set_name('except', p[1])} "
    return text


def _port(p: tuple[str, ...]) -> str:
    if p[0] == "any":
        return ""
    if p[0] == "proto":
        return f"meta l4proto {p[1]} "
    if p[0] == "named":
        return f"meta l4proto {p[1]} ip daddr . meta l4proto . th dport @{set_name('ipport', p[2])} "
    rng = p[2] if p[2] == p[3] else f"{p[2]}-{p[3]}"
    return f"{p[1]} dport {rng} "


@functools.lru_cache(maxsize=1 << 14)
def _policy_rules(pc: PolicyChain) -> tuple[str, ...]:
    """One policy chain's rules (cached: a sync re-renders only the chains that changed)."""
    return tuple(f"{_peer(ln.peer, pc.direction)}{_port(ln.port)}counter meta mark set meta mark | "
                 f'0x{ACCEPT_MARK:08x} return comment "{rule_comment(pc.direction, ln.rule)}"' for ln in pc.lines)


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
    """chain forward   (hook forward, priority filter - 5, policy accept)
            ct state established,related accept                  replies of allowed connections
            meta mark set meta mark & ~0x10000
            ip saddr vmap @from-wl                               pod -> jump cali-fw-<endpoint>
            meta mark set meta mark & ~0x10000
            ip daddr vmap @to-wl                                 pod -> jump cali-tw-<endpoint>
        chain cali-tw-<endpoint>    the pod itself: return;
                                    ip saddr @cali-tw-<endpoint>-a return             (compiled, see below)
                                    meta l4proto . th dport @cali-tw-<endpoint>-p return
                                    ip saddr . meta l4proto . th dport @cali-tw-<endpoint>-ap return
                                    per other policy: jump cali-pi-<policy>, marked: return;
                                    last: counter drop
        chain cali-pi-<policy>      ip saddr @cali40s-<hash> tcp dport 80 counter
                                    meta mark set meta mark | 0x10000 return
        set cali40s-<hash>   type ipv4_addr                          (pods a selector matches)
        set cali40c-<hash>   type ipv4_addr; flags interval           (an ipBlock's cidr; its
        set cali40e-<hash>   type ipv4_addr; flags interval            except in a second set)
        set cali40n-<hash>   type ipv4_addr . inet_proto . inet_service   (a named port)

    Policies whose rules are exact (selector peers; single ports, ranges of up to 64 ports, named
    ports) are compiled, per endpoint, into the elements of three hashed sets, so that the first
    packet of a connection costs three lookups however many policies select the pod; the others
    (an ipBlock, a protocol without a port, a wide range) keep felix's per-policy chain.

    An accept in this base chain ends only this chain: other tables' forward chains (kube-proxy's,
    iptables-nft's) still see the packet; a drop is final. A full sync deletes and re-creates the
    table in one ``nft -f`` transaction; a partial one flushes and rewrites the chains that changed,
    adds and deletes single set and map elements, then deletes chains and sets no longer needed.
    """
    name = "nftables"
    tools = ("nft",)

    def render(self, plan: NodePlan) -> Rendered:
        return render(plan)

    def nft(self, text: str) -> None:
        self.node.run(["nft", "-f", "-"], input=text)

    def write(self, old: Rendered | None, new: Rendered) -> tuple[int, int]:
        text, chains, elements = transaction(old, new)
        self.nft(text)
        return chains, elements

    def intact(self) -> bool:
        if self.written is None:
            return False
        r = self.node.run(["nft", "-j", "list", "table", FAMILY, TABLE], check=False)
        if r.returncode != 0:
            return False
        return self.written.counted(*counts_from_json(json.loads(r.stdout)))

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
