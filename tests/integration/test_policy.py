"""NetworkPolicy enforced: the reachability cases of Kubernetes' policy e2e suite (namespaces x, y, z;
pods a, b, c) on one cluster per CNI mode and dataplane, each case's ``policy matrix`` (probed over
TCP/UDP between every pod pair) compared with the table expected for it.

By default four clusters cover every mode and both dataplanes (host-gw+iptables, vxlan+nftables,
ipip+iptables, bgp+nftables); ``K8SNETLAB_POLICY_ALL=1`` runs all eight combinations.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import threading
import time

import pytest

from helpers import REPO, require_root_and
from leftover_check import running
from k8snetlab import cli, proc, spec
from k8snetlab.cluster import Cluster

pytestmark = pytest.mark.integration

COMBOS = [("host-gw", "iptables"), ("vxlan", "nftables"), ("ipip", "iptables"), ("bgp", "nftables")]
if os.environ.get("K8SNETLAB_POLICY_ALL"):
    COMBOS = [(m, d) for m in ("host-gw", "vxlan", "ipip", "bgp") for d in ("iptables", "nftables")]
NAMESPACES = ["x", "y", "z"]
KEYS = [f"{n}/{p}" for n in NAMESPACES for p in "abc"]


@pytest.fixture(scope="module", params=COMBOS, ids=[f"{m}-{d}" for m, d in COMBOS])
def c(request):
    mode, dataplane = request.param
    require_root_and("ipset", "nft", "iptables-restore", *(("bird",) if mode == "bgp" else ()))
    s = spec.load(REPO / "topologies" / "policy.yaml", cni=mode)
    s = dataclasses.replace(s, name=f"pol-{mode}-{dataplane[:3]}", kube_proxy={"mode": "iptables"},
                            network_policy={"dataplane": dataplane, "resyncPeriod": 0.5})
    with running(Cluster(s)) as cluster:
        yield cluster


def policy(name: str, ns: str = "x", **spec_: object) -> dict:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": ns}, "spec": spec_}


def expect(ingress_denied: tuple[str, ...] = (), egress_denied: tuple[str, ...] = (),
           allow: tuple[tuple[str, str], ...] = (), deny: tuple[tuple[str, str], ...] = ()) -> dict:
    """The table a case should give, built by hand (as the e2e suite's Reachability)."""
    t = {(a, b): not (b in ingress_denied or a in egress_denied) or a == b for a in KEYS for b in KEYS}
    t.update({k: True for k in allow})
    t.update({k: False for k in deny})
    return t


def assert_matrix(c: Cluster, want: dict, port: int = 80, protocol: str = "TCP") -> None:
    (table,) = c.policies.matrix(port, (protocol,), NAMESPACES)
    wrong_model = [k for k in want if table.expected[k] != want[k]]
    assert not wrong_model, f"the model's table differs from the case's at {wrong_model[:4]}\n{table.format()}"
    assert not table.differences, table.format()


@pytest.fixture
def policies(c):
    made: list[str] = []

    def add(manifest: dict) -> None:
        c.policies.add(manifest)
        made.append(f"{manifest['metadata']['namespace']}/{manifest['metadata']['name']}")
    yield add
    for key in made:
        if key in c.policies.policies:
            c.policies.delete(key)


class Prober(threading.Thread):
    """Connections from one pod to ip:port every 50 ms (each at most 0.3 s): traffic that runs
    while policies come and go."""

    def __init__(self, pod, ip: str, port: int = 80):
        super().__init__(daemon=True)
        self.netns, self.ip, self.port = pod.netns, ip, port
        self.results: list[tuple[float, bool]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        proc.setns(self.netns)
        deadline = time.monotonic() + 60
        while not self.stop.is_set() and time.monotonic() < deadline:
            ok, started = True, time.monotonic()
            try:
                socket.create_connection((self.ip, self.port), timeout=0.3).close()
            except OSError:
                ok = False
            self.results.append((started, ok))
            time.sleep(0.05)


def test_deny_all_added_and_removed_while_traffic_runs(c, policies):
    assert_matrix(c, expect())
    xa = c.pods["a.x"]
    traffic = Prober(c.pods["a.y"], xa.ip)
    traffic.start()
    time.sleep(0.3)
    t_add = time.monotonic()
    policies(policy("deny-all", podSelector={}))       # returns once every node has its rules
    t_added = time.monotonic()
    assert_matrix(c, expect(ingress_denied=("x/a", "x/b", "x/c")))
    time.sleep(0.3)
    t_del = time.monotonic()
    c.policies.delete("x/deny-all")
    t_deleted = time.monotonic()
    time.sleep(0.5)
    traffic.stop.set()
    traffic.join(5)
    # by when each attempt started: before the policy, while it holds, after it is gone
    before = [ok for t, ok in traffic.results if t < t_add]
    during = [ok for t, ok in traffic.results if t_added < t < t_del]
    after = [ok for t, ok in traffic.results if t > t_deleted]
    assert before and all(before) and during and not any(during) and after and after[-1], traffic.results
    assert_matrix(c, expect())


def test_allow_from_namespace_and_namespace_relabelled(c, policies):
    policies(policy("from-y", podSelector={"matchLabels": {"pod": "a"}},
                    ingress=[{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}]))
    assert_matrix(c, expect(ingress_denied=("x/a",), allow=(("y/a", "x/a"), ("y/b", "x/a"), ("y/c", "x/a"))))
    c.label_namespace("z", {"ns": "y"})
    try:
        allowed = tuple((f"{n}/{p}", "x/a") for n in "yz" for p in "abc")
        assert_matrix(c, expect(ingress_denied=("x/a",), allow=allowed))
    finally:
        c.label_namespace("z", {"ns": "z"})


def test_allow_from_pod_in_namespace_and_udp(c, policies):
    peer = {"namespaceSelector": {"matchLabels": {"ns": "y"}}, "podSelector": {"matchLabels": {"pod": "b"}}}
    policies(policy("from-yb", podSelector={"matchLabels": {"pod": "a"}}, ingress=[{"from": [peer]}]))
    want = expect(ingress_denied=("x/a",), allow=(("y/b", "x/a"),))
    assert_matrix(c, want)
    assert_matrix(c, want, protocol="UDP")


def test_pod_relabelled(c, policies):
    policies(policy("from-b", podSelector={"matchLabels": {"pod": "a"}},
                    ingress=[{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]))
    assert_matrix(c, expect(ingress_denied=("x/a",), allow=(("x/b", "x/a"),)))
    c.label_pod("c.x", {"pod": "b"})
    try:
        assert_matrix(c, expect(ingress_denied=("x/a",), allow=(("x/b", "x/a"), ("x/c", "x/a"))))
    finally:
        c.label_pod("c.x", {"pod": "c"})


def test_ip_block_with_except(c, policies):
    yb = c.pods["b.y"].ip
    policies(policy("cidr", podSelector={"matchLabels": {"pod": "a"}}, policyTypes=["Egress"],
                    egress=[{"to": [{"ipBlock": {"cidr": str(c.spec.network.cluster_cidr), "except": [f"{yb}/32"]}}]}]))
    assert_matrix(c, expect(deny=(("x/a", "y/b"),)))


def test_named_port_and_end_port(c, policies):
    policies(policy("named", podSelector={"matchLabels": {"pod": "a"}},
                    ingress=[{"ports": [{"port": "serve-81-udp", "protocol": "UDP"}]}]))
    assert_matrix(c, expect(), port=81, protocol="UDP")
    assert_matrix(c, expect(ingress_denied=("x/a",)), port=80, protocol="UDP")
    c.policies.delete("x/named")
    policies(policy("range", podSelector={"matchLabels": {"pod": "a"}},
                    ingress=[{"ports": [{"port": 81, "endPort": 90}]}]))
    assert_matrix(c, expect(ingress_denied=("x/a",)), port=80)
    assert_matrix(c, expect(), port=81)


def test_egress_denied_but_dns(c, policies):
    dns = {"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}}}],
           "ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]}
    policies(policy("egress-dns-only", podSelector={}, policyTypes=["Egress"], egress=[dns]))
    assert_matrix(c, expect(egress_denied=("x/a", "x/b", "x/c")))
    # the query goes to the kube-dns Service; policy applies after DNAT, to the kube-dns pod
    out = c.pods["a.x"].run(["python3", "-c", "import socket; print(socket.gethostbyname('kube-dns.kube-system'))"],
                            timeout=20).stdout.strip()
    assert out == str(c.spec.network.service_cidr.network_address + 10)


def test_policy_applies_behind_a_service(c, policies):
    svc = c.services.add_service({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "xa", "namespace": "x"},
                                  "spec": {"selector": {"pod": "a"}, "ports": [{"port": 8080, "targetPort": 80}]}})
    try:
        policies(policy("from-yb", podSelector={"matchLabels": {"pod": "a"}},
                        ingress=[{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}},
                                            "podSelector": {"matchLabels": {"pod": "b"}}}]}]))
        ok = "import socket,sys; socket.create_connection((sys.argv[1], 8080), timeout=1).close()"
        c.pods["b.y"].run(["python3", "-c", ok, svc.cluster_ip], timeout=10)
        r = c.pods["c.y"].run(["python3", "-c", ok, svc.cluster_ip], timeout=10, check=False)
        assert r.returncode != 0 and "timed out" in r.stderr
    finally:
        c.services.delete_service("x/xa")


def test_resync_restores_rules_deleted_by_hand_and_explain(c, policies, capsys):
    policies(policy("deny-all", podSelector={}))
    node = c.nodes[c.pods["a.x"].node_name]
    if c.policies.options.dataplane == "iptables":
        node.run(["iptables", "-D", "FORWARD", "-m", "comment", "--comment", "cali:policy agent", "-j", "cali-FORWARD"])
    else:
        node.run(["nft", "delete", "table", "ip", "calico"])
    deadline = time.monotonic() + 10
    while not c.policies.agents[node.name].intact() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert c.policies.agents[node.name].intact()
    assert_matrix(c, expect(ingress_denied=("x/a", "x/b", "x/c")))
    assert cli.main(["policy", "matrix", "--namespace", "x", "--namespace", "y", "--cluster", c.state.path.name]) == 0
    table = capsys.readouterr().out
    assert "Observed (TCP/80):" in table and table.rstrip().endswith("0 difference(s)")
    assert cli.main(["policy", "explain", "y/a", "x/a", "80", "--cluster", c.state.path.name]) == 0
    out = capsys.readouterr().out
    assert "DENIED" in out and "isolated for ingress by x/deny-all" in out
    drops = [ln for ln in out.splitlines() if "Drop if no policies passed packet" in ln]
    assert drops and int(drops[0].split()[0]) > 0, out


def test_partial_sync_after_a_relabel(c, policies):
    policies(policy("from-b", podSelector={"matchLabels": {"pod": "a"}},
                    ingress=[{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]))
    c.label_pod("c.x", {"pod": "b"})
    try:
        stats = c.policies.last_sync[c.pods["a.x"].node_name]
        assert not stats.full and stats.chains_written == 0 and stats.elements_changed == 1
    finally:
        c.label_pod("c.x", {"pod": "c"})


ACCEPT = ("import socket\ns = socket.socket()\ns.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
          "s.bind(('', 80))\ns.listen(64)\nwhile True:\n    s.accept()[0].close()\n")
CONNECT = "import socket, sys\nsocket.create_connection((sys.argv[1], 80), timeout=2).close()\n"


def test_disabled_is_flannel_alone_policies_accepted_ignored_traffic_passes(caplog):
    """``networkPolicy: {enabled: false}``: a deny-all in the cluster file and another added at
    run time are accepted, one warning says they are not enforced, no rule is written and the
    denied traffic still passes."""
    import logging
    import sys
    require_root_and("ipset", "nft", "iptables-save")
    pod = lambda name, cmd: {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"app": name}},  # noqa: E731
                             "spec": {"nodeName": "node1", "containers": [{"name": "c", "command": cmd}]}}
    s = spec.from_dict({"name": "pol-disabled", "underlay": {"subnets": [{"name": "lan", "cidr": "192.168.1.0/24"}]},
                        "nodes": [{"name": "node1", "ip": "192.168.1.129"}], "cni": {"type": "host-gw"},
                        "networkPolicy": {"enabled": False},
                        "workloads": [pod("srv", [sys.executable, "-c", ACCEPT]), pod("cl", ["sleep", "infinity"]),
                                      policy("deny-all", "default", podSelector={}, policyTypes=["Ingress", "Egress"])]})
    with caplog.at_level(logging.INFO, logger="k8snetlab.policy.addon"):
        with running(Cluster(s)) as c:
            assert set(c.policies.policies) == {"default/deny-all"} and not c.policies.agents
            c.policies.add(policy("deny-more", "default", podSelector={"matchLabels": {"app": "srv"}}))
            assert set(c.policies.policies) == {"default/deny-all", "default/deny-more"} and not c.policies.agents
            srv, cl = c.pods["srv"], c.pods["cl"]
            deadline = time.monotonic() + 10
            while not proc.listening(srv.pid, 80) and time.monotonic() < deadline:
                time.sleep(0.05)
            cl.run([sys.executable, "-c", CONNECT, srv.ip])          # raises if the connection fails
            node = c.nodes["node1"]
            assert "cali" not in node.run(["iptables-save", "-t", "filter"]).stdout
            assert node.run(["nft", "list", "table", "ip", "calico"], check=False).returncode != 0
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "NOT enforced" in r.getMessage()]
    assert len(warnings) == 1 and "1 NetworkPolicies" in warnings[0].getMessage()
    assert any(r.levelno == logging.INFO and "NOT enforced" in r.getMessage() for r in caplog.records)
