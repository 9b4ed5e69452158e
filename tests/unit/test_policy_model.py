"""The NetworkPolicy model against Kubernetes' semantics: the reachability cases of the
upstream policy e2e suite (namespaces x, y, z; pods a, b, c; ports 80/81, TCP/UDP), each with
its expected truth table built independently, as the e2e suite builds its Reachability."""

from __future__ import annotations

import pytest

from k8snetlab.errors import SpecError
from k8snetlab.policy.model import PodInfo, PolicyModel, parse_policy

NS = ("x", "y", "z")
PODS = ("a", "b", "c")
PORTS = (("serve-80-tcp", "TCP", 80), ("serve-80-udp", "UDP", 80),
         ("serve-81-tcp", "TCP", 81), ("serve-81-udp", "UDP", 81))


def world(labels: dict[str, dict[str, str]] | None = None, ns_labels: dict[str, dict[str, str]] | None = None,
          ) -> tuple[dict[str, dict[str, str]], list[PodInfo]]:
    ns = {n: {"ns": n, **(ns_labels or {}).get(n, {})} for n in NS}
    pods, i = [], 0
    for n in NS:
        for p in PODS:
            key = f"{n}/{p}"
            pods.append(PodInfo(p, n, (labels or {}).get(key, {"pod": p}), f"10.244.{i % 2}.{i + 2}",
                                f"node{i % 2 + 1}", PORTS))
            i += 1
    return ns, pods


def policy(name: str, ns: str = "x", **spec) -> dict:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}


class Reach:
    """Expected reachability, all allowed to start with (the e2e suite's Reachability)."""

    def __init__(self, default: bool = True):
        self.keys = [f"{n}/{p}" for n in NS for p in PODS]
        self.t = {(a, b): default for a in self.keys for b in self.keys}

    def set(self, a: str, b: str, v: bool) -> "Reach":
        self.t[(a, b)] = v
        return self

    def ingress(self, b: str, v: bool) -> "Reach":
        for a in self.keys:
            self.t[(a, b)] = v
        return self

    def egress(self, a: str, v: bool) -> "Reach":
        for b in self.keys:
            self.t[(a, b)] = v
        return self

    def self_allowed(self) -> "Reach":
        for a in self.keys:
            self.t[(a, a)] = True
        return self


def check(policies: list[dict], reach: Reach, port: int = 80, proto: str = "TCP", **w) -> None:
    ns, pods = world(**w)
    model = PolicyModel(ns, pods, [parse_policy(p, "t") for p in policies])
    got = model.matrix(pods, port, proto)
    wrong = [k for k in reach.t if got[k] != reach.t[k]]
    assert not wrong, f"{len(wrong)} cells differ, e.g. {wrong[:5]} (expected {reach.t[wrong[0]]})"


SEL_A = {"matchLabels": {"pod": "a"}}


def test_no_policy_everything_connects():
    check([], Reach())


def test_default_deny_ingress():
    r = Reach()
    for p in PODS:
        r.ingress(f"x/{p}", False)
    check([policy("deny", podSelector={})], r.self_allowed())


def test_default_deny_all_ingress_and_egress():
    r = Reach()
    for p in PODS:
        r.ingress(f"x/{p}", False).egress(f"x/{p}", False)
    check([policy("deny", podSelector={}, policyTypes=["Ingress", "Egress"])], r.self_allowed())


def test_allow_from_pods_of_the_same_namespace_by_pod_selector():
    r = Reach().ingress("x/a", False).set("x/b", "x/a", True).self_allowed()
    check([policy("p", podSelector=SEL_A, ingress=[{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}])], r)


def test_allow_from_all_namespaces():
    check([policy("p", podSelector=SEL_A, ingress=[{"from": [{"namespaceSelector": {}}]}])], Reach())


def test_allow_only_from_a_different_namespace():
    r = Reach().ingress("x/a", False)
    for p in PODS:
        r.set(f"y/{p}", "x/a", True)
    check([policy("p", podSelector=SEL_A, ingress=[{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}])],
          r.self_allowed())


def test_pod_selector_match_expressions():
    r = Reach().ingress("x/a", False).set("x/b", "x/a", True).self_allowed()
    sel = {"matchExpressions": [{"key": "pod", "operator": "In", "values": ["b"]}]}
    check([policy("p", podSelector=SEL_A, ingress=[{"from": [{"podSelector": sel}]}])], r)


def test_namespace_selector_match_expressions_notin():
    r = Reach().ingress("x/a", False)
    for n in ("y", "z"):
        for p in PODS:
            r.set(f"{n}/{p}", "x/a", True)
    sel = {"matchExpressions": [{"key": "ns", "operator": "NotIn", "values": ["x"]}]}
    check([policy("p", podSelector=SEL_A, ingress=[{"from": [{"namespaceSelector": sel}]}])], r.self_allowed())


def test_pod_selector_or_namespace_selector_two_peers():
    r = Reach().ingress("x/a", False).set("x/b", "x/a", True)
    for p in PODS:
        r.set(f"y/{p}", "x/a", True)
    peers = [{"podSelector": {"matchLabels": {"pod": "b"}}}, {"namespaceSelector": {"matchLabels": {"ns": "y"}}}]
    check([policy("p", podSelector=SEL_A, ingress=[{"from": peers}])], r.self_allowed())


def test_pod_selector_and_namespace_selector_one_peer():
    r = Reach().ingress("x/a", False).set("y/b", "x/a", True).set("z/b", "x/a", True).self_allowed()
    peer = {"podSelector": {"matchLabels": {"pod": "b"}},
            "namespaceSelector": {"matchExpressions": [{"key": "ns", "operator": "NotIn", "values": ["x"]}]}}
    check([policy("p", podSelector=SEL_A, ingress=[{"from": [peer]}])], r)


def test_default_namespace_label_kubernetes_io_metadata_name():
    r = Reach().ingress("x/a", False).set("y/c", "x/a", True).self_allowed()
    peer = {"podSelector": {"matchLabels": {"pod": "c"}},
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "y"}}}
    check([policy("p", podSelector=SEL_A, ingress=[{"from": [peer]}])], r)


def test_exists_and_does_not_exist():
    labels = {"x/b": {"pod": "b", "tier": "web"}}
    r = Reach().ingress("x/a", False).set("x/b", "x/a", True).self_allowed()
    sel = {"matchExpressions": [{"key": "tier", "operator": "Exists"}]}
    check([policy("p", podSelector=SEL_A, ingress=[{"from": [{"podSelector": sel}]}])], r, labels=labels)
    r = Reach().ingress("x/a", False).set("x/a", "x/a", True).set("x/c", "x/a", True)
    sel = {"matchExpressions": [{"key": "tier", "operator": "DoesNotExist"}]}
    check([policy("p", podSelector=SEL_A, ingress=[{"from": [{"podSelector": sel}]}])], r, labels=labels)


def test_ports_number_and_protocol():
    pol = policy("p", podSelector=SEL_A, ingress=[{"ports": [{"port": 81}]}])
    check([pol], Reach().ingress("x/a", False).self_allowed(), port=80)
    check([pol], Reach(), port=81)
    check([pol], Reach().ingress("x/a", False).self_allowed(), port=81, proto="UDP")


def test_only_udp_does_not_allow_tcp():
    pol = policy("p", podSelector=SEL_A, ingress=[{"ports": [{"protocol": "UDP", "port": 81}]}])
    check([pol], Reach().ingress("x/a", False).self_allowed(), port=81, proto="TCP")
    check([pol], Reach(), port=81, proto="UDP")


def test_protocol_without_port_allows_every_port_of_it():
    pol = policy("p", podSelector=SEL_A, ingress=[{"ports": [{"protocol": "UDP"}]}])
    check([pol], Reach(), port=80, proto="UDP")
    check([pol], Reach().ingress("x/a", False).self_allowed(), port=80, proto="TCP")


def test_sctp_is_not_tcp_but_still_isolates():
    pol = policy("p", podSelector=SEL_A, ingress=[{"ports": [{"protocol": "SCTP", "port": 80}]}])
    check([pol], Reach().ingress("x/a", False).self_allowed(), port=80, proto="TCP")


def test_named_port_ingress():
    pol = policy("p", podSelector=SEL_A, ingress=[{"ports": [{"port": "serve-80-tcp"}]}])
    check([pol], Reach(), port=80)
    check([pol], Reach().ingress("x/a", False).self_allowed(), port=81)
    check([pol], Reach().ingress("x/a", False).self_allowed(), port=80, proto="UDP")


def test_named_port_from_namespace():
    pol = policy("p", podSelector=SEL_A, ingress=[{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}],
                                                   "ports": [{"port": "serve-80-tcp"}]}])
    r = Reach().ingress("x/a", False)
    for p in PODS:
        r.set(f"y/{p}", "x/a", True)
    check([pol], r.self_allowed(), port=80)
    check([pol], Reach().ingress("x/a", False).self_allowed(), port=81)


def test_named_port_egress_resolves_on_the_destination():
    pol = policy("p", podSelector=SEL_A, policyTypes=["Egress"], egress=[{"ports": [{"port": "serve-81-udp", "protocol": "UDP"}]}])
    check([pol], Reach(), port=81, proto="UDP")
    check([pol], Reach().egress("x/a", False).self_allowed(), port=80, proto="UDP")
    # a destination without that named port: denied even on 81
    ns, pods = world()
    pods[3] = PodInfo("a", "y", {"pod": "a"}, pods[3].ip, pods[3].node, ())
    model = PolicyModel(ns, pods, [parse_policy(pol, "t")])
    assert not model.allowed(pods[0], pods[3], 81, "UDP")
    assert model.allowed(pods[0], pods[4], 81, "UDP")


def test_end_port_range():
    pol = policy("p", podSelector=SEL_A, ingress=[{"ports": [{"port": 81, "endPort": 90}]}])
    check([pol], Reach().ingress("x/a", False).self_allowed(), port=80)
    check([pol], Reach(), port=81)
    ns, pods = world()
    model = PolicyModel(ns, pods, [parse_policy(pol, "t")])
    assert model.allowed(pods[1], pods[0], 90) and not model.allowed(pods[1], pods[0], 91)


def test_stacked_policies_add_up():
    p1 = policy("p1", podSelector=SEL_A, ingress=[{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}])
    p2 = policy("p2", podSelector={"matchExpressions": [{"key": "pod", "operator": "In", "values": ["a", "b"]}]},
                ingress=[{"from": [{"podSelector": {"matchLabels": {"pod": "c"}}}]}])
    r = Reach().ingress("x/a", False).ingress("x/b", False)
    r.set("x/b", "x/a", True).set("x/c", "x/a", True).set("x/c", "x/b", True).self_allowed()
    check([p1, p2], r)


def test_allow_all_rule_takes_precedence_over_deny():
    deny = policy("deny", podSelector={})
    allow = policy("all", podSelector={}, ingress=[{}])
    check([deny, allow], Reach())
    egress_deny = policy("edeny", podSelector={}, policyTypes=["Egress"])
    egress_all = policy("eall", podSelector={}, policyTypes=["Egress"], egress=[{}])
    check([egress_deny, egress_all], Reach())


def test_deny_egress_by_pod_selector_and_client_side_denial_wins():
    eg = policy("eg", podSelector=SEL_A, policyTypes=["Egress"])
    allow_in = policy("in", "y", podSelector={}, ingress=[{}])
    check([eg, allow_in], Reach().egress("x/a", False).self_allowed())


def test_egress_to_pod_in_other_namespace():
    peer = {"podSelector": {"matchLabels": {"pod": "b"}}, "namespaceSelector": {"matchLabels": {"ns": "y"}}}
    pol = policy("p", podSelector=SEL_A, policyTypes=["Egress"], egress=[{"to": [peer]}])
    check([pol], Reach().egress("x/a", False).set("x/a", "y/b", True).self_allowed())


def test_ingress_and_egress_together_and_independent():
    pol = policy("p", podSelector=SEL_A, policyTypes=["Ingress", "Egress"],
                 ingress=[{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}],
                 egress=[{"to": [{"podSelector": {"matchLabels": {"pod": "c"}}}]}])
    r = Reach().ingress("x/a", False).egress("x/a", False).set("x/b", "x/a", True).set("x/a", "x/c", True)
    check([pol], r.self_allowed())


def test_ip_block_with_except():
    ns, pods = world()
    ya, yb = pods[3], pods[4]
    pol = policy("p", podSelector=SEL_A, policyTypes=["Egress"],
                 egress=[{"to": [{"ipBlock": {"cidr": "10.244.0.0/16", "except": [f"{yb.ip}/32"]}}]}])
    model = PolicyModel(ns, pods, [parse_policy(pol, "t")])
    xa = pods[0]
    assert model.allowed(xa, ya, 80) and not model.allowed(xa, yb, 80)
    assert not model.allowed(xa, "192.168.1.5", 80)
    # an address in both cidr and except of one policy, allowed by another: allowed
    other = policy("q", podSelector=SEL_A, policyTypes=["Egress"], egress=[{"to": [{"ipBlock": {"cidr": f"{yb.ip}/32"}}]}])
    model = PolicyModel(ns, pods, [parse_policy(pol, "t"), parse_policy(other, "t")])
    assert model.allowed(xa, yb, 80)


def test_ip_block_everything():
    ns, pods = world()
    pol = policy("p", podSelector=SEL_A, policyTypes=["Egress"], egress=[{"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}])
    model = PolicyModel(ns, pods, [parse_policy(pol, "t")])
    assert model.allowed(pods[0], "8.8.8.8", 443) and model.allowed(pods[0], pods[8], 80)


def test_updated_labels_change_reachability():
    pol = policy("p", podSelector=SEL_A, ingress=[{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}])
    check([pol], Reach().ingress("x/a", False).set("x/b", "x/a", True).self_allowed())
    relabelled = {"x/c": {"pod": "b"}}
    check([pol], Reach().ingress("x/a", False).set("x/b", "x/a", True).set("x/c", "x/a", True).self_allowed(),
          labels=relabelled)
    ns_pol = policy("n", podSelector=SEL_A, ingress=[{"from": [{"namespaceSelector": {"matchLabels": {"team": "t"}}}]}])
    r = Reach().ingress("x/a", False)
    for p in PODS:
        r.set(f"z/{p}", "x/a", True)
    check([ns_pol], r.self_allowed(), ns_labels={"z": {"team": "t"}})


def test_policy_in_another_namespace_does_not_isolate():
    check([policy("deny", "y", podSelector=SEL_A)], Reach().ingress("y/a", False).self_allowed())


def test_node_reaches_its_own_pods_and_explain():
    ns, pods = world()
    model = PolicyModel(ns, pods, [parse_policy(policy("deny", podSelector={}), "t")],
                        node_ips={"node1": {"192.168.1.129"}})
    xa = pods[0]
    assert model.allowed("192.168.1.129", xa, 80)
    v = model.verdict("192.168.1.130", xa, 80)
    assert not v.allowed and "isolated for ingress by x/deny" in v.explain()
    allow = policy("ok", podSelector=SEL_A, ingress=[{"from": [{"podSelector": {}}]}])
    model = PolicyModel(ns, pods, [parse_policy(p, "t") for p in (policy("deny", podSelector={}), allow)])
    v = model.verdict(pods[1], xa, 80)
    assert v.allowed and str(v.ingress.match) == "x/ok ingress rule 0"


def test_policy_types_default():
    assert parse_policy(policy("p", podSelector={}), "t").policy_types == ("Ingress",)
    assert parse_policy(policy("p", podSelector={}, egress=[{}]), "t").policy_types == ("Ingress", "Egress")


@pytest.mark.parametrize("spec, words", [
    ({"podSelector": {}, "ingres": []}, "unknown field 'ingres'"),
    ({"podSelector": {"matchExpressions": [{"key": "a", "operator": "Equals", "values": ["b"]}]}}, "operator"),
    ({"podSelector": {}, "ingress": [{"ports": [{"port": 90, "endPort": 80}]}]}, "endPort"),
    ({"podSelector": {}, "ingress": [{"ports": [{"port": "http", "endPort": 80}]}]}, "numeric port"),
    ({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.300/8"}}]}]}, "not a valid IPv4 CIDR"),
    ({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.1/8"}}]}]}, "not a valid IPv4 CIDR"),
    ({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["11.0.0.0/24"]}}]}]},
     "within cidr"),
    ({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}}]}]},
     "may not be combined"),
    ({"podSelector": {}, "ingress": [{"from": [{}]}]}, "a peer needs"),
    ({"podSelector": {}, "policyTypes": ["Inbound"]}, "Ingress or Egress"),
    ({"podSelector": {}, "ingress": [{"ports": [{"protocol": "ICMP"}]}]}, "protocol"),
    ({"podSelector": {}, "ingress": [{"ports": [{"port": 0}]}]}, "1-65535"),
    ({"podSelector": {"matchExpressions": [{"key": "a", "operator": "In"}]}}, "at least one value"),
    ({"podSelector": {"matchExpressions": [{"key": "a", "operator": "Exists", "values": ["x"]}]}}, "takes no values"),
    ({"ingress": []}, "podSelector: required"),
])
def test_bad_policies_refused_with_the_key(spec, words):
    with pytest.raises(SpecError, match=words.replace("(", r"\(").replace(")", r"\)")):
        parse_policy(policy("p", **spec), "f.yaml: workloads[3]")


def test_bad_api_version_and_unknown_top_field():
    doc = policy("p", podSelector={})
    with pytest.raises(SpecError, match="apiVersion"):
        parse_policy({**doc, "apiVersion": "extensions/v1beta1"}, "w")
    with pytest.raises(SpecError, match="unknown field 'status'"):
        parse_policy({**doc, "status": {}}, "w")
