"""Service manifests, the kubeProxy section and ClusterIP / nodePort allocation: what loads,
and every mistake stopping at spec-load time with one line naming the file, key and fix.
Runs without root: nothing is built."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from k8snetlab import spec
from k8snetlab.errors import SpecError
from k8snetlab.manifests import ContainerPort
from k8snetlab.services import ipvs
from k8snetlab.services.endpoints import EndpointsController, PodView, endpoints_of
from k8snetlab.services.model import (
    KubeProxyOptions,
    ServiceAllocator,
    parse_kube_proxy,
    parse_service,
    plan,
)
from k8snetlab.services.proxy import PROXIERS, available_modes

REPO = Path(__file__).resolve().parents[2]
SERVICES = REPO / "topologies" / "services.yaml"


def svc(name: str = "web", **spec_: Any) -> dict[str, Any]:
    s = {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]}
    s.update(spec_)
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name}, "spec": s}


def cluster(*services: dict[str, Any], **kube_proxy: Any) -> dict[str, Any]:
    return {"name": "t", "underlay": {"subnets": [{"name": "lan", "cidr": "192.168.1.0/24"}]},
            "nodes": [{"name": "node1", "ip": "192.168.1.129"}, {"name": "node2", "ip": "192.168.1.130"}],
            "kubeProxy": kube_proxy, "workloads": list(services)}


def load(data: dict[str, Any]) -> spec.ClusterSpec:
    return spec.from_dict(data, "c.yaml")


def refused(data: dict[str, Any], *words: str) -> str:
    with pytest.raises(SpecError) as e:
        load(data)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("c.yaml"), msg
    for w in words:
        assert w in msg, msg
    return msg


# -- the sample topology ---------------------------------------------------------------------------
def test_services_topology_loads_and_allocates_in_order():
    s = spec.load(SERVICES)
    services = {x.name: x for x in plan(s.services, ServiceAllocator(s.network.service_cidr))}
    assert services["web"].cluster_ip == "10.96.0.11"       # .10 is kept for kube-dns
    assert services["web-headless"].headless and services["web-headless"].cluster_ip is None
    assert services["web-np"].ports[0].node_port == 30080   # fixed
    assert services["web-lb"].ports[0].node_port == 30000   # allocated
    assert services["web"].ports[0].node_port is None
    assert services["web"].ports[0].target_port == "http"
    assert services["web-local"].external_traffic_policy == "Local"
    assert services["web-sticky"].session_affinity == "ClientIP" and services["web-sticky"].affinity_timeout == 600
    assert services["echo-udp"].ports[0].protocol == "UDP"
    opts = parse_kube_proxy(s)
    assert (opts.mode, opts.sync_period, opts.load_balancer_pool, opts.external_host) == \
        ("iptables", 1, "192.168.1.240/28", "192.168.1.239")


def test_defaults_of_a_minimal_service():
    s = parse_service(svc(), "x")
    assert (s.type, s.namespace, s.cluster_ip, s.session_affinity, s.affinity_timeout,
            s.external_traffic_policy) == ("ClusterIP", "default", "", "None", 10800, "Cluster")
    assert s.key == "default/web" and not s.headless
    assert s.ports[0].name == "" and s.port_name(s.ports[0]) == "default/web"


# -- allocation ---------------------------------------------------------------------------------------
def test_fixed_cluster_ip_is_honoured_and_dynamic_ones_avoid_it():
    s = load(cluster(svc("a"), svc("b", clusterIP="10.96.0.11")))
    a, b = plan(s.services, ServiceAllocator(s.network.service_cidr))
    assert b.cluster_ip == "10.96.0.11" and a.cluster_ip == "10.96.0.12"


def test_fixed_node_port_is_reserved_before_dynamic_ones():
    s = load(cluster(svc("a", type="NodePort"), svc("b", type="NodePort", ports=[{"port": 80, "nodePort": 30000}])))
    a, b = plan(s.services, ServiceAllocator(s.network.service_cidr))
    assert b.ports[0].node_port == 30000 and a.ports[0].node_port == 30001


def test_allocator_releases_and_never_reuses_a_taken_address():
    alloc = ServiceAllocator(spec.load(SERVICES).network.service_cidr)
    a = alloc.allocate(parse_service(svc("a", type="NodePort"), "a"), "a")
    with pytest.raises(SpecError, match="already the ClusterIP of Service default/a"):
        alloc.allocate(parse_service(svc("b", clusterIP=a.cluster_ip), "b"), "b")
    with pytest.raises(SpecError, match="already taken by Service default/a"):
        alloc.allocate(parse_service(svc("c", type="NodePort", ports=[{"port": 1, "nodePort": a.ports[0].node_port}]),
                                     "c"), "c")
    alloc.release(a)
    b = alloc.allocate(parse_service(svc("b", clusterIP=a.cluster_ip), "b"), "b")
    assert b.cluster_ip == a.cluster_ip


def test_dns_address_is_reserved_for_kube_dns():
    refused(cluster(svc(clusterIP="10.96.0.10")), "clusterIP", "reserved for the cluster DNS", "kube-system/kube-dns")
    alloc = ServiceAllocator(spec.load(SERVICES).network.service_cidr)
    dns = parse_service({"metadata": {"name": "kube-dns", "namespace": "kube-system"},
                         "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": "dns", "port": 53, "protocol": "UDP"}]}},
                        "dns")
    assert alloc.allocate(dns, "dns").cluster_ip == "10.96.0.10"
    # with kubeProxy.dns: false the address is an ordinary one
    load(cluster(svc(clusterIP="10.96.0.10"), dns=False))


def test_many_services_allocate_quickly_and_distinctly():
    alloc = ServiceAllocator(spec.load(SERVICES).network.service_cidr)
    ips = {alloc.allocate(parse_service(svc(f"s{i}"), "s"), "s").cluster_ip for i in range(5000)}
    assert len(ips) == 5000 and "10.96.0.10" not in ips


# -- bad input: one line, file, key, fix ----------------------------------------------------------------
@pytest.mark.parametrize("service, words", [
    (svc(clusterIP="10.1.2.3"), ("spec.clusterIP", "outside network.serviceCIDR 10.96.0.0/12")),
    (svc(clusterIP="bogus"), ("spec.clusterIP", "not an IPv4 address")),
    (svc(type="NodePort", ports=[{"port": 80, "nodePort": 80}]), ("ports[0].nodePort", "30000-32767")),
    (svc(ports=[{"port": 80, "nodePort": 30001}]), ("ports[0].nodePort", "only NodePort and LoadBalancer")),
    (svc(ports=[{"name": "a", "port": 80}, {"name": "b", "port": 80}]), ("ports[1]", "duplicate port 80/TCP")),
    (svc(ports=[{"name": "a", "port": 80}, {"name": "a", "port": 81}]), ("ports[1].name", "duplicate port name")),
    (svc(ports=[{"port": 80}, {"port": 81}]), ("ports[0].name", "more than one port")),
    (svc(ports=[{"port": 80, "protocol": "SCTP"}]), ("ports[0].protocol", "TCP or UDP")),
    (svc(ports=[{"port": 0}]), ("ports[0].port", "1-65535")),
    (svc(ports=[{"port": 80, "targetPort": "Not_A_Name"}]), ("ports[0].targetPort",)),
    (svc(ports=[]), ("spec.ports", "at least one port")),
    (svc(type="ExternalName"), ("spec.type", "ExternalName")),
    (svc(type="Ingress"), ("spec.type", "ClusterIP, NodePort, LoadBalancer")),
    (svc(type="NodePort", clusterIP="None"), ("spec.clusterIP", "headless", "ClusterIP")),
    (svc(externalTrafficPolicy="Local"), ("externalTrafficPolicy", "NodePort")),
    (svc(type="NodePort", externalTrafficPolicy="Nearby"), ("externalTrafficPolicy", "Cluster or Local")),
    (svc(sessionAffinity="Cookie"), ("sessionAffinity", "None or ClientIP")),
    (svc(sessionAffinity="ClientIP", sessionAffinityConfig={"clientIP": {"timeoutSeconds": 0}}),
     ("timeoutSeconds", "1-86400")),
    (svc(sessionAffinityConfig={"clientIP": {"timeoutSeconds": 5}}), ("sessionAffinityConfig", "ClientIP")),
    (svc(externalIPs=["1.2.3.4"]), ("spec.externalIPs", "not supported")),
    (svc(colour="blue"), ("spec", "unknown key 'colour'")),
    (svc(ipFamilies=["IPv6"]), ("spec.ipFamilies", "IPv4")),
])
def test_bad_service_is_refused_at_load(service, words):
    refused(cluster(service), "workloads[0]", *words)


def test_harmless_kubernetes_defaults_are_accepted():
    load(cluster(svc(ipFamilies=["IPv4"], ipFamilyPolicy="SingleStack", internalTrafficPolicy="Cluster",
                     clusterIP="10.96.0.50", clusterIPs=["10.96.0.50"])))


def test_clashes_between_services_are_refused():
    refused(cluster(svc("a"), svc("a")), "workloads[1].metadata.name", "also defined at")
    refused(cluster(svc("a", clusterIP="10.96.0.20"), svc("b", clusterIP="10.96.0.20")),
            "workloads[1].spec.clusterIP", "already the ClusterIP of Service default/a")
    refused(cluster(svc("a", type="NodePort", ports=[{"port": 80, "nodePort": 30007}]),
                    svc("b", type="NodePort", ports=[{"port": 81, "nodePort": 30007}])),
            "workloads[1].spec.ports[0].nodePort", "30007", "already taken by Service default/a")
    # one Service may use one nodePort for TCP and UDP, as Kubernetes allows
    load(cluster(svc("dns", type="NodePort", ports=[
        {"name": "u", "port": 53, "protocol": "UDP", "nodePort": 30053},
        {"name": "t", "port": 53, "protocol": "TCP", "nodePort": 30053}])))


def test_selector_matching_nothing_is_not_an_error():
    load(cluster(svc(selector={"app": "nothing"})))


# -- kubeProxy section ------------------------------------------------------------------------------------
def test_unknown_mode_lists_the_valid_ones():
    msg = refused(cluster(svc(), mode="ebpf"), "kubeProxy.mode", "'ebpf'")
    for m in ("iptables", "nftables", "ipvs"):
        assert m in msg


def test_ipvs_is_refused_with_one_line_where_the_kernel_has_none(monkeypatch):
    monkeypatch.setattr(ipvs, "kernel_has_ipvs", lambda: (False, "no /proc/net/ip_vs"))
    msg = refused(cluster(svc(), mode="ipvs"), "kubeProxy.mode", "IPVS", "use kubeProxy.mode iptables or nftables")
    assert "ipvs" not in available_modes()
    assert PROXIERS.get("ipvs").unavailable() in msg


def test_kube_proxy_options_are_checked():
    refused(cluster(svc(), syncPeriod="fast"), "kubeProxy.syncPeriod")
    refused(cluster(svc(), masqueradeAll="yes"), "kubeProxy.masqueradeAll")
    refused(cluster(svc(), proxyMode="iptables"), "kubeProxy", "unknown option 'proxyMode'")
    refused(cluster(svc(), loadBalancerPool="10.0.0.0/28"), "loadBalancerPool", "not inside any underlay subnet")
    refused(cluster(svc(), loadBalancerPool="192.168.1.128/28"), "loadBalancerPool", "node node1")
    refused(cluster(svc(), externalHost="192.168.1.129"), "externalHost", "node node1")
    refused(cluster(svc(), externalHost="192.168.1.241"), "externalHost", "inside kubeProxy.loadBalancerPool")
    opts = parse_kube_proxy(load(cluster(svc(), loadBalancerPool="192.168.1.0/28", externalHost="192.168.1.200")))
    assert (opts.load_balancer_pool, opts.external_host) == ("192.168.1.0/28", "192.168.1.200")


def test_small_service_cidr_without_room_for_dns_is_refused():
    data = cluster(svc())
    data["network"] = {"serviceCIDR": "10.96.0.0/29"}
    refused(data, "serviceCIDR", "tenth address")


def test_kube_proxy_section_alone_wants_the_addon_and_files_without_services_do_not():
    from k8snetlab.services.services_addon import ServicesAddon
    assert ServicesAddon.wanted(load(cluster(mode="nftables")))
    assert not ServicesAddon.wanted(spec.load(REPO / "topologies" / "three_nodes.yaml"))


def test_options_dataclass_defaults():
    o = KubeProxyOptions()
    assert (o.mode, o.sync_period, o.masquerade_all, o.dns) == ("iptables", 1.0, False, True)


# -- endpoints -------------------------------------------------------------------------------------------
def pod(name: str, ip: str | None, node: str = "node1", ns: str = "default", ready: bool = True,
        labels: dict[str, str] | None = None, ports: tuple = (ContainerPort(8080, "http"),)) -> PodView:
    return PodView(name, ns, labels if labels is not None else {"app": "web"}, ip, node, ports, ready)


def test_endpoints_follow_selector_namespace_readiness_and_sort_by_ip():
    s = parse_service(svc(ports=[{"name": "http", "port": 80, "targetPort": "http"},
                                 {"name": "raw", "port": 81, "targetPort": 9000}]), "x")
    pods = [pod("b", "10.244.0.10"), pod("a", "10.244.0.9"), pod("other-ns", "10.244.0.5", ns="prod"),
            pod("not-ready", "10.244.0.6", ready=False), pod("no-ip", None), pod("db", "10.244.0.7", labels={"app": "db"})]
    eps = endpoints_of(s, pods)
    assert [e.pod for e in eps] == ["a", "b"]                 # numeric order: .9 before .10
    assert eps[0].ports == {"http": 8080, "raw": 9000} and eps[0].node == "node1"


def test_named_target_port_resolves_per_pod_and_protocol():
    s = parse_service(svc(ports=[{"name": "dns", "port": 53, "protocol": "UDP", "targetPort": "dns"}]), "x")
    udp = pod("u", "10.244.0.2", ports=(ContainerPort(5353, "dns", "UDP"),))
    tcp_only = pod("t", "10.244.0.3", ports=(ContainerPort(5353, "dns", "TCP"),))
    eps = endpoints_of(s, [udp, tcp_only])
    assert [(e.pod, e.ports) for e in eps] == [("u", {"dns": 5353})]


def test_service_without_selector_has_no_endpoints():
    s = parse_service(svc(selector=None), "x")
    assert endpoints_of(s, [pod("a", "10.244.0.2")]) == ()


def test_terminating_marks_are_by_pod_identity_not_name():
    ctl = EndpointsController()

    class P:   # the parts of a Pod the controller reads
        def __init__(self, name: str, cid: str):
            self.name, self.container_id, self.ip, self.node_name = name, cid, "10.244.0.2", "node1"
            self.spec = type("S", (), {"namespace": "default", "labels": {"app": "web"},
                                       "containers": ()})()
            self.containers = {}

    old, new = P("web-0", "aaa"), P("web-0", "bbb")
    s = parse_service(svc(), "x")
    ctl.mark_terminating(old)
    assert ctl.compute([s], [old])["default/web"] == ()
    ctl.forget([new])
    assert [e.pod for e in ctl.compute([s], [new])["default/web"]] == ["web-0"]


def test_manifest_is_not_mutated():
    doc = svc(type="NodePort")
    before = copy.deepcopy(doc)
    parse_service(doc, "x")
    assert doc == before


def test_ipvs_proxier_refuses_to_start():
    from k8snetlab.errors import KernelFeatureMissing
    with pytest.raises(KernelFeatureMissing, match="iptables or nftables"):
        ipvs.IpvsProxier.__new__(ipvs.IpvsProxier).start()


def test_every_kube_proxy_mode_is_registered_and_loads():
    from k8snetlab.services.proxy import PROXIERS, Proxier
    assert PROXIERS.names() == ["iptables", "ipvs", "nftables", "openflow", "userspace"]
    for name, cls in PROXIERS.items():
        assert issubclass(cls, Proxier) and cls.mode == name
    with pytest.raises(SpecError, match="use one of iptables, ipvs, nftables, openflow, userspace"):
        PROXIERS.get("no_such_mode")