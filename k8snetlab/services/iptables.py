"""kube-proxy ``iptables`` mode: the chain layout of a real node, one ``iptables-restore`` per sync.

Chain names hash the Service port like kube-proxy's, so ``iptables-save`` shows what a real
node would; a sync rewrites only the chains that changed. Layout and sync rules:
:class:`IptablesRules`.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import time
from dataclasses import dataclass, field

from ..errors import K8sNetLabError
from .model import Endpoint, Service, ServicePort, Snapshot
from .proxy import MASQ_MARK, Proxier
from .ruleset import RulesetWatch

log = logging.getLogger(__name__)

NODEPORTS_COMMENT = "kubernetes service nodeports; NOTE: this must be the last rule in this chain"


def _hash16(text: str) -> str:
    return base64.b32encode(hashlib.sha256(text.encode()).digest()).decode()[:16]


def port_proto_hash(port_name: str, protocol: str) -> str:
    """kube-proxy's portProtoHash: ``ns/name:port`` + lower-case protocol."""
    return _hash16(port_name + protocol.lower())


def svc_chain(port_name: str, protocol: str) -> str:
    return "KUBE-SVC-" + port_proto_hash(port_name, protocol)


def svl_chain(port_name: str, protocol: str) -> str:
    return "KUBE-SVL-" + port_proto_hash(port_name, protocol)


def ext_chain(port_name: str, protocol: str) -> str:
    return "KUBE-EXT-" + port_proto_hash(port_name, protocol)


def sep_chain(port_name: str, protocol: str, endpoint: str) -> str:
    """``endpoint`` is ``ip:port``."""
    return "KUBE-SEP-" + _hash16(port_name + protocol.lower() + endpoint)


def probability(i: int, n: int) -> str:
    """The statistic match of the i-th of n endpoints: 1/n, then 1/(n-1), ... (kube-proxy's
    format: ten decimals)."""
    return f"{1.0 / (n - i):0.10f}"


@dataclass(frozen=True)
class Jump:
    """A rule in a built-in chain that leads into ours (kept, not rewritten, on each sync)."""
    table: str
    chain: str
    target: str
    comment: str
    ctstate_new: bool = False

    def spec(self) -> list[str]:
        ct = ["-m", "conntrack", "--ctstate", "NEW"] if self.ctstate_new else []
        return [*ct, "-m", "comment", "--comment", _q(self.comment), "-j", self.target]


JUMPS: tuple[Jump, ...] = (
    Jump("nat", "PREROUTING", "KUBE-SERVICES", "kubernetes service portals"),
    Jump("nat", "OUTPUT", "KUBE-SERVICES", "kubernetes service portals"),
    Jump("nat", "POSTROUTING", "KUBE-POSTROUTING", "kubernetes postrouting rules"),
    Jump("filter", "INPUT", "KUBE-EXTERNAL-SERVICES", "kubernetes externally-visible service portals", True),
    Jump("filter", "FORWARD", "KUBE-EXTERNAL-SERVICES", "kubernetes externally-visible service portals", True),
    Jump("filter", "FORWARD", "KUBE-SERVICES", "kubernetes service portals", True),
    Jump("filter", "FORWARD", "KUBE-FORWARD", "kubernetes forwarding rules"),
    Jump("filter", "OUTPUT", "KUBE-SERVICES", "kubernetes service portals", True),
)
BUILTIN = sorted({(j.table, j.chain) for j in JUMPS})
BASE_CHAINS = {"nat": ("KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-POSTROUTING", "KUBE-MARK-MASQ"),
               "filter": ("KUBE-SERVICES", "KUBE-EXTERNAL-SERVICES", "KUBE-FORWARD")}


# per-Service chains in nat: a partial sync rewrites only those whose rules changed
SERVICE_CHAIN_PREFIXES = ("KUBE-SVC-", "KUBE-SVL-", "KUBE-EXT-", "KUBE-SEP-")
FULL_SYNC_PERIOD = 3600.0   # kube-proxy's: at least one full sync an hour
# kube-proxy's canary: an empty chain in each table, written as a real node has it; whether
# the tables were touched is told by the ruleset fingerprint (ruleset.py), which also sees
# what leaves the canary in place (iptables -t nat -F, a deleted jump)
CANARY = "KUBE-PROXY-CANARY"
CANARY_TABLES = ("mangle", "nat", "filter")


def _q(text: str) -> str:
    return f'"{text}"'


@dataclass
class _Table:
    chains: dict[str, None] = field(default_factory=dict)    # insertion-ordered set
    rules: list[str] = field(default_factory=list)

    def chain(self, name: str) -> None:
        self.chains.setdefault(name, None)

    def add(self, chain: str, *spec: str) -> None:
        self.rules.append(" ".join(["-A", chain, *spec]))


class IptablesRules:
    """Renders the ``iptables-restore --noflush`` input for one node (pure).

    In the node's ``nat`` table (what ``iptables-save`` shows on a Kubernetes node)::

        PREROUTING, OUTPUT  -> KUBE-SERVICES          "kubernetes service portals"
        KUBE-SERVICES       -d <clusterIP> --dport <port>       -> KUBE-SVC-<hash>
                            -d <loadBalancerIP> --dport <port>  -> KUBE-EXT-<hash>
                            last: --dst-type LOCAL               -> KUBE-NODEPORTS
        KUBE-NODEPORTS      --dport <nodePort>                   -> KUBE-EXT-<hash>
        KUBE-SVC-<hash>     ! -s <clusterCIDR> -> KUBE-MARK-MASQ (traffic from outside the pod network)
                            [ClientIP affinity: -m recent --rcheck per endpoint]
                            -m statistic --mode random --probability 1/n, 1/(n-1), ... -> KUBE-SEP-<hash>
        KUBE-EXT-<hash>     Cluster policy: -> KUBE-MARK-MASQ, -> KUBE-SVC-<hash>
                            Local policy:   pods and the node itself -> KUBE-SVC-<hash>; the rest
                                            -> KUBE-SVL-<hash> (this node's endpoints only, no SNAT:
                                            the backend sees the client's address)
        KUBE-SEP-<hash>     -s <pod>/32 -> KUBE-MARK-MASQ (hairpin: a pod reaching itself)
                            DNAT --to-destination <pod>:<port>
        KUBE-MARK-MASQ      MARK --or-mark 0x4000;  POSTROUTING -> KUBE-POSTROUTING: MASQUERADE marked

    and in ``filter``: ``KUBE-SERVICES`` / ``KUBE-EXTERNAL-SERVICES`` REJECT traffic to services
    without endpoints (connections are refused at once instead of timing out) and DROP nodePort
    traffic of ``externalTrafficPolicy: Local`` services on nodes without a local endpoint;
    ``KUBE-FORWARD`` accepts marked and established traffic.

    Chain names hash the ServicePortName like kube-proxy (base32 of the sha256 of
    ``"ns/name:port" + "tcp"``, 16 characters), so they are the names a real node would show.
    Every sync writes one ``iptables-restore --noflush`` batch. As kube-proxy's partial syncs
    (MinimizeIPTablesRestore) do, it rewrites the top-level chains (KUBE-SERVICES, KUBE-NODEPORTS,
    the filter chains...) and only those per-Service chains whose rules changed, and deletes the
    chains no longer needed; a full sync rewrites every KUBE-* chain (the first one, after a
    failure, hourly, and whenever the node's rules are not as the last restore left them). That
    last check does not trust kube-proxy's canary chain alone (``iptables -t nat -F`` or deleting
    the jumps leaves it in place): each sync compares a fingerprint of the node's whole ruleset,
    taken right after our own restore, with the kernel's (:mod:`.ruleset`: one netlink request).
    A full sync first lists the built-in chains and adds the jumps from them that are missing, so
    other users of the tables are untouched.
    Rendering (:class:`IptablesRules`) is pure and unit-tested without root.
    """

    def __init__(self, node: str, cluster_cidr: str, masquerade_all: bool = False):
        self.node = node
        self.cluster_cidr = cluster_cidr
        self.masquerade_all = masquerade_all

    def render(self, snap: Snapshot, previous: set[tuple[str, str]] | None = None,
               missing_jumps: list[Jump] | tuple[Jump, ...] = ()) -> tuple[str, set[tuple[str, str]]]:
        """Return (restore input, the set of (table, chain) it leaves in place). Chains of
        ``previous`` that are no longer needed are flushed and deleted."""
        text, chains, _ = self.render_partial(snap, previous, missing_jumps, written=None)
        return text, chains

    def render_partial(self, snap: Snapshot, previous: set[tuple[str, str]] | None,
                       missing_jumps: list[Jump] | tuple[Jump, ...],
                       written: dict[str, tuple[str, ...]] | None
                       ) -> tuple[str, set[tuple[str, str]], dict[str, tuple[str, ...]]]:
        """kube-proxy's partial sync (MinimizeIPTablesRestore): a per-Service chain (SVC,
        SVL, EXT, SEP) whose rules equal what ``written`` says was last restored is left out
        of the batch (``--noflush`` leaves it as it is); the top-level chains are always
        rewritten. ``written=None`` writes everything (a full sync). Returns the text, the
        chains left in place and what the per-Service chains now hold."""
        nat, flt = self._tables(snap)
        now = {("nat", c) for c in nat.chains} | {("filter", c) for c in flt.chains} | \
            {(t, CANARY) for t in CANARY_TABLES}
        stale = sorted((previous or set()) - now)
        by_chain: dict[str, list[str]] = {}
        for rule in nat.rules:
            by_chain.setdefault(rule.split(" ", 2)[1], []).append(rule)
        holds = {c: tuple(by_chain.get(c, ())) for c in nat.chains if c.startswith(SERVICE_CHAIN_PREFIXES)}
        same = set() if written is None else {c for c, rules in holds.items() if written.get(c) == rules}
        out: list[str] = [] if written is not None else ["*mangle", f":{CANARY} - [0:0]", "COMMIT"]
        for table, t in (("filter", flt), ("nat", nat)):
            gone = [c for tb, c in stale if tb == table]
            out.append(f"*{table}")
            if written is None:
                out.append(f":{CANARY} - [0:0]")
            out += [f":{c} - [0:0]" for c in [*t.chains, *gone] if table == "filter" or c not in same]
            for j in missing_jumps:
                if j.table == table:
                    out.append(" ".join(["-I", j.chain, "1", *j.spec()]))
            out += t.rules if table == "filter" or not same else \
                [r for r in t.rules if r.split(" ", 2)[1] not in same]
            out += [f"-X {c}" for c in gone]
            out.append("COMMIT")
        return "\n".join(out) + "\n", now, holds

    def _tables(self, snap: Snapshot) -> tuple[_Table, _Table]:
        """Every chain and rule of this node, nat and filter."""
        nat, flt = _Table(), _Table()
        for name in BASE_CHAINS["nat"]:
            nat.chain(name)
        for name in BASE_CHAINS["filter"]:
            flt.chain(name)
        self._static(nat, flt)
        for svc in sorted(snap.services, key=lambda s: s.key):
            if svc.headless or not svc.cluster_ip:
                continue
            for port in svc.ports:
                self._service_port(nat, flt, svc, port, snap.port_endpoints(svc, port))
        nat.add("KUBE-SERVICES", "-m", "comment", "--comment", _q(NODEPORTS_COMMENT),
                "-m", "addrtype", "--dst-type", "LOCAL", "-j", "KUBE-NODEPORTS")
        return nat, flt

    def _static(self, nat: _Table, flt: _Table) -> None:
        nat.add("KUBE-POSTROUTING", "-m", "mark", "!", "--mark", f"{MASQ_MARK}/{MASQ_MARK}", "-j", "RETURN")
        nat.add("KUBE-POSTROUTING", "-j", "MARK", "--xor-mark", MASQ_MARK)
        nat.add("KUBE-POSTROUTING", "-m", "comment", "--comment", _q("kubernetes service traffic requiring SNAT"),
                "-j", "MASQUERADE", "--random-fully")
        nat.add("KUBE-MARK-MASQ", "-j", "MARK", "--or-mark", MASQ_MARK)
        flt.add("KUBE-FORWARD", "-m", "conntrack", "--ctstate", "INVALID", "-j", "DROP")
        flt.add("KUBE-FORWARD", "-m", "comment", "--comment", _q("kubernetes forwarding rules"),
                "-m", "mark", "--mark", f"{MASQ_MARK}/{MASQ_MARK}", "-j", "ACCEPT")
        flt.add("KUBE-FORWARD", "-m", "comment", "--comment", _q("kubernetes forwarding conntrack rule"),
                "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", "ACCEPT")

    def _service_port(self, nat: _Table, flt: _Table, svc: Service, port: ServicePort,
                      eps: list[tuple[Endpoint, int]]) -> None:
        name = svc.port_name(port)
        proto = port.protocol.lower()
        dport = ["-m", proto, "--dport", str(port.port)]
        cip = ["-d", f"{svc.cluster_ip}/32", "-p", proto]
        svc_c, ext_c, svl_c = svc_chain(name, proto), ext_chain(name, proto), svl_chain(name, proto)
        local = [(e, p) for e, p in eps if e.node == self.node]
        if not eps:    # no endpoints at all: refuse at once (filter table), nothing in nat
            reject = ["-j", "REJECT", "--reject-with", "icmp-port-unreachable"]
            flt.add("KUBE-SERVICES", *cip, "-m", "comment", "--comment", _q(f"{name} has no endpoints"),
                    *dport, *reject)
            if svc.load_balancer_ip:
                flt.add("KUBE-EXTERNAL-SERVICES", "-d", f"{svc.load_balancer_ip}/32", "-p", proto,
                        "-m", "comment", "--comment", _q(f"{name} has no endpoints"), *dport, *reject)
            if port.node_port is not None:
                flt.add("KUBE-EXTERNAL-SERVICES", "-p", proto, "-m", "comment",
                        "--comment", _q(f"{name} has no endpoints"), "-m", "addrtype", "--dst-type", "LOCAL",
                        "-m", proto, "--dport", str(port.node_port), *reject)
            return
        nat.chain(svc_c)
        nat.add("KUBE-SERVICES", *cip, "-m", "comment", "--comment", _q(f"{name} cluster IP"), *dport,
                "-j", svc_c)
        masq_from = [] if self.masquerade_all else ["!", "-s", self.cluster_cidr]
        nat.add(svc_c, *masq_from, *cip, "-m", "comment", "--comment", _q(f"{name} cluster IP"), *dport,
                "-j", "KUBE-MARK-MASQ")
        self._to_endpoints(nat, svc_c, svc, name, proto, eps)
        if svc.external:
            nat.chain(ext_c)
            if svc.external_traffic_policy == "Cluster":
                nat.add(ext_c, "-m", "comment", "--comment", _q(f"masquerade traffic for {name} external destinations"),
                        "-j", "KUBE-MARK-MASQ")
                nat.add(ext_c, "-j", svc_c)
            else:
                nat.add(ext_c, "-s", self.cluster_cidr, "-m", "comment",
                        "--comment", _q(f"pod traffic for {name} external destinations"), "-j", svc_c)
                nat.add(ext_c, "-m", "comment", "--comment", _q(f"masquerade LOCAL traffic for {name} external destinations"),
                        "-m", "addrtype", "--src-type", "LOCAL", "-j", "KUBE-MARK-MASQ")
                nat.add(ext_c, "-m", "comment", "--comment", _q(f"route LOCAL traffic for {name} external destinations"),
                        "-m", "addrtype", "--src-type", "LOCAL", "-j", svc_c)
                if local:
                    nat.chain(svl_c)
                    nat.add(ext_c, "-j", svl_c)
                    self._to_endpoints(nat, svl_c, svc, name, proto, local)
                else:   # a cloud LB's health check would skip this node: drop, do not forward
                    drop = ["-m", "comment", "--comment", _q(f"{name} has no local endpoints")]
                    if svc.load_balancer_ip:
                        flt.add("KUBE-EXTERNAL-SERVICES", "-d", f"{svc.load_balancer_ip}/32", "-p", proto,
                                *drop, *dport, "-j", "DROP")
                    if port.node_port is not None:
                        flt.add("KUBE-EXTERNAL-SERVICES", "-p", proto, *drop, "-m", "addrtype", "--dst-type",
                                "LOCAL", "-m", proto, "--dport", str(port.node_port), "-j", "DROP")
            if svc.load_balancer_ip:
                nat.add("KUBE-SERVICES", "-d", f"{svc.load_balancer_ip}/32", "-p", proto, "-m", "comment",
                        "--comment", _q(f"{name} loadbalancer IP"), *dport, "-j", ext_c)
            if port.node_port is not None:
                nat.add("KUBE-NODEPORTS", "-p", proto, "-m", "comment", "--comment", _q(name),
                        "-m", proto, "--dport", str(port.node_port), "-j", ext_c)
        for e, p in eps:
            self._endpoint(nat, svc, name, proto, e, p)

    def _to_endpoints(self, nat: _Table, chain: str, svc: Service, name: str, proto: str,
                      eps: list[tuple[Endpoint, int]]) -> None:
        if svc.session_affinity == "ClientIP":
            for e, p in eps:
                sep = sep_chain(name, proto, f"{e.ip}:{p}")
                nat.add(chain, "-m", "comment", "--comment", _q(f"{name} -> {e.ip}:{p}"),
                        "-m", "recent", "--name", sep, "--mask", "255.255.255.255", "--rsource", "--rcheck",
                        "--seconds", str(svc.affinity_timeout), "--reap", "-j", sep)
        n = len(eps)
        for i, (e, p) in enumerate(eps):
            sep = sep_chain(name, proto, f"{e.ip}:{p}")
            stat = ["-m", "statistic", "--mode", "random", "--probability", probability(i, n)] if i < n - 1 else []
            nat.add(chain, "-m", "comment", "--comment", _q(f"{name} -> {e.ip}:{p}"), *stat, "-j", sep)

    def _endpoint(self, nat: _Table, svc: Service, name: str, proto: str, e: Endpoint, p: int) -> None:
        sep = sep_chain(name, proto, f"{e.ip}:{p}")
        if sep in nat.chains:
            return
        nat.chain(sep)
        nat.add(sep, "-s", f"{e.ip}/32", "-m", "comment", "--comment", _q(name), "-j", "KUBE-MARK-MASQ")
        recent = ["-m", "recent", "--set", "--name", sep, "--mask", "255.255.255.255", "--rsource"] \
            if svc.session_affinity == "ClientIP" else []
        nat.add(sep, "-p", proto, "-m", "comment", "--comment", _q(name), *recent, "-m", proto,
                "-j", "DNAT", "--to-destination", f"{e.ip}:{p}")


def present_jumps(listing: dict[tuple[str, str], str]) -> set[Jump]:
    """Which of :data:`JUMPS` an ``iptables -S <chain>`` listing per built-in chain shows."""
    found = set()
    for j in JUMPS:
        rules = listing.get((j.table, j.chain), "")
        for line in rules.splitlines():
            if line.startswith(f"-A {j.chain} ") and line.rstrip().endswith(f"-j {j.target}") \
                    and j.comment in line:
                found.add(j)
    return found


class IptablesProxier(Proxier):
    mode = "iptables"
    tools = ("iptables", "iptables-restore", "iptables-save")

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.rules = IptablesRules(self.node.name, self.cluster_cidr, self.options.masquerade_all)
        self._chains: set[tuple[str, str]] = set()
        # what the per-Service chains held after the last successful restore; empty: the
        # next sync is a full one (at start, after a failure)
        self._written: dict[str, tuple[str, ...]] = {}
        self._last_full = 0.0
        # fixed at start: after a switch of backend this proxier still removes its own rules
        self.iptables = f"iptables-{self.options.iptables_backend}"
        self.watch = RulesetWatch(self.node.netns, self.options.iptables_backend, CANARY_TABLES)
        self.full_syncs = 0

    def start(self) -> None:
        self.bridge_netfilter()

    def sync(self, snap: Snapshot) -> None:
        """One restore: a partial sync (the top-level chains and the per-Service chains that
        changed) unless a full one is due: the first, one after a failure, one every
        :data:`FULL_SYNC_PERIOD`, and one whenever the node's rules are not as this proxier
        left them (:meth:`rules_changed`: flushed tables, deleted jumps or rules, anyone
        else's write). Only a full sync lists the built-in chains to re-add missing jumps: on a
        node with thousands of rules each listing costs a table dump."""
        before = self.watch.fingerprint()
        full = not self._written or time.monotonic() - self._last_full > FULL_SYNC_PERIOD or \
            self.watch.changed(before)
        missing = [j for j in JUMPS if j not in present_jumps(self._list_builtin())] if full else []
        text, chains, holds = self.rules.render_partial(snap, self._chains, missing,
                                                        written=None if full else self._written)
        self._written = {}
        self.watch.forget()
        self.restore(text)
        self.watch.wrote(before, text.count("\nCOMMIT"))
        self._chains, self._written = chains, holds
        self.synced(snap, full)

    def rules_changed(self) -> bool:
        """Are the node's rules other than this proxier's last restore left them? One netlink
        request (see :mod:`.ruleset`), whatever the number of rules."""
        return self.watch.changed(self.watch.fingerprint())

    def restore(self, text: str) -> None:
        """One ``iptables-restore --noflush`` (``-w``: wait for the xtables lock)."""
        self.node.run([f"{self.iptables}-restore", "-w", "5", "--noflush"], input=text)

    def _list_builtin(self) -> dict[tuple[str, str], str]:
        """The rules of the built-in chains we jump from: one ``iptables-save -t TABLE`` per table."""
        listing = {key: "" for key in BUILTIN}
        for table in sorted({t for t, _ in BUILTIN}):
            for line in self.node.run([f"{self.iptables}-save", "-t", table]).stdout.splitlines():
                parts = line.split(maxsplit=2)
                if len(parts) > 1 and parts[0] == "-A" and (table, parts[1]) in listing:
                    listing[(table, parts[1])] += line + "\n"
        return listing

    def stop(self) -> None:
        """Delete our jumps and every KUBE-* chain this proxier made."""
        try:
            present = present_jumps(self._list_builtin())
            out: list[str] = []
            for table in ("mangle", "filter", "nat"):
                chains = sorted(c for t, c in self._chains if t == table)
                out.append(f"*{table}")
                out += [f":{c} - [0:0]" for c in chains]
                out += [" ".join(["-D", j.chain, *j.spec()]) for j in JUMPS if j.table == table and j in present]
                out += [f"-X {c}" for c in chains]
                out.append("COMMIT")
            self.restore("\n".join(out) + "\n")
            self._chains.clear()
            self._written = {}
            self.watch.forget()
        except K8sNetLabError as e:
            log.warning("kube-proxy (iptables) on %s: could not remove rules: %s", self.node.name, e)
        super().stop()
