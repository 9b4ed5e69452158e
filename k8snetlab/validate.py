"""The one validation step of a cluster file: after parsing, before anything is built.

:func:`validate` takes the parsed :class:`~k8snetlab.clusterspec.ClusterSpec` and asks every
registry what it makes of it: the CNI mode (its options section, then ``Mode.validate``), the
CNI invoker, the switch level and controller app, every add-on (the Services add-on checks
``kubeProxy`` and the Services). It returns the spec with the mode's options filled in, or
raises one :class:`SpecError` naming the file, the key and the fix. Checks of the whole file
that need no registry (addresses, scheduling) live here too, as small functions; the bounds,
reserved ranges and names and container commands in :mod:`k8snetlab.checks`.
"""

from __future__ import annotations

import dataclasses

from . import chain, checks, options, switching
from .addons import ADDONS
from .clusterspec import ClusterSpec, CNISpec
from .cni import INVOKERS
from .errors import SpecError
from .modes import MODES
from .scheduler import Scheduler, host_ports


def validate(spec: ClusterSpec) -> ClusterSpec:
    """Check ``spec`` against the registries; return it with typed CNI mode options."""
    switching.check(spec)
    spec = dataclasses.replace(spec, cni=resolve_cni(spec.cni, spec.source))
    check_addresses(spec)
    checks.check_usable_ranges(spec)
    checks.check_node_not_gateway(spec)
    checks.check_pod_bounds(spec)       # from replicas, before any pod list is expanded
    check_scheduling(spec)
    reserved: dict[str, str] = {}
    for _, addon in ADDONS.items():
        reserved.update(addon.reserved_host_names(spec))
    checks.check_reserved_names(spec, (p.host_name for p in spec.pods()), reserved)
    checks.check_container_commands(spec)
    chain.check_pods_against_chain(spec.pods(), spec.cni.chain or (), spec.source,
                                   own_host_ports=MODES.get(spec.cni.type).publishes_host_ports)
    MODES.get(spec.cni.type).validate(spec)
    for _, addon in ADDONS.items():
        addon.validate(spec)
    return spec


def resolve_cni(cni: CNISpec, src: str) -> CNISpec:
    """The ``cni`` section against the mode registry: a known type, known sections (every mode's
    section is checked, also those of other modes), the mode's options, a known invoker."""
    try:
        mode = MODES.get(cni.type)
    except SpecError as e:  # name the place: the registry only knows the valid names
        raise SpecError(f"{src}: cni.type: {e}") from None
    raw = cni.sections
    allowed = {"type", "reference", "invoke", "chain", *MODES.names()}
    bad = [k for k in raw if k not in allowed]
    if bad:
        raise SpecError(f"{src}: cni: unknown key {bad[0]!r}: valid keys are type, reference, invoke, chain "
                        f"and a section per mode ({', '.join(MODES.names())})")
    names, sysctl, chain_ref = chain.parse_chain(raw.get("chain"), mode.chained, f"{src}: cni.chain")
    if mode.publishes_host_ports and "portmap" in names:
        raise SpecError(f"{src}: cni.chain: {cni.type} publishes hostPorts itself: leave portmap out")
    for name in MODES.names():
        if name in raw:
            options.parse(MODES.get(name).Options, raw[name], f"{src}: cni.{name}")
    opts = options.parse(mode.Options, raw.get(cni.type), f"{src}: cni.{cni.type}")
    if cni.reference and cni.type != "bridge":
        raise SpecError(f"{src}: cni.reference: the reference plugins (containernetworking-plugins) "
                        f"are used for type bridge only, not {cni.type}")
    if cni.invoke not in INVOKERS:
        raise SpecError(f"{src}: cni.invoke: {cni.invoke!r} is not one of {', '.join(INVOKERS.names())}")
    return dataclasses.replace(cni, options=opts, chain=names, chain_sysctl=sysctl, chain_reference=chain_ref)


def check_addresses(spec: ClusterSpec) -> None:
    src = spec.source
    for s in spec.underlay.subnets:
        for label, net in (("clusterCIDR", spec.network.cluster_cidr), ("serviceCIDR", spec.network.service_cidr)):
            if s.cidr.overlaps(net):
                raise SpecError(f"{src}: underlay subnet {s.name} ({s.cidr}) overlaps network.{label} "
                                f"({net}): node and pod addresses must be distinct")
    node_subnets = list(dict.fromkeys(n.subnet for n in spec.nodes))
    if len(node_subnets) > 1:
        router_ips = {ip for r in spec.underlay.routers for _, ip in r.interfaces}
        for name in node_subnets:
            gw = spec.underlay.subnet(name).gateway
            if gw is None or gw not in router_ips:
                raise SpecError(f"{src}: underlay.subnets {name}: nodes are on several subnets, so subnet "
                                f"{name} needs a gateway that is an address of one of underlay.routers")
    used = {n.ip: f"node {n.name}" for n in spec.nodes}
    names = {n.name for n in spec.nodes}
    for h in spec.underlay.hosts:
        if h.name in names:
            raise SpecError(f"{src}: underlay host name {h.name!r} is already taken")
        if h.ip in used or h.ip not in spec.underlay.subnet(h.subnet).cidr:
            raise SpecError(f"{src}: underlay host {h.name}: {h.ip} is taken or not inside subnet {h.subnet}")
        names.add(h.name)
        used[h.ip] = f"host {h.name}"
    for r in spec.underlay.routers:
        if r.name in names:
            raise SpecError(f"{src}: router name {r.name!r} is also a node or host name")
        names.add(r.name)
        for subnet, ip in r.interfaces:
            if ip not in spec.underlay.subnet(subnet).cidr:
                raise SpecError(f"{src}: router {r.name}: {ip} is not inside subnet {subnet}")
            if ip in used:
                raise SpecError(f"{src}: router {r.name}: {ip} is already used by {used[ip]}")
            used[ip] = f"router {r.name}"


def check_scheduling(spec: ClusterSpec) -> None:
    try:
        pods = spec.pods()
    except SpecError as e:
        raise SpecError(f"{spec.source}: workloads: {e}") from None
    nodes = {n.name for n in spec.nodes}
    clash = nodes & {p.host_name for p in pods}
    if clash:
        raise SpecError(f"{spec.source}: pod name {sorted(clash)[0]!r} is also a node name: rename the workload")
    for p in pods:
        if p.node_name and p.node_name not in nodes:
            raise SpecError(f"{spec.source}: pod {p.name}: nodeName {p.node_name!r} is not a node "
                            f"({', '.join(sorted(nodes))})")
        if p.node_selector and not any(all(n.labels.get(k) == v for k, v in p.node_selector.items())
                                       for n in spec.nodes):
            raise SpecError(f"{spec.source}: pod {p.name}: no node matches nodeSelector {p.node_selector}")
    check_host_ports(spec, pods)


def check_host_ports(spec: ClusterSpec, pods: list) -> None:
    """Place the pods that ask for hostPorts as the scheduler will (the NodePorts filter):
    a file whose pods cannot all get their hostPorts is refused before anything is built."""
    if not any(host_ports(p) for p in pods):
        return
    sched = Scheduler({n.name: n.labels for n in spec.nodes})
    for p in pods:
        try:
            sched.bind(p.host_name, sched.place(p), p.owner, host_ports(p))
        except SpecError as e:
            raise SpecError(f"{spec.source}: {e}") from None
