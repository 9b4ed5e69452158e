"""kube-proxy ``ipvs`` mode: refused here, with the reason.

Real kube-proxy's ipvs mode puts every ClusterIP on a dummy ``kube-ipvs0`` device and makes
one IPVS virtual server per service port, with the pods as real servers. That needs the
kernel's IP Virtual Server (``CONFIG_IP_VS``, the ``ip_vs`` modules). The machines this
testbed runs on have none, and a kernel without loadable modules cannot get it, so the mode
is detected as unavailable and refused with one line, at spec load (``validate``) and at
cluster start, instead of failing half-way through a run.

On a kernel that has IPVS this module still refuses, saying so: the testbed has no IPVS
proxier yet (it could not be exercised here). Use ``iptables`` or ``nftables``.
"""

from __future__ import annotations

import gzip
import platform
from pathlib import Path

from ..errors import KernelFeatureMissing
from .model import Snapshot
from .proxy import Proxier

PROC_IP_VS = Path("/proc/net/ip_vs")
CONFIG_GZ = Path("/proc/config.gz")


def kernel_has_ipvs() -> tuple[bool, str]:
    """(True if IPVS is there or loadable, how we know). Needs no root."""
    if PROC_IP_VS.exists():
        return True, f"{PROC_IP_VS} exists"
    release = platform.release()
    moddir = Path("/lib/modules") / release / "kernel" / "net" / "netfilter" / "ipvs"
    if any(moddir.glob("ip_vs.ko*")):
        return True, f"module ip_vs found in {moddir}"
    try:
        with gzip.open(CONFIG_GZ, "rt") as f:
            for line in f:
                if line.startswith("CONFIG_IP_VS="):
                    return True, f"{CONFIG_GZ}: {line.strip()}"
        return False, f"{CONFIG_GZ} has no CONFIG_IP_VS"
    except OSError:
        pass
    return False, f"no {PROC_IP_VS} and no ip_vs module for kernel {release}"


class IpvsProxier(Proxier):
    mode = "ipvs"
    tools = ("ipvsadm",)

    @classmethod
    def unavailable(cls) -> str | None:
        has, how = kernel_has_ipvs()
        if not has:
            return (f"kube-proxy mode ipvs needs the kernel's IPVS, and this kernel has none ({how}): "
                    "use kubeProxy.mode iptables or nftables")
        return ("kube-proxy mode ipvs: this kernel has IPVS, but the testbed has no IPVS proxier yet: "
                "use kubeProxy.mode iptables or nftables")

    def start(self) -> None:
        raise KernelFeatureMissing(self.unavailable() or "kube-proxy mode ipvs is unavailable")

    def sync(self, snap: Snapshot) -> None:   # pragma: no cover - start() always refuses
        raise KernelFeatureMissing(self.unavailable() or "kube-proxy mode ipvs is unavailable")
