"""The fast CNI exec path stays the CNI exec protocol.

A plugin executable of a running cluster (the shim) started in a node's namespace is answered
by that node's CNI server; started anywhere else it runs the full plugin. Both must answer
byte for byte alike, errors included, and a full ADD / CHECK / DEL / DEL through the shim
must wire and unwire a pod.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from helpers import require_root_and
from k8snetlab import spec
from k8snetlab.cluster import Cluster
from k8snetlab.manifests import PodSpec
from k8snetlab.pod import Pod
from leftover_check import running

pytestmark = pytest.mark.integration

ONE_NODE = {"name": "fastpath", "underlay": {"subnets": [{"name": "lan", "cidr": "192.168.0.0/24"}]},
            "nodes": [{"name": "node1", "ip": "192.168.0.10"}],
            "cni": {"type": "host-gw"}}


@pytest.fixture(scope="module")
def cluster():
    require_root_and("mnexec", "brctl", "nsenter")
    with running(Cluster(spec.from_dict(ONE_NODE, "test_cni_fast_path"))) as c:
        yield c


def call(cluster, netns: str, ptype: str, env: dict[str, str], stdin: bytes) -> tuple[int, bytes]:
    """Execute the plugin as a runtime does: in ``netns``, CNI env, config on stdin."""
    path = cluster.state.cni_bin / ptype
    r = subprocess.run(["nsenter", f"--net={netns}", "--", str(path)], input=stdin, capture_output=True,
                       env={"PATH": os.environ["PATH"], **env}, timeout=60)
    return r.returncode, r.stdout


@pytest.fixture
def elsewhere():
    """A namespace that is no node: no CNI server answers there."""
    p = Pod("fastpath-elsewhere")
    yield p.netns
    p.terminate()


def test_the_server_and_the_full_plugin_answer_alike(cluster, elsewhere):
    node = cluster.nodes["node1"]
    server = cluster.kubelets["node1"].server
    cases = [
        ({"CNI_COMMAND": "VERSION"}, b"{}"),
        # a quote and a backslash in the environment travel intact
        ({"CNI_COMMAND": 'AD"D\\'}, b"{}"),
        ({"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "x", "CNI_NETNS": "/nonexistent", "CNI_IFNAME": "eth0",
          "CNI_PATH": str(cluster.state.cni_bin)}, b"not json"),
        ({"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "x", "CNI_NETNS": "/nonexistent", "CNI_IFNAME": "eth0",
          "CNI_PATH": str(cluster.state.cni_bin)}, json.dumps({"cniVersion": "9.9.9", "name": "n",
                                                              "type": "bridge"}).encode()),
    ]
    for env, stdin in cases:
        before = server.requests
        fast = call(cluster, node.netns, "bridge", env, stdin)
        assert server.requests == before + 1, f"{env}: the node's CNI server was not asked"
        full = call(cluster, elsewhere, "bridge", env, stdin)
        assert server.requests == before + 1, f"{env}: a namespace with no server reached one"
        assert fast == full, f"{env}: server answered {fast}, the full plugin {full}"
    assert call(cluster, node.netns, "bridge", {"CNI_COMMAND": 'AD"D\\'}, b"{}")[0] == 1


def test_add_check_del_del_through_the_shim(cluster):
    kubelet = cluster.kubelets["node1"]
    pod = kubelet.create_sandbox(PodSpec("fastpath-pod"))
    try:
        rt = kubelet.runtime_conf(pod)
        before = kubelet.server.requests
        result = kubelet.runtime.add(kubelet.netconf, rt)
        assert kubelet.server.requests > before, "ADD did not go through the node's CNI server"
        cidr = result.sandbox_ip("eth0")
        assert cidr and cidr.split("/")[0] in pod.run(["ip", "-4", "addr", "show", "eth0"]).stdout
        kubelet.runtime.check(kubelet.netconf, rt)
        kubelet.runtime.delete(kubelet.netconf, rt)
        assert pod.run(["ip", "link", "show", "eth0"], check=False).returncode != 0
        kubelet.runtime.delete(kubelet.netconf, rt)    # DEL again: idempotent
    finally:
        pod.result = None
        kubelet.delete_pod(pod.name)


def test_a_sandbox_made_on_a_kubelet_directly_goes_with_the_cluster():
    """stop() removes every sandbox a kubelet holds, not only those add_pod made."""
    require_root_and("mnexec", "brctl", "nsenter")
    from k8snetlab import proc
    c = Cluster(spec.from_dict(ONE_NODE, "test_cni_fast_path (stray sandbox)"))
    c.start()
    try:
        pod = c.kubelets["node1"].create_sandbox(PodSpec("stray"))
        holder = (pod.pid, proc.start_time(pod.pid))
    finally:
        c.stop()
    assert not proc.running(*holder), "the sandbox's holder outlived the cluster"


def test_the_servers_run_beside_the_runtime_in_worker_processes(cluster):
    """The node's server answers from a worker process of the cluster, not from the runtime:
    the plugins' CPU is not under the runtime's interpreter lock."""
    from k8snetlab import proc
    server = cluster.kubelets["node1"].server
    assert server.pid in cluster.cni_servers.pids() and server.pid != os.getpid()
    assert proc.running(server.pid, proc.start_time(server.pid))
    before = server.requests
    rc, out = call(cluster, cluster.nodes["node1"].netns, "bridge", {"CNI_COMMAND": "VERSION"}, b"{}")
    assert rc == 0 and json.loads(out)["supportedVersions"] and server.requests == before + 1


@pytest.mark.parametrize("holder", ["pause", "mnexec"])
def test_a_sandbox_holder_has_its_own_network_and_mount_namespaces_and_sysfs(cluster, holder):
    """The sandbox's holder (our compiled pause, or ``mnexec -n sleep`` without a C compiler)
    holds a network and a mount namespace of the pod's own, and the pod's /sys lists the
    pod's interfaces, not the machine's; deleting the pod ends it."""
    from k8snetlab import proc
    kubelet = cluster.kubelets["node1"]
    if holder == "pause" and kubelet.holder is None:
        pytest.skip("no C compiler: the holder is mnexec -n sleep")
    saved = kubelet.holder
    kubelet.holder = None if holder == "mnexec" else saved
    try:
        pod = kubelet.create_sandbox(PodSpec(f"held-{holder}"))
    finally:
        kubelet.holder = saved
    try:
        comm = open(f"/proc/{pod.pid}/comm").read().strip()
        assert comm == ("sleep" if holder == "mnexec" else "pause")
        for ns in ("net", "mnt"):
            assert os.stat(f"/proc/{pod.pid}/ns/{ns}").st_ino != os.stat(f"/proc/self/ns/{ns}").st_ino
        assert pod.run(["ls", "/sys/class/net"]).stdout.split() == ["lo"]
        assert "lo" in os.listdir("/sys/class/net") and len(os.listdir("/sys/class/net")) > 1
        held = (pod.pid, proc.start_time(pod.pid))
    finally:
        kubelet.delete_pod(pod.name)
    assert not proc.running(*held), "the sandbox's holder outlived its pod"


def test_a_scale_down_tears_its_pods_down_together_and_leaves_nothing_of_them(cluster):
    """scale() deletes the surplus pods concurrently (as a ReplicaSet scale-down does): every
    holder and container ends, every pod veth leaves the node, and the next scale-up
    reuses the names."""
    from k8snetlab import proc
    node = cluster.nodes["node1"]

    def veths() -> set[str]:
        out = node.run(["ip", "-o", "link", "show", "type", "veth"]).stdout
        return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}

    before = veths()
    cluster.add_pod({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "fleet"},
                     "spec": {"replicas": 0, "selector": {"matchLabels": {"app": "fleet"}},
                              "template": {"metadata": {"labels": {"app": "fleet"}},
                                           "spec": {"containers": [{"name": "c", "image": "busybox",
                                                                    "command": ["sleep", "600"]}]}}}})
    pods = cluster.scale("fleet", 6)
    assert len(pods) == 6 and len(veths() - before) == 6
    procs = [(p.pid, proc.start_time(p.pid)) for p in pods] + \
            [(c.pid, proc.start_time(c.pid)) for p in pods for c in p.containers.values()]
    assert cluster.scale("fleet", 0) == []
    assert not [p for p in cluster.pods if p.startswith("fleet-")]
    assert veths() == before, "a pod's veth stayed on the node"
    assert not [pid for pid, start in procs if proc.running(pid, start)], "a holder or container outlived its pod"
    again = cluster.scale("fleet", 6)
    assert {p.name for p in again} == {p.name for p in pods} and len({p.ip for p in again}) == 6
    cluster.scale("fleet", 0)
    assert veths() == before


def test_a_node_shell_holds_its_terminal_and_none_of_the_runtimes_descriptors(cluster):
    """Node shells start by ``mnexec -d`` with Popen closing the runtime's descriptors (not
    ``mnexec -c``, which closes the 20,000 the limit allows one by one): the shell holds its
    terminal (0, 1, 2, and bash's own copy), no socket or file of the runtime."""
    shell = cluster.nodes["node1"].shell
    fds = {int(fd) for fd in os.listdir(f"/proc/{shell.pid}/fd")}
    assert fds - {255} == {0, 1, 2}, fds
    cmdline = open(f"/proc/{shell.pid}/cmdline", "rb").read().split(b"\0")
    assert b"mininet:node1" in cmdline
