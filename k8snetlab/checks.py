"""Load-time refusals that are not about one key's syntax: bounds, reserved names and ranges.

Each check is a small function of a parsed :class:`~k8snetlab.spec.ClusterSpec` (or of the
raw values it is built from) that raises :class:`SpecError` with one line naming the problem
and the fix. They run when the cluster file loads, before anything is created, so that a
cluster the machine cannot build is refused in milliseconds instead of failing half-built.

Bounds (README "Errors"):
- pods per node: the addresses of the node's pod CIDR, less network, gateway and broadcast
  (a /24 holds 253 pods);
- pods per cluster: :data:`MAX_PODS` (5,000), raised with ``K8SNETLAB_MAX_PODS``;
- nodes per cluster: :data:`MAX_NODES`.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Iterable

from .errors import SpecError

if TYPE_CHECKING:
    from .manifests import Workload
    from .spec import ClusterSpec, NodeSpec

DEFAULT_MAX_PODS = 5000
MAX_NODES = 1000
MAX_PODS_ENV = "K8SNETLAB_MAX_PODS"
POD_BATCH = 128          # sandboxes created (and wired) at a time while a cluster starts


def max_pods() -> int:
    """The cap on pods per cluster: ``$K8SNETLAB_MAX_PODS`` or :data:`DEFAULT_MAX_PODS`."""
    raw = os.environ.get(MAX_PODS_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_PODS
    if not raw.isdigit() or int(raw) < 1:
        raise SpecError(f"{MAX_PODS_ENV}={raw[:40]!r}: must be a whole number >= 1 (default {DEFAULT_MAX_PODS})")
    return int(raw)


def node_pod_capacity(node: "NodeSpec") -> int:
    """How many pods the node's pod CIDR can address (host-local: not the network, gateway
    or broadcast address)."""
    return max(0, node.pod_cidr.num_addresses - 3)


def check_node_count(count: int, where: str) -> None:
    if count > MAX_NODES:
        raise SpecError(f"{where}: {count} nodes; the testbed builds at most {MAX_NODES} on one machine: "
                        "use fewer nodes")


def check_replicas(replicas: int, where: str) -> None:
    """One workload's ``replicas``, before any pod is expanded from it."""
    cap = max_pods()
    if replicas > cap:
        raise SpecError(f"{where}: replicas {replicas} exceeds the cap of {cap} pods per cluster: "
                        f"use fewer replicas (or raise {MAX_PODS_ENV})")


def _matches(node: "NodeSpec", node_name: str | None, selector: dict[str, str]) -> bool:
    return (node_name is None or node.name == node_name) and \
        all(node.labels.get(k) == v for k, v in selector.items())


def check_pod_bounds(spec: "ClusterSpec", workloads: Iterable["Workload"] | None = None) -> None:
    """The cluster's pods fit: the total under the cap, and every group of pods with the same
    placement (nodeName / nodeSelector) within the pod CIDRs of the nodes it may go to.
    Counts come from ``replicas``; no pod list is built (``replicas: 1000000`` costs nothing)."""
    src = spec.source
    wls = list(spec.workloads if workloads is None else workloads)
    total = sum(1 if w.kind == "Pod" else w.replicas for w in wls)
    cap = max_pods()
    if total > cap:
        raise SpecError(f"{src}: workloads ask for {total} pods; the cap is {cap} pods per cluster: "
                        f"use fewer replicas (or raise {MAX_PODS_ENV})")
    room = {n.name: node_pod_capacity(n) for n in spec.nodes}
    if total > sum(room.values()):
        raise SpecError(f"{src}: workloads ask for {total} pods but the nodes' pod CIDRs hold "
                        f"{sum(room.values())}: add nodes or use a smaller network.nodeCIDRMaskSize")
    groups: dict[tuple[Any, ...], int] = {}
    for w in wls:
        t = w.template
        key = (t.node_name, tuple(sorted(t.node_selector.items())))
        groups[key] = groups.get(key, 0) + (1 if w.kind == "Pod" else w.replicas)
    for (node_name, selector), count in groups.items():
        fits = sum(room[n.name] for n in spec.nodes if _matches(n, node_name, dict(selector)))
        if count > fits and fits > 0:
            where = f"nodeName {node_name}" if node_name else f"nodeSelector {dict(selector)}"
            raise SpecError(f"{src}: {count} pods go to {where}, whose pod CIDRs hold {fits}: "
                            "spread them over more nodes or use larger pod CIDRs")
