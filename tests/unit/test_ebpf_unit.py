"""k8snetlab.ebpf without root: map key/value packing, parsing helpers, error paths."""

from __future__ import annotations

import re
import socket
import struct

import pytest

from k8snetlab import ebpf, proc
from k8snetlab.errors import K8sNetLabError, SpecError, ToolMissing


def test_tunnel_key_layout():
    raw = ebpf.pack_tunnel_key("10.244.2.0/24")
    assert len(raw) == 8
    assert struct.unpack("=I", raw[:4]) == (24,)             # host order, as the LPM trie wants
    assert raw[4:] == socket.inet_aton("10.244.2.0")         # network order
    assert ebpf.unpack_tunnel_key(raw) == "10.244.2.0/24"


@pytest.mark.parametrize("cidr", ["10.244.0.0/16", "10.244.7.0/26", "0.0.0.0/0",
                                  "10.244.1.2/32"])
def test_tunnel_key_round_trip(cidr):
    assert ebpf.unpack_tunnel_key(ebpf.pack_tunnel_key(cidr)) == cidr


@pytest.mark.parametrize("cidr", ["10.244.2.5/24", "10.244.2.0/33", "fd00::/64", "pods", ""])
def test_tunnel_key_rejects_bad_cidrs(cidr):
    with pytest.raises(SpecError, match="pod CIDR"):
        ebpf.pack_tunnel_key(cidr)


def test_tunnel_value_layout():
    raw = ebpf.pack_tunnel_value("192.168.1.131", "192.168.1.130")
    assert raw == socket.inet_aton("192.168.1.131") + socket.inet_aton("192.168.1.130")
    assert ebpf.unpack_tunnel_value(raw) == ("192.168.1.131", "192.168.1.130")


@pytest.mark.parametrize("bad", ["192.168.1", "fd00::1", "node2"])
def test_tunnel_value_rejects_bad_addresses(bad):
    with pytest.raises(SpecError, match="remote node IP"):
        ebpf.pack_tunnel_value(bad, "192.168.1.1")
    with pytest.raises(SpecError, match="local node IP"):
        ebpf.pack_tunnel_value("192.168.1.1", bad)


def test_peer_key():
    raw = ebpf.pack_peer_key("192.168.77.2")
    assert raw == bytes([192, 168, 77, 2]) and len(raw) == ebpf.PEER_KEY_SIZE
    assert ebpf.unpack_peer_key(raw) == "192.168.77.2"
    with pytest.raises(SpecError):
        ebpf.pack_peer_key("192.168.77.256")


def test_sum_percpu_u64():
    raw = struct.pack("=4Q", 1, 2, 3, 2 ** 40)
    assert ebpf.sum_percpu_u64(raw, 4) == 6 + 2 ** 40
    assert ebpf.sum_percpu_u64(raw, 2) == 3


@pytest.mark.parametrize("text,n", [("0\n", 1), ("0-1\n", 2), ("0,2-5", 5), ("0-63", 64)])
def test_parse_cpu_list(text, n):
    assert ebpf.parse_cpu_list(text) == n


def test_object_name_follows_source_compiler_and_flags():
    base = ebpf.object_name(b"int x;", "clang 14", ("-O2",))
    assert base == ebpf.object_name(b"int x;", "clang 14", ("-O2",))
    assert base.startswith("ipip_tc-") and base.endswith(".o")
    assert base != ebpf.object_name(b"int y;", "clang 14", ("-O2",))
    assert base != ebpf.object_name(b"int x;", "clang 15", ("-O2",))
    assert base != ebpf.object_name(b"int x;", "clang 14", ("-O1",))


MOUNTS = [("/", "ext4"), ("/sys", "sysfs"), ("/run", "tmpfs"), ("/run/k8snetlab/knl3/bpf", "bpf"),
          ("/tmp/with space", "bpf")]


@pytest.mark.parametrize("path,expected", [
    ("/run/k8snetlab/knl3/bpf/node1", ("/run/k8snetlab/knl3/bpf", "bpf")),
    ("/run/k8snetlab/knl3/bpf", ("/run/k8snetlab/knl3/bpf", "bpf")),
    ("/run/k8snetlab/knl3/bpfx", ("/run", "tmpfs")),
    ("/run/k8snetlab/knl3", ("/run", "tmpfs")),
    ("/tmp/with space/n1", ("/tmp/with space", "bpf")),
    ("/var/cache", ("/", "ext4")),
])
def test_fs_type_at(path, expected):
    assert ebpf.fs_type_at(path, MOUNTS) == expected


def test_datapath_rejects_bad_local_ip(tmp_path):
    with pytest.raises(SpecError, match="node1"):
        ebpf.IpipTcDatapath("node1", "/proc/1/ns/net", "eth0", "192.168.1.300", str(tmp_path))


def test_detach_without_attach_or_namespace_is_a_no_op(tmp_path):
    pins = tmp_path / "node1"
    (pins / "maps").mkdir(parents=True)
    (pins / "maps" / "knl_tunnels").write_text("")          # a leftover "pin"
    dp = ebpf.IpipTcDatapath("node1", str(tmp_path / "no-such-netns"), "eth0", "192.168.1.130",
                             str(pins))
    dp.detach()
    dp.detach()
    assert not (pins / "maps").exists() and not (pins / "progs").exists()
    assert not dp.attached()


def test_map_access_before_attach_is_one_clear_error(tmp_path):
    dp = ebpf.IpipTcDatapath("node1", str(tmp_path / "no-such-netns"), "eth0", "192.168.1.130",
                             str(tmp_path / "node1"))
    with pytest.raises(K8sNetLabError, match="knl_tunnels") as e:
        dp.set_tunnel("10.244.2.0/24", "192.168.1.131")
    assert "\n" not in str(e.value)


def test_attach_refuses_pin_dir_outside_bpffs(tmp_path, monkeypatch):
    monkeypatch.setattr(ebpf, "compile_object", lambda force=False: tmp_path / "x.o")
    monkeypatch.setattr(proc, "require", lambda *tools: {t: t for t in tools})
    dp = ebpf.IpipTcDatapath("node1", "/proc/self/ns/net", "eth0", "192.168.1.130",
                             str(tmp_path / "node1"))
    with pytest.raises(ebpf.BpfError, match="not on a bpffs"):
        dp.attach()
    assert not (tmp_path / "node1").exists()


def test_compile_without_clang_names_the_package(monkeypatch):
    monkeypatch.setattr(proc, "which", lambda tool: None)
    with pytest.raises(ToolMissing, match="apt-get install clang"):
        ebpf.compile_object()


def test_source_defines_what_the_loader_expects():
    text = ebpf.SOURCE.read_text()
    for name in (ebpf.ENCAP_PROG, ebpf.DECAP_PROG, ebpf.TUNNELS_MAP, ebpf.PEERS_MAP,
                 ebpf.STATS_MAP):
        assert name in text
    assert text.count('SEC("tc")') == 2
    enum = re.search(r"enum knl_stat \{(.*?)\}", text, re.S)
    names = re.findall(r"KNL_STAT_(\w+)", enum.group(1))
    assert names[-1] == "MAX"
    assert tuple(n.lower() for n in names[:-1]) == ebpf.STAT_NAMES


class _RecordingMap:
    def __init__(self):
        self.entries: dict[bytes, bytes] = {}

    def update(self, key: bytes, value: bytes, flags: int = 0) -> None:
        self.entries[key] = value


def test_add_tunnels_writes_the_bytes_add_peer_and_set_tunnel_write(tmp_path):
    """The bulk path of a node agent's start packs from the address objects; the map entries
    must be byte for byte those of the one-by-one path."""
    import ipaddress
    pairs = [("10.244.2.0/24", "192.168.1.131"), ("10.244.3.0/24", "192.168.1.132"), ("10.8.0.0/16", "192.168.2.9")]
    maps = []
    for bulk in (False, True):
        dp = ebpf.IpipTcDatapath("node1", "/proc/1/ns/net", "eth0", "192.168.1.130", str(tmp_path))
        dp._maps = {ebpf.TUNNELS_MAP: _RecordingMap(), ebpf.PEERS_MAP: _RecordingMap()}
        if bulk:
            dp.add_tunnels([(ipaddress.IPv4Network(c), ipaddress.IPv4Address(r)) for c, r in pairs])
        else:
            for c, r in pairs:
                dp.add_peer(r)
                dp.set_tunnel(c, r)
        maps.append({k: m.entries for k, m in dp._maps.items()})
    assert maps[0] == maps[1] and len(maps[0][ebpf.TUNNELS_MAP]) == 3 and len(maps[0][ebpf.PEERS_MAP]) == 3
