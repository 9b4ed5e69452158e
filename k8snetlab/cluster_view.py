"""What CNI modes, add-ons and kube-proxy modes may use of a running cluster.

They are handed the :class:`~k8snetlab.cluster.Cluster` but typed against this protocol, so
that they depend on the few things they use and never import the runtime that imports them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # pragma: no cover
    from .statedir import StateDir
    from .clusterspec import ClusterSpec
    from .pod import NetnsHost, NodeHost, Pod, RouterHost


class ClusterView(Protocol):
    spec: "ClusterSpec"
    nodes: dict[str, "NodeHost"]
    routers: dict[str, "RouterHost"]
    hosts: dict[str, "NetnsHost"]       # underlay hosts that are not nodes
    pods: dict[str, "Pod"]
    state: "StateDir | None"            # the cluster's state directory (None before start)
    mode: Any                           # the CNI mode (modes.Mode)
    ovs: Any                            # the Open vSwitch underlay, None on Linux bridges

    @property
    def services(self) -> Any:
        """The Services add-on, None without one."""

    def add_host(self, name: str, ip: str, subnet: str | None = None) -> "NetnsHost":
        """A plain host joins the underlay."""

    def add_pod(self, manifest: Any) -> list["Pod"]:
        """Schedule and start pods (a manifest, PodSpec or Workload)."""
