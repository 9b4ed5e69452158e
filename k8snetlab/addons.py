"""Add-ons: cluster parts that run beside the pods and follow them (kube-proxy, Endpoints, DNS).

An add-on is an :class:`Addon` subclass declared in the ``k8snetlab.addons`` entry-point
group (:data:`ADDONS`). The spec asks every add-on to check the cluster file (``validate``, no root needed); the cluster
creates those that are ``wanted`` and calls them as pods and nodes come and go:

    start()                  after the initial pods are up
    pods_added(pods)         after add_pod / scale made pods (containers started, ready)
    pod_removing(pod)        before a pod's containers stop (graceful: leave endpoints first)
    pod_updated(pod)         a running pod's labels changed (Cluster.label_pod)
    pods_readiness_changed(pods)  the kubelet marked pods ready or not (a container exited, came back)
    node_added(node) / node_removed(name)
    stop()                   first thing in Cluster.stop()
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .registry import Registry

if TYPE_CHECKING:  # pragma: no cover
    from .cluster_view import ClusterView
    from .clusterspec import ClusterSpec


class Addon:
    name = "addon"

    def __init__(self, cluster: "ClusterView"):
        self.cluster = cluster

    @classmethod
    def validate(cls, spec: "ClusterSpec") -> None:
        """Raise SpecError for a cluster file this add-on cannot serve."""

    @classmethod
    def wanted(cls, spec: "ClusterSpec") -> bool:
        return False

    @classmethod
    def reserved_host_names(cls, spec: "ClusterSpec") -> dict[str, str]:
        """Host names this add-on will take in ``spec``'s cluster (name -> what takes it):
        no node, pod, host or router may have them (checked when the file loads)."""
        return {}

    def start(self) -> None: ...

    def pods_added(self, pods: list[Any]) -> None: ...

    def pod_removing(self, pod: Any) -> None: ...

    def pod_updated(self, pod: Any) -> None: ...

    def pods_readiness_changed(self, pods: list[Any]) -> None:
        """The kubelet marked ``pods`` ready or not ready (``pod.ready``): a container exited,
        or a restarted one serves again."""

    def node_added(self, node: Any) -> None: ...

    def node_removed(self, name: str) -> None: ...

    def stop(self) -> None: ...


ADDONS: Registry[type[Addon]] = Registry("add-on", "k8snetlab.addons", base=Addon)


def addon_classes() -> list[type[Addon]]:
    return [cls for _, cls in ADDONS.items()]
