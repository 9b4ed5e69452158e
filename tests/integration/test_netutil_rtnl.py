"""The hand-encoded route and address requests of netutil make exactly what pyroute2 makes
(same ``ip -d`` lines: proto, scope, onlink, mtu, no broadcast), and refuse what the kernel
refuses with its errno. Runs in a throwaway network namespace (``unshare -n``): nothing to
clean up."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from helpers import require_root_and

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import json, subprocess, sys
sys.path.insert(0, sys.argv[1])
from k8snetlab.netutil import Netns
from k8snetlab.errors import NetlinkError
raw = sys.argv[2] == "raw"
with Netns(None, "scratch") as ns:
    ns.ipr.link("add", ifname="a0", kind="veth", peer={"ifname": "a1"})
    ns.link_up("a0"); ns.link_up("a1")
    if not raw:      # the pyroute2 requests netutil made before
        i = ns.require_index("a0")
        ns.ipr.addr("add", index=i, address="10.9.0.2", prefixlen=24)
        ns.ipr.route("replace", dst="10.8.0.0/16", gateway="10.9.0.1", oif=i, table=254)
        ns.ipr.route("replace", dst="10.7.0.0/16", oif=i, scope=253, table=254)
        ns.ipr.route("replace", dst="10.6.0.0/16", gateway="10.9.0.7", oif=i, flags=4, metrics={"mtu": 1400}, table=254)
        ns.ipr.route("replace", dst="0.0.0.0/0", gateway="10.9.0.1", oif=i, table=254)
    else:
        ns.ensure_addr("a0", "10.9.0.2/24")
        ns.ensure_addr("a0", "10.9.0.2/24")          # already there: fine
        ns.add_route("10.8.0.0/16", gateway="10.9.0.1", dev="a0")
        ns.replace_routes([{"dst": "10.7.0.0/16", "dev": "a0"},
                           {"dst": "10.6.0.0/16", "gateway": "10.9.0.7", "dev": "a0", "onlink": True, "mtu": 1400}])
        ns.add_route("default", gateway="10.9.0.1", dev="a0")
        try:
            ns.add_route("10.5.0.0/16", gateway="10.99.0.1", dev="a0")
            print("NO ERROR")
        except NetlinkError as e:
            print("ERROR", e)
out = subprocess.run(["ip", "-d", "route"], capture_output=True, text=True).stdout
addr = [l.strip() for l in subprocess.run(["ip", "addr", "show", "a0"], capture_output=True, text=True).stdout.splitlines() if "inet " in l]
print(json.dumps({"routes": out.splitlines(), "addr": addr}))
"""


def run(how: str) -> tuple[list[str], dict]:
    r = subprocess.run(["unshare", "-n", sys.executable, "-c", SCRIPT, str(REPO), how],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    import json
    return lines[:-1], json.loads(lines[-1])


def test_hand_encoded_requests_make_what_pyroute2_makes():
    require_root_and("unshare", "ip")
    said, raw = run("raw")
    _, reference = run("pyroute2")
    assert raw == reference
    assert any("10.6.0.0/16 via 10.9.0.7 dev a0 proto static scope global onlink mtu 1400" in l for l in raw["routes"])
    assert said and said[0].startswith("ERROR") and "10.5.0.0/16" in said[0] and "unreachable" in said[0].lower()


VETH = r"""
import json, os, subprocess, sys
sys.path.insert(0, sys.argv[1])
from k8snetlab import netutil
from k8snetlab.netutil import Netns
raw = sys.argv[2] == "raw"
holder = subprocess.Popen(["unshare", "-n", "sleep", "30"])
import time
other = f"/proc/{holder.pid}/ns/net"
while os.readlink(other) == os.readlink("/proc/self/ns/net"):
    time.sleep(0.01)
with Netns(None, "node") as node, Netns(other, "pod") as pod:
    br = node.ensure_bridge("cni0", 1450)
    assert node.ensure_bridge("cni0", 1450) == br                 # the second time: seen already
    if raw:
        node.add_veth("veth1234", "eth0", pod, mtu=1450, peer_mac="0a:58:0a:f4:01:02", master=br, up=True)
        node.set_brport("veth1234", mode=1)
        try:
            node.add_veth("veth1234", "eth1", pod, mtu=1450, master=br)
            print("NO ERROR")
        except netutil.NetlinkError as e:
            print("ERROR", e)
    else:            # the pyroute2 requests netutil made before
        fd = os.open(other, os.O_RDONLY)
        node.ipr.link("add", ifname="veth1234", kind="veth", master=br, state="up", mtu=1450,
                      peer={"ifname": "eth0", "net_ns_fd": fd, "mtu": 1450, "address": "0a:58:0a:f4:01:02"})
        node.ipr.brport("set", index=node.require_index("veth1234"), mode=1)
    pod_link = pod.link("eth0")
    node_link = node.link("veth1234")
    assert node.ipr is not None and node.links()     # pyroute2 still opens on demand, in the right namespace
show = lambda *a: subprocess.run(["ip", "-d", *a], capture_output=True, text=True).stdout
node_side = [l.split("mode DEFAULT")[0].split(": ", 1)[-1] for l in show("link", "show", "veth1234").splitlines()[:1]]
hairpin = "hairpin on" in show("link", "show", "veth1234")
pod_side = subprocess.run(["nsenter", f"--net={other}", "ip", "-o", "link", "show", "eth0"],
                          capture_output=True, text=True).stdout.split(": ", 1)[-1].split(" link-netnsid")[0]
holder.kill()
print(json.dumps({"node": node_side, "hairpin": hairpin, "pod": pod_side,
                  "master": node_link["master"] == br, "peer_up": pod_link["up"], "mtu": [node_link["mtu"], pod_link["mtu"]]}))
"""


def test_hand_encoded_veth_and_hairpin_make_what_pyroute2_makes():
    """The veth pair a pod's ADD makes (peer in the pod's namespace, both MTUs, the node end on
    the bridge and up, hairpin) and the refusal of a second pair of the same name."""
    require_root_and("unshare", "ip", "nsenter")
    outs = {}
    for how in ("raw", "pyroute2"):
        r = subprocess.run(["unshare", "-n", sys.executable, "-c", VETH, str(REPO), how],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        import json
        outs[how] = (r.stdout.splitlines()[:-1], json.loads(r.stdout.splitlines()[-1]))
    said, raw = outs["raw"]
    assert raw == outs["pyroute2"][1]
    assert raw["hairpin"] and raw["master"] and raw["mtu"] == [1450, 1450]
    assert "0a:58:0a:f4:01:02" in raw["pod"] and "UP" in raw["node"][0]
    assert said and said[0].startswith("ERROR") and "veth1234" in said[0] and "exists" in said[0]
