"""``bridge``: pods of a node on ``cni0`` with host-local addresses; nothing between nodes.

This is the CNI reference ``bridge`` layout. With ``cni.reference: true`` the runtime executes
Debian's reference binaries (``/usr/lib/cni/bridge`` + ``host-local`` and the chained
``portmap``, ``bandwidth``, ``tuning``, containernetworking-plugins) instead of ours, with the
same config: the baseline our plugins are held against.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .. import naming
from ..cni import NetworkConfigList
from .base import REFERENCE_DIR, REFERENCE_VERSION, Mode

if TYPE_CHECKING:  # pragma: no cover
    from ..pod import NodeHost

REFERENCE_DIRS = (REFERENCE_DIR, "/opt/cni/bin")


class BridgeMode(Mode):
    name = "bridge"
    chained = ("portmap", "bandwidth")      # kubenet's list: bridge, portmap, bandwidth

    def plugin_configs(self, node: "NodeHost") -> list[dict[str, Any]]:
        return [{"type": "bridge", "bridge": naming.BRIDGE, "isGateway": True, "isDefaultGateway": True,
                 "hairpinMode": True, "mtu": self.mtu, "ipam": self.host_local(node)}]

    def netconf(self, node: "NodeHost") -> NetworkConfigList:
        if not self.cluster.spec.cni.reference:
            return super().netconf(node)
        return NetworkConfigList(self.network_name, REFERENCE_VERSION, self.config_list(node),
                                 bin_dirs=REFERENCE_DIRS)

    @property
    def datapath(self) -> str:
        return "reference" if self.cluster.spec.cni.reference else "kernel"
