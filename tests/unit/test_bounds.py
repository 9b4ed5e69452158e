"""Bounds on what a cluster file can ask, checked when it loads (before anything exists), and
sandboxes created in bounded batches when a cluster starts.

Runs without root: cluster files under tmp_path; the start test replaces every step that
would touch the machine.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from k8snetlab import checks, spec
from k8snetlab.errors import SpecError

from cli_harness import cli, one_error_line


def cluster(replicas: Any = 3, nodes: int = 3, mask: int = 24, **pod_spec: Any) -> dict[str, Any]:
    return {"name": "bounds",
            "underlay": {"subnets": [{"name": "lan", "cidr": "192.168.1.0/24"}]},
            "nodes": [{"name": f"node{i}", "ip": f"192.168.1.{10 + i}", "labels": {"rack": "a" if i == 1 else "b"}}
                      for i in range(1, nodes + 1)],
            "network": {"clusterCIDR": "10.244.0.0/16", "nodeCIDRMaskSize": mask},
            "cni": {"type": "host-gw"},
            "workloads": [{"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
                           "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": "web"}},
                                    "template": {"metadata": {"labels": {"app": "web"}},
                                                 "spec": {"containers": [{"name": "c", "command": ["sleep", "9"]}],
                                                          **pod_spec}}}}]}


def write(tmp_path: Path, data: dict[str, Any]) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("replicas", [1_000_000, 10**12])
def test_huge_replicas_are_refused_at_once(tmp_path, replicas):
    path = write(tmp_path, cluster(replicas))
    t0 = time.monotonic()
    with pytest.raises(SpecError, match=r"replicas .* exceeds the cap of 5000 pods per cluster.*K8SNETLAB_MAX_PODS"):
        spec.load(path)
    assert time.monotonic() - t0 < 5        # no pod list was built (1e12 ran out of memory once)


def test_huge_replicas_on_the_command_line_one_line_exit_2(tmp_path):
    line = one_error_line(cli("up", str(write(tmp_path, cluster(1_000_000)))))
    assert "cap of 5000 pods" in line


def test_total_over_the_cap_across_workloads(tmp_path):
    data = cluster(3000, nodes=20)
    second = yaml.safe_load(yaml.safe_dump(data["workloads"][0]))
    second["metadata"]["name"] = "api"
    data["workloads"].append(second)
    with pytest.raises(SpecError, match="ask for 6000 pods; the cap is 5000"):
        spec.load(write(tmp_path, data))


def test_the_scale_target_loads(tmp_path):
    """2,000 pods on 10 nodes with /24 pod CIDRs (253 each) is within every bound."""
    s = spec.load(write(tmp_path, cluster(2000, nodes=10)))
    assert len(s.pods()) == 2000


def test_cap_is_configurable(tmp_path, monkeypatch):
    monkeypatch.setenv("K8SNETLAB_MAX_PODS", "10")
    with pytest.raises(SpecError, match="cap of 10 pods"):
        spec.load(write(tmp_path, cluster(11)))
    monkeypatch.setenv("K8SNETLAB_MAX_PODS", "many")
    with pytest.raises(SpecError, match="K8SNETLAB_MAX_PODS='many': must be a whole number"):
        spec.load(write(tmp_path, cluster(1)))


def test_pods_per_node_by_pod_cidr(tmp_path):
    # /28 pod CIDRs hold 13 pods each: 3 nodes hold 39
    spec.load(write(tmp_path, cluster(39, mask=28)))
    with pytest.raises(SpecError, match="ask for 40 pods but the nodes' pod CIDRs hold 39"):
        spec.load(write(tmp_path, cluster(40, mask=28)))
    with pytest.raises(SpecError, match="300 pods go to nodeName node1, whose pod CIDRs hold 253"):
        spec.load(write(tmp_path, cluster(300, nodeName="node1")))
    with pytest.raises(SpecError, match=r"14 pods go to nodeSelector \{'rack': 'a'\}, whose pod CIDRs hold 13"):
        spec.load(write(tmp_path, cluster(14, mask=28, nodeSelector={"rack": "a"})))
    assert checks.node_pod_capacity(spec.load(write(tmp_path, cluster(1))).nodes[0]) == 253


def test_node_count_is_bounded(tmp_path):
    data = cluster(1)
    data["underlay"]["subnets"][0]["cidr"] = "172.20.0.0/16"
    data["network"] = {"clusterCIDR": "10.0.0.0/8", "nodeCIDRMaskSize": 24, "serviceCIDR": "172.31.0.0/16"}
    data["nodes"] = [{"name": f"n{i}", "ip": f"172.20.{i // 250}.{i % 250 + 1}"} for i in range(checks.MAX_NODES + 1)]
    with pytest.raises(SpecError, match=f"{checks.MAX_NODES + 1} nodes; the testbed builds at most {checks.MAX_NODES}"):
        spec.load(write(tmp_path, data))


def test_sandboxes_are_created_in_bounded_batches(tmp_path, monkeypatch):
    """Cluster.start wires pods a batch at a time: never more sandboxes (one shell each) than
    POD_BATCH exist before their CNI ADD."""
    from k8snetlab import cluster as cluster_mod, proc, statedir
    s = spec.load(write(tmp_path, cluster(300)))
    batches: list[int] = []
    monkeypatch.setattr(proc, "require_root", lambda *a, **k: None)
    monkeypatch.setattr(proc, "require", lambda *a, **k: None)
    monkeypatch.setenv("K8SNETLAB_STATE", str(tmp_path / "state"))
    monkeypatch.setattr(statedir, "ROOTS_FILE", tmp_path / "roots")
    monkeypatch.setattr(statedir.naming, "STATE_ROOT", str(tmp_path / "default-root"))
    for step in ("_state_in_memory", "_write_cni_bin", "_start_node_agents", "_start_agent_resync",
                 "_start_supervisor"):
        monkeypatch.setattr(cluster_mod.Cluster, step, lambda self: None)

    class NoUnderlay:
        nodes: dict = {}
        routers: dict = {}
        hosts: dict = {}

        def __init__(self, *a: Any) -> None: ...
        def build(self, timings: Any) -> None: ...
    monkeypatch.setattr(cluster_mod, "Underlay", NoUnderlay)
    monkeypatch.setattr(cluster_mod.Cluster, "_add_pods", lambda self, pods: batches.append(len(pods)) or [])
    monkeypatch.setattr(cluster_mod.Cluster, "stop", lambda self: None)
    c = cluster_mod.Cluster(s)
    c.start()
    assert sum(batches) == 300 and max(batches) <= checks.POD_BATCH and len(batches) >= 3, batches
