"""Cluster DNS: dnsmasq in a kube-dns pod behind 10.96.0.10, every pod resolving through it with
its own resolv.conf (bind-mounted in the pod's mount namespace only), in every kube-proxy mode."""

from __future__ import annotations

import os
import sys
import time

import pytest

from helpers import require_root_and
from services_helpers import WHO, kube_proxy_modes, stop_and_check
from k8snetlab import spec
from k8snetlab.cluster import Cluster

pytestmark = pytest.mark.integration

DOMAIN = "svc.cluster.local"


def cluster_file(mode: str) -> dict:
    deploy = lambda name, n, ns="default", cmd=None: {   # noqa: E731
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "namespace": ns},
        "spec": {"replicas": n, "selector": {"matchLabels": {"app": name}},
                 "template": {"metadata": {"labels": {"app": name}},
                              "spec": {"containers": [{"name": "c", "command": cmd or ["sleep", "infinity"]}]}}}}
    web = deploy("web", 3, cmd=[sys.executable, "-c", WHO])
    web["spec"]["template"]["spec"]["containers"][0]["ports"] = [{"name": "http", "containerPort": 8080}]
    return {
        "name": f"dns-{mode}",
        "underlay": {"subnets": [{"name": "lan", "cidr": "192.168.1.0/24"}]},
        "nodes": [{"name": f"node{i}", "ip": f"192.168.1.{128 + i}"} for i in (1, 2, 3)],
        "cni": {"type": "host-gw"},
        "kubeProxy": {"mode": mode},
        "workloads": [
            web,                                  # one per node: also the pods that ask
            deploy("shop", 1, ns="shop"),         # a pod in another namespace
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
             "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}},
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web-headless"},
             "spec": {"clusterIP": "None", "selector": {"app": "web"}}},
        ],
    }


ROOT_RESOLV = "/etc/resolv.conf"


def root_resolv_state() -> tuple[bytes, int, str]:
    st = os.stat(ROOT_RESOLV)
    with open(ROOT_RESOLV, "rb") as f:
        content = f.read()
    with open("/proc/self/mountinfo") as f:
        mounts = "".join(line for line in f if "resolv.conf" in line)
    return content, st.st_ino, mounts


@pytest.fixture(scope="module", params=kube_proxy_modes())
def cluster(request):
    require_root_and("mnexec", "brctl", "dnsmasq", "dig")
    before = root_resolv_state()
    c = Cluster(spec.from_dict(cluster_file(request.param), f"test_dns ({request.param})"))
    c.start()
    c.root_resolv_before = before
    yield c
    stop_and_check(c)          # a test may have stopped it already


def dig(pod, name: str, *opts: str) -> list[str]:
    r = pod.run(["dig", "+short", "+time=2", "+tries=2", *opts, name])
    return sorted(r.stdout.split())


def pods(c: Cluster, app: str) -> list:
    return sorted((p for p in c.pods.values() if p.spec.labels.get("app") == app), key=lambda p: p.name)


def test_names_give_the_cluster_ip_from_every_node(cluster):
    vip = cluster.services.service("default/web").cluster_ip
    probes = pods(cluster, "web")
    assert {p.node_name for p in probes} == set(cluster.nodes)
    for pod in probes:
        for name in ("web", "web.default", f"web.default.{DOMAIN}"):
            assert dig(pod, name, "+search") == [vip], f"{name} from {pod.name} on {pod.node_name}"


def test_getaddrinfo_in_a_pod_uses_the_search_path(cluster):
    vip = cluster.services.service("default/web").cluster_ip
    code = "import socket; print(socket.getaddrinfo('web', 80, proto=socket.IPPROTO_TCP)[0][4][0])"
    assert pods(cluster, "web")[0].run([sys.executable, "-c", code]).stdout.strip() == vip
    # and the name leads to the Service: connect by name
    code = "import socket; c = socket.create_connection(('web', 80), 3); print(c.makefile().readline().strip())"
    answer = pods(cluster, "web")[1].run([sys.executable, "-c", code]).stdout.split()
    assert answer[0] in {p.ip for p in pods(cluster, "web")}


def test_search_path_follows_the_pod_namespace(cluster):
    shop = pods(cluster, "shop")[0]
    vip = cluster.services.service("default/web").cluster_ip
    assert dig(shop, "web.default", "+search") == [vip]
    r = shop.run(["dig", "+search", "+time=2", "web"], check=False)     # shop has no Service web
    assert "status: NXDOMAIN" in r.stdout


def test_unknown_names_are_nxdomain_and_nothing_is_forwarded(cluster):
    pod = pods(cluster, "web")[0]
    for name in (f"nope.default.{DOMAIN}", "example.com"):
        r = pod.run(["dig", "+time=2", "+tries=1", name], check=False)
        assert "status: NXDOMAIN" in r.stdout, (name, r.stdout)
    # dnsmasq has no upstream server at all
    conf = (cluster.state.path / "dns" / "dnsmasq.conf").read_text().splitlines()
    assert "no-resolv" in conf and not [line for line in conf if line.startswith("server=")]


def test_tcp_queries_work_too(cluster):
    vip = cluster.services.service("default/web").cluster_ip
    assert dig(pods(cluster, "web")[2], f"web.default.{DOMAIN}", "+tcp") == [vip]


def test_headless_gives_pod_ips_and_follows_scale(cluster):
    pod = pods(cluster, "shop")[0]
    name = f"web-headless.default.{DOMAIN}"
    assert dig(pod, name) == sorted(p.ip for p in pods(cluster, "web"))
    try:
        cluster.scale("web", 2)
        want = sorted(p.ip for p in pods(cluster, "web"))
        deadline = time.monotonic() + 5       # dnsmasq rereads its records on SIGHUP
        while dig(pod, name) != want and time.monotonic() < deadline:
            time.sleep(0.1)
        assert dig(pod, name) == want and len(want) == 2
    finally:
        cluster.scale("web", 3)
    deadline = time.monotonic() + 5
    while len(dig(pod, name)) != 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert dig(pod, name) == sorted(p.ip for p in pods(cluster, "web"))


def test_each_pod_has_its_own_resolv_conf(cluster):
    pod = pods(cluster, "shop")[0]
    text = pod.run(["cat", ROOT_RESOLV]).stdout
    assert text.splitlines() == ["search shop.svc.cluster.local svc.cluster.local cluster.local",
                                 "nameserver 10.96.0.10", "options ndots:5"]
    assert pod.cmd(f"cat {ROOT_RESOLV}").split() == text.split()       # the Mininet shell too
    # the pod's containers (started before DNS was there) see it through their mount namespace
    cont = pod.containers["c"]
    assert os.readlink(f"/proc/{cont.pid}/ns/mnt") == os.readlink(pod.mntns) != os.readlink("/proc/self/ns/mnt")
    with open(f"/proc/{cont.pid}/root{ROOT_RESOLV}") as f:
        assert f.read() == text
    # the machine's own file and mount table are untouched
    assert root_resolv_state() == cluster.root_resolv_before


def test_root_resolv_conf_untouched_after_teardown(cluster):
    stop_and_check(cluster)
    assert root_resolv_state() == cluster.root_resolv_before
