"""``underlay: {switch, controller, switches, links}`` and the controller app registry.

Every mistake stops at load time with one line naming file, key and fix: an unknown app, an app
that cannot be imported, Open vSwitch not installed, a controller without OVS, switch links
across subnets, a loop that the chosen app would flood around. Runs without root.
"""

from __future__ import annotations

import copy
import sys
from typing import Any

import pytest

import controllers
from k8snetlab import cli, extensions, proc, spec, switching
from k8snetlab.errors import SpecError


def cluster(**underlay: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "name": "lab",
        "underlay": {"subnets": [{"name": "lan", "cidr": "192.168.10.0/24"}], **underlay},
        "nodes": [{"name": f"node{i}", "ip": f"192.168.10.{10 + i}"} for i in (1, 2, 3)],
        "cni": {"type": "host-gw"},
    }
    return d


FABRIC = {
    "switch": "ovs", "controller": "fabric",
    "switches": [{"name": "spine1"}, {"name": "spine2"},
                 {"name": "leaf1", "attach": ["node1"]}, {"name": "leaf2", "attach": ["node2", "node3"]}],
    "links": [["leaf1", "spine1"], ["leaf1", "spine2"], ["leaf2", "spine1"], ["leaf2", "spine2"]],
}


@pytest.fixture
def ovs_installed(monkeypatch):
    """Spec checks look for the OVS programs; pretend they are there (this test runs anywhere)."""
    real = proc.which
    monkeypatch.setattr(proc, "which", lambda t: f"/usr/sbin/{t}" if t in switching.OVS_TOOLS else real(t))


def load(d: dict[str, Any]) -> spec.ClusterSpec:
    return spec.from_dict(d, "lab.yaml")


def error(d: dict[str, Any]) -> str:
    with pytest.raises(SpecError) as e:
        load(d)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("lab.yaml: ")
    return msg


# ------------------------------------------------------------------------------- registry
def test_registry_lists_every_app_with_a_description_and_a_module():
    assert {"l2_learning", "fabric", "service_lb"} <= set(controllers.APPS)
    for _, app in controllers.APPS.items():
        assert app.path is not None and app.path.is_file(), app.module
        assert app.description and app.description != "(no description)"
    assert controllers.APPS.get("fabric").loops and not controllers.APPS.get("l2_learning").loops


def test_k8snetlab_controllers_prints_one_line_per_app(capsys):
    assert cli.main(["controllers"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [l.split(":")[0] for l in lines] == sorted(controllers.APPS)


def test_the_shim_gives_the_framework_names():
    pytest.importorskip("os_ken")
    from controllers import App, MAIN_DISPATCHER, set_ev_cls, ofproto_v1_3
    assert App.__name__ in ("OSKenApp", "RyuApp") and callable(set_ev_cls)
    assert ofproto_v1_3.OFP_VERSION == 4 and MAIN_DISPATCHER == "main"
    with pytest.raises(AttributeError):
        controllers.no_such_name


# ------------------------------------------------------------------------------- good files
def test_defaults_are_one_linux_bridge_per_subnet():
    s = load(cluster())
    assert (s.underlay.switch, s.underlay.controller, s.underlay.switches) == ("linuxbridge", "none", ())
    plan = switching.plan(s)
    assert [sw.name for sw in plan.switches] == ["lan"] and plan.switch_for("node1", "lan") == "lan"


def test_ovs_fabric_with_loops_loads_and_plans(ovs_installed):
    s = load(cluster(**FABRIC))
    assert s.underlay.controller == "fabric" and len(s.underlay.links) == 4
    plan = switching.plan(s)
    assert plan.has_loops
    assert plan.switch_for("node3", "lan") == "leaf2"
    assert plan.switch_for("node9", "lan") == "spine1"     # unlisted: the subnet's first switch


def test_the_shipped_fabric_file_loads(ovs_installed):
    from pathlib import Path
    s = spec.load(Path(__file__).resolve().parents[2] / "topologies" / "ovs_fabric.yaml")
    assert s.underlay.switch == "ovs" and switching.plan(s).has_loops


def test_a_tree_of_linux_bridges_is_fine():
    d = cluster(switches=[{"name": "a", "attach": ["node1"]}, {"name": "b", "attach": ["node2"]}],
                links=[["a", "b"]])
    assert not switching.plan(load(d)).has_loops


def test_ovs_without_controller_is_standalone(ovs_installed):
    assert load(cluster(switch="ovs")).underlay.controller == "none"


# ------------------------------------------------------------------------------- bad input
def test_unknown_app_lists_the_valid_ones(ovs_installed):
    msg = error(cluster(switch="ovs", controller="pox"))
    assert "underlay.controller" in msg and "'pox'" in msg
    for name in controllers.APPS:
        assert name in msg


def test_app_that_fails_to_import_names_the_cause(ovs_installed, monkeypatch, tmp_path, request):
    (tmp_path / "broken_app.py").write_text("import os_ken_does_not_exist\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "broken_info.py").write_text("from controllers import AppInfo\n"
                                             "BROKEN = AppInfo('broken', 'broken_app')\n")
    apps = extensions.ENTRY_POINTS["k8snetlab.controller_apps"]
    monkeypatch.setitem(extensions.ENTRY_POINTS, "k8snetlab.controller_apps",
                        [*apps, "broken = broken_info:BROKEN"])
    controllers.APPS.reset()
    request.addfinalizer(controllers.APPS.reset)     # read the restored table again
    monkeypatch.setattr(controllers, "_import_errors", {})
    msg = error(cluster(switch="ovs", controller="broken"))
    assert "app 'broken' cannot be imported" in msg and "os_ken_does_not_exist" in msg


def test_framework_missing_says_pip_install_os_ken(tmp_path):
    """Without os-ken (and Ryu): the app cannot be imported, and the line says what to install.
    In a fresh interpreter where both imports fail."""
    import subprocess
    import yaml
    from pathlib import Path
    f = tmp_path / "lab.yaml"
    f.write_text(yaml.safe_dump(cluster(switch="ovs", controller="l2_learning")))
    code = ("import sys; sys.modules['os_ken'] = None; sys.modules['ryu'] = None\n"
            "from k8snetlab import proc, switching, cli\n"
            "real = proc.which\n"
            "proc.which = lambda t: '/usr/sbin/' + t if t in switching.OVS_TOOLS else real(t)\n"
            f"sys.exit(cli.main(['up', {str(f)!r}]))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parents[2], timeout=60)
    assert r.returncode == 2, r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert "underlay.controller: app 'l2_learning' cannot be imported" in line and "pip install os-ken" in line


def test_ovs_not_installed_is_one_line_naming_the_package(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(proc, "which", lambda t: None if t.startswith("ovs") else "/bin/true")
    msg = error(cluster(switch="ovs", controller="l2_learning"))
    assert "apt-get install openvswitch-switch" in msg and "underlay.switch" in msg
    f = tmp_path / "lab.yaml"
    import yaml
    f.write_text(yaml.safe_dump(cluster(switch="ovs")))
    assert cli.main(["up", str(f)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "openvswitch-switch" in err[0]


@pytest.mark.parametrize("underlay, words", [
    ({"switch": "ovs-dpdk"}, ["underlay.switch", "linuxbridge, ovs"]),
    ({"controller": "l2_learning"}, ["add switch: ovs"]),
    ({"switches": [{"name": "lan"}]}, ["also a subnet name"]),
    ({"switches": [{"name": "a"}, {"name": "a"}]}, ["duplicate switch name"]),
    ({"switches": [{"name": "a", "subnet": "wan"}]}, ["underlay.switches[0].subnet", "'wan'"]),
    ({"switches": [{"name": "a", "color": "red"}]}, ["unknown key 'color'"]),
    ({"switches": [{"name": "a"}], "links": [["a", "b"]]}, ["underlay.links[0]", "'b'"]),
    ({"switches": [{"name": "a"}], "links": [["a", "a"]]}, ["with itself"]),
    ({"switches": [{"name": "a"}], "links": ["a-b"]}, ["[switch-a, switch-b]"]),
    ({"switches": [{"name": "a"}, {"name": "b"}]}, ["not linked"]),
    ({"switches": [{"name": "a", "attach": ["node7"]}]}, ["attach", "'node7'"]),
    ({"switches": [{"name": "a", "attach": ["node1"]}, {"name": "b", "attach": ["node1"]}],
      "links": [["a", "b"]]}, ["already attached to a"]),
])
def test_bad_switch_level_is_one_line(underlay, words, ovs_installed):
    msg = error(cluster(**underlay))
    for w in words:
        assert w in msg, msg


def test_links_across_subnets_are_refused(ovs_installed):
    d = cluster(switches=[{"name": "a", "subnet": "lan"}, {"name": "b", "subnet": "wan"}], links=[["a", "b"]])
    d["underlay"]["subnets"].append({"name": "wan", "cidr": "192.168.20.0/24"})
    assert "join subnets with underlay.routers" in error(d)


def test_a_loop_needs_ovs_and_an_app_that_handles_loops(ovs_installed):
    loop = copy.deepcopy(FABRIC)
    loop["switch"], loop["controller"] = "linuxbridge", "none"
    assert "form a loop" in error(cluster(**loop)) and "controller: fabric" in error(cluster(**loop))
    loop["switch"] = "ovs"
    assert "form a loop" in error(cluster(**loop))
    loop["controller"] = "l2_learning"
    msg = error(cluster(**loop))
    assert "l2_learning floods" in msg and "use controller: fabric" in msg


# ------------------------------------------------------------------------------- kubeProxy openflow
def openflow(**over: Any) -> dict[str, Any]:
    d = cluster(switch="ovs", controller="service_lb")
    d["kubeProxy"] = {"mode": "openflow"}
    d.update(over)
    return d


def test_openflow_services_load(ovs_installed):
    s = load(openflow())
    assert s.kube_proxy["mode"] == "openflow" and s.underlay.controller == "service_lb"


@pytest.mark.parametrize("change, words", [
    (lambda d: d["underlay"].update(controller="l2_learning"), ["kubeProxy.mode: openflow", "service_lb"]),
    (lambda d: d.update(cni={"type": "vxlan"}), ["unencapsulated", "host-gw"]),
    (lambda d: d.pop("kubeProxy"), ["underlay.controller: service_lb", "mode: openflow"]),
])
def test_openflow_services_need_their_app_and_plain_pod_packets(change, words, ovs_installed):
    d = openflow()
    change(d)
    msg = error(d)
    for w in words:
        assert w in msg, msg


def test_openflow_proxier_renders_what_service_lb_serves():
    from types import SimpleNamespace as NS
    from k8snetlab.services.model import Endpoint, Service, ServicePort, Snapshot
    from k8snetlab.services.openflow import render
    nodes = {n: NS(name=n, spec=NS(ip=ip, pod_cidr=cidr)) for n, ip, cidr in
             (("node1", "192.168.1.129", "10.244.0.0/24"), ("node2", "192.168.1.130", "10.244.1.0/24"))}
    c = NS(nodes=nodes, spec=NS(network=NS(service_cidr="10.96.0.0/12")))
    web = Service("web", "default", "ClusterIP", "10.96.0.11",
                  (ServicePort("http", "TCP", 80, 8080, None), ServicePort("dns", "UDP", 53, 53, None)), {})
    headless = Service("db", "default", "ClusterIP", None, (ServicePort("", "TCP", 5432, 5432, None),), {})
    snap = Snapshot((web, headless), {"default/web": (Endpoint("10.244.1.2", "node2", "web-1", {"http": 8080}),)})
    out = render(c, snap, {"node1": "02:00:00:00:00:01"})
    assert out["service_cidr"] == "10.96.0.0/12"
    assert out["nodes"]["node1"] == {"ip": "192.168.1.129", "mac": "02:00:00:00:00:01", "pod_cidr": "10.244.0.0/24"}
    http, dns = out["services"]           # the headless Service has no ClusterIP to serve
    assert http["key"] == "default/web:http" and http["port"] == 80 and http["protocol"] == "TCP"
    assert http["backends"] == [{"ip": "10.244.1.2", "port": 8080, "node": "node2", "pod": "web-1"}]
    assert dns["protocol"] == "UDP" and dns["backends"] == []     # no pod names that port
