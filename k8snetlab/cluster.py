"""The emulated cluster: a small facade over the parts a real cluster has.

``Cluster.start()`` builds the underlay, the node agents, the pods and the add-ons in that order
and ``stop()`` undoes it in reverse (steps: :meth:`Cluster.start`); whatever a ``kill -9``
leaves is found by ``k8snetlab clean``.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import resource
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable

from mininet.log import setLogLevel

from . import addons as addonmod, cbuild, chain, checks, manifests, proc, signals, spec as specmod
from .errors import K8sNetLabError, SpecError
from .kubelet import PHASES, Kubelet
from .manifests import PodSpec, Workload
from .modes import MODES, Mode
from .modes.resync import AgentResync
from .supervisor import ContainerSupervisor
from .netutil import Netns
from .pod import PAUSE_SOURCE, NetnsHost, NodeHost, Pod
from .scheduler import Scheduler, host_ports
from .clusterspec import ClusterSpec, parse_address
from .statedir import StateDir
from .underlay import Underlay, underlay_first_hops  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
BASE_TOOLS = ("ip", "mnexec", "brctl", "ifconfig")
WORKERS = 16                  # pods started at once (each mostly waits for a CNI exec)
READY_TIMEOUT_S = 10.0


def slow_start_batches(n: int, first: int = 1) -> list[int]:
    """Batch sizes the ReplicaSet controller creates ``n`` pods in (``slowStartBatch``:
    1, 2, 4, ... until all are asked for)."""
    sizes, size = [], max(1, first)
    while n > 0:
        sizes.append(min(size, n))
        n -= sizes[-1]
        size *= 2
    return sizes


class _CpuMarks:
    """CPU seconds per phase into ``timings``: ``<phase>_cpu_s`` of this process (all its
    threads) and ``<phase>_children_cpu_s`` of the programs it ran and waited for (plugin
    executables, ``nsenter``, ``ip``, ``mnexec``). Wall time on a shared machine says how
    loaded it was; CPU time says what the work cost."""

    def __init__(self, timings: dict[str, float]):
        self.timings = timings
        self.last = self._now()

    @staticmethod
    def _now() -> tuple[float, float]:
        ch = resource.getrusage(resource.RUSAGE_CHILDREN)
        return time.process_time(), ch.ru_utime + ch.ru_stime

    def mark(self, phase: str) -> None:
        now = self._now()
        self.timings[f"{phase}_cpu_s"] = now[0] - self.last[0]
        self.timings[f"{phase}_children_cpu_s"] = now[1] - self.last[1]
        self.last = now


class Cluster:
    """One emulated cluster. Not thread-safe: drive it from one thread."""

    def __init__(self, spec: ClusterSpec):
        self.spec = spec
        self.mode: Mode = MODES.get(spec.cni.type)(self, spec.cni.options)
        self.state: StateDir | None = None
        self.underlay: Underlay | None = None
        self.kubelets: dict[str, Kubelet] = {}
        self.scheduler = Scheduler()
        self.pods: dict[str, Pod] = {}
        self.workloads: dict[str, Workload] = {w.name: w for w in spec.workloads if w.kind != "Pod"}
        self.addons: list[addonmod.Addon] = []
        self.timings: dict[str, float] = {}
        self._peers: set[tuple[str, str]] = set()
        self._gone: dict[str, NodeHost] = {}     # nodes that left, until their routes are gone
        # node agents: node-list changes and the periodic reconcile take turns
        self.agent_lock = threading.RLock()
        self.agent_resync: AgentResync | None = None
        self.supervisor: ContainerSupervisor | None = None   # the kubelets' container restarts
        self.cni_servers: Any = None     # cni_server.ServerPool: the nodes' CNI servers (invoke exec)
        self._started = False
        self._holder: tuple[str, ...] | None = None     # the pods' sandbox holder (see start)

    @classmethod
    def from_file(cls, path: str | Path, cni: str | None = None,
                  params: dict[str, Any] | None = None) -> "Cluster":
        return cls(specmod.load(path, cni=cni, params=params))

    # -- what the underlay holds ------------------------------------------------------------------
    @property
    def net(self) -> Any:
        return self.underlay.net if self.underlay else None

    @property
    def nodes(self) -> dict[str, NodeHost]:
        return self.underlay.nodes if self.underlay else {}

    @property
    def routers(self) -> dict[str, Any]:
        return self.underlay.routers if self.underlay else {}

    @property
    def hosts(self) -> dict[str, NetnsHost]:
        return self.underlay.hosts if self.underlay else {}

    @property
    def switches(self) -> dict[str, Any]:
        """The underlay's switches (Mininet objects) by their cluster-file name: the subnet's
        name, or the names in underlay.switches."""
        return dict(self.underlay.switches) if self.underlay else {}

    @property
    def switch_plan(self) -> Any:
        return self.underlay.switch_plan if self.underlay else None

    @property
    def shaped_links(self) -> Any:
        return self.underlay.shaped_links if self.underlay else []

    @property
    def ovs(self) -> Any:
        return self.underlay.ovs if self.underlay else None

    # -- lifecycle ------------------------------------------------------------------------------
    def __enter__(self) -> "Cluster":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @signals.deferring      # SIGINT/SIGTERM act at the checkpoints between steps, then stop()
    def start(self) -> "Cluster":
        """``Cluster.start()`` (also ``with Cluster.from_file(path, cni="ipip") as c:``):

        1. :class:`~k8snetlab.underlay.Underlay` builds the underlay with Mininet (Mininet's
           ``buildFromTopo`` role): switches, node / router / plain hosts, links, underlay routes;
        2. a :class:`~k8snetlab.kubelet.Kubelet` per node starts the mode's node agent (sysctls, VTEP
           or BPF programs, like flanneld / calico-node), writes the node's CNI config list and, with
           ``cni.invoke: exec``, the node's CNI server; then every node learns the other nodes' pod
           CIDRs (:meth:`Cluster.sync_routes`);
        3. the pure :class:`~k8snetlab.scheduler.Scheduler` binds every pod to a node, and that node's
           kubelet creates its sandbox, runs CNI ADD through the node's runtime with ``CNI_NETNS``
           pointing at the sandbox, starts its containers and waits for readiness. Pods of all nodes
           are created concurrently;
        4. the add-ons (Endpoints, kube-proxy, DNS, load balancer) start.

        ``stop()`` undoes all of it in reverse: add-ons, containers, CNI DEL per pod, node agents,
        Mininet, the state directory. It runs from ``__exit__`` and so after an exception or Ctrl-C
        too; whatever a ``kill -9`` leaves is found by ``k8snetlab clean`` (see :mod:`k8snetlab.cleanup`).
        """
        proc.require_root()
        proc.require(*BASE_TOOLS, *self.mode.tools)
        t0 = time.monotonic()
        cpu = _CpuMarks(self.timings)       # where the CPU goes: this process and its children
        setLogLevel("error")
        self.state = StateDir.create(self.spec.name)
        self._started = True
        try:
            self._state_in_memory()
            self._write_cni_bin()
            self._holder = self._sandbox_holder()
            self.underlay = Underlay(self.spec, self.state)
            self.underlay.build(self.timings)
            self.timings["underlay_s"] = time.monotonic() - t0
            cpu.mark("underlay")
            signals.checkpoint()
            self._start_node_agents()
            signals.checkpoint()
            self.timings["agents_s"] = time.monotonic() - t0 - self.timings["underlay_s"]
            cpu.mark("agents")
            t1 = time.monotonic()
            pods = self.spec.pods()
            for i in range(0, len(pods), checks.POD_BATCH):   # bounded: sandboxes a batch at a time
                self._add_pods(pods[i:i + checks.POD_BATCH])
                signals.checkpoint()
            self.timings["pods_s"] = time.monotonic() - t1
            cpu.mark("pods")
            t2 = time.monotonic()
            for cls in addonmod.addon_classes():
                if cls.wanted(self.spec):
                    addon = cls(self)
                    self.addons.append(addon)
                    addon.start()
                    signals.checkpoint()
            self.timings["addons_s"] = time.monotonic() - t2
            cpu.mark("addons")
            # the periodic reconciles start once everything is up: at 100 nodes a resync round
            # is seconds of the runtime's CPU, which the pods' start needs
            self._start_agent_resync()
            self._start_supervisor()
        except BaseException:
            self.stop()
            raise
        self.timings["start_s"] = time.monotonic() - t0
        log.info("cluster %s up (%s, %d nodes, %d pods) in %.2f s", self.spec.name, self.spec.cni.type,
                 len(self.nodes), len(self.pods), self.timings["start_s"])
        return self

    @signals.deferring(teardown=True)   # a signal during teardown takes effect once it is complete
    def stop(self) -> None:
        """Tear everything down; safe to call twice and after a failed start."""
        if not self._started:
            return
        self._started = False
        t0 = time.monotonic()
        cpu = _CpuMarks(self.timings)
        if self.cni_servers is not None:
            self.timings["cni_servers_cpu_s"] = self.cni_servers.cpu_seconds()
        errors: list[str] = []

        def attempt(what: str, fn: Any, *args: Any) -> None:
            try:
                fn(*args)
            except Exception as e:  # keep going: the rest must be removed too
                errors.append(f"{what}: {e}")
                log.warning("teardown: %s: %s", what, e)

        if self.supervisor is not None:
            attempt("stop the container supervision", self.supervisor.stop)
            self.supervisor = None
        if self.agent_resync is not None:
            attempt("stop the node agents' resync", self.agent_resync.stop)
            self.agent_resync = None
        for addon in reversed(self.addons):
            attempt(f"stop {addon.name}", addon.stop)
        self.addons.clear()
        kubelets = list(self.kubelets.values())
        # every sandbox a kubelet holds, also one made on it directly (not through add_pod)
        pods = list({id(p): p for p in [*self.pods.values(), *(p for k in kubelets for p in k.pods.values())]}
                    .values())
        for pod in pods:            # every container told at once, then each waited for
            attempt(f"signal containers of {pod.name}", pod.signal_containers)
        for pod in pods:
            attempt(f"stop containers of {pod.name}", pod.stop_containers)
        # CNI DEL only where a plugin may keep something beyond the node's namespace and this
        # cluster's state directory: ours keep nothing else, and the namespaces go below (a
        # namespace's end takes its veths with it), so a 1,000-pod cluster is not 1,000 DELs
        self._parallel([(lambda p=p: self.kubelets[p.node_name].cni_del(p), p) for p in pods
                        if p.result is not None and p.node_name in self.kubelets
                        and self.kubelets[p.node_name].teardown_needs_del()], errors, "CNI DEL")
        attempt("stop the node agents", self.mode.stop_all)      # all at once, then per node
        for k in kubelets:
            k.stop(attempt, cni_del=False)
        self.kubelets.clear()
        if self.cni_servers is not None:
            attempt("stop the CNI server workers", self.cni_servers.stop)
            self.cni_servers = None
        if self.underlay is not None:
            attempt("stop processes in testbed namespaces", self._kill_in,
                    *pods, *self.nodes.values(), *self.routers.values(), *self.hosts.values())
            for pod in pods:        # every holder signalled at once, then each reaped
                attempt(f"signal the sandbox of {pod.name}", pod.signal_holder)
            self.underlay.forget_all(pods)
            for pod in pods:
                attempt(f"remove the sandbox of {pod.name}", pod.terminate)
            self.underlay.stop(attempt)
            self.underlay = None
        if self.state is not None:
            attempt("remove state", self.state.remove)
        self.pods.clear()
        self.scheduler = Scheduler()
        self.timings["stop_s"] = time.monotonic() - t0
        cpu.mark("stop")
        if errors:
            log.warning("teardown finished with %d problem(s); 'k8snetlab clean' removes leftovers", len(errors))

    # -- underlay hosts ---------------------------------------------------------------------------
    def add_host(self, name: str, ip: str, subnet: str | None = None) -> NetnsHost:
        """A plain host joins the underlay of a running cluster (an external client, a load
        balancer): ``eth0`` on the subnet, default route via the subnet's gateway."""
        assert self.underlay is not None
        addr = parse_address(ip, f"host {name}")
        taken = {n.ip for n in self.spec.nodes} | {ip for r in self.spec.underlay.routers for _, ip in r.interfaces}
        taken |= {parse_address(h.IP(), h.name) for h in self.hosts.values() if h.IP()}
        if name in self.nodes or name in self.pods or name in self.routers or name in self.hosts:
            raise SpecError(f"host name {name!r} is already taken")
        if addr in taken:
            raise SpecError(f"host {name}: {addr} is already used on the underlay")
        sub = subnet or next((s.name for s in self.spec.underlay.subnets if addr in s.cidr), None)
        if sub is None or addr not in self.spec.underlay.subnet(sub).cidr:
            raise SpecError(f"host {name}: {addr} is in none of the underlay subnets")
        return self.underlay.join_host(name, sub, addr)

    # -- node agents ------------------------------------------------------------------------------
    def _start_node_agents(self) -> None:
        if not self.nodes:
            return
        self.mode.prepare(next(iter(self.nodes.values())))
        if not self.mode.parallel_node_start:
            for node in self.nodes.values():
                self._start_node(node)
                signals.poll()
        else:       # node agents that run programs (tc, bpftool) start side by side
            kubelets = [self._new_kubelet(node) for node in self.nodes.values()]
            errors: list[str] = []
            self._parallel([(self._start_kubelet, k) for k in kubelets], errors, "start node agent")
            if errors:
                raise K8sNetLabError(f"node agents: {errors[0]}")
        self.sync_routes()

    def _start_supervisor(self) -> None:
        """The kubelets' container restarts and readiness (supervisor.py); the add-ons hear
        of readiness changes (Endpoints follow)."""
        assert self.state is not None

        def tell(pods: list[Pod]) -> None:
            for addon in self.addons:
                addon.pods_readiness_changed(pods)

        self.supervisor = ContainerSupervisor(lambda: self.pods, self.state.path / "logs", tell)
        self.supervisor.start()

    def _start_agent_resync(self) -> None:
        """The node agents' periodic reconcile (modes/resync.py), when the mode has one."""
        period = self.mode.resync_period
        if period is not None and self.nodes:
            self.agent_resync = AgentResync(self.mode, lambda: self.nodes, period, self.agent_lock)
            self.agent_resync.start()

    def _start_node(self, node: NodeHost) -> Kubelet:
        kubelet = self._new_kubelet(node)
        self._start_kubelet(kubelet)
        return kubelet

    def _new_kubelet(self, node: NodeHost) -> Kubelet:
        """A node's kubelet, known to the scheduler and the cluster (not started)."""
        assert self.state is not None
        self.scheduler.add_node(node.name, node.spec.labels)
        kubelet = Kubelet(node, self.mode, self.spec.cni.invoke, self._log_dir(),
                          self.state.record_pid, self.state.record_netns, self._holder)
        self.kubelets[node.name] = kubelet
        return kubelet

    def _start_kubelet(self, kubelet: Kubelet) -> None:
        server = None
        if self.spec.cni.invoke == "exec":
            assert self.cni_servers is not None
            server = self.cni_servers.server(kubelet.node.netns, kubelet.name)
        kubelet.start(server)

    def sync_routes(self) -> None:
        """Program every node's routes to every other node's pod CIDR (what flanneld does on a
        node-list change); remove those of nodes that left."""
        with self.agent_lock:
            self._sync_routes()

    def _sync_routes(self) -> None:
        want = {(a, b) for a in self.nodes for b in self.nodes if a != b}
        for a, b in sorted(self._peers - want):
            if a in self.nodes:
                with Netns(self.nodes[a].netns, a) as ns:
                    self.mode.remove_peer(self.nodes[a], ns, self._gone[b])
            self._peers.discard((a, b))
        missing = want - self._peers     # once: per pair it made a 100-node start take seconds
        for a in self.nodes:
            todo = [b for b in self.nodes if (a, b) in missing]
            if not todo:
                continue
            with Netns(self.nodes[a].netns, a) as ns:
                self.mode.add_peers(self.nodes[a], ns, [self.nodes[b] for b in todo])
            self._peers.update((a, b) for b in todo)

    def add_node(self, name: str, ip: str, subnet: str | None = None, pod_cidr: str | None = None) -> NodeHost:
        """A node joins: underlay link, node agent, and every node's routes are updated."""
        assert self.underlay is not None and self.state is not None
        data = {"name": name, "ip": ip, **({"subnet": subnet} if subnet else {}),
                **({"podCIDR": pod_cidr} if pod_cidr else {})}
        raw_nodes = [{"name": n.name, "ip": str(n.ip), "subnet": n.subnet, "podCIDR": str(n.pod_cidr),
                      "labels": dict(n.labels)} for n in self.spec.nodes] + [data]
        new_spec = specmod.with_nodes(self.spec, raw_nodes)
        with self.agent_lock:
            host = self.underlay.join_node(new_spec.node(name))
            self.spec = self.underlay.spec = new_spec
            self._start_node(host)
            self.sync_routes()
        for addon in self.addons:
            addon.node_added(host)
        return host

    def remove_node(self, name: str) -> None:
        """A node leaves: its pods are deleted, every node forgets its routes."""
        node = self.nodes.get(name)
        if node is None:
            raise K8sNetLabError(f"no node {name!r}")
        assert self.underlay is not None
        for pod in [p for p in self.pods.values() if p.node_name == name]:
            self.delete_pod(pod.name)
        kubelet = self.kubelets.pop(name)

        def attempt(what: str, fn: Any, *args: Any) -> None:
            fn(*args)
        with self.agent_lock:
            kubelet.stop(attempt)
            self.scheduler.remove_node(name)
            self._gone[name] = self.underlay.leave_node(name)
            # the name and address are free again (a node may rejoin)
            self.spec = dataclasses.replace(self.spec, nodes=tuple(n for n in self.spec.nodes if n.name != name))
            self.underlay.spec = self.spec
            self.sync_routes()
        for addon in self.addons:
            addon.node_removed(name)

    # -- pods -------------------------------------------------------------------------------------
    def schedule(self, pod: PodSpec) -> str:
        """The node the scheduler would put ``pod`` on now (nothing is bound)."""
        return self.scheduler.place(pod)

    def add_pod(self, manifest: dict[str, Any] | PodSpec | Workload) -> list[Pod]:
        """Add the pod(s) of a manifest (dict), a PodSpec or a Workload; return them."""
        if isinstance(manifest, dict):
            manifest = manifests.parse_workload(manifest, "manifest")
        pods = manifest.pods() if isinstance(manifest, Workload) else [manifest]
        for p in pods:
            h = p.host_name
            if h in self.pods or h in self.nodes or h in self.routers or h in self.hosts:
                raise SpecError(f"pod {p.key}: the name {h!r} is already taken")
        # a hostPort, bandwidth annotation or sysctl the node's config list cannot serve
        chain.check_pods_against_chain(pods, self.spec.cni.chain or (), "add_pod",
                                       own_host_ports=self.mode.publishes_host_ports)
        if isinstance(manifest, Workload) and manifest.kind != "Pod":
            self.workloads[manifest.name] = manifest
        return self._add_pods(pods)

    def scale(self, workload: str, replicas: int) -> list[Pod]:
        """``kubectl scale``: add pods ``<name>-<i>`` for the missing indexes, or delete the
        highest ones; the add-ons (Endpoints, kube-proxy, DNS) follow. New pods are asked for
        in the ReplicaSet controller's slow-start batches (1, 2, 4, ...). Returns the pods now."""
        w = self.workloads.get(workload)
        if w is None:
            raise K8sNetLabError(f"no Deployment or ReplicationController {workload!r}: "
                                 f"there are {', '.join(sorted(self.workloads)) or '(none)'}")
        if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0:
            raise SpecError(f"scale {workload}: replicas must be a whole number >= 0")
        owner = f"{w.kind}/{w.name}"
        mine = {p.spec.name: p for p in self.pods.values() if p.spec.owner == owner}
        wanted = {ps.name: ps for ps in w.pods(replicas + len(mine))}   # enough free indexes
        index = {name: i for i, name in enumerate(wanted)}
        keep = sorted(mine, key=lambda n: index.get(n, 1 << 30))[:replicas]
        self._delete_pods([mine[name].name for name in mine if name not in keep])
        missing = replicas - len(keep)
        new = [ps for ps in wanted.values() if ps.name not in mine][:missing]
        for size in slow_start_batches(len(new)):
            self._add_pods(new[:size])
            new = new[size:]
        self.workloads[workload] = dataclasses.replace(w, replicas=replicas)
        return sorted((p for p in self.pods.values() if p.spec.owner == owner), key=lambda p: index[p.name])

    def _add_pods(self, specs: list[PodSpec]) -> list[Pod]:
        """Bind, then start the pods on their nodes' kubelets concurrently, each up to its
        readiness (``pod.created_at`` is this call, ``pod.ready_at`` when that pod was
        observed ready); a failed batch leaves none of its pods behind."""
        asked = time.monotonic()
        placed: list[tuple[PodSpec, str]] = []
        try:
            for ps in specs:
                node = self.scheduler.place(ps)
                self.scheduler.bind(ps.host_name, node, ps.owner, host_ports(ps))
                placed.append((ps, node))
        except BaseException:
            for ps, _ in placed:
                self.scheduler.unbind(ps.host_name)
            raise
        started: dict[str, Pod] = {}
        errors: list[str] = []

        def run(item: tuple[PodSpec, str]) -> None:
            ps, node = item
            started[ps.host_name] = self.kubelets[node].start_pod(ps, asked, READY_TIMEOUT_S)

        self._parallel([(run, item) for item in placed], errors, "start pod",
                       label=lambda item: item[0].name)
        pods = [started[ps.host_name] for ps, _ in placed if ps.host_name in started]
        for pod in pods:
            self.pods[pod.name] = pod
            assert self.underlay is not None
            self.underlay.adopt(pod)
        if errors:
            for ps, _ in placed:
                if ps.host_name in self.pods:
                    self.delete_pod(ps.host_name)
                else:
                    self.scheduler.unbind(ps.host_name)
            raise K8sNetLabError(errors[0])
        for addon in self.addons:
            addon.pods_added(pods)
        return pods

    def check_pod(self, name: str) -> None:
        """CNI CHECK for one pod (raises CNIError when its wiring is not as ADD left it)."""
        pod = self.pods[name]
        self.kubelets[pod.node_name or ""].check(pod)

    def delete_pod(self, name: str) -> None:
        pod = self.pods.get(name)
        if pod is None:
            raise K8sNetLabError(f"no pod {name!r}: pods are {', '.join(sorted(self.pods)) or '(none)'}")
        for addon in self.addons:
            addon.pod_removing(pod)
        try:
            self.kubelets[pod.node_name or ""].delete_pod(name, kill=self._kill_pod)
        finally:
            self._forget_pod(pod)

    def _forget_pod(self, pod: Pod) -> None:
        del self.pods[pod.name]
        self.scheduler.unbind(pod.name)
        if self.underlay is not None:
            self.underlay.forget(pod)

    def _delete_pods(self, names: list[str]) -> None:
        """Delete pods concurrently, each by its node's kubelet, as a ReplicaSet scale-down
        does (a pod's teardown mostly waits: for its containers to end, for the CNI DEL, for
        the kernel to remove its veth); the add-ons hear of every pod before any goes. All
        are gone from the cluster afterwards, a failed teardown or not; the first failure is
        raised."""
        pods = [self.pods[n] for n in names]
        for pod in pods:
            for addon in self.addons:
                addon.pod_removing(pod)
        errors: list[str] = []

        def run(pod: Pod) -> None:
            self.kubelets[pod.node_name or ""].delete_pod(pod.name, kill=self._kill_pod)

        try:
            self._parallel([(run, pod) for pod in pods], errors, "delete pod")
        finally:
            for pod in pods:
                self._forget_pod(pod)
        if errors:
            raise K8sNetLabError(errors[0])

    def label_pod(self, name: str, labels: dict[str, str | None]) -> dict[str, str]:
        """``kubectl label pod``: set labels of a running pod (a value None removes the key);
        the add-ons follow (network policies select by labels). Returns the new labels."""
        pod = self.pods.get(name)
        if pod is None:
            raise K8sNetLabError(f"no pod {name!r}: pods are {', '.join(sorted(self.pods)) or '(none)'}")
        new = {**pod.spec.labels, **{k: str(v) for k, v in labels.items() if v is not None}}
        new = {k: v for k, v in new.items() if labels.get(k, "") is not None}
        manifests._str_map(new, f"pod {name} labels")
        pod.spec = dataclasses.replace(pod.spec, labels=new)
        for addon in self.addons:
            addon.pod_updated(pod)
        return new

    def label_namespace(self, namespace: str, labels: dict[str, str | None]) -> dict[str, str]:
        """``kubectl label namespace`` (namespaces are the policy add-on's, see k8snetlab.policy)."""
        policies = getattr(self, "policies", None)
        if policies is None:
            raise K8sNetLabError("namespaces are kept by the network policy add-on, which is not running")
        return policies.label_namespace(namespace, labels)

    def _parallel(self, jobs: list[tuple[Callable[[Any], Any], Any]], errors: list[str], what: str,
                  label: Callable[[Any], str] = lambda a: getattr(a, "name", str(a))) -> None:
        if not jobs:
            return
        workers = min(WORKERS, len(jobs))
        with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="kubelet") as ex:
            futs = {ex.submit(fn, arg): arg for fn, arg in jobs}
            pending = set(futs)
            while pending:
                done, pending = concurrent.futures.wait(pending, timeout=0.2)
                for f in done:
                    e = f.exception()
                    if e is not None:
                        errors.append(str(e))
                        log.warning("%s for %s: %s", what, label(futs[f]), e)
                try:
                    signals.poll()      # a stop signal: jobs not begun are dropped
                except KeyboardInterrupt:
                    ex.shutdown(wait=True, cancel_futures=True)
                    raise

    # -- processes --------------------------------------------------------------------------------
    def _kill_pod(self, pod: Pod) -> None:
        """Stop what runs in a pod besides its holder: what the runtime started and tracked,
        or, if a shell or Mininet's popen ran there, everything in its namespace."""
        if pod.touched:
            self._kill_in(pod)
            return
        for p in pod.spawned:
            if p.poll() is None:
                proc.stop_pids([(p.pid, proc.start_time(p.pid))], grace=0.5)
                p.wait(5)

    def _kill_in(self, *hosts: NetnsHost) -> None:
        """Stop every process in the hosts' namespaces except their shells and holders (their
        own terminate() stops those), all signalled at once."""
        inodes, keep = set(), set()
        for h in hosts:
            try:
                inodes.add(os.stat(h.netns).st_ino)
                keep.add(h.pid)
                if h.shell is not None:
                    keep.add(h.shell.pid)
            except OSError:
                continue
        pids = [pid for pid in proc.pids_in_netns(inodes) if pid not in keep]
        proc.stop_pids([(pid, proc.start_time(pid)) for pid in pids], grace=0.5)

    # -- conveniences ----------------------------------------------------------------------------
    def addon(self, name: str) -> addonmod.Addon | None:
        """The running add-on of that name (``services``...), None when the cluster has none."""
        return next((a for a in self.addons if a.name == name), None)

    @property
    def services(self) -> Any:
        """The Services add-on (``k8snetlab.services.services_addon.ServicesAddon``): kube-proxy,
        Endpoints, DNS, load balancer; None when the cluster file asks for no Services."""
        return self.addon("services")

    def pod_ips(self) -> dict[str, str]:
        return {n: p.ip or "" for n, p in self.pods.items()}

    def phase_timings(self) -> dict[str, float]:
        """Seconds spent per pod-start phase, summed over the kubelets (threads overlap)."""
        total = dict.fromkeys(PHASES, 0.0)
        for k in self.kubelets.values():
            for key, v in k.timings.items():
                total[key] += v
        return total

    def describe(self) -> list[str]:
        lines = [f"cluster {self.spec.name}: cni {self.spec.cni.type} (datapath {self.mode.datapath}, "
                 f"pod MTU {self.mode.mtu})"]
        if self.ovs is not None:
            lines.append(f"  {self.ovs.describe()}")
        for n in self.nodes.values():
            lines.append(f"  node {n.name:<10} {n.spec.ip!s:<16} podCIDR {n.spec.pod_cidr}")
            its = self.kubelets[n.name].pods.values() if n.name in self.kubelets else ()
            for p in sorted(its, key=lambda p: p.name):
                cont = ", ".join(p.containers) or "-"
                lines.append(f"    pod {p.name:<14} {p.ip or '?':<16} containers: {cont}")
        for r in self.routers.values():
            lines.append(f"  router {r.name}")
        for h in self.hosts.values():
            lines.append(f"  host   {h.name:<10} {h.IP()}")
        return lines

    def cli(self) -> None:
        """Mininet's CLI, with pod and node names as hosts (``web-0 ping web-1``)."""
        from mininet.cli import CLI
        from mininet.log import output
        mode = self.mode

        class ClusterCLI(CLI):
            identchars = CLI.identchars + "-."  # Kubernetes names hold dashes; a.x: pod a of namespace x

            def do_bgp(self, line: str) -> None:
                """bgp: BGP sessions and routes of every node, asked of its speaker (cni bgp)"""
                table = getattr(mode, "status_table", None)
                output((table() if table else f"cni {mode.name} runs no BGP speakers") + "\n")

        assert self.net is not None
        setLogLevel("output")   # the CLI prints command output at this level
        try:
            ClusterCLI(self.net)
        finally:
            setLogLevel("error")

    def _state_in_memory(self) -> None:
        """The per-pod state (CNI result cache, IPAM reservations, flannel's saved configs,
        container logs: a few small files per pod) on a tmpfs of the cluster's own, as ``/run``
        is meant to be: on a machine whose ``/run`` is a journalled disk, creating and then
        removing 4,000 files was seconds of a 1,000-pod cluster's start and most of its stop.
        The mounts go with the state directory (``stop()``, or ``clean`` after a kill -9)."""
        assert self.state is not None
        for sub in ("nodes", "logs"):
            d = self.state.path / sub
            d.mkdir(exist_ok=True)
            r = proc.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "k8snetlab", str(d)], check=False)
            if r.returncode != 0:       # still works on disk, only slower
                log.info("state on disk: mount tmpfs at %s: %s", d, (r.stderr or r.stdout).strip())

    def _sandbox_holder(self) -> tuple[str, ...] | None:
        """What holds each pod sandbox: our pause (``k8snetlab/pause.c``, compiled once into
        the state root, copied into this cluster's state directory as ``pause``, the name
        ``ps`` shows), or None (``Pod.HOLDER``, ``mnexec -n sleep``) without a C compiler."""
        assert self.state is not None
        built = cbuild.compiled(PAUSE_SOURCE, self.state.path.parent, "pause")
        if built is None:
            return None
        pause = self.state.path / "pause"
        shutil.copyfile(built, pause)
        pause.chmod(0o755)
        return (str(pause),)

    # -- CNI plugin executables -------------------------------------------------------------------
    def _log_dir(self) -> Path:
        assert self.state is not None
        logs = self.state.path / "logs"
        logs.mkdir(exist_ok=True)
        return logs

    def _write_cni_bin(self) -> None:
        """Our plugins as CNI executables named by type, in this cluster's CNI_PATH: thin
        shims forwarding to the node's CNI server (:mod:`k8snetlab.cni_server`); with
        ``cni.invoke: exec`` the worker processes those servers run in."""
        from .cni_server import ServerPool, pool_size, run_dir, write_plugins
        assert self.state is not None
        write_plugins(self.state.cni_bin, self.state.path.parent)
        if self.spec.cni.invoke == "exec":
            self.cni_servers = ServerPool(run_dir(self.state.cni_bin), self._log_dir(),
                                          pool_size(len(self.spec.nodes)), self.state.record_pid)
            self.cni_servers.start()

