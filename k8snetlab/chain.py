"""The chained plugins of a node's config list, and what the kubelet hands them per pod.

``portmap`` (hostPort), ``bandwidth`` (rate limits) and ``tuning`` (sysctls) follow the main
plugin, as in a real flannel or Calico list. Their per-pod input travels as the CNI conventions
say: capability arguments copied into ``runtimeConfig`` of the plugins that declare them
(:meth:`k8snetlab.cni.NetworkConfigList.plugin_config`), built here by :func:`capability_args`.
Pure: parsing, checking, building JSON.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation
from typing import Any, Iterable

from .errors import SpecError

PodSpec = Any      # manifests.PodSpec (manifests imports this module: no import back)

INGRESS_ANNOTATION = "kubernetes.io/ingress-bandwidth"
EGRESS_ANNOTATION = "kubernetes.io/egress-bandwidth"
BANDWIDTH_ANNOTATIONS = (INGRESS_ANNOTATION, EGRESS_ANNOTATION)
NO_BURST_LIMIT = 2 ** 32 - 1          # bits: containerd's "no limit" (math.MaxUint32)
MIN_BANDWIDTH = 1_000                 # kubelet refuses less than 1k ...
MAX_BANDWIDTH = 10 ** 15              # ... and more than 1P bits/s

# the chained plugins, in the order they may appear after the main plugin
CHAINED = ("tuning", "bandwidth", "portmap")

_SUFFIX = {"": 1, "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"),
           "k": 10 ** 3, "M": 10 ** 6, "G": 10 ** 9, "T": 10 ** 12, "P": 10 ** 15, "E": 10 ** 18,
           "Ki": 2 ** 10, "Mi": 2 ** 20, "Gi": 2 ** 30, "Ti": 2 ** 40, "Pi": 2 ** 50, "Ei": 2 ** 60}
_QUANTITY_RE = re.compile(r"^([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))"
                          r"((?:[eE][+-]?[0-9]+)|n|u|m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")


def parse_quantity(text: Any) -> int:
    """A Kubernetes quantity (``100M``, ``1.5G``, ``512Ki``, ``1e6``) as its integer value,
    rounded up as ``Quantity.Value()`` does; raises ValueError naming the text."""
    if not isinstance(text, str):
        raise ValueError(f"{text!r} is not a quantity (a string like 100M or 1Gi)")
    m = _QUANTITY_RE.match(text.strip())
    if m is None:
        raise ValueError(f"{text!r} is not a Kubernetes quantity: write e.g. 100M, 1G or 512Ki")
    try:
        number = Decimal(m.group(1))
        suffix = m.group(2) or ""
        scale = Decimal(10) ** int(suffix[1:]) if suffix[:1] in ("e", "E") else Decimal(_SUFFIX[suffix])
    except (InvalidOperation, ValueError):
        raise ValueError(f"{text!r} is not a Kubernetes quantity: write e.g. 100M, 1G or 512Ki") from None
    return int(math.ceil(number * scale))


def pod_bandwidth(annotations: dict[str, str], where: str) -> dict[str, int]:
    """The bandwidth capability argument of a pod, ``{}`` without the annotations; refuses a
    malformed or unreasonable quantity as the kubelet does (SpecError naming the annotation)."""
    out: dict[str, int] = {}
    for key, direction in ((INGRESS_ANNOTATION, "ingress"), (EGRESS_ANNOTATION, "egress")):
        if key not in annotations:
            continue
        try:
            rate = parse_quantity(annotations[key])
        except ValueError as e:
            raise SpecError(f"{where}.metadata.annotations[{key}]: {e}") from None
        if not MIN_BANDWIDTH <= rate <= MAX_BANDWIDTH:
            raise SpecError(f"{where}.metadata.annotations[{key}]: {annotations[key]!r} is unreasonably "
                            f"{'small' if rate < MIN_BANDWIDTH else 'large'}: give 1k to 1P bits per second")
        out[f"{direction}Rate"] = rate
        out[f"{direction}Burst"] = NO_BURST_LIMIT
    return out


def port_mappings(pod: PodSpec) -> list[dict[str, Any]]:
    """The portMappings capability argument: every container port with a hostPort."""
    out = []
    for c in pod.containers:
        for p in c.ports:
            if p.host_port is None:
                continue
            entry: dict[str, Any] = {"hostPort": p.host_port, "containerPort": p.container_port,
                                     "protocol": p.protocol.lower()}
            if p.host_ip and p.host_ip != "0.0.0.0":
                entry["hostIP"] = p.host_ip
            out.append(entry)
    return out


def capability_args(pod: PodSpec) -> dict[str, Any]:
    """What the kubelet puts in the runtime config's capability arguments for ``pod``.

    - ``portMappings``: one entry per container port with a ``hostPort``, as the CRI builds them:
      ``{"hostPort": 8080, "containerPort": 80, "protocol": "tcp", "hostIP": "..."}``.
    - ``bandwidth``: from the pod annotations ``kubernetes.io/ingress-bandwidth`` and
      ``kubernetes.io/egress-bandwidth`` (Kubernetes quantities, ``100M``, ``1G``), in bits per
      second; the burst is "no limit" (``math.MaxUint32`` bits) as containerd's CRI sets it.
    - per-pod sysctls (``spec.securityContext.sysctls``) reach ``tuning`` in the config's
      ``args.cni.sysctl`` (the conventions' ``args``), which the reference tuning plugin reads too.
    """
    args: dict[str, Any] = {}
    ports = port_mappings(pod)
    if ports:
        args["portMappings"] = ports
    bw = pod_bandwidth(pod.annotations, f"pod {pod.key}")
    if bw:
        args["bandwidth"] = bw
    return args


def config_args(pod: PodSpec) -> dict[str, Any]:
    """The ``args.cni`` the runtime adds to the plugins' configs for ``pod`` (per-pod sysctls)."""
    return {"sysctl": dict(pod.sysctls)} if pod.sysctls else {}


# -- sysctls ---------------------------------------------------------------------------------
_SYSCTL_RE = re.compile(r"^[a-z0-9_]+([./][a-zA-Z0-9_.-]+)+$")


def check_sysctl_name(name: Any, where: str) -> str:
    """Only network-namespaced sysctls (``net.*``) can be set per pod; one line otherwise."""
    if not isinstance(name, str) or not _SYSCTL_RE.match(name):
        raise SpecError(f"{where}: {name!r} is not a sysctl name like net.ipv4.tcp_syncookies")
    if not name.startswith(("net.", "net/")):
        raise SpecError(f"{where}: {name!r} is not a network sysctl: only namespaced net.* sysctls "
                        "can be set per pod here")
    return name


# -- the chain of a mode's config list ------------------------------------------------------
def chained_configs(names: Iterable[str], sysctl: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """The plugin configs of the chained plugins ``names``, as real config lists write them."""
    out: list[dict[str, Any]] = []
    for name in names:
        if name == "portmap":
            out.append({"type": "portmap", "snat": True, "capabilities": {"portMappings": True}})
        elif name == "bandwidth":
            out.append({"type": "bandwidth", "capabilities": {"bandwidth": True}})
        elif name == "tuning":
            out.append({"type": "tuning", "sysctl": dict(sysctl or {})})
        else:
            raise SpecError(f"{name!r} is not a chained plugin: use {', '.join(CHAINED)}")
    return out


def parse_chain(raw: Any, default: tuple[str, ...], where: str) -> tuple[tuple[str, ...], dict[str, str], bool]:
    """The ``cni.chain`` section: ``[portmap, bandwidth]`` or ``{plugins: [...], sysctl: {...},
    reference: true}``; returns (names in order, the tuning plugin's node-wide sysctls, whether
    the chained plugins are Debian's reference binaries)."""
    if raw is None:
        return default, {}, False
    sysctl: dict[str, str] = {}
    reference = False
    if isinstance(raw, dict):
        bad = [k for k in raw if k not in ("plugins", "sysctl", "reference")]
        if bad:
            raise SpecError(f"{where}: unknown key {bad[0]!r}: use plugins, sysctl and reference")
        reference = raw.get("reference", False)
        if not isinstance(reference, bool):
            raise SpecError(f"{where}.reference: must be true or false")
        sysctl_raw = raw.get("sysctl") or {}
        if not isinstance(sysctl_raw, dict):
            raise SpecError(f"{where}.sysctl: must be a mapping of sysctl name to value")
        for k, v in sysctl_raw.items():
            check_sysctl_name(k.replace("IFNAME", "eth0") if isinstance(k, str) else k, f"{where}.sysctl")
            if not isinstance(v, (str, int)) or isinstance(v, bool):
                raise SpecError(f"{where}.sysctl.{k}: the value must be a string or a number")
            sysctl[k] = str(v)
        names = raw.get("plugins", list(default))
    else:
        names = raw
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise SpecError(f"{where}: must be a list of chained plugins, e.g. [bandwidth, portmap]")
    for n in names:
        if n not in CHAINED:
            raise SpecError(f"{where}: {n!r} is not a chained plugin: use {', '.join(CHAINED)}")
    if len(set(names)) != len(names):
        raise SpecError(f"{where}: a chained plugin is listed twice")
    if sysctl and "tuning" not in names:
        raise SpecError(f"{where}.sysctl: needs tuning in the chain's plugins")
    return tuple(names), sysctl, reference


def check_pods_against_chain(pods: Iterable[PodSpec], names: tuple[str, ...], src: str,
                             own_host_ports: bool = False) -> None:
    """A pod asking for what no plugin of the chain gives is refused, naming the fix."""
    needs = (("portmap", "hostPort", lambda p: not own_host_ports and bool(port_mappings(p))),
             ("bandwidth", "a bandwidth annotation", lambda p: any(a in p.annotations for a in BANDWIDTH_ANNOTATIONS)),
             ("tuning", "securityContext.sysctls", lambda p: bool(p.sysctls)))
    for p in pods:
        for plugin, what, asks in needs:
            if plugin not in names and asks(p):
                raise SpecError(f"{src}: pod {p.key} has {what}, but the nodes' config list chains no "
                                f"{plugin} plugin: add {plugin} to cni.chain")
