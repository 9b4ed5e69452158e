"""What the kube-proxy modes write into a node, rendered without root: the iptables-restore
batch (chain names, probabilities, masquerade and reject rules), the nft transaction, and the
conntrack entries flushed after a change."""

from __future__ import annotations

import re
from ipaddress import IPv4Network

import pytest

from k8snetlab.services.iptables import (
    JUMPS,
    IptablesRules,
    present_jumps,
    probability,
    sep_chain,
    svc_chain,
)
from k8snetlab.services.model import Endpoint, ServiceAllocator, Snapshot, parse_service
from k8snetlab.services.nftables import NftablesRules, chain_base, element_key, hash_and_truncate
from k8snetlab.services.proxy import stale_udp_flows

CIDR = "10.244.0.0/16"


def make(name: str, **spec):
    doc = {"metadata": {"name": name}, "spec": {"selector": {"app": name},
                                                "ports": [{"name": "http", "port": 80, "targetPort": 8080}], **spec}}
    return parse_service(doc, name)


def snapshot(*pairs, alloc=None):
    alloc = alloc or ServiceAllocator(IPv4Network("10.96.0.0/12"))
    services, eps = [], {}
    for svc, endpoints in pairs:
        svc = alloc.allocate(svc, svc.name)
        services.append(svc)
        eps[svc.key] = tuple(Endpoint(ip, node, f"{svc.name}-{i}", {p.name: 8080 for p in svc.ports})
                             for i, (ip, node) in enumerate(endpoints))
    return Snapshot(tuple(services), eps, 1)


THREE = [("10.244.0.2", "node1"), ("10.244.1.2", "node2"), ("10.244.2.2", "node3")]


# -- names -----------------------------------------------------------------------------------------
def test_chain_names_hash_like_kube_proxy():
    # well-known names from real clusters: the kubernetes and kube-dns Services
    assert svc_chain("default/kubernetes:https", "TCP") == "KUBE-SVC-NPX46M4PTMTKRN6Y"
    assert svc_chain("kube-system/kube-dns:dns", "UDP") == "KUBE-SVC-TCOU7JCQXEZGVUNU"
    assert svc_chain("kube-system/kube-dns:dns-tcp", "TCP") == "KUBE-SVC-ERIFXISQEP7F7OF4"
    assert re.fullmatch(r"KUBE-SEP-[A-Z2-7]{16}", sep_chain("default/web:http", "tcp", "10.244.0.2:8080"))
    assert len(svc_chain("a" * 63 + "/" + "b" * 63 + ":" + "c" * 63, "tcp")) <= 28   # iptables' limit


def test_probabilities_are_one_over_the_remaining():
    assert [probability(i, 3) for i in range(2)] == ["0.3333333333", "0.5000000000"]
    assert probability(0, 1) == "1.0000000000"


def test_nft_chain_names():
    svc = make("web")
    base = chain_base(svc, svc.ports[0])
    assert base.endswith("-default/web/tcp/http") and len(base.split("-", 1)[0]) == 8
    assert hash_and_truncate("x") == hash_and_truncate("x") != hash_and_truncate("y")


# -- iptables -------------------------------------------------------------------------------------------
def render_ipt(snap, node="node1", **kw):
    text, chains = IptablesRules(node, CIDR, **kw).render(snap, missing_jumps=JUMPS)
    return text, chains


def rules_of(text: str, chain: str) -> list[str]:
    return [l for l in text.splitlines() if l.startswith(f"-A {chain} ")]


def test_cluster_ip_service_layout():
    snap = snapshot((make("web"), THREE))
    text, chains = render_ipt(snap)
    svc = snap.services[0]
    sc = svc_chain("default/web:http", "tcp")
    assert text.count("*nat") == 1 and text.count("*filter") == 1 and text.count("COMMIT") == 3
    # a full sync plants kube-proxy's canary chain in mangle, nat and filter
    assert text.startswith("*mangle\n:KUBE-PROXY-CANARY - [0:0]\nCOMMIT\n")
    assert all((t, "KUBE-PROXY-CANARY") in chains for t in ("mangle", "nat", "filter"))
    (entry,) = [r for r in rules_of(text, "KUBE-SERVICES") if sc in r]
    assert entry == (f'-A KUBE-SERVICES -d {svc.cluster_ip}/32 -p tcp -m comment --comment '
                     f'"default/web:http cluster IP" -m tcp --dport 80 -j {sc}')
    assert rules_of(text, "KUBE-SERVICES")[-1].endswith("-m addrtype --dst-type LOCAL -j KUBE-NODEPORTS")
    svc_rules = rules_of(text, sc)
    assert svc_rules[0].startswith(f"-A {sc} ! -s {CIDR} -d {svc.cluster_ip}/32") and \
        svc_rules[0].endswith("-j KUBE-MARK-MASQ")
    assert "--probability 0.3333333333" in svc_rules[1] and "--probability 0.5000000000" in svc_rules[2]
    assert "statistic" not in svc_rules[3]
    seps = [r.split()[-1] for r in svc_rules[1:]]
    assert seps == [sep_chain("default/web:http", "tcp", f"{ip}:8080") for ip, _ in THREE]
    for (ip, _), sep in zip(THREE, seps):
        assert rules_of(text, sep) == [
            f'-A {sep} -s {ip}/32 -m comment --comment "default/web:http" -j KUBE-MARK-MASQ',
            f'-A {sep} -p tcp -m comment --comment "default/web:http" -m tcp -j DNAT --to-destination {ip}:8080']
        assert f":{sep} - [0:0]" in text and ("nat", sep) in chains
    assert '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" ' \
           '-j MASQUERADE --random-fully' in text
    assert "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000" in text


def test_jumps_are_inserted_only_when_missing():
    snap = snapshot((make("web"), THREE))
    text, _ = IptablesRules("node1", CIDR).render(snap, missing_jumps=[JUMPS[0]])
    assert [l for l in text.splitlines() if l.startswith("-I ")] == \
        ['-I PREROUTING 1 -m comment --comment "kubernetes service portals" -j KUBE-SERVICES']
    listing = {("nat", "PREROUTING"): "-P PREROUTING ACCEPT\n"
                                      '-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES\n',
               ("nat", "OUTPUT"): "-P OUTPUT ACCEPT\n"}
    assert present_jumps(listing) == {JUMPS[0]}


def test_masquerade_all():
    text, _ = render_ipt(snapshot((make("web"), THREE)), masquerade_all=True)
    sc = svc_chain("default/web:http", "tcp")
    assert rules_of(text, sc)[0].startswith(f"-A {sc} -d ")


def test_no_endpoints_rejects_in_filter_and_writes_nothing_in_nat():
    snap = snapshot((make("nothing", type="NodePort"), []))
    text, _ = render_ipt(snap)
    svc = snap.services[0]
    assert svc_chain("default/nothing:http", "tcp") not in text
    (rej,) = rules_of(text, "KUBE-SERVICES")[:1]
    assert rej == (f'-A KUBE-SERVICES -d {svc.cluster_ip}/32 -p tcp -m comment --comment '
                   f'"default/nothing:http has no endpoints" -m tcp --dport 80 -j REJECT --reject-with '
                   f'icmp-port-unreachable')
    (ext,) = rules_of(text, "KUBE-EXTERNAL-SERVICES")
    assert f"--dport {svc.ports[0].node_port} -j REJECT" in ext and "--dst-type LOCAL" in ext


def test_node_port_cluster_policy_masquerades():
    snap = snapshot((make("np", type="NodePort", ports=[{"name": "http", "port": 80, "nodePort": 30080}]), THREE))
    text, _ = render_ipt(snap)
    ext = "KUBE-EXT-" + svc_chain("default/np:http", "tcp")[9:]
    assert rules_of(text, "KUBE-NODEPORTS") == [
        f'-A KUBE-NODEPORTS -p tcp -m comment --comment "default/np:http" -m tcp --dport 30080 -j {ext}']
    masq = f'-A {ext} -m comment --comment "masquerade traffic for default/np:http external destinations" ' \
        '-j KUBE-MARK-MASQ'
    assert rules_of(text, ext) == [masq, f"-A {ext} -j {svc_chain('default/np:http', 'tcp')}"]


def test_external_traffic_policy_local():
    local = make("loc", type="NodePort", externalTrafficPolicy="Local",
                 ports=[{"name": "http", "port": 80, "nodePort": 30081}])
    snap = snapshot((local, [("10.244.1.2", "node2")]))
    svl = "KUBE-SVL-" + svc_chain("default/loc:http", "tcp")[9:]
    ext = "KUBE-EXT-" + svc_chain("default/loc:http", "tcp")[9:]
    on2, _ = render_ipt(snap, node="node2")
    assert rules_of(on2, ext)[-1] == f"-A {ext} -j {svl}"
    assert not any("KUBE-MARK-MASQ" in r and "addrtype" not in r for r in rules_of(on2, ext))  # no SNAT
    assert len(rules_of(on2, svl)) == 1 and not rules_of(on2, "KUBE-EXTERNAL-SERVICES")
    on1, _ = render_ipt(snap, node="node1")
    assert svl not in on1
    (drop,) = rules_of(on1, "KUBE-EXTERNAL-SERVICES")
    assert "has no local endpoints" in drop and "--dport 30081 -j DROP" in drop


def test_session_affinity_uses_recent():
    snap = snapshot((make("sticky", sessionAffinity="ClientIP",
                          sessionAffinityConfig={"clientIP": {"timeoutSeconds": 600}}), THREE))
    text, _ = render_ipt(snap)
    sc = svc_chain("default/sticky:http", "tcp")
    checks = [r for r in rules_of(text, sc) if "--rcheck" in r]
    assert len(checks) == 3 and all("--seconds 600 --reap" in r for r in checks)
    sep = sep_chain("default/sticky:http", "tcp", "10.244.0.2:8080")
    assert f"-m recent --set --name {sep} --mask 255.255.255.255 --rsource" in rules_of(text, sep)[1]


def test_load_balancer_ip_goes_to_the_external_chain():
    alloc = ServiceAllocator(IPv4Network("10.96.0.0/12"))
    lb = alloc.allocate(make("lb", type="LoadBalancer"), "lb")
    from dataclasses import replace
    lb = replace(lb, load_balancer_ip="192.168.1.241")
    snap = Snapshot((lb,), {lb.key: (Endpoint("10.244.0.2", "node1", "p", {"http": 8080}),)}, 1)
    text, _ = render_ipt(snap)
    assert any(r.startswith("-A KUBE-SERVICES -d 192.168.1.241/32") and "loadbalancer IP" in r
               and "-j KUBE-EXT-" in r for r in rules_of(text, "KUBE-SERVICES"))


def test_headless_services_get_no_rules():
    snap = snapshot((make("h", clusterIP="None"), THREE))
    text, _ = render_ipt(snap)
    assert "KUBE-SVC-" not in text and "KUBE-SEP-" not in text


def test_stale_chains_are_flushed_and_deleted():
    snap = snapshot((make("web"), THREE))
    _, before = render_ipt(snap)
    snap2 = snapshot((make("web"), THREE[:2]))
    text, after = IptablesRules("node1", CIDR).render(snap2, previous=before)
    gone = sep_chain("default/web:http", "tcp", "10.244.2.2:8080")
    assert ("nat", gone) not in after
    assert f":{gone} - [0:0]" in text and f"-X {gone}" in text
    assert text.index(f"-X {gone}") > text.index(f":{gone} - [0:0]")



def test_partial_sync_rewrites_only_what_changed():
    """kube-proxy's MinimizeIPTablesRestore: after a full sync, a sync leaves out the chains
    of Services that did not change, and always rewrites the top-level chains."""
    rules = IptablesRules("node1", CIDR)
    alloc = ServiceAllocator(IPv4Network("10.96.0.0/12"))
    web, api = alloc.allocate(make("web"), "web"), alloc.allocate(make("api"), "api")
    snap = snapshot((web, THREE), (api, THREE), alloc=ServiceAllocator(IPv4Network("10.96.0.0/12")))
    full, chains, written = rules.render_partial(snap, None, (), written=None)
    assert full == rules.render(snap)[0]                   # written=None: the full batch
    web_svc, api_svc = svc_chain("default/web:http", "tcp"), svc_chain("default/api:http", "tcp")
    assert {web_svc, api_svc} <= set(written)

    again, chains2, _ = rules.render_partial(snap, chains, (), written=written)
    assert chains2 == chains
    assert "KUBE-SVC-" not in again.replace("-j KUBE-SVC-", "")   # only jumps to them, from KUBE-SERVICES
    assert "KUBE-SEP-" not in again
    assert again.count("-A KUBE-SERVICES ") == full.count("-A KUBE-SERVICES ")
    assert ":KUBE-SERVICES - [0:0]" in again and ":KUBE-NODEPORTS - [0:0]" in again
    assert "*mangle" not in again and "KUBE-PROXY-CANARY" not in again   # left alone, not deleted

    # web loses an endpoint: its SVC chain and the gone SEP chain change, api's stay out
    snap3 = snapshot((web, THREE[:2]), (api, THREE), alloc=ServiceAllocator(IPv4Network("10.96.0.0/12")))
    part, chains3, _ = rules.render_partial(snap3, chains, (), written=written)
    gone = sep_chain("default/web:http", "tcp", "10.244.2.2:8080")
    kept = sep_chain("default/web:http", "tcp", "10.244.0.2:8080")
    assert f":{web_svc} - [0:0]" in part and f"-A {web_svc} " in part
    assert f":{gone} - [0:0]" in part and f"-X {gone}" in part and ("nat", gone) not in chains3
    assert f":{api_svc} " not in part and f"-A {api_svc} " not in part
    assert f":{kept} " not in part and f"-A {kept} " not in part


# -- nftables ---------------------------------------------------------------------------------------------
def test_nft_transaction_layout():
    snap = snapshot((make("web"), THREE), (make("nothing"), []))
    r = NftablesRules("node1", CIDR).render(snap)
    web, nothing = snap.services
    lines = r.text.splitlines()
    assert lines[:2] == ['add table ip kube-proxy { comment "rules for kube-proxy" ; }', "flush table ip kube-proxy"]
    base = chain_base(web, web.ports[0])
    assert f"add element ip kube-proxy service-ips {{ {web.cluster_ip} . tcp . 80 : goto service-{base} }}" in lines
    vmap = [l for l in lines if "numgen random mod 3 vmap" in l]
    assert len(vmap) == 1 and vmap[0].count("goto endpoint-") == 3
    assert f"add rule ip kube-proxy service-{base} ip daddr {web.cluster_ip} tcp dport 80 ip saddr != {CIDR} " \
           "jump mark-for-masquerade" in lines
    assert any(f'{nothing.cluster_ip} . tcp . 80 comment "default/nothing:http" : goto reject-chain' in l for l in lines)
    # maps exist before rules use them; chains exist before map elements point at them
    first_use = next(i for i, l in enumerate(lines) if "@service-ips" in l)
    assert any("add map ip kube-proxy service-ips" in l for l in lines[:first_use])
    assert lines.index(f"add chain ip kube-proxy service-{base}") < \
        next(i for i, l in enumerate(lines) if l.startswith("add element ip kube-proxy service-ips"))
    assert f"service-{base}" in r.chains and len([c for c in r.chains if c.startswith("endpoint-")]) == 3


def test_nft_affinity_sets_survive_and_stale_ones_are_deleted():
    sticky = make("sticky", sessionAffinity="ClientIP")
    r1 = NftablesRules("node1", CIDR).render(snapshot((sticky, THREE)))
    assert len(r1.sets) == 3 and set(r1.sets.values()) == {10800}
    assert "flush set" not in r1.text          # affinity entries are never flushed by a resync
    r2 = NftablesRules("node1", CIDR).render(snapshot((sticky, THREE[:2])), r1.chains, r1.sets)
    (gone,) = set(r1.sets) - set(r2.sets)
    assert f"delete set ip kube-proxy {gone}" in r2.text
    (gone_chain,) = {c for c in r1.chains - r2.chains}
    assert f"delete chain ip kube-proxy {gone_chain}" in r2.text


def test_nft_local_policy_drops_nodeports_without_local_endpoints():
    local = make("loc", type="NodePort", externalTrafficPolicy="Local",
                 ports=[{"name": "http", "port": 80, "nodePort": 30081}])
    snap = snapshot((local, [("10.244.1.2", "node2")]))
    on1 = NftablesRules("node1", CIDR).render(snap).text
    assert 'tcp . 30081 comment "default/loc:http" : drop' in on1
    on2 = NftablesRules("node2", CIDR).render(snap).text
    assert ": drop" not in on2 and "goto local-" in on2


# -- conntrack --------------------------------------------------------------------------------------------
def udp(name: str = "echo", **spec):
    return make(name, ports=[{"name": "echo", "port": 9999, "protocol": "UDP", "targetPort": 9999}], **spec)


def test_removed_udp_endpoint_flows_are_flushed():
    alloc = ServiceAllocator(IPv4Network("10.96.0.0/12"))
    svc = alloc.allocate(udp(), "echo")
    def ep(ip: str) -> Endpoint:
        return Endpoint(ip, "node1", ip, {"echo": 9999})

    old = Snapshot((svc,), {svc.key: (ep("10.244.0.2"), ep("10.244.0.3"))}, 1)
    new = Snapshot((svc,), {svc.key: (ep("10.244.0.3"),)}, 2)
    assert stale_udp_flows(old, new) == [("--orig-dst", svc.cluster_ip, "--orig-port-dst", "9999",
                                          "--reply-src", "10.244.0.2")]
    assert stale_udp_flows(new, new) == []


def test_udp_service_getting_its_first_endpoint_flushes_its_address():
    alloc = ServiceAllocator(IPv4Network("10.96.0.0/12"))
    svc = alloc.allocate(udp(), "echo")
    empty = Snapshot((svc,), {svc.key: ()}, 1)
    full = Snapshot((svc,), {svc.key: (Endpoint("10.244.0.2", "node1", "p", {"echo": 9999}),)}, 2)
    assert stale_udp_flows(empty, full) == [("--orig-dst", svc.cluster_ip, "--orig-port-dst", "9999")]


@pytest.mark.parametrize("stype", ["NodePort"])
def test_udp_node_port_flows_are_flushed(stype):
    alloc = ServiceAllocator(IPv4Network("10.96.0.0/12"))
    svc = alloc.allocate(udp(type=stype), "echo")
    old = Snapshot((svc,), {svc.key: (Endpoint("10.244.0.2", "node1", "p", {"echo": 9999}),)}, 1)
    new = Snapshot((svc,), {svc.key: ()}, 2)
    flows = stale_udp_flows(old, new)
    assert ("--orig-port-dst", str(svc.ports[0].node_port), "--reply-src", "10.244.0.2") in flows


def test_tcp_services_are_left_alone():
    alloc = ServiceAllocator(IPv4Network("10.96.0.0/12"))
    svc = alloc.allocate(make("web"), "web")
    old = Snapshot((svc,), {svc.key: (Endpoint("10.244.0.2", "node1", "p", {"http": 8080}),)}, 1)
    assert stale_udp_flows(old, Snapshot((svc,), {svc.key: ()}, 2)) == []


def test_nft_single_endpoint_jumps_directly():
    snap = snapshot((make("one"), THREE[:1]))
    text = NftablesRules("node1", CIDR).render(snap).text
    svc = snap.services[0]
    base = chain_base(svc, svc.ports[0])
    assert "numgen" not in text
    assert any(l.startswith(f"add rule ip kube-proxy service-{base} goto endpoint-") for l in text.splitlines())


def test_nft_partial_sync_touches_only_what_changed():
    rules = NftablesRules("node1", CIDR)
    alloc = ServiceAllocator(IPv4Network("10.96.0.0/12"))
    web, api = alloc.allocate(make("web"), "web"), alloc.allocate(make("api"), "api")
    fresh = lambda: ServiceAllocator(IPv4Network("10.96.0.0/12"))   # noqa: E731 (keeps the IPs above)
    snap = snapshot((web, THREE), (api, THREE), alloc=fresh())
    full = rules.render_partial(snap, None, None, None)
    assert full.text == rules.render(snap).text and "flush table ip kube-proxy" in full.text

    same = rules.render_partial(snap, full.chains, full.sets, full)
    assert same.text == "" and same.chains == full.chains           # nothing changed: nothing sent

    # web loses an endpoint: its service chain is rewritten, the endpoint chain deleted
    fewer = rules.render_partial(snapshot((web, THREE[:2]), (api, THREE), alloc=fresh()),
                                 full.chains, full.sets, full)
    web_c = f"service-{chain_base(web, web.ports[0])}"
    api_c = f"service-{chain_base(api, api.ports[0])}"
    assert f"flush chain ip kube-proxy {web_c}" in fewer.text and "numgen random mod 2" in fewer.text
    assert api_c not in fewer.text and "flush table" not in fewer.text and "element" not in fewer.text
    gone = [c for c in full.chains - fewer.chains]
    assert len(gone) == 1 and f"delete chain ip kube-proxy {gone[0]}" in fewer.text

    # api loses every endpoint: its ClusterIP moves from service-ips to no-endpoint-services
    none = rules.render_partial(snapshot((web, THREE), (api, []), alloc=fresh()), full.chains, full.sets, full)
    lines = none.text.splitlines()
    delete = f"delete element ip kube-proxy service-ips {{ {api.cluster_ip} . tcp . 80 }}"
    assert delete in lines and f"delete chain ip kube-proxy {api_c}" in lines
    assert lines.index(delete) < lines.index(f"delete chain ip kube-proxy {api_c}")   # no dangling goto
    add = next(line for line in lines if line.startswith("add element ip kube-proxy no-endpoint-services"))
    assert f"{api.cluster_ip} . tcp . 80" in add and "goto reject-chain" in add
    assert element_key(f'{api.cluster_ip} . tcp . 80 comment "default/api:http" : goto reject-chain') == \
        f"{api.cluster_ip} . tcp . 80"


def test_nft_partial_sync_falls_back_to_full_when_an_affinity_timeout_changes():
    rules = NftablesRules("node1", CIDR)
    alloc = lambda: ServiceAllocator(IPv4Network("10.96.0.0/12"))   # noqa: E731
    sticky = lambda t: make("web", sessionAffinity="ClientIP",         # noqa: E731
                            sessionAffinityConfig={"clientIP": {"timeoutSeconds": t}})
    first = rules.render_partial(snapshot((sticky(60), THREE), alloc=alloc()), None, None, None)
    again = rules.render_partial(snapshot((sticky(60), THREE), alloc=alloc()), first.chains, first.sets, first)
    assert again.text == ""
    other = rules.render_partial(snapshot((sticky(30), THREE), alloc=alloc()), first.chains, first.sets, first)
    assert "flush table ip kube-proxy" in other.text and "timeout 30s" in other.text
