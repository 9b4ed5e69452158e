"""CNI modes: what ``cni.type`` in a cluster file selects.

A mode pairs the per-pod CNI plugin config (the ``.conflist`` a kubelet would read) with the
node agent that does what is not per pod (what flanneld or calico-node does on a real node):
sysctls, VTEPs, BPF programs, routes to the other nodes' pod CIDRs. Adding a mode is one
module in this package and one line in ``_MODULES``.
"""

from __future__ import annotations

from ..registry import Registry
from .base import Mode

_MODULES = ("k8snetlab.modes.bridge", "k8snetlab.modes.host_gw", "k8snetlab.modes.ipip",
            "k8snetlab.modes.vxlan", "k8snetlab.modes.bgp",
            "k8snetlab.modes.docker")

MODES: Registry[type[Mode]] = Registry("CNI type", _MODULES)

__all__ = ["MODES", "Mode"]
