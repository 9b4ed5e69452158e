"""The traffic runners on real namespaces: two throwaway namespaces joined by a veth pair.

Needs root, ``ip``, ``ping`` and ``iperf3``; skips with a reason otherwise. Each test gets
its own pair of namespaces (``knltest<random>a`` / ``...b``); the veth is created inside
them, so nothing ever appears in the root namespace, and deleting the namespaces removes it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from dataclasses import dataclass

import psutil
import pytest

from k8snetlab import measure, proc

pytestmark = pytest.mark.integration

A_IP, B_IP = "10.123.0.1", "10.123.0.2"


def _skip_unless_ready() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces): run 'sudo make test'")
    for tool in ("ip", "ping", "iperf3"):
        if proc.which(tool) is None:
            pytest.skip(f"{tool} is not installed ('sudo make deps' installs it)")


@dataclass
class Pair:
    a: str            # namespace names
    b: str

    @property
    def a_ns(self) -> str:
        return f"/run/netns/{self.a}"

    @property
    def b_ns(self) -> str:
        return f"/run/netns/{self.b}"


def _ns_inode(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def iperf3_in(pair: Pair) -> list[int]:
    """PIDs of iperf3 processes inside the pair's namespaces: only ours can be there."""
    ours = {_ns_inode(pair.a_ns), _ns_inode(pair.b_ns)}
    found = []
    for p in psutil.process_iter(["name"]):
        with contextlib.suppress(OSError):
            if p.info["name"] == "iperf3" and _ns_inode(f"/proc/{p.pid}/ns/net") in ours:
                found.append(p.pid)
    return found


def iperf3_children() -> list[int]:
    """iperf3 processes (live or unreaped) whose parent is this test process."""
    found = []
    for child in psutil.Process().children():
        with contextlib.suppress(psutil.Error):
            if child.name() == "iperf3":
                found.append(child.pid)
    return found


@pytest.fixture
def pair():
    _skip_unless_ready()
    tag = secrets.token_hex(3)
    p = Pair(f"knltest{tag}a", f"knltest{tag}b")
    made = []
    try:
        for name in (p.a, p.b):
            proc.run(["ip", "netns", "add", name])
            made.append(name)
        # both ends are born inside the namespaces: the root namespace never sees them
        proc.run(["ip", "-n", p.a, "link", "add", "eth0", "type", "veth",
                  "peer", "name", "eth0", "netns", p.b])
        for name, ip in ((p.a, A_IP), (p.b, B_IP)):
            proc.run(["ip", "-n", name, "addr", "add", f"{ip}/30", "dev", "eth0"])
            proc.run(["ip", "-n", name, "link", "set", "eth0", "up"])
            proc.run(["ip", "-n", name, "link", "set", "lo", "up"])
        yield p
    finally:
        leftovers = iperf3_in(p) if len(made) == 2 else []
        for name in reversed(made):
            proc.run(["ip", "netns", "del", name], check=False)
        assert not leftovers, f"iperf3 processes left in the test namespaces: {leftovers}"
        listed = proc.run(["ip", "netns", "list"]).stdout
        assert p.a not in listed and p.b not in listed


def test_ping_between_namespaces(pair):
    s = measure.ping(pair.a_ns, B_IP, count=20)
    assert (s.sent, s.received, s.loss) == (20, 20, 0.0)
    assert len(s.samples_ms) == 20
    assert 0 < s.min <= s.p50 <= s.p90 <= s.p99 <= s.max
    assert s.p50 < 5, f"a veth round trip should take microseconds, p50 {s.p50} ms"


def test_ping_large_payload(pair):
    s = measure.ping(pair.b_ns, A_IP, count=5, size=1400)
    assert s.received == 5


def test_ping_unanswered_is_full_loss(pair):
    # the /30 holds only .1 and .2: .2 is answered, a route-less address is not reachable
    proc.run(["ip", "-n", pair.a, "route", "add", "10.123.1.0/24", "dev", "eth0"])
    s = measure.ping(pair.a_ns, "10.123.1.9", count=3, interval_s=0.05)
    assert (s.sent, s.received, s.loss) == (3, 0, 1.0)


def test_iperf3_between_namespaces(pair):
    r = measure.iperf3(pair.a_ns, pair.b_ns, B_IP, duration_s=1)
    assert r.gbit_s > 0.1, r
    assert r.bytes > 0 and r.retransmits >= 0
    assert 0.5 < r.duration_s < 3, r
    assert r.mss is not None and 1000 < r.mss <= 1460, r
    # receiver-side rate agrees with the bytes and seconds it came from
    assert r.gbit_s == pytest.approx(r.bytes * 8 / r.duration_s / 1e9, rel=0.01)
    assert not iperf3_in(pair) and not iperf3_children()


def test_iperf3_server_address_not_in_its_namespace(pair):
    """The server cannot bind the client's address: a clear error, nothing left running."""
    with pytest.raises(measure.MeasureError, match="exited"):
        measure.iperf3(pair.a_ns, pair.b_ns, A_IP, duration_s=1, port=5299)
    assert not iperf3_in(pair) and not iperf3_children()


def test_iperf3_client_fails_and_the_server_is_stopped(pair):
    """The server listens, the client cannot reach it: the server we started is ended."""
    proc.run(["ip", "-n", pair.a, "route", "add", "unreachable", f"{B_IP}/32"])
    with pytest.raises(measure.MeasureError, match="unable to connect"):
        measure.iperf3(pair.a_ns, pair.b_ns, B_IP, duration_s=1, port=5298, timeout_s=20)
    assert not iperf3_in(pair) and not iperf3_children()


def test_iperf3_twice_on_one_port(pair):
    """The one-off server is gone after each test, so the port is free again."""
    for _ in range(2):
        assert measure.iperf3(pair.b_ns, pair.a_ns, A_IP, duration_s=1, omit_s=0).bytes > 0
    assert not iperf3_in(pair)


def test_iperf3_pinned_to_one_cpu_and_own_threads_restored(pair):
    before = os.sched_getaffinity(0)
    where = measure.placement("same", min(before), sorted(before))
    r = measure.iperf3(pair.a_ns, pair.b_ns, B_IP, duration_s=1, placement=where)
    assert r.gbit_s > 0.1, r
    assert os.sched_getaffinity(0) == before
    assert not iperf3_in(pair) and not iperf3_children()


def test_kernel_drop_reasons_are_counted_per_namespace(pair):
    from k8snetlab import drops, framework
    from k8snetlab.errors import CommandError
    try:
        counter = drops.DropCounter().start()
    except (drops.DropsUnavailable, CommandError) as e:
        pytest.skip(f"kernel drop reasons cannot be counted here: {e}")
    try:
        b_ino, a_ino = drops.netns_inode(pair.b_ns), drops.netns_inode(pair.a_ns)
        counter.watch({a_ino, b_ino})
        before = counter.snapshot()
        # 20 datagrams to a port nobody listens on in b: the kernel drops each with NO_SOCKET there
        send = ("import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                f"for _ in range(20): s.sendto(b'x', ('{B_IP}', 9))\n")
        proc.run(["python3", "-c", send], netns=pair.a_ns)
        got = drops.delta(before, counter.snapshot(), counter.names, {a_ino, b_ino})
        assert got[(b_ino, "NO_SOCKET")] >= 20, got
        # and the TCP measurement reports them as golden-signal metrics (its counters read
        # /proc/PID/net of a process in each namespace, as of a node's or pod's)
        import subprocess
        holders = [subprocess.Popen(["ip", "netns", "exec", n, "sleep", "30"]) for n in (pair.a, pair.b)]
        try:
            metrics, _ = framework.tcp_signals(*(f"/proc/{h.pid}/ns/net" for h in holders), B_IP, 1, omit_s=0,
                                               drops=counter)
        finally:
            for h in holders:
                h.kill()
                h.wait()
        names = {m for m, _, _ in metrics}
        assert {"kernel_drops", "kernel_drops_noise"} <= names
        assert all(ns in (a_ino, b_ino) for ns, _ in counter.last)
    finally:
        counter.stop()
    assert not [p for p in os.listdir(drops.BPFFS) if p.startswith(f"k8snetlab-drops-{os.getpid()}")]
