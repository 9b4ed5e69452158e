"""The Endpoints controller: which pods back a Service, on which port.

For every Service with a selector, the ready pods of the Service's namespace whose labels
match it become its endpoints (pod IP, node, pod name), each with the port every
ServicePort resolves to in that pod: a numeric ``targetPort`` as is, a named one looked up
among the pod's container ports of the same protocol (a pod without that name is left out
of that port, as Kubernetes does). A Service without a selector has no endpoints.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable

from ..manifests import ContainerPort
from .model import Endpoint, Service, ServicePort

if TYPE_CHECKING:  # pragma: no cover
    from ..pod import Pod


@dataclass(frozen=True)
class PodView:
    """What the Endpoints controller needs to know about a pod."""
    name: str
    namespace: str
    labels: dict[str, str] = field(hash=False)
    ip: str | None
    node: str | None
    ports: tuple[ContainerPort, ...] = ()
    ready: bool = True


def view(pod: "Pod", terminating: bool = False) -> PodView:
    ports = tuple(p for c in pod.spec.containers for p in c.ports)
    running = all(c.running() for c in pod.containers.values())
    return PodView(pod.name, pod.spec.namespace, dict(pod.spec.labels), pod.ip, pod.node_name, ports,
                   ready=running and getattr(pod, "ready", True) and not terminating and pod.ip is not None)


def selects(svc: Service, pod: PodView) -> bool:
    return bool(svc.selector) and pod.namespace == svc.namespace \
        and all(pod.labels.get(k) == v for k, v in svc.selector.items())


def resolve_port(port: ServicePort, pod: PodView) -> int | None:
    """The port ``port`` reaches in ``pod``: the number, or the named container port."""
    if isinstance(port.target_port, int):
        return port.target_port
    for cp in pod.ports:
        if cp.name == port.target_port and cp.protocol == port.protocol:
            return cp.container_port
    return None


def endpoints_of(svc: Service, pods: Iterable[PodView]) -> tuple[Endpoint, ...]:
    """The ready endpoints of ``svc``, sorted by IP."""
    out = []
    for pod in pods:
        if not pod.ready or pod.ip is None or not selects(svc, pod):
            continue
        ports = {p.name: n for p in svc.ports if (n := resolve_port(p, pod)) is not None}
        if svc.ports and not ports:
            continue       # matches, but serves none of the Service's ports
        out.append(Endpoint(pod.ip, pod.node or "", pod.name, ports))
    return tuple(sorted(out, key=lambda e: ipaddress.IPv4Address(e.ip)))


class EndpointsController:
    """Keeps the endpoints of every Service (called by the add-on on each change).

    "Ready" here: the pod has its IP (CNI ADD returned), none of its containers has exited, the
    kubelet's supervision says it is ready (after a restart: only once its TCP container ports
    listen again, see :mod:`k8snetlab.supervisor`), and it is not being deleted. The add-on marks a pod *terminating* before its containers are
    stopped (``pod_removing``), so it leaves every Service before it stops answering: the
    graceful-termination order of a real cluster.

    The controller is pure: it works on :class:`PodView` records, so it is unit-tested without
    building anything; :func:`view` makes one from a running pod.
    """

    def __init__(self) -> None:
        self.terminating: set[str] = set()      # container ids of pods being deleted

    def compute(self, services: Iterable[Service], pods: Iterable["Pod"]) -> dict[str, tuple[Endpoint, ...]]:
        views = [view(p, p.container_id in self.terminating) for p in pods]
        return {s.key: endpoints_of(s, views) for s in services}

    def mark_terminating(self, pod: "Pod") -> None:
        self.terminating.add(pod.container_id)

    def forget(self, live: Iterable["Pod"]) -> None:
        """Drop the marks of pods that are gone (a new pod may reuse a name, never an id)."""
        self.terminating &= {p.container_id for p in live}
