"""Chained plugins without root: quantities, what the kubelet hands the runtime, what the
runtime hands each plugin, the rules portmap writes, bandwidth's buckets, tuning's sysctls,
the NodePorts filter and the nodes' config lists of every mode."""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from cni_plugins import bandwidth, portmap, tuning
from k8snetlab import chain, spec
from k8snetlab.cni import NetworkConfigList, RuntimeConf
from k8snetlab.cni_protocol import CNIError
from k8snetlab.errors import SpecError
from k8snetlab.modes import MODES
from k8snetlab.scheduler import Scheduler, host_ports

POD_IP = "10.244.1.5"


def pod_doc(name: str = "web", annotations: dict[str, str] | None = None, ports: list[dict] | None = None,
            sysctls: list[dict] | None = None) -> dict[str, Any]:
    spec_: dict[str, Any] = {"containers": [{"name": "c", "command": ["sleep", "1"],
                                             "ports": ports if ports is not None else
                                             [{"containerPort": 80, "hostPort": 8080}]}]}
    if sysctls is not None:
        spec_["securityContext"] = {"sysctls": sysctls}
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "annotations": annotations or {}}, "spec": spec_}


def cluster_doc(cni: dict[str, Any], *pods: dict[str, Any], nodes: int = 2) -> dict[str, Any]:
    return {"name": "chain", "underlay": {"subnets": [{"name": "lan", "cidr": "192.168.0.0/24"}]},
            "nodes": [{"name": f"node{i}", "ip": f"192.168.0.{10 + i}"} for i in range(1, nodes + 1)],
            "cni": cni, "workloads": list(pods)}


# -- quantities ---------------------------------------------------------------------------------
@pytest.mark.parametrize("text,value", [("100M", 10 ** 8), ("1G", 10 ** 9), ("1Gi", 2 ** 30), ("512Ki", 524288),
                                        ("1.5M", 1_500_000), ("1e6", 10 ** 6), ("2E3", 2000), ("10", 10),
                                        ("100m", 1), (".5k", 500)])
def test_quantities_as_kubernetes_reads_them(text: str, value: int) -> None:
    assert chain.parse_quantity(text) == value


@pytest.mark.parametrize("text", ["100X", "100 M", "1.2.3", "M", "", "1K", "1mb", "ten"])
def test_malformed_quantities_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="quantity"):
        chain.parse_quantity(text)


def test_bandwidth_annotations_become_bits_with_the_cri_burst() -> None:
    bw = chain.pod_bandwidth({chain.EGRESS_ANNOTATION: "100M", chain.INGRESS_ANNOTATION: "1G"}, "pod")
    assert bw == {"ingressRate": 10 ** 9, "ingressBurst": 2 ** 32 - 1,
                  "egressRate": 10 ** 8, "egressBurst": 2 ** 32 - 1}
    assert chain.pod_bandwidth({}, "pod") == {}
    for bad, word in (("10", "small"), ("2P", "large")):
        with pytest.raises(SpecError, match=word):
            chain.pod_bandwidth({chain.EGRESS_ANNOTATION: bad}, "pod")


def test_a_malformed_annotation_is_refused_at_load_with_one_line() -> None:
    doc = cluster_doc({"type": "bridge"}, pod_doc(annotations={chain.EGRESS_ANNOTATION: "100Mbit"}))
    with pytest.raises(SpecError) as e:
        spec.from_dict(doc, "f.yaml")
    assert "\n" not in str(e.value)
    assert "kubernetes.io/egress-bandwidth" in str(e.value) and "100Mbit" in str(e.value)


# -- what the kubelet hands the runtime, and the runtime each plugin ---------------------------
def test_capability_args_from_a_pod_manifest() -> None:
    s = spec.from_dict(cluster_doc({"type": "bridge", "chain": ["tuning", "bandwidth", "portmap"]}, pod_doc(
        annotations={chain.INGRESS_ANNOTATION: "10M"},
        ports=[{"containerPort": 80, "hostPort": 8080},
               {"containerPort": 53, "hostPort": 5353, "protocol": "UDP", "hostIP": "192.168.0.11"},
               {"containerPort": 9000}],
        sysctls=[{"name": "net.ipv4.tcp_syncookies", "value": "0"}])), "f")
    pod = s.pods()[0]
    assert chain.capability_args(pod) == {
        "portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"},
                         {"hostPort": 5353, "containerPort": 53, "protocol": "udp", "hostIP": "192.168.0.11"}],
        "bandwidth": {"ingressRate": 10 ** 7, "ingressBurst": 2 ** 32 - 1}}
    assert chain.config_args(pod) == {"sysctl": {"net.ipv4.tcp_syncookies": "0"}}


def test_runtime_config_only_for_declared_capabilities() -> None:
    plugins = [{"type": "bridge"}, {"type": "bandwidth", "capabilities": {"bandwidth": True}},
               {"type": "portmap", "capabilities": {"portMappings": True, "bandwidth": False}}]
    net = NetworkConfigList("net", "1.0.0", plugins)
    rt = RuntimeConf("cid", "/proc/1/ns/net", capability_args={
        "portMappings": [{"hostPort": 1, "containerPort": 2, "protocol": "tcp"}],
        "bandwidth": {"egressRate": 8, "egressBurst": 8}}, config_args={"sysctl": {"net.a": "1"}})
    main, bw, pm = (net.plugin_config(p, {"ips": []}, rt) for p in plugins)
    assert "runtimeConfig" not in main
    assert bw["runtimeConfig"] == {"bandwidth": {"egressRate": 8, "egressBurst": 8}}
    assert pm["runtimeConfig"] == {"portMappings": [{"hostPort": 1, "containerPort": 2, "protocol": "tcp"}]}
    assert pm["prevResult"] == {"ips": []} and pm["name"] == "net" and pm["cniVersion"] == "1.0.0"
    assert all(c["args"] == {"cni": {"sysctl": {"net.a": "1"}}} for c in (main, bw, pm))
    # no capability arguments at all: the config goes through untouched
    assert net.plugin_config(plugins[2], None, RuntimeConf("c", "n")) == {"cniVersion": "1.0.0", "name": "net",
                                                                        **plugins[2]}


# -- portmap ------------------------------------------------------------------------------------
def pm_conf(*maps: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"cniVersion": "1.0.0", "name": "cbr0", "type": "portmap", "capabilities": {"portMappings": True},
            "runtimeConfig": {"portMappings": list(maps)}, **extra}


def test_portmap_chain_name_is_the_reference_hash_cut_to_28() -> None:
    name = portmap.dnat_chain_name("cbr0", "abc")
    assert name.startswith("CNI-DN-") and len(name) == 28
    assert name == portmap.dnat_chain_name("cbr0", "abc") != portmap.dnat_chain_name("cbr0", "abd")


def test_portmap_rules_mark_hairpin_and_localhost_then_dnat() -> None:
    c = portmap.parse(pm_conf({"hostPort": 8080, "containerPort": 80, "protocol": "tcp"},
                              {"hostPort": 5353, "containerPort": 53, "protocol": "udp", "hostIP": "192.168.0.11"}))
    assert portmap.dnat_rules(c, POD_IP, "10.244.1.0/24") == [
        ["-p", "tcp", "--dport", "8080", "-s", "10.244.1.0/24", "-j", "CNI-HOSTPORT-SETMARK"],
        ["-p", "tcp", "--dport", "8080", "-s", "127.0.0.1", "-j", "CNI-HOSTPORT-SETMARK"],
        ["-p", "tcp", "--dport", "8080", "-j", "DNAT", "--to-destination", f"{POD_IP}:80"],
        ["-p", "udp", "--dport", "5353", "-d", "192.168.0.11", "-s", "10.244.1.0/24", "-j", "CNI-HOSTPORT-SETMARK"],
        ["-p", "udp", "--dport", "5353", "-d", "192.168.0.11", "-s", "127.0.0.1", "-j", "CNI-HOSTPORT-SETMARK"],
        ["-p", "udp", "--dport", "5353", "-d", "192.168.0.11", "-j", "DNAT", "--to-destination", f"{POD_IP}:53"]]
    no_snat = portmap.parse(pm_conf({"hostPort": 8080, "containerPort": 80}, snat=False))
    assert portmap.dnat_rules(no_snat, POD_IP, f"{POD_IP}/32") == [
        ["-p", "tcp", "--dport", "8080", "-j", "DNAT", "--to-destination", f"{POD_IP}:80"]]


def test_portmap_entry_rules_one_multiport_per_protocol_and_15_ports() -> None:
    maps = [{"hostPort": 9000 + i, "containerPort": 80} for i in range(17)] + [
        {"hostPort": 53, "containerPort": 53, "protocol": "udp"}]
    rules = portmap.entry_rules(portmap.parse(pm_conf(*maps)), "cbr0", "cid")
    chain_name = portmap.dnat_chain_name("cbr0", "cid")
    assert [r[r.index("-p") + 1] for r in rules] == ["tcp", "tcp", "udp"]
    assert rules[0][rules[0].index("--destination-ports") + 1] == ",".join(str(9000 + i) for i in range(15))
    assert rules[1][rules[1].index("--destination-ports") + 1] == "9015,9016"
    assert all(r[-2:] == ["-j", chain_name] and 'dnat name: "cbr0" id: "cid"' in r for r in rules)
    text = portmap.restore_input(chain_name, [], rules)
    assert f':{chain_name} - [0:0]' in text and '"dnat name: \\"cbr0\\" id: \\"cid\\""' in text
    assert text.startswith("*nat\n") and text.endswith("COMMIT\n")


def test_portmap_shared_chains_and_mark_bit() -> None:
    chains = {n: (rules, entries) for n, rules, entries in portmap.shared_chains(portmap.parse(pm_conf(markMasqBit=14)))}
    assert chains["CNI-HOSTPORT-SETMARK"][0][0][-2:] == ["--set-xmark", "0x4000/0x4000"]
    assert chains["CNI-HOSTPORT-MASQ"][0] == [["-m", "mark", "--mark", "0x4000/0x4000", "-j", "MASQUERADE"]]
    assert chains["CNI-HOSTPORT-MASQ"][1][0][0] == "POSTROUTING" and chains["CNI-HOSTPORT-MASQ"][1][0][2]
    assert [e[0] for e in chains["CNI-HOSTPORT-DNAT"][1]] == ["PREROUTING", "OUTPUT"]


@pytest.mark.parametrize("conf", [pm_conf({"hostPort": 0, "containerPort": 80}),
                                  pm_conf({"containerPort": 80}),
                                  pm_conf({"hostPort": 80, "containerPort": 80, "protocol": "icmp"}),
                                  pm_conf(markMasqBit=32),
                                  pm_conf(markMasqBit=13, externalSetMarkChain="KUBE-MARK-MASQ")])
def test_portmap_refuses_bad_config(conf: dict[str, Any]) -> None:
    with pytest.raises(CNIError) as e:
        portmap.parse(conf)
    assert e.value.code == 7


# -- bandwidth ----------------------------------------------------------------------------------
def test_bandwidth_bucket_as_the_reference_computes_it() -> None:
    p = bandwidth.tbf_params(100_000_000, 2 ** 32 - 1)
    assert p["rate_bits"] == 100_000_000
    # the kubelet's "no limit": 2^32-1 bits, 512 MiB, as the reference keeps it
    assert p["burst_bytes"] == (2 ** 32 - 1) // 8
    assert p["limit_bytes"] == 12_500_000 * 25 // 1000 + p["burst_bytes"]
    # at 8 kbit/s that would be 6.7e5 s of bucket: cut to what 32 bits of ticks hold (~275 s)
    small = bandwidth.tbf_params(8_000, 2 ** 32 - 1)
    assert small["burst_bytes"] == int(1000 * bandwidth.MAX_BUFFER_S) == 274_877
    assert small["limit_bytes"] == 25 + 274_877


def test_bandwidth_runtime_config_wins_and_rate_needs_burst() -> None:
    conf = {"egressRate": 5, "egressBurst": 5,
            "runtimeConfig": {"bandwidth": {"ingressRate": 800, "ingressBurst": 800}}}
    assert bandwidth.limits(conf) == {"ingressRate": 800, "ingressBurst": 800, "egressRate": 0, "egressBurst": 0}
    for bad in ({"ingressRate": 800}, {"egressBurst": 800}, {"ingressRate": -1, "ingressBurst": 1},
                {"egressRate": 800, "egressBurst": 8 * 2 ** 32}):
        with pytest.raises(CNIError):
            bandwidth.limits(bad)


def test_bandwidth_ifb_name() -> None:
    name = bandwidth.ifb_name("k8s-pod-network", "cid")
    assert name.startswith("bwp") and len(name) == 15 and name != bandwidth.ifb_name("k8s-pod-network", "cie")


# -- tuning -------------------------------------------------------------------------------------
def test_tuning_merges_config_and_per_pod_sysctls() -> None:
    conf = {"sysctl": {"net.core.somaxconn": "500", "net.ipv4.conf.IFNAME.arp_filter": "1"},
            "args": {"cni": {"sysctl": {"net.core.somaxconn": "1024"}}}}
    assert tuning.sysctls(conf, "eth0") == {"net.core.somaxconn": "1024", "net.ipv4.conf.eth0.arp_filter": "1"}
    for bad in ({"sysctl": {"kernel.pid_max": "1"}}, {"sysctl": {"net/../../kernel/x": "1"}}, {"mtu": 1400}):
        with pytest.raises(CNIError):
            tuning.sysctls(bad, "eth0")


# -- the NodePorts filter -------------------------------------------------------------------------
def test_scheduler_never_puts_two_holders_of_a_host_port_on_one_node() -> None:
    s = spec.from_dict(cluster_doc({"type": "bridge"}), "f")
    pods = [spec.from_dict(cluster_doc({"type": "bridge"}, pod_doc(f"p{i}", ports=ports)), "f").pods()[0]
            for i, ports in enumerate([[{"containerPort": 80, "hostPort": 8080}],
                                       [{"containerPort": 80, "hostPort": 8080}],
                                       [{"containerPort": 80, "hostPort": 8080, "protocol": "UDP"}],
                                       [{"containerPort": 80, "hostPort": 8080}]])]
    sched = Scheduler({n.name: n.labels for n in s.nodes})
    a, b, c = (sched.schedule(p) for p in pods[:3])
    assert a != b                       # same port and protocol: another node
    assert c == "node1" or c == "node2"  # UDP 8080 does not clash with TCP 8080
    with pytest.raises(SpecError, match="no node has hostPort 8080/TCP free"):
        sched.place(pods[3])
    sched.unbind(pods[0].name)
    assert sched.place(pods[3]) == a


def test_host_ip_clashes_as_kubernetes_says() -> None:
    sched = Scheduler({"n1": {}})
    sched.bind("a", "n1", ports=[("TCP", 80, "192.168.0.11")])
    assert sched.port_holder("n1", [("TCP", 80, "192.168.0.12")]) is None
    assert sched.port_holder("n1", [("TCP", 80, "")]) == ("a", ("TCP", 80, "192.168.0.11"))


def test_too_many_host_port_replicas_are_refused_at_load() -> None:
    dep = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
           "spec": {"replicas": 3, "template": {"metadata": {"labels": {"app": "web"}},
                                                "spec": pod_doc()["spec"]}}}
    with pytest.raises(SpecError, match="pod web-2: no node has hostPort 8080/TCP free") as e:
        spec.from_dict(cluster_doc({"type": "host-gw"}, dep), "f.yaml")
    assert str(e.value).startswith("f.yaml: ")
    pinned = [pod_doc("a"), {**pod_doc("b"), "spec": {**pod_doc()["spec"], "nodeName": "node1"}}]
    pinned[0]["spec"]["nodeName"] = "node1"
    with pytest.raises(SpecError, match="hostPort 8080/TCP on node node1 is already taken by pod a"):
        spec.from_dict(cluster_doc({"type": "host-gw"}, *pinned), "f.yaml")
    assert host_ports(spec.from_dict(cluster_doc({"type": "host-gw"}, pod_doc()), "f").pods()[0]) == (("TCP", 8080, ""),)


# -- config lists and knobs --------------------------------------------------------------------------
def node_list(mode: str, cni_bin: Path = Path("/x/bin"), **cni: Any) -> NetworkConfigList:
    s = spec.from_dict(cluster_doc({"type": mode, **cni}), "f")
    view = SimpleNamespace(spec=s, state=SimpleNamespace(cni_bin=cni_bin))
    node = SimpleNamespace(spec=s.nodes[0], state_dir=Path("/x/node1"), name="node1")
    return MODES.get(mode)(view, s.cni.options).netconf(node)


def test_every_mode_reads_like_its_real_config_list() -> None:
    assert [p["type"] for p in node_list("host-gw").plugins] == ["flannel", "portmap"]
    assert [p["type"] for p in node_list("vxlan").plugins] == ["flannel", "portmap"]
    assert [p["type"] for p in node_list("ipip").plugins] == ["calico", "bandwidth", "portmap"]
    assert [p["type"] for p in node_list("bgp").plugins] == ["calico", "bandwidth", "portmap"]
    assert [p["type"] for p in node_list("bridge").plugins] == ["bridge", "portmap", "bandwidth"]
    assert [p["type"] for p in node_list("docker").plugins] == ["bridge"]
    pm = node_list("ipip").plugins[-1]
    assert pm["capabilities"] == {"portMappings": True} and pm["snat"] is True
    assert node_list("ipip").plugins[1]["capabilities"] == {"bandwidth": True}


def test_the_chain_knob_and_the_reference_binaries() -> None:
    net = node_list("host-gw", chain={"plugins": ["tuning", "bandwidth", "portmap"],
                                      "sysctl": {"net.ipv4.tcp_syncookies": "0"}})
    assert [p["type"] for p in net.plugins] == ["flannel", "tuning", "bandwidth", "portmap"]
    assert net.plugins[1]["sysctl"] == {"net.ipv4.tcp_syncookies": "0"}
    assert net.plugins[1]["dataDir"] == "/x/node1/tuning"
    assert [p["type"] for p in node_list("host-gw", chain=[]).plugins] == ["flannel"]
    ref = node_list("bridge", reference=True, chain=["tuning", "bandwidth", "portmap"])
    assert ref.bin_dirs[0] == "/usr/lib/cni" and ref.cni_version == "1.0.0"
    assert [p["type"] for p in ref.plugins] == ["bridge", "tuning", "bandwidth", "portmap"]


@pytest.mark.skipif(not all(Path(f"/usr/lib/cni/{p}").exists() for p in chain.CHAINED),
                    reason="Debian's containernetworking-plugins is not installed")
def test_reference_chained_plugins_in_any_mode(tmp_path: Path) -> None:
    net = node_list("ipip", tmp_path / "cni" / "bin", chain={"plugins": ["bandwidth", "portmap"], "reference": True})
    assert net.cni_version == "1.0.0" and net.bin_dirs == (str(tmp_path / "cni" / "bin-reference"),
                                                           str(tmp_path / "cni" / "bin"))
    assert all((tmp_path / "cni" / "bin-reference" / p).resolve() == Path(f"/usr/lib/cni/{p}")
               for p in chain.CHAINED)
    assert [p["type"] for p in net.plugins] == ["calico", "bandwidth", "portmap"]


@pytest.mark.parametrize("chain_value,message", [
    (["portmap", "nat"], "'nat' is not a chained plugin"),
    (["portmap", "portmap"], "listed twice"),
    ("portmap", "must be a list"),
    ({"plugins": ["portmap"], "sysctl": {"net.core.somaxconn": "1"}}, "needs tuning"),
    ({"plugins": ["tuning"], "sysctl": {"kernel.pid_max": "1"}}, "not a network sysctl"),
    ({"plugins": ["tuning"], "extra": 1}, "unknown key 'extra'"),
    ({"plugins": ["tuning"], "reference": "yes"}, "must be true or false")])
def test_bad_chain_knobs_are_one_line(chain_value: Any, message: str) -> None:
    with pytest.raises(SpecError, match=message) as e:
        spec.from_dict(cluster_doc({"type": "host-gw", "chain": chain_value}), "f.yaml")
    assert "\n" not in str(e.value) and "cni.chain" in str(e.value)


def test_pods_asking_what_the_chain_lacks_are_refused() -> None:
    doc = cluster_doc({"type": "host-gw"}, pod_doc(sysctls=[{"name": "net.ipv4.tcp_syncookies", "value": "0"}]))
    with pytest.raises(SpecError, match="add tuning to cni.chain"):
        spec.from_dict(doc, "f")
    with pytest.raises(SpecError, match="add portmap to cni.chain"):
        spec.from_dict(cluster_doc({"type": "ipip", "chain": ["bandwidth"]}, pod_doc()), "f")
    with pytest.raises(SpecError, match="publishes hostPorts itself"):
        spec.from_dict(cluster_doc({"type": "docker", "chain": ["portmap"]}), "f")
    bad = copy.deepcopy(pod_doc(sysctls=[{"name": "kernel.msgmax", "value": "1"}]))
    with pytest.raises(SpecError, match="only namespaced net"):
        spec.from_dict(cluster_doc({"type": "host-gw", "chain": ["tuning"]}, bad), "f")


# -- the command line ----------------------------------------------------------------------------
@pytest.mark.parametrize("annotations,ports,word", [
    ({chain.EGRESS_ANNOTATION: "100Mbps"}, [{"containerPort": 80}], "100Mbps"),
    ({}, [{"containerPort": 80, "hostPort": 70000}], "hostPort"),
    ({chain.INGRESS_ANNOTATION: "100M"}, [{"containerPort": 80}], None)])
def test_up_refuses_bad_chained_input_in_one_line(tmp_path: Path, annotations: dict, ports: list,
                                                  word: str | None) -> None:
    import yaml
    from cli_harness import cli, cluster, one_error_line
    d = cluster(cni={"type": "host-gw", "chain": ["portmap"]})
    d["workloads"] = [pod_doc("shaped", annotations=annotations, ports=ports)]
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(d))
    line = one_error_line(cli("up", str(f)))
    # no bandwidth plugin in the chain: the fix is named
    assert (word or "add bandwidth to cni.chain") in line
