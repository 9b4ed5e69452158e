"""Namespaces and NetworkPolicies (``networking.k8s.io/v1``): schema, validation, semantics.

Pure: no root, no datapath. :func:`parse_namespace` and :func:`parse_policy` read Kubernetes'
own schema and refuse what the API server would; :class:`PolicyModel` says what the policies
allow, with the reason. Namespaces carry ``kubernetes.io/metadata.name`` as the API server sets it.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Any, Iterable

from ..errors import SpecError
from ..manifests import check_name

API_VERSION = "networking.k8s.io/v1"
NAME_LABEL = "kubernetes.io/metadata.name"
BUILTIN_NAMESPACES = ("default", "kube-system")
OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")
PROTOCOLS = ("TCP", "UDP", "SCTP")
POLICY_TYPES = ("Ingress", "Egress")
_PORT_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_LABEL_KEY_RE = re.compile(r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")


# -- the objects ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Requirement:
    key: str
    operator: str
    values: tuple[str, ...] = ()

    def matches(self, labels: dict[str, str]) -> bool:
        if self.operator == "In":
            return labels.get(self.key) in self.values
        if self.operator == "NotIn":
            return self.key not in labels or labels[self.key] not in self.values
        if self.operator == "Exists":
            return self.key in labels
        return self.key not in labels                       # DoesNotExist

    def __str__(self) -> str:
        if self.operator == "Exists":
            return self.key
        if self.operator == "DoesNotExist":
            return f"!{self.key}"
        return f"{self.key} {self.operator.lower()} ({','.join(self.values)})"


@dataclass(frozen=True)
class Selector:
    """A LabelSelector: matchLabels and matchExpressions, ANDed; empty selects everything."""
    match_labels: tuple[tuple[str, str], ...] = ()
    expressions: tuple[Requirement, ...] = ()

    def matches(self, labels: dict[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in self.match_labels) and \
            all(r.matches(labels) for r in self.expressions)

    @property
    def empty(self) -> bool:
        return not self.match_labels and not self.expressions

    def __str__(self) -> str:
        parts = [f"{k}={v}" for k, v in self.match_labels] + [str(r) for r in self.expressions]
        return ",".join(parts) or "(all)"


@dataclass(frozen=True)
class IPBlock:
    cidr: IPv4Network
    excepts: tuple[IPv4Network, ...] = ()

    def contains(self, ip: IPv4Address) -> bool:
        return ip in self.cidr and not any(ip in e for e in self.excepts)

    def __str__(self) -> str:
        return str(self.cidr) + (f" except {','.join(map(str, self.excepts))}" if self.excepts else "")


@dataclass(frozen=True)
class Peer:
    pod_selector: Selector | None = None
    namespace_selector: Selector | None = None
    ip_block: IPBlock | None = None

    def describe(self, policy_ns: str) -> str:
        if self.ip_block is not None:
            return f"ipBlock {self.ip_block}"
        ns = f"namespaces [{self.namespace_selector}]" if self.namespace_selector is not None \
            else f"namespace {policy_ns}"
        pods = f"pods [{self.pod_selector}]" if self.pod_selector is not None else "all pods"
        return f"{pods} in {ns}"


@dataclass(frozen=True)
class PolicyPort:
    protocol: str = "TCP"
    port: int | str | None = None       # None: every port of the protocol
    end_port: int | None = None

    def __str__(self) -> str:
        if self.port is None:
            return f"{self.protocol}/*"
        end = f"-{self.end_port}" if self.end_port else ""
        return f"{self.protocol}/{self.port}{end}"


@dataclass(frozen=True)
class Rule:
    peers: tuple[Peer, ...] = ()        # empty: every peer
    ports: tuple[PolicyPort, ...] = ()  # empty: every port


@dataclass(frozen=True)
class NetworkPolicy:
    name: str
    namespace: str
    pod_selector: Selector
    ingress: tuple[Rule, ...] = ()
    egress: tuple[Rule, ...] = ()
    policy_types: tuple[str, ...] = ("Ingress",)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def rules(self, direction: str) -> tuple[Rule, ...]:
        return self.ingress if direction == "Ingress" else self.egress


@dataclass(frozen=True)
class Namespace:
    name: str
    labels: dict[str, str] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class PodInfo:
    """What the policies look at of a pod."""
    name: str
    namespace: str
    labels: dict[str, str] = field(default_factory=dict, hash=False)
    ip: str | None = None
    node: str | None = None
    ports: tuple[tuple[str, str, int], ...] = ()     # (name, protocol, containerPort)
    host: str = ""                                   # the Mininet host name

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def named_port(self, name: str, protocol: str) -> int | None:
        return next((n for pn, proto, n in self.ports if pn == name and proto == protocol), None)


# -- parsing (the API server's validation) -----------------------------------------------------------
def _keys(d: Any, where: str, allowed: tuple[str, ...]) -> dict[str, Any]:
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise SpecError(f"{where}: must be a mapping with keys {', '.join(allowed)}")
    bad = [k for k in d if k not in allowed]
    if bad:
        raise SpecError(f"{where}: unknown field {bad[0]!r}: valid fields are {', '.join(allowed)}")
    return d


def _list(v: Any, where: str) -> list[Any]:
    if v is None:
        return []
    if not isinstance(v, list):
        raise SpecError(f"{where}: must be a list")
    return v


def parse_labels(d: Any, where: str) -> dict[str, str]:
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise SpecError(f"{where}: must be a mapping of label keys to values")
    out = {}
    for k, v in d.items():
        if not isinstance(k, str) or not _LABEL_KEY_RE.match(k):
            raise SpecError(f"{where}: {k!r} is not a valid label key")
        if not isinstance(v, (str, int, float, bool)) or isinstance(v, bool):
            raise SpecError(f"{where}.{k}: label values are strings")
        out[k] = str(v)
    return out


def parse_selector(d: Any, where: str) -> Selector:
    d = _keys(d, where, ("matchLabels", "matchExpressions"))
    labels = parse_labels(d.get("matchLabels"), f"{where}.matchLabels")
    reqs = []
    for i, e in enumerate(_list(d.get("matchExpressions"), f"{where}.matchExpressions")):
        w = f"{where}.matchExpressions[{i}]"
        e = _keys(e, w, ("key", "operator", "values"))
        key = e.get("key")
        if not isinstance(key, str) or not _LABEL_KEY_RE.match(key):
            raise SpecError(f"{w}.key: {key!r} is not a valid label key")
        op = e.get("operator")
        if op not in OPERATORS:
            raise SpecError(f"{w}.operator: {op!r} is not a valid selector operator: use one of {', '.join(OPERATORS)}")
        values = _list(e.get("values"), f"{w}.values")
        if not all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in values):
            raise SpecError(f"{w}.values: must be a list of strings")
        if op in ("In", "NotIn") and not values:
            raise SpecError(f"{w}.values: operator {op} needs at least one value")
        if op in ("Exists", "DoesNotExist") and values:
            raise SpecError(f"{w}.values: operator {op} takes no values: remove them")
        reqs.append(Requirement(key, op, tuple(str(v) for v in values)))
    return Selector(tuple(sorted(labels.items())), tuple(reqs))


def _cidr(v: Any, where: str) -> IPv4Network:
    try:
        return ipaddress.IPv4Network(str(v), strict=True) if isinstance(v, str) else _bad_cidr(v, where)
    except ValueError as e:
        raise SpecError(f"{where}: {v!r} is not a valid IPv4 CIDR ({e}); write it like 10.0.0.0/24") from None


def _bad_cidr(v: Any, where: str) -> IPv4Network:
    raise SpecError(f"{where}: {v!r} is not a valid IPv4 CIDR; write it like 10.0.0.0/24")


def _peer(d: Any, where: str) -> Peer:
    d = _keys(d, where, ("podSelector", "namespaceSelector", "ipBlock"))
    if not d:
        raise SpecError(f"{where}: a peer needs podSelector, namespaceSelector or ipBlock")
    if "ipBlock" in d:
        if len(d) > 1:
            raise SpecError(f"{where}: ipBlock may not be combined with podSelector or namespaceSelector "
                            "in one peer: make it a peer of its own")
        b = _keys(d["ipBlock"], f"{where}.ipBlock", ("cidr", "except"))
        if "cidr" not in b:
            raise SpecError(f"{where}.ipBlock.cidr: required")
        cidr = _cidr(b["cidr"], f"{where}.ipBlock.cidr")
        excepts = []
        for i, e in enumerate(_list(b.get("except"), f"{where}.ipBlock.except")):
            net = _cidr(e, f"{where}.ipBlock.except[{i}]")
            if not net.subnet_of(cidr) or net == cidr:
                raise SpecError(f"{where}.ipBlock.except[{i}]: {net} must be strictly within cidr {cidr}")
            excepts.append(net)
        return Peer(ip_block=IPBlock(cidr, tuple(excepts)))
    pod = parse_selector(d["podSelector"], f"{where}.podSelector") if "podSelector" in d else None
    ns = parse_selector(d["namespaceSelector"], f"{where}.namespaceSelector") if "namespaceSelector" in d else None
    return Peer(pod, ns)


def _port(d: Any, where: str) -> PolicyPort:
    d = _keys(d, where, ("protocol", "port", "endPort"))
    proto = d.get("protocol", "TCP")
    if proto not in PROTOCOLS:
        raise SpecError(f"{where}.protocol: {proto!r} must be one of {', '.join(PROTOCOLS)}")
    port = d.get("port")
    if isinstance(port, bool) or (port is not None and not isinstance(port, (int, str))):
        raise SpecError(f"{where}.port: must be a port number or a container port name")
    if isinstance(port, int) and not 1 <= port <= 65535:
        raise SpecError(f"{where}.port: {port} must be 1-65535")
    if isinstance(port, str):
        if port.isdigit():
            port = int(port)
        elif not _PORT_NAME_RE.match(port) or len(port) > 15:
            raise SpecError(f"{where}.port: {port!r} is not a port number or a valid port name")
    end = d.get("endPort")
    if end is not None:
        if not isinstance(end, int) or isinstance(end, bool) or not 1 <= end <= 65535:
            raise SpecError(f"{where}.endPort: must be a port number 1-65535")
        if not isinstance(port, int):
            raise SpecError(f"{where}.endPort: needs a numeric port (a range cannot start at a named port)")
        if end < port:
            raise SpecError(f"{where}.endPort: {end} is below port {port}: endPort must be >= port")
    return PolicyPort(proto, port, end)


def _rules(items: Any, where: str, peers_key: str) -> tuple[Rule, ...]:
    out = []
    for i, r in enumerate(_list(items, where)):
        w = f"{where}[{i}]"
        r = _keys(r, w, (peers_key, "ports"))
        peers = tuple(_peer(p, f"{w}.{peers_key}[{j}]") for j, p in enumerate(_list(r.get(peers_key), f"{w}.{peers_key}")))
        ports = tuple(_port(p, f"{w}.ports[{j}]") for j, p in enumerate(_list(r.get("ports"), f"{w}.ports")))
        out.append(Rule(peers, ports))
    return tuple(out)


def _meta(doc: dict[str, Any], where: str) -> tuple[str, str | None, dict[str, str]]:
    meta = _keys(doc.get("metadata"), f"{where}.metadata", ("name", "namespace", "labels", "annotations"))
    name = check_name(meta.get("name"), f"{where}.metadata.name")
    ns = meta.get("namespace")
    if ns is not None:
        ns = check_name(ns, f"{where}.metadata.namespace")
    return name, ns, parse_labels(meta.get("labels"), f"{where}.metadata.labels")


def parse_namespace(doc: Any, where: str) -> Namespace:
    doc = _keys(doc, where, ("apiVersion", "kind", "metadata", "spec"))
    if doc.get("apiVersion", "v1") != "v1":
        raise SpecError(f"{where}.apiVersion: a Namespace is apiVersion v1")
    name, ns, labels = _meta(doc, where)
    if ns is not None:
        raise SpecError(f"{where}.metadata.namespace: a Namespace is not namespaced: remove it")
    labels[NAME_LABEL] = name
    return Namespace(name, labels)


def parse_policy(doc: Any, where: str) -> NetworkPolicy:
    doc = _keys(doc, where, ("apiVersion", "kind", "metadata", "spec"))
    if doc.get("apiVersion") != API_VERSION:
        raise SpecError(f"{where}.apiVersion: {doc.get('apiVersion')!r}: a NetworkPolicy is apiVersion {API_VERSION}")
    if doc.get("kind") != "NetworkPolicy":
        raise SpecError(f"{where}.kind: must be NetworkPolicy")
    name, ns, _ = _meta(doc, where)
    spec = _keys(doc.get("spec"), f"{where}.spec", ("podSelector", "ingress", "egress", "policyTypes"))
    if "podSelector" not in spec:
        raise SpecError(f"{where}.spec.podSelector: required (use {{}} to select every pod of the namespace)")
    sel = parse_selector(spec["podSelector"], f"{where}.spec.podSelector")
    ingress = _rules(spec.get("ingress"), f"{where}.spec.ingress", "from")
    egress = _rules(spec.get("egress"), f"{where}.spec.egress", "to")
    if "policyTypes" in spec:
        types = _list(spec["policyTypes"], f"{where}.spec.policyTypes")
        for t in types:
            if t not in POLICY_TYPES:
                raise SpecError(f"{where}.spec.policyTypes: {t!r} must be Ingress or Egress")
        if not types:
            raise SpecError(f"{where}.spec.policyTypes: list Ingress, Egress or both (or leave it out)")
        ptypes = tuple(t for t in POLICY_TYPES if t in types)
    else:   # the API server's default
        ptypes = ("Ingress", "Egress") if egress else ("Ingress",)
    return NetworkPolicy(name, ns or "default", sel, ingress, egress, ptypes)


# -- semantics ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Match:
    """One rule that allowed a flow: the policy, the direction, the rule's index."""
    policy: str
    direction: str
    rule: int

    def __str__(self) -> str:
        return f"{self.policy} {self.direction.lower()} rule {self.rule}"


@dataclass(frozen=True)
class Decision:
    """One direction (egress at the source, ingress at the destination) of a flow."""
    allowed: bool
    isolated: bool
    policies: tuple[str, ...] = ()           # the policies that isolate the pod this way
    match: Match | None = None
    why: str = ""


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    egress: Decision
    ingress: Decision

    def explain(self) -> str:
        parts = []
        for d, name in ((self.egress, "egress"), (self.ingress, "ingress")):
            parts.append(f"{name}: {d.why}")
        return ("ALLOWED" if self.allowed else "DENIED") + " -- " + "; ".join(parts)


Endpoint = PodInfo | str      # a pod, or an address outside the pods


class PolicyModel:
    """Expected reachability from namespaces, pods and policies (no datapath), by the API's
    semantics:

    - a pod is isolated for ingress (egress) when a policy of its namespace selects it and lists
      ``Ingress`` (``Egress``) in ``policyTypes`` (default: Ingress, plus Egress when the policy
      has egress rules); an isolated pod takes only what some selecting policy's rule allows;
      policies only ever add;
    - a rule without ``from``/``to`` matches every peer, without ``ports`` every port; an empty
      rule list isolates and allows nothing (default deny);
    - a peer with ``podSelector`` only: pods of the policy's namespace; ``namespaceSelector``
      only: every pod of the matching namespaces; both: the matching pods of the matching
      namespaces; ``ipBlock``: addresses in ``cidr`` and in no ``except`` (as Calico, pod
      addresses too);
    - a named port is the destination pod's container port of that name and protocol;
    - a connection needs egress allowed at its source pod and ingress at its destination pod;
      a pod always reaches itself and the node it runs on reaches it (kubelet probes); replies
      of allowed connections pass.
    """

    def __init__(self, namespaces: dict[str, dict[str, str]], pods: Iterable[PodInfo],
                 policies: Iterable[NetworkPolicy], node_ips: dict[str, set[str]] | None = None):
        self.namespaces = {n: {**labels, NAME_LABEL: n} for n, labels in namespaces.items()}
        self.pods = list(pods)
        self.policies = sorted(policies, key=lambda p: p.key)
        self.node_ips = node_ips or {}            # node -> its own addresses
        # indexes built on first use (a model is not changed after it is made): pods by label,
        # the policies isolating each pod, the pods of each selector peer
        self._by_label: dict[tuple[str, str], list[PodInfo]] | None = None
        self._isolating: dict[tuple[int, str], list[NetworkPolicy]] | None = None
        self._pod_ids = {id(p) for p in self.pods}
        self._peers: dict[tuple[Peer, str], list[PodInfo]] = {}

    def ns_labels(self, ns: str) -> dict[str, str]:
        return self.namespaces.get(ns, {NAME_LABEL: ns})

    def _candidates(self, selector: Selector | None) -> list[PodInfo]:
        """The pods that may match ``selector`` (in the order of ``pods``): those that carry the
        rarest of its matchLabels pairs, or all. At 1,000 pods and 1,000 policies this turns a
        million selector matches per sync into a few thousand."""
        if selector is None or not selector.match_labels:
            return self.pods
        if self._by_label is None:
            self._by_label = {}
            for p in self.pods:
                for kv in p.labels.items():
                    self._by_label.setdefault(kv, []).append(p)
        return min((self._by_label.get(kv, []) for kv in selector.match_labels), key=len)

    def selecting(self, pod: PodInfo, direction: str) -> list[NetworkPolicy]:
        """The policies that isolate ``pod`` in ``direction`` (Ingress/Egress), in key order."""
        if id(pod) not in self._pod_ids:
            return [p for p in self.policies if p.namespace == pod.namespace and direction in p.policy_types
                    and p.pod_selector.matches(pod.labels)]
        if self._isolating is None:
            self._isolating = {}
            for pol in self.policies:
                for p in self._candidates(pol.pod_selector):
                    if p.namespace == pol.namespace and pol.pod_selector.matches(p.labels):
                        for d in pol.policy_types:
                            self._isolating.setdefault((id(p), d), []).append(pol)
        return list(self._isolating.get((id(pod), direction), ()))

    def peer_pods(self, peer: Peer, policy_ns: str) -> list[PodInfo]:
        """The pods a selector peer matches (an ipBlock peer: none by selection)."""
        if peer.ip_block is not None:
            return []
        got = self._peers.get((peer, policy_ns))
        if got is None:
            got = [p for p in self._candidates(peer.pod_selector) if self._peer_selects(peer, policy_ns, p)]
            self._peers[(peer, policy_ns)] = got
        return list(got)

    def _peer_selects(self, peer: Peer, policy_ns: str, pod: PodInfo) -> bool:
        if peer.namespace_selector is None:
            ns_ok = pod.namespace == policy_ns
        else:
            ns_ok = peer.namespace_selector.matches(self.ns_labels(pod.namespace))
        return ns_ok and (peer.pod_selector is None or peer.pod_selector.matches(pod.labels))

    def peer_matches(self, peer: Peer, policy_ns: str, other: Endpoint) -> bool:
        if peer.ip_block is not None:
            ip = other.ip if isinstance(other, PodInfo) else other
            return ip is not None and peer.ip_block.contains(IPv4Address(ip))
        return isinstance(other, PodInfo) and self._peer_selects(peer, policy_ns, other)

    @staticmethod
    def port_matches(pp: PolicyPort, protocol: str, port: int, dst: Endpoint) -> bool:
        if pp.protocol != protocol:
            return False
        if pp.port is None:
            return True
        if isinstance(pp.port, str):
            return isinstance(dst, PodInfo) and dst.named_port(pp.port, protocol) == port
        if pp.end_port is not None:
            return pp.port <= port <= pp.end_port
        return pp.port == port

    def _direction(self, pod: PodInfo, other: Endpoint, dst: Endpoint, protocol: str, port: int,
                   direction: str) -> Decision:
        pols = self.selecting(pod, direction)
        if not pols:
            return Decision(True, False, why=f"{pod.key} is not isolated for {direction.lower()}")
        keys = tuple(p.key for p in pols)
        for p in pols:
            for i, rule in enumerate(p.rules(direction)):
                peer_ok = not rule.peers or any(self.peer_matches(pe, p.namespace, other) for pe in rule.peers)
                port_ok = not rule.ports or any(self.port_matches(pp, protocol, port, dst) for pp in rule.ports)
                if peer_ok and port_ok:
                    m = Match(p.key, direction, i)
                    return Decision(True, True, keys, m, f"allowed by {m}")
        return Decision(False, True, keys, None,
                        f"{pod.key} is isolated for {direction.lower()} by {', '.join(keys)} and no rule allows it")

    def verdict(self, src: Endpoint, dst: Endpoint, port: int, protocol: str = "TCP") -> Verdict:
        """May ``src`` open a ``protocol`` connection to ``dst``:``port``?"""
        free = Decision(True, False, why="not a pod")
        if isinstance(src, PodInfo) and isinstance(dst, PodInfo) and src.key == dst.key:
            me = Decision(True, False, why="a pod always reaches itself")
            return Verdict(True, me, me)
        egress = self._direction(src, dst, dst, protocol, port, "Egress") if isinstance(src, PodInfo) else free
        if isinstance(dst, PodInfo) and isinstance(src, str) and dst.node and src in self.node_ips.get(dst.node, ()):
            ingress = Decision(True, False, why=f"the node {dst.node} always reaches its own pods")
        elif isinstance(dst, PodInfo):
            ingress = self._direction(dst, src, dst, protocol, port, "Ingress")
        else:
            ingress = free
        return Verdict(egress.allowed and ingress.allowed, egress, ingress)

    def allowed(self, src: Endpoint, dst: Endpoint, port: int, protocol: str = "TCP") -> bool:
        return self.verdict(src, dst, port, protocol).allowed

    def matrix(self, pods: list[PodInfo], port: int, protocol: str = "TCP") -> dict[tuple[str, str], bool]:
        return {(a.key, b.key): self.allowed(a, b, port, protocol) for a in pods for b in pods}
