"""Cluster files -> ClusterSpec: the sample loads as documented, and every mistake a user
can make stops at load time with a SpecError naming the key and the problem.

Runs without root: only YAML files under tmp_path are written, nothing is built.
"""

from __future__ import annotations

import dataclasses
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from k8snetlab import spec
from k8snetlab.errors import K8sNetLabError, SpecError
from k8snetlab.modes import MODES

REPO = Path(__file__).resolve().parents[2]
THREE_NODES = REPO / "topologies" / "three_nodes.yaml"

N = IPv4Network
A = IPv4Address


def container(name: str = "c") -> dict[str, Any]:
    return {"name": name, "image": "busybox", "command": ["sleep", "infinity"]}


def deployment(name: str = "web", replicas: int = 3, kind: str = "Deployment",
               **pod_spec: Any) -> dict[str, Any]:
    selector = {"matchLabels": {"app": name}} if kind == "Deployment" else {"app": name}
    return {"apiVersion": "apps/v1" if kind == "Deployment" else "v1", "kind": kind,
            "metadata": {"name": name},
            "spec": {"replicas": replicas, "selector": selector,
                     "template": {"metadata": {"labels": {"app": name}},
                                  "spec": {"containers": [container()], **pod_spec}}}}


def cluster(**top: Any) -> dict[str, Any]:
    """A small valid cluster: three nodes on one /24, the Kubernetes default ranges."""
    d: dict[str, Any] = {
        "name": "lab",
        "underlay": {"subnets": [{"name": "lan", "cidr": "192.168.1.0/24"}]},
        "nodes": [{"name": "node1", "ip": "192.168.1.129"},
                  {"name": "node2", "ip": "192.168.1.130"},
                  {"name": "node3", "ip": "192.168.1.131"}],
        "network": {"clusterCIDR": "10.244.0.0/16", "nodeCIDRMaskSize": 24,
                    "serviceCIDR": "10.96.0.0/12"},
        "cni": {"type": "host-gw", "ipip": {"datapath": "auto", "ipipMode": "Always"}},
        "workloads": [deployment()],
    }
    d.update(top)
    return d


def two_subnets(d: dict[str, Any]) -> None:
    """Move node3 onto a second subnet, behind a router."""
    d["underlay"]["subnets"] = [{"name": "lan", "cidr": "192.168.1.0/24", "gateway": "192.168.1.1"},
                                {"name": "lan2", "cidr": "192.168.2.0/24", "gateway": "192.168.2.1"}]
    d["underlay"]["routers"] = [{"name": "r1", "interfaces": [{"subnet": "lan", "ip": "192.168.1.1"},
                                                             {"subnet": "lan2", "ip": "192.168.2.1"}]}]
    d["nodes"][2]["ip"] = "192.168.2.10"


@pytest.fixture
def write(tmp_path: Path) -> Callable[[Any], Path]:
    """Write a dict (as YAML) or a raw string into tmp_path/cluster.yaml; return the path."""
    def _write(data: Any, name: str = "cluster.yaml") -> Path:
        path = tmp_path / name
        path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
        return path
    return _write


def load_error(path: Path, cni: str | None = None) -> str:
    with pytest.raises(SpecError) as ei:
        spec.load(path, cni=cni)
    msg = str(ei.value)
    assert "\n" not in msg, "a spec error is one line"
    return msg


# ------------------------------------------------------------------------ the sample file

@pytest.fixture(scope="module")
def three() -> spec.ClusterSpec:
    return spec.load(THREE_NODES)


def test_three_nodes_nodes_and_addresses(three):
    assert three.name == "three-nodes"
    assert [n.name for n in three.nodes] == ["node1", "node2", "node3"]
    assert [n.ip for n in three.nodes] == [A("192.168.1.129"), A("192.168.1.130"), A("192.168.1.131")]
    assert {n.subnet for n in three.nodes} == {"lan"}
    assert [n.pod_cidr for n in three.nodes] == [N("10.244.0.0/24"), N("10.244.1.0/24"), N("10.244.2.0/24")]


def test_three_nodes_network(three):
    assert three.network.cluster_cidr == N("10.244.0.0/16")
    assert three.network.node_mask == 24
    assert three.network.service_cidr == N("10.96.0.0/12")
    assert three.underlay.subnets == (spec.SubnetSpec("lan", N("192.168.1.0/24")),)


def test_three_nodes_cni_is_host_gw(three):
    assert three.cni.type == "host-gw"
    assert three.cni.reference is False
    assert three.cni.invoke == "exec"


def test_three_nodes_pods(three):
    pods = three.pods()
    assert [p.name for p in pods] == [f"web-{i}" for i in range(6)]
    assert all(p.labels == {"app": "web"} for p in pods)
    assert all(p.owner == "Deployment/web" for p in pods)
    assert pods[0].containers[0].argv == ["python3", "-m", "http.server", "8080", "--bind", "0.0.0.0"]
    assert pods[0].containers[0].ports[0].container_port == 8080


def test_node_lookup(three):
    assert three.node("node2").ip == A("192.168.1.130")
    with pytest.raises(SpecError, match="node9.*node1, node2, node3"):
        three.node("node9")


def test_spec_is_immutable(three):
    with pytest.raises(dataclasses.FrozenInstanceError):
        three.name = "other"  # type: ignore[misc]


# ------------------------------------------------------------------------ CNI override

def test_cni_override_gives_ipip_options_from_its_section(write):
    d = cluster()
    d["cni"]["ipip"] = {"datapath": "ebpf", "ipipMode": "CrossSubnet", "mtu": 1400}
    s = spec.load(write(d), cni="ipip")
    assert s.cni.type == "ipip"
    opts = s.cni.options
    assert (opts.datapath, opts.ipip_mode, opts.mtu) == ("ebpf", "CrossSubnet", 1400)


def test_cni_override_on_the_sample():
    s = spec.load(THREE_NODES, cni="ipip")
    assert s.cni.type == "ipip"
    assert (s.cni.options.datapath, s.cni.options.ipip_mode, s.cni.options.mtu) == ("auto", "Always", 1480)
    # everything else is the same cluster
    base = spec.load(THREE_NODES)
    assert s.nodes == base.nodes and s.network == base.network and s.pods() == base.pods()


def test_cni_override_without_a_section_uses_defaults(write):
    d = cluster(cni={"type": "bridge"})
    s = spec.load(write(d), cni="ipip")
    assert (s.cni.options.datapath, s.cni.options.ipip_mode, s.cni.options.mtu) == ("auto", "Always", 1480)


def test_with_cni_does_not_mutate_the_original(three):
    s = spec.with_cni(three, "ipip")
    assert s.cni.type == "ipip" and three.cni.type == "host-gw"


def test_with_cni_overrides_a_section(three):
    s = spec.with_cni(three, "ipip", ipip={"datapath": "kernel", "ipipMode": "CrossSubnet"})
    assert (s.cni.options.datapath, s.cni.options.ipip_mode) == ("kernel", "CrossSubnet")


def test_cni_override_unknown_type_lists_valid_types():
    with pytest.raises(SpecError) as ei:
        spec.load(THREE_NODES, cni="bogus")
    msg = str(ei.value)
    assert "bogus" in msg
    for name in MODES.names():
        assert name in msg


def test_cni_override_validates_the_mode(write):
    d = cluster(cni={"type": "ipip"})
    two_subnets(d)
    path = write(d)
    assert spec.load(path).cni.type == "ipip"   # ipip crosses subnets
    msg = load_error(path, cni="host-gw")       # host-gw does not
    assert "host-gw" in msg and "node1" in msg and "node3" in msg


# ------------------------------------------------------------------------ pod CIDRs

def test_explicit_pod_cidr_is_honoured_and_auto_ones_skip_it(write):
    d = cluster()
    d["nodes"][1]["podCIDR"] = "10.244.0.0/24"
    s = spec.load(write(d))
    assert [n.pod_cidr for n in s.nodes] == [N("10.244.1.0/24"), N("10.244.0.0/24"), N("10.244.2.0/24")]


def test_explicit_smaller_pod_cidr_blocks_the_overlapping_auto_block(write):
    d = cluster()
    d["nodes"][2]["podCIDR"] = "10.244.1.0/25"
    s = spec.load(write(d))
    assert [n.pod_cidr for n in s.nodes] == [N("10.244.0.0/24"), N("10.244.2.0/24"), N("10.244.1.0/25")]


def test_defaults_follow_kubernetes(write):
    d = cluster()
    del d["network"], d["cni"]
    s = spec.load(write(d))
    assert s.network.cluster_cidr == N(spec.DEFAULT_CLUSTER_CIDR) == N("10.244.0.0/16")
    assert s.network.service_cidr == N(spec.DEFAULT_SERVICE_CIDR) == N("10.96.0.0/12")
    assert s.network.node_mask == 24
    assert s.cni.type == "bridge"


def test_node_mask_size_is_used(write):
    d = cluster()
    d["network"]["nodeCIDRMaskSize"] = 26
    s = spec.load(write(d))
    assert [n.pod_cidr for n in s.nodes] == [N("10.244.0.0/26"), N("10.244.0.64/26"), N("10.244.0.128/26")]


def test_node_labels_and_selector(write):
    d = cluster()
    d["nodes"][1]["labels"] = {"zone": "b"}
    d["workloads"] = [deployment(replicas=2, nodeSelector={"zone": "b"}),
                      deployment("pinned", replicas=1, nodeName="node3")]
    s = spec.load(write(d))
    assert s.node("node2").labels == {"zone": "b", "kubernetes.io/hostname": "node2"}
    pods = {p.name: p for p in s.pods()}
    assert pods["web-1"].node_selector == {"zone": "b"}
    assert pods["pinned-0"].node_name == "node3"


def test_cni_may_be_a_bare_type_name(write):
    s = spec.load(write(cluster(cni="ipip")))
    assert s.cni.type == "ipip" and s.cni.options.mtu == 1480


def test_reference_with_bridge_is_accepted(write):
    s = spec.load(write(cluster(cni={"type": "bridge", "reference": True})))
    assert s.cni.reference is True


def test_workload_from_file(write, tmp_path):
    (tmp_path / "apps.yaml").write_text(yaml.safe_dump_all([deployment("a", 1), deployment("b", 2)]))
    s = spec.load(write(cluster(workloads=[{"file": "apps.yaml"}])))
    assert [p.name for p in s.pods()] == ["a-0", "b-0", "b-1"]


# ------------------------------------------------------------------------ bad input

def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """A mutation setting d[k1][k2]... (integers index lists)."""
    def mutate(d: dict[str, Any]) -> None:
        keys = [int(k) if k.isdigit() else k for k in path.split(".")]
        target = d
        for k in keys[:-1]:
            target = target[k]
        target[keys[-1]] = value
    return mutate


def _dup_pods(d: dict[str, Any]) -> None:
    d["workloads"] = [deployment("web", 2), deployment("web", 1, kind="ReplicationController")]


def _underlay_in_cluster_cidr(d: dict[str, Any]) -> None:
    d["underlay"]["subnets"][0]["cidr"] = "10.244.200.0/24"
    for i, n in enumerate(d["nodes"]):
        n["ip"] = f"10.244.200.{10 + i}"


def _many(*fns: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    def mutate(d: dict[str, Any]) -> None:
        for f in fns:
            f(d)
    return mutate


# (id, mutation, substrings the message must contain: key(s) and problem)
BAD = [
    ("unknown-top-key", _set("bogus", 1), ["'bogus'", "unknown key", "valid keys", "nodes", "network"]),
    ("unknown-ipip-option", _set("cni.ipip.foo", 1), ["cni.ipip", "'foo'", "unknown option", "ipipMode"]),
    ("bad-ipipMode", _set("cni.ipip.ipipMode", "Never"), ["cni.ipip.ipipMode", "'Never'", "Always", "CrossSubnet"]),
    ("bad-datapath", _set("cni.ipip.datapath", "dpdk"), ["cni.ipip.datapath", "'dpdk'", "kernel", "ebpf"]),
    ("ipip-mtu-range", _set("cni.ipip.mtu", 100), ["cni.ipip.mtu", "100", "576"]),
    ("ipip-mtu-type", _set("cni.ipip.mtu", "1480"), ["cni.ipip.mtu", "int"]),
    ("unknown-cni-key", _set("cni.weave", {}), ["cni", "'weave'", "unknown key"]),
    ("bad-invoke", _set("cni.invoke", "fork"), ["cni.invoke", "'fork'", "exec", "inprocess"]),
    ("service-overlaps-cluster", _set("network.serviceCIDR", "10.244.128.0/20"),
     ["network.clusterCIDR", "network.serviceCIDR", "overlaps", "10.244.128.0/20"]),
    ("cluster-overlaps-service", _set("network.clusterCIDR", "10.96.0.0/16"),
     ["network.clusterCIDR", "network.serviceCIDR", "overlaps"]),
    ("malformed-cluster-cidr", _set("network.clusterCIDR", "10.244.0.0/33"),
     ["network.clusterCIDR", "10.244.0.0/33", "not a valid IPv4 CIDR"]),
    ("cluster-cidr-host-bits", _set("network.clusterCIDR", "10.244.1.0/16"),
     ["network.clusterCIDR", "10.244.1.0/16", "host bits"]),
    ("malformed-service-cidr", _set("network.serviceCIDR", "ten.96/12"),
     ["network.serviceCIDR", "ten.96/12", "not a valid IPv4 CIDR"]),
    ("malformed-subnet-cidr", _set("underlay.subnets.0.cidr", "192.168.1.0/24x"),
     ["underlay.subnets[0].cidr", "not a valid IPv4 CIDR"]),
    ("malformed-node-podCIDR", _set("nodes.0.podCIDR", "10.244.5.1/24"),
     ["nodes[0].podCIDR", "10.244.5.1/24", "not a valid IPv4 CIDR"]),
    ("node-mask-too-small", _set("network.nodeCIDRMaskSize", 8), ["network.nodeCIDRMaskSize", "8"]),
    ("cluster-cidr-too-small", _set("network.clusterCIDR", "10.244.0.0/23"),
     ["network.clusterCIDR", "no room", "node3"]),
    ("podCIDR-outside-cluster", _set("nodes.0.podCIDR", "10.245.0.0/24"),
     ["nodes[0].podCIDR", "10.245.0.0/24", "outside", "clusterCIDR"]),
    ("podCIDRs-overlap", _many(_set("nodes.0.podCIDR", "10.244.5.0/24"), _set("nodes.1.podCIDR", "10.244.5.0/25")),
     ["podCIDR", "node1", "node2", "overlaps"]),
    ("podCIDRs-equal", _many(_set("nodes.0.podCIDR", "10.244.5.0/24"), _set("nodes.2.podCIDR", "10.244.5.0/24")),
     ["podCIDR", "node1", "node3", "overlaps"]),
    ("duplicate-node-name", _set("nodes.1.name", "node1"), ["nodes[1].name", "duplicate", "'node1'"]),
    ("duplicate-node-ip", _set("nodes.2.ip", "192.168.1.129"), ["nodes[2].ip", "192.168.1.129", "another node"]),
    ("node-ip-outside-subnets", _set("nodes.1.ip", "192.168.2.5"),
     ["nodes[1].ip", "192.168.2.5", "none of the underlay subnets", "192.168.1.0/24"]),
    ("node-ip-network-address", _set("nodes.0.ip", "192.168.1.0"), ["nodes[0].ip", "192.168.1.0", "host address"]),
    ("node-ip-malformed", _set("nodes.0.ip", "192.168.1.300"), ["nodes[0].ip", "192.168.1.300", "not a valid"]),
    ("node-unknown-subnet", _set("nodes.0.subnet", "dmz"), ["nodes[0].subnet", "'dmz'"]),
    ("node-unknown-key", _set("nodes.0.role", "master"), ["nodes[0]", "'role'", "unknown key"]),
    ("node-bad-name", _set("nodes.0.name", "Node_1"), ["nodes[0].name", "'Node_1'", "not a valid name"]),
    ("no-nodes", _set("nodes", []), ["nodes", "non-empty list"]),
    ("nodeName-not-a-node", _set("workloads", [deployment(nodeName="node9")]),
     ["nodeName", "'node9'", "not a node", "node1"]),
    ("nodeSelector-matches-no-node", _set("workloads", [deployment(nodeSelector={"zone": "x"})]),
     ["nodeSelector", "zone", "no node matches"]),
    ("pod-name-is-node-name", _set("workloads", [{"kind": "Pod", "metadata": {"name": "node1"},
                                                  "spec": {"containers": [container()]}}]),
     ["pod name", "'node1'", "node name"]),
    ("host-gw-two-subnets", two_subnets, ["host-gw", "node1", "node3", "lan", "lan2", "ipip"]),
    ("reference-with-ipip", _set("cni", {"type": "ipip", "reference": True}),
     ["cni.reference", "bridge", "ipip"]),
    ("reference-not-bool", _set("cni", {"type": "bridge", "reference": "yes"}), ["cni.reference", "true or false"]),
    ("underlay-overlaps-cluster-cidr", _underlay_in_cluster_cidr,
     ["underlay subnet lan", "10.244.200.0/24", "network.clusterCIDR", "overlaps"]),
    ("underlay-overlaps-service-cidr", _set("network.serviceCIDR", "192.168.0.0/16"),
     ["underlay subnet lan", "network.serviceCIDR", "192.168.0.0/16", "overlaps"]),
    ("cluster-cidr-contains-underlay", _set("network.clusterCIDR", "192.168.0.0/16"),
     ["underlay subnet lan", "network.clusterCIDR", "192.168.0.0/16", "overlaps"]),
    ("underlay-subnets-overlap", _set("underlay.subnets", [{"name": "a", "cidr": "192.168.0.0/16"},
                                                           {"name": "b", "cidr": "192.168.1.0/24"}]),
     ["underlay subnets", "overlap"]),
    ("workload-bad-kind", _set("workloads", [{"kind": "ConfigMap", "metadata": {"name": "x"}}]),
     ["workloads[0].kind", "'ConfigMap'", "Deployment"]),
    ("workload-file-missing", _set("workloads", [{"file": "nope.yaml"}]), ["workloads[0].file", "nope.yaml"]),
    ("kind-not-cluster", _set("kind", "Pod"), ["kind", "Cluster"]),
]


@pytest.mark.parametrize("mutate, expected", [pytest.param(m, e, id=i) for i, m, e in BAD])
def test_bad_input_is_a_spec_error_naming_key_and_problem(write, mutate, expected):
    d = cluster()
    mutate(d)
    msg = load_error(write(d))
    for part in expected:
        assert part in msg, f"{part!r} not in {msg!r}"


@pytest.mark.parametrize("mutate", [pytest.param(m, id=i) for i, m, _ in BAD])
def test_bad_input_error_names_the_file(write, mutate):
    d = cluster()
    mutate(d)
    path = write(d)
    assert str(path) in load_error(path)


def test_unknown_cni_type_lists_valid_types(write):
    msg = load_error(write(cluster(cni={"type": "calico-ebpf"})))
    assert "'calico-ebpf'" in msg
    assert all(name in msg for name in ("bridge", "host-gw", "ipip"))


def test_unknown_cni_type_names_file_and_key(write):
    path = write(cluster(cni={"type": "calico-ebpf"}))
    msg = load_error(path)
    assert str(path) in msg and "cni.type" in msg


def test_duplicate_pod_names_across_workloads(write):
    d = cluster()
    _dup_pods(d)
    msg = load_error(write(d))
    assert "duplicate pod name 'web-0'" in msg
    assert "Deployment/web" in msg and "ReplicationController/web" in msg


def test_duplicate_pod_names_error_names_the_file(write):
    d = cluster()
    _dup_pods(d)
    path = write(d)
    msg = load_error(path)
    assert str(path) in msg and "workloads" in msg


def test_subnets_without_a_router_are_refused(write):
    d = cluster(cni={"type": "ipip"})
    d["underlay"]["subnets"].append({"name": "lan2", "cidr": "192.168.2.0/24"})
    d["nodes"][2]["ip"] = "192.168.2.10"
    assert "gateway" in load_error(write(d))


def test_gateway_that_no_router_holds_is_refused(write):
    d = cluster(cni={"type": "ipip"})
    two_subnets(d)
    d["underlay"]["routers"][0]["interfaces"][1]["ip"] = "192.168.2.254"   # lan2's gateway is .1
    msg = load_error(write(d))
    assert "lan2" in msg and "gateway" in msg and "routers" in msg


# ------------------------------------------------------------------------ files

@pytest.mark.parametrize("text, line", [
    ("name: x\nnodes: [a, b\n", 3),
    ("name: x\n  bad: indent\n", 2),
    ("a: b: c\n", 1),
    ("name: x\nnetwork:\n  clusterCIDR: '10.244.0.0/16\n", 4),
])
def test_malformed_yaml_names_the_line(write, text, line):
    path = write(text)
    msg = load_error(path)
    assert str(path) in msg
    assert "not valid YAML" in msg
    assert f"line {line}" in msg


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    msg = load_error(path)
    assert str(path) in msg and "cannot read" in msg


@pytest.mark.parametrize("text", ["", "- a\n- b\n", "just a string\n"])
def test_not_a_mapping(write, text):
    msg = load_error(write(text))
    assert "mapping" in msg


def test_spec_error_is_a_k8snetlab_error():
    assert issubclass(SpecError, K8sNetLabError)

