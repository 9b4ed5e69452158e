"""k8snetlab: an emulated Kubernetes cluster network on one Linux machine.

Mininet hosts are the nodes and the pods; CNI plugins (``cni_plugins``) wire the pods
the way the real plugins do; experiments measure each mode and write tidy CSV.
"""

__version__ = "0.1.0"
