"""Traffic runners: round-trip time with ping, TCP throughput with iperf3.

Both runners take network-namespace *paths* (``/proc/<pid>/ns/net``, ``/run/netns/<name>``)
and start the real tools inside them, so they work for a Mininet host, a pod sandbox or a
namespace made by hand alike. Parsing is separate from running and never invents a number:
output that cannot be read raises :class:`MeasureError` instead of becoming a measurement.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

from . import proc
from .errors import CommandError, K8sNetLabError, NotRoot

log = logging.getLogger(__name__)

# ping cannot time a reply whose payload has no room for its timestamp (struct timeval)
PING_MIN_SIZE = 16
PING_REPLY_WAIT_S = 1           # ping -W: how long to wait for the last replies
IPERF3_CONNECT_TIMEOUT_MS = 3000
SERVER_START_TIMEOUT_S = 5.0    # bound on waiting for the iperf3 server to listen
SERVER_EXIT_GRACE_S = 5.0       # a one-off server exits by itself after its test


class MeasureError(K8sNetLabError):
    """A measurement could not be taken, or its output could not be read."""


# ---------------------------------------------------------------- RTT (ping)

@dataclass
class RttStats:
    """Per-reply RTT samples in milliseconds and the packet counts ping reported.

    **RTT (ping, iputils).** One ICMP echo request every ``interval_s``; the RTT of a reply is
    the kernel's receive timestamp of the reply minus the time ping took just before sending
    the request, so it covers the sender's send path, both directions of the datapath and the
    receiver's echo handling in its kernel. iputils prints ``time=`` with three decimals below
    1 ms, i.e. a resolution of 1 microsecond (fewer decimals above 1 ms); on a veth pair RTTs
    are a few to a few tens of microseconds, close to that resolution and dominated by
    scheduling, so compare medians and percentiles over many samples, not single values.
    The first reply usually includes neighbour (ARP) resolution and is often 10-100x slower;
    it stays in the samples (it is real), so read p50 rather than max for the steady state.
    ``loss`` is ``1 - received / sent``; duplicated replies (``DUP!``) are neither counted nor
    sampled.
    """

    samples_ms: list[float]
    sent: int
    received: int

    @property
    def loss(self) -> float:
        """Fraction of echo requests without a reply (0.0 .. 1.0)."""
        if self.sent <= 0:
            raise MeasureError("no packets were sent: loss is undefined")
        return (self.sent - self.received) / self.sent

    def _sorted(self) -> list[float]:
        if not self.samples_ms:
            raise MeasureError(f"no RTT samples ({self.sent} sent, {self.received} received)")
        return sorted(self.samples_ms)

    @property
    def min(self) -> float:
        return self._sorted()[0]

    @property
    def max(self) -> float:
        return self._sorted()[-1]

    @property
    def mean(self) -> float:
        s = self._sorted()
        return math.fsum(s) / len(s)

    def percentile(self, p: float) -> float:
        """The p-th percentile (0..100) of the samples, linearly interpolated.

        The samples are sorted; percentile p sits at fractional rank ``(n - 1) * p / 100``
        and is interpolated between the two samples around it (the "linear" method of
        numpy, Hyndman and Fan type 7). p=0 is the minimum, p=100 the maximum, p=50 the
        median. Raises MeasureError when there are no samples.
        """
        if not 0 <= p <= 100:
            raise ValueError(f"percentile must be within 0..100, got {p}")
        s = self._sorted()
        rank = (len(s) - 1) * p / 100
        lo = math.floor(rank)
        hi = min(lo + 1, len(s) - 1)
        return s[lo] + (s[hi] - s[lo]) * (rank - lo)

    @property
    def p50(self) -> float:
        return self.percentile(50)

    @property
    def p90(self) -> float:
        return self.percentile(90)

    @property
    def p99(self) -> float:
        return self.percentile(99)


_REPLY_RE = re.compile(r"\bbytes from\b")
_TIME_RE = re.compile(r"\btime=(\d+(?:\.\d+)?) ?ms\b")
_SUMMARY_RE = re.compile(r"(\d+) packets transmitted, (\d+) (?:packets )?received")


def parse_ping(output: str) -> RttStats:
    """Read iputils ping output: one sample per ``time=... ms`` reply line, plus the
    ``N packets transmitted, M received`` summary.

    Duplicate replies are skipped. Raises MeasureError if the summary is missing, a reply
    has no time (payload under 16 bytes) or the reply lines disagree with the summary.
    """
    samples: list[float] = []
    summary = None
    for line in output.splitlines():
        if _REPLY_RE.search(line):
            if "DUP!" in line:
                continue
            m = _TIME_RE.search(line)
            if m is None:
                raise MeasureError(f"ping reply without a round-trip time: {line.strip()!r}")
            samples.append(float(m.group(1)))
            continue
        m = _SUMMARY_RE.search(line)
        if m:
            summary = int(m.group(1)), int(m.group(2))
    if summary is None:
        last = output.strip().splitlines()[-1:] or ["<empty>"]
        raise MeasureError("ping output has no 'packets transmitted' line "
                           f"(last line: {last[0]!r})")
    sent, received = summary
    if received > sent or len(samples) != received:
        raise MeasureError(f"ping output is inconsistent: {sent} transmitted, {received} received, "
                           f"but {len(samples)} timed replies")
    return RttStats(samples_ms=samples, sent=sent, received=received)


def ping(netns: str, dst: str, count: int = 50, interval_s: float = 0.01,
         timeout_s: float | None = None, size: int | None = None) -> RttStats:
    """Ping ``dst`` ``count`` times from the namespace ``netns``.

    ``size`` is the ICMP payload in bytes (ping -s; at least 16 so replies carry a
    timestamp). ``timeout_s`` bounds the whole run (default: the sending time plus 10 s).
    Partial or total loss is a result (see ``RttStats.loss``); a ping that cannot run at
    all (no route, unknown host) raises CommandError.
    """
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    if interval_s <= 0:
        raise ValueError(f"interval_s must be positive, got {interval_s}")
    if size is not None and size < PING_MIN_SIZE:
        raise ValueError(f"size must be at least {PING_MIN_SIZE} bytes so ping can time replies, "
                         f"got {size}")
    proc.require("ping")
    _check_netns(netns)
    if timeout_s is None:
        timeout_s = count * interval_s + PING_REPLY_WAIT_S + 10
    args = ["ping", "-n", "-c", str(count), "-i", f"{interval_s:g}", "-W", str(PING_REPLY_WAIT_S)]
    if size is not None:
        args += ["-s", str(size)]
    args.append(dst)
    where = f"netns {netns}"
    log.debug("ping %s from %s (%d x %g s)", dst, netns, count, interval_s)
    done = proc.run(args, netns=netns, timeout=timeout_s, env=_c_locale(), check=False, where=where)
    # iputils: 0 = some replies, 1 = no reply at all (still a measurement), 2 = error
    if done.returncode not in (0, 1):
        raise CommandError(args, done.returncode, done.stdout, done.stderr, where)
    try:
        stats = parse_ping(done.stdout)
    except MeasureError:
        if done.returncode != 0:
            raise CommandError(args, done.returncode, done.stdout, done.stderr, where) from None
        raise
    if stats.received < stats.sent:
        log.info("ping %s from %s: %d of %d replies", dst, netns, stats.received, stats.sent)
    return stats


# ---------------------------------------------------------------- CPU placement

PIN_MODES = ("same", "split", "none")


@dataclass(frozen=True)
class Placement:
    """Where an iperf3 test runs: the client's and the server's CPU (None: anywhere) and the
    CPUs the caller's own threads move to meanwhile (empty: they stay).

    **CPU placement.** On a machine with few CPUs the figure depends on where the scheduler puts
    the sender, the receiver and the veth softirq work (on 2 vCPUs the unpinned values are
    bimodal). A placement pins the iperf3 client and server (``same``: both on one CPU, the
    default of the experiments' ``--pin``; ``split``: one CPU each; ``none``) and, with
    ``same``, moves the calling process's own threads (the in-process runtime) to the other CPUs
    while the test runs. :func:`set_placement` sets the default every :func:`iperf3` call uses.
    """

    mode: str = "none"
    client: int | None = None
    server: int | None = None
    others: frozenset[int] = field(default_factory=frozenset)

    def describe(self) -> str:
        if self.mode == "none":
            return "none (iperf3 client and server wherever the scheduler puts them)"
        if self.mode == "split":
            return f"split (iperf3 client on CPU {self.client}, server on CPU {self.server})"
        moved = (f"; this run's own threads on CPU {','.join(map(str, sorted(self.others)))} "
                 "while iperf3 runs") if self.others else ""
        return f"same (iperf3 client and server on CPU {self.client}{moved})"


NO_PLACEMENT = Placement()
_placement = NO_PLACEMENT


def allowed_cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def placement(mode: str, cpu: int | None = None, cpus: list[int] | None = None) -> Placement:
    """The placement ``mode`` (same, split, none) on ``cpu`` (the client's CPU; default the
    first allowed one). ``cpus``: the CPUs to choose from (default: those this process may use).
    With one CPU, ``split`` becomes ``same``. Raises ValueError on a bad mode or CPU."""
    if mode not in PIN_MODES:
        raise ValueError(f"--pin {mode}: choose one of {', '.join(PIN_MODES)}")
    if mode == "none":
        return NO_PLACEMENT
    cpus = sorted(cpus if cpus is not None else allowed_cpus())
    if cpu is None:
        cpu = cpus[0]
    if cpu not in cpus:
        raise ValueError(f"CPU {cpu} is not one this process may run on ({','.join(map(str, cpus))})")
    rest = [c for c in cpus if c != cpu]
    if mode == "split" and rest:
        return Placement("split", cpu, rest[0])
    return Placement("same", cpu, cpu, frozenset(rest))


def set_placement(p: Placement) -> None:
    """The placement every later :func:`iperf3` call uses unless it is given one."""
    global _placement
    _placement = p


def current_placement() -> Placement:
    return _placement


def _own_threads() -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{os.getpid()}/task")]
    except OSError:
        return []


class _Confined:
    """Move this process's threads to ``cpus`` for a while; restore each one's mask after."""

    def __init__(self, cpus: frozenset[int]):
        self.cpus, self.saved = set(cpus), {}

    def __enter__(self) -> "_Confined":
        if self.cpus:
            for tid in _own_threads():
                try:
                    self.saved[tid] = os.sched_getaffinity(tid)
                    os.sched_setaffinity(tid, self.cpus)
                except OSError:          # the thread ended meanwhile
                    self.saved.pop(tid, None)
        return self

    def __exit__(self, *exc) -> None:
        for tid, mask in self.saved.items():
            try:
                os.sched_setaffinity(tid, mask)
            except OSError:
                continue
        if self.saved:
            # a thread started meanwhile inherited the narrow mask: give it its creator's back
            wide = max(self.saved.values(), key=len)
            for tid in set(_own_threads()) - set(self.saved):
                try:
                    if os.sched_getaffinity(tid) == self.cpus:
                        os.sched_setaffinity(tid, wide)
                except OSError:
                    continue
        self.saved.clear()


# ---------------------------------------------------------------- TCP (iperf3)

@dataclass
class TcpResult:
    """One iperf3 TCP test, as seen by the receiver (rate) and the sender (retransmits).

    **TCP throughput (iperf3).** One TCP stream from the client namespace to an ``iperf3 -s -1``
    server in the server namespace. ``gbit_s`` is the *receiver-side* rate: the bytes the
    server read divided by the server's measuring time (``end.sum_received``), after the
    ``-O`` warm-up seconds that iperf3 leaves out. ``retransmits`` is the sender's count from
    the kernel's TCP_INFO (Linux only). iperf3 3.12 accepts whole seconds only for ``-t`` and
    ``-O``; fractions are rounded up (the default ``omit_s=0.5`` becomes 1 s) and
    ``TcpResult.duration_s`` reports the time iperf3 actually measured. Both ends share the
    machine's CPUs: the absolute figure is bounded by CPU, not by a link, so compare modes
    with each other on one machine rather than with a NIC's line rate.
    """

    gbit_s: float
    retransmits: int
    duration_s: float
    bytes: int
    mss: int | None = None
    # CPU the two iperf3 processes used (user + system, % of one CPU over the test; iperf3's
    # own getrusage figures; softirq work is not in them)
    cpu_sender_pct: float | None = None
    cpu_receiver_pct: float | None = None


def _field(doc: dict, *path: str):
    node = doc
    for key in path:
        if not isinstance(node, dict) or key not in node:
            raise MeasureError(f"iperf3 JSON lacks {'.'.join(path)} "
                               "(is this the output of a TCP client run with --json?)")
        node = node[key]
    if isinstance(node, bool) or not isinstance(node, (int, float)):
        raise MeasureError(f"iperf3 JSON field {'.'.join(path)} is not a number: {node!r}")
    return node


def parse_iperf3(json_text: str) -> TcpResult:
    """Read the JSON of an iperf3 TCP client (``iperf3 -c ... --json``).

    Rate, bytes and seconds come from ``end.sum_received`` (the receiver), retransmits
    from ``end.sum_sent``, the MSS from ``start.tcp_mss`` or ``start.tcp_mss_default``.
    Raises MeasureError on iperf3's own ``{"error": ...}`` or on missing fields.
    """
    try:
        doc = json.loads(json_text)
    except ValueError:
        head = json_text.strip()[:80] or "<empty>"
        raise MeasureError(f"iperf3 output is not JSON: {head!r}") from None
    if not isinstance(doc, dict):
        raise MeasureError("iperf3 output is not a JSON object")
    if doc.get("error"):
        raise MeasureError(f"iperf3: {doc['error']}")
    bits = _field(doc, "end", "sum_received", "bits_per_second")
    nbytes = _field(doc, "end", "sum_received", "bytes")
    seconds = _field(doc, "end", "sum_received", "seconds")
    retransmits = _field(doc, "end", "sum_sent", "retransmits")
    start = doc.get("start") if isinstance(doc.get("start"), dict) else {}
    mss = start.get("tcp_mss") or start.get("tcp_mss_default")
    if isinstance(mss, bool) or not isinstance(mss, int):
        mss = None
    cpu = doc.get("end", {}).get("cpu_utilization_percent") or {}
    num = lambda v: float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None  # noqa: E731
    return TcpResult(gbit_s=bits / 1e9, retransmits=int(retransmits), duration_s=float(seconds),
                     bytes=int(nbytes), mss=mss, cpu_sender_pct=num(cpu.get("host_total")),
                     cpu_receiver_pct=num(cpu.get("remote_total")))


def iperf3(client_netns: str, server_netns: str, server_ip: str, duration_s: float = 5,
           port: int = 5201, omit_s: float = 0.5, timeout_s: float | None = None,
           connect_ip: str | None = None, bitrate: str | None = None,
           placement: Placement | None = None) -> TcpResult:
    """Measure one TCP stream from ``client_netns`` to ``server_ip`` in ``server_netns``.

    ``placement``: the CPUs of client and server (default: :func:`set_placement`'s).

    ``bitrate``: a fixed sending rate (iperf3 ``-b``, e.g. ``5G``) instead of as fast as
    possible, to compare CPU cost at equal throughput.
    ``connect_ip``: the address the client connects to when it is not ``server_ip`` itself,
    e.g. a Service's ClusterIP in front of the server pod (the server still binds ``server_ip``).

    Starts a one-off ``iperf3 -s -1`` in the server namespace, waits (bounded) until it
    listens, runs the client with ``--json``, and always stops the server it started,
    also on errors. ``timeout_s`` bounds the whole run (default: test time plus 20 s).
    """
    if duration_s <= 0 or omit_s < 0:
        raise ValueError(f"need duration_s > 0 and omit_s >= 0, got {duration_s} and {omit_s}")
    if not 0 < port < 65536:
        raise ValueError(f"port must be within 1..65535, got {port}")
    proc.require("iperf3")
    _check_netns(client_netns)
    _check_netns(server_netns)
    t, omit = max(1, math.ceil(duration_s)), math.ceil(omit_s)
    if (t, omit) != (duration_s, omit_s):
        log.debug("iperf3 takes whole seconds: -t %d -O %d (asked %g, %g)",
                  t, omit, duration_s, omit_s)
    if timeout_s is None:
        timeout_s = t + omit + 20
    deadline = time.monotonic() + timeout_s

    # -B: the server binds server_ip, so an address that is not in server_netns fails at once
    server_args = ["iperf3", "-s", "-1", "-B", server_ip, "-p", str(port),
                   # an orphaned server (our process killed) gives up on its own
                   "--idle-timeout", str(math.ceil(timeout_s))]
    where_ = placement if placement is not None else _placement

    def enter_server() -> None:
        proc.setns(server_netns)
        if where_.server is not None:
            os.sched_setaffinity(0, {where_.server})

    server_log = tempfile.TemporaryFile()     # read only to explain a server that died
    try:
        server = subprocess.Popen(server_args, stdin=subprocess.DEVNULL, stdout=server_log,
                                  stderr=subprocess.STDOUT, close_fds=True,
                                  preexec_fn=enter_server)
    except BaseException:
        server_log.close()
        raise
    log.debug("iperf3 server pid %d in %s, port %d", server.pid, server_netns, port)
    finished = False
    try:
        _wait_listening(server, server_log, server_netns, port,
                        min(deadline, time.monotonic() + SERVER_START_TIMEOUT_S))
        client_args = ["iperf3", "-c", connect_ip or server_ip, "-p", str(port), "-t", str(t), "-O", str(omit),
                       "--json", "--connect-timeout", str(IPERF3_CONNECT_TIMEOUT_MS)]
        if bitrate:
            client_args += ["-b", bitrate]
        where = f"netns {client_netns}"
        remaining = max(1.0, deadline - time.monotonic())
        with _Confined(where_.others):
            done = proc.run(client_args, netns=client_netns, timeout=remaining, check=False,
                            where=where, cpus={where_.client} if where_.client is not None else None)
        try:
            result = parse_iperf3(done.stdout)
        except MeasureError as e:
            if done.returncode != 0 and not done.stdout.lstrip().startswith("{"):
                raise CommandError(client_args, done.returncode, done.stdout, done.stderr,
                                   where) from None
            raise MeasureError(f"iperf3 from {client_netns} to {server_ip}:{port}: {e}") from None
        if done.returncode != 0:
            raise CommandError(client_args, done.returncode, done.stdout, done.stderr, where)
        finished = True
        return result
    finally:
        _stop(server, SERVER_EXIT_GRACE_S if finished else 0.0)
        server_log.close()


def _wait_listening(server: subprocess.Popen, server_log, netns: str, port: int,
                    until: float) -> None:
    """Return once the server itself has a listening socket on ``port``; raise if it exits
    (port in use, address not in the namespace) or the bound is reached."""
    while True:
        if server.poll() is not None:
            server_log.seek(0)
            said = server_log.read().decode(errors="replace").strip().splitlines()
            raise MeasureError(f"iperf3 server in {netns} exited ({server.returncode}) before "
                               f"listening on port {port}: {said[-1] if said else 'no output'}")
        if proc.listening(server.pid, port, own=True):   # not another program's on that port
            return
        if time.monotonic() >= until:
            raise MeasureError(f"iperf3 server in {netns} did not listen on port {port} "
                               f"within {SERVER_START_TIMEOUT_S:g} s")
        time.sleep(0.01)


def _stop(server: subprocess.Popen, grace: float) -> None:
    """End the server we started (our child, so its PID cannot have been reused)."""
    try:
        server.wait(timeout=grace)
        return
    except subprocess.TimeoutExpired:
        pass
    log.debug("stopping iperf3 server pid %d", server.pid)
    proc.end_child(server, grace=2)


# ---------------------------------------------------------------- helpers

def _check_netns(path: str) -> None:
    if os.geteuid() != 0:
        raise NotRoot("measuring inside a network namespace")
    if not os.path.exists(path):
        raise MeasureError(f"network namespace {path} does not exist (is the pod or host running?)")


def _c_locale() -> dict[str, str]:
    env = dict(os.environ)
    env["LC_ALL"] = "C"
    return env


# -- small probe programs run with ``python3 -c`` inside a pod ---------------------------------
ACCEPT_PORT = 7000

# the server pod's connection target: answer one byte, close
ACCEPT_SERVER = ("import socket\n"
                 "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
                 f"s.bind(('0.0.0.0', {ACCEPT_PORT})); s.listen(4096)\n"
                 "while True:\n"
                 "    c, _ = s.accept()\n"
                 "    try:\n"
                 "        c.sendall(b'x')\n"
                 "    except OSError:\n"
                 "        pass\n"
                 "    c.close()\n")

# argv: ip port n. n fresh connections: connect time of each (ns) as JSON, closed with a
# reset (no TIME_WAIT pile-up)
CONNECT_TIMES = ("import json, socket, struct, sys, time\n"
                 "ip, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])\n"
                 "out = []\n"
                 "for _ in range(n):\n"
                 "    s = socket.socket()\n"
                 "    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))\n"
                 "    s.settimeout(2)\n"
                 "    t0 = time.perf_counter_ns(); s.connect((ip, port)); out.append(time.perf_counter_ns() - t0)\n"
                 "    s.close()\n"
                 "print(json.dumps(out))\n")

# argv: ip port n. n sequential connections that each read the server's byte: prints
# "<bytes read> <seconds>", i.e. connections per second
CONN_RATE = ("import socket, sys, time\n"
             "ip, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])\n"
             "t0 = time.perf_counter(); ok = 0\n"
             "for _ in range(n):\n"
             "    s = socket.create_connection((ip, port), 2)\n"
             "    ok += len(s.recv(1))\n"
             "    s.close()\n"
             "print(ok, time.perf_counter() - t0)\n")
