"""SIGINT and SIGTERM, at any moment of ``k8snetlab up``'s start and stop, tear everything down.

Each run starts ``k8snetlab up`` the way a script does, in the background (``cmd &`` from
``sh``: such a job starts with SIGINT ignored, which the runtime must undo), under its own
state root, sends a signal at one moment (while loading, right after the state dir appears,
while the underlay, the agents and the pods are being made, while holding, during teardown),
and checks: exit status 130, no traceback or "Exception ignored", no state dir, no
``knl<index>`` link, no process the cluster recorded or started (they carry the run's state root in
their environment).
The moments are spread over the start as it runs on this machine; the runs are bounded
(nine in all, each at most 60 s).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import REPO, require_root_and
from k8snetlab import cleanup, naming, proc, statedir
from leftover_check import left_under

pytestmark = pytest.mark.integration

CLUSTER = """\
name: signals
underlay: {subnets: [{name: lan, cidr: 192.168.1.0/24}]}
nodes: [{name: node1, ip: 192.168.1.10}, {name: node2, ip: 192.168.1.11}]
cni: {type: host-gw}
workloads:
  - {apiVersion: v1, kind: Pod, metadata: {name: a}, spec: {containers: [{name: c, command: [sleep, "600"]}]}}
  - {apiVersion: v1, kind: Pod, metadata: {name: b}, spec: {containers: [{name: c, command: [sleep, "600"]}]}}
"""


class Run:
    """One ``k8snetlab up`` in the background of a shell, watched through its state root."""

    def __init__(self, tmp: Path, n: int):
        self.root = tmp / f"root{n}"
        self.log = tmp / f"up{n}.log"
        cluster = tmp / "signals.yaml"
        cluster.write_text(CLUSTER)
        env = {**os.environ, "K8SNETLAB_STATE": str(self.root)}
        # 'cmd &' in a non-interactive shell: the job starts with SIGINT (and SIGQUIT) ignored
        script = (f"'{sys.executable}' -m k8snetlab.cli up '{cluster}' >'{self.log}' 2>&1 & "
                  "echo $!; wait $!")
        self.shell = subprocess.Popen(["sh", "-c", script], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
        assert self.shell.stdout is not None
        self.pid = int(self.shell.stdout.readline())
        self.t0 = time.monotonic()
        self.index: int | None = None
        self.pids: set[tuple[int, int]] = set()

    def poll(self) -> None:
        for d in self.root.glob("knl*"):
            self.index = naming.cluster_index_of(d.name)
            try:
                lines = (d / "pids.jsonl").read_text().splitlines()
            except OSError:
                continue
            for line in lines:
                try:
                    r = json.loads(line)
                except ValueError:
                    continue
                self.pids.add((r["pid"], r.get("start", 0)))

    def handles_stop_signals(self) -> bool:
        """Has the runtime installed its SIGINT and SIGTERM handlers (SigCgt)? Before that,
        a SIGINT to a job started with '&' is ignored by the kernel, as for any program."""
        try:
            status = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return False
        caught = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
        return all(caught & (1 << (s - 1)) for s in (signal.SIGINT, signal.SIGTERM))

    def alive(self) -> bool:
        return self.shell.poll() is None

    def until(self, cond, timeout: float = 60) -> bool:
        deadline = time.monotonic() + timeout
        while self.alive() and time.monotonic() < deadline:
            self.poll()
            if cond():
                return True
            time.sleep(0.02)
        return cond()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def finish(self, timeout: float = 60) -> int:
        self.until(lambda: False, timeout)
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
            self.shell.wait(10)
            cleanup.clean()
            pytest.fail(f"k8snetlab up did not end within {timeout} s of the signal:\n{self.log_text()}")
        return self.shell.returncode

    def problems(self) -> list[str]:
        # processes are found by the environment they inherited, with this run's own state
        # root (namespace inodes would not do: the kernel reuses them for other clusters)
        out = [x for x in left_under(self.root) if not x.startswith(f"process {self.pid} ")]
        if self.index is not None:      # also a link made but not marked yet when the signal came
            for link in statedir.root_links():
                mark = statedir.parse_link_mark(link["alias"])
                if naming.cluster_index_of(link["ifname"]) == self.index and mark is None:
                    out.append(f"link {link['ifname']}")
        out += [f"process {pid}" for pid, start in self.pids if start and proc.running(pid, start)]
        return out


def signal_at(tmp: Path, n: int, sig: int, moment: str, delay: float) -> str:
    run = Run(tmp, n)
    try:
        if moment == "loading":
            assert run.until(run.handles_stop_signals), run.log_text()
            t = time.monotonic()
            run.until(lambda: time.monotonic() - t > delay, delay + 5)
        elif moment == "started":
            run.until(lambda: run.index is not None)
            t = time.monotonic()
            run.until(lambda: time.monotonic() - t > delay, delay + 5)
        elif moment in ("holding", "teardown"):
            assert run.until(lambda: "holding the cluster" in run.log_text()), run.log_text()
        os.kill(run.pid, sig)
        if moment == "teardown":          # a second signal while tearing down
            time.sleep(delay)
            if run.alive():
                os.kill(run.pid, signal.SIGTERM if sig == signal.SIGINT else signal.SIGINT)
        status = run.finish()
    finally:
        if run.alive():
            os.kill(run.pid, signal.SIGKILL)
            run.shell.wait(10)
    text = run.log_text()
    where = f"{signal.Signals(sig).name} at {moment}+{delay}s"
    assert "Traceback" not in text and "Exception ignored" not in text, f"{where}:\n{text}"
    assert status == 130, f"{where}: exit {status}\n{text}"
    # the kernel deletes the veths of a namespace that ended asynchronously: give it a moment
    deadline = time.monotonic() + 5
    while run.problems() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not run.problems(), f"{where}: left {run.problems()}\n{text}"
    return where


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stop_signal_at_any_moment_of_start_tears_everything_down(tmp_path, sig):
    require_root_and("mnexec", "brctl")
    # while loading; right after the state dir exists; the underlay; agents and pods; holding
    moments = [("loading", 0.0), ("started", 0.0), ("started", 1.2), ("holding", 0.0)]
    done = [signal_at(tmp_path, i, sig, m, d) for i, (m, d) in enumerate(moments)]
    assert len(done) == len(moments)


def test_a_second_signal_during_teardown_still_tears_everything_down(tmp_path):
    require_root_and("mnexec", "brctl")
    signal_at(tmp_path, 0, signal.SIGINT, "teardown", 0.3)
