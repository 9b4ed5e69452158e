"""The built-in choice of every axis, declared as Python entry points ("name = module:attr").

One group per axis. Another package adds a choice by declaring an entry point in the same
group of its own ``pyproject.toml``; :class:`k8snetlab.registry.Registry` merges this table
with the installed entry points. ``setup.py`` registers this very table, so ours are
declared the same way, yet a checkout works when it is only on ``sys.path``.
This file is plain data: ``setup.py`` reads it without importing the package.
"""

ENTRY_POINTS: dict[str, list[str]] = {
    "k8snetlab.cni_modes": [
        "bridge = k8snetlab.modes.bridge:BridgeMode",
        "host-gw = k8snetlab.modes.host_gw:HostGwMode",
        "vxlan = k8snetlab.modes.vxlan:VxlanMode",
        "ipip = k8snetlab.modes.ipip:IpipMode",
        "bgp = k8snetlab.modes.bgp:BgpMode",
        "docker = k8snetlab.modes.docker:DockerMode",
    ],
    "k8snetlab.cni_plugins": [          # CNI type -> plugin module (also run as an executable)
        "bridge = cni_plugins.bridge",
        "flannel = cni_plugins.flannel",
        "calico = cni_plugins.calico",
        "host-local = cni_plugins.host_local",
        "portmap = cni_plugins.portmap",
        "bandwidth = cni_plugins.bandwidth",
        "tuning = cni_plugins.tuning",
    ],
    "k8snetlab.cni_invokers": [
        "exec = k8snetlab.cni_protocol:ExecInvoker",
        "inprocess = cni_plugins.inprocess:InProcessInvoker",
    ],
    "k8snetlab.kube_proxy_modes": [
        "userspace = k8snetlab.services.userspace:UserspaceProxier",
        "iptables = k8snetlab.services.iptables:IptablesProxier",
        "nftables = k8snetlab.services.nftables:NftablesProxier",
        "ipvs = k8snetlab.services.ipvs:IpvsProxier",
        "openflow = k8snetlab.services.openflow:OpenFlowProxier",
    ],
    "k8snetlab.addons": [
        "services = k8snetlab.services.services_addon:ServicesAddon",
        "policy = k8snetlab.policy.addon:PolicyAddon",
    ],
    "k8snetlab.controller_apps": [      # app name -> controllers.AppInfo (imports no framework)
        "l2_learning = controllers:L2_LEARNING",
        "fabric = controllers:FABRIC",
        "service_lb = controllers:SERVICE_LB",
    ],
    "k8snetlab.bgp_speakers": [
        "bird = k8snetlab.bgp.speakers:BirdSpeaker",
        "exabgp = k8snetlab.bgp.speakers:ExabgpSpeaker",
    ],
    "k8snetlab.network_policy_dataplanes": [
        "iptables = k8snetlab.policy.iptables:IptablesDataplane",
        "iptables-legacy = k8snetlab.policy.iptables:IptablesLegacyDataplane",
        "nftables = k8snetlab.policy.nftables:NftablesDataplane",
    ],
}
