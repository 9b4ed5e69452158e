"""The bgp mode's waits and teardown at scale, without root or daemons: every speaker of a
cluster is stopped at once (one at a time, 200 BIRDs of a flapping mesh took 3 s each), and a
stop signal during a start interrupts the waits for speakers and for convergence (they ran
in a region where signals only act at checkpoints, so SIGINT and SIGTERM seemed ignored)."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from bgp_specs import build, flat
from cli_harness import signals_installed
from k8snetlab import proc, signals
from k8snetlab.bgp import speakers
from k8snetlab.modes.bgp import BgpMode


@pytest.fixture
def installed():
    with signals_installed():
        yield


def _stubborn() -> subprocess.Popen:
    """A daemon that ignores SIGTERM (a busy speaker that does not get to its shutdown)."""
    return subprocess.Popen(["sh", "-c", "trap '' TERM; sleep 30 & wait"], start_new_session=True)


def test_every_speaker_is_signalled_at_once_and_ended(tmp_path, monkeypatch):
    plan = build(flat(3))
    drivers = []
    for name, sp in plan.speakers.items():
        d = speakers.BirdSpeaker(sp, None, tmp_path / name)
        d.dir.mkdir()
        d.socket.write_text("")
        d.process = _stubborn()
        drivers.append(d)
    calls = []
    real = proc.end_children
    monkeypatch.setattr(proc, "end_children", lambda ps, grace, sig=signal.SIGTERM: calls.append(list(ps))
                        or real(ps, grace, sig))
    pids = [d.process.pid for d in drivers]
    try:
        speakers.stop_all(drivers, grace=0.3)
    finally:
        for pid in pids:
            with_kill(pid)
    assert [len(c) for c in calls] == [3], "the speakers were not signalled together"
    assert all(d.process is None and not d.socket.exists() for d in drivers)
    assert not any(proc.pid_alive(pid) and proc._stat(pid)[0] not in ("Z", "X") for pid in pids)


def with_kill(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _mode_missing_routes() -> BgpMode:
    mode = BgpMode.__new__(BgpMode)
    mode.missing_routes = lambda: {"node1": ["10.244.2.0/24"]}     # never converges
    return mode


def test_a_stop_signal_interrupts_the_wait_for_convergence_during_a_start(installed):
    mode = _mode_missing_routes()
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        with signals.deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            mode.wait_converged(timeout=30)
    assert time.monotonic() - t0 < 10, "the wait ran on after the signal"


def test_during_a_teardown_the_signal_waits_for_its_end(installed):
    mode = _mode_missing_routes()

    @signals.deferring(teardown=True)
    def teardown() -> float | None:
        os.kill(os.getpid(), signal.SIGTERM)
        return mode.wait_converged(timeout=0.2)

    with pytest.raises(KeyboardInterrupt):      # at the end of the region, not inside
        with signals.deferred():
            assert teardown() is None
