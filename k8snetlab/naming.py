"""Every Linux and Mininet name the testbed makes is built here.

Interface names are limited to 15 characters (IFNAMSIZ - 1). Anything the testbed creates
in the root namespace or on the filesystem carries the prefix ``knl<cluster index>`` so that
``k8snetlab clean`` can find leftovers of a killed run and touch nothing else.
"""

from __future__ import annotations

import hashlib
import re

IFNAMSIZ = 15
PREFIX = "knl"                      # k8snetlab
STATE_ROOT = "/run/k8snetlab"       # per-cluster state dirs live below (tmpfs: gone on reboot)
NODE_UPLINK = "eth0"                # a node's underlay interface, as on a real node
POD_IFNAME = "eth0"                 # CNI_IFNAME the runtime asks for
BRIDGE = "cni0"                     # bridge / flannel node bridge
VXLAN_DEV = "flannel.1"
IPIP_DEV = "tunl0"
CALICO_GATEWAY = "169.254.1.1"      # the pod's default gateway in the Calico layout

_ROOT_NS_RE = re.compile(rf"^{PREFIX}(\d+)")


def check_ifname(name: str) -> str:
    if not name or len(name) > IFNAMSIZ or "/" in name or " " in name:
        raise ValueError(f"invalid interface name {name!r} (at most {IFNAMSIZ} characters)")
    return name


def cluster_prefix(index: int) -> str:
    return f"{PREFIX}{index}"


def switch_name(index: int, n: int) -> str:
    """A Linux bridge of the underlay, in the root namespace: knl<cluster>s<n>."""
    return check_ifname(f"{cluster_prefix(index)}s{n}")


def switch_port(switch: str, port: int) -> str:
    return check_ifname(f"{switch}-eth{port}")


def cluster_index_of(ifname: str) -> int | None:
    """The cluster index encoded in a root-namespace interface name, or None if not ours."""
    m = _ROOT_NS_RE.match(ifname)
    return int(m.group(1)) if m else None


def host_veth(prefix: str, container_id: str, ifname: str) -> str:
    """Node-side veth of a pod: stable for (container, ifname), like the CNI plugins' names.

    ``prefix`` is ``veth`` (bridge, flannel) or ``cali`` (Calico).
    """
    digest = hashlib.sha1(f"{container_id}.{ifname}".encode()).hexdigest()
    return check_ifname(f"{prefix}{digest[:IFNAMSIZ - len(prefix)]}")


def router_intf(router: str, n: int) -> str:
    return check_ifname(f"eth{n}")
