"""Pure parts of the userspace proxier, the cluster DNS and the load balancer (no root)."""

from __future__ import annotations

import importlib.util
import ipaddress
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from k8snetlab.errors import K8sNetLabError
from k8snetlab.services import dns, loadbalancer as lbmod, userspace as us
from k8snetlab.services.model import Endpoint, Service, ServicePort, Snapshot

PROXY = Path(us.__file__).with_name("portal_proxy.py")


def _proxy_module():
    """The proxy program, loaded by path as the node runs it (it imports nothing of ours)."""
    name = "portal_proxy_under_test"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, PROXY)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod          # dataclasses look their module up there
        spec.loader.exec_module(mod)
    return sys.modules[name]


def snapshot() -> Snapshot:
    web = Service("web", "default", "NodePort", "10.96.0.11", (ServicePort("http", "TCP", 80, "http", 30080),),
                  {"app": "web"}, external_traffic_policy="Local")
    lb = Service("web-lb", "default", "LoadBalancer", "10.96.0.12", (ServicePort("", "TCP", 80, 8080, 30081),),
                 {"app": "web"}, load_balancer_ip="192.168.1.241")
    kdns = Service("kube-dns", "kube-system", "ClusterIP", "10.96.0.10",
                   (ServicePort("dns", "UDP", 53, 53, None), ServicePort("dns-tcp", "TCP", 53, 53, None)),
                   {"k8s-app": "kube-dns"})
    headless = Service("web-headless", "default", "ClusterIP", None, (), {"app": "web"})
    eps = (Endpoint("10.244.0.2", "node1", "web-0", {"http": 8080, "": 8080}),
           Endpoint("10.244.1.2", "node2", "web-1", {"http": 8080, "": 8080}))
    return Snapshot((web, lb, kdns, headless),
                    {"default/web": eps, "default/web-lb": eps, "default/web-headless": eps,
                     "kube-system/kube-dns": (Endpoint("10.244.2.5", "node3", "kube-dns-0",
                                                       {"dns": 53, "dns-tcp": 53}),)}, 3)


# ------------------------------------------------------------------ userspace: plan and rules
def test_plan_portals_and_front_doors():
    portals, doors = us.plan(snapshot(), "node1")
    ids = {p.id: p for p in portals}
    assert ids["default/web:http/TCP"].endpoints == (("10.244.0.2", 8080), ("10.244.1.2", 8080))
    # Local: the nodePort is served by a portal holding only this node's endpoints
    assert ids["default/web:http/TCP@local"].endpoints == (("10.244.0.2", 8080),)
    assert "kube-system/kube-dns:dns/UDP" in ids and "kube-system/kube-dns:dns-tcp/TCP" in ids
    assert not any("headless" in p for p in ids)            # headless: DNS only, nothing to proxy
    np = [d for d in doors if d.dst is None]
    assert {(d.dport, d.portal) for d in np} == {(30080, "default/web:http/TCP@local"),
                                                 (30081, "default/web-lb/TCP")}
    # the load balancer IP gets a portal too (kube-proxy did that for ingress IPs)
    assert any(d.dst == "192.168.1.241" and d.portal == "default/web-lb/TCP" for d in doors)


def test_plan_local_portal_is_empty_on_a_node_without_endpoints():
    portals, _ = us.plan(snapshot(), "node3")
    assert {p.id: p for p in portals}["default/web:http/TCP@local"].endpoints == ()


def test_render_rules_redirect_and_dnat():
    _, doors = us.plan(snapshot(), "node1")
    ports = {d.portal: 40000 + i for i, d in enumerate(doors)}
    text = us.render_rules(doors, ports, "192.168.1.129", redirect=True, jumps=us.missing_jumps(""))
    lines = text.splitlines()
    assert lines[0] == "*nat" and lines[-1] == "COMMIT"
    assert lines[1:5] == [f":{c} - [0:0]" for c in us.CHAINS]
    p = ports["default/web:http/TCP"]
    assert (f'-A KUBE-PORTALS-CONTAINER -d 10.96.0.11/32 -p tcp -m comment --comment "default/web:http" '
            f"-m tcp --dport 80 -j REDIRECT --to-ports {p}") in lines
    assert (f'-A KUBE-PORTALS-HOST -d 10.96.0.11/32 -p tcp -m comment --comment "default/web:http" '
            f"-m tcp --dport 80 -j DNAT --to-destination 192.168.1.129:{p}") in lines
    local = ports["default/web:http/TCP@local"]
    assert (f'-A KUBE-NODEPORT-CONTAINER -p tcp -m comment --comment "default/web:http" -m tcp --dport 30080 '
            f"-j REDIRECT --to-ports {local}") in lines
    assert any(line.startswith("-A KUBE-PORTALS-CONTAINER -d 10.96.0.10/32 -p udp") for line in lines)
    # the jumps come after the declarations: first in PREROUTING/OUTPUT for portals, last for nodePorts
    assert any(line.startswith("-I PREROUTING 1 ") and line.endswith("-j KUBE-PORTALS-CONTAINER") for line in lines)
    assert any(line.startswith("-A OUTPUT -m addrtype --dst-type LOCAL") and line.endswith("-j KUBE-NODEPORT-HOST")
               for line in lines)


def test_render_rules_without_redirect_dnats_pods_to_the_node():
    _, doors = us.plan(snapshot(), "node1")
    ports = {d.portal: 41000 for d in doors}
    text = us.render_rules(doors, ports, "10.100.0.11", redirect=False)
    assert "REDIRECT" not in text
    assert "-A KUBE-PORTALS-CONTAINER -d 10.96.0.11/32" in text
    assert "-j DNAT --to-destination 10.100.0.11:41000" in text


def test_render_rules_refuses_a_portal_without_port():
    _, doors = us.plan(snapshot(), "node1")
    with pytest.raises(K8sNetLabError, match="no port"):
        us.render_rules(doors, {}, "192.168.1.129")


def test_missing_jumps_reads_iptables_save():
    saved = ("*nat\n:PREROUTING ACCEPT [0:0]\n"
             '-A PREROUTING -m comment --comment "handle ClusterIPs; NOTE: x" -j KUBE-PORTALS-CONTAINER\n'
             "-A OUTPUT -m addrtype --dst-type LOCAL -j KUBE-NODEPORT-HOST\nCOMMIT\n")
    missing = us.missing_jumps(saved)
    assert [m.split()[-1] for m in missing] == ["KUBE-PORTALS-HOST", "KUBE-NODEPORT-CONTAINER"]
    assert us.missing_jumps(saved + "".join(f"-A {b} -j {c}\n" for c, (b, _, _) in us.JUMPS.items())) == []


# ------------------------------------------------------------------ the proxy's balancer
def test_round_robin_and_client_ip_affinity():
    px = _proxy_module()
    b = px.Balancer()
    eps = [("10.0.0.1", 80), ("10.0.0.2", 80), ("10.0.0.3", 80)]
    b.update(eps, affinity=False, timeout=10800)
    first_round = [b.pick("c") for _ in range(3)]
    assert sorted(first_round) == eps                    # each endpoint once per round (shuffled order)
    assert [b.pick("c") for _ in range(3)] == first_round
    b.update(list(reversed(eps)), affinity=False, timeout=10800)
    assert [b.pick("c") for _ in range(3)] == first_round    # same set: the rotation goes on
    assert b.pick("c", exclude={eps[0], eps[1]}) == eps[2]
    b.update(eps, affinity=True, timeout=10800)
    first = b.pick("client-a")
    assert all(b.pick("client-a") == first for _ in range(5))
    assert b.pick("client-b") != first                   # others still rotate
    b.update([e for e in eps if e != first], affinity=True, timeout=10800)
    assert b.pick("client-a") != first                   # its endpoint left: a new one
    b.update([], affinity=False, timeout=10800)
    assert b.pick("x") is None


def test_affinity_expires():
    px = _proxy_module()
    b = px.Balancer()
    b.update([("a", 1), ("b", 1)], affinity=True, timeout=0.0)
    assert b.pick("c") != b.pick("c")                    # timeout 0: no stickiness


# ------------------------------------------------------------------ DNS
def test_dns_ip_is_the_tenth_address():
    assert dns.dns_ip("10.96.0.0/12") == "10.96.0.10"
    assert dns.dns_ip("172.20.0.0/16") == "172.20.0.10"


def test_records_cluster_ip_and_headless():
    recs = dns.records(snapshot())
    assert ("web.default.svc.cluster.local", "10.96.0.11") in recs
    assert ("kube-dns.kube-system.svc.cluster.local", "10.96.0.10") in recs
    assert [ip for name, ip in recs if name == "web-headless.default.svc.cluster.local"] == \
        ["10.244.0.2", "10.244.1.2"]
    hosts = dns.render_hosts(recs)
    assert "10.96.0.11 web.default.svc.cluster.local\n" in hosts
    assert hosts.startswith("#")


def test_headless_without_ready_pods_has_no_record():
    snap = snapshot()
    empty = Snapshot(snap.services, {k: v for k, v in snap.endpoints.items() if k != "default/web-headless"})
    assert not [r for r in dns.records(empty) if r[0].startswith("web-headless.")]


def test_dnsmasq_config_has_no_upstream():
    conf = dns.render_config("/run/k8snetlab/knl1/dns/hosts")
    lines = conf.splitlines()
    for needed in ("no-resolv", "no-hosts", "addn-hosts=/run/k8snetlab/knl1/dns/hosts", "local=/cluster.local/",
                   "address=/#/", "keep-in-foreground", "pid-file="):
        assert needed in lines
    assert not any(line.startswith("server=") for line in lines)


def test_resolv_conf_of_a_pod():
    text = dns.render_resolv_conf("shop", "10.96.0.10")
    assert text.splitlines() == ["search shop.svc.cluster.local svc.cluster.local cluster.local",
                                 "nameserver 10.96.0.10", "options ndots:5"]


def test_dns_manifests():
    d = dns.deployment("/x/dnsmasq.conf")
    assert d["metadata"] == {"name": "kube-dns", "namespace": "kube-system", "labels": {"k8s-app": "kube-dns"}}
    c = d["spec"]["template"]["spec"]["containers"][0]
    assert c["command"] == ["dnsmasq", "--conf-file=/x/dnsmasq.conf"]
    s = dns.service("10.96.0.10")
    assert s["spec"]["clusterIP"] == "10.96.0.10"
    assert {(p["port"], p["protocol"]) for p in s["spec"]["ports"]} == {(53, "UDP"), (53, "TCP")}


# ------------------------------------------------------------------ load balancer
NODES = {"node1": "192.168.1.129", "node2": "192.168.1.130", "node3": "192.168.1.131"}


def test_lb_plan_cluster_and_local():
    snap = snapshot()
    local = Service("web-lb-local", "default", "LoadBalancer", "10.96.0.13",
                    (ServicePort("", "TCP", 80, 8080, 30082),), {"app": "web"},
                    external_traffic_policy="Local", load_balancer_ip="192.168.1.242")
    snap = Snapshot((*snap.services, local), {**snap.endpoints, "default/web-lb-local":
                                              (Endpoint("10.244.1.2", "node2", "web-1", {"": 8080}),)})
    fw = {f.service: f for f in lbmod.plan(snap, NODES)}
    assert set(fw) == {"default/web-lb", "default/web-lb-local"}
    assert fw["default/web-lb"].targets == tuple((ip, 30081) for ip in NODES.values())
    assert fw["default/web-lb-local"].targets == (("192.168.1.130", 30082),)


def test_lb_render_round_robin():
    fw = lbmod.plan(snapshot(), NODES)
    text = lbmod.render(fw, "192.168.1.240")
    chain = fw[0].chain
    assert chain.startswith("LB-") and len(chain) == 19
    lines = text.splitlines()
    assert (f'-A LB-SERVICES -d 192.168.1.241/32 -p tcp -m comment --comment "default/web-lb" '
            f"-m tcp --dport 80 -j {chain}") in lines
    assert [line for line in lines if line.startswith(f"-A {chain} ")] == [
        f"-A {chain} -p tcp -m statistic --mode nth --every 3 --packet 0 -j DNAT --to-destination 192.168.1.129:30081",
        f"-A {chain} -p tcp -m statistic --mode nth --every 2 --packet 0 -j DNAT --to-destination 192.168.1.130:30081",
        f"-A {chain} -p tcp -j DNAT --to-destination 192.168.1.131:30081"]
    assert "-A LB-POSTROUTING -m conntrack --ctstate DNAT -j SNAT --to-source 192.168.1.240" in lines


def test_lb_without_targets_has_no_rule():
    f = lbmod.Forward("default/x", "default/x", "192.168.1.243", "TCP", 80, ())
    text = lbmod.render([f], "192.168.1.240")
    assert "192.168.1.243" not in text and f.chain not in text


def test_pool_addresses_skip_the_subnet_broadcast():
    subnets = [ipaddress.IPv4Network("192.168.1.0/24")]
    addrs = lbmod.pool_addresses("192.168.1.240/28", subnets)
    assert addrs[0] == "192.168.1.240" and addrs[-1] == "192.168.1.254" and len(addrs) == 15


def _lb(pool: str | None) -> lbmod.LoadBalancer:
    spec = SimpleNamespace(underlay=SimpleNamespace(subnets=[SimpleNamespace(cidr=ipaddress.IPv4Network(
        "192.168.1.0/24"))]))
    addon = SimpleNamespace(cluster=SimpleNamespace(spec=spec), options=SimpleNamespace(load_balancer_pool=pool))
    return lbmod.LoadBalancer(addon)


def test_assign_is_stable_and_released():
    lb = _lb("192.168.1.240/29")
    assert lb.own_ip == "192.168.1.240"
    a = lb.assign("default/a")
    assert a == "192.168.1.241" and lb.assign("default/a") == a
    assert lb.assign("default/b") == "192.168.1.242"
    lb.release("default/a")
    assert lb.assign("default/c") == "192.168.1.241"
    for i in range(5):                                   # a /29: 8 addresses, one is lb's own
        lb.assign(f"default/x{i}")
    with pytest.raises(K8sNetLabError, match="exhausted"):
        lb.assign("default/one-too-many")


def test_assign_without_pool_names_the_fix():
    with pytest.raises(K8sNetLabError, match="loadBalancerPool"):
        _lb(None).assign("default/a")


# ------------------------------------------------------------------ the experiment's pure parts
def _experiment():
    name = "kube_proxy_modes_under_test"
    if name not in sys.modules:
        path = Path(__file__).resolve().parents[2] / "experiments" / "kube_proxy_modes.py"
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


SOCKPERF = """sockperf: ====> avg-rtt=7.648 (std-dev=78.592)
sockperf: ---> <MAX> observation = 12951.554
sockperf: ---> percentile 99.000 =   19.697
sockperf: ---> percentile 90.000 =    5.460
sockperf: ---> percentile 50.000 =    5.139
sockperf: ---> <MIN> observation =    4.840
"""


def test_parse_sockperf_in_ms():
    exp = _experiment()
    got = exp.parse_sockperf(SOCKPERF)
    assert got == pytest.approx({"rtt_min": 0.00484, "rtt_p50": 0.005139, "rtt_p90": 0.00546, "rtt_p99": 0.019697})
    with pytest.raises(Exception, match="rtt_min"):
        exp.parse_sockperf("sockperf: connection refused\n")


def test_experiment_spec_keeps_underlay_drops_workloads():
    from k8snetlab import spec as specmod
    exp = _experiment()
    base = specmod.load(Path(__file__).resolve().parents[2] / "topologies" / "three_nodes.yaml")
    s = exp.experiment_spec(base, "nftables")
    assert s.nodes == base.nodes and s.services == ()
    assert {w.name for w in s.workloads} == {exp.CLIENT, exp.SERVER}
    assert s.kube_proxy["mode"] == "nftables" and s.kube_proxy["dns"] is False
    assert {p.node_name for p in s.pods()} == {"node1", "node2"}


def test_experiment_summary_names_the_targets():
    import dataclasses
    from k8snetlab import results
    exp = _experiment()
    row = lambda mode, sc, metric, value, unit: results.Row(   # noqa: E731
        "r", "t", exp.NAME, "three-nodes", mode, "host-gw", sc, "a", "b", 1, metric, value, unit, 1500, "k")
    rows = [row("iptables", "pod-ip", "tcp_throughput", 10.0, "Gbit/s"),
            row("iptables", "cluster-ip", "tcp_throughput", 9.5, "Gbit/s"),
            row("iptables", "pod-ip", "rtt_p50", 0.05, "ms"),
            row("iptables", "cluster-ip", "rtt_p50", 0.04, "ms"),
            row("iptables", "services-5000", "services", 5000, "count"),
            row("iptables", "services-5000", "program_time", 0.4, "s"),
            row("iptables", "services-5000", "resync_time", 0.4, "s"),
            row("iptables", "services-5000", "change_time", 0.125, "s"),
            row("iptables", "services-5000", "connect_p50", 150, "us"),
            row("iptables", "services-5000", "first_packet_added", 100, "us"),
            row("iptables", "services-5000", "first_packet_added_ci_low", 90, "us"),
            row("iptables", "services-5000", "first_packet_added_ci_high", 125, "us"),
            row("nftables", "services-30000", "first_packet_added", -44, "us"),
            row("nftables", "services-30000", "first_packet_added_ci_low", -60, "us"),
            row("nftables", "services-30000", "first_packet_added_ci_high", -20, "us")]
    for k in (2, 3):       # three rounds of the paths
        rows += [dataclasses.replace(r, round=k, value=r.value * (1 + 0.01 * k)) for r in rows[:4]]
    text = exp.summary(rows, ["iptables"])
    assert "met           iptables: ClusterIP throughput >= 0.9 x pod IP (ratio): 0.950" in text, text
    # the interval crosses 120: never 'met'
    assert "inconclusive  iptables, 5,000 Services: first packet <= +120 us (us): 100 [90, 125]" in text, text
    # a ClusterIP answering faster than its own backend: noise, not a finding
    assert "noise         iptables: ClusterIP RTT p50" in text, text
    assert "change s" in text and "0.125" in text
    assert "noise         nftables, 30,000 Services: first packet <= +5 us (us): -44 [-60, -20]" in text, text
