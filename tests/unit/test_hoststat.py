"""What the machine and a namespace's counters say: parsing /proc, CPU per gigabit, busy
warnings, the metrics address (no root)."""

import pytest

from k8snetlab import hoststat, metrics
from k8snetlab.errors import SpecError

STAT = "cpu  100 0 50 800 10 0 20 30 0 0\ncpu0 50 0 25 400 5 0 10 15 0 0\n"
DEV = ("Inter-|   Receive                                                |  Transmit\n"
       " face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n"
       "    lo:     100       1    0    0    0     0          0         0      100       1    0    0    0     0       0          0\n"
       "  eth0: 1000000     800    0    3    0     0          0         0    50000     400    0    1    0     0       0          0\n")
SNMP = ("Ip: Forwarding DefaultTTL\nIp: 1 64\n"
        "Tcp: RtoAlgorithm RtoMin RetransSegs\nTcp: 1 200 17\n")


def test_proc_stat_in_seconds_and_busy_time():
    t = hoststat.parse_proc_stat(STAT, at=5.0)
    hz = hoststat.CLK_TCK
    assert t.busy == pytest.approx((100 + 50 + 20) / hz)
    assert t.total == pytest.approx((100 + 50 + 20 + 800 + 10 + 30) / hz)
    with pytest.raises(ValueError):
        hoststat.parse_proc_stat("cpu0 1 2 3\n")


def test_cpu_per_gbit_subtracts_the_quiet_baseline():
    d = hoststat.CpuDelta(busy_s=3.0, softirq_s=1.0, steal_s=0.1, total_s=10.0, wall_s=5.0)
    # 0.2 CPUs busy when quiet: 1 s of the 3 belong to others; 2 s over 4 Gbit
    assert hoststat.cpu_per_gbit(d, 0.2, 4.0) == pytest.approx(0.5)
    assert hoststat.cpu_per_gbit(d, 1.0, 4.0) == 0.0          # a busier baseline is noise: clamped
    assert hoststat.cpu_per_gbit(d, 0.0, 0.0) is None
    assert d.steal_fraction == pytest.approx(0.01)


def test_namespace_counters_parse():
    dev = hoststat.parse_net_dev(DEV)
    assert dev["eth0"] == hoststat.IfCounters(1000000, 800, 3, 50000, 400, 1)
    assert hoststat.parse_snmp(SNMP)["Tcp"]["RetransSegs"] == 17


def test_busy_warning():
    # the run's own load (load average 1.46 on a quiet machine) no longer warns: only what
    # other programs used in the quiet seconds does
    assert hoststat.busy_warning(0.1, 0.0, cpus=2) is None
    assert "other programs kept 1.50 of 2 CPUs busy" in hoststat.busy_warning(1.5, 0.0, cpus=2)
    assert "stolen" in hoststat.busy_warning(0.1, 0.2, cpus=2)


def test_per_cpu_busy_and_the_quietest_cpu(monkeypatch):
    text = ("cpu  300 0 100 1000 0 0 0 0\n"
            "cpu0 200 0 50 500 0 0 0 0\n"
            "cpu1 100 0 50 500 0 0 0 0\n")
    busy = hoststat.parse_per_cpu_busy(text)
    assert busy == {0: 250 / hoststat.CLK_TCK, 1: 150 / hoststat.CLK_TCK}
    reads = iter([text, text.replace("cpu0 200", "cpu0 260")])      # CPU 0 busier meanwhile
    monkeypatch.setattr(hoststat, "_read", lambda path: next(reads))
    monkeypatch.setattr(hoststat.time, "sleep", lambda s: None)
    assert hoststat.quietest_cpu([0, 1], seconds=1.0) == 1
    reads = iter([text, text])                                          # a tie: CPU 0
    monkeypatch.setattr(hoststat, "_read", lambda path: next(reads))
    assert hoststat.quietest_cpu([0, 1], seconds=1.0) == 0


def test_freezer_with_nothing_to_pause_is_harmless():
    f = hoststat.Freezer({"a": ["/nonexistent/ns"], "b": []})
    with f.only("b"):
        assert f.stopped == []


def test_metrics_listen_only_on_loopback():
    assert metrics.parse_listen("127.0.0.1:9100") == ("127.0.0.1", 9100)
    for bad in ("0.0.0.0:9100", "192.168.1.10:9100", "localhost", "127.0.0.1:0", "127.0.0.1:x"):
        with pytest.raises(SpecError):
            metrics.parse_listen(bad)
