"""kube-proxy ``nftables`` mode: one table, ``table ip kube-proxy``, with verdict maps.

A packet's Service is found by one hashed map lookup, not a walk over a rule per Service port;
each sync is one ``nft -f`` transaction, applied atomically. The table's layout and what a sync
writes: :class:`NftablesRules`.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re
import time
from dataclasses import dataclass, field

from ..errors import K8sNetLabError
from .model import Endpoint, Service, ServicePort, Snapshot
from .proxy import MASQ_MARK, Proxier
from .ruleset import RulesetWatch

log = logging.getLogger(__name__)

TABLE = "kube-proxy"
FAMILY = "ip"
T = f"{FAMILY} {TABLE}"

BASE_CHAINS = (   # name, type, hook, priority: filters run at dstnat - 10, before the DNAT
    ("filter-input", "filter", "input", "-110"),
    ("filter-forward", "filter", "forward", "-110"),
    ("filter-output", "filter", "output", "-110"),
    ("nat-prerouting", "nat", "prerouting", "dstnat"),
    ("nat-output", "nat", "output", "-100"),
    ("nat-postrouting", "nat", "postrouting", "srcnat"),
)
JUMPS = (("filter-input", "ct state new jump endpoints-check"),
         ("filter-forward", "ct state new jump endpoints-check"),
         ("filter-output", "ct state new jump endpoints-check"),
         ("nat-prerouting", "jump services"),
         ("nat-output", "jump services"),
         ("nat-postrouting", "jump masquerading"))
MAPS = (   # name, type, comment
    ("service-ips", "ipv4_addr . inet_proto . inet_service : verdict",
     "ClusterIP, ExternalIP and LoadBalancer IP traffic"),
    ("service-nodeports", "inet_proto . inet_service : verdict", "NodePort traffic"),
    ("no-endpoint-services", "ipv4_addr . inet_proto . inet_service : verdict",
     "vmap to drop or reject packets to services with no endpoints"),
    ("no-endpoint-nodeports", "inet_proto . inet_service : verdict",
     "vmap to drop or reject packets to service nodeports with no endpoints"),
)
NODEPORT_MATCH = "fib daddr type local ip daddr != 127.0.0.0/8"
FULL_SYNC_PERIOD = 3600.0   # as the iptables mode: at least one full transaction an hour


def hash_and_truncate(name: str) -> str:
    """kube-proxy's chain name base: 8 characters of base32(sha256(name)), '-', the name."""
    return base64.b32encode(hashlib.sha256(name.encode()).digest()).decode()[:8] + "-" + name


def chain_base(svc: Service, port: ServicePort) -> str:
    return hash_and_truncate(f"{svc.namespace}/{svc.name}/{port.protocol.lower()}/{port.name}")


def endpoint_base(svc: Service, port: ServicePort, ip: str, target: int) -> str:
    return hash_and_truncate(f"{svc.namespace}/{svc.name}/{port.protocol.lower()}/{port.name}__{ip}/{target}")


@dataclass
class Rendered:
    text: str
    chains: set[str] = field(default_factory=set)            # service/endpoint chains now in place
    sets: dict[str, int] = field(default_factory=dict)        # affinity set -> timeout (s)
    rules: dict[str, tuple[str, ...]] = field(default_factory=dict)    # service/endpoint chain -> rules
    elements: dict[str, frozenset[str]] = field(default_factory=dict)  # map -> its elements


def element_key(element: str) -> str:
    """The key of a map element as ``delete element`` takes it: no verdict, no comment."""
    return re.sub(r' comment "[^"]*"$', "", element.split(" : ", 1)[0])


class NftablesRules:
    """Renders the ``nft -f`` transaction for one node (pure).

    Where the iptables mode walks a list of rules per packet (KUBE-SERVICES grows by one rule per
    service port), the nftables mode looks the destination up in hashed verdict maps, as
    kube-proxy's nftables mode does::

        chain nat-prerouting / nat-output   (nat hooks, priority dstnat)  -> jump services
        chain services
            ip daddr . meta l4proto . th dport vmap @service-ips         # ClusterIPs, LB IPs
            fib daddr type local ... meta l4proto . th dport vmap @service-nodeports
        chain service-<hash>-<ns>/<name>/<proto>/<port>
            ip daddr <clusterIP> <proto> dport <port> ip saddr != <clusterCIDR> jump mark-for-masquerade
            [ip saddr @affinity-... goto endpoint-...]                   # sessionAffinity ClientIP
            numgen random mod <n> vmap { 0 : goto endpoint-..., 1 : goto endpoint-... }
            (a single endpoint: just ``goto endpoint-...``; see below)
        chain external-... / local-...   externalTrafficPolicy Cluster (masquerade) / Local (no SNAT,
                                         this node's endpoints only)
        chain endpoint-<hash>-<ns>/<name>/<proto>/<port>__<ip>/<port>
            ip saddr <ip> jump mark-for-masquerade                       # hairpin
            meta l4proto <proto> dnat to <ip>:<port>
        chain filter-input/-forward/-output (filter hooks, priority dstnat - 10) -> endpoints-check:
            @no-endpoint-services / @no-endpoint-nodeports -> goto reject-chain (reject) or drop
        chain nat-postrouting -> masquerading: masquerade what carries mark 0x4000

    Each sync is ONE ``nft -f`` transaction, which the kernel applies atomically: no packet ever
    sees half a ruleset. A full one (the first, after a failure, hourly, or whenever the ruleset
    is not as our last transaction left it: the nf_tables generation of the node's namespace,
    read after each of our transactions, has moved; see :mod:`.ruleset`) does ``flush table``
    (rules only: the affinity sets keep their entries, so ClientIP affinity survives it), rewrites every chain and rule and refills the maps; a partial one, as
    kube-proxy's, flushes and rewrites only the service and endpoint chains whose rules changed
    and deletes and adds single map elements. Both delete the chains and sets no longer needed.
    Rendering (:class:`NftablesRules`) is pure.

    One difference from kube-proxy's output: a service port with one endpoint jumps to it
    directly instead of through a one-entry ``numgen`` map. Each such map is an anonymous set,
    and the kernel names a new anonymous set by scanning all the table's sets, so thousands of
    them in one transaction cost quadratic time (5,000 one-endpoint services: ~2.6 s of kernel
    time with the maps, ~0.3 s without, measured on this machine's 6.18 kernel).
    """

    def __init__(self, node: str, cluster_cidr: str, masquerade_all: bool = False):
        self.node = node
        self.cluster_cidr = cluster_cidr
        self.masquerade_all = masquerade_all

    def render(self, snap: Snapshot, prev_chains: set[str] | None = None,
               prev_sets: dict[str, int] | None = None) -> Rendered:
        """A full sync: every chain flushed and rewritten, every map refilled."""
        return self.render_partial(snap, prev_chains, prev_sets, None)

    def render_partial(self, snap: Snapshot, prev_chains: set[str] | None, prev_sets: dict[str, int] | None,
                       before: Rendered | None) -> Rendered:
        """``before`` (what the last successful transaction left) given: a partial sync, as
        kube-proxy's: only the service and endpoint chains whose rules changed are flushed
        and rewritten, map elements are deleted and added one by one; the rest of the table
        is left as it is. ``before=None``: the full transaction."""
        r = Rendered("")
        elements: dict[str, list[str]] = {name: [] for name, _, _ in MAPS}
        rules: list[str] = []
        for svc in sorted(snap.services, key=lambda s: s.key):
            if svc.headless or not svc.cluster_ip:
                continue
            for port in svc.ports:
                self._service_port(rules, elements, r, svc, port, snap.port_endpoints(svc, port))
        by_chain: dict[str, list[str]] = {}
        for rule in rules:           # "add rule ip kube-proxy <chain> ..."
            by_chain.setdefault(rule.split(" ", 5)[4], []).append(rule)
        r.rules = {c: tuple(by_chain.get(c, ())) for c in r.chains}
        r.elements = {name: frozenset(items) for name, items in elements.items()}
        retimed = any((prev_sets or {}).get(name, timeout) != timeout for name, timeout in r.sets.items())
        if before is None or retimed:    # a set's timeout cannot change under rules that use it
            r.text = self._full(r, rules, elements, prev_chains, prev_sets)
            return r
        out: list[str] = []
        for name, _, _ in MAPS:      # first: an element may point at a chain deleted below
            out += [f"delete element {T} {name} {{ {element_key(e)} }}"
                    for e in sorted(before.elements.get(name, frozenset()) - r.elements[name])]
        changed = [c for c in sorted(r.chains) if before.rules.get(c) != r.rules[c]]
        for c in changed:
            out += [f"add chain {T} {c}", f"flush chain {T} {c}"]
        for name, timeout in sorted(r.sets.items()):
            if name not in (prev_sets or {}):
                out.append(f"add set {T} {name} {{ type ipv4_addr ; flags dynamic,timeout ; timeout {timeout}s ; }}")
        for c in changed:
            out += r.rules[c]
        out += self._stale(r, prev_chains, prev_sets)
        for name, _, _ in MAPS:
            added = sorted(r.elements[name] - before.elements.get(name, frozenset()))
            if added:
                out.append(f"add element {T} {name} {{ {', '.join(added)} }}")
        r.text = "\n".join(out) + "\n" if out else ""
        return r

    def _full(self, r: Rendered, rules: list[str], elements: dict[str, list[str]],
              prev_chains: set[str] | None, prev_sets: dict[str, int] | None) -> str:
        out = [f'add table {T} {{ comment "rules for kube-proxy" ; }}', f"flush table {T}"]
        for name, ctype, hook, prio in BASE_CHAINS:
            out.append(f"add chain {T} {name} {{ type {ctype} hook {hook} priority {prio} ; policy accept ; }}")
        for name in ("services", "endpoints-check", "masquerading", "mark-for-masquerade", "reject-chain"):
            out.append(f"add chain {T} {name}")
        for name, mtype, comment in MAPS:
            out.append(f'add map {T} {name} {{ type {mtype} ; comment "{comment}" ; }}')
            out.append(f"flush map {T} {name}")
        for chain, rule in JUMPS:
            out.append(f"add rule {T} {chain} {rule}")
        out += [f"add rule {T} mark-for-masquerade meta mark set meta mark | {MASQ_MARK}",
                f"add rule {T} masquerading meta mark & {MASQ_MARK} == 0 return",
                f"add rule {T} masquerading meta mark set meta mark ^ {MASQ_MARK}",
                f"add rule {T} masquerading masquerade fully-random",
                f"add rule {T} reject-chain reject",
                f"add rule {T} services ip daddr . meta l4proto . th dport vmap @service-ips",
                f"add rule {T} services {NODEPORT_MATCH} meta l4proto . th dport vmap @service-nodeports",
                f"add rule {T} endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services",
                f"add rule {T} endpoints-check {NODEPORT_MATCH} meta l4proto . th dport vmap @no-endpoint-nodeports"]
        for name in sorted(r.chains):
            out.append(f"add chain {T} {name}")
        for name, timeout in sorted(r.sets.items()):
            if (prev_sets or {}).get(name, timeout) != timeout:   # a set's timeout cannot change in place
                out += [f"delete set {T} {name}"]
            out.append(f"add set {T} {name} {{ type ipv4_addr ; flags dynamic,timeout ; timeout {timeout}s ; }}")
        out += rules
        out += self._stale(r, prev_chains, prev_sets)
        for name, items in elements.items():
            if items:
                out.append(f"add element {T} {name} {{ {', '.join(items)} }}")
        return "\n".join(out) + "\n"

    @staticmethod
    def _stale(r: Rendered, prev_chains: set[str] | None, prev_sets: dict[str, int] | None) -> list[str]:
        """Delete the chains and sets no longer needed: every one flushed first, since a stale
        service chain still jumps to the stale endpoint chains (a referenced chain cannot go)."""
        stale = sorted((prev_chains or set()) - r.chains)
        out = [line for name in stale for line in (f"add chain {T} {name}", f"flush chain {T} {name}")]
        out += [f"delete chain {T} {name}" for name in stale]
        for name in sorted(set(prev_sets or {}) - set(r.sets)):
            timeout = (prev_sets or {})[name]
            out.append(f"add set {T} {name} {{ type ipv4_addr ; flags dynamic,timeout ; timeout {timeout}s ; }}")
            out.append(f"delete set {T} {name}")
        return out

    def _service_port(self, rules: list[str], elements: dict[str, list[str]], r: Rendered,
                      svc: Service, port: ServicePort, eps: list[tuple[Endpoint, int]]) -> None:
        proto = port.protocol.lower()
        name = svc.port_name(port)
        base = chain_base(svc, port)
        svc_c, ext_c, loc_c = f"service-{base}", f"external-{base}", f"local-{base}"
        local = [(e, p) for e, p in eps if e.node == self.node]
        vip = f"{svc.cluster_ip} . {proto} . {port.port}"
        if not eps:
            elements["no-endpoint-services"].append(f'{vip} comment "{name}" : goto reject-chain')
            if svc.load_balancer_ip:
                elements["no-endpoint-services"].append(
                    f'{svc.load_balancer_ip} . {proto} . {port.port} comment "{name}" : goto reject-chain')
            if port.node_port is not None:
                elements["no-endpoint-nodeports"].append(f'{proto} . {port.node_port} comment "{name}" : goto reject-chain')
            return
        r.chains.add(svc_c)
        elements["service-ips"].append(f"{vip} : goto {svc_c}")
        masq_from = "" if self.masquerade_all else f" ip saddr != {self.cluster_cidr}"
        rules.append(f"add rule {T} {svc_c} ip daddr {svc.cluster_ip} {proto} dport {port.port}{masq_from} "
                     f"jump mark-for-masquerade")
        self._to_endpoints(rules, r, svc, port, svc_c, eps)
        if svc.external:
            r.chains.add(ext_c)
            if svc.external_traffic_policy == "Cluster":
                rules += [f"add rule {T} {ext_c} jump mark-for-masquerade", f"add rule {T} {ext_c} goto {svc_c}"]
            else:
                rules += [f'add rule {T} {ext_c} ip saddr {self.cluster_cidr} goto {svc_c} comment "short-circuit pod traffic"',
                          f'add rule {T} {ext_c} fib saddr type local jump mark-for-masquerade comment "masquerade local traffic"',
                          f'add rule {T} {ext_c} fib saddr type local goto {svc_c} comment "short-circuit local traffic"']
                if local:
                    r.chains.add(loc_c)
                    rules.append(f"add rule {T} {ext_c} goto {loc_c}")
                    self._to_endpoints(rules, r, svc, port, loc_c, local)
                else:
                    if svc.load_balancer_ip:
                        elements["no-endpoint-services"].append(
                            f'{svc.load_balancer_ip} . {proto} . {port.port} comment "{name}" : drop')
                    if port.node_port is not None:
                        elements["no-endpoint-nodeports"].append(f'{proto} . {port.node_port} comment "{name}" : drop')
            if svc.load_balancer_ip:
                elements["service-ips"].append(f"{svc.load_balancer_ip} . {proto} . {port.port} : goto {ext_c}")
            if port.node_port is not None:
                elements["service-nodeports"].append(f"{proto} . {port.node_port} : goto {ext_c}")
        for e, p in eps:
            ep_c = f"endpoint-{endpoint_base(svc, port, e.ip, p)}"
            if ep_c in r.chains:
                continue
            r.chains.add(ep_c)
            rules.append(f"add rule {T} {ep_c} ip saddr {e.ip} jump mark-for-masquerade")
            if svc.session_affinity == "ClientIP":
                rules.append(f"add rule {T} {ep_c} update @affinity-{endpoint_base(svc, port, e.ip, p)} {{ ip saddr }}")
            rules.append(f"add rule {T} {ep_c} meta l4proto {proto} dnat to {e.ip}:{p}")

    def _to_endpoints(self, rules: list[str], r: Rendered, svc: Service, port: ServicePort, chain: str,
                      eps: list[tuple[Endpoint, int]]) -> None:
        targets = [endpoint_base(svc, port, e.ip, p) for e, p in eps]
        if svc.session_affinity == "ClientIP":
            for b in targets:
                r.sets[f"affinity-{b}"] = svc.affinity_timeout
                rules.append(f"add rule {T} {chain} ip saddr @affinity-{b} goto endpoint-{b}")
        if len(targets) == 1:     # nothing to choose; an anonymous vmap costs the kernel a set
            rules.append(f"add rule {T} {chain} goto endpoint-{targets[0]}")
            return
        vmap = ", ".join(f"{i} : goto endpoint-{b}" for i, b in enumerate(targets))
        rules.append(f"add rule {T} {chain} numgen random mod {len(targets)} vmap {{ {vmap} }}")


class NftablesProxier(Proxier):
    mode = "nftables"
    tools = ("nft",)

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.rules = NftablesRules(self.node.name, self.cluster_cidr, self.options.masquerade_all)
        self._chains: set[str] = set()
        self._sets: dict[str, int] = {}
        self._before: Rendered | None = None     # None: the next sync is a full one
        self._last_full = 0.0
        self.watch = RulesetWatch(self.node.netns, "nft")
        self.full_syncs = 0

    def start(self) -> None:
        self.bridge_netfilter()
        self.nft(f"add table {T}\ndelete table {T}\n")    # a clean slate

    def sync(self, snap: Snapshot) -> None:
        """A partial transaction unless a full one is due: the first, one after a failure,
        one every :data:`FULL_SYNC_PERIOD`, and one whenever the node's ruleset is not as our
        last transaction left it (:meth:`rules_changed`: the table flushed or deleted, a
        chain, rule or map element changed by hand, anyone else's write)."""
        before = self.watch.fingerprint()
        full = self._before is None or time.monotonic() - self._last_full > FULL_SYNC_PERIOD or \
            self.watch.changed(before)
        rendered = self.rules.render_partial(snap, self._chains, self._sets, None if full else self._before)
        self._before = None
        self.watch.forget()
        if rendered.text:
            self.nft(rendered.text)
        self.watch.wrote(before, 1 if rendered.text else 0)
        self._chains, self._sets = rendered.chains, rendered.sets
        self._before = rendered
        self.synced(snap, full)

    def rules_changed(self) -> bool:
        """Is the node's ruleset other than our last transaction left it? One netlink request
        (the nf_tables generation, see :mod:`.ruleset`), whatever the size of the table."""
        return self.watch.changed(self.watch.fingerprint())

    def nft(self, text: str) -> None:
        """One ``nft -f -``: one atomic transaction."""
        self.node.run(["nft", "-f", "-"], input=text)

    def stop(self) -> None:
        try:
            self.nft(f"add table {T}\ndelete table {T}\n")
            self._chains.clear()
            self._sets.clear()
            self._before = None
            self.watch.forget()
        except K8sNetLabError as e:
            log.warning("kube-proxy (nftables) on %s: could not remove table %s: %s", self.node.name, T, e)
        super().stop()
