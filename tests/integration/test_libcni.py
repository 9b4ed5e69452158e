"""libcni, the Go library container runtimes use, drives every plugin of ours as an executable.

A small driver (libcni_driver/main.go) is built offline from Debian's libcni source and runs
ADD, CHECK, DEL and DEL again of one network config list per plugin, twice: in a node's
namespace of a running cluster, where the plugin executable forwards to the node's CNI server
(the fast path), and in a namespace with no server, where it runs the full plugin.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from helpers import require_root_and
from k8snetlab import spec
from k8snetlab.cluster import Cluster
from k8snetlab.pod import Pod
from leftover_check import running

pytestmark = pytest.mark.integration

LIBCNI_SRC = Path("/usr/share/gocode/src/github.com/containernetworking/cni/libcni")
DRIVER_SRC = Path(__file__).resolve().parent / "libcni_driver" / "main.go"
ONE_NODE = {"name": "libcni", "underlay": {"subnets": [{"name": "lan", "cidr": "192.168.0.0/24"}]},
            "nodes": [{"name": "node1", "ip": "192.168.0.10"}], "cni": {"type": "host-gw"}}


@pytest.fixture(scope="module")
def driver(tmp_path_factory) -> Path:
    if shutil.which("go") is None:
        pytest.skip("Go is not installed (Debian golang-go; 'sudo make deps' installs it)")
    if not LIBCNI_SRC.is_dir():
        pytest.skip("libcni source is not installed (Debian golang-github-appc-cni-dev)")
    work = tmp_path_factory.mktemp("libcni")
    src = work / "gopath" / "src" / "libcnidriver"
    src.mkdir(parents=True)
    shutil.copy(DRIVER_SRC, src / "main.go")
    out = work / "driver"
    env = {**os.environ, "GO111MODULE": "off", "GOPATH": f"{work / 'gopath'}:/usr/share/gocode",
           "GOCACHE": str(work / "gocache"), "GOFLAGS": ""}
    t0 = time.monotonic()
    r = subprocess.run(["go", "build", "-o", str(out), "."], cwd=src, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, f"building the libcni driver failed: {r.stderr[-2000:]}"
    print(f"libcni driver built in {time.monotonic() - t0:.1f} s")
    return out


@pytest.fixture(scope="module")
def cluster():
    require_root_and("mnexec", "brctl", "nsenter")
    with running(Cluster(spec.from_dict(ONE_NODE, "test_libcni"))) as c:
        yield c


def conflists(tmp: Path) -> dict[str, dict]:
    """One network config list per plugin of ours (cniVersion 1.0.0: libcni 1.1 decodes it)."""
    def ipam(n: int) -> dict:
        return {"type": "host-local", "ranges": [[{"subnet": f"10.99.{n}.0/24"}]], "dataDir": str(tmp / "ipam")}
    subnet_env = tmp / "subnet.env"
    subnet_env.write_text("FLANNEL_NETWORK=10.99.0.0/16\nFLANNEL_SUBNET=10.99.2.1/24\nFLANNEL_MTU=1500\n")
    plugins = {
        "bridge": {"type": "bridge", "bridge": "cnilc0", "isGateway": True, "ipam": ipam(1)},
        "flannel": {"type": "flannel", "subnetFile": str(subnet_env), "dataDir": str(tmp / "flannel"),
                    "ipamDataDir": str(tmp / "ipam"), "delegate": {"bridge": "cnilc1"}},
        "calico": {"type": "calico", "mtu": 1480, "ipam": ipam(3)},
        "host-local": {"type": "host-local", "ipam": ipam(4)},
    }
    lists = {t: {"cniVersion": "1.0.0", "name": f"lc-{t}", "plugins": [p]} for t, p in plugins.items()}
    # a chained list as a real one: tuning, bandwidth and portmap after the main plugin
    lists["chain"] = {"cniVersion": "1.0.0", "name": "lc-chain", "plugins": [
        {"type": "bridge", "bridge": "cnilc5", "isGateway": True, "ipam": ipam(5)},
        {"type": "tuning", "sysctl": {"net.ipv4.conf.IFNAME.arp_filter": "1"}, "dataDir": str(tmp / "tuning")},
        {"type": "bandwidth", "capabilities": {"bandwidth": True}},
        {"type": "portmap", "capabilities": {"portMappings": True}}]}
    return lists


# what a kubelet hands libcni for a pod with a hostPort and a bandwidth annotation
CAPABILITY_ARGS = {"portMappings": [{"hostPort": 18080, "containerPort": 80, "protocol": "tcp"}],
                   "bandwidth": {"egressRate": 10_000_000, "egressBurst": 2 ** 32 - 1}}


def drive(driver: Path, cluster, netns: str, plugin: str, conf: dict, tmp: Path) -> list[str]:
    conf_file = tmp / f"{plugin}.conflist"
    conf_file.write_text(json.dumps(conf))
    extra = [json.dumps(CAPABILITY_ARGS)] if plugin == "chain" else []
    sandbox = Pod(f"libcni-{plugin}")
    try:
        r = subprocess.run(["nsenter", f"--net={netns}", "--", str(driver), str(conf_file), sandbox.netns,
                            f"libcni{plugin.replace('-', '')}" + "0" * 20, "eth0", str(cluster.state.cni_bin),
                            str(tmp / "cache"), *extra], capture_output=True, text=True, timeout=120)
    finally:
        sandbox.terminate()
    lines = r.stdout.splitlines()
    assert r.returncode == 0, f"{plugin}: {r.stdout}{r.stderr}"
    return lines


@pytest.mark.parametrize("plugin", ["bridge", "flannel", "calico", "host-local", "chain"])
@pytest.mark.parametrize("where", ["node (CNI server)", "no server (full plugin)"])
def test_libcni_runs_add_check_del_del(driver, cluster, plugin, where, tmp_path):
    server = cluster.kubelets["node1"].server
    before = server.requests
    if where.startswith("node"):
        lines = drive(driver, cluster, cluster.nodes["node1"].netns, plugin, conflists(tmp_path)[plugin], tmp_path)
        assert server.requests > before, "the plugin did not forward to the node's CNI server"
    else:
        other = Pod("libcni-node")
        try:
            lines = drive(driver, cluster, other.netns, plugin, conflists(tmp_path)[plugin], tmp_path)
        finally:
            other.terminate()
        assert server.requests == before
    assert [l.split(" ", 1)[0] for l in lines] == ["ADD", "CHECK", "DEL", "DEL2"], lines
    result = json.loads(lines[0].split(" ", 1)[1])
    assert result["cniVersion"] == "1.0.0" and result["ips"], result
    if plugin == "chain":     # bandwidth's ifb joined the result: the runtime config reached it
        assert any(i["name"].startswith("bwp") for i in result["interfaces"]), result
