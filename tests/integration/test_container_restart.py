"""A killed container is restarted as a kubelet does (issue 14 item 6): the pod is not ready
meanwhile and leaves its Service's endpoints, requests to the Service keep succeeding within
a bounded retry window, and the pod returns once its port listens again. restartPolicy Never
is honoured."""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import pytest

from helpers import require_root_and, wait_for
from leftover_check import running
from k8snetlab import spec
from k8snetlab.cluster import Cluster

pytestmark = pytest.mark.integration

# the server takes a second before it listens, after every (re)start: a window in which the
# pod runs but is not ready
SERVER = ["sh", "-c", "sleep 1; exec python3 -m http.server 8080 --bind 0.0.0.0"]

# N requests in a row; each may be retried for up to WINDOW seconds; prints the failures
CLIENT = r"""
import json, socket, sys, time
host, n, window = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
failed, retried = 0, 0
for i in range(n):
    deadline = time.monotonic() + window
    while True:
        try:
            s = socket.create_connection((host, 80), 1)
            s.settimeout(1)
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            if s.recv(12).startswith(b"HTTP/1.0 200"):
                break
        except OSError:
            pass
        if time.monotonic() > deadline:
            failed += 1
            break
        retried += 1
        time.sleep(0.1)
    time.sleep(0.05)
print(json.dumps({"failed": failed, "retried": retried}))
"""
WINDOW = 3.0


def cluster_dict() -> dict:
    web = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
           "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}},
                    "template": {"metadata": {"labels": {"app": "web"}},
                                 "spec": {"containers": [{"name": "web", "command": SERVER,
                                                          "ports": [{"name": "http", "containerPort": 8080}]}]}}}}
    once = {"kind": "Pod", "metadata": {"name": "once", "labels": {"app": "once"}},
            "spec": {"restartPolicy": "Never", "nodeName": "node2",
                     "containers": [{"name": "web", "command": SERVER, "ports": [{"containerPort": 8080}]}]}}
    client = {"kind": "Pod", "metadata": {"name": "client"},
              "spec": {"nodeName": "node1", "containers": [{"name": "c", "command": ["sleep", "3600"]}]}}
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
           "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": "http"}]}}
    return {"name": "heal-restart",
            "underlay": {"subnets": [{"name": "lan", "cidr": "192.168.1.0/24"}]},
            "nodes": [{"name": "node1", "ip": "192.168.1.129"}, {"name": "node2", "ip": "192.168.1.130"}],
            "cni": {"type": "host-gw"},
            "kubeProxy": {"mode": "iptables", "syncPeriod": 1, "dns": False},
            "workloads": [web, once, client, svc]}


@pytest.fixture(scope="module")
def cluster():
    require_root_and("mnexec", "brctl", "iptables", "iptables-restore", "conntrack")
    with running(Cluster(spec.from_dict(cluster_dict()))) as c:
        yield c


def endpoint_pods(c) -> set[str]:
    return {e.pod for e in c.services.endpoints("default/web")}


def test_killed_container_restarts_and_endpoints_follow_readiness(cluster):
    pod = cluster.pods["web-0"]
    assert endpoint_pods(cluster) == {"web-0", "web-1"}
    old = pod.containers["web"].pid
    os.killpg(old, signal.SIGKILL)        # the container's process group: sh and its child
    assert wait_for(lambda: "web-0" not in endpoint_pods(cluster), timeout=5), \
        "the pod of the killed container stayed in the Service's endpoints"
    assert not pod.ready
    ip = cluster.services.service("default/web").cluster_ip
    r = cluster.pods["client"].run([sys.executable, "-c", CLIENT, ip, "30", str(WINDOW)], timeout=300)
    result = json.loads(r.stdout)
    assert result["failed"] == 0, f"requests failed beyond a {WINDOW} s retry window: {result}"
    assert wait_for(lambda: "web-0" in endpoint_pods(cluster), timeout=30), "the pod never came back"
    assert pod.ready and pod.restarts == {"web": 1} and pod.containers["web"].pid != old
    events = [e[3] for e in cluster.supervisor.events if e[1] == "web-0"]
    assert events[0].startswith("exited") and events.index("not ready") < events.index("ready"), events
    assert events.index("restarted (1)") < events.index("ready"), events


def test_restart_policy_never_leaves_the_container_down(cluster):
    pod = cluster.pods["once"]
    os.killpg(pod.containers["web"].pid, signal.SIGKILL)
    assert wait_for(lambda: not pod.ready, timeout=5)
    time.sleep(1)                          # several supervision passes
    assert pod.restarts == {} and pod.containers["web"].process.poll() is not None
