"""Faults of the BGP control plane, as an operator meets them: a speaker that dies, hangs or is
stopped. Its pod CIDR disappears from every other node within the hold time, comes back when
the speaker does, and traffic between pods of the other nodes never notices (a continuous ping,
no packet lost). One cluster: node1 and node2 run BIRD, node3 ExaBGP; hold time 3 s."""

from __future__ import annotations

import re
import signal
import time

import pytest
from helpers import THREE_NODES
from bgp_helpers import assert_gone, require_bgp, started
from helpers import wait_for

from k8snetlab import spec
from k8snetlab.bgp import fib

pytestmark = pytest.mark.integration

HOLD = 3
SLACK = 1.0      # a second of scheduling slack on a shared 2-core machine


@pytest.fixture(scope="module")
def cluster():
    require_bgp()
    s = spec.with_cni(spec.load(THREE_NODES), "bgp", bgp={"holdTime": HOLD, "speakers": {"node3": "exabgp"}},
                                        invoke="inprocess")
    c, record = started(s)
    yield c
    c.stop()
    assert_gone(record)


def pod_on(c, node: str):
    return sorted((p for p in c.pods.values() if p.node_name == node), key=lambda p: p.name)[0]


class Ping:
    """A continuous ping (every 50 ms, bounded by a deadline) whose loss is read at the end."""

    def __init__(self, src, dst, tmp_path, deadline_s: int = 60):
        self.log = tmp_path / f"ping-{src.name}-{dst.name}.txt"
        self.p = src.popen_ns(["ping", "-n", "-i", "0.05", "-w", str(deadline_s), dst.ip], log_path=self.log)
        time.sleep(0.3)

    def stop(self) -> tuple[int, int]:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGINT)     # ping prints its statistics and exits
        self.p.wait(10)
        text = self.log.read_text()
        m = re.search(r"(\d+) packets transmitted, (\d+) received", text)
        assert m, text
        return int(m.group(1)), int(m.group(2))


def has(c, node: str, cidr: str) -> bool:
    return cidr in fib.prefixes(c.nodes[node].pid)


def test_killed_speaker_is_withdrawn_and_restored_without_disturbing_others(cluster, tmp_path):
    c = cluster
    victim, others = "node2", ["node1", "node3"]
    cidr = str(c.nodes[victim].spec.pod_cidr)
    assert all(has(c, n, cidr) for n in others)
    ping = Ping(pod_on(c, "node1"), pod_on(c, "node3"), tmp_path)
    try:
        c.mode.stop_speaker(victim, graceful=False)              # a crash: SIGKILL
        assert wait_for(lambda: not any(has(c, n, cidr) for n in others), HOLD + SLACK), \
            f"{cidr} still routed after the hold time"
        c.mode.start_speaker(victim)
        assert wait_for(lambda: all(has(c, n, cidr) for n in others), 15)
        time.sleep(0.3)
    finally:
        sent, received = ping.stop()
    assert sent > 10 and received == sent, f"node1 -> node3 pods lost {sent - received} of {sent} pings"
    assert pod_on(c, "node1").run(["ping", "-c", "1", "-W", "2", pod_on(c, victim).ip], check=False).returncode == 0


def test_hung_speaker_is_withdrawn_when_the_hold_timer_expires(cluster, tmp_path):
    """SIGSTOP: the TCP sessions stay open, only the missing keepalives tell the peers."""
    c = cluster
    victim, others = "node1", ["node2", "node3"]
    cidr = str(c.nodes[victim].spec.pod_cidr)
    drv = c.mode.speaker(victim)
    ping = Ping(pod_on(c, "node2"), pod_on(c, "node3"), tmp_path)
    try:
        drv.pause()
        assert wait_for(lambda: not any(has(c, n, cidr) for n in others), HOLD + SLACK), \
            f"{cidr} still routed {HOLD + SLACK} s after the speaker hung (hold time {HOLD} s)"
    finally:
        drv.resume()
    try:
        assert wait_for(lambda: all(has(c, n, cidr) for n in others), 20)
    finally:
        sent, received = ping.stop()
    assert sent > 10 and received == sent, f"node2 -> node3 pods lost {sent - received} of {sent} pings"


def test_stopped_exabgp_speaker_is_withdrawn_and_cleans_its_own_fib(cluster, tmp_path):
    c = cluster
    victim, others = "node3", ["node1", "node2"]
    cidr = str(c.nodes[victim].spec.pod_cidr)
    assert wait_for(lambda: all(has(c, n, cidr) for n in others), 15)
    ping = Ping(pod_on(c, "node1"), pod_on(c, "node2"), tmp_path)
    try:
        c.mode.stop_speaker(victim)                               # graceful: BGP Cease to the peers
        assert wait_for(lambda: not any(has(c, n, cidr) for n in others), HOLD + SLACK)
        # the installer took back what it had installed on node3 (no stale routes, no blackhole)
        assert "proto bgp" not in c.nodes[victim].run(["ip", "-o", "route"]).stdout
        assert not c.mode.status([victim])[victim].running
        c.mode.start_speaker(victim)
        assert wait_for(lambda: all(has(c, n, cidr) for n in others) and not c.mode.missing_routes(), 15)
    finally:
        sent, received = ping.stop()
    assert sent > 10 and received == sent, f"node1 -> node2 pods lost {sent - received} of {sent} pings"
    st = c.mode.status([victim])[victim]
    assert st.running and st.established() == 2
