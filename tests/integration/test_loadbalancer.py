"""LoadBalancer Services through the emulated cloud load balancer ``lb``: reachable from the
``external`` host at an IP of the pool, spread over the nodes' nodePorts; with
``externalTrafficPolicy: Local`` only nodes that run a backend get connections. In every
kube-proxy mode available here."""

from __future__ import annotations

import ipaddress
import re
import sys

import pytest

from helpers import require_root_and
from services_helpers import WHO, ask, kube_proxy_modes, stop_and_check
from k8snetlab import spec
from k8snetlab.cluster import Cluster

pytestmark = pytest.mark.integration


def cluster_file(mode: str) -> dict:
    def deploy(name: str, n: int, node: str | None = None) -> dict:
        pod = {"containers": [{"name": "web", "command": [sys.executable, "-c", WHO],
                               "ports": [{"name": "http", "containerPort": 8080}]}]}
        if node:
            pod["nodeName"] = node
        return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
                "spec": {"replicas": n, "selector": {"matchLabels": {"app": name}},
                         "template": {"metadata": {"labels": {"app": name}}, "spec": pod}}}

    def lb(name: str, app: str, policy: str) -> dict:
        return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
                "spec": {"type": "LoadBalancer", "externalTrafficPolicy": policy, "selector": {"app": app},
                         "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}}

    return {
        "name": f"lb-{mode}",
        "underlay": {"subnets": [{"name": "lan", "cidr": "192.168.1.0/24"}]},
        "nodes": [{"name": f"node{i}", "ip": f"192.168.1.{128 + i}"} for i in (1, 2, 3)],
        "cni": {"type": "host-gw"},
        "kubeProxy": {"mode": mode, "dns": False, "loadBalancerPool": "192.168.1.224/28"},
        "workloads": [deploy("web", 3), deploy("solo", 1, node="node2"),
                      lb("web-lb", "web", "Cluster"), lb("solo-lb", "solo", "Local")],
    }


@pytest.fixture(scope="module", params=kube_proxy_modes())
def cluster(request):
    require_root_and("mnexec", "brctl", "iptables-restore", "conntrack")
    c = Cluster(spec.from_dict(cluster_file(request.param), f"test_loadbalancer ({request.param})"))
    c.start()
    yield c
    stop_and_check(c)


def lb_targets(c: Cluster, external_ip: str) -> set[str]:
    """The nodes ``lb`` forwarded connections for ``external_ip`` to (its conntrack table:
    the reply source of each translated connection)."""
    out = c.hosts["lb"].run(["conntrack", "-L", "-p", "tcp", "--orig-dst", external_ip], check=False).stdout
    return {m.group(1) for m in re.finditer(r"dport=80 src=(\S+) dst=", out)}


def test_services_get_pool_addresses(cluster):
    pool = ipaddress.IPv4Network("192.168.1.224/28")
    ips = [cluster.services.service(k).load_balancer_ip for k in ("default/web-lb", "default/solo-lb")]
    assert all(ip and ipaddress.IPv4Address(ip) in pool for ip in ips) and len(set(ips)) == 2
    # answered on the underlay: the addresses sit on lb's eth0
    addrs = cluster.hosts["lb"].run(["ip", "-4", "-o", "addr", "show", "dev", "eth0"]).stdout
    assert all(f"{ip}/32" in addrs for ip in ips)


def test_load_balancer_from_the_external_host(cluster):
    ip = cluster.services.service("default/web-lb").load_balancer_ip
    answers = ask(cluster.services.external, ip, 80, 9)
    assert not [a for a in answers if a.startswith("ERR")], answers
    backends = {p.ip for p in cluster.pods.values() if p.spec.labels.get("app") == "web"}
    assert {a.split()[0] for a in answers} <= backends
    # Cluster policy: the load balancer spread the connections over every node's nodePort
    assert lb_targets(cluster, ip) == {n.ip for n in cluster.nodes.values()}
    # and the backends never saw the external client (the load balancer SNATs)
    assert cluster.services.external.IP() not in {a.split()[1] for a in answers}


def test_local_policy_only_uses_nodes_with_endpoints(cluster):
    """solo runs on node2 only: every connection succeeds (a node without a local endpoint
    would drop or refuse it) and lb's conntrack shows node2 as the only target."""
    svc = cluster.services.service("default/solo-lb")
    answers = ask(cluster.services.external, svc.load_balancer_ip, 80, 6)
    assert not [a for a in answers if a.startswith("ERR")], answers
    solo = next(p for p in cluster.pods.values() if p.spec.labels.get("app") == "solo")
    assert {a.split()[0] for a in answers} == {solo.ip}
    node2 = cluster.nodes["node2"]
    assert lb_targets(cluster, svc.load_balancer_ip) == {node2.ip}
    # the source the backend sees: kube-proxy keeps it with Local, and it is lb's own address
    # (lb SNATs so that replies come back through it); in userspace mode the node's proxy
    # connects, so it is node2 (its address, or its bridge address towards a local pod)
    seen = {a.split()[1] for a in answers}
    if cluster.services.options.mode == "userspace":
        assert seen <= {node2.ip, str(next(node2.spec.pod_cidr.hosts()))}
    else:
        assert seen == {cluster.services.lb.own_ip}


def test_local_policy_nodes_without_endpoints_do_not_answer(cluster):
    """What the load balancer avoids: the same nodePort on node1 (no solo pod there) does not
    serve the Service, while node2's does."""
    port = cluster.services.service("default/solo-lb").ports[0].node_port
    ext = cluster.services.external
    on_node2 = ask(ext, cluster.nodes["node2"].ip, port, 1)
    assert not on_node2[0].startswith("ERR"), on_node2
    on_node1 = ask(ext, cluster.nodes["node1"].ip, port, 1, timeout=1)    # dropped or refused
    assert on_node1[0].startswith("ERR"), on_node1
