"""Policy agent rendering (no root): felix's chain layout, ipsets, the nftables table, partial
syncs that touch only what changed, and the cluster file's namespaces and policies."""

from __future__ import annotations

import textwrap

import pytest

from k8snetlab import cli, spec as specmod
from k8snetlab.errors import SpecError
from k8snetlab.policy import iptables as ipt, nftables as nft
from k8snetlab.policy.addon import parse_spec
from k8snetlab.policy.dataplane import DATAPLANES, endpoint_chains, policy_chain
from k8snetlab.policy.model import PodInfo, PolicyModel, parse_policy
from k8snetlab.policy.plan import build, hash16

NS = {"x": {"ns": "x"}, "y": {"ns": "y"}}


def pods(labels_b: str = "b") -> list[PodInfo]:
    return [PodInfo("a", "x", {"pod": "a"}, "10.244.0.2", "node1", (("http", "TCP", 8080),)),
            PodInfo("b", "x", {"pod": labels_b}, "10.244.1.2", "node2"),
            PodInfo("c", "y", {"pod": "c"}, "10.244.0.3", "node1")]


ALLOW_B = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "allow-b", "namespace": "x"},
           "spec": {"podSelector": {"matchLabels": {"pod": "a"}},
                    "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}},
                                          {"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.244.0.3/32"]}}],
                                 "ports": [{"port": "http"}, {"port": 9000, "endPort": 9010, "protocol": "UDP"}]}]}}


def plan_for(ps: list[PodInfo], node: str = "node1"):
    return build(PolicyModel(NS, ps, [parse_policy(ALLOW_B, "t")]), node)


def test_iptables_layout_is_felix_s():
    r = ipt.render(plan_for(pods()))
    tw, fw = endpoint_chains(hash16("x/a"))
    pi = policy_chain(hash16("x/allow-b"), "Ingress")
    assert pi.startswith("cali-pi-") and tw.startswith("cali-tw-") and len(pi) <= 28
    assert fw not in r.chains                       # not isolated for egress: no chain
    assert r.chains["cali-to-wl-dispatch"] == (f'-d 10.244.0.2/32 -m comment --comment "x/a" -g {tw}',)
    assert r.chains[tw][-1] == '-m comment --comment "Drop if no policies passed packet" -j DROP'
    assert f"-j {pi}" in r.chains[tw]
    rules = "\n".join(r.chains[pi])
    assert "--match-set cali40n:" in rules and "dst,dst" in rules       # named port as felix's
    assert "-p udp -m udp --dport 9000:9010" in rules                     # endPort
    sets = {n: e for n, (_, e) in r.sets.items()}
    (blk,) = [e for n, e in sets.items() if n.startswith("cali40c:")]
    assert blk == {"0.0.0.0/1", "128.0.0.0/1", "10.244.0.3/32 nomatch"}   # /0 halves, except nomatch
    (sel,) = [e for n, e in sets.items() if n.startswith("cali40s:")]
    assert sel == {"10.244.1.2"}
    (named,) = [e for n, e in sets.items() if n.startswith("cali40n:")]
    assert named == {"10.244.0.2,tcp:8080"}
    assert all(len(n) <= 31 for n in sets)


def test_node_without_isolated_pods_has_only_the_dispatch():
    r = ipt.render(plan_for(pods(), "node2"))
    assert set(r.chains) == {"cali-FORWARD", "cali-from-wl-dispatch", "cali-to-wl-dispatch"} and not r.sets


def test_iptables_partial_sync_after_a_relabel_changes_one_set_element():
    old = ipt.render(plan_for(pods()))
    new = ipt.render(plan_for(pods(labels_b="z")))
    pre, text, post, chains, elements = ipt.restore_text(old, new, add_jump=False)
    assert chains == 0 and elements == 1
    assert pre.strip().startswith("del cali40s:") and "10.244.1.2" in pre
    assert text == "*filter\nCOMMIT\n" and post == ""
    full_pre, full_text, _, full_chains, _ = ipt.restore_text(None, new, add_jump=True)
    assert full_chains == len(new.chains) and "-I FORWARD 1" in full_text and "flush cali40" in full_pre


def test_iptables_partial_sync_removing_a_policy_deletes_its_chains_and_sets():
    old = ipt.render(plan_for(pods()))
    new = ipt.render(build(PolicyModel(NS, pods(), []), "node1"))
    _, text, post, _, _ = ipt.restore_text(old, new, add_jump=False)
    pi = policy_chain(hash16("x/allow-b"), "Ingress")
    assert f":{pi} - [0:0]" in text and f"-X {pi}" in text
    assert post.count("destroy cali40") == 3


def test_nftables_table_with_sets_and_verdict_maps():
    r = nft.render(plan_for(pods()))
    tw, _ = endpoint_chains(hash16("x/a"))
    assert r.sets["to-wl"] == ("type ipv4_addr : verdict", frozenset({f"10.244.0.2 : jump {tw}"}))
    assert r.sets["from-wl"][1] == frozenset()
    text, _, _ = nft.transaction(None, r)
    assert text.startswith("add table ip calico\ndelete table ip calico\nadd table ip calico\n")
    assert "ip daddr vmap @to-wl" in text and "tcp dport" not in text.split("udp dport 9000-9010")[0][-5:]
    assert "ip saddr != @cali40e-" in text and "ip daddr . meta l4proto . th dport @cali40n-" in text


def test_nftables_partial_transaction_touches_only_what_changed():
    old = nft.render(plan_for(pods()))
    new = nft.render(plan_for(pods(labels_b="z")))
    text, chains, elements = nft.transaction(old, new)
    assert chains == 0 and elements == 1
    assert text.strip().startswith("delete element ip calico cali40s-") and "add table" not in text
    gone = nft.render(build(PolicyModel(NS, pods(), []), "node1"))
    text, _, _ = nft.transaction(old, gone)
    assert "delete element ip calico to-wl { 10.244.0.2 }" in text
    assert text.index("flush chain") < text.index("delete chain") and "delete set" in text


def test_counts_parsers_see_hand_deleted_rules():
    save = ":cali-FORWARD - [0:0]\n:cali-x - [0:0]\n-A cali-FORWARD -j cali-x\n-A FORWARD -j cali-FORWARD\n"
    assert ipt.counts_from_save(save) == {"cali-FORWARD": 1, "cali-x": 0}
    assert ipt.elements_from_save("create cali40s:A hash:ip\nadd cali40s:A 1.2.3.4\ncreate other hash:ip\n") == {"cali40s:A": 1}
    doc = {"nftables": [{"chain": {"name": "forward"}}, {"rule": {"chain": "forward"}},
                        {"map": {"name": "to-wl", "elem": [1, 2]}}, {"set": {"name": "s"}}]}
    assert nft.counts_from_json(doc) == ({"forward": 1}, {"to-wl": 2, "s": 0})


def test_dataplanes_registered():
    assert DATAPLANES.names() == ["iptables", "iptables-legacy", "nftables"]
    with pytest.raises(SpecError, match="use one of iptables, iptables-legacy, nftables"):
        DATAPLANES.get("ebpf")


CLUSTER = """\
name: pol
underlay: {subnets: [{name: lan, cidr: 192.168.1.0/24}]}
nodes: [{name: node1, ip: 192.168.1.129}]
cni: {type: host-gw}
networkPolicy: {dataplane: nftables}
workloads:
  - {apiVersion: v1, kind: Namespace, metadata: {name: x, labels: {team: blue}}}
  - apiVersion: v1
    kind: Pod
    metadata: {name: a, namespace: x}
    spec: {containers: [{name: c, command: [sleep, "60"]}]}
  - apiVersion: v1
    kind: Pod
    metadata: {name: a}
    spec: {containers: [{name: c, command: [sleep, "60"]}]}
  - apiVersion: networking.k8s.io/v1
    kind: NetworkPolicy
    metadata: {name: deny, namespace: x}
    spec: {podSelector: {}}
"""


def write(tmp_path, text: str):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_cluster_file_namespaces_and_policies(tmp_path):
    s = specmod.load(write(tmp_path, CLUSTER))
    assert sorted(p.host_name for p in s.pods()) == ["a", "a.x"]      # names unique per namespace
    ps = parse_spec(s)
    assert ps.options.dataplane == "nftables" and ps.options.enabled
    assert ps.namespaces["x"] == {"team": "blue", "kubernetes.io/metadata.name": "x"}
    assert [p.key for p in ps.policies] == ["x/deny"]


@pytest.mark.parametrize("old, new, words", [
    ("podSelector: {}}", "podSelector: {}, ingres: []}", "unknown field 'ingres'"),
    ("podSelector: {}}", "podSelector: {matchExpressions: [{key: a, operator: Is, values: [b]}]}}", "operator"),
    ("podSelector: {}}", "podSelector: {}, ingress: [{ports: [{port: 90, endPort: 80}]}]}", "endPort"),
    ("podSelector: {}}", "podSelector: {}, ingress: [{from: [{ipBlock: {cidr: 10.0.0/8}}]}]}", "CIDR"),
    ("{name: deny, namespace: x}", "{name: deny, namespace: nowhere}", "does not exist"),
    ("{dataplane: nftables}", "{dataplane: ebpf}", "dataplane"),
    ("{dataplane: nftables}", "{dataplan: nftables}", "dataplan"),
    ("metadata: {name: a}\n", "metadata: {name: a, namespace: x}\n", "duplicate pod name 'a' in namespace x"),
])
def test_bad_input_one_line_exit_2(tmp_path, capsys, old, new, words):
    assert old in CLUSTER
    path = write(tmp_path, CLUSTER.replace(old, new, 1))
    with pytest.raises(SpecError, match=words):
        specmod.load(path)
    assert cli.main(["up", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words.split("'")[0] in err[0]


def test_matrix_table_marks_differences():
    from k8snetlab.policy.matrix import Table
    t = Table("TCP", 80, ["x/a", "x/b"], {("x/a", "x/a"): True, ("x/a", "x/b"): False, ("x/b", "x/a"): True,
                                          ("x/b", "x/b"): True},
              {("x/a", "x/a"): True, ("x/a", "x/b"): True, ("x/b", "x/a"): True, ("x/b", "x/b"): True})
    out = t.format()
    assert t.differences == [("x/a", "x/b")]
    comparison = out.split("Comparison")[1].splitlines()
    assert comparison[2].split() == ["x/a", ".", "X"] and out.endswith("1 difference(s): x/a -> x/b")


def test_nftables_compiles_exact_rules_into_one_lookup_per_endpoint():
    """1,000 policies selecting one pod, each allowing one peer on one port: the endpoint's chain
    holds three lookups, not a jump per policy; the peers and ports are set elements."""
    ps = [PodInfo("srv", "x", {"app": "srv"}, "10.244.0.2", "node1", (("http", "TCP", 8080),))]
    ps += [PodInfo(f"c{i}", "x", {"peer": f"p{i}"}, f"10.244.1.{i + 2}", "node2") for i in range(200)]
    pols = [{"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": f"p{i}", "namespace": "x"},
             "spec": {"podSelector": {"matchLabels": {"app": "srv"}},
                      "ingress": [{"from": [{"podSelector": {"matchLabels": {"peer": f"p{i}"}}}],
                                   "ports": [{"port": "http"}, {"port": 9000, "endPort": 9001}]}]}} for i in range(200)]
    pols.append({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "web", "namespace": "x"},
                 "spec": {"podSelector": {}, "ingress": [{"ports": [{"port": 80}]}]}})
    r = nft.render(build(PolicyModel(NS, ps, [parse_policy(p, "t") for p in pols]), "node1"))
    tw, _ = endpoint_chains(hash16("x/srv"))
    assert not any(rule.startswith("jump") for rule in r.chains[tw])
    assert r.sets[f"{tw}-ap"][1] >= {"10.244.1.2 . tcp . 8080", "10.244.1.201 . tcp . 9001"}
    assert len(r.sets[f"{tw}-ap"][1]) == 600 and r.sets[f"{tw}-p"][1] == {"tcp . 80"}
    assert [c for c in r.chains if c.startswith("cali-pi-")] == []
    # an ipBlock keeps its policy chain, jumped to after the lookups
    r = nft.render(plan_for(pods()))
    assert any(rule.startswith("jump cali-pi-") for rule in r.chains[endpoint_chains(hash16("x/a"))[0]])


def test_disabled_is_flannel_alone_policies_accepted_and_ignored(tmp_path, caplog):
    import logging
    import types
    from k8snetlab.policy.addon import PolicyAddon
    from k8snetlab.policy.matrix import model_of
    s = specmod.load(write(tmp_path, CLUSTER.replace("{dataplane: nftables}", "{enabled: false}")))
    cluster = types.SimpleNamespace(spec=s, state=None, pods={}, nodes={})
    addon = PolicyAddon(cluster)
    with caplog.at_level(logging.WARNING):
        addon.start()
    assert not addon.agents and "NOT enforced" in caplog.text
    addon.add({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
               "metadata": {"name": "more", "namespace": "x"}, "spec": {"podSelector": {}}})
    assert not addon.agents and set(addon.policies) == {"x/deny", "x/more"}
    state = addon.state()
    a = PodInfo("a", "x", {}, "10.244.0.2", "node1")
    state["pods"] = [dict(name="a", namespace="x", labels={}, ip="10.244.0.2", node="node1", ports=[], host="a.x")]
    state["nodes"] = {}
    model, _ = model_of(state)
    assert model.allowed("10.1.1.1", model.pods[0], 80) and model.policies == [] and a.key == "x/a"


@pytest.mark.parametrize("argv, words", [
    (["policy", "matrix", "--port", "0"], "--port 0"),
    (["policy", "matrix", "--protocol", "ICMP"], "--protocol ICMP"),
    (["policy", "matrix", "--cluster", "no-such-cluster-anywhere"], "no running cluster of that name"),
    (["policy", "explain", "a", "b", "70000"], "port 70000"),
])
def test_policy_cli_bad_input_one_line_exit_2(capsys, argv, words):
    import os
    if os.geteuid() != 0:
        words = "needs root"
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0]


@pytest.mark.parametrize("old, new, words", [
    ("podSelector: {}}", "podSelector: {}, ingres: []}", "unknown field 'ingres'"),
    ("podSelector: {}}", "podSelector: {matchExpressions: [{key: a, operator: Is, values: [b]}]}}", "'Is' is not a valid selector operator"),
    ("podSelector: {}}", "podSelector: {}, ingress: [{ports: [{port: 90, endPort: 80}]}]}", "endPort: 80 is below port 90"),
    ("podSelector: {}}", "podSelector: {}, ingress: [{from: [{ipBlock: {cidr: 10.0.0/8}}]}]}", "CIDR"),
    ("{name: deny, namespace: x}", "{name: deny, namespace: nowhere}", "namespace 'nowhere' does not exist"),
])
def test_done_when_bad_input_through_the_cli_builds_nothing(tmp_path, old, new, words):
    """The issue's bad-input cases through ``k8snetlab up`` as a real process: one line naming
    the problem, exit 2, and no cluster constructed (the harness exits 99 if one were)."""
    from cli_harness import cli as run_cli, one_error_line
    path = write(tmp_path, CLUSTER.replace(old, new, 1))
    line = one_error_line(run_cli("up", str(path)))
    assert words in line and "workloads[3]" in line, line          # the policy, by its place


def test_policy_json_follows_every_pod_change_and_keeps_each_entry_between_writes(tmp_path):
    """policy.json is rewritten at every sync; a pod's entry is encoded once and kept until
    its labels (a new spec), IP, PID or node change, and dropped when the pod goes."""
    import dataclasses
    import json
    import types
    from k8snetlab.manifests import PodSpec
    from k8snetlab.policy.addon import PolicyAddon
    s = specmod.load(write(tmp_path, CLUSTER.replace("{dataplane: nftables}", "{enabled: false}")))

    def pod(i):
        return types.SimpleNamespace(name=f"web-{i}.x", spec=PodSpec(f"web-{i}", namespace="x", labels={"app": "web"}),
                                     ip=f"10.244.0.{i + 2}", pid=1000 + i, node_name="node1")
    pods = {p.name: p for p in map(pod, range(3))}
    addon = PolicyAddon(types.SimpleNamespace(spec=s, state=None, pods=pods, nodes={}))
    want = lambda p: {"name": p.spec.name, "namespace": "x", "labels": dict(p.spec.labels), "ip": p.ip,  # noqa: E731
                      "node": "node1", "ports": [], "host": p.name, "pid": p.pid}
    assert addon.state()["pods"] == [want(p) for p in pods.values()]
    first = addon._entries["web-0.x"][2]
    assert addon.state() and addon._entries["web-0.x"][2] is first         # kept, not encoded again
    p0 = pods["web-0.x"]
    p0.spec = dataclasses.replace(p0.spec, labels={"app": "db"})            # kubectl label
    p0.ip = "10.244.0.9"
    assert addon.state()["pods"][0] == want(p0) and want(p0)["labels"] == {"app": "db"}
    del pods["web-1.x"]
    assert [e["name"] for e in addon.state()["pods"]] == ["web-0", "web-2"]
    assert set(addon._entries) == {"web-0.x", "web-2.x"}
    pods.clear()
    assert addon.state()["pods"] == [] and not addon._entries
    json.loads(addon._state_text())


def test_pods_told_leaving_stay_out_of_the_model_until_a_pod_of_that_name_comes_again(tmp_path):
    """A scale-down tells the add-ons of every leaving pod before any is torn down: the sync
    for the second must not put the first back; a new pod of the same name counts again."""
    import types
    from k8snetlab.manifests import PodSpec
    from k8snetlab.policy.addon import PolicyAddon
    s = specmod.load(write(tmp_path, CLUSTER.replace("{dataplane: nftables}", "{enabled: false}")))
    pods = {f"p{i}.x": types.SimpleNamespace(name=f"p{i}.x", spec=PodSpec(f"p{i}", namespace="x"),
                                             ip=f"10.244.0.{i + 2}", pid=100 + i, node_name="node1")
            for i in range(3)}
    addon = PolicyAddon(types.SimpleNamespace(spec=s, state=None, pods=pods, nodes={}))
    names = lambda: sorted(p.name for p in addon.model().pods)  # noqa: E731
    addon.pod_removing(pods["p0.x"])
    addon.pod_removing(pods["p1.x"])
    assert names() == ["p2"] and [e["name"] for e in addon.state()["pods"]] == ["p2"]
    back = pods.pop("p0.x")
    del pods["p1.x"]
    assert names() == ["p2"] and addon._leaving == set()
    pods["p0.x"] = back                      # scaled up again: the same name
    addon.pods_added([back])
    assert names() == ["p0", "p2"]
