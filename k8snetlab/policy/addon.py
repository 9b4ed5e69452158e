"""The NetworkPolicy add-on: namespaces, policies, and a policy agent per node (Calico's felix role).

``networkPolicy`` in the cluster file::

    networkPolicy:
      dataplane: iptables     # iptables (felix's chains + ipsets) | nftables (sets, verdict maps)
      enabled: true           # false: the flannel-alone baseline: policies accepted and ignored
      resyncPeriod: 2         # s between checks that the rules are still there

``Namespace`` and ``NetworkPolicy`` manifests go into ``workloads``. The agents start with the
cluster when it has policies or a ``networkPolicy`` section, else with the first policy added at
run time (``c.policies.add(manifest)``), so clusters without policies carry no rules. Each
change (a pod, its labels, a namespace's labels, a policy) recomputes every node's plan and
syncs the nodes whose rules differ, partially; a resync thread checks every node's rules
against what was written and restores them with a full sync. The state the CLI needs
(``k8snetlab policy matrix/explain``) is written to ``policy.json`` in the cluster's state dir.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import options as optmod
from ..addons import Addon
from ..errors import K8sNetLabError, SpecError
from ..options import opt
from ..periodic import Periodic
from . import model as m
from .dataplane import DATAPLANES, Dataplane, SyncStats
from .plan import NodePlan, build

if TYPE_CHECKING:  # pragma: no cover
    from ..cluster_view import ClusterView
    from ..pod import NodeHost, Pod
    from ..clusterspec import ClusterSpec

log = logging.getLogger(__name__)

STATE_FILE = "policy.json"
BRIDGE_NF = "net.bridge.bridge-nf-call-iptables"


@dataclass(frozen=True)
class NetworkPolicyOptions:
    dataplane: str = opt("iptables", help="iptables (iptables-nft) or iptables-legacy: felix's chain layout "
                         "with ipsets; nftables: sets and verdict maps (k8snetlab.network_policy_dataplanes)")
    enabled: bool = opt(True, help="false: policies are accepted and ignored (flannel alone)")
    resync_period: float = opt(2.0, key="resyncPeriod", min=0.1, help="s between checks of the nodes' rules")


@dataclass(frozen=True)
class PolicySet:
    """Namespaces and policies of a cluster file, parsed and checked."""
    options: NetworkPolicyOptions
    namespaces: dict[str, dict[str, str]]
    policies: tuple[m.NetworkPolicy, ...]
    raw: dict[str, dict[str, Any]]


def parse_spec(spec: "ClusterSpec") -> PolicySet:
    src = spec.source
    opts = optmod.parse(NetworkPolicyOptions, spec.network_policy, f"{src}: networkPolicy")
    namespaces: dict[str, dict[str, str]] = {n: {m.NAME_LABEL: n} for n in m.BUILTIN_NAMESPACES}
    declared: set[str] = set()
    for where, doc in spec.objects:
        if doc.get("kind") == "Namespace":
            ns = m.parse_namespace(doc, where)
            if ns.name in declared:
                raise SpecError(f"{where}: Namespace {ns.name} is declared twice")
            declared.add(ns.name)
            namespaces[ns.name] = dict(ns.labels)
    used = {p.namespace for p in spec.pods()}
    used |= {str((d.get("metadata") or {}).get("namespace", "default")) for _, d in spec.services}
    for ns in sorted(used - set(namespaces)):    # pods make their namespace exist
        namespaces[ns] = {m.NAME_LABEL: ns}
    policies: dict[str, m.NetworkPolicy] = {}
    raw: dict[str, dict[str, Any]] = {}
    for where, doc in spec.objects:
        if doc.get("kind") != "NetworkPolicy":
            continue
        pol = m.parse_policy(doc, where)
        if pol.namespace not in namespaces:
            raise SpecError(f"{where}.metadata.namespace: namespace {pol.namespace!r} does not exist: "
                            f"add a Namespace manifest for it (namespaces: {', '.join(sorted(namespaces))})")
        if pol.key in policies:
            raise SpecError(f"{where}: NetworkPolicy {pol.key} is declared twice")
        policies[pol.key] = pol
        raw[pol.key] = doc
    return PolicySet(opts, namespaces, tuple(policies.values()), raw)


def pod_info(pod: "Pod") -> m.PodInfo:
    ports = tuple((p.name, p.protocol, p.container_port) for c in pod.spec.containers for p in c.ports if p.name)
    return m.PodInfo(pod.spec.name, pod.spec.namespace, dict(pod.spec.labels), pod.ip, pod.node_name, ports,
                     pod.name)


class PolicyAddon(Addon):
    name = "policy"

    def __init__(self, cluster: "ClusterView"):
        super().__init__(cluster)
        ps = parse_spec(cluster.spec)
        self.options = ps.options
        self.namespaces: dict[str, dict[str, str]] = dict(ps.namespaces)
        self.policies: dict[str, m.NetworkPolicy] = {p.key: p for p in ps.policies}
        self.raw: dict[str, dict[str, Any]] = dict(ps.raw)
        self.agents: dict[str, Dataplane] = {}
        self.last_sync: dict[str, SyncStats] = {}
        self._leaving: set[str] = set()
        self._entries: dict[str, tuple[Any, tuple[Any, ...], str]] = {}    # see _pod_entry
        self._sysctls: dict[str, str] = {}
        self._lock = threading.RLock()
        self._resync = Periodic("policy-resync", lambda: self.options.resync_period, self._resync_round)
        self._running = False
        self._warned = False

    @classmethod
    def validate(cls, spec: "ClusterSpec") -> None:
        ps = parse_spec(spec)
        try:
            DATAPLANES.get(ps.options.dataplane)
        except SpecError as e:
            raise SpecError(f"{spec.source}: networkPolicy.dataplane: {e}") from None

    @classmethod
    def wanted(cls, spec: "ClusterSpec") -> bool:
        return True      # cheap: agents start only when there is a policy (or a networkPolicy section)

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        self.cluster.policies = self            # type: ignore[attr-defined]
        if not self.options.enabled:
            if self.policies:
                self._warn_disabled(len(self.policies))
        elif self.policies or self.cluster.spec.network_policy:
            self._start_agents()
        self._write_state()

    def _warn_disabled(self, count: int) -> None:
        """Say once per cluster that policies are not enforced (then at info level)."""
        level = logging.INFO if self._warned else logging.WARNING
        self._warned = True
        log.log(level, "networkPolicy.enabled is false: %d NetworkPolicies accepted and NOT enforced "
                "(as on a cluster with flannel alone)", count)

    def _start_agents(self) -> None:
        from .. import proc
        from ..netutil import get_sysctl, set_sysctl
        from ..errors import NetlinkError
        cls = DATAPLANES.get(self.options.dataplane)
        proc.require(*cls.tools)
        with self._lock:
            for node in self.cluster.nodes.values():
                try:   # bridged pod-to-pod traffic must pass the node's netfilter hooks
                    old = get_sysctl(BRIDGE_NF, node.netns, node.name)
                    set_sysctl(BRIDGE_NF, 1, node.netns, node.name)
                    self._sysctls.setdefault(node.name, old)
                except NetlinkError:
                    log.warning("%s: no br_netfilter in this kernel: policies do not see traffic "
                                "between pods on one bridge", node.name)
                self.agents[node.name] = cls(node)
            self._running = True
            self.sync()
        self._resync.start()
        log.info("policy: %s agents on %d node(s), %d NetworkPolicies", self.options.dataplane,
                 len(self.agents), len(self.policies))

    def stop(self) -> None:
        from ..netutil import set_sysctl
        self._resync.stop()
        with self._lock:
            for name, agent in list(self.agents.items()):
                if name in self.cluster.nodes:
                    try:
                        agent.stop()
                    except Exception as e:
                        log.warning("policy: stop agent on %s: %s", name, e)
                    old = self._sysctls.get(name)
                    if old is not None:
                        try:
                            set_sysctl(BRIDGE_NF, old, self.cluster.nodes[name].netns, name)
                        except Exception as e:
                            log.debug("restore %s on %s: %s", BRIDGE_NF, name, e)
            self.agents.clear()
            self._running = False
        if getattr(self.cluster, "policies", None) is self:
            self.cluster.policies = None        # type: ignore[attr-defined]

    # -- the model and the sync -----------------------------------------------------------------
    def pod_infos(self) -> list[m.PodInfo]:
        self._leaving.intersection_update(self.cluster.pods)        # those gone are no news
        return [pod_info(p) for p in self.cluster.pods.values() if p.name not in self._leaving]

    def node_ips(self) -> dict[str, set[str]]:
        out = {}
        for name, node in self.cluster.nodes.items():
            cidr = node.spec.pod_cidr
            out[name] = {str(node.spec.ip), str(cidr.network_address), str(cidr.network_address + 1)}
        return out

    def model(self) -> m.PolicyModel:
        return m.PolicyModel(self.namespaces, self.pod_infos(), self.policies.values(), self.node_ips())

    def plans(self) -> dict[str, NodePlan]:
        model = self.model()
        return {n: build(model, n) for n in self.agents}

    def sync(self, full: bool = False) -> dict[str, SyncStats]:
        """Bring every node to the current plan (partial unless ``full``); returns per node."""
        with self._lock:
            if self._running:
                model = self.model()
                for name, agent in self.agents.items():
                    self.last_sync[name] = agent.sync(build(model, name), full=full)
            self._write_state()
            return dict(self.last_sync)

    def _resync_round(self) -> None:
        """Full sync on every node whose rules differ from what was written (a failure is
        logged by :class:`Periodic`; the next round tries again)."""
        with self._lock:
            model = None
            for name, agent in self.agents.items():
                if not agent.intact():
                    log.info("policy: rules on %s differ from what was written: full sync", name)
                    model = model or self.model()
                    self.last_sync[name] = agent.sync(build(model, name), full=True)

    def _changed(self) -> None:
        if self.options.enabled and not self._running and self.policies:
            self._start_agents()
        else:
            self.sync()

    # -- events from the cluster --------------------------------------------------------------------
    def pods_added(self, pods: list[Any]) -> None:
        self._leaving.difference_update(p.name for p in pods)      # a name used again
        for p in pods:
            self.namespaces.setdefault(p.spec.namespace, {m.NAME_LABEL: p.spec.namespace})
        self.sync()

    def pod_removing(self, pod: Any) -> None:
        # left out from now on: a scale-down tells of every leaving pod before tearing any
        # down, and the syncs for the next ones must not bring this one's rules back
        self._leaving.add(pod.name)
        self.sync()

    def pod_updated(self, pod: Any) -> None:
        self.sync()

    def node_added(self, node: "NodeHost") -> None:
        if self._running:
            with self._lock:
                self.agents[node.name] = DATAPLANES.get(self.options.dataplane)(node)
                self.sync()

    def node_removed(self, name: str) -> None:
        with self._lock:
            self.agents.pop(name, None)
            self.sync()

    # -- the public API -----------------------------------------------------------------------------
    def add(self, manifest: dict[str, Any]) -> m.NetworkPolicy:
        """Create a NetworkPolicy (Kubernetes manifest); every node follows before this returns."""
        return self.add_all([manifest])[0]

    def add_all(self, manifests: list[dict[str, Any]]) -> list[m.NetworkPolicy]:
        """Create several NetworkPolicies with one sync per node (all or none are created)."""
        parsed = []
        for manifest in manifests:
            meta = manifest.get("metadata") if isinstance(manifest, dict) else None
            where = f"NetworkPolicy {meta.get('name')}" if isinstance(meta, dict) and meta.get("name") else "NetworkPolicy"
            parsed.append((where, m.parse_policy(manifest, where), manifest))
        with self._lock:
            keys: set[str] = set()
            for where, pol, _ in parsed:
                if pol.namespace not in self.namespaces:
                    raise SpecError(f"{where}: namespace {pol.namespace!r} does not exist: create it first "
                                    "(c.policies.add_namespace)")
                if pol.key in self.policies or pol.key in keys:
                    raise SpecError(f"{where}: NetworkPolicy {pol.key} already exists: delete it first")
                keys.add(pol.key)
            for _, pol, manifest in parsed:
                self.policies[pol.key] = pol
                self.raw[pol.key] = manifest
            if not self.options.enabled:
                self._warn_disabled(len(parsed))
            try:
                self._changed()
            except BaseException:
                for key in keys:
                    self.policies.pop(key, None)
                    self.raw.pop(key, None)
                raise
        return [pol for _, pol, _ in parsed]

    def delete(self, *keys: str) -> None:
        """Delete NetworkPolicies ``ns/name`` (``name`` alone: in ``default``), one sync per node."""
        with self._lock:
            full = [k if "/" in k else f"default/{k}" for k in keys]
            for key in full:
                if key not in self.policies:
                    raise K8sNetLabError(f"no NetworkPolicy {key}: there are "
                                         f"{', '.join(sorted(self.policies)) or '(none)'}")
            for key in full:
                del self.policies[key]
                self.raw.pop(key, None)
            self.sync()

    def set_dataplane(self, name: str) -> None:
        """Restart every node's agent in another dataplane (its rules removed, the new written)."""
        DATAPLANES.get(name)
        with self._lock:
            running = self._running
            self.stop()
            self.options = dataclasses.replace(self.options, dataplane=name)
            self.cluster.policies = self            # type: ignore[attr-defined]
            if running:
                self._start_agents()
            self._write_state()

    def add_namespace(self, manifest: dict[str, Any] | str) -> str:
        doc = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": manifest}} \
            if isinstance(manifest, str) else manifest
        ns = m.parse_namespace(doc, "Namespace")
        with self._lock:
            if ns.name in self.namespaces:
                raise SpecError(f"Namespace {ns.name} already exists")
            self.namespaces[ns.name] = dict(ns.labels)
            self._write_state()
        return ns.name

    def label_namespace(self, namespace: str, labels: dict[str, str | None]) -> dict[str, str]:
        with self._lock:
            if namespace not in self.namespaces:
                raise K8sNetLabError(f"no namespace {namespace!r}: there are {', '.join(sorted(self.namespaces))}")
            new = {**self.namespaces[namespace], **{k: str(v) for k, v in labels.items() if v is not None}}
            new = {k: v for k, v in new.items() if labels.get(k, "") is not None}
            m.parse_labels(new, f"namespace {namespace} labels")
            new[m.NAME_LABEL] = namespace
            self.namespaces[namespace] = new
            self.sync()
            return dict(new)

    def verdict(self, src: str, dst: str, port: int, protocol: str = "TCP") -> m.Verdict:
        model = self.model()
        from .matrix import resolve
        return model.verdict(resolve(model, src), resolve(model, dst), port, protocol)

    def matrix(self, port: int = 80, protocols: tuple[str, ...] = ("TCP",), namespaces: list[str] | None = None,
               timeout: float = 1.0) -> "Any":
        from .matrix import run_matrix
        return run_matrix(self.state(), port, protocols, namespaces, timeout)

    def stats(self) -> dict[str, dict[str, int]]:
        from .dataplane import summary
        return {n: summary(a.written) for n, a in self.agents.items()}

    # -- state for the CLI ---------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return json.loads(self._state_text())

    def _state_text(self) -> str:
        """``policy.json``: written at every sync, so each pod's entry is JSON text kept from
        the last write (:meth:`_pod_entry`); a write is one join, not a thousand encodings
        (a scale-down of 1,000 pods writes it 1,000 times)."""
        live = [p for p in list(self.cluster.pods.values()) if p.name not in self._leaving and p.ip]
        entries = [self._pod_entry(p) for p in live]
        if len(self._entries) > len(live):
            names = {p.name for p in live}
            for gone in [n for n in self._entries if n not in names]:
                del self._entries[gone]
        ips = self.node_ips()
        rest = {"cluster": self.cluster.spec.name, "dataplane": self.options.dataplane,
                "enabled": self.options.enabled, "running": self._running,
                "namespaces": self.namespaces, "policies": list(self.raw.values()),
                "nodes": {n: {"pid": node.pid, "ips": sorted(ips[n])}
                          for n, node in self.cluster.nodes.items()}}
        head = json.dumps(rest, separators=(",", ":"))
        return f'{head[:-1]},"pods":[{",".join(entries)}]}}'

    def _pod_entry(self, pod: Any) -> str:
        """A pod's entry in ``policy.json`` as JSON text, kept while the pod's spec (labels,
        ports: a relabel replaces it), IP, PID and node stay the same."""
        key = (pod.ip, pod.pid, pod.node_name)
        hit = self._entries.get(pod.name)
        if hit is not None and hit[0] is pod.spec and hit[1] == key:
            return hit[2]
        text = json.dumps({**vars(pod_info(pod)), "pid": pod.pid}, separators=(",", ":"))
        self._entries[pod.name] = (pod.spec, key, text)
        return text

    def _write_state(self) -> None:
        st = self.cluster.state
        if st is None:
            return
        tmp = st.path / f".{STATE_FILE}.tmp"
        tmp.write_text(self._state_text())
        tmp.replace(st.path / STATE_FILE)
