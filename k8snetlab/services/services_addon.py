"""The Services add-on: the Service controller, one kube-proxy per node, DNS, load balancer.

It plays the control plane's part for Services (the API server's ClusterIP and nodePort
allocation, the Endpoints controller) and starts the node agents (kube-proxy in the mode of
``kubeProxy.mode``) plus the cluster DNS and the emulated external load balancer when the
options ask for them. An ``external`` host joins the underlay as the client from outside
the cluster (NodePort and LoadBalancer traffic).

Every change — pods added or being removed (``scale``, ``delete_pod``), Services added or
deleted, nodes joining or leaving — builds a new :class:`~.model.Snapshot` (all Services,
all ready endpoints) and hands it to every proxier, then to the DNS and the load balancer.
A pod leaves its Services *before* its containers stop, as with graceful termination.
Besides, a background thread re-applies the last snapshot to every proxier every
``syncPeriod`` seconds: kube-proxy's periodic resync, which repairs rules deleted by hand.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from .. import proc
from ..addons import Addon
from ..errors import K8sNetLabError, KernelFeatureMissing, SpecError
from ..periodic import Periodic
from .dns import ClusterDNS
from .endpoints import EndpointsController
from .loadbalancer import LoadBalancer
from .model import (
    DNS_OFFSET,
    Endpoint,
    KubeProxyOptions,
    Service,
    ServiceAllocator,
    Snapshot,
    parse_kube_proxy,
    parse_service,
    plan,
)
from .proxy import PROXIERS, Proxier

if TYPE_CHECKING:  # pragma: no cover
    from ..cluster_view import ClusterView
    from ..pod import NetnsHost, NodeHost, Pod
    from ..clusterspec import ClusterSpec

log = logging.getLogger(__name__)

EXTERNAL_HOST = "external"


class ServicesAddon(Addon):
    """The add-on ``cluster.services`` is.

    Use it as ``cluster.services``::

        svc = cluster.services.add_service({"apiVersion": "v1", "kind": "Service", ...})
        cluster.services.add_services([...])            # many, with one sync of every node
        cluster.services.endpoints("default/web")        # -> (Endpoint(ip, node, pod, ports), ...)
        cluster.services.proxiers["node1"]               # the node's kube-proxy
        cluster.services.external.cmd("curl -s 192.168.1.129:30080")
        cluster.services.set_mode("nftables")            # restart kube-proxy in another mode
    """
    name = "services"

    def __init__(self, cluster: "ClusterView"):
        super().__init__(cluster)
        self.options: KubeProxyOptions = parse_kube_proxy(cluster.spec)
        self.allocator = ServiceAllocator(cluster.spec.network.service_cidr, dns=self.options.dns)
        self.controller = EndpointsController()
        self.proxiers: dict[str, Proxier] = {}
        self.external: "NetnsHost | None" = None
        self.dns: Any = None
        self.lb: Any = None
        self._services: dict[str, Service] = {}
        self._snap = Snapshot((), {}, 0)
        self._lock = threading.RLock()
        self._resync = Periodic("kube-proxy-resync", lambda: self.options.sync_period, self._resync_round)
        self._last_error = ""
        self.resyncs = 0          # periodic resync rounds done (every proxier once per round)

    # -- spec-load checks (no root) --------------------------------------------------------------
    @classmethod
    def wanted(cls, spec: "ClusterSpec") -> bool:
        return bool(spec.services) or bool(spec.kube_proxy)

    @classmethod
    def reserved_host_names(cls, spec: "ClusterSpec") -> dict[str, str]:
        if not cls.wanted(spec):
            return {}
        from .loadbalancer import HOST as LB_HOST
        return {EXTERNAL_HOST: "the Services add-on's external client", LB_HOST: "the load balancer"}

    @classmethod
    def validate(cls, spec: "ClusterSpec") -> None:
        """Parse the kubeProxy section and every Service, and allocate (dry run): any mistake
        is a SpecError naming the file and key, before anything is built."""
        if not cls.wanted(spec):
            return
        opts = parse_kube_proxy(spec)
        try:
            mode = PROXIERS.get(opts.mode)
        except SpecError as e:
            raise SpecError(f"{spec.source}: kubeProxy.mode: {e}") from None
        why = mode.unavailable()
        if why is not None and opts.mode == "ipvs":   # other modes' tools are checked at start
            raise SpecError(f"{spec.source}: kubeProxy.mode: {why}")
        cidr = spec.network.service_cidr
        if opts.dns and cidr.num_addresses <= DNS_OFFSET + 1:
            raise SpecError(f"{spec.source}: network.serviceCIDR {cidr} is too small for the cluster DNS at its "
                            f"tenth address: use a larger range (e.g. 10.96.0.0/12) or kubeProxy.dns: false")
        services = plan(spec.services, ServiceAllocator(cidr, dns=opts.dns))
        lbs = [s.key for s in services if s.type == "LoadBalancer"]
        if lbs and opts.load_balancer_pool is None:
            raise SpecError(f"{spec.source}: kubeProxy.loadBalancerPool: Service {lbs[0]} is a LoadBalancer but "
                            "no free /28 is left in the first node subnet: set loadBalancerPool to a free range")

    # -- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> None:
        cls = PROXIERS.get(self.options.mode)
        why = cls.unavailable()
        if why is not None:
            raise KernelFeatureMissing(why)
        proc.require(*cls.tools)
        for svc in plan(self.cluster.spec.services, self.allocator):
            self._services[svc.key] = svc
        self.external = self.cluster.add_host(EXTERNAL_HOST, str(self.options.external_host))
        with self._lock:
            for node in self.cluster.nodes.values():
                self._start_proxier(cls, node)
            self._changed()
        self._start_optional()
        log.info("services: kube-proxy %s on %d node(s), %d Service(s), external host %s",
                 self.options.mode, len(self.proxiers), len(self._services), self.options.external_host)
        self._resync.start()

    def _start_optional(self) -> None:
        """Cluster DNS and the load balancer, when the options ask for them."""
        if self.options.dns:
            self.dns = self._start_part("cluster DNS", ClusterDNS(self))
        if self.options.load_balancer_pool:
            lb = self.lb = self._start_part("load balancer", LoadBalancer(self))
            for key, svc in list(self._services.items()):
                if svc.type == "LoadBalancer" and not svc.load_balancer_ip:
                    self._services[key] = replace(svc, load_balancer_ip=lb.assign(key))
        self._changed()

    @staticmethod
    def _start_part(what: str, part: Any) -> Any:
        """Start DNS or the load balancer; one that fails to start is stopped (what it made
        so far removed) before the error goes on. Events reach it only once it runs."""
        try:
            part.start()
        except BaseException:
            try:
                part.stop()
            except Exception as e:
                log.warning("services: stop %s after a failed start: %s", what, e)
            raise
        return part

    def _start_proxier(self, cls: type[Proxier], node: "NodeHost") -> None:
        p = cls(self.cluster, node, self.options)
        p.start()
        self.proxiers[node.name] = p

    def stop(self) -> None:
        self._resync.stop()
        for what, part in (("load balancer", self.lb), ("cluster DNS", self.dns)):
            if part is not None:
                try:
                    part.stop()
                except Exception as e:  # keep going: the rest must be removed too
                    log.warning("services: stop %s: %s", what, e)
        self.lb = self.dns = None
        with self._lock:
            for name, p in list(self.proxiers.items()):
                if name in self.cluster.nodes:
                    try:
                        p.stop()
                    except Exception as e:
                        log.warning("services: stop kube-proxy on %s: %s", name, e)
            self.proxiers.clear()

    # -- the public API ----------------------------------------------------------------------------
    def add_service(self, manifest: dict[str, Any]) -> Service:
        """Create a Service (Kubernetes manifest); returns it with its ClusterIP and nodePorts."""
        return self.add_services([manifest])[0]

    def add_services(self, manifests: list[dict[str, Any]]) -> list[Service]:
        """Create several Services with one sync of every node (all or none are created)."""
        with self._lock:
            parsed, keys = [], set()
            for manifest in manifests:
                meta = manifest.get("metadata") if isinstance(manifest, dict) else None
                where = f"Service {meta.get('name')}" if isinstance(meta, dict) and meta.get("name") else "Service"
                svc = parse_service(manifest, where)
                if svc.key in self._services or svc.key in keys:
                    raise SpecError(f"{where}: Service {svc.key} already exists: delete it first or pick another name")
                keys.add(svc.key)
                parsed.append((where, svc))
            reserved: list[Service] = []
            made: list[Service] = []
            try:                     # fixed addresses first, as for the cluster file
                for where, svc in parsed:
                    self.allocator.reserve(svc, where)
                    reserved.append(svc)
                for where, svc in parsed:
                    made.append(self.allocator.fill(svc, where))
            except SpecError:
                for svc in made + reserved:
                    self.allocator.release(svc)
                raise
            for svc in made:
                if svc.type == "LoadBalancer" and self.lb is not None:
                    svc = replace(svc, load_balancer_ip=self.lb.assign(svc.key))
                self._services[svc.key] = svc
            self._changed(strict=True)
            return [self._services[svc.key] for svc in made]

    def delete_service(self, key: str) -> None:
        svc = self.service(key)
        del self._services[key]
        self.allocator.release(svc)
        self._changed(strict=True)

    def service(self, key: str) -> Service:
        try:
            return self._services[key]
        except KeyError:
            raise K8sNetLabError(f"no Service {key!r}: Services are "
                                 f"{', '.join(sorted(self._services)) or '(none)'}") from None

    def services(self) -> list[Service]:
        return sorted(self._services.values(), key=lambda s: s.key)

    def snapshot(self) -> Snapshot:
        return self._snap

    def endpoints(self, key: str) -> tuple[Endpoint, ...]:
        self.service(key)
        return self._snap.endpoints.get(key, ())

    def resync(self) -> None:
        """Push the current snapshot to every proxier, the DNS and the load balancer now."""
        with self._lock:
            self._push(self._snap, strict=True, everything=True)

    def set_mode(self, mode: str) -> None:
        """Restart kube-proxy on every node in another mode (the old mode's rules are removed
        first, as ``kube-proxy --cleanup`` does)."""
        cls = PROXIERS.get(mode)
        why = cls.unavailable()
        if why is not None:
            raise KernelFeatureMissing(why)
        proc.require(*cls.tools)
        with self._lock:
            new: dict[str, Proxier] = {}
            try:                 # all new proxiers start before the old ones go: a mode that
                for node in self.cluster.nodes.values():     # cannot serve this cluster changes nothing
                    new[node.name] = cls(self.cluster, node, self.options)
                    new[node.name].start()
            except BaseException:
                for p in new.values():
                    p.stop()
                raise
            for p in self.proxiers.values():
                p.stop()
            self.proxiers = new
            self.options.mode = mode
            for p in self.proxiers.values():     # DNS and load balancer are not kube-proxy's
                p.sync(self._snap)
        log.info("services: kube-proxy now in %s mode", mode)

    # -- add-on hooks ------------------------------------------------------------------------------
    def pods_added(self, pods: list["Pod"]) -> None:
        self._changed()
        if self.dns is not None:
            self.dns.pods_added(pods)

    def pods_readiness_changed(self, pods: list["Pod"]) -> None:
        """Endpoints follow readiness: a pod whose container exited leaves its Services until
        the kubelet restarted it and it serves again."""
        self._changed()

    def pod_removing(self, pod: "Pod") -> None:
        self.controller.mark_terminating(pod)
        self._changed()

    def node_added(self, node: "NodeHost") -> None:
        with self._lock:
            self._start_proxier(PROXIERS.get(self.options.mode), node)
            self._changed()

    def node_removed(self, name: str) -> None:
        with self._lock:
            self.proxiers.pop(name, None)        # its namespace is gone with it
            self._changed()

    # -- internals ---------------------------------------------------------------------------------
    def _changed(self, strict: bool = False) -> None:
        """Build a new snapshot from the cluster's pods and push it everywhere."""
        with self._lock:
            pods = list(self.cluster.pods.values())
            self.controller.forget(pods)
            services = tuple(self.services())
            snap = Snapshot(services, self.controller.compute(services, pods), self._snap.version + 1)
            self._snap = snap
            self._push(snap, strict)

    def _push(self, snap: Snapshot, strict: bool, everything: bool = False) -> None:
        """Proxiers first, then DNS and load balancer. ``strict``: a proxier's failure raises
        (DNS and LB failures only with ``everything``: they do not make a Service fail)."""
        for name, p in list(self.proxiers.items()):
            self._attempt(f"kube-proxy on {name}", p.sync, snap, strict=strict)
        for what, part in (("cluster DNS", self.dns), ("load balancer", self.lb)):
            if part is not None:
                self._attempt(what, part.sync, snap, strict=strict and everything)

    def _attempt(self, what: str, fn: Any, snap: Snapshot, strict: bool) -> None:
        try:
            fn(snap)
        except K8sNetLabError as e:
            if strict:
                raise
            log.error("services: %s failed to sync: %s", what, e)

    def _resync_round(self) -> None:
        """kube-proxy's periodic full sync: re-apply the last snapshot on every node."""
        with self._lock:
            if self._resync.stopping:
                return
            snap = self._snap
            for name, p in list(self.proxiers.items()):
                if name not in self.cluster.nodes:
                    continue
                try:
                    p.sync(snap)
                    self._last_error = ""
                except Exception as e:   # keep resyncing; say it once
                    msg = f"{name}: {e}"
                    if msg != self._last_error:
                        log.warning("services: periodic resync on %s", msg)
                        self._last_error = msg
            self.resyncs += 1

