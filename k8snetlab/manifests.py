"""Kubernetes manifests the testbed understands: Pod, Deployment, ReplicationController.

They are read in Kubernetes' own schema (``apiVersion``, ``kind``, ``metadata``, ``spec``,
``spec.template``, ``containers[].command/args/ports``, ``nodeName``, ``nodeSelector``) and
expanded into :class:`PodSpec` objects, one per replica. Replicas are named
``<controller>-<index>`` (``web-0``, ``web-1``...) so that experiments and tests can name
pods before they exist. ``image`` is kept for display only: a container here is a process
in the pod's network namespace running ``command`` + ``args``.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any

from . import chain
from .checks import check_replicas
from .errors import SpecError

NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
WORKLOAD_KINDS = ("Pod", "Deployment", "ReplicationController")
RESTART_POLICIES = ("Always", "OnFailure", "Never")


@dataclass(frozen=True)
class ContainerPort:
    container_port: int
    name: str = ""
    protocol: str = "TCP"
    host_port: int | None = None      # published on the node (docker -p, Kubernetes hostPort)
    host_ip: str = ""                 # hostIP: the node address the hostPort is bound to ("" = all)


@dataclass(frozen=True)
class ContainerSpec:
    name: str
    image: str = ""
    command: tuple[str, ...] = ()
    args: tuple[str, ...] = ()
    ports: tuple[ContainerPort, ...] = ()

    @property
    def argv(self) -> list[str]:
        return [*self.command, *self.args]


@dataclass(frozen=True)
class PodSpec:
    name: str
    namespace: str = "default"
    labels: dict[str, str] = field(default_factory=dict, hash=False)
    containers: tuple[ContainerSpec, ...] = ()
    node_name: str | None = None
    node_selector: dict[str, str] = field(default_factory=dict, hash=False)
    owner: str | None = None  # "Deployment/web"
    restart_policy: str = "Always"   # the kubelet restarts exited containers: Always | OnFailure | Never
    annotations: dict[str, str] = field(default_factory=dict, hash=False)
    sysctls: tuple[tuple[str, str], ...] = ()   # spec.securityContext.sysctls (net.* only)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def host_name(self) -> str:
        """The pod's Mininet host name: its name in ``default`` (``web-0``), ``<name>.<namespace>``
        elsewhere (``a.x``, ``kube-dns-0.kube-system``): unique, since names hold no dots."""
        return self.name if self.namespace == "default" else f"{self.name}.{self.namespace}"


@dataclass(frozen=True)
class Workload:
    kind: str
    name: str
    namespace: str
    replicas: int
    template: PodSpec
    selector: dict[str, str] = field(default_factory=dict, hash=False)

    def pods(self, replicas: int | None = None) -> list[PodSpec]:
        if self.kind == "Pod":
            return [self.template]
        n = self.replicas if replicas is None else replicas
        return [PodSpec(f"{self.name}-{i}", self.namespace, dict(self.template.labels),
                        self.template.containers, self.template.node_name,
                        dict(self.template.node_selector), f"{self.kind}/{self.name}",
                        self.template.restart_policy, dict(self.template.annotations),
                        self.template.sysctls)
                for i in range(n)]


def mapping(d: Any, where: str) -> dict[str, Any]:
    """``d`` as a mapping (None: empty); anything else is a SpecError naming ``where``."""
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise SpecError(f"{where}: must be a mapping")
    return d


def _str_map(d: Any, where: str) -> dict[str, str]:
    d = mapping(d, where)
    for k, v in d.items():
        if not isinstance(k, str) or not isinstance(v, (str, int, float, bool)):
            raise SpecError(f"{where}: keys and values must be strings")
    return {k: str(v) for k, v in d.items()}


def check_name(value: Any, where: str) -> str:
    """A Kubernetes object name (DNS-1123 label); raises SpecError naming ``where``."""
    if not isinstance(value, str) or not NAME_RE.match(value) or len(value) > 63:
        raise SpecError(f"{where}: {value!r} is not a valid Kubernetes name "
                        "(lower-case letters, digits and '-', at most 63 characters)")
    return value


def _containers(spec: dict[str, Any], where: str) -> tuple[ContainerSpec, ...]:
    items = spec.get("containers")
    if not isinstance(items, list) or not items:
        raise SpecError(f"{where}.containers: a pod needs at least one container")
    out, seen = [], set()
    for i, c in enumerate(items):
        cw = f"{where}.containers[{i}]"
        c = mapping(c, cw)
        name = check_name(c.get("name"), f"{cw}.name")
        if name in seen:
            raise SpecError(f"{cw}.name: duplicate container name {name!r}")
        seen.add(name)
        for key in ("command", "args"):
            v = c.get(key, [])
            if not isinstance(v, list) or not all(isinstance(x, (str, int, float)) for x in v):
                raise SpecError(f"{cw}.{key}: must be a list of strings")
        ports = []
        for j, p in enumerate(c.get("ports") or []):
            p = mapping(p, f"{cw}.ports[{j}]")
            cp = p.get("containerPort")
            if not isinstance(cp, int) or not 1 <= cp <= 65535:
                raise SpecError(f"{cw}.ports[{j}].containerPort: must be a port number 1-65535")
            proto = p.get("protocol", "TCP")
            if proto not in ("TCP", "UDP", "SCTP"):
                raise SpecError(f"{cw}.ports[{j}].protocol: must be TCP, UDP or SCTP")
            hp = p.get("hostPort")
            if hp is not None and (not isinstance(hp, int) or isinstance(hp, bool) or not 1 <= hp <= 65535):
                raise SpecError(f"{cw}.ports[{j}].hostPort: must be a port number 1-65535")
            host_ip = p.get("hostIP", "")
            if host_ip:
                try:
                    if not isinstance(host_ip, str) or ipaddress.ip_address(host_ip).version != 4:
                        raise ValueError
                except ValueError:
                    raise SpecError(f"{cw}.ports[{j}].hostIP: {host_ip!r} is not an IPv4 address") from None
                if hp is None:
                    raise SpecError(f"{cw}.ports[{j}].hostIP: set only together with hostPort")
            ports.append(ContainerPort(cp, str(p.get("name", "")), proto, hp, host_ip))
        out.append(ContainerSpec(name, str(c.get("image", "")), tuple(map(str, c.get("command", []))),
                                 tuple(map(str, c.get("args", []))), tuple(ports)))
    return tuple(out)


def _sysctls(spec: dict[str, Any], where: str) -> tuple[tuple[str, str], ...]:
    """``securityContext.sysctls``: ``[{name, value}]``, network-namespaced ones only."""
    ctx = mapping(spec.get("securityContext"), f"{where}.securityContext")
    items = ctx.get("sysctls") or []
    if not isinstance(items, list):
        raise SpecError(f"{where}.securityContext.sysctls: must be a list of {{name, value}}")
    out: dict[str, str] = {}
    for i, item in enumerate(items):
        w = f"{where}.securityContext.sysctls[{i}]"
        item = mapping(item, w)
        if set(item) - {"name", "value"} or "value" not in item:
            raise SpecError(f"{w}: give exactly name and value")
        name = chain.check_sysctl_name(item.get("name"), f"{w}.name")
        if name in out:
            raise SpecError(f"{w}.name: {name} is set twice")
        if not isinstance(item["value"], (str, int)) or isinstance(item["value"], bool):
            raise SpecError(f"{w}.value: must be a string")
        out[name] = str(item["value"])
    return tuple(out.items())


def _pod_spec(name: str, namespace: str, labels: dict[str, str], spec: Any, where: str,
              annotations: dict[str, str] | None = None) -> PodSpec:
    spec = mapping(spec, where)
    node = spec.get("nodeName")
    if node is not None and not isinstance(node, str):
        raise SpecError(f"{where}.nodeName: must be a node name")
    policy = spec.get("restartPolicy", "Always")
    if policy not in RESTART_POLICIES:
        raise SpecError(f"{where}.restartPolicy: {policy!r} is not a restart policy: use one of "
                        f"{', '.join(RESTART_POLICIES)}")
    annotations = dict(annotations or {})
    chain.pod_bandwidth(annotations, where.rsplit(".spec", 1)[0])   # a bad quantity: refused here
    return PodSpec(name, namespace, labels, _containers(spec, where), node,
                   _str_map(spec.get("nodeSelector"), f"{where}.nodeSelector"), restart_policy=policy,
                   annotations=annotations, sysctls=_sysctls(spec, where))


def parse_workload(doc: Any, where: str) -> Workload:
    """One manifest (a YAML document) -> Workload; SpecError names the offending key."""
    doc = mapping(doc, where)
    kind = doc.get("kind")
    if kind not in WORKLOAD_KINDS:
        raise SpecError(f"{where}.kind: {kind!r} is not a workload kind: use one of {', '.join(WORKLOAD_KINDS)} (or Service)")
    meta = mapping(doc.get("metadata"), f"{where}.metadata")
    name = check_name(meta.get("name"), f"{where}.metadata.name")
    ns = check_name(meta.get("namespace", "default"), f"{where}.metadata.namespace")
    labels = _str_map(meta.get("labels"), f"{where}.metadata.labels")
    spec = mapping(doc.get("spec"), f"{where}.spec")
    if kind == "Pod":
        pod = _pod_spec(name, ns, labels, spec, f"{where}.spec",
                        _str_map(meta.get("annotations"), f"{where}.metadata.annotations"))
        return Workload("Pod", name, ns, 1, pod)
    replicas = spec.get("replicas", 1)
    if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0:
        raise SpecError(f"{where}.spec.replicas: must be a whole number >= 0")
    check_replicas(replicas, f"{where}.spec.replicas")
    tmpl = mapping(spec.get("template"), f"{where}.spec.template")
    tmeta = mapping(tmpl.get("metadata"), f"{where}.spec.template.metadata")
    tlabels = _str_map(tmeta.get("labels"), f"{where}.spec.template.metadata.labels")
    sel_raw = mapping(spec.get("selector"), f"{where}.spec.selector")
    selector = _str_map(sel_raw.get("matchLabels", sel_raw) if kind == "Deployment" else sel_raw,
                        f"{where}.spec.selector")
    if not selector:
        selector = dict(tlabels)
    if any(tlabels.get(k) != v for k, v in selector.items()):
        raise SpecError(f"{where}.spec.selector: does not match the template's labels {tlabels}")
    template = _pod_spec(name, ns, tlabels, tmpl.get("spec"), f"{where}.spec.template.spec",
                         _str_map(tmeta.get("annotations"), f"{where}.spec.template.metadata.annotations"))
    if template.restart_policy != "Always":     # as the API server validates a controller's template
        raise SpecError(f"{where}.spec.template.spec.restartPolicy: a {kind} keeps its pods running: "
                        f"only 'Always' is supported (use a Pod for {template.restart_policy})")
    return Workload(kind, name, ns, replicas, template, selector)


def expand(workloads: list[Workload]) -> list[PodSpec]:
    """All pods of all workloads; duplicate pod names in one namespace are an error."""
    pods: dict[str, PodSpec] = {}
    for w in workloads:
        for p in w.pods():
            if p.key in pods:
                raise SpecError(f"duplicate pod name {p.name!r} in namespace {p.namespace} (from "
                                f"{p.owner or 'Pod'} and {pods[p.key].owner or 'Pod'}): rename one of the workloads")
            pods[p.key] = p
    return list(pods.values())
