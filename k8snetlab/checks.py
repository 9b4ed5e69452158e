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
import shutil
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any, Iterable

from .errors import SpecError

# (type hints name ClusterSpec, NodeSpec and Workload as strings: this module imports none
# of the project's but errors, so that the parser and the manifests can use it)

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


# -- files -------------------------------------------------------------------------------------
ALLOW_OUTSIDE_ENV = "K8SNETLAB_ALLOW_OUTSIDE_FILES"


def read_text(path: Path, what: str, where: str = "") -> str:
    """A file's text, or one line saying why not (missing, unreadable, binary); ``where``
    names the key that refers to the file."""
    at = f"{where}: " if where else ""
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise SpecError(f"{at}{path}: cannot read {what}: it is a directory") from None
    except OSError as e:
        raise SpecError(f"{at}{path}: cannot read {what}: {e.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SpecError(f"{at}{path}: not a {what}: not UTF-8 text (byte {e.start} is 0x{data[e.start]:02x}); "
                        "give a YAML file") from None


def workload_file(base: Path, ref: Any, where: str) -> Path:
    """A ``workloads: [{file: ...}]`` reference: relative to the cluster file's directory and
    inside it (the file is read as root), unless ``$K8SNETLAB_ALLOW_OUTSIDE_FILES`` is 1
    (``--allow-outside-files``)."""
    if not isinstance(ref, str) or not ref:
        raise SpecError(f"{where}: must be a path relative to the cluster file, like manifests/web.yaml")
    path = (base / ref).resolve()
    if os.environ.get(ALLOW_OUTSIDE_ENV) != "1" and not path.is_relative_to(base.resolve()):
        raise SpecError(f"{where}: {ref[:200]!r} is outside the cluster file's directory {base.resolve()}: "
                        "move it there, or allow it with --allow-outside-files")
    return path


# -- addresses ---------------------------------------------------------------------------------
SPECIAL_RANGES = {
    "0.0.0.0/8": "reserved ('this network')",
    "127.0.0.0/8": "loopback",
    "169.254.0.0/16": "link-local",
    "224.0.0.0/4": "multicast",
    "240.0.0.0/4": "reserved (class E and broadcast)",
}


def check_usable_ranges(spec: "ClusterSpec") -> None:
    """Cluster, service, pod and underlay CIDRs must be ordinary unicast ranges: addresses in
    loopback, link-local, multicast or reserved space cannot be routed as pod or node IPs."""
    items = [("network.clusterCIDR", spec.network.cluster_cidr), ("network.serviceCIDR", spec.network.service_cidr)]
    items += [(f"nodes {n.name} podCIDR", n.pod_cidr) for n in spec.nodes]
    items += [(f"underlay subnet {s.name}", s.cidr) for s in spec.underlay.subnets]
    for label, net in items:
        for special, what in SPECIAL_RANGES.items():
            if net.overlaps(IPv4Network(special)):
                raise SpecError(f"{spec.source}: {label} {net} is in the {what} range {special}: "
                                "use private unicast ranges (10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16)")


def check_node_not_gateway(spec: "ClusterSpec") -> None:
    for n in spec.nodes:
        gw = spec.underlay.subnet(n.subnet).gateway
        if gw is not None and n.ip == gw:
            raise SpecError(f"{spec.source}: node {n.name}: ip {n.ip} is the gateway of subnet {n.subnet}: "
                            "give the node another address")


# -- names and commands ------------------------------------------------------------------------
def check_reserved_names(spec: "ClusterSpec", pod_names: Iterable[str], reserved: dict[str, str]) -> None:
    """No node, pod, underlay host or router has a name an add-on will take (``reserved``:
    name -> what takes it, from the add-ons' ``reserved_host_names``)."""
    if not reserved:
        return
    for kind, names in (("node", [n.name for n in spec.nodes]), ("pod", pod_names),
                        ("underlay host", [h.name for h in spec.underlay.hosts]),
                        ("router", [r.name for r in spec.underlay.routers])):
        for name in names:
            if name in reserved:
                raise SpecError(f"{spec.source}: {kind} name {name!r} is reserved in a cluster with Services "
                                f"({reserved[name]} uses it): rename the {kind}")


def check_container_commands(spec: "ClusterSpec") -> None:
    """Every container's program exists on this machine (containers run its programs)."""
    seen: set[str] = set()
    for w in spec.workloads:
        for c in w.template.containers:
            argv = c.argv
            if not argv or argv[0] in seen:
                continue
            prog = argv[0]
            found = os.access(prog, os.X_OK) and os.path.isfile(prog) if "/" in prog else shutil.which(prog)
            if not found:
                raise SpecError(f"{spec.source}: workload {w.name}, container {c.name}: command {prog[:200]!r} "
                                "is not an executable on this machine: install it or fix the command")
            seen.add(prog)

