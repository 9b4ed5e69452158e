"""``flat-l2``: every node's pods on the node's ``cni0`` bridge with a configurable MTU, routed
between nodes like host-gw. An example of a CNI mode living in its own package: it is found
through the ``k8snetlab.cni_modes`` entry point its ``pyproject.toml`` declares."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from k8snetlab import naming
from k8snetlab.modes.host_gw import FlannelOptions, HostGwMode
from k8snetlab.options import opt


@dataclass
class FlatL2Options(FlannelOptions):
    """host-gw's options (its node agent reads them) and one of ours."""

    mtu: int = opt(1500, min=576, max=9000, help="the pods' MTU")


class FlatL2Mode(HostGwMode):
    """Pods on a per-node bridge, host-gw routes between nodes, the MTU an option."""

    name = "flat-l2"
    Options = FlatL2Options

    @property
    def mtu(self) -> int:
        return self.options.mtu

    def plugin_configs(self, node: Any) -> list[dict[str, Any]]:
        return [{"type": "bridge", "bridge": naming.BRIDGE, "isGateway": True, "isDefaultGateway": True,
                 "hairpinMode": True, "mtu": self.mtu, "ipam": self.host_local(node)}]
