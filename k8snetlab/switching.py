"""The switch level of the underlay: which switches make up each subnet's L2 segment, how they
are linked, where every node, host and router plugs in, and who controls them.

By default every subnet is one switch (a Linux bridge) and that is all a cluster file says. To
build a switched fabric, with redundant links if the controller can handle loops, a cluster
file lists the switches of a subnet and the links between them (an example, and the rules:
:func:`plan`; their checks: :func:`check`).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from . import proc
from .clusterspec import ClusterSpec, LinkSpec, SwitchSpec, UnderlaySpec
from .errors import SpecError

# the programs an OVS underlay runs; all in Debian's openvswitch-switch (+ -common)
OVS_TOOLS = ("ovsdb-tool", "ovsdb-server", "ovs-vswitchd", "ovs-vsctl", "ovs-ofctl", "ovs-appctl")


def check(spec: ClusterSpec) -> None:
    """The switch level against the whole cluster: the controller app, Open vSwitch installed,
    every subnet's switches connected, loops only under an app that handles them, the
    ``attach`` lists, and what ``kubeProxy.mode: openflow`` needs."""
    u, src = spec.underlay, spec.source
    if u.controller != "none":
        _check_app(u.controller, u.switch, src)
    if u.switch == "ovs":
        missing = [t for t in OVS_TOOLS if proc.which(t) is None]
        if missing:
            raise SpecError(f"{src}: underlay.switch: ovs needs Open vSwitch, but '{missing[0]}' is not "
                            "installed: apt-get install openvswitch-switch (or run 'sudo make deps'), "
                            "or use switch: linuxbridge")
    _check_graph(u, src)
    _check_attachments(spec)
    _check_openflow_services(spec)


def _check_app(name: Any, switch: str, src: str) -> None:
    import controllers
    if not isinstance(name, str):
        raise SpecError(f"{src}: underlay.controller: {name!r} is not an app name")
    try:
        controllers.get(name)
    except controllers.AppError as e:
        raise SpecError(f"{src}: underlay.controller: {e}") from None
    if switch != "ovs":
        raise SpecError(f"{src}: underlay.controller: {name} drives OpenFlow switches: add switch: ovs "
                        "(Linux bridges have no controller), or use controller: none")
    why = controllers.import_error(name)
    if why:
        raise SpecError(f"{src}: underlay.controller: app {name!r} cannot be imported: {why}")


def _check_graph(level: UnderlaySpec, src: str) -> None:
    for subnet in dict.fromkeys(s.subnet for s in level.switches):
        members = [s.name for s in level.switches if s.subnet == subnet]
        edges = [l for l in level.links if l.a in members]
        adj: dict[str, set[str]] = {m: set() for m in members}
        for l in edges:
            adj[l.a].add(l.b)
            adj[l.b].add(l.a)
        reached = {members[0]}
        queue = deque([members[0]])
        while queue:
            for n in adj[queue.popleft()] - reached:
                reached.add(n)
                queue.append(n)
        cut = [m for m in members if m not in reached]
        if cut:
            raise SpecError(f"{src}: underlay.links: switch {cut[0]} of subnet {subnet} is not linked to "
                            f"{members[0]}: link every switch of a subnet to the others")
        if len(edges) >= len(members):   # a connected graph with as many edges as vertices has a cycle
            _check_loops_allowed(level, subnet, src)


def _check_loops_allowed(level: UnderlaySpec, subnet: str, src: str) -> None:
    import controllers
    if level.switch != "ovs" or level.controller == "none":
        raise SpecError(f"{src}: underlay.links: the switches of subnet {subnet} form a loop, where flooding "
                        "switches would circle broadcasts forever: use switch: ovs with controller: fabric, "
                        "or remove a link")
    if not controllers.get(level.controller).loops:
        able = [name for name, a in controllers.APPS.items() if a.loops]
        raise SpecError(f"{src}: underlay.links: the switches of subnet {subnet} form a loop, and controller "
                        f"app {level.controller} floods: use controller: {' or '.join(able)}, or remove a link")


def _check_openflow_services(spec: ClusterSpec) -> None:
    src, u = spec.source, spec.underlay
    mode = spec.kube_proxy.get("mode") if isinstance(spec.kube_proxy, dict) else None
    if mode == "openflow":
        if u.switch != "ovs" or u.controller != "service_lb":
            raise SpecError(f"{src}: kubeProxy.mode: openflow is served by the underlay's switch: set "
                            "underlay: {switch: ovs, controller: service_lb}")
        if spec.cni.type != "host-gw" or len(u.subnets) != 1:
            raise SpecError(f"{src}: kubeProxy.mode: openflow rewrites pod packets on the underlay switch, "
                            f"so they must cross it unencapsulated on one subnet: use cni.type host-gw and one "
                            f"underlay subnet (not {spec.cni.type} on {len(u.subnets)} subnet(s))")
    elif u.controller == "service_lb":
        raise SpecError(f"{src}: underlay.controller: service_lb serves ClusterIPs for kubeProxy.mode openflow: "
                        "add kubeProxy: {mode: openflow}, or use controller: l2_learning")


def _check_attachments(spec: ClusterSpec) -> None:
    u = spec.underlay
    on: dict[str, set[str]] = {}
    for n in spec.nodes:
        on.setdefault(n.name, set()).add(n.subnet)
    for h in u.hosts:
        on.setdefault(h.name, set()).add(h.subnet)
    for r in u.routers:
        on.setdefault(r.name, set()).update(s for s, _ in r.interfaces)
    placed: dict[tuple[str, str], str] = {}
    for i, s in enumerate(u.switches):
        for name in s.attach:
            w = f"{spec.source}: underlay.switches[{i}].attach"
            if name not in on:
                raise SpecError(f"{w}: {name!r} is not a node, host or router of this cluster")
            if s.subnet not in on[name]:
                raise SpecError(f"{w}: {name} has no address on subnet {s.subnet} (it is on "
                                f"{', '.join(sorted(on[name]))}): attach it to a switch of its subnet")
            other = placed.get((name, s.subnet))
            if other:
                raise SpecError(f"{w}: {name} is already attached to {other}: one switch per subnet")
            placed[(name, s.subnet)] = s.name


# ---------------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class Plan:
    """The switches to build, in order (number = position + 1), their links, and who plugs where."""
    switches: tuple[SwitchSpec, ...]
    links: tuple[LinkSpec, ...]
    placed: dict[tuple[str, str], str] = field(default_factory=dict, hash=False)   # (host, subnet) -> switch
    first: dict[str, str] = field(default_factory=dict, hash=False)                # subnet -> default switch

    def switch_for(self, host: str, subnet: str) -> str:
        return self.placed.get((host, subnet)) or self.first[subnet]

    @property
    def has_loops(self) -> bool:
        return any(len([l for l in self.links if l.a in members]) >= len(members)
                   for members in self.members().values())

    def members(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for s in self.switches:
            out.setdefault(s.subnet, []).append(s.name)
        return out


def plan(spec: ClusterSpec) -> Plan:
    """Every subnet without declared switches gets one, named after the subnet.

        underlay:
          switch: ovs                  # linuxbridge (default) | ovs (Open vSwitch)
          controller: fabric           # none (default) | an app of controllers.APPS (needs ovs)
          subnets: [{name: lan, cidr: 192.168.1.0/24}]
          switches:                    # optional: the switches of a subnet (else one per subnet)
            - {name: spine1, subnet: lan}
            - {name: leaf1, subnet: lan, attach: [node1, node2]}   # nodes, hosts, routers on it
          links:                       # optional: switch-to-switch links, [a, b] each
            - [leaf1, spine1]

    Rules, checked when the file loads: switch names are unique and differ from subnet names; a
    link joins two switches of the same subnet (a subnet is one L2 segment; between subnets,
    routers route); the switches of a subnet are connected; a node, host or router attaches to
    at most one switch of each of its subnets (unlisted ones attach to the subnet's first
    switch); a loop in the links needs ``switch: ovs`` and a controller app that handles loops
    (``fabric``), since anything that floods would circle it forever.

    :mod:`k8snetlab.clusterspec` parses these keys; :func:`check` (part of the validation) applies
    the rules; the runtime (:mod:`k8snetlab.cluster`, :mod:`k8snetlab.underlay_ovs`) builds the
    switches from :func:`plan`.
    """
    u = spec.underlay
    declared = {s.subnet for s in u.switches}
    switches: list[SwitchSpec] = []
    for sub in u.subnets:
        if sub.name in declared:
            switches += [s for s in u.switches if s.subnet == sub.name]
        else:
            switches.append(SwitchSpec(sub.name, sub.name))
    first: dict[str, str] = {}
    for s in switches:
        first.setdefault(s.subnet, s.name)
    placed = {(name, s.subnet): s.name for s in u.switches for name in s.attach}
    return Plan(tuple(switches), u.links, placed, first)
