"""The CNI exec protocol, both sides, without root.

Plugin side: ``cni_plugins.skel.dispatch`` driven with the ``host-local`` IPAM plugin (it
touches no namespace: its state is a directory, here under tmp_path), checking results,
idempotent DEL, CHECK, GC, VERSION and the spec's error codes.

Runtime side: ``k8snetlab.cni.CNIRuntime`` executing real plugin processes (wrappers written
into tmp_path the way ``Cluster._write_cni_bin`` does, plus a fake plugin that fails) with
``node_netns=None``: results, the result cache, DEL, rollback of a failed chained ADD, and
concurrent ADDs.
"""

from __future__ import annotations

import json
import sys
import threading
from ipaddress import IPv4Interface, IPv4Network
from pathlib import Path
from typing import Any

import pytest

from cni_plugins import host_local, skel
from cni_plugins.inprocess import InProcessInvoker
from k8snetlab import cni_protocol as cni
from k8snetlab.cni import CNIRuntime, NetworkConfigList, RuntimeConf
from k8snetlab.cni_protocol import CNIError, IPConfig, Interface, Result
from k8snetlab.errors import SpecError
from k8snetlab.ipam import HostLocalStore

REPO = Path(__file__).resolve().parents[2]
NET = "k8s-pod-network"
SUBNET = "10.244.1.0/24"


# =========================================================================== plugin side

@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "ipam"


def netconf(data_dir: Path, subnet: str = SUBNET, version: str = "1.1.0", **ipam: Any) -> dict[str, Any]:
    return {"cniVersion": version, "name": NET, "type": "host-local",
            "ipam": {"type": "host-local", "ranges": [[{"subnet": subnet}]],
                     "dataDir": str(data_dir), **ipam}}


def env(command: str, container: str | None = "c1", **extra: str | None) -> dict[str, str]:
    e: dict[str, str | None] = {"CNI_COMMAND": command, "CNI_CONTAINERID": container,
                                "CNI_NETNS": f"/var/run/netns/{container}", "CNI_IFNAME": "eth0",
                                "CNI_PATH": "/nonexistent/cni/bin"}
    e.update(extra)
    return {k: v for k, v in e.items() if v is not None}


def call(e: dict[str, str], conf: Any) -> tuple[int, Any]:
    stdin = conf if isinstance(conf, bytes) else json.dumps(conf).encode()
    rc, out = skel.dispatch(host_local, e, stdin)
    assert isinstance(out, bytes)
    return rc, (json.loads(out) if out.strip() else None)


def ok(e: dict[str, str], conf: Any) -> Any:
    rc, body = call(e, conf)
    assert rc == 0, body
    return body


def fails(e: dict[str, str], conf: Any, code: int | None = None) -> dict[str, Any]:
    rc, body = call(e, conf)
    assert rc == 1, body
    assert isinstance(body, dict) and isinstance(body.get("code"), int) and body.get("msg"), body
    assert "cniVersion" in body
    if code is not None:
        assert body["code"] == code, body
    return body


def held(data_dir: Path) -> dict[str, tuple[str, str]]:
    return {str(ip): owner for ip, owner in HostLocalStore(data_dir, NET).allocations().items()}


def test_add_returns_a_result_with_ips(data_dir):
    res = ok(env("ADD"), netconf(data_dir))
    assert res["cniVersion"] == "1.1.0"
    [ip] = res["ips"]
    assert IPv4Interface(ip["address"]) in {IPv4Interface(f"10.244.1.{i}/24") for i in range(2, 255)}
    assert ip["gateway"] == "10.244.1.1"
    assert held(data_dir) == {ip["address"].split("/")[0]: ("c1", "eth0")}
    Result.from_dict(res)  # parses as a CNI result


@pytest.mark.parametrize("version", ["1.0.0", "0.4.0"])
def test_add_answers_in_the_requested_version(data_dir, version):
    assert ok(env("ADD"), netconf(data_dir, version=version))["cniVersion"] == version


def test_add_two_containers_get_two_addresses(data_dir):
    a = ok(env("ADD", "c1"), netconf(data_dir))["ips"][0]["address"]
    b = ok(env("ADD", "c2"), netconf(data_dir))["ips"][0]["address"]
    assert a != b
    assert set(held(data_dir).values()) == {("c1", "eth0"), ("c2", "eth0")}


def test_add_returns_configured_routes(data_dir):
    conf = netconf(data_dir, routes=[{"dst": "0.0.0.0/0"}, {"dst": "10.96.0.0/12", "gw": "10.244.1.1"}])
    res = ok(env("ADD"), conf)
    assert res["routes"] == [{"dst": "0.0.0.0/0"}, {"dst": "10.96.0.0/12", "gw": "10.244.1.1"}]


def test_add_with_subnet_form(data_dir):
    conf = netconf(data_dir)
    conf["ipam"] = {"type": "host-local", "subnet": "10.244.7.0/24", "rangeStart": "10.244.7.50",
                    "dataDir": str(data_dir)}
    assert ok(env("ADD"), conf)["ips"][0]["address"] == "10.244.7.50/24"


def test_del_is_idempotent(data_dir):
    ok(env("ADD"), netconf(data_dir))
    assert ok(env("DEL"), netconf(data_dir)) is None
    assert held(data_dir) == {}
    assert ok(env("DEL"), netconf(data_dir)) is None          # twice: still success
    assert ok(env("DEL", "never-added"), netconf(data_dir)) is None


def test_del_without_netns_succeeds(data_dir):
    """The spec lets a runtime DEL after the namespace is gone (CNI_NETNS unset)."""
    ok(env("ADD"), netconf(data_dir))
    ok(env("DEL", CNI_NETNS=None), netconf(data_dir))
    assert held(data_dir) == {}


def test_del_releases_only_its_own_address(data_dir):
    ok(env("ADD", "c1"), netconf(data_dir))
    b = ok(env("ADD", "c2"), netconf(data_dir))["ips"][0]["address"]
    ok(env("DEL", "c1"), netconf(data_dir))
    assert held(data_dir) == {b.split("/")[0]: ("c2", "eth0")}


def test_check_after_add_passes_and_after_del_fails(data_dir):
    ok(env("ADD"), netconf(data_dir))
    assert ok(env("CHECK"), netconf(data_dir)) is None
    ok(env("DEL"), netconf(data_dir))
    body = fails(env("CHECK"), netconf(data_dir))
    assert "c1" in body["msg"]


def test_gc_releases_attachments_not_listed_as_valid(data_dir):
    ips = {c: ok(env("ADD", c), netconf(data_dir))["ips"][0]["address"].split("/")[0]
           for c in ("keep", "gone1", "gone2")}
    conf = netconf(data_dir)
    conf["cni.dev/valid-attachments"] = [{"containerID": "keep", "ifname": "eth0"}]
    assert ok(env("GC", None, CNI_NETNS=None, CNI_IFNAME=None), conf) is None
    assert held(data_dir) == {ips["keep"]: ("keep", "eth0")}
    ok(env("CHECK", "keep"), netconf(data_dir))
    fails(env("CHECK", "gone1"), netconf(data_dir))


def test_gc_matches_the_interface_too(data_dir):
    ok(env("ADD", "c1", CNI_IFNAME="eth0"), netconf(data_dir))
    ok(env("ADD", "c1", CNI_IFNAME="net1"), netconf(data_dir))
    conf = netconf(data_dir)
    conf["cni.dev/valid-attachments"] = [{"containerID": "c1", "ifname": "net1"}]
    ok(env("GC", None, CNI_NETNS=None, CNI_IFNAME=None), conf)
    assert list(held(data_dir).values()) == [("c1", "net1")]


def test_gc_with_no_valid_attachments_releases_everything(data_dir):
    for c in ("a", "b"):
        ok(env("ADD", c), netconf(data_dir))
    conf = netconf(data_dir)
    conf["cni.dev/valid-attachments"] = []
    ok(env("GC", None, CNI_NETNS=None, CNI_IFNAME=None), conf)
    assert held(data_dir) == {}


@pytest.mark.parametrize("stdin", [b"", b'{"cniVersion": "1.0.0"}'])
def test_version_lists_supported_versions(stdin):
    rc, body = call(env("VERSION", None, CNI_NETNS=None, CNI_IFNAME=None, CNI_PATH=None), stdin)
    assert rc == 0
    assert set(body["supportedVersions"]) >= {"0.4.0", "1.0.0", "1.1.0"}
    assert body["cniVersion"] == ("1.0.0" if stdin else cni.SPEC_VERSION)


def test_status_succeeds(data_dir):
    assert ok(env("STATUS", None, CNI_NETNS=None, CNI_IFNAME=None), netconf(data_dir)) is None


# -------------------------------------------------------------------- error codes

@pytest.mark.parametrize("missing", ["CNI_CONTAINERID", "CNI_IFNAME", "CNI_PATH", "CNI_NETNS"])
def test_add_missing_env_var_is_code_4(data_dir, missing):
    body = fails(env("ADD", **{missing: None}), netconf(data_dir), code=cni.ERR_INVALID_ENV)
    assert missing in body["msg"]
    assert held(data_dir) == {}


def test_missing_container_id_is_code_4_on_stdout(data_dir):
    rc, out = skel.dispatch(host_local, env("ADD", None), json.dumps(netconf(data_dir)).encode())
    assert rc == 1
    body = json.loads(out)
    assert body["code"] == 4 and "CNI_CONTAINERID" in body["msg"]


@pytest.mark.parametrize("stdin", [b"garbage{", b"", b"\xff\xfe", b"[1, 2]", b'"a string"', b"null"])
def test_undecodable_stdin_is_code_6(data_dir, stdin):
    fails(env("ADD"), stdin, code=cni.ERR_DECODE)
    assert held(data_dir) == {}


@pytest.mark.parametrize("version", ["9.9.9", "0.1.0", "", None])
def test_incompatible_version_is_code_1(data_dir, version):
    conf = netconf(data_dir)
    if version is None:
        del conf["cniVersion"]
    else:
        conf["cniVersion"] = version
    body = fails(env("ADD"), conf, code=cni.ERR_INCOMPATIBLE_VERSION)
    assert "1.1.0" in body.get("details", "") + body["msg"]
    assert held(data_dir) == {}


@pytest.mark.parametrize("command", ["BOGUS", "add", ""])
def test_unknown_command_is_code_4(data_dir, command):
    body = fails(env(command), netconf(data_dir), code=cni.ERR_INVALID_ENV)
    assert "CNI_COMMAND" in body["msg"]


def test_missing_command_is_code_4(data_dir):
    e = env("ADD")
    del e["CNI_COMMAND"]
    fails(e, netconf(data_dir), code=cni.ERR_INVALID_ENV)


def test_malformed_cni_args_is_code_4(data_dir):
    fails(env("ADD", CNI_ARGS="IgnoreUnknown"), netconf(data_dir), code=cni.ERR_INVALID_ENV)
    ok(env("ADD", CNI_ARGS="IgnoreUnknown=1;K8S_POD_NAME=web-0"), netconf(data_dir))


@pytest.mark.parametrize("ipam", [None, {"type": "host-local"}, {"type": "host-local", "ranges": [[{"subnet": "nope"}]]}])
def test_bad_ipam_config_is_code_7(data_dir, ipam):
    conf = netconf(data_dir)
    if ipam is None:
        del conf["ipam"]
    else:
        conf["ipam"] = {**ipam, "dataDir": str(data_dir)}
    fails(env("ADD"), conf, code=cni.ERR_INVALID_CONFIG)


def test_exhausted_range_is_an_error_and_del_frees_it(data_dir):
    conf = netconf(data_dir, subnet="10.244.9.0/30")     # .1 is the gateway: one address left
    assert ok(env("ADD", "c1"), conf)["ips"][0]["address"] == "10.244.9.2/30"
    body = fails(env("ADD", "c2"), conf)
    assert body["code"] == cni.ERR_TRY_AGAIN
    ok(env("DEL", "c1"), conf)
    assert ok(env("ADD", "c2"), conf)["ips"][0]["address"] == "10.244.9.2/30"


# =========================================================================== types

def test_result_round_trip():
    r = Result("1.1.0", [Interface("eth0", "aa:bb:cc:dd:ee:ff", "/var/run/netns/p", 1480)],
               [IPConfig("10.244.1.5/32", "169.254.1.1", 0)], [cni.Route("0.0.0.0/0", "169.254.1.1")],
               {"nameservers": ["10.96.0.10"]})
    assert Result.from_dict(json.loads(json.dumps(r.to_dict()))) == r
    assert r.sandbox_ip("eth0") == "10.244.1.5/32"


def test_result_sandbox_ip_prefers_the_sandbox_interface():
    r = Result(interfaces=[Interface("cali123"), Interface("eth0", sandbox="/ns")],
               ips=[IPConfig("10.0.0.1/32", interface=0), IPConfig("10.244.1.7/24", interface=1)])
    assert r.sandbox_ip("eth0") == "10.244.1.7/24"
    assert Result().sandbox_ip("eth0") is None


def test_malformed_result_is_code_6():
    with pytest.raises(CNIError) as ei:
        Result.from_dict({"cniVersion": "1.1.0", "ips": [{"gateway": "10.0.0.1"}]})
    assert ei.value.code == cni.ERR_DECODE


def test_cni_error_json():
    e = CNIError(7, "bad", "more", plugin="x")
    assert e.to_dict("1.0.0") == {"cniVersion": "1.0.0", "code": 7, "msg": "bad", "details": "more"}
    assert "[CNI error 7]" in str(e) and "'x'" in str(e)


def test_network_config_list_from_dict():
    d = {"cniVersion": "1.1.0", "name": "cbr0", "disableCheck": True,
         "plugins": [{"type": "flannel"}, {"type": "portmap"}]}
    net = NetworkConfigList.from_dict(d, bin_dirs=("/opt/cni/bin",))
    assert (net.name, net.cni_version, net.disable_check, net.bin_dirs) == ("cbr0", "1.1.0", True, ("/opt/cni/bin",))
    assert net.to_dict() == d
    conf = net.plugin_config(net.plugins[1], {"cniVersion": "1.1.0", "ips": []})
    assert conf == {"cniVersion": "1.1.0", "name": "cbr0", "type": "portmap",
                    "prevResult": {"cniVersion": "1.1.0", "ips": []}}


def test_single_plugin_config_is_wrapped_in_a_list():
    net = NetworkConfigList.from_dict({"cniVersion": "1.0.0", "name": "mynet", "type": "bridge", "bridge": "cni0"})
    assert net.name == "mynet" and net.plugins == [{"type": "bridge", "bridge": "cni0"}]


@pytest.mark.parametrize("d, what", [
    ({"cniVersion": "1.1.0", "plugins": [{"type": "x"}]}, "name"),
    ({"name": "n", "plugins": [{"type": "x"}]}, "cniVersion"),
    ({"cniVersion": "9.9.9", "name": "n", "plugins": [{"type": "x"}]}, "9.9.9"),
    ({"cniVersion": "1.1.0", "name": "n", "plugins": []}, "plugins"),
    ({"cniVersion": "1.1.0", "name": "n", "plugins": [{"bridge": "cni0"}]}, "type"),
    ({"cniVersion": "1.1.0", "name": "n"}, "type"),
    ([], "JSON object"),
])
def test_network_config_list_errors(d, what):
    with pytest.raises(SpecError, match="net.conflist") as ei:
        NetworkConfigList.from_dict(d, source="net.conflist")
    assert what in str(ei.value)


# =========================================================================== runtime side (exec)

def _python_plugin(path: Path, body: str) -> Path:
    path.write_text(f"#!{sys.executable}\n{body}")
    path.chmod(0o755)
    return path


@pytest.fixture
def bin_dir(tmp_path: Path) -> Path:
    """CNI_PATH with host-local (as Cluster._write_cni_bin writes it, plus a command log),
    and ``fail``: a plugin whose ADD fails with code 7 and whose DEL succeeds."""
    d = tmp_path / "bin"
    d.mkdir()
    log = tmp_path / "calls.log"
    logger = ("import os\n"
              f"with open({str(log)!r}, 'a') as f:\n"
              "    f.write(os.path.basename(__file__) + ' ' + os.environ.get('CNI_COMMAND', '?') + '\\n')\n")
    _python_plugin(d / "host-local",
                   "import sys\n"
                   f"sys.path.insert(0, {str(REPO)!r})\n"
                   + logger +
                   "import cni_plugins.host_local as plugin\n"
                   "from cni_plugins import skel\n"
                   "skel.main(plugin)\n")
    _python_plugin(d / "fail",
                   "import json, os, sys\n"
                   + logger +
                   "sys.stdin.read()\n"
                   "if os.environ.get('CNI_COMMAND') == 'ADD':\n"
                   "    print(json.dumps({'cniVersion': '1.1.0', 'code': 7, 'msg': 'boom', 'details': 'on purpose'}))\n"
                   "    sys.exit(1)\n")
    _python_plugin(d / "crash", "import sys\nsys.stderr.write('Traceback: something broke\\n')\nsys.exit(3)\n")
    _python_plugin(d / "chatty", "import sys\nsys.stdin.read()\nprint('hello, not json')\n")
    return d


def calls(tmp_path: Path) -> list[str]:
    log = tmp_path / "calls.log"
    return log.read_text().splitlines() if log.exists() else []


def hostlocal_plugin(data_dir: Path, subnet: str = SUBNET) -> dict[str, Any]:
    return {"type": "host-local", "ipam": {"type": "host-local", "ranges": [[{"subnet": subnet}]],
                                           "dataDir": str(data_dir)}}


def netlist(bin_dir: Path, *plugins: dict[str, Any], version: str = "1.1.0") -> NetworkConfigList:
    return NetworkConfigList(NET, version, list(plugins), bin_dirs=(str(bin_dir),))


def attachment(container: str = "c1") -> RuntimeConf:
    return RuntimeConf(container, f"/var/run/netns/{container}", "eth0",
                       {"K8S_POD_NAMESPACE": "default", "K8S_POD_NAME": container})


@pytest.fixture(params=["exec", "inprocess"])
def runtime(request, tmp_path: Path) -> CNIRuntime:
    invoker = InProcessInvoker() if request.param == "inprocess" else None
    return CNIRuntime(node_netns=None, cache_dir=tmp_path / "cache", invoker=invoker)


def cache_file(tmp_path: Path, container: str = "c1") -> Path:
    return tmp_path / "cache" / f"{NET}-{container}-eth0"


def test_runtime_add_check_delete(runtime, bin_dir, data_dir, tmp_path):
    net = netlist(bin_dir, hostlocal_plugin(data_dir))
    rt = attachment()
    res = runtime.add(net, rt)
    assert isinstance(res, Result) and res.cni_version == "1.1.0"
    address = res.ips[0].address
    assert IPv4Interface(address).network == IPv4Network(SUBNET)
    assert res.sandbox_ip("eth0") == address
    assert held(data_dir) == {address.split("/")[0]: ("c1", "eth0")}

    cached = json.loads(cache_file(tmp_path).read_text())
    assert cached["kind"] == "cniCacheV1" and cached["containerId"] == "c1"
    assert cached["ifName"] == "eth0" and cached["networkName"] == NET
    assert Result.from_dict(cached["result"]) == res

    runtime.check(net, rt)
    runtime.delete(net, rt)
    assert not cache_file(tmp_path).exists()
    assert held(data_dir) == {}
    runtime.delete(net, rt)                      # idempotent
    with pytest.raises(CNIError) as ei:          # no cached result left to check against
        runtime.check(net, rt)
    assert ei.value.code == cni.ERR_UNKNOWN_CONTAINER


def test_runtime_check_can_be_disabled(runtime, bin_dir, data_dir):
    net = netlist(bin_dir, hostlocal_plugin(data_dir))
    net.disable_check = True
    runtime.check(net, attachment("never-added"))


def test_runtime_runs_plugin_processes(bin_dir, data_dir, tmp_path):
    rt = CNIRuntime(node_netns=None, cache_dir=tmp_path / "cache")
    net = netlist(bin_dir, hostlocal_plugin(data_dir))
    rt.add(net, attachment())
    rt.delete(net, attachment())
    assert calls(tmp_path) == ["host-local ADD", "host-local DEL"]


def test_runtime_version(bin_dir, tmp_path):
    rt = CNIRuntime(node_netns=None, cache_dir=tmp_path / "cache")
    v = rt.version("host-local", (str(bin_dir),))
    assert set(v["supportedVersions"]) >= {"0.4.0", "1.0.0", "1.1.0"}


def test_runtime_gc(runtime, bin_dir, data_dir, tmp_path):
    net = netlist(bin_dir, hostlocal_plugin(data_dir))
    results = {c: runtime.add(net, attachment(c)) for c in ("a", "b", "c")}
    runtime.gc(net, [attachment("b")])
    assert held(data_dir) == {results["b"].ips[0].address.split("/")[0]: ("b", "eth0")}
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [f"{NET}-b-eth0"]


def test_runtime_missing_plugin_is_code_7(runtime, bin_dir, tmp_path):
    net = netlist(bin_dir, {"type": "no-such-plugin"})
    with pytest.raises(CNIError) as ei:
        runtime.add(net, attachment())
    assert ei.value.code == cni.ERR_INVALID_CONFIG and "no-such-plugin" in str(ei.value)
    assert not cache_file(tmp_path).exists()


def test_plugin_error_json_becomes_cni_error(runtime, bin_dir, tmp_path):
    with pytest.raises(CNIError) as ei:
        runtime.add(netlist(bin_dir, {"type": "fail"}), attachment())
    e = ei.value
    assert (e.code, e.msg, e.details, e.plugin) == (7, "boom", "on purpose", "fail")
    assert calls(tmp_path) == ["fail ADD"]       # nothing was added, so nothing to roll back
    assert not cache_file(tmp_path).exists()


def test_plugin_crash_without_error_json_is_code_5(bin_dir, tmp_path):
    rt = CNIRuntime(node_netns=None, cache_dir=tmp_path / "cache")
    with pytest.raises(CNIError) as ei:
        rt.add(netlist(bin_dir, {"type": "crash"}), attachment())
    assert ei.value.code == cni.ERR_IO
    assert "something broke" in ei.value.details


def test_plugin_printing_non_json_is_code_6(bin_dir, tmp_path):
    rt = CNIRuntime(node_netns=None, cache_dir=tmp_path / "cache")
    with pytest.raises(CNIError) as ei:
        rt.add(netlist(bin_dir, {"type": "chatty"}), attachment())
    assert ei.value.code == cni.ERR_DECODE


def test_failed_chained_add_rolls_back(runtime, bin_dir, data_dir, tmp_path):
    net = netlist(bin_dir, hostlocal_plugin(data_dir), {"type": "fail"})
    with pytest.raises(CNIError) as ei:
        runtime.add(net, attachment())
    assert ei.value.code == 7 and ei.value.plugin == "fail"   # the first error, not the rollback's
    log = calls(tmp_path)
    if isinstance(runtime.invoker, InProcessInvoker):         # host-local ran in this process
        assert log == ["fail ADD"]
    else:
        assert log[:2] == ["host-local ADD", "fail ADD"]
        assert log.count("host-local DEL") == 1               # rollback of what was added
        assert log.index("host-local DEL") > log.index("fail ADD")
    assert held(data_dir) == {}                               # nothing allocated remains
    assert not cache_file(tmp_path).exists()

    # an ADD after the failed ADD starts from a clean slate
    res = runtime.add(netlist(bin_dir, hostlocal_plugin(data_dir)), attachment())
    assert held(data_dir) == {res.ips[0].address.split("/")[0]: ("c1", "eth0")}


def test_chained_add_passes_prev_result_and_delete_runs_in_reverse(bin_dir, data_dir, tmp_path):
    prev_log = tmp_path / "prev.json"
    _python_plugin(bin_dir / "tap",
                   "import json, os, sys\n"
                   "conf = json.load(sys.stdin)\n"
                   f"open({str(prev_log)!r}, 'a').write(os.environ['CNI_COMMAND'] + ' ' + json.dumps(conf.get('prevResult')) + '\\n')\n"
                   "if os.environ['CNI_COMMAND'] == 'ADD':\n"
                   "    print(json.dumps(conf['prevResult']))\n")
    rt = CNIRuntime(node_netns=None, cache_dir=tmp_path / "cache")
    net = netlist(bin_dir, hostlocal_plugin(data_dir), {"type": "tap"})
    res = rt.add(net, attachment())
    rt.delete(net, attachment())
    lines = prev_log.read_text().splitlines()
    assert [line.split(" ", 1)[0] for line in lines] == ["ADD", "DEL"]
    for line in lines:   # the tap plugin saw host-local's result as prevResult, on ADD and on DEL
        assert json.loads(line.split(" ", 1)[1])["ips"][0]["address"] == res.ips[0].address
    assert held(data_dir) == {}


def test_concurrent_adds_never_share_an_ip(runtime, bin_dir, data_dir):
    rt = runtime
    net = netlist(bin_dir, hostlocal_plugin(data_dir, subnet="10.244.3.0/28"))  # 13 addresses for 10 pods
    results: dict[str, Result] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(10)

    def add(container: str) -> None:
        try:
            start.wait()
            results[container] = rt.add(net, attachment(container))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=add, args=(f"pod{i}",)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    addresses = [r.ips[0].address for r in results.values()]
    assert len(addresses) == 10 and len(set(addresses)) == 10
    on_disk = held(data_dir)
    assert len(on_disk) == 10
    assert {owner for owner, _ in on_disk.values()} == set(results)
    assert {ip for ip in on_disk} == {a.split("/")[0] for a in addresses}


def test_gc_leaves_other_networks_cached_results_alone(bin_dir, data_dir, tmp_path):
    rt = CNIRuntime(node_netns=None, cache_dir=tmp_path / "cache", invoker=InProcessInvoker())
    plugin = hostlocal_plugin(data_dir)
    net = NetworkConfigList("net", "1.1.0", [plugin], bin_dirs=(str(bin_dir),))
    other = NetworkConfigList("net-b", "1.1.0", [plugin], bin_dirs=(str(bin_dir),))
    rt.add(other, attachment("c1"))
    rt.gc(net, [])
    assert (tmp_path / "cache" / "net-b-c1-eth0").exists()
    rt.check(other, attachment("c1"))
