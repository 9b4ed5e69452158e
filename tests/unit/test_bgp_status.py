"""What the speakers say about themselves, parsed from output captured from real daemons
(BIRD 2.0.12, ExaBGP 5.0: ``tests/unit/data``); the ExaBGP route installer's choices; the FIB
reader."""

from __future__ import annotations

import io
import json
import socket
import struct
from pathlib import Path

from k8snetlab.bgp import fib, installer, status
from k8snetlab.bgp.speakers import _is_end, _is_error, parse_bird_memory

DATA = Path(__file__).resolve().parent / "data"


def data(name: str) -> str:
    return (DATA / name).read_text()


def test_bird_protocols_give_bgp_sessions_only():
    sessions = status.parse_bird_protocols(data("birdc_show_protocols_all.txt"))
    assert [(s.peer, s.address, s.state, s.routes_received) for s in sessions] == [
        ("node2", "192.168.1.130", "Established", 2), ("node3", "192.168.1.131", "Established", 1)]
    assert sessions[0].since == "2026-11-21 23:15:23"
    assert all(s.established for s in sessions)


def test_bird_protocol_not_established():
    text = ("BIRD 2.0.12 ready.\nName       Proto      Table      State  Since         Info\n"
            "Mesh_10_0_0_2 BGP        ---        start  2026-11-21 23:15:23  Active        Socket: Connection refused\n"
            "  Description:    node2\n  BGP state:          Active\n    Neighbor address: 10.0.0.2\n")
    (s,) = status.parse_bird_protocols(text)
    assert (s.peer, s.state, s.established, s.routes_received) == ("node2", "Active", False, None)


def test_bird_routes_with_two_paths():
    routes = status.parse_bird_routes(data("birdc_show_route.txt"))
    assert [(r.prefix, r.next_hop, r.via, r.best) for r in routes] == [
        ("10.244.0.0/24", None, "pod_cidr", True),
        ("10.244.1.0/24", "192.168.1.130", "Node_192_168_1_130", True),
        ("10.244.2.0/24", "192.168.1.131", "Node_192_168_1_131", True),
        ("10.244.2.0/24", "192.168.1.131", "Node_192_168_1_130", False)]


def test_bird_memory_total_in_kb():
    assert parse_bird_memory(data("birdc_show_memory.txt")) == 165       # 81.6 kB used + 83.3 kB overhead
    assert parse_bird_memory("Total:   1.5 MB   512.0  B\n") == 1536
    assert parse_bird_memory("nothing") is None


def test_exabgp_neighbors():
    sessions = status.parse_exabgp_neighbors(data("exabgp_show_neighbor_json.txt"),
                                             {"192.168.1.129": "node1"})
    assert [(s.peer, s.address, s.state) for s in sessions] == [
        ("node1", "192.168.1.129", "Established"), ("192.168.1.130", "192.168.1.130", "Established")]
    assert len(sessions[0].since) == len("2026-11-21 23:15:23")


def test_exabgp_adj_rib_in():
    rib = status.parse_exabgp_adj_rib_in(data("exabgp_show_adj_rib_in.txt"))
    assert ("192.168.1.129", "10.244.1.0/24", "192.168.1.130") in rib       # reflected: next hop kept
    assert len(rib) == 4
    assert status.parse_exabgp_adj_rib_in(
        "neighbor 10.0.0.1 local-ip 10.0.0.2 local-as 1 peer-as 1 router-id 10.0.0.2 family-allowed in-open "
        "ipv4 unicast 10.244.0.0/24 next-hop 10.0.0.1 origin igp") == [("10.0.0.1", "10.244.0.0/24", "10.0.0.1")]


def test_exabgp_cli_answer_end():
    assert _is_end("done") and _is_end('{ "answer": "done", "message": "command completed" }')
    assert _is_error("error") and not _is_error("done") and not _is_end("[{}]")


def test_table():
    st = status.SpeakerStatus("node1", "bird", True, status.parse_bird_protocols(data("birdc_show_protocols_all.txt")),
                              status.parse_bird_routes(data("birdc_show_route.txt")))
    out = status.table([st, status.SpeakerStatus("node3", "exabgp", False, error="the daemon is stopped")])
    assert "node1 (bird): 2/2 sessions established, 3 prefixes" in out
    assert "node2" in out and "Established" in out
    assert "node3 (exabgp): not running: the daemon is stopped" in out


def test_descriptors(tmp_path):
    for sub, name in (("nodes", "node1"), ("routers", "tor-a"), ("nodes", "node2")):
        d = tmp_path / sub / name
        d.mkdir(parents=True)
        (d / status.DESCRIPTOR).write_text(json.dumps({"name": name}))
    (tmp_path / "nodes" / "node3").mkdir()              # a node without a speaker
    assert [d["name"] for d in status.descriptors(tmp_path)] == ["node1", "node2", "tor-a"]


# ------------------------------------------------------------------------ the ExaBGP route installer

def update(peer: str, announce: dict | None = None, withdraw: list | None = None, as_path: list | None = None) -> dict:
    u: dict = {}
    if announce:
        u["announce"] = {"ipv4 unicast": {hop: [{"nlri": p} for p in prefixes] for hop, prefixes in announce.items()}}
    if withdraw:
        u["withdraw"] = {"ipv4 unicast": [{"nlri": p} for p in withdraw]}
    if as_path is not None:
        u["attribute"] = {"origin": "igp", "as-path": as_path}
    return {"type": "update", "neighbor": {"address": {"local": "10.0.0.3", "peer": peer},
                                           "direction": "receive", "message": {"update": u}}}


def state(peer: str, st: str) -> dict:
    return {"type": "state", "neighbor": {"address": {"local": "10.0.0.3", "peer": peer}, "state": st}}


def test_installer_announce_withdraw_and_session_down():
    rib = installer.Rib(own=frozenset({"10.244.2.0/24"}), self_addresses=frozenset({"10.0.0.3"}))
    assert rib.apply(update("10.0.0.1", {"10.0.0.1": ["10.244.0.0/24"]})) == [("10.244.0.0/24", "10.0.0.1")]
    assert rib.apply(update("10.0.0.2", {"10.0.0.2": ["10.244.1.0/24"]})) == [("10.244.1.0/24", "10.0.0.2")]
    assert rib.apply(update("10.0.0.1", {"10.0.0.1": ["10.244.0.0/24"]})) == []     # nothing changed
    assert rib.apply(update("10.0.0.1", withdraw=["10.244.0.0/24"])) == [("10.244.0.0/24", None)]
    assert rib.apply(state("10.0.0.2", "down")) == [("10.244.1.0/24", None)]
    assert rib.installed == {}


def test_installer_two_reflectors_same_path_one_route():
    rib = installer.Rib()
    assert rib.apply(update("10.0.0.1", {"10.0.0.5": ["10.244.4.0/24"]})) == [("10.244.4.0/24", "10.0.0.5")]
    assert rib.apply(update("10.0.0.2", {"10.0.0.5": ["10.244.4.0/24"]})) == []
    assert rib.apply(state("10.0.0.1", "down")) == []          # the other reflector still has it
    assert rib.installed == {"10.244.4.0/24": "10.0.0.5"}
    assert rib.apply(state("10.0.0.2", "down")) == [("10.244.4.0/24", None)]


def test_installer_prefers_shorter_as_path_and_ignores_own_block():
    rib = installer.Rib(own=frozenset({"10.244.2.0/24"}), self_addresses=frozenset({"10.0.0.3"}))
    rib.apply(update("10.0.0.1", {"10.0.0.1": ["10.244.9.0/24"]}, as_path=[65001, 65002, 64512]))
    assert rib.apply(update("10.0.0.2", {"10.0.0.2": ["10.244.9.0/24"]}, as_path=[65001])) == \
        [("10.244.9.0/24", "10.0.0.2")]
    assert rib.apply(update("10.0.0.1", {"10.0.0.1": ["10.244.2.0/24"]})) == []     # our own block reflected
    assert rib.apply(update("10.0.0.1", {"10.0.0.3": ["10.244.7.0/24"]})) == []     # next hop is us


class FakeFib:
    def __init__(self):
        self.calls = []

    def replace(self, prefix, hop):
        self.calls.append(("replace", prefix, hop))

    def blackhole(self, prefix):
        self.calls.append(("blackhole", prefix))

    def delete(self, prefix):
        self.calls.append(("delete", prefix))

    def close(self):
        self.calls.append(("close",))


def test_installer_run_blackholes_own_block_and_cleans_up_at_eof():
    lines = [json.dumps(update("10.0.0.1", {"10.0.0.1": ["10.244.0.0/24"]})), "done", "not json {",
             json.dumps(update("10.0.0.2", {"10.0.0.2": ["10.244.1.0/24"]}))]
    f = FakeFib()
    installer.run(io.StringIO("\n".join(lines) + "\n"), installer.Rib(own=frozenset({"10.244.2.0/24"})), f)
    assert f.calls[0] == ("blackhole", "10.244.2.0/24")
    assert ("replace", "10.244.0.0/24", "10.0.0.1") in f.calls and ("replace", "10.244.1.0/24", "10.0.0.2") in f.calls
    tail = f.calls[-4:]          # ExaBGP went away: everything it installed goes too
    assert set(tail) == {("delete", "10.244.0.0/24"), ("delete", "10.244.1.0/24"), ("delete", "10.244.2.0/24"),
                         ("close",)}


# ------------------------------------------------------------------------ FIB reader

def test_fib_reads_proc_net_route(tmp_path, monkeypatch):
    def hexaddr(a: str) -> str:
        return f"{struct.unpack('<I', socket.inet_aton(a))[0]:08X}"
    lines = ["Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT"]
    for dst, mask in (("10.244.1.0", "255.255.255.0"), ("0.0.0.0", "0.0.0.0"), ("10.244.0.2", "255.255.255.255")):
        lines.append(f"eth0\t{hexaddr(dst)}\t00000000\t0001\t0\t0\t0\t{hexaddr(mask)}\t0\t0\t0")
    (tmp_path / "route").write_text("\n".join(lines) + "\n")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda p, *a, **k: real_open(tmp_path / "route" if p == "/proc/4242/net/route" else p, *a, **k))
    assert fib.prefixes(4242) == {"10.244.1.0/24", "0.0.0.0/0", "10.244.0.2/32"}
    assert fib.prefixes(999999999) == set()
