"""CNI ``flannel``: the pod side of flannel (host-gw and VXLAN backends alike).

As the real plugin: read the node's ``subnet.env`` written by the node agent (our flanneld,
in ``k8snetlab.modes``), which says the cluster network, this node's pod subnet, the MTU the
backend leaves for pods (1500 for host-gw, 1450 for VXLAN), then *delegate* to ``bridge``
with ``host-local`` IPAM on that subnet. The delegate's config is saved under ``dataDir`` so
that DEL can hand the same config back to the delegate after the node agent has moved on.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from cni_plugins import skel
from k8snetlab import cni_protocol as cni
from k8snetlab.cni_protocol import CNIError, Result

DEFAULT_SUBNET_FILE = "/run/flannel/subnet.env"
DEFAULT_DATA_DIR = "/var/lib/cni/flannel"


def read_subnet_env(path: str) -> dict[str, str]:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise CNIError(cni.ERR_TRY_AGAIN, f"failed to read {path}: {e.strerror}",
                       "is the node agent (flanneld) running?") from None
    env = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith("#"):
            k, v = line.split("=", 1)
            env[k.strip()] = v.strip()
    for key in ("FLANNEL_NETWORK", "FLANNEL_SUBNET", "FLANNEL_MTU"):
        if key not in env:
            raise CNIError(cni.ERR_INVALID_CONFIG, f"{path} has no {key}")
    return env


def _delegate_conf(conf: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    d = dict(conf.get("delegate") or {})
    d.setdefault("type", "bridge")
    d.setdefault("isGateway", True)
    d.setdefault("mtu", int(env["FLANNEL_MTU"]))
    d["name"], d["cniVersion"] = conf["name"], conf["cniVersion"]
    ipam = dict(d.get("ipam") or {})
    ipam.setdefault("type", "host-local")
    ipam.setdefault("ranges", [[{"subnet": env["FLANNEL_SUBNET"]}]])
    ipam.setdefault("routes", [{"dst": env["FLANNEL_NETWORK"]}])
    if conf.get("ipamDataDir"):
        ipam.setdefault("dataDir", conf["ipamDataDir"])
    d["ipam"] = ipam
    return d


def _saved(conf: dict[str, Any], args: skel.CmdArgs) -> Path:
    return Path(conf.get("dataDir", DEFAULT_DATA_DIR)) / args.container_id


def add(conf: dict[str, Any], args: skel.CmdArgs) -> Result:
    env = read_subnet_env(conf.get("subnetFile", DEFAULT_SUBNET_FILE))
    d = _delegate_conf(conf, env)
    path = _saved(conf, args)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A saved config means an earlier ADD of this container succeeded: it is what a DEL must
    # hand back to the delegate. A second ADD (the delegate refuses it: the interface is
    # there) must leave it alone, or the runtime's DEL after the failure would leak the veth,
    # eth0 and the IP of the first ADD.
    first = not path.exists()
    if first:
        path.write_text(json.dumps(d))
    try:
        res = skel.delegate("ADD", d["type"], d, args)
    except Exception:
        if first:
            path.unlink(missing_ok=True)
        raise
    if not first:
        path.write_text(json.dumps(d))
    return Result.from_dict(res or {})


def delete(conf: dict[str, Any], args: skel.CmdArgs) -> None:
    path = _saved(conf, args)
    try:
        d = json.loads(path.read_text())
    except OSError:
        return  # never added, or already deleted
    skel.delegate("DEL", d["type"], d, args)
    path.unlink(missing_ok=True)


def check(conf: dict[str, Any], args: skel.CmdArgs) -> None:
    try:
        d = json.loads(_saved(conf, args).read_text())
    except OSError:
        raise CNIError(cni.ERR_UNKNOWN_CONTAINER, f"no saved delegate config for {args.container_id}") from None
    if "prevResult" in conf:
        d["prevResult"] = conf["prevResult"]
    skel.delegate("CHECK", d["type"], d, args)


def status(conf: dict[str, Any], args: skel.CmdArgs) -> None:
    path = conf.get("subnetFile", DEFAULT_SUBNET_FILE)
    if not os.path.exists(path):
        raise CNIError(cni.ERR_NOT_AVAILABLE, f"{path} does not exist yet: flanneld not ready")


if __name__ == "__main__":
    skel.main(sys.modules[__name__])
