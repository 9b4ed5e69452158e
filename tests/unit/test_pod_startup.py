"""Pod startup as the kubelet does it, without root: each pod is observed ready on its own (not
when the last pod of its slow-start batch is), pods of one node start side by side, readiness
waits for declared TCP ports, and a pod's startup latency splits into its phases."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from k8snetlab import cluster as cluster_mod, kubelet as kubelet_mod, proc, spec
from k8snetlab.errors import K8sNetLabError
from k8snetlab.manifests import ContainerPort, ContainerSpec, PodSpec
from k8snetlab.pod import Pod


def small_cluster(nodes: int = 1) -> cluster_mod.Cluster:
    s = spec.from_dict({"name": "startup", "underlay": {"subnets": [{"name": "lan", "cidr": "192.168.0.0/24"}]},
                        "nodes": [{"name": f"node{i + 1}", "ip": f"192.168.0.{10 + i}"} for i in range(nodes)],
                        "network": {"clusterCIDR": "10.244.0.0/16", "nodeCIDRMaskSize": 24},
                        "cni": {"type": "host-gw"}}, "<test>")
    c = cluster_mod.Cluster(s)
    c.underlay = SimpleNamespace(adopt=lambda pod: None, forget=lambda pod: None)
    return c


def fake_pod(name: str, containers: list[ContainerSpec] | None = None) -> Pod:
    """A Pod object with no sandbox behind it (nothing is started)."""
    pod = Pod.__new__(Pod)
    pod.name = name
    pod.spec = PodSpec(name, containers=tuple(containers or ()))
    pod.containers, pod.marks = {}, {}
    pod.created_at = pod.ready_at = 0.0
    pod.node_name = None
    return pod


class Running:
    """A container process that runs (``poll()`` None) until told it exited."""

    def __init__(self, pid: int = 4242):
        self.pid, self.returncode = pid, None

    def poll(self):
        return self.returncode


def kubelet(tmp_path: Path, name: str = "node1") -> kubelet_mod.Kubelet:
    node = SimpleNamespace(name=name)
    return kubelet_mod.Kubelet(node, mode=None, invoke="exec", log_dir=tmp_path,
                               record=lambda *a: None, record_netns=lambda *a: None)


def test_a_pod_is_ready_when_its_own_containers_run_not_when_its_batch_is_done(tmp_path, monkeypatch):
    """Two pods of one batch on one node: the slow one finishes its start only after the fast
    one was observed ready. Readiness taken after the whole batch would never let it finish."""
    c = small_cluster()
    k = kubelet(tmp_path)
    c.kubelets = {"node1": k}
    c.scheduler.add_node("node1")
    pods: dict[str, Pod] = {}

    def run_pod(ps: PodSpec, created_at: float | None = None) -> Pod:
        pod = pods[ps.name] = fake_pod(ps.host_name)
        pod.created_at = created_at
        if ps.name == "slow":
            deadline = time.monotonic() + 10
            while not pods.get("fast") or not pods["fast"].ready_at:
                if time.monotonic() > deadline:
                    raise K8sNetLabError("the fast pod was not observed ready before the slow one started")
                time.sleep(0.005)
        return pod

    monkeypatch.setattr(k, "run_pod", run_pod)
    started = c._add_pods([PodSpec("slow"), PodSpec("fast")])
    assert {p.name for p in started} == {"slow", "fast"}
    assert pods["slow"].created_at == pods["fast"].created_at          # one request, one batch
    assert pods["fast"].created_at <= pods["fast"].ready_at < pods["slow"].ready_at


def test_pods_of_one_node_start_side_by_side(tmp_path, monkeypatch):
    """No per-node serialisation: three pods on one node are all inside their start at once
    (a barrier of three, which pods started one after another never pass)."""
    c = small_cluster()
    k = kubelet(tmp_path)
    c.kubelets = {"node1": k}
    c.scheduler.add_node("node1")
    together = threading.Barrier(3, timeout=10)

    def start_pod(ps: PodSpec, created_at: float, timeout: float) -> Pod:
        together.wait()
        pod = fake_pod(ps.host_name)
        pod.node_name, pod.created_at, pod.ready_at = "node1", created_at, time.monotonic()
        return pod

    monkeypatch.setattr(k, "start_pod", start_pod)
    assert len(c._add_pods([PodSpec(f"p{i}") for i in range(3)])) == 3


def test_a_failed_pod_takes_its_batch_back_and_says_why(tmp_path, monkeypatch):
    c = small_cluster()
    k = kubelet(tmp_path)
    c.kubelets = {"node1": k}
    c.scheduler.add_node("node1")

    def start_pod(ps: PodSpec, created_at: float, timeout: float) -> Pod:
        raise K8sNetLabError(f"CNI ADD of pod {ps.name} failed: no address")

    monkeypatch.setattr(k, "start_pod", start_pod)
    with pytest.raises(K8sNetLabError, match="CNI ADD of pod p0 failed"):
        c._add_pods([PodSpec("p0")])
    assert not c.pods and c.scheduler.node_of("p0") is None and c.scheduler.load("node1") == 0


def test_readiness_waits_for_every_declared_tcp_port(tmp_path, monkeypatch):
    k = kubelet(tmp_path)
    web = ContainerSpec("web", command=("server",), ports=(ContainerPort(8080),))
    pod = fake_pod("web-0", [web])
    pod.containers["web"] = SimpleNamespace(pid=4242, process=Running(), running=lambda: True,
                                            log_path=tmp_path / "log")
    answers = iter([False, False, False, True])
    asked = []
    monkeypatch.setattr(proc, "listening", lambda pid, port: asked.append((pid, port)) or next(answers))
    k.wait_ready([pod], time.monotonic() + 10)
    assert asked == [(4242, 8080)] * 4 and pod.ready_at > 0 and pod.marks["ready"] == pod.ready_at


def test_a_container_without_ports_is_ready_once_started(tmp_path, monkeypatch):
    k = kubelet(tmp_path)
    pod = fake_pod("sleep-0", [ContainerSpec("sleep", command=("sleep", "3600"))])
    pod.containers["sleep"] = SimpleNamespace(pid=4243, process=Running(), running=lambda: True,
                                              log_path=tmp_path / "log")
    monkeypatch.setattr(proc, "listening", lambda pid, port: pytest.fail("no port to probe"))
    k.wait_ready([pod], time.monotonic() + 10)
    assert pod.ready_at > 0


def test_a_container_that_exits_before_listening_fails_readiness(tmp_path, monkeypatch):
    k = kubelet(tmp_path)
    pod = fake_pod("web-0", [ContainerSpec("web", command=("server",), ports=(ContainerPort(8080),))])
    gone = Running()
    gone.returncode = 3
    pod.containers["web"] = SimpleNamespace(pid=4244, process=gone, running=lambda: False,
                                            log_path=tmp_path / "web.log")
    monkeypatch.setattr(proc, "listening", lambda pid, port: False)
    with pytest.raises(K8sNetLabError, match="exited .status 3"):
        k.wait_ready([pod], time.monotonic() + 10)
    assert pod.ready_at == 0


def test_startup_latency_splits_into_its_phases():
    pod = fake_pod("p")
    pod.marks = {"created": 10.0, "picked": 10.5, "sandbox": 10.6, "cni": 10.9, "containers": 11.0, "ready": 11.25}
    got = pod.phase_seconds()
    assert list(got) == ["queued", "sandbox", "cni", "containers", "readiness"]
    assert got == pytest.approx({"queued": 0.5, "sandbox": 0.1, "cni": 0.3, "containers": 0.1, "readiness": 0.25})
    assert sum(got.values()) == pytest.approx(11.25 - 10.0)
