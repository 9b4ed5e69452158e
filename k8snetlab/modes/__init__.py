"""CNI modes: what ``cni.type`` in a cluster file selects.

A mode pairs the per-pod CNI plugin config (the ``.conflist`` a kubelet would read) with the
node agent that does what is not per pod (what flanneld or calico-node does on a real node):
sysctls, VTEPs, BPF programs, routes to the other nodes' pod CIDRs. Adding a mode is one
module and one line in the ``k8snetlab.cni_modes`` entry-point group.
"""

from __future__ import annotations

from ..registry import Registry
from .base import Mode

MODES: Registry[type[Mode]] = Registry("CNI type", "k8snetlab.cni_modes", base=Mode)

__all__ = ["MODES", "Mode"]
