"""Parsing and statistics of the traffic runners (no root, no network).

The fixtures are real outputs of iputils ping 20221126 and iperf 3.12 between two network
namespaces joined by a veth pair, trimmed only where noted.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from k8snetlab import measure
from k8snetlab.errors import CommandError, K8sNetLabError
from k8snetlab.measure import MeasureError, RttStats, TcpResult, parse_iperf3, parse_ping

# ------------------------------------------------------------------------ ping fixtures

# the first reply includes ARP resolution
PING_OK = """\
PING 10.123.0.2 (10.123.0.2) 56(84) bytes of data.
64 bytes from 10.123.0.2: icmp_seq=1 ttl=64 time=1.14 ms
64 bytes from 10.123.0.2: icmp_seq=2 ttl=64 time=0.011 ms
64 bytes from 10.123.0.2: icmp_seq=3 ttl=64 time=0.009 ms
64 bytes from 10.123.0.2: icmp_seq=4 ttl=64 time=0.011 ms
64 bytes from 10.123.0.2: icmp_seq=5 ttl=64 time=0.005 ms

--- 10.123.0.2 ping statistics ---
5 packets transmitted, 5 received, 0% packet loss, time 55ms
rtt min/avg/max/mdev = 0.005/0.234/1.138/0.451 ms
"""

# every third echo request dropped by an iptables rule in the receiver's namespace
PING_LOSS = """\
PING 10.123.0.2 (10.123.0.2) 56(84) bytes of data.
64 bytes from 10.123.0.2: icmp_seq=2 ttl=64 time=0.109 ms
64 bytes from 10.123.0.2: icmp_seq=3 ttl=64 time=0.052 ms
64 bytes from 10.123.0.2: icmp_seq=5 ttl=64 time=0.058 ms
64 bytes from 10.123.0.2: icmp_seq=6 ttl=64 time=0.064 ms
64 bytes from 10.123.0.2: icmp_seq=8 ttl=64 time=0.067 ms
64 bytes from 10.123.0.2: icmp_seq=9 ttl=64 time=0.062 ms

--- 10.123.0.2 ping statistics ---
10 packets transmitted, 6 received, 40% packet loss, time 142ms
rtt min/avg/max/mdev = 0.052/0.068/0.109/0.018 ms
"""

# no neighbour answers ARP: ping exits 1
PING_ALL_LOST = """\
PING 10.124.0.9 (10.124.0.9) 56(84) bytes of data.
From 10.124.0.1 icmp_seq=1 Destination Host Unreachable
From 10.124.0.1 icmp_seq=2 Destination Host Unreachable
From 10.124.0.1 icmp_seq=3 Destination Host Unreachable

--- 10.124.0.9 ping statistics ---
3 packets transmitted, 0 received, +3 errors, 100% packet loss, time 407ms
pipe 3
"""

PING_DUP = """\
PING 10.123.0.2 (10.123.0.2) 56(84) bytes of data.
64 bytes from 10.123.0.2: icmp_seq=1 ttl=64 time=0.045 ms
64 bytes from 10.123.0.2: icmp_seq=1 ttl=64 time=0.061 ms (DUP!)
64 bytes from 10.123.0.2: icmp_seq=2 ttl=64 time=0.039 ms

--- 10.123.0.2 ping statistics ---
2 packets transmitted, 2 received, +1 duplicates, 0% packet loss, time 11ms
rtt min/avg/max/mdev = 0.039/0.048/0.061/0.009 ms
"""

# payload too small for a timestamp (ping -s 8): replies carry no time
PING_NO_TIME = """\
PING 10.123.0.2 (10.123.0.2) 8(36) bytes of data.
16 bytes from 10.123.0.2: icmp_seq=1 ttl=64
16 bytes from 10.123.0.2: icmp_seq=2 ttl=64

--- 10.123.0.2 ping statistics ---
2 packets transmitted, 2 received, 0% packet loss, time 14ms
"""

# slow paths: iputils prints fewer decimals as the time grows
PING_SLOW = """\
PING 10.0.0.2 (10.0.0.2) 56(84) bytes of data.
64 bytes from 10.0.0.2: icmp_seq=1 ttl=63 time=152 ms
64 bytes from 10.0.0.2: icmp_seq=2 ttl=63 time=12.3 ms
64 bytes from 10.0.0.2: icmp_seq=3 ttl=63 time=1.52 ms

--- 10.0.0.2 ping statistics ---
3 packets transmitted, 3 received, 0% packet loss, time 2003ms
rtt min/avg/max/mdev = 1.518/55.273/152.001/68.540 ms
"""


def test_parse_ping_samples_and_counts():
    s = parse_ping(PING_OK)
    assert s.samples_ms == [1.14, 0.011, 0.009, 0.011, 0.005]
    assert (s.sent, s.received, s.loss) == (5, 5, 0.0)
    assert s.min == 0.005 and s.max == 1.14
    assert s.mean == pytest.approx(0.2352)
    assert s.p50 == 0.011


def test_parse_ping_with_loss():
    s = parse_ping(PING_LOSS)
    assert (s.sent, s.received) == (10, 6)
    assert s.loss == pytest.approx(0.4)
    assert len(s.samples_ms) == 6 and s.min == 0.052 and s.max == 0.109


def test_parse_ping_all_lost_is_a_result_without_samples():
    s = parse_ping(PING_ALL_LOST)
    assert (s.sent, s.received, s.loss, s.samples_ms) == (3, 0, 1.0, [])
    with pytest.raises(MeasureError, match="no RTT samples"):
        s.p50
    with pytest.raises(MeasureError):
        s.mean


def test_parse_ping_skips_duplicates():
    s = parse_ping(PING_DUP)
    assert s.samples_ms == [0.045, 0.039]
    assert s.loss == 0.0


def test_parse_ping_reads_coarse_times():
    assert parse_ping(PING_SLOW).samples_ms == [152.0, 12.3, 1.52]


@pytest.mark.parametrize("text, match", [
    ("", "no 'packets transmitted'"),
    ("ping: connect: Network is unreachable\n", "no 'packets transmitted'"),
    (PING_NO_TIME, "without a round-trip time"),
    # a reply line lost (output cut): the summary and the samples disagree
    (PING_OK.replace("64 bytes from 10.123.0.2: icmp_seq=3 ttl=64 time=0.009 ms\n", ""), "inconsistent"),
    # the statistics block is missing (ping killed)
    (PING_OK.split("\n---")[0], "no 'packets transmitted'"),
])
def test_parse_ping_refuses_what_it_cannot_read(text, match):
    with pytest.raises(MeasureError, match=match):
        parse_ping(text)


def test_measure_error_is_a_testbed_error():
    assert issubclass(MeasureError, K8sNetLabError)


# ------------------------------------------------------------------------ percentiles

def test_percentile_linear_interpolation():
    s = RttStats(samples_ms=[4.0, 1.0, 3.0, 2.0], sent=4, received=4)   # order does not matter
    # rank = (n - 1) * p / 100 on the sorted samples 1, 2, 3, 4
    assert s.percentile(0) == 1.0
    assert s.percentile(100) == 4.0
    assert s.percentile(50) == pytest.approx(2.5)
    assert s.percentile(90) == pytest.approx(3.7)
    assert s.percentile(25) == pytest.approx(1.75)
    assert s.p99 == pytest.approx(3.97)


def test_percentile_agrees_with_the_median_and_one_sample():
    import statistics
    xs = [0.031, 0.012, 0.044, 0.019, 0.027, 0.052, 0.008]
    assert RttStats(xs, 7, 7).p50 == statistics.median(xs)
    one = RttStats([0.02], 1, 1)
    assert one.p50 == one.p90 == one.p99 == one.min == one.max == 0.02


def test_percentile_is_monotonic():
    s = parse_ping(PING_OK)
    ps = [s.percentile(p) for p in range(0, 101)]
    assert ps == sorted(ps)
    assert s.min <= s.p50 <= s.p90 <= s.p99 <= s.max


@pytest.mark.parametrize("p", [-1, 100.5])
def test_percentile_range(p):
    with pytest.raises(ValueError):
        RttStats([1.0], 1, 1).percentile(p)


def test_loss_undefined_without_packets():
    with pytest.raises(MeasureError):
        RttStats([], 0, 0).loss


# ------------------------------------------------------------------------ iperf3 fixtures

# iperf3 -c 10.123.0.2 -p 5301 -t 1 -O 1 --json, complete and untouched
IPERF3_OK = r"""{
	"start":	{
		"connected":	[{
				"socket":	5,
				"local_host":	"10.123.0.1",
				"local_port":	41720,
				"remote_host":	"10.123.0.2",
				"remote_port":	5301
			}],
		"version":	"iperf 3.12",
		"system_info":	"Linux vm 6.18.44-fc-v669 #1 SMP PREEMPT_DYNAMIC @0 x86_64",
		"timestamp":	{
			"time":	"Sat, 21 Nov 2026 22:05:34 GMT",
			"timesecs":	1795298734
		},
		"connecting_to":	{
			"host":	"10.123.0.2",
			"port":	5301
		},
		"cookie":	"crurqbijg63tq6n45rkcdaw2tml7kd7kzut6",
		"tcp_mss_default":	1448,
		"target_bitrate":	0,
		"sock_bufsize":	0,
		"sndbuf_actual":	16384,
		"rcvbuf_actual":	131072,
		"test_start":	{
			"protocol":	"TCP",
			"num_streams":	1,
			"blksize":	131072,
			"omit":	1,
			"duration":	1,
			"bytes":	0,
			"blocks":	0,
			"reverse":	0,
			"tos":	0,
			"target_bitrate":	0
		}
	},
	"intervals":	[{
			"streams":	[{
					"socket":	5,
					"start":	0,
					"end":	1.000123,
					"seconds":	1.0001230239868164,
					"bytes":	2247360512,
					"bits_per_second":	17976672534.075165,
					"retransmits":	4725,
					"snd_cwnd":	654496,
					"snd_wnd":	12923904,
					"rtt":	32,
					"rttvar":	15,
					"pmtu":	1500,
					"omitted":	true,
					"sender":	true
				}],
			"sum":	{
				"start":	0,
				"end":	1.000123,
				"seconds":	1.0001230239868164,
				"bytes":	2247360512,
				"bits_per_second":	17976672534.075165,
				"retransmits":	4725,
				"omitted":	true,
				"sender":	true
			}
		}, {
			"streams":	[{
					"socket":	5,
					"start":	5.3e-05,
					"end":	1.000151,
					"seconds":	1.0002039670944214,
					"bytes":	2140405760,
					"bits_per_second":	17119754213.475868,
					"retransmits":	3627,
					"snd_cwnd":	457568,
					"snd_wnd":	14073856,
					"rtt":	162,
					"rttvar":	247,
					"pmtu":	1500,
					"omitted":	false,
					"sender":	true
				}],
			"sum":	{
				"start":	5.3e-05,
				"end":	1.000151,
				"seconds":	1.0002039670944214,
				"bytes":	2140405760,
				"bits_per_second":	17119754213.475868,
				"retransmits":	3627,
				"omitted":	false,
				"sender":	true
			}
		}],
	"end":	{
		"streams":	[{
				"sender":	{
					"socket":	5,
					"start":	0,
					"end":	1.000151,
					"seconds":	1.000151,
					"bytes":	2140405760,
					"bits_per_second":	17120660860.210108,
					"retransmits":	3627,
					"max_snd_cwnd":	654496,
					"max_snd_wnd":	14073856,
					"max_rtt":	162,
					"min_rtt":	32,
					"mean_rtt":	97,
					"sender":	true
				},
				"receiver":	{
					"socket":	5,
					"start":	0,
					"end":	1.000264,
					"seconds":	1.000151,
					"bytes":	2139154184,
					"bits_per_second":	17108716770.772516,
					"sender":	true
				}
			}],
		"sum_sent":	{
			"start":	0,
			"end":	1.000151,
			"seconds":	1.000151,
			"bytes":	2140405760,
			"bits_per_second":	17120660860.210108,
			"retransmits":	3627,
			"sender":	true
		},
		"sum_received":	{
			"start":	0,
			"end":	1.000264,
			"seconds":	1.000264,
			"bytes":	2139154184,
			"bits_per_second":	17108716770.772516,
			"sender":	true
		},
		"cpu_utilization_percent":	{
			"host_total":	86.778684834223867,
			"host_user":	0.945521813411099,
			"host_system":	85.833163020812776,
			"remote_total":	37.395506204389413,
			"remote_user":	1.9301045112924786,
			"remote_system":	35.465401693096936
		},
		"sender_tcp_congestion":	"bbr",
		"receiver_tcp_congestion":	"bbr"
	}
}"""

# iperf 3.12 when nothing listens (it exits 0 here, so the JSON is what tells)
IPERF3_REFUSED = """{
\t"start":\t{
\t\t"connected":\t[],
\t\t"version":\t"iperf 3.12",
\t\t"system_info":\t"Linux vm 6.18.44-fc-v669 #1 SMP PREEMPT_DYNAMIC @0 x86_64"
\t},
\t"intervals":\t[],
\t"end":\t{
\t},
\t"error":\t"unable to connect to server: Connection refused"
}
"""


def test_parse_iperf3_receiver_side():
    r = parse_iperf3(IPERF3_OK)
    assert isinstance(r, TcpResult)
    assert r.gbit_s == pytest.approx(17.108716770772516)   # sum_received, not sum_sent (17.12)
    assert r.bytes == 2139154184
    assert r.duration_s == pytest.approx(1.000264)
    assert r.retransmits == 3627                            # sum_sent
    assert r.mss == 1448


def test_parse_iperf3_error_json():
    with pytest.raises(MeasureError, match="unable to connect to server: Connection refused"):
        parse_iperf3(IPERF3_REFUSED)


def test_parse_iperf3_error_after_partial_results():
    doc = json.loads(IPERF3_OK)
    doc["error"] = "control socket has closed unexpectedly"
    with pytest.raises(MeasureError, match="control socket"):
        parse_iperf3(json.dumps(doc))


def test_parse_iperf3_explicit_mss_wins():
    doc = json.loads(IPERF3_OK)
    doc["start"]["tcp_mss"] = 1200
    assert parse_iperf3(json.dumps(doc)).mss == 1200
    del doc["start"]["tcp_mss"], doc["start"]["tcp_mss_default"]
    assert parse_iperf3(json.dumps(doc)).mss is None


@pytest.mark.parametrize("mutate, match", [
    (lambda d: d["end"].pop("sum_received"), "end.sum_received.bits_per_second"),
    (lambda d: d["end"]["sum_sent"].pop("retransmits"), "end.sum_sent.retransmits"),
    (lambda d: d["end"]["sum_received"].update(bytes="many"), "not a number"),
    (lambda d: d.pop("end"), "end.sum_received"),
])
def test_parse_iperf3_missing_fields(mutate, match):
    doc = json.loads(IPERF3_OK)
    mutate(doc)
    with pytest.raises(MeasureError, match=match):
        parse_iperf3(json.dumps(doc))


def test_parse_iperf3_udp_output_is_not_tcp():
    udp = {"start": {}, "intervals": [], "end": {"sum": {"bits_per_second": 1e6, "lost_percent": 0}}}
    with pytest.raises(MeasureError, match="TCP client"):
        parse_iperf3(json.dumps(udp))


@pytest.mark.parametrize("text", ["", "iperf3: error - unable to connect to server\n", "[1, 2]"])
def test_parse_iperf3_not_json(text):
    with pytest.raises(MeasureError):
        parse_iperf3(text)


# ------------------------------------------------------------------------ runners, stubbed

@pytest.fixture
def fake_root(monkeypatch):
    """Let the runners pass their root and tool checks; the namespace path exists."""
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(measure.proc, "require", lambda *tools: {t: t for t in tools})
    return "/proc/self/ns/net"


def _stub_run(monkeypatch, returncode, stdout, stderr=""):
    calls = []

    def run(args, **kw):
        calls.append((list(args), kw))
        return subprocess.CompletedProcess(args, returncode, stdout, stderr)
    monkeypatch.setattr(measure.proc, "run", run)
    return calls


def test_ping_command_and_namespace(monkeypatch, fake_root):
    calls = _stub_run(monkeypatch, 0, PING_LOSS)
    s = measure.ping(fake_root, "10.123.0.2", count=10, interval_s=0.01, size=1400)
    assert s.loss == pytest.approx(0.4)
    args, kw = calls[0]
    assert args[0] == "ping" and args[-1] == "10.123.0.2"
    assert args[args.index("-c") + 1] == "10" and args[args.index("-i") + 1] == "0.01"
    assert args[args.index("-s") + 1] == "1400"
    assert kw["netns"] == fake_root and kw["timeout"] > 0.1
    assert kw["env"]["LC_ALL"] == "C"


def test_ping_no_reply_at_all_is_a_measurement(monkeypatch, fake_root):
    _stub_run(monkeypatch, 1, PING_ALL_LOST)
    assert measure.ping(fake_root, "10.124.0.9", count=3).loss == 1.0


def test_ping_that_cannot_run_raises_with_the_command(monkeypatch, fake_root):
    _stub_run(monkeypatch, 2, "", "ping: connect: Network is unreachable\n")
    with pytest.raises(CommandError, match="Network is unreachable"):
        measure.ping(fake_root, "10.9.9.9")


@pytest.mark.parametrize("kw", [dict(count=0), dict(interval_s=0), dict(size=8)])
def test_ping_rejects_bad_arguments(fake_root, kw):
    with pytest.raises(ValueError):
        measure.ping(fake_root, "10.123.0.2", **kw)


def test_ping_missing_namespace(fake_root):
    with pytest.raises(MeasureError, match="does not exist"):
        measure.ping("/run/netns/knltest-no-such-namespace", "10.123.0.2")


class FakeServer:
    """Stands in for the iperf3 server's Popen: never exits by itself."""

    def __init__(self, *args, **kw):
        self.args, self.pid, self.returncode = args[0], 999999, None
        self.terminated = self.killed = False
        FakeServer.last = self

    def poll(self):
        return self.returncode

    def wait(self, timeout=None):
        if self.returncode is None and timeout is not None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def terminate(self):
        self.terminated, self.returncode = True, -15

    def send_signal(self, sig):
        self.terminated, self.returncode = True, -sig

    def kill(self):
        self.killed, self.returncode = True, -9


@pytest.fixture
def fake_server(monkeypatch, fake_root):
    monkeypatch.setattr(measure.subprocess, "Popen", FakeServer)
    monkeypatch.setattr(measure.proc, "listening", lambda pid, port, own=False: True)
    return fake_root


def test_iperf3_stops_the_server_when_the_client_fails(monkeypatch, fake_server):
    def boom(args, **kw):
        raise CommandError(list(args), -1, "", "timed out after 9 s")
    monkeypatch.setattr(measure.proc, "run", boom)
    with pytest.raises(CommandError):
        measure.iperf3(fake_server, fake_server, "10.123.0.2", duration_s=1)
    assert FakeServer.last.terminated


def test_iperf3_error_json_names_the_path_and_stops_the_server(monkeypatch, fake_server):
    calls = _stub_run(monkeypatch, 0, IPERF3_REFUSED)
    with pytest.raises(MeasureError, match=r"10\.123\.0\.2:5202: iperf3: unable to connect"):
        measure.iperf3(fake_server, fake_server, "10.123.0.2", duration_s=1, port=5202)
    assert FakeServer.last.terminated
    args = calls[0][0]
    assert "--json" in args and args[args.index("-p") + 1] == "5202"


def test_iperf3_whole_seconds_and_server_command(monkeypatch, fake_server):
    calls = _stub_run(monkeypatch, 0, IPERF3_OK)
    r = measure.iperf3(fake_server, fake_server, "10.123.0.2", duration_s=1.5, omit_s=0.5)
    assert r.gbit_s == pytest.approx(17.1087, rel=1e-4)
    args = calls[0][0]
    assert args[args.index("-t") + 1] == "2" and args[args.index("-O") + 1] == "1"
    server = FakeServer.last.args
    assert server[:3] == ["iperf3", "-s", "-1"] and "10.123.0.2" in server
    assert FakeServer.last.returncode is not None          # waited for, then ended


def test_iperf3_server_that_dies_is_reported(monkeypatch, fake_root):
    class Dead(FakeServer):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.returncode = 1
            kw["stdout"].write(b"iperf3: error - unable to start listener for connections: "
                               b"Address already in use\n")
    monkeypatch.setattr(measure.subprocess, "Popen", Dead)
    with pytest.raises(MeasureError, match="Address already in use"):
        measure.iperf3(fake_root, fake_root, "10.123.0.2", duration_s=1)


# ------------------------------------------------------------------------ CPU placement

def test_placement_modes():
    assert measure.placement("none") == measure.NO_PLACEMENT
    same = measure.placement("same", 1, [0, 1])
    assert (same.client, same.server, same.others) == (1, 1, frozenset({0}))
    split = measure.placement("split", 0, [0, 1])
    assert (split.client, split.server, split.others) == (0, 1, frozenset())
    # one CPU: split cannot split, and nothing can move away
    one = measure.placement("split", 0, [0])
    assert (one.mode, one.client, one.server, one.others) == ("same", 0, 0, frozenset())
    assert "CPU 1" in same.describe() and "own threads on CPU 0" in same.describe()
    with pytest.raises(ValueError, match="--pin fast"):
        measure.placement("fast")
    with pytest.raises(ValueError, match="CPU 7 is not one"):
        measure.placement("same", 7, [0, 1])


def test_iperf3_pins_client_and_server_and_moves_its_own_threads(monkeypatch, fake_server):
    calls = _stub_run(monkeypatch, 0, IPERF3_OK)
    moved = []
    real = measure._Confined

    class Spy(real):
        def __enter__(self):
            moved.append(set(self.cpus))
            return self
    monkeypatch.setattr(measure, "_Confined", Spy)
    where = measure.placement("same", 1, [0, 1])
    measure.iperf3(fake_server, fake_server, "10.123.0.2", duration_s=1, placement=where)
    assert calls[0][1]["cpus"] == {1}
    assert moved == [{0}]
    # the default placement (set once per run by the experiments' --pin) applies when none is given
    monkeypatch.setattr(measure, "_placement", measure.placement("split", 0, [0, 1]))
    measure.iperf3(fake_server, fake_server, "10.123.0.2", duration_s=1)
    assert calls[1][1]["cpus"] == {0} and moved[-1] == set()


def test_confined_restores_every_threads_mask():
    before = os.sched_getaffinity(0)
    cpus = sorted(before)
    with measure._Confined(frozenset(cpus[-1:])):
        assert os.sched_getaffinity(0) == {cpus[-1]}
    assert os.sched_getaffinity(0) == before


def test_a_thread_started_while_confined_gets_the_wide_mask_back():
    import threading
    before = os.sched_getaffinity(0)
    if len(before) < 2:
        pytest.skip("one CPU: nothing to confine to")
    cpus = sorted(before)
    started, stop = threading.Event(), threading.Event()
    tid = []

    def worker():
        tid.append(threading.get_native_id())
        started.set()
        stop.wait(5)
    with measure._Confined(frozenset(cpus[-1:])):
        t = threading.Thread(target=worker)
        t.start()
        started.wait(5)
        assert os.sched_getaffinity(tid[0]) == {cpus[-1]}
    try:
        assert os.sched_getaffinity(tid[0]) == before
    finally:
        stop.set()
        t.join()
