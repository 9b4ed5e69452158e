"""Kubernetes manifests (Pod, Deployment, ReplicationController) -> Workload -> PodSpecs.

Replicas are named ``<name>-<i>``; labels, selectors, containers (command + args) and ports
are read in Kubernetes' own schema; every mistake is a SpecError naming the key.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from k8snetlab import manifests
from k8snetlab.errors import SpecError
from k8snetlab.manifests import ContainerPort, parse_workload

W = "apps.yaml[0]"


def pod(name: str = "client", **spec: Any) -> dict[str, Any]:
    spec.setdefault("containers", [{"name": "main", "image": "busybox",
                                    "command": ["sleep"], "args": ["infinity"]}])
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": {"role": "client"}}, "spec": spec}


def deployment(name: str = "web", replicas: Any = 3, labels: dict[str, str] | None = None,
               selector: Any = None, **pod_spec: Any) -> dict[str, Any]:
    labels = {"app": name, "tier": "front"} if labels is None else labels
    pod_spec.setdefault("containers", [{
        "name": "web", "image": "python:3-slim",
        "command": ["python3", "-m", "http.server"], "args": ["8080", "--bind", "0.0.0.0"],
        "ports": [{"name": "http", "containerPort": 8080}, {"containerPort": 53, "protocol": "UDP"}]}])
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
            "spec": {"replicas": replicas,
                     "selector": {"matchLabels": {"app": name}} if selector is None else selector,
                     "template": {"metadata": {"labels": labels}, "spec": pod_spec}}}


def rc(name: str = "echo", replicas: int = 2, selector: Any = None) -> dict[str, Any]:
    d = deployment(name, replicas)
    d["apiVersion"], d["kind"] = "v1", "ReplicationController"
    d["spec"]["selector"] = {"app": name} if selector is None else selector
    return d


def error(doc: Any) -> str:
    with pytest.raises(SpecError) as ei:
        parse_workload(doc, W)
    msg = str(ei.value)
    assert msg.startswith(W), "the message names the document"
    return msg


# ------------------------------------------------------------------------ Pod

def test_pod():
    w = parse_workload(pod(nodeName="node2", nodeSelector={"zone": "b"}), W)
    assert (w.kind, w.name, w.namespace, w.replicas) == ("Pod", "client", "default", 1)
    [p] = w.pods()
    assert p.name == "client" and p.key == "default/client"
    assert p.labels == {"role": "client"}
    assert p.node_name == "node2" and p.node_selector == {"zone": "b"}
    assert p.owner is None
    [c] = p.containers
    assert (c.name, c.image, c.command, c.args) == ("main", "busybox", ("sleep",), ("infinity",))
    assert c.argv == ["sleep", "infinity"]


def test_pod_namespace_and_label_values_become_strings():
    d = pod()
    d["metadata"].update(namespace="lab", labels={"version": 2, "canary": True})
    [p] = parse_workload(d, W).pods()
    assert p.key == "lab/client"
    assert p.labels == {"version": "2", "canary": "True"}


def test_pod_command_and_args_numbers_become_strings():
    d = pod(containers=[{"name": "c", "command": ["sleep", 5], "args": [1.5]}])
    [p] = parse_workload(d, W).pods()
    assert p.containers[0].argv == ["sleep", "5", "1.5"]


def test_pod_without_command_keeps_empty_argv():
    [p] = parse_workload(pod(containers=[{"name": "c", "image": "nginx"}]), W).pods()
    assert p.containers[0].argv == []


# ------------------------------------------------------------------------ Deployment

def test_deployment_replicas_are_named_by_index():
    w = parse_workload(deployment(replicas=4), W)
    assert (w.kind, w.name, w.replicas) == ("Deployment", "web", 4)
    assert [p.name for p in w.pods()] == ["web-0", "web-1", "web-2", "web-3"]
    assert all(p.owner == "Deployment/web" for p in w.pods())


def test_deployment_pods_carry_template_labels_and_containers():
    w = parse_workload(deployment(), W)
    assert w.selector == {"app": "web"}
    for p in w.pods():
        assert p.labels == {"app": "web", "tier": "front"}
        [c] = p.containers
        assert c.command == ("python3", "-m", "http.server")
        assert c.args == ("8080", "--bind", "0.0.0.0")
        assert c.argv == ["python3", "-m", "http.server", "8080", "--bind", "0.0.0.0"]
        assert c.ports == (ContainerPort(8080, "http", "TCP"), ContainerPort(53, "", "UDP"))


def test_replica_pods_do_not_share_mutable_labels():
    a, b = parse_workload(deployment(replicas=2), W).pods()
    a.labels["x"] = "y"
    assert "x" not in b.labels


def test_pods_override_replicas():
    w = parse_workload(deployment(replicas=2), W)
    assert [p.name for p in w.pods(replicas=5)] == [f"web-{i}" for i in range(5)]


def test_deployment_zero_replicas():
    assert parse_workload(deployment(replicas=0), W).pods() == []


def test_deployment_default_one_replica():
    d = deployment()
    del d["spec"]["replicas"]
    assert [p.name for p in parse_workload(d, W).pods()] == ["web-0"]


def test_deployment_without_selector_selects_template_labels():
    d = deployment()
    del d["spec"]["selector"]
    assert parse_workload(d, W).selector == {"app": "web", "tier": "front"}


def test_selector_subset_of_template_labels_is_fine():
    w = parse_workload(deployment(selector={"matchLabels": {"tier": "front"}}), W)
    assert w.selector == {"tier": "front"}


@pytest.mark.parametrize("selector", [
    {"matchLabels": {"app": "other"}},
    {"matchLabels": {"app": "web", "extra": "x"}},
])
def test_deployment_selector_must_match_template_labels(selector):
    msg = error(deployment(selector=selector))
    assert f"{W}.spec.selector" in msg and "does not match" in msg


def test_deployment_selector_matching_no_labels():
    msg = error(deployment(labels={}))
    assert f"{W}.spec.selector" in msg


# ------------------------------------------------------------------------ ReplicationController

def test_replication_controller():
    w = parse_workload(rc(replicas=2), W)
    assert (w.kind, w.name, w.selector) == ("ReplicationController", "echo", {"app": "echo"})
    assert [p.name for p in w.pods()] == ["echo-0", "echo-1"]
    assert all(p.owner == "ReplicationController/echo" for p in w.pods())
    assert all(p.labels == {"app": "echo", "tier": "front"} for p in w.pods())


def test_replication_controller_selector_must_match():
    msg = error(rc(selector={"app": "web"}))
    assert f"{W}.spec.selector" in msg and "does not match" in msg


# ------------------------------------------------------------------------ expand

def test_expand_keeps_order_and_rejects_duplicates():
    ws = [parse_workload(deployment("a", 2), W), parse_workload(pod("b"), W)]
    assert [p.name for p in manifests.expand(ws)] == ["a-0", "a-1", "b"]
    clash = [parse_workload(deployment("web", 2), W), parse_workload(pod("web-1"), W)]
    with pytest.raises(SpecError, match="duplicate pod name 'web-1'"):
        manifests.expand(clash)


# ------------------------------------------------------------------------ bad manifests

@pytest.mark.parametrize("name", ["Web", "web_1", "-web", "web-", "we b", "", "a" * 64, 7, None])
def test_invalid_names(name):
    d = pod()
    d["metadata"]["name"] = name
    msg = error(d)
    assert f"{W}.metadata.name" in msg and "not a valid Kubernetes name" in msg


def test_longest_valid_name():
    assert parse_workload(pod("a" * 63), W).name == "a" * 63


def test_invalid_namespace():
    d = pod()
    d["metadata"]["namespace"] = "Kube_System"
    assert f"{W}.metadata.namespace" in error(d)


def test_invalid_container_name():
    msg = error(pod(containers=[{"name": "Main"}]))
    assert f"{W}.spec.containers[0].name" in msg


@pytest.mark.parametrize("containers", [[], None, "main", {"name": "main"}])
def test_pod_without_containers(containers):
    d = pod()
    d["spec"]["containers"] = containers
    msg = error(d)
    assert f"{W}.spec.containers" in msg and "at least one container" in msg


def test_pod_without_spec():
    d = pod()
    del d["spec"]
    assert "at least one container" in error(d)


def test_deployment_template_without_containers():
    d = deployment()
    d["spec"]["template"]["spec"] = {}
    msg = error(d)
    assert f"{W}.spec.template.spec.containers" in msg and "at least one container" in msg


@pytest.mark.parametrize("kind", ["Service", "StatefulSet", None, "pod"])
def test_unknown_kind(kind):
    d = pod()
    d["kind"] = kind
    msg = error(d)
    assert f"{W}.kind" in msg and "Pod, Deployment, ReplicationController" in msg


def test_duplicate_container_names():
    msg = error(pod(containers=[{"name": "c"}, {"name": "c"}]))
    assert f"{W}.spec.containers[1].name" in msg and "duplicate" in msg


@pytest.mark.parametrize("key, value", [("command", "sleep 1"), ("args", "x"), ("command", [["a"]]),
                                        ("args", {"a": 1})])
def test_command_and_args_must_be_lists_of_strings(key, value):
    msg = error(pod(containers=[{"name": "c", key: value}]))
    assert f"{W}.spec.containers[0].{key}" in msg and "list of strings" in msg


@pytest.mark.parametrize("port", [0, 65536, "80", None, -1])
def test_bad_container_port(port):
    msg = error(pod(containers=[{"name": "c", "ports": [{"containerPort": port}]}]))
    assert f"{W}.spec.containers[0].ports[0].containerPort" in msg and "1-65535" in msg


def test_bad_port_protocol():
    msg = error(pod(containers=[{"name": "c", "ports": [{"containerPort": 80, "protocol": "tcp"}]}]))
    assert f"{W}.spec.containers[0].ports[0].protocol" in msg and "TCP, UDP or SCTP" in msg


@pytest.mark.parametrize("replicas", [-1, "3", 1.5, None])
def test_bad_replicas(replicas):
    msg = error(deployment(replicas=replicas))
    assert f"{W}.spec.replicas" in msg and "whole number" in msg


def test_boolean_replicas_is_rejected():
    error(deployment(replicas=True))


def test_node_name_must_be_a_string():
    assert f"{W}.spec.nodeName" in error(pod(nodeName=3))


def test_labels_must_be_a_mapping_of_strings():
    d = pod()
    d["metadata"]["labels"] = {"a": ["b"]}
    assert f"{W}.metadata.labels" in error(d)
    d["metadata"]["labels"] = ["a"]
    assert f"{W}.metadata.labels" in error(d)


@pytest.mark.parametrize("doc", [None, [], "Pod"])
def test_manifest_must_be_a_mapping(doc):
    with pytest.raises(SpecError):
        parse_workload(doc, W)


def test_parsing_does_not_mutate_the_document():
    d = deployment()
    before = copy.deepcopy(d)
    parse_workload(d, W)
    assert d == before


def test_host_port_is_parsed_and_checked():
    from k8snetlab.manifests import parse_workload
    from k8snetlab.errors import SpecError
    doc = {"kind": "Pod", "metadata": {"name": "p"},
           "spec": {"containers": [{"name": "c", "ports": [{"containerPort": 80, "hostPort": 8080}]}]}}
    assert parse_workload(doc, "x").template.containers[0].ports[0].host_port == 8080
    doc["spec"]["containers"][0]["ports"][0]["hostPort"] = 70000
    with pytest.raises(SpecError, match="hostPort"):
        parse_workload(doc, "x")
