"""How many rules the first packet of a connection walks through a node's policy rules (pure).

A small evaluator of the rules the ``iptables`` dataplane writes (:func:`iptables_walk`) and of
the table the ``nftables`` dataplane writes (:func:`nftables_walk`): it follows one packet of a
new connection (conntrack state NEW) from the top chain through jumps, gotos and returns as the
kernel does, and counts every rule evaluated and every set or map looked up. It knows only the
vocabulary the two renderers use (and refuses anything else), so it can run on what an agent
wrote (``Dataplane.written``) without root. The count does not depend on the machine's load, so
it is the evidence of a layout's cost next to the noisy latency figures; the live check is
the rules' packet counters (``Dataplane.counters``), which see the matching rules of the path.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network

from ..errors import K8sNetLabError
from .dataplane import Rendered


@dataclass(frozen=True)
class Packet:
    src: str
    dst: str
    proto: str = "tcp"
    dport: int = 80


@dataclass
class Walk:
    verdict: str = "continue"        # drop | accept | continue (on to the hook's other rules)
    rules: int = 0                   # rules evaluated
    lookups: int = 0                 # set / verdict-map lookups among them
    path: list[tuple[str, int]] = field(default_factory=list)   # (chain, rule index) of rules that matched


def _addr(a: str) -> int:
    return int(IPv4Address(a))


def _in_net_set(elems, ip: str) -> bool:
    """hash:net with ``nomatch`` entries: the most specific entry that holds ``ip`` decides."""
    best, hit = -1, False
    for e in elems:
        net, _, flag = e.partition(" ")
        n = IPv4Network(net if "/" in net else net + "/32")
        if IPv4Address(ip) in n and n.prefixlen > best:
            best, hit = n.prefixlen, flag != "nomatch"
    return hit


# -- iptables ----------------------------------------------------------------------------------
def _ipt_set(rendered: Rendered, name: str, dirs: str, p: Packet) -> bool:
    decl, elems = rendered.sets[name]
    side = [p.src if d == "src" else p.dst for d in dirs.split(",")]
    if decl.startswith("hash:ip,port"):
        return f"{side[0]},{p.proto}:{p.dport}" in elems
    if decl.startswith("hash:net"):
        return _in_net_set(elems, side[0])
    return side[0] in elems


def _ipt_match(rendered: Rendered, toks: list[str], p: Packet, mark: int, walk: Walk) -> tuple[bool, list[str]]:
    """Does the rule's match part hold? Returns (matched, target tokens)."""
    i, ok = 0, True
    while i < len(toks):
        t = toks[i]
        if t in ("-j", "-g"):
            return ok, toks[i:]
        if t in ("-s", "-d"):
            ok &= IPv4Address(p.src if t == "-s" else p.dst) in IPv4Network(toks[i + 1])
            i += 2
        elif t == "-p":
            ok &= toks[i + 1] == p.proto
            i += 2
        elif t == "-m":
            i += 2
        elif t == "--ctstate":
            ok &= "NEW" in toks[i + 1].split(",")
            i += 2
        elif t == "--match-set":
            walk.lookups += 1
            ok &= _ipt_set(rendered, toks[i + 1], toks[i + 2], p)
            i += 3
        elif t == "--dport":
            lo, _, hi = toks[i + 1].partition(":")
            ok &= int(lo) <= p.dport <= int(hi or lo)
            i += 2
        elif t == "--mark":
            val, _, mask = toks[i + 1].partition("/")
            ok &= mark & int(mask or "0xffffffff", 0) == int(val, 0)
            i += 2
        elif t == "--comment":
            i += 2
        else:
            raise K8sNetLabError(f"walk: rule token {t!r} not understood: {' '.join(toks)}")
    return ok, []


def iptables_walk(rendered: Rendered, p: Packet, top: str = "cali-FORWARD") -> Walk:
    """The walk of a NEW packet from ``top`` through the iptables dataplane's chains."""
    walk, mark = Walk(), 0
    stack: list[tuple[str, int]] = [(top, 0)]      # (chain, next rule index)
    while stack:
        chain, i = stack.pop()
        rules = rendered.chains[chain]
        while i < len(rules):
            walk.rules += 1
            ok, target = _ipt_match(rendered, shlex.split(rules[i]), p, mark, walk)
            i += 1
            if not ok:
                continue
            walk.path.append((chain, i - 1))
            kind, name = target[0], target[1]
            if name == "RETURN":
                break
            if name in ("DROP", "ACCEPT"):
                walk.verdict = name.lower()
                return walk
            if name == "MARK":
                val, _, mask = target[3].partition("/")
                mark = (mark & ~int(mask, 0)) | int(val, 0)
                continue
            if kind == "-j":
                stack.append((chain, i))
            stack.append((name, 0))
            break
    return walk


# -- nftables ----------------------------------------------------------------------------------
def _nft_key(expr: str, p: Packet) -> str:
    parts = []
    for e in expr.split(" . "):
        e = e.strip()
        parts.append({"ip saddr": p.src, "ip daddr": p.dst, "meta l4proto": p.proto,
                      "th dport": str(p.dport)}[e])
    return " . ".join(parts)


def _nft_in(rendered: Rendered, name: str, key: str, walk: Walk) -> bool:
    walk.lookups += 1
    decl, elems = rendered.sets[name]
    if "interval" in decl:
        return _in_net_set(elems, key)
    return key in elems


def nftables_walk(rendered: Rendered, p: Packet, top: str = "forward") -> Walk:
    """The walk of a NEW packet from the base chain through the nftables dataplane's table."""
    walk, mark = Walk(), 0
    stack: list[tuple[str, int]] = [(top, 0)]
    while stack:
        chain, i = stack.pop()
        rules = rendered.chains[chain]
        while i < len(rules):
            walk.rules += 1
            rule = rules[i].split(' comment "')[0].replace("counter ", "")
            i += 1
            ok, verdict = True, None
            toks = rule
            if toks.startswith("ct state"):
                ok = "new" in toks.split()[2].split(",")
                verdict = toks.split()[3]
            elif toks.startswith("meta mark set meta mark &"):
                mark &= int(toks.split()[-1], 0)
                continue
            elif " vmap @" in toks:
                expr, name = toks.split(" vmap @")
                walk.lookups += 1
                key = _nft_key(expr, p)
                hit = [e.split(" : ")[1] for e in rendered.sets[name][1] if e.split(" : ")[0] == key]
                if not hit:
                    continue
                walk.path.append((chain, i - 1))
                verb, target = hit[0].split()
                if verb == "jump":
                    stack.append((chain, i))
                stack.append((target, 0))
                break
            elif toks.startswith("meta mark &"):
                parts = toks.split()
                ok, verdict = mark & int(parts[3], 0) == int(parts[5], 0), parts[6]
            elif toks.startswith("jump "):
                walk.path.append((chain, i - 1))
                stack.append((chain, i))
                stack.append((toks.split()[1], 0))
                break
            else:
                ok, verdict, mark = _nft_rule(rendered, toks, p, mark, walk)
            if not ok:
                continue
            walk.path.append((chain, i - 1))
            if verdict == "return":
                break
            if verdict in ("drop", "accept"):
                walk.verdict = verdict
                return walk
    return walk


def _nft_rule(rendered: Rendered, rule: str, p: Packet, mark: int, walk: Walk) -> tuple[bool, str, int]:
    """A rule of matches, then an optional mark set, then a verdict (the renderers' forms)."""
    words = rule.split()
    verdict = words[-1] if words[-1] in ("return", "drop", "accept") else ""
    body = " ".join(words[:-1] if verdict else words)
    set_mark = None
    if " meta mark set meta mark | " in f" {body}":
        body, _, val = f" {body}".partition(" meta mark set meta mark | ")
        body, set_mark = body.strip(), int(val, 0)
    ok = True
    toks = body.split()
    i = 0
    while i < len(toks) and ok:
        t = toks[i]
        if t == "ip" and toks[i + 1] in ("saddr", "daddr") and toks[i + 2] in ("!=",):
            key = p.src if toks[i + 1] == "saddr" else p.dst
            ok = not _nft_in(rendered, toks[i + 3][1:], key, walk)
            i += 4
        elif t == "ip" and toks[i + 1] in ("saddr", "daddr") and toks[i + 2] != ".":
            key = p.src if toks[i + 1] == "saddr" else p.dst
            v = toks[i + 2]
            ok = _nft_in(rendered, v[1:], key, walk) if v.startswith("@") else key == v
            i += 3
        elif "@" in t or (i + 2 < len(toks) and toks[i + 2] == "."):
            j = next(k for k in range(i, len(toks)) if toks[k].startswith("@"))
            ok = _nft_in(rendered, toks[j][1:], _nft_key(" ".join(toks[i:j]), p), walk)
            i = j + 1
        elif t == "meta" and toks[i + 1] == "l4proto":
            ok = toks[i + 2] == p.proto
            i += 3
        elif t in ("tcp", "udp", "sctp") and toks[i + 1] == "dport":
            lo, _, hi = toks[i + 2].partition("-")
            ok = t == p.proto and int(lo) <= p.dport <= int(hi or lo)
            i += 3
        else:
            raise K8sNetLabError(f"walk: nft rule not understood at {t!r}: {rule}")
    if ok and set_mark is not None:
        mark |= set_mark
    return ok, verdict, mark


def walk(dataplane: str, rendered: Rendered, p: Packet) -> Walk:
    return nftables_walk(rendered, p) if dataplane == "nftables" else iptables_walk(rendered, p)


def save_counters(save: str) -> dict[tuple[str, int], int]:
    """(chain, rule index) -> packets, of the cali-* chains in ``iptables-save -c`` output."""
    out: dict[tuple[str, int], int] = {}
    seen: dict[str, int] = {}
    for line in save.splitlines():
        if not line.startswith("[") or "] -A cali-" not in line:
            continue
        counts, _, rule = line.partition("] -A ")
        chain = rule.split()[0]
        idx = seen.get(chain, 0)
        seen[chain] = idx + 1
        out[(chain, idx)] = int(counts[1:].split(":")[0])
    return out


def check_against_counters(walk_: Walk, before: dict[tuple[str, int], int],
                           after: dict[tuple[str, int], int], top: str = "cali-FORWARD") -> list[str]:
    """What the kernel counted for one new connection (its SYN; every later packet is
    ESTABLISHED and matches ``top``'s first rule) against the evaluator's path: each rule on the
    path counted once, no other rule counted. Returns the differences (empty: they agree)."""
    on_path = set(walk_.path)
    problems = []
    for key in sorted(set(before) | set(after)):
        delta = after.get(key, 0) - before.get(key, 0)
        if key == (top, 0):
            continue
        want = 1 if key in on_path else 0
        if delta != want:
            problems.append(f"{key[0]} rule {key[1] + 1}: counted {delta}, the walk says {want}")
    return problems
