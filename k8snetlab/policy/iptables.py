"""Policy dataplane ``iptables``: the chain layout of Calico's felix, selectors as ipsets.

The layout is drawn at :func:`render`; the dispatch tree at :func:`dispatch_tree`; one sync is
one ``iptables-restore`` between two ``ipset restore`` (:meth:`IptablesDataplane.write`).
"""

from __future__ import annotations

import functools
import logging
import re
from ipaddress import IPv4Address, IPv4Network

from ..errors import K8sNetLabError
from .dataplane import (Dataplane, Rendered, isolated, policy_chain,
                        rule_comment)
from .plan import ACCEPT_MARK, NodePlan, PolicyChain, hash16

log = logging.getLogger(__name__)

TOP = ("cali-FORWARD", "cali-from-wl-dispatch", "cali-to-wl-dispatch")
JUMP_COMMENT = "cali:policy agent"
MARK = f"0x{ACCEPT_MARK:x}/0x{ACCEPT_MARK:x}"
CLEAR = f"0x0/0x{ACCEPT_MARK:x}"
SET_TYPES = {"ip": "hash:ip", "net": "hash:net", "ipport": "hash:ip,port"}
SET_PREFIX = {"ip": "cali40s:", "net": "cali40c:", "ipport": "cali40n:"}


def set_name(kind: str, sid: str) -> str:
    return SET_PREFIX[kind] + sid          # at most 31 characters (IPSET_MAXNAMELEN - 1)


def _c(text: str) -> str:
    return f'-m comment --comment "{text}"'


def render(plan: NodePlan) -> Rendered:
    """The node's chains (rule texts without ``-A <chain>``) and ipsets.

    In the node's ``filter`` table (``iptables-save`` on a node shows it)::

        FORWARD                -> cali-FORWARD (first rule)
        cali-FORWARD           RELATED,ESTABLISHED -> RETURN     (replies of allowed connections)
                               clear mark 0x10000; -> cali-from-wl-dispatch
                               clear mark 0x10000; -> cali-to-wl-dispatch
        cali-from-wl-dispatch  -s <pod IP> -g cali-fw-<endpoint>   (local pods isolated for egress)
        cali-to-wl-dispatch    -d <pod IP> -g cali-tw-<endpoint>   (local pods isolated for ingress)
                               beyond 16 pods a tree: -d <prefix> -g cali-to-wl-dispatch-<hex> ...
        cali-tw-<endpoint>     the pod itself -> RETURN; per policy: -j cali-pi-<policy>,
                               marked -> RETURN; last: DROP "Drop if no policies passed packet"
        cali-pi-<policy>       per rule and (peer, port): -m set --match-set cali40s:<hash> src
                               -p tcp --dport 80 -j MARK --set-xmark 0x10000/0x10000; marked -> RETURN

    Sets (Debian's ``ipset``, the kernel's ip_set; per network namespace, so per node):
    ``cali40s:<hash>`` hash:ip (the pods a selector peer matches), ``cali40c:<hash>`` hash:net
    (an ipBlock; its ``except`` entries as ``nomatch``), ``cali40n:<hash>`` hash:ip,port (a named
    port: every pod's address with its port). The dispatch is by pod address rather than by
    interface (felix matches ``cali*`` interfaces, in a tree keyed on name prefixes; ours is keyed
    on address prefixes, :func:`dispatch_tree`): pods on a bridge (``cni0``) are reached
    through br_netfilter, where the bridge port is not known when FORWARD runs for routed packets;
    the address is known in every CNI mode. Traffic the node itself sends to its pods never
    passes FORWARD (OUTPUT), so the node always reaches them. FORWARD sees addresses after
    kube-proxy's DNAT, so policy applies to the pod behind a Service.
    """
    out = Rendered()
    for s in plan.sets:
        elems = set(s.members)
        if s.kind == "ipport":
            elems = {f"{ip},{proto}:{port}" for ip, proto, port in (m.split(",") for m in s.members)}
        elems |= {f"{e} nomatch" for e in s.excepts}
        out.sets[set_name(s.kind, s.id)] = (f"{SET_TYPES[s.kind]} family inet", frozenset(elems))

    fwd = [f"-m conntrack --ctstate RELATED,ESTABLISHED {_c('cali:replies of allowed connections')} -j RETURN",
           f"-j MARK --set-xmark {CLEAR}", "-j cali-from-wl-dispatch",
           f"-j MARK --set-xmark {CLEAR}", "-j cali-to-wl-dispatch"]
    out.chains["cali-FORWARD"] = tuple(fwd)
    to_wl: list[tuple[int, str]] = []
    from_wl: list[tuple[int, str]] = []
    for ep, direction, chain, pcs in isolated(plan):
        match, self_match, dispatch = ("-d", "-s", to_wl) if direction == "Ingress" else ("-s", "-d", from_wl)
        dispatch.append((int(IPv4Address(ep.ip)), f"{match} {ep.ip}/32 {_c(ep.key)} -g {chain}"))
        rules = [f"{self_match} {ep.ip}/32 {_c('a pod always reaches itself')} -j RETURN"]
        for pc in pcs:
            rules += [f"-j {policy_chain(pc.id, direction)}",
                      f"-m mark --mark {MARK} {_c('Return if policy accepted')} -j RETURN"]
        rules.append(f"{_c('Drop if no policies passed packet')} -j DROP")
        out.chains[chain] = tuple(rules)
    out.chains.update(dispatch_tree("cali-from-wl-dispatch", "-s", from_wl))
    out.chains.update(dispatch_tree("cali-to-wl-dispatch", "-d", to_wl))
    for pc in plan.chains:
        out.chains[policy_chain(pc.id, pc.direction)] = _policy_rules(pc)
    return out


DISPATCH_LEAF = 16        # endpoints a dispatch chain lists one by one before it splits
NIBBLE = 4                # bits of the address per level of the tree: up to 16 branches a level
MAX_CHAIN = 28            # iptables' chain name limit


def dispatch_tree(root: str, match: str, entries: list[tuple[int, str]]) -> dict[str, tuple[str, ...]]:
    """felix's dispatch tree, keyed on address prefixes instead of interface-name prefixes.

    ``entries`` are (pod address as an int, the rule that goes to its endpoint chain). Up to
    :data:`DISPATCH_LEAF` of them are listed in ``root`` itself; more are split by the next 4
    bits after the prefix they all share (up to 16 branches ``-d <net>/<len> -g <root>-<hex>``,
    a branch of one endpoint holding its rule directly), and each branch again. A new
    connection walks at most 16 rules a level, about 16 * log16(endpoints) rules, instead
    of one per isolated pod; a packet to a pod that is not isolated falls off the end."""
    chains: dict[str, tuple[str, ...]] = {}

    def build(name: str, path: str, items: list[tuple[int, str]]) -> None:
        if len(items) <= DISPATCH_LEAF:
            chains[name] = tuple(rule for _, rule in items)
            return
        lo, hi = items[0][0], items[-1][0]
        common = 32 - (lo ^ hi).bit_length()                 # prefix all items share
        bits = min(32, common - common % NIBBLE + NIBBLE)      # the next nibble boundary
        groups: dict[int, list[tuple[int, str]]] = {}
        for addr, rule in items:
            groups.setdefault(addr >> (32 - bits), []).append((addr, rule))
        rules = []
        for key, group in sorted(groups.items()):
            if len(group) == 1:
                rules.append(group[0][1])
                continue
            sub_path = path + f"{key & 0xf:x}"
            sub = f"{root}-{sub_path}"
            if len(sub) > MAX_CHAIN:
                sub = f"{root}-{hash16(root + sub_path)[:MAX_CHAIN - len(root) - 1].lower()}"
            net = IPv4Network((key << (32 - bits), bits))
            rules.append(f"{match} {net} -g {sub}")
            build(sub, sub_path, group)
        chains[name] = tuple(rules)

    build(root, "", sorted(entries))
    return chains


_PEER_KIND = {"set": "ip", "block": "net"}


def _peer(p: tuple[str, ...], direction: str) -> str:
    if p[0] == "any":
        return ""
    side = "src" if direction == "Ingress" else "dst"
    return f"-m set --match-set {set_name(_PEER_KIND[p[0]], p[1])} {side} "


def _port(p: tuple[str, ...]) -> str:
    if p[0] == "any":
        return ""
    if p[0] == "proto":
        return f"-p {p[1]} "
    if p[0] == "named":
        return f"-p {p[1]} -m set --match-set {set_name('ipport', p[2])} dst,dst "
    rng = p[2] if p[2] == p[3] else f"{p[2]}:{p[3]}"
    return f"-p {p[1]} -m {p[1]} --dport {rng} "


@functools.lru_cache(maxsize=1 << 14)
def _policy_rules(pc: PolicyChain) -> tuple[str, ...]:
    """One policy chain's rules (cached: a sync re-renders only the chains that changed)."""
    rules: list[str] = []
    for line in pc.lines:
        rules.append(f"{_peer(line.peer, pc.direction)}{_port(line.port)}"
                     f"{_c(rule_comment(pc.direction, line.rule))} -j MARK --set-xmark {MARK}")
        rules.append(f"-m mark --mark {MARK} -j RETURN")
    return tuple(rules)


def restore_text(old: Rendered | None, new: Rendered, add_jump: bool) -> tuple[str, str, str, int, int]:
    """(ipset restore before, iptables-restore, ipset restore after, chains written, elements
    changed) to go from ``old`` (None: unknown, write everything) to ``new``."""
    full = old is None
    prev = old or Rendered()
    pre, post, elements = [], [], 0
    for name, (decl, elems) in new.sets.items():
        before = prev.sets.get(name)
        if full or before is None:
            pre.append(f"create {name} {decl} -exist")
            pre.append(f"flush {name}")
            pre += [f"add {name} {e}" for e in sorted(elems)]
            elements += len(elems)
        else:
            gone, added = before[1] - elems, elems - before[1]
            pre += [f"del {name} {e.removesuffix(' nomatch')} -exist" for e in sorted(gone)]
            pre += [f"add {name} {e} -exist" for e in sorted(added)]
            elements += len(gone) + len(added)
    for name in prev.sets:
        if name not in new.sets:
            post.append(f"destroy {name}")
    changed = [c for c in new.chains if full or prev.chains.get(c) != new.chains[c]]
    removed = [c for c in prev.chains if c not in new.chains]
    lines = ["*filter"] + [f":{c} - [0:0]" for c in [*changed, *removed]]
    if add_jump:
        lines.append(f"-I FORWARD 1 {_c(JUMP_COMMENT)} -j cali-FORWARD")
    for c in changed:
        lines += [f"-A {c} {r}" for r in new.chains[c]]
    lines += [f"-X {c}" for c in removed]
    lines.append("COMMIT")
    return ("\n".join(pre) + "\n" if pre else "", "\n".join(lines) + "\n",
            "\n".join(post) + "\n" if post else "", len(changed), elements)


_SAVE_RULE = re.compile(r"^-A (\S+) ")


def counts_from_save(save: str) -> dict[str, int]:
    """Rules per cali-* chain in ``iptables-save`` output."""
    counts: dict[str, int] = {}
    for line in save.splitlines():
        if line.startswith(":cali-"):
            counts.setdefault(line[1:].split()[0], 0)
        m = _SAVE_RULE.match(line)
        if m and m.group(1).startswith("cali-"):
            counts[m.group(1)] = counts.get(m.group(1), 0) + 1
    return counts


def elements_from_save(save: str) -> dict[str, int]:
    """Elements per cali40 set in ``ipset save`` output."""
    counts: dict[str, int] = {}
    for line in save.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[1].startswith("cali40"):
            if parts[0] == "create":
                counts.setdefault(parts[1], 0)
            elif parts[0] == "add":
                counts[parts[1]] = counts.get(parts[1], 0) + 1
    return counts


class IptablesDataplane(Dataplane):
    name = "iptables"
    binary = "iptables"          # Debian's default: iptables-nft
    tools = ("iptables", "iptables-restore", "iptables-save", "ipset")

    def render(self, plan: NodePlan) -> Rendered:
        return render(plan)

    def _jump_present(self) -> bool:
        return self.node.run([self.binary, "-w", "5", "-C", "FORWARD", "-m", "comment", "--comment",
                              JUMP_COMMENT, "-j", "cali-FORWARD"], check=False).returncode == 0

    def write(self, old: Rendered | None, new: Rendered) -> tuple[int, int]:
        """A sync: ``ipset restore`` (sets created, elements added/removed), one
        ``iptables-restore --noflush`` (the chains that changed; removed chains flushed and deleted),
        then ``ipset restore`` again to destroy sets no longer referenced."""
        add_jump = old is None and not self._jump_present()
        pre, text, post, chains, elements = restore_text(old, new, add_jump)
        if pre:
            self.node.run(["ipset", "restore"], input=pre)
        if chains or add_jump or text != "*filter\nCOMMIT\n":
            self.node.run([f"{self.binary}-restore", "-w", "5", "--noflush"], input=text)
        if post:
            self.node.run(["ipset", "restore"], input=post)
        return chains, elements

    def intact(self) -> bool:
        if self.written is None:
            return False
        if not self._jump_present():
            return False
        save = self.node.run([f"{self.binary}-save", "-t", "filter"]).stdout
        sets = elements_from_save(self.node.run(["ipset", "save"]).stdout)
        return self.written.counted(counts_from_save(save), sets)

    def counters(self, chain: str) -> list[tuple[int, int, str]]:
        out = self.node.run([self.binary, "-w", "5", "-t", "filter", "-L", chain, "-v", "-x", "-n"],
                            check=False).stdout
        rows = []
        for line in out.splitlines()[2:]:
            parts = line.split(None, 2)
            if len(parts) == 3 and parts[0].isdigit():
                rows.append((int(parts[0]), int(parts[1]), parts[2]))
        return rows

    def listing(self) -> str:
        save = self.node.run([f"{self.binary}-save", "-t", "filter"]).stdout
        keep = [ln for ln in save.splitlines() if "cali" in ln or ln.startswith(("*", "COMMIT"))]
        sets = self.node.run(["ipset", "save"]).stdout
        return "\n".join(keep) + "\n" + "".join(ln + "\n" for ln in sets.splitlines() if "cali40" in ln)

    def stop(self) -> None:
        """Remove the jump, every cali-* chain this agent wrote, then its sets."""
        if self.written is None:
            try:
                save = self.node.run([f"{self.binary}-save", "-t", "filter"]).stdout
            except K8sNetLabError:
                return
            chains = sorted(counts_from_save(save))
            sets: list[str] = []
        else:
            chains = sorted(self.written.chains)
            sets = sorted(self.written.sets)
        lines = ["*filter"] + [f":{c} - [0:0]" for c in chains]
        if self._jump_present():
            lines.append(f"-D FORWARD {_c(JUMP_COMMENT)} -j cali-FORWARD")
        lines += [f"-X {c}" for c in chains] + ["COMMIT"]
        self.node.run([f"{self.binary}-restore", "-w", "5", "--noflush"], input="\n".join(lines) + "\n")
        if sets:
            self.node.run(["ipset", "restore"], input="".join(f"destroy {s}\n" for s in sets))
        self.written = None


class IptablesLegacyDataplane(IptablesDataplane):
    """The same layout through the iptables-legacy binaries (x_tables; ipset matches native)."""
    name = "iptables-legacy"
    binary = "iptables-legacy"
    tools = ("iptables-legacy", "iptables-legacy-restore", "iptables-legacy-save", "ipset")
