"""The kubelet of one node: node agent start, pod sandboxes, CNI ADD/DEL/CHECK, containers, readiness.

A kubelet touches only its own node: the node's namespace (the mode's node agent is started
there, as flanneld / calico-node run beside the kubelet), the node's network config list
(written where a kubelet finds it, ``net.d/``), the node's CNI runtime and result cache, and
the sandboxes and containers of the pods bound to it. That is the seam through which a node
could one day live on another machine.

With ``cni.invoke: exec`` the node also has a CNI server (:mod:`k8snetlab.cni_server`, in one
of the cluster's server worker processes): the runtime still executes the plugin named by
``type`` with the CNI environment and stdin, and that executable forwards the request to the
server, as Multus' thick plugin does.

The kubelet's methods may run concurrently for different pods; what they share (the pod
table, the timings) is guarded by a lock.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from . import chain, naming, proc
from .cni import INVOKERS, CNIRuntime, NetworkConfigList, RuntimeConf
from .errors import K8sNetLabError
from .manifests import PodSpec
from .modes import Mode
from .netutil import Netns
from .pod import NodeHost, Pod

log = logging.getLogger(__name__)

# phases of a pod's start, summed per node: where the time goes
PHASES = ("sandbox_s", "cni_s", "containers_s", "readiness_s")
READY_POLL_S = (0.001, 0.02)      # a readiness probe's poll: from 1 ms, doubling, to 20 ms


class Kubelet:
    def __init__(self, node: NodeHost, mode: Mode, invoke: str, log_dir: Path,
                 record: Callable[[int, str], None], record_netns: Callable[[int, str], None],
                 holder: tuple[str, ...] | None = None):
        self.node = node
        self.holder = holder                        # the sandbox holder's argv (None: Pod.HOLDER)
        self.mode = mode
        self.invoke = invoke
        self.log_dir = log_dir
        self.pods: dict[str, Pod] = {}
        self.netconf: NetworkConfigList | None = None
        self.runtime: CNIRuntime | None = None
        self.server: Any = None                     # cni_server.CNIServer with invoke exec
        self.timings: dict[str, float] = dict.fromkeys(PHASES, 0.0)
        self._record, self._record_netns = record, record_netns
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return self.node.name

    # -- node ------------------------------------------------------------------------------
    def start(self, server: Any = None) -> None:
        """Start the node agent, write the node's network config list, open its CNI runtime
        and start the node's CNI server, given one (a ``cni_server.PooledServer`` or
        ``CNIServer`` for this node's namespace)."""
        node = self.node
        with Netns(node.netns, node.name) as ns:
            self.mode.start_node(node, ns)
        conf = self.mode.netconf(node)
        self.netconf = conf
        netd = node.state_dir / "net.d"
        netd.mkdir(exist_ok=True)
        (netd / f"10-{conf.name}.conflist").write_text(json.dumps(conf.to_dict(), indent=2) + "\n")
        self.runtime = CNIRuntime(node.netns, node.state_dir / "results", INVOKERS.get(self.invoke)())
        if server is not None:
            server.start()
            self.server = server

    def stop(self, attempt: Callable[..., None], cni_del: bool = True) -> None:
        """Stop the node's pods (containers, CNI DEL when asked), the CNI server, the node agent."""
        for pod in list(self.pods.values()):
            attempt(f"stop containers of {pod.name}", pod.stop_containers)
        if cni_del:
            for pod in list(self.pods.values()):
                if pod.result is not None:
                    attempt(f"CNI DEL of {pod.name}", self.cni_del, pod)
        if self.server is not None:
            attempt(f"stop the CNI server of {self.name}", self.server.stop)
            self.server = None
        attempt(f"stop node agent on {self.name}", self.mode.stop_node, self.node)

    # -- pods ------------------------------------------------------------------------------
    def create_sandbox(self, ps: PodSpec) -> Pod:
        """The pod's sandbox: a network (and mount) namespace and the process holding it,
        loopback up (what the runtime's loopback plugin does). No shell yet."""
        t0 = time.monotonic()
        name = ps.host_name
        pod = Pod(name, spec=ps, holder=self.holder)
        pod.on_popen = self._record
        self._record(pod.pid, f"Pod {name}")
        self._record_netns(pod.pid, name)
        pod.node_name = self.name
        pod.container_id = secrets.token_hex(32)
        try:
            if os.stat(pod.netns).st_ino == os.stat("/proc/self/ns/net").st_ino:
                raise K8sNetLabError(f"pod {ps.key}: the sandbox is not in a namespace of its own")
            proc.loopback_up(pod.netns)
        except BaseException:
            pod.terminate()
            raise
        pod.marks["sandbox"] = t1 = time.monotonic()
        with self._lock:
            self.pods[name] = pod
            self.timings["sandbox_s"] += t1 - t0
        return pod

    def runtime_conf(self, pod: Pod) -> RuntimeConf:
        s = pod.spec
        # hostPorts and bandwidth annotations as capability arguments, sysctls as args.cni
        return RuntimeConf(pod.container_id, pod.netns, naming.POD_IFNAME,
                           {"IgnoreUnknown": "1", "K8S_POD_NAMESPACE": s.namespace,
                            "K8S_POD_NAME": s.name, "K8S_POD_INFRA_CONTAINER_ID": pod.container_id},
                           chain.capability_args(s), chain.config_args(s))

    def cni_add(self, pod: Pod) -> None:
        assert self.runtime is not None and self.netconf is not None
        t0 = time.monotonic()
        try:
            result = self.runtime.add(self.netconf, self.runtime_conf(pod))
        except K8sNetLabError as e:
            raise K8sNetLabError(f"CNI ADD of pod {pod.name} on {self.name} failed: {e}") from None
        cidr = result.sandbox_ip(naming.POD_IFNAME)
        if cidr is None:
            raise K8sNetLabError(f"CNI ADD of pod {pod.name} returned no address")
        pod.result = result
        pod.attach_interface(naming.POD_IFNAME, cidr)
        self.mode.pod_added(pod)
        pod.marks["cni"] = t1 = time.monotonic()
        with self._lock:
            self.timings["cni_s"] += t1 - t0

    def teardown_needs_del(self) -> bool:
        """Must a pod of this node get CNI DEL when the whole cluster goes? Not when the
        network config list runs only our plugins from this cluster's CNI_PATH: they keep
        their state in the node's namespace and the cluster's state directory, which the
        teardown removes whole. Other plugins (Debian's reference binaries), and a plugin of
        ours whose module sets ``TEARDOWN_DEL = True``, get their DEL."""
        from cni_plugins import PLUGINS
        conf = self.netconf
        if conf is None or self.runtime is None:
            return False
        ours = getattr(getattr(self.mode.cluster, "state", None), "cni_bin", None)
        if ours is None or tuple(conf.bin_dirs) != (str(ours),):
            return True
        types = [p.get("type") for p in conf.plugins]
        return not all(t in PLUGINS and not getattr(PLUGINS.get(t), "TEARDOWN_DEL", False) for t in types)

    def cni_del(self, pod: Pod) -> None:
        if self.runtime is not None and self.netconf is not None:
            self.runtime.delete(self.netconf, self.runtime_conf(pod))
        pod.result = None

    def check(self, pod: Pod) -> None:
        """CNI CHECK (raises CNIError when the pod's wiring is not as ADD left it)."""
        assert self.runtime is not None and self.netconf is not None
        self.runtime.check(self.netconf, self.runtime_conf(pod))

    def start_containers(self, pod: Pod) -> None:
        t0 = time.monotonic()
        for c in pod.spec.containers:
            pod.start_container(c, self.log_dir)
        pod.marks["containers"] = t1 = time.monotonic()
        with self._lock:
            self.timings["containers_s"] += t1 - t0

    def run_pod(self, ps: PodSpec, created_at: float | None = None) -> Pod:
        """Sandbox, CNI ADD, containers (not readiness: see :meth:`wait_ready`). A failure
        leaves nothing of the pod behind. ``created_at`` (time.monotonic()): when the pod was
        asked for, the start of its startup latency (default: now)."""
        t0 = time.monotonic()
        pod = self.create_sandbox(ps)
        pod.created_at = t0 if created_at is None else created_at
        pod.marks["created"], pod.marks["picked"] = pod.created_at, t0
        with self._removed_on_failure(pod):
            self.cni_add(pod)
            self.start_containers(pod)
        return pod

    def start_pod(self, ps: PodSpec, created_at: float, ready_timeout: float) -> Pod:
        """:meth:`run_pod`, then this pod's readiness (:meth:`wait_ready`), as the kubelet's
        pod worker does it: each pod is observed ready on its own, not after the others of
        its batch."""
        pod = self.run_pod(ps, created_at)
        with self._removed_on_failure(pod):
            self.wait_ready([pod], time.monotonic() + ready_timeout)
        return pod

    @contextlib.contextmanager
    def _removed_on_failure(self, pod: Pod) -> Iterator[None]:
        """Any failure (or interrupt) inside deletes the pod, then goes on; a failing delete
        is logged, so the first error is the one reported."""
        try:
            yield
        except BaseException:
            try:
                self.delete_pod(pod.name)
            except Exception as e:
                log.warning("rollback of pod %s: %s", pod.name, e)
            raise

    def wait_ready(self, pods: list[Pod], deadline: float) -> None:
        """Wait until every container of each pod has started and every declared TCP
        containerPort listens (a tcpSocket readiness probe, polled from 1 ms up to every
        20 ms), until ``deadline`` (time.monotonic()); each pod becomes ready at its own
        ``pod.ready_at``, the moment it was observed so."""
        t0 = time.monotonic()
        for pod in pods:
            self._observe_ready(pod, deadline)
        with self._lock:
            self.timings["readiness_s"] += time.monotonic() - t0

    def _observe_ready(self, pod: Pod, deadline: float) -> None:
        for c in pod.spec.containers:
            cont = pod.containers.get(c.name)
            if cont is None:
                continue                        # no command: nothing runs for it
            ports = [p.container_port for p in c.ports if p.protocol == "TCP"]
            wait = READY_POLL_S[0]
            while ports:             # started (in the sandbox's namespaces: Pod.popen_ns) suffices without ports
                if not cont.running():
                    raise K8sNetLabError(f"container {c.name} of pod {pod.name} exited "
                                         f"(status {cont.process.returncode}); see {cont.log_path}")
                if all(proc.listening(cont.pid, port) for port in ports):
                    break
                if time.monotonic() > deadline:
                    log.warning("pod %s: ports %s not listening in time", pod.name, ports)
                    return
                time.sleep(wait)
                wait = min(wait * 2, READY_POLL_S[1])
        pod.ready_at = pod.marks["ready"] = time.monotonic()

    def delete_pod(self, name: str, kill: Callable[[Pod], None] | None = None) -> Pod:
        """Containers, the mode's per-pod state, CNI DEL, the sandbox."""
        pod = self.pods[name]
        pod.stop_containers()
        try:
            if pod.result is not None:
                self.mode.pod_removed(pod)
                self.cni_del(pod)
        finally:
            if kill is not None:
                kill(pod)
            pod.terminate()
            with self._lock:
                self.pods.pop(name, None)
        return pod
