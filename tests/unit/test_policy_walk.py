"""The rules a new connection walks (no root): felix's dispatch tree keyed on address prefixes,
policies that do not select a pod stay off its path, the walk evaluator of both dataplanes'
rules, and the populations experiments/policy_scale.py measures."""

from __future__ import annotations

from pathlib import Path

import pytest

from k8snetlab import spec
from k8snetlab.errors import K8sNetLabError
from k8snetlab.policy import iptables as ipt, nftables as nft
from k8snetlab.policy.dataplane import Rendered, endpoint_chains
from k8snetlab.policy.model import PodInfo, PolicyModel, parse_policy
from k8snetlab.policy.plan import build, hash16
from k8snetlab.policy.walk import Packet, iptables_walk, nftables_walk
from cli_harness import experiment_module

REPO = Path(__file__).resolve().parents[2]
NS = {"x": {"ns": "x"}}
CLIENT = "10.244.0.2"


def pol(name: str, select: dict, peer: dict, ports=(7000, 5201)) -> dict:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": name, "namespace": "x"},
            "spec": {"podSelector": {"matchLabels": select},
                     "ingress": [{"from": [{"podSelector": {"matchLabels": peer}}],
                                  "ports": [{"port": p} for p in ports]}]}}


def ip_of(i: int) -> str:
    return f"10.244.{4 + i // 250}.{i % 250 + 2}"


def cluster(pods: int, manifests: list[dict]):
    ps = [PodInfo("cl", "x", {"role": "cl"}, CLIENT, "node1")]
    ps += [PodInfo(f"p{i}", "x", {"app": f"a{i}"}, ip_of(i), "node2") for i in range(pods)]
    return build(PolicyModel(NS, ps, [parse_policy(m, "t") for m in manifests]), "node2")


def test_dispatch_is_a_tree_a_new_connection_walks_few_rules_of():
    """1,000 isolated pods on a node: no dispatch chain lists more than 16 rules, and the first
    packet to any of them walks a few dozen rules, not one per pod."""
    plan = cluster(1000, [pol(f"p{i}", {"app": f"a{i}"}, {"role": "cl"}) for i in range(1000)])
    r = ipt.render(plan)
    dispatch = {c: rules for c, rules in r.chains.items() if c.startswith("cali-to-wl-dispatch")}
    assert len(dispatch) > 16 and max(len(rules) for rules in dispatch.values()) <= 16
    assert all(len(c) <= 28 for c in r.chains)
    walks = [iptables_walk(r, Packet(CLIENT, ip_of(i), "tcp", 7000)) for i in (0, 499, 999)]
    assert [w.verdict for w in walks] == ["continue"] * 3        # allowed: on to the hook's other rules
    assert max(w.rules for w in walks) <= 60
    # the goto of each endpoint is reached from exactly one branch
    tw = endpoint_chains(hash16("x/p999"))[0]
    assert sum(rule.endswith(f"-g {tw}") for rules in dispatch.values() for rule in rules) == 1
    denied = iptables_walk(r, Packet(CLIENT, ip_of(7), "tcp", 9))
    assert denied.verdict == "drop" and denied.path[-1][0] == endpoint_chains(hash16("x/p7"))[0]
    # a pod that is not isolated falls off the dispatch
    assert iptables_walk(r, Packet(CLIENT, "10.244.9.9", "tcp", 7000)).verdict == "continue"


def test_few_endpoints_keep_one_flat_dispatch_chain():
    r = ipt.render(cluster(3, [pol("p", {}, {"role": "cl"})]))
    assert [c for c in r.chains if "dispatch" in c] == ["cali-from-wl-dispatch", "cali-to-wl-dispatch"]
    assert len(r.chains["cali-to-wl-dispatch"]) == 3


def test_policies_that_do_not_select_a_pod_are_off_its_path():
    """300 policies each selecting another pod: the measured pod's first packet walks the same
    rules as with its own policy alone; when all 300 select it, it walks all of them."""
    own = [pol("own", {"app": "a0"}, {"role": "cl"})]
    others = [pol(f"o{i}", {"app": f"none{i}"}, {"peer": f"p{i}"}) for i in range(299)]
    pkt = Packet(CLIENT, ip_of(0), "tcp", 7000)
    alone = iptables_walk(ipt.render(cluster(1, own)), pkt)
    spread = iptables_walk(ipt.render(cluster(1, others + own)), pkt)
    assert spread.rules == alone.rules <= 15 and spread.verdict == "continue"
    worst = [pol(f"w{i:04d}", {"app": "a0"}, {"peer": f"p{i}"}) for i in range(299)] + [pol("zz", {"app": "a0"}, {"role": "cl"})]
    walked = iptables_walk(ipt.render(cluster(1, worst)), pkt)
    assert walked.verdict == "continue" and walked.rules > 6 * 299        # felix's layout: every policy in turn
    n = nftables_walk(nft.render(cluster(1, worst)), pkt)
    assert n.verdict == "continue" and n.rules <= 10                     # compiled into lookups


@pytest.mark.parametrize("render, walk", [(ipt.render, iptables_walk), (nft.render, nftables_walk)])
def test_walk_agrees_with_the_model(render, walk):
    """The evaluator's verdict on each dataplane's rules is the model's, for selector peers, an
    ipBlock with except, a named port and an endPort range."""
    ps = [PodInfo("a", "x", {"pod": "a"}, "10.244.0.2", "node1", (("http", "TCP", 8080),)),
          PodInfo("b", "x", {"pod": "b"}, "10.244.1.2", "node2"),
          PodInfo("c", "x", {"pod": "c"}, "10.244.0.3", "node1")]
    m = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "p", "namespace": "x"},
         "spec": {"podSelector": {"matchLabels": {"pod": "a"}},
                  "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}},
                                        {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.244.0.3/32"]}}],
                               "ports": [{"port": "http"}, {"port": 9000, "endPort": 9010, "protocol": "UDP"}]}]}}
    model = PolicyModel(NS, ps, [parse_policy(m, "t")])
    r = render(build(model, "node1"))
    for src in ("10.244.1.2", "10.244.0.3", "10.9.9.9", "192.168.1.1"):
        for proto, port in (("tcp", 8080), ("tcp", 80), ("udp", 9005), ("udp", 9011)):
            want = model.allowed(src, model.pods[0], port, proto.upper())
            got = walk(r, Packet(src, "10.244.0.2", proto, port)).verdict != "drop"
            assert got == want, (src, proto, port)


def test_walk_refuses_rules_it_does_not_know():
    r = Rendered(chains={"cali-FORWARD": ("-m physdev --physdev-in x -j DROP",)})
    with pytest.raises(K8sNetLabError, match="not understood"):
        iptables_walk(r, Packet(CLIENT, "10.244.1.2"))


@pytest.fixture(scope="module")
def ps():
    return experiment_module("policy_scale.py", "policy_scale_under_test")


def test_experiment_spread_population_selects_the_server_by_a_few_policies(ps):
    pols = ps.policies(1000, "spread", selecting=3, apps=1000)
    server = [p for p in pols if p["spec"]["podSelector"]["matchLabels"] == {"app": ps.SERVER}]
    assert len(server) == 3 and server[-1]["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"] == {"role": ps.CLIENT}
    others = {p["spec"]["podSelector"]["matchLabels"]["app"] for p in pols if p not in server}
    assert len(others) == 997                                             # each selects a different pod
    worst = ps.policies(1000, "worst")
    assert all(p["spec"]["podSelector"]["matchLabels"] == {"app": ps.SERVER} for p in worst)
    assert worst[-1]["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"] == {"role": ps.CLIENT}


def test_experiment_large_run_fits_the_runtime_s_bounds(ps):
    s = ps.experiment_spec(spec.load(REPO / "topologies" / "three_nodes.yaml"), 1000)
    server_node = next(w for w in s.workloads if w.name == ps.SERVER).template.node_name
    on_server = [p for p in s.pods() if p.node_name == server_node]
    assert len(on_server) == 1002 and len(s.pods()) == 1003          # server, control, 1,000 selected
    node = next(n for n in s.nodes if n.name == server_node)
    assert node.pod_cidr.num_addresses - 3 >= 1002


def test_experiment_flags_an_impossible_first_packet_figure(ps):
    assert "IMPOSSIBLE" in ps.first_packet_line("nftables", 1000, "spread", -50.0, -60.0, -40.0, 500)
    assert "met" in ps.first_packet_line("nftables", 1000, "spread", 2.0, -1.0, 5.0, 500)
    assert "worst case" in ps.first_packet_line("iptables", 1000, "worst", 9000.0, 8000.0, 9500.0, 500)


def test_experiment_added_is_the_difference_of_differences(ps):
    """Server minus control with N policies, minus the same with 0: a shift both pods share
    (the machine's drift) cancels; the server's own extra cost stays."""
    base_s, base_c = [100.0 + i % 7 for i in range(200)], [98.0 + i % 7 for i in range(200)]
    srv, ctl = [v + 30 + 12 for v in base_s], [v + 30 for v in base_c]          # drift 30, policy 12
    value, low, high = ps.added_interval(srv, ctl, base_s, base_c, samples=200)
    assert value == 12.0 and low <= 12.0 <= high


def test_indexed_selection_is_the_plain_scan():
    """The model's label index gives the same policies per pod and pods per peer as matching
    every selector against every pod (matchLabels, matchExpressions, empty, other namespaces)."""
    ns = {"x": {"team": "a"}, "y": {"team": "b"}}
    ps = [PodInfo(f"p{i}", "xy"[i % 2], {"app": f"a{i % 5}", **({"tier": "web"} if i % 3 else {})},
                  f"10.244.0.{i + 2}", "node1") for i in range(30)]
    sels = [{"matchLabels": {"app": "a1"}}, {}, {"matchLabels": {"app": "a2", "tier": "web"}},
            {"matchExpressions": [{"key": "tier", "operator": "DoesNotExist"}]},
            {"matchLabels": {"app": "none"}}]
    manifests = []
    for i, sel in enumerate(sels):
        for n in ("x", "y"):
            manifests.append({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                              "metadata": {"name": f"s{i}", "namespace": n},
                              "spec": {"podSelector": sel, "policyTypes": ["Ingress", "Egress"],
                                       "ingress": [{"from": [{"podSelector": sels[(i + 1) % 5]},
                                                             {"namespaceSelector": {"matchLabels": {"team": "b"}},
                                                              "podSelector": sel}]}]}})
    model = PolicyModel(ns, ps, [parse_policy(m, "t") for m in manifests])
    for pod in ps:
        for d in ("Ingress", "Egress"):
            want = [p for p in model.policies if p.namespace == pod.namespace and p.pod_selector.matches(pod.labels)]
            assert model.selecting(pod, d) == want
    for pol in model.policies:
        for peer in pol.ingress[0].peers:
            want = [p for p in ps if model._peer_selects(peer, pol.namespace, p)]
            assert model.peer_pods(peer, pol.namespace) == want


def test_counter_check_sees_a_rule_the_walk_did_not_take():
    from k8snetlab.policy.walk import check_against_counters, save_counters
    r = ipt.render(cluster(2, [pol("p", {"app": "a0"}, {"role": "cl"})]))
    w = iptables_walk(r, Packet(CLIENT, ip_of(0), "tcp", 7000))
    lines = [f"[0:0] -A {c} {rule}" for c, rules in r.chains.items() for rule in rules]
    before = save_counters("\n".join(lines))
    after = dict(before)
    for key in w.path:
        after[key] += 1
    after[("cali-FORWARD", 0)] += 5                      # the connection's later packets
    assert check_against_counters(w, before, after) == []
    tw = endpoint_chains(hash16("x/p0"))[0]
    after[(tw, len(r.chains[tw]) - 1)] += 1               # the drop counted too
    assert check_against_counters(w, before, after) == [f"{tw} rule {len(r.chains[tw])}: counted 1, the walk says 0"]
