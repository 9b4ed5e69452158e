"""Services end to end: the behaviours Kubernetes' own network e2e tests check, in every
registered kube-proxy mode (one this machine cannot run, such as ipvs here, or one serving
another underlay, such as openflow, skips saying so; a mode with no stated expectations fails).

One cluster (topologies/services.yaml, host-gw) serves the whole module; the ``mode`` fixture
restarts kube-proxy in each mode in turn (``cluster.services.set_mode``), so every test runs
once per mode. The backends answer ``<pod IP> <client address seen> <bytes received>``, so a
test sees which pod answered and whether the source was NATed. What differs between modes is
written down in ``services_helpers.KUBE_PROXY_E2E``: the NAT modes keep a pod client's source address, the
userspace proxy opens its own connection from the node.

The 2,000-byte request (MTU) runs on small clusters of its own, one per CNI type.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from helpers import REPO, require_root_and, wait_for
from leftover_check import Footprint
from services_helpers import KUBE_PROXY_E2E, expect, kube_proxy_modes, runnable_modes

from k8snetlab import naming, spec
from k8snetlab.cluster import Cluster
from k8snetlab.modes import MODES

pytestmark = pytest.mark.integration

SERVICES = REPO / "topologies" / "services.yaml"
TOOLS = ("mnexec", "brctl", "iptables", "iptables-restore", "nft", "conntrack")


# N sequential TCP connections (HTTP/1.0, optional POST body); one JSON line with what came back
CLIENT = r"""
import json, socket, sys, time
host, port, n, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
size = int(sys.argv[5]) if len(sys.argv) > 5 else 0
req = (f"POST / HTTP/1.0\r\nContent-Length: {size}\r\n\r\n".encode() + b"x" * size) if size \
    else b"GET / HTTP/1.0\r\n\r\n"
out = []
for i in range(n):
    try:
        s = socket.create_connection((host, port), timeout)
        s.settimeout(timeout)
        s.sendall(req)
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        s.close()
        server, client, got = data.split(b"\r\n\r\n", 1)[1].decode().split()
        out.append({"server": server, "client": client, "bytes": int(got)})
    except (OSError, ValueError) as e:
        out.append({"error": type(e).__name__})
print(json.dumps(out))
"""

# one UDP datagram per 30 ms to host:port from ONE socket (one conntrack flow), answers logged
UDP_CLIENT = r"""
import json, socket, sys, time, os
host, port, log, stop = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(0.03)
deadline = time.monotonic() + 60
with open(log, "a") as f:
    while time.monotonic() < deadline and not os.path.exists(stop):
        s.sendto(b"ping", (host, port))
        try:
            data, _ = s.recvfrom(4096)
            f.write(json.dumps({"t": time.monotonic(), "server": data.split()[0].decode()}) + "\n")
            f.flush()
        except OSError:
            pass
        time.sleep(0.03)
"""


# -- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster():
    require_root_and(*TOOLS)
    c = Cluster(spec.load(SERVICES))
    c.start()
    yield c
    assert_gone(c)


def assert_gone(c) -> None:
    """Stop ``c``; nothing of it may stay (other clusters may run beside it on this machine)."""
    if c.state is None:          # never started, or already stopped
        c.stop()
        return
    footprint = Footprint(c)
    c.stop()
    footprint.assert_gone()


@pytest.fixture(scope="module", params=kube_proxy_modes())
def mode(request, cluster):
    data = yaml.safe_load(SERVICES.read_text())    # the mode must be able to serve this file
    spec.from_dict({**data, "kubeProxy": {**(data.get("kubeProxy") or {}), "mode": request.param}},
                   str(SERVICES), base_dir=SERVICES.parent)
    cluster.services.set_mode(request.param)
    return request.param


# -- helpers -------------------------------------------------------------------------------------
def clients(c) -> dict[str, object]:
    """One client pod per node."""
    return {p.node_name: p for p in sorted(c.pods.values(), key=lambda p: p.name)
            if p.spec.owner == "Deployment/client"}


def connect(host, ip: str, port: int, n: int = 1, timeout: float = 2.0, size: int = 0) -> list[dict]:
    r = host.run([sys.executable, "-c", CLIENT, ip, str(port), str(n), str(timeout), str(size)], timeout=120)
    return json.loads(r.stdout)


def pods_by_ip(c) -> dict[str, str]:
    return {p.ip: p.name for p in c.pods.values()}


def vip(c, name: str) -> str:
    return c.services.service(f"default/{name}").cluster_ip


def diagnose(node) -> str:
    """For a failure message: the node's reject rules with their counters, its ICMP counters."""
    rules = node.run(["iptables", "-L", "-v", "-n", "-x"], check=False).stdout
    rejects = [" ".join(line.split()) for line in rules.splitlines() if "REJECT" in line]
    snmp = [line.split() for line in node.run(["cat", "/proc/net/snmp"]).stdout.splitlines()
            if line.startswith("Icmp:")]
    icmp = dict(zip(snmp[0][1:], snmp[1][1:])) if len(snmp) == 2 else {}
    keep = ("OutDestUnreachs", "OutRateLimitGlobal", "OutRateLimitHost")
    return f"{node.name}: reject rules {rejects}; icmp {({k: icmp.get(k) for k in keep})}"


def drops_during(fn) -> tuple[object, str]:
    """Run ``fn`` under ``perf record -e skb:kfree_skb`` (every namespace); return its value and
    the IPv4 drops the kernel reported meanwhile, as "location reason" counts. For evidence in a
    failure message only; says so when perf is missing or fails."""
    if shutil.which("perf") is None:
        return fn(), "perf missing (apt-get install linux-perf)"
    with tempfile.TemporaryDirectory() as tmp:
        data = f"{tmp}/drops.data"
        rec = subprocess.Popen(["perf", "record", "-q", "-e", "skb:kfree_skb", "-a", "-o", data],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(0.5)   # perf opens its buffers before the traffic starts
        try:
            value = fn()
        finally:
            rec.send_signal(2)
            err = rec.communicate(timeout=30)[1]
        if rec.returncode not in (0, -2):
            return value, f"perf record failed ({rec.returncode}): {err.strip()}"
        out = subprocess.run(["perf", "script", "-i", data], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        return value, f"perf script failed: {out.stderr.strip()}"
    seen = Counter(line.split("location=", 1)[1].strip() for line in out.stdout.splitlines()
                   if "protocol=2048" in line and "location=" in line)
    return value, "kfree_skb: " + (", ".join(f"{k} x{n}" for k, n in seen.most_common(8)) or "none")


# -- ClusterIP ------------------------------------------------------------------------------------
def test_cluster_ip_reaches_a_backend_from_every_node(cluster, mode):
    web = {e.ip for e in cluster.services.endpoints("default/web")}
    for node, pod in clients(cluster).items():
        (r,) = connect(pod, vip(cluster, "web"), 80)
        assert "error" not in r, f"{mode}: {pod.name} on {node} -> web: {r}"
        assert r["server"] in web
        if expect(mode).keeps_pod_source:
            assert r["client"] == pod.ip, f"{mode}: the backend saw {r['client']}, not the client pod"
        else:
            assert r["client"] != pod.ip


def test_connections_spread_over_the_backends(cluster, mode):
    web = {e.ip: e.pod for e in cluster.services.endpoints("default/web")}
    assert len(web) == 3
    for node, pod in clients(cluster).items():
        answers = connect(pod, vip(cluster, "web"), 80, n=300)
        assert not [a for a in answers if "error" in a], f"{mode} from {node}: failed connections"
        share = Counter(a["server"] for a in answers)
        assert set(share) == set(web), f"{mode} from {node}: {share}"
        for ip, n in share.items():
            assert 0.20 <= n / 300 <= 0.47, f"{mode} from {node}: {web[ip]} got {n}/300: {share}"


def test_session_affinity_keeps_a_client_on_one_backend(cluster, mode):
    for node, pod in clients(cluster).items():
        answers = connect(pod, vip(cluster, "web-sticky"), 80, n=30)
        servers = {a.get("server") for a in answers}
        assert len(servers) == 1 and None not in servers, f"{mode} from {node}: {answers}"


def test_pod_reaches_itself_through_its_service(cluster, mode):
    """Hairpin: web-solo-0 is the only endpoint of web-local; it connects to the ClusterIP."""
    pod = cluster.pods["web-solo-0"]
    (r,) = connect(pod, vip(cluster, "web-local"), 80)
    assert r.get("server") == pod.ip, f"{mode}: hairpin failed: {r}"
    # kube-proxy SNATs hairpin traffic (KUBE-MARK-MASQ for -s <endpoint>): the reply must come back
    # through the node, so the pod never sees a packet from itself
    assert r["client"] != pod.ip


def test_udp_service_answers_from_every_node(cluster, mode):
    echo = {e.ip for e in cluster.services.endpoints("default/echo-udp")}
    probe = ("import socket,sys; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(1)\n"
             "for i in range(10):\n"
             "    s.sendto(b'hi', (sys.argv[1], 9999))\n"
             "    try:\n"
             "        print(s.recvfrom(4096)[0].decode()); break\n"
             "    except OSError: pass\n")
    for node, pod in clients(cluster).items():
        out = pod.run([sys.executable, "-c", probe, vip(cluster, "echo-udp")]).stdout.split()
        assert out and out[0] in echo, f"{mode}: UDP from {node}: {out}"
        assert out[2] == "hi"


def test_scaled_down_pod_gets_no_connection(cluster, mode):
    gone = cluster.pods["web-2"].ip
    try:
        cluster.scale("web", 2)
        assert gone not in {e.ip for e in cluster.services.endpoints("default/web")}
        for node, pod in clients(cluster).items():
            answers = connect(pod, vip(cluster, "web"), 80, n=60)
            assert not [a for a in answers if "error" in a], f"{mode} from {node}: {answers}"
            assert gone not in {a["server"] for a in answers}, f"{mode}: a deleted pod answered"
    finally:
        cluster.scale("web", 3)
    assert len(cluster.services.endpoints("default/web")) == 3


def test_selector_matching_nothing_refuses_at_once(cluster, mode):
    svc = cluster.services.add_service({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "nothing"},
        "spec": {"type": "NodePort", "selector": {"app": "nothing"}, "ports": [{"port": 80, "targetPort": 8080}]}})
    try:
        assert cluster.services.endpoints("default/nothing") == ()
        pod = next(iter(clients(cluster).values()))
        # refused before TCP would send its SYN again (1 s): the REJECT answers the first one
        r = connect(pod, svc.cluster_ip, 80, timeout=0.9)
        if r != [{"error": "ConnectionRefusedError"}]:
            node = cluster.nodes[pod.node_name]
            again, drops = drops_during(lambda: connect(pod, svc.cluster_ip, 80, timeout=2))
            route = node.run(["ip", "route", "get", svc.cluster_ip, "from", pod.ip, "iif", naming.BRIDGE],
                             check=False)
            conntrack = node.run(["conntrack", "-L", "-d", svc.cluster_ip], check=False).stdout.strip()
            pytest.fail(f"{mode}: {pod.name} -> ClusterIP without endpoints: {r}; {diagnose(node)}; "
                        f"conntrack: {conntrack}; asked again: {again}, {drops}; "
                        f"route: {(route.stdout or route.stderr).strip()}")
        node_ip = str(cluster.nodes["node1"].spec.ip)
        r = connect(cluster.services.external, node_ip, svc.ports[0].node_port, timeout=5)
        assert r == [{"error": "ConnectionRefusedError"}], \
            f"{mode}: external -> nodePort: {r}; {diagnose(cluster.nodes['node1'])}"
    finally:
        cluster.services.delete_service("default/nothing")


# -- from outside the cluster ----------------------------------------------------------------------
def test_node_port_works_on_every_node(cluster, mode):
    ext = cluster.services.external
    web = {e.ip for e in cluster.services.endpoints("default/web")}
    for node in cluster.nodes.values():
        answers = connect(ext, str(node.spec.ip), 30080, n=5)
        assert all(a.get("server") in web for a in answers), f"{mode} via {node.name}: {answers}"
        # externalTrafficPolicy Cluster: SNAT, so that replies come back through this node
        assert all(a["client"] != ext.IP() for a in answers)


def test_external_traffic_policy_local(cluster, mode):
    ext = cluster.services.external
    (solo,) = cluster.services.endpoints("default/web-local")
    for node in cluster.nodes.values():
        answers = connect(ext, str(node.spec.ip), 30081, timeout=1)
        if node.name == solo.node:
            assert answers[0].get("server") == solo.ip, f"{mode} via {node.name}: {answers}"
            if expect(mode).keeps_external_source:
                assert answers[0]["client"] == ext.IP(), f"{mode}: client address not preserved"
        else:
            assert "error" in answers[0], f"{mode}: {node.name} has no local endpoint but answered"


def test_a_joining_node_gets_kube_proxy_and_serves_node_ports(cluster, mode):
    web = {e.ip for e in cluster.services.endpoints("default/web")}
    # a name and address per mode: the cluster spec remembers nodes that left
    name, ip = f"join-{mode}", f"192.168.1.{140 + sorted(KUBE_PROXY_E2E).index(mode)}"
    node = cluster.add_node(name, ip)
    try:
        assert cluster.services.proxiers[name].mode == mode
        answers = connect(cluster.services.external, ip, 30080, n=5)
        assert all(a.get("server") in web for a in answers), f"{mode} via {name}: {answers}"
    finally:
        cluster.remove_node(node.name)
    assert name not in cluster.services.proxiers


# -- kube-proxy itself -------------------------------------------------------------------------------
def test_udp_client_keeps_answers_while_its_server_is_replaced(cluster, mode, tmp_path):
    """One UDP flow to the Service while its only pod is replaced: kube-proxy must flush the
    stale conntrack entry, or the flow keeps going to the dead pod's IP."""
    (ep,) = cluster.services.endpoints("default/echo-udp")
    old = cluster.pods[ep.pod]
    log, stop = tmp_path / "udp.log", tmp_path / "stop"
    pod = clients(cluster)["node3"] if "node3" in clients(cluster) else next(iter(clients(cluster).values()))
    proc = pod.popen_ns([sys.executable, "-c", UDP_CLIENT, vip(cluster, "echo-udp"), "9999", str(log), str(stop)])

    def answers() -> list[dict]:
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    try:
        assert wait_for(lambda: any(a["server"] == old.ip for a in answers())), f"{mode}: no answer at all"
        (new,) = [p for p in cluster.scale("echo", 2) if p.name != old.name]
        time.sleep(0.5)                               # the flow stays on the old pod meanwhile
        cluster.delete_pod(old.name)
        t_deleted = time.monotonic()
        got = wait_for(lambda: [a for a in answers() if a["t"] > t_deleted and a["server"] == new.ip], 10)
        assert got, f"{mode}: after {old.name} left, its client got no answer from {new.name} " \
                    f"(last answers: {answers()[-3:]})"
    finally:
        stop.touch()
        proc.wait(10)
        cluster.scale("echo", 1)
    assert [e.pod for e in cluster.services.endpoints("default/echo-udp")] == [new.name]


def test_rules_deleted_by_hand_are_repaired(cluster, mode):
    e = expect(mode)
    node = cluster.nodes["node1"]
    pod = clients(cluster)["node1"]
    node.run(list(e.damage))
    period = cluster.services.options.sync_period
    ok = wait_for(lambda: "error" not in connect(pod, vip(cluster, "web"), 80, timeout=1)[0],
                  timeout=10 * period + 5)
    assert ok, f"{mode}: Service still broken after {10 * period + 5:.0f} s"
    assert vip(cluster, "web") in node.run(list(e.rules)).stdout


def after_two_resyncs(cluster) -> None:
    """Return once two periodic resync rounds have run (bounded: 60 s)."""
    first = cluster.services.resyncs
    assert wait_for(lambda: cluster.services.resyncs >= first + 2, timeout=60, every=0.05), \
        "the periodic resync stopped"


# what someone does to a node's rules by hand; each must be repaired within two sync periods
HAND_DAMAGE = {
    "iptables": {
        "nat-flushed": [["iptables", "-t", "nat", "-F"]],
        "jumps-deleted": [["iptables", "-t", "nat", "-D", chain, "-m", "comment", "--comment",
                           "kubernetes service portals", "-j", "KUBE-SERVICES"] for chain in ("PREROUTING", "OUTPUT")],
        "service-chain-flushed": [["sh", "-c", "iptables -t nat -S | awk '/^-N KUBE-SVC-/ {print $2}' | "
                                               "xargs -n1 iptables -t nat -F"]],
    },
    "nftables": {
        "table-flushed": [["nft", "flush", "table", "ip", "kube-proxy"]],
        "map-emptied": [["nft", "flush", "map", "ip", "kube-proxy", "service-ips"]],
    },
}


@pytest.mark.parametrize("damage", sorted({d for m in HAND_DAMAGE.values() for d in m}))
def test_hand_damage_is_repaired_within_two_sync_periods(cluster, mode, damage):
    """Partial syncs rewrite only what changed in the desired state; the proxier notices that
    the node's rules are not as it left them (not only when its canary is gone) and the next
    sync is a full one. The node's own traffic and a pod's both reach the Service again."""
    cmds = HAND_DAMAGE.get(mode, {}).get(damage)
    if cmds is None:
        pytest.skip(f"{damage} is not a damage of mode {mode}")
    node = cluster.nodes["node1"]
    pod = clients(cluster)["node1"]
    ip = vip(cluster, "web")
    assert "error" not in connect(node, ip, 80, timeout=1)[0]
    with cluster.services._lock:           # no sync between the damage and the check that it broke
        for cmd in cmds:
            node.run(cmd)
        assert "error" in connect(node, ip, 80, timeout=1)[0], f"{damage} did not break {ip}"
    after_two_resyncs(cluster)
    for host in (node, pod):
        (r,) = connect(host, ip, 80, timeout=1)
        assert "error" not in r, f"{mode}, {damage}: {host.name} -> {ip} still broken after two resyncs: {r}"


def test_node_shows_the_modes_rules(cluster, mode):
    """What an operator sees inside a node: the real kube-proxy layout, and nothing left of the
    mode that ran before."""
    node = cluster.nodes["node2"]
    ipt = node.run(["iptables-save"]).stdout
    nft_tables = node.run(["nft", "list", "tables"]).stdout
    if mode == "iptables":
        web = cluster.services.service("default/web")
        assert "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES" in ipt
        assert f"-d {web.cluster_ip}/32 -p tcp -m comment --comment \"default/web:http cluster IP\"" in ipt
        assert "-j KUBE-SVC-CDGGSHYLG3RE2FKL" in ipt           # base32(sha256("default/web:httptcp"))
        assert "--probability 0.33333333349" in ipt and "--probability 0.50000000000" in ipt
        assert "-j KUBE-NODEPORTS" in ipt and "-j MASQUERADE --random-fully" in ipt
        assert "kube-proxy" not in nft_tables
    elif mode == "nftables":
        table = node.run(["nft", "list", "table", "ip", "kube-proxy"]).stdout
        assert "numgen random mod 3 vmap" in table
        assert "vmap @service-ips" in table and "vmap @service-nodeports" in table
        assert "KUBE-" not in ipt
    elif mode == "userspace":
        assert "KUBE-SVC-" not in ipt and "kube-proxy" not in nft_tables
    else:
        pytest.fail(f"no layout check for kube-proxy mode {mode}: add one here")


# -- MTU: a 2,000-byte request in every CNI mode -------------------------------------------------------
def small_cluster(cni: str) -> dict:
    """Two nodes; a backend on node2 (on node1 for bridge, which does not route between nodes)
    and a client on node1; one ClusterIP Service."""
    web = yaml.safe_load(SERVICES.read_text())["workloads"][0]
    web["spec"]["replicas"] = 1
    web["spec"]["template"]["spec"]["nodeName"] = "node1" if cni == "bridge" else "node2"
    return {"name": f"mtu-{cni}", "underlay": {"subnets": [{"name": "lan", "cidr": "192.168.7.0/24"}]},
            "nodes": [{"name": "node1", "ip": "192.168.7.11"}, {"name": "node2", "ip": "192.168.7.12"}],
            "cni": {"type": cni}, "kubeProxy": {"dns": False},
            "workloads": [web,
                          {"kind": "Pod", "metadata": {"name": "client"},
                           "spec": {"nodeName": "node1",
                                    "containers": [{"name": "c", "command": ["sleep", "infinity"]}]}},
                          {"kind": "Service", "metadata": {"name": "web"},
                           "spec": {"selector": {"app": "web"},
                                    "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}}]}


CNI_TYPES = [t for t in ("bridge", "host-gw", "ipip", "vxlan") if t in MODES]


@pytest.mark.parametrize("cni", CNI_TYPES)
def test_large_request_through_cluster_ip_in_every_cni_mode(cni):
    require_root_and(*TOOLS, *(("clang", "bpftool", "tc") if cni == "ipip" else ()))
    c = Cluster(spec.from_dict(small_cluster(cni), f"<mtu-{cni}>", base_dir=Path(".")))
    c.start()
    try:
        backend = c.pods["web-0"]
        for mode in runnable_modes():
            spec.from_dict({**small_cluster(cni), "kubeProxy": {"dns": False, "mode": mode}}, f"<mtu-{cni}>")
            c.services.set_mode(mode)
            answers = connect(c.pods["client"], c.services.service("default/web").cluster_ip, 80, n=3, size=2000)
            assert answers == [{"server": backend.ip, "client": answers[0].get("client"), "bytes": 2000}] * 3, \
                f"{cni} / {mode}: {answers}"
    finally:
        assert_gone(c)
