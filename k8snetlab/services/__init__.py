"""Kubernetes Services in the emulated cluster: stable virtual IPs in front of pods that come and go.

The pieces, in the order a packet meets them:

- :mod:`.model`: Service manifests in Kubernetes' own schema (ClusterIP, NodePort,
  LoadBalancer, headless), the ``kubeProxy`` options, ClusterIP / nodePort allocation, and the
  :class:`~.model.Snapshot` every part below is handed on each change.
- :mod:`.endpoints`: the Endpoints controller (selector -> ready pod IPs and ports).
- :mod:`.proxy`: the kube-proxy interface and the mode registry :data:`~.proxy.PROXIERS`;
  one module per mode: :mod:`.iptables`, :mod:`.nftables`, ``userspace``, :mod:`.ipvs`
  (refused where the kernel has no IPVS).
- ``dns`` (cluster DNS) and ``loadbalancer`` (an external load balancer host).
- :mod:`.services_addon`: wires it all into a running cluster; reachable as ``cluster.services``.

Adding a kube-proxy mode: a :class:`~.proxy.Proxier` subclass with a ``mode`` name, declared
in the ``k8snetlab.kube_proxy_modes`` entry-point group (see :mod:`k8snetlab.extensions`).
"""

from .model import Endpoint, KubeProxyOptions, Service, ServicePort, Snapshot
from .proxy import PROXIERS, Proxier, available_modes

__all__ = [
           "PROXIERS",
           "Endpoint",
           "KubeProxyOptions",
           "Proxier",
           "Service",
           "ServicePort",
           "Snapshot",
           "available_modes",
]
