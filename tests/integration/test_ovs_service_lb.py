"""ClusterIP Services load-balanced by the underlay's OpenFlow switch (``kubeProxy: {mode:
openflow}`` with the ``service_lb`` controller app), no kube-proxy rules in the nodes:
requests to the ClusterIP reach every backend in turn, a backend on another node sees the
client pod's own IP, a backend on the client's node sees the app's SNAT address (the hairpin
case), cluster DNS answers over UDP through the same switch, and nodes reach ClusterIPs too."""

from __future__ import annotations

import time

import pytest

from ovs_helpers import require_ovs
from k8snetlab import spec
from k8snetlab.cluster import Cluster

pytestmark = pytest.mark.integration

# answers "<pod name> <peer address>" to every GET: which backend, and whom it saw
ECHO = ("import os,http.server as h\nclass H(h.BaseHTTPRequestHandler):\n  def do_GET(s):\n"
        "    b=(os.environ['HOSTNAME']+' '+s.client_address[0]+'\\n').encode(); s.send_response(200); "
        "s.send_header('Content-Length',str(len(b))); s.end_headers(); s.wfile.write(b)\n"
        "  def log_message(s,*a): pass\nh.ThreadingHTTPServer(('0.0.0.0',8080),H).serve_forever()")

CLUSTER = {
    "name": "openflow-services",
    "underlay": {"switch": "ovs", "controller": "service_lb",
                 "subnets": [{"name": "lan", "cidr": "192.168.1.0/24"}]},
    "nodes": [{"name": f"node{i}", "ip": f"192.168.1.{128 + i}"} for i in (1, 2, 3)],
    "cni": {"type": "host-gw"},
    "kubeProxy": {"mode": "openflow"},
    "workloads": [
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "echo"},
         "spec": {"replicas": 3, "selector": {"matchLabels": {"app": "echo"}},
                  "template": {"metadata": {"labels": {"app": "echo"}},
                               "spec": {"containers": [{"name": "echo", "command": ["python3", "-c", ECHO],
                                                        "ports": [{"containerPort": 8080}]}]}}}},
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "client"},
         "spec": {"nodeName": "node1", "containers": [{"name": "c", "command": ["sleep", "infinity"]}]}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "echo"},
         "spec": {"selector": {"app": "echo"}, "ports": [{"port": 80, "targetPort": 8080}]}},
    ],
}


@pytest.fixture(scope="module")
def cluster():
    require_ovs()
    c = Cluster(spec.from_dict(CLUSTER, "openflow-services.yaml"))
    c.start()
    yield c
    c.stop()


def get(host, url: str) -> tuple[str, str]:
    r = host.run(["curl", "-s", "-m", "5", url], check=False)
    assert r.returncode == 0, f"{host.name}: curl {url}: exit {r.returncode} {r.stderr}"
    pod, seen = r.stdout.split()
    return pod, seen


def test_cluster_ip_reaches_every_backend_with_the_right_source(cluster):
    ip = cluster.services.service("default/echo").cluster_ip
    client = cluster.pods["client"]
    seen: dict[str, set[str]] = {}
    for _ in range(6):
        pod, addr = get(client, f"http://{ip}/")
        seen.setdefault(pod, set()).add(addr)
    assert set(seen) == {"echo-0", "echo-1", "echo-2"}
    same_node = cluster.pods["echo-0"].node_name == client.node_name
    for pod, addrs in seen.items():
        if cluster.pods[pod].node_name == client.node_name:
            assert addrs == {"169.254.100.1"}        # hairpin: the reply must come back through the switch
        else:
            assert addrs == {client.ip}              # the client pod's own address, no NAT
    assert same_node


def test_connection_state_is_two_flows_per_connection(cluster):
    flows = cluster.ovs.flows(cluster.switches["lan"].name)
    ip = cluster.services.service("default/echo").cluster_ip
    fwd = [f for f in flows if "cookie=0x5b" in f and f"nw_dst={ip}" in f and "tp_dst=80" in f]
    rev = [f for f in flows if "cookie=0x5b" in f and f"set_field:{ip}->ip_src" in f]
    assert fwd and len(fwd) == len(rev)
    assert all("idle_timeout=60" in f for f in fwd + rev)


def test_dns_over_udp_through_the_switch(cluster):
    r = cluster.pods["client"].run(["getent", "hosts", "echo.default.svc.cluster.local"])
    assert r.stdout.split()[0] == cluster.services.service("default/echo").cluster_ip


def test_a_node_reaches_a_cluster_ip(cluster):
    ip = cluster.services.service("default/echo").cluster_ip
    node = cluster.nodes["node2"]
    for _ in range(3):
        pod, addr = get(node, f"http://{ip}/")
        assert addr == (node.ip if cluster.pods[pod].node_name != "node2" else "169.254.100.1")


def test_no_kube_proxy_rules_in_the_nodes(cluster):
    for node in cluster.nodes.values():
        rules = node.run(["iptables-save", "-t", "nat"], check=False).stdout
        assert "KUBE-SERVICES" not in rules


def test_scaled_down_backend_is_no_longer_chosen(cluster):
    cluster.scale("echo", 2)
    ip = cluster.services.service("default/echo").cluster_ip
    deadline = time.monotonic() + 10       # the app re-reads the services file when it changes
    while cluster.ovs.controller_state().get("backends", {}).get("default/echo") != 2:
        assert time.monotonic() < deadline, cluster.ovs.controller_state()
        time.sleep(0.05)
    pods = {get(cluster.pods["client"], f"http://{ip}/")[0] for _ in range(6)}
    assert pods == {"echo-0", "echo-1"}
