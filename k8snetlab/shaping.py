"""Shaped underlay links: rate, loss, delay/jitter and MTU of a wire.

On veth pairs with no limit, TCP throughput measures the CPU a datapath burns; on a shaped
link it measures what the wire carries, and an overlay's header overhead shows as the
payload it leaves per packet (:func:`goodput_fraction`).

Cluster files give link properties per subnet and per router interface; where each applies
and how it is realised: :func:`apply`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from dataclasses import dataclass
from typing import Any

from .errors import KernelFeatureMissing, SpecError

log = logging.getLogger(__name__)

LINK_KEYS = ("rate", "loss", "delay", "jitter", "mtu")
ETHERNET_HEADER = 14
TCP_IP_HEADERS = 52          # IPv4 20 + TCP 20 + timestamps 12
TBF_LATENCY = "50ms"

_UNITS = {"": 1, "bit": 1, "k": 1e3, "kbit": 1e3, "m": 1e6, "mbit": 1e6, "g": 1e9, "gbit": 1e9,
          "t": 1e12, "tbit": 1e12, "bps": 8, "kbps": 8e3, "mbps": 8e6, "gbps": 8e9}
_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
_TIME_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(us|ms|s)\s*$")


@dataclass(frozen=True)
class LinkProps:
    rate_bps: float | None = None
    loss: float | None = None          # fraction 0..1
    delay_ms: float | None = None
    jitter_ms: float | None = None
    mtu: int | None = None

    def empty(self) -> bool:
        return all(getattr(self, f.name) is None for f in dataclasses.fields(self))


def parse_rate(raw: Any, where: str) -> float:
    """``1gbit``, ``100mbit``, ``5G`` (iperf3 style), ``125mbps`` (bytes) -> bits per second."""
    m = _RATE_RE.match(str(raw)) if isinstance(raw, (str, int, float)) and not isinstance(raw, bool) else None
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _UNITS or float(m.group(1)) <= 0:
        raise SpecError(f"{where}: {raw!r} is not a rate: write e.g. 1gbit, 100mbit or 5G")
    return float(m.group(1)) * _UNITS[unit]


def parse_loss(raw: Any, where: str) -> float:
    """``0.5%`` or a fraction ``0.005`` -> 0.005 (0 <= loss < 1)."""
    text = str(raw).strip()
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        value = None
    if value is None or isinstance(raw, bool) or not 0 <= value < 1:
        raise SpecError(f"{where}: {raw!r} is not a loss rate: write a percentage below 100 %, e.g. 0.5%")
    return value


def parse_time(raw: Any, where: str) -> float:
    m = _TIME_RE.match(str(raw))
    if m is None:
        raise SpecError(f"{where}: {raw!r} is not a time: write e.g. 10ms")
    return float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)]


def kernel_has_netem() -> bool:
    """Is the netem qdisc built into the running kernel (this kernel loads no modules)?"""
    try:
        with open("/proc/kallsyms") as f:
            return any(" netem_enqueue" in line for line in f)
    except OSError:
        return False


def parse_link(raw: Any, where: str, has_netem=kernel_has_netem) -> LinkProps | None:
    """The ``link:`` mapping of a subnet or router interface, validated; None when absent."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise SpecError(f"{where}: expected a mapping with some of {', '.join(LINK_KEYS)}")
    unknown = [k for k in raw if k not in LINK_KEYS]
    if unknown:
        raise SpecError(f"{where}.{unknown[0]}: unknown link property; use {', '.join(LINK_KEYS)}")
    props = LinkProps(
        rate_bps=parse_rate(raw["rate"], f"{where}.rate") if "rate" in raw else None,
        loss=parse_loss(raw["loss"], f"{where}.loss") if "loss" in raw else None,
        delay_ms=parse_time(raw["delay"], f"{where}.delay") if "delay" in raw else None,
        jitter_ms=parse_time(raw["jitter"], f"{where}.jitter") if "jitter" in raw else None,
        mtu=_mtu(raw["mtu"], f"{where}.mtu") if "mtu" in raw else None)
    if props.jitter_ms is not None and props.delay_ms is None:
        raise SpecError(f"{where}.jitter: jitter needs a delay: add delay: <time>")
    if (props.delay_ms is not None or props.jitter_ms is not None) and not has_netem():
        key = "delay" if props.delay_ms is not None else "jitter"
        raise SpecError(f"{where}.{key}: this kernel has no netem qdisc (sch_netem), so delay and jitter "
                        "cannot be emulated here: remove them (rate, loss and mtu work)")
    return props


def _mtu(raw: Any, where: str) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int) or not 576 <= raw <= 9000:
        raise SpecError(f"{where}: {raw!r} is not an MTU: give bytes between 576 and 9000")
    return raw


def with_link_rate(spec: Any, rate: str) -> Any:
    """The spec with ``rate`` on every subnet (``--link-rate``), other link properties kept."""
    bps = parse_rate(rate, "--link-rate")
    subnets = tuple(dataclasses.replace(s, link=dataclasses.replace(s.link or LinkProps(), rate_bps=bps))
                    for s in spec.underlay.subnets)
    return dataclasses.replace(spec, underlay=dataclasses.replace(spec.underlay, subnets=subnets))


# ---------------------------------------------------------------- what the wire can carry (pure)

def encap_bytes(cni: str, options: dict[str, Any]) -> int:
    """Outer headers a mode adds between nodes of one subnet: VXLAN 50, IPIP 20, else 0."""
    if cni == "vxlan":
        return 50
    if cni == "ipip" and options.get("ipipMode", "Always") == "Always":
        return 20
    return 0


def goodput_fraction(pod_mtu: int, encap: int) -> float:
    """TCP payload per byte a rate limiter counts: a full segment carries ``pod_mtu - 52`` B
    (IPv4, TCP, timestamps) in a frame of ``pod_mtu + encap + 14`` B. host-gw at MTU 1500:
    1448 / 1514; IPIP at 1480: 1428 / 1514; VXLAN at 1450: 1398 / 1514."""
    return (pod_mtu - TCP_IP_HEADERS) / (pod_mtu + encap + ETHERNET_HEADER)


# ---------------------------------------------------------------- applying it (root)

LOSS_SOURCE = "loss_tc.c"


def loss_threshold(loss: float) -> int:
    """The random u32 below which a packet is dropped: ``loss * 2**32``."""
    return min(0xFFFFFFFF, int(round(loss * 2 ** 32)))


def loss_object(loss: float):
    """``bpf/loss_tc.c`` compiled for this loss rate (cached by source, compiler and rate)."""
    from . import ebpf
    return ebpf.compile_cached(ebpf.SOURCE.with_name(LOSS_SOURCE), (f"-DLOSS_THRESHOLD={loss_threshold(loss)}u",))


def set_mtu(dev: str, mtu: int, netns: str | None) -> None:
    from .netutil import Netns      # pyroute2 only where links are shaped, not where files parse
    with Netns(netns, netns or "root namespace") as ns:
        ns.set_mtu(dev, mtu)


def shape(dev: str, props: LinkProps, netns: str | None = None) -> None:
    """Put ``props`` on the egress of ``dev`` (in ``netns``, or the caller's namespace)."""
    from . import proc
    run = lambda *a: proc.run(["tc", *a], netns=netns, where=netns or "root namespace")
    if props.mtu is not None:
        set_mtu(dev, props.mtu, netns)
    if props.delay_ms is not None:
        if not kernel_has_netem():
            raise KernelFeatureMissing("netem qdisc (sch_netem)", "link delay/jitter")
        args = ["qdisc", "replace", "dev", dev, "root", "netem", "delay", f"{props.delay_ms}ms"]
        if props.jitter_ms:
            args.append(f"{props.jitter_ms}ms")
        if props.rate_bps:
            args += ["rate", f"{int(props.rate_bps)}bit"]
        run(*args)
    elif props.rate_bps is not None:
        burst = max(32 * 1024, int(props.rate_bps / 8 / 1000))     # a millisecond at the rate
        run("qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{int(props.rate_bps)}bit",
            "burst", str(burst), "latency", TBF_LATENCY)
    if props.loss:
        run("qdisc", "replace", "dev", dev, "clsact")
        run("filter", "add", "dev", dev, "egress", "prio", "1", "bpf", "da", "obj", str(loss_object(props.loss)),
            "sec", "tc")


def qdisc_counters(netns: str | None, dev: str) -> tuple[int, int]:
    """(packets dropped, bytes in backlog) of the root qdisc of ``dev``, plus the packets the
    loss filter dropped (counted on the clsact qdisc)."""
    from . import proc
    out = proc.run(["tc", "-s", "-j", "qdisc", "show", "dev", dev], netns=netns).stdout
    drops = backlog = 0
    for q in json.loads(out or "[]"):
        drops += int(q.get("drops", 0))
        backlog += int(q.get("backlog", 0))
    return drops, backlog


def apply(cluster: Any) -> list[tuple[str | None, str]]:
    """Shape the links of a built underlay as its spec says; returns (netns, device) shaped.
    Switch ports live in the root namespace (``None``).

    Cluster files give link properties per subnet and per router interface::

        underlay:
          subnets:
            - {name: lan, cidr: 192.168.1.0/24, link: {rate: 1gbit, loss: 0.1%, mtu: 1500}}
          routers:
            - name: r1
              interfaces:
                - {subnet: lan, ip: 192.168.1.1, link: {rate: 100mbit}}

    A subnet's properties apply to the egress of every switch port on that subnet (the switch's
    side of each node's, host's and router's wire): every packet that reaches a host over the
    subnet crossed one shaped port, as on a switch with rate-limited ports. A router interface's
    properties apply to the router's own interface and to the switch port facing it.

    - ``rate``: a token bucket (``tbf``) as the port's root qdisc. It counts the Ethernet header
      (14 bytes) of each packet, so 1 Gbit/s carries 1448 B of TCP payload per 1514 B frame.
    - ``loss``: a tc BPF program (``bpf/loss_tc.c``, direct action) on the port's ``clsact``
      egress hook drops a packet when the kernel's per-packet random number is below
      ``loss * 2**32``. No netem needed (this kernel has no netem, nor the gact and police
      actions a classic-BPF filter would need). The program drops whole socket buffers, so the
      sending host's ``eth0`` gets TSO/GSO off: one packet per buffer, as on a wire.
    - ``delay``/``jitter``: netem, where the kernel has it; here the load step refuses them
      naming the missing qdisc.
    - ``mtu``: the MTU of both ends of the wire.

    Bad values (``rate: fast``, ``loss: 150%``) stop the load step with one line.
    """
    spec = cluster.spec.underlay
    by_subnet = {s.name: getattr(s, "link", None) for s in spec.subnets}
    router_links = {(r.name, i): p for r in spec.routers
                    for i, p in enumerate(getattr(r, "links", ()) or ()) if p is not None}
    if not any(by_subnet.values()) and not router_links:
        return []
    done: list[tuple[str | None, str]] = []
    for link in cluster.net.links:
        host, port = link.intf1.node, link.intf2
        if host.name in cluster.nodes:
            props = by_subnet.get(cluster.nodes[host.name].spec.subnet)
        elif host.name in cluster.hosts:
            props = by_subnet.get(getattr(host, "subnet", None))
        elif host.name in cluster.routers:
            r = next(r for r in spec.routers if r.name == host.name)
            k = int(link.intf1.name[3:]) if link.intf1.name.startswith("eth") else -1
            subnet = r.interfaces[k][0] if 0 <= k < len(r.interfaces) else None
            props = router_links.get((r.name, k)) or by_subnet.get(subnet)
            if router_links.get((r.name, k)) is not None:
                shape(link.intf1.name, props, host.netns)
                done.append((host.netns, link.intf1.name))
        else:
            continue                      # switch to switch: inside the segment
        if props is None or props.empty():
            continue
        shape(port.name, props)
        done.append((None, port.name))
        if props.mtu is not None:
            set_mtu(link.intf1.name, props.mtu, host.netns)
        if props.loss:
            from . import proc
            # the loss program drops whole skbs: let the sender hand the wire single packets
            proc.run(["ethtool", "-K", link.intf1.name, "tso", "off", "gso", "off"], netns=host.netns)
    log.info("shaped %d underlay port(s)", len(done))
    return done


def shaped_devices(cluster: Any) -> list[tuple[str | None, str]]:
    return list(getattr(cluster, "shaped_links", []))
