"""Traffic runners: ping for round-trip time, iperf3 for TCP throughput.

They work on network-namespace paths (``/proc/PID/ns/net``), not on Mininet objects, so any
two namespaces can be measured. Every number comes from the tool's own output; output that
cannot be parsed raises :class:`MeasureError` and never becomes a measurement.

- RTT: iputils ``ping``, one sample per reply line (``time=0.045 ms``; microsecond
  resolution). Percentiles use linear interpolation between the closest ranks.
- TCP: ``iperf3 --json``; the rate is the *receiver's* (``end.sum_received``), so bytes lost
  in flight are not counted; retransmits are the sender's (``end.sum_sent.retransmits``).
  The first ``omit`` seconds (slow start) are left out.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import time
from dataclasses import dataclass

from . import proc
from .errors import K8sNetLabError


class MeasureError(K8sNetLabError):
    """A measurement tool failed or printed something we cannot read."""


@dataclass
class RttStats:
    samples_ms: list[float]
    sent: int
    received: int

    @property
    def loss(self) -> float:
        return 1 - self.received / self.sent if self.sent else 1.0

    def percentile(self, p: float) -> float:
        """The p-th percentile (0-100), linear interpolation between closest ranks."""
        if not self.samples_ms:
            raise MeasureError("no RTT samples: every ping was lost")
        xs = sorted(self.samples_ms)
        k = (len(xs) - 1) * p / 100
        lo, hi = math.floor(k), math.ceil(k)
        return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)

    @property
    def min(self) -> float:
        return self.percentile(0)

    @property
    def max(self) -> float:
        return self.percentile(100)

    @property
    def mean(self) -> float:
        return sum(self.samples_ms) / len(self.samples_ms) if self.samples_ms else math.nan

    @property
    def p50(self) -> float:
        return self.percentile(50)

    @property
    def p90(self) -> float:
        return self.percentile(90)

    @property
    def p99(self) -> float:
        return self.percentile(99)


_REPLY = re.compile(r"time[=<]([\d.]+) ms")
_SUMMARY = re.compile(r"(\d+) packets transmitted, (\d+) (?:packets )?received")


def parse_ping(output: str) -> RttStats:
    m = _SUMMARY.search(output)
    if not m:
        raise MeasureError(f"cannot read ping output: {output.strip()[-200:]!r}")
    samples = [float(x) for x in _REPLY.findall(output)]
    sent, received = int(m.group(1)), int(m.group(2))
    if len(samples) != received:
        raise MeasureError(f"ping reported {received} replies but printed {len(samples)} times")
    return RttStats(samples, sent, received)


def ping(netns: str, dst: str, count: int = 50, interval_s: float = 0.01,
         timeout_s: float | None = None, size: int | None = None) -> RttStats:
    """``count`` echo requests from the namespace ``netns`` to ``dst``."""
    args = ["ping", "-n", "-c", str(count), "-i", f"{interval_s:g}", "-W", "1"]
    if size is not None:
        args += ["-s", str(size)]
    limit = timeout_s or count * interval_s + 10
    res = proc.run([*args, dst], netns=netns, check=False, timeout=limit)
    if res.returncode not in (0, 1):  # 1: some replies missing, still a measurement
        raise MeasureError(f"ping {dst} failed (exit {res.returncode}): {(res.stderr or res.stdout).strip()[-200:]}")
    return parse_ping(res.stdout)


@dataclass
class TcpResult:
    gbit_s: float
    retransmits: int
    duration_s: float
    bytes: int
    mss: int | None = None


def parse_iperf3(json_text: str) -> TcpResult:
    try:
        data = json.loads(json_text)
    except ValueError:
        raise MeasureError(f"iperf3 printed no JSON: {json_text.strip()[-200:]!r}") from None
    if data.get("error"):
        raise MeasureError(f"iperf3: {data['error']}")
    try:
        recv, sent = data["end"]["sum_received"], data["end"]["sum_sent"]
        return TcpResult(gbit_s=recv["bits_per_second"] / 1e9, retransmits=int(sent.get("retransmits", 0)),
                         duration_s=float(recv["seconds"]), bytes=int(recv["bytes"]),
                         mss=data.get("start", {}).get("tcp_mss_default"))
    except (KeyError, TypeError) as e:
        raise MeasureError(f"iperf3 JSON lacks {e}") from None


def _wait_listening(server: subprocess.Popen, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not proc.listening(server.pid, port):
        if server.poll() is not None:
            err = server.stderr.read().decode(errors="replace").strip() if server.stderr else ""
            raise MeasureError(f"iperf3 server exited (status {server.returncode}): {err[-200:]}")
        if time.monotonic() > deadline:
            raise MeasureError(f"iperf3 server did not listen on port {port} within {timeout:.0f} s")
        time.sleep(0.01)


def iperf3(client_netns: str, server_netns: str, server_ip: str, duration_s: float = 5, port: int = 5201,
           omit_s: float = 0.5, timeout_s: float | None = None) -> TcpResult:
    """TCP throughput from ``client_netns`` to an iperf3 server started in ``server_netns``."""
    proc.require("iperf3")
    server = subprocess.Popen(["iperf3", "-s", "-1", "-B", server_ip, "-p", str(port)],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              preexec_fn=lambda: proc.setns(server_netns))
    try:
        _wait_listening(server, port, 5)
        limit = timeout_s or duration_s + omit_s + 15
        res = proc.run(["iperf3", "-c", server_ip, "-p", str(port), "-t", f"{duration_s:g}",
                        "-O", f"{omit_s:g}", "--json"], netns=client_netns, check=False, timeout=limit)
        if res.returncode != 0 and not res.stdout.strip():
            raise MeasureError(f"iperf3 -c {server_ip} failed (exit {res.returncode}): {res.stderr.strip()[-200:]}")
        return parse_iperf3(res.stdout)
    finally:
        if server.poll() is None:
            server.terminate()
            try:
                server.wait(3)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        if server.stderr:
            server.stderr.close()
