"""Processes and state records: what ``k8snetlab clean`` relies on to touch only what is ours."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from k8snetlab import proc, statedir
from k8snetlab.errors import K8sNetLabError


def test_start_time_tells_a_process_from_a_later_one_with_its_pid():
    me = os.getpid()
    start = proc.start_time(me)
    assert 0 < start <= proc.boot_ticks_now()
    assert proc.running(me, start)
    assert not proc.running(me, start + 1)          # the same PID, another process


def test_a_finished_process_is_not_running_and_never_signalled():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    start = proc.start_time(child.pid)
    child.wait()
    assert proc.start_time(child.pid) == 0 and not proc.running(child.pid, start)
    assert proc.stop_pids([(child.pid, start)], grace=0.1) == []


def test_stop_pids_stops_ours_and_skips_a_pid_whose_start_does_not_match():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        start = proc.start_time(child.pid)
        assert proc.stop_pids([(child.pid, start + 1)], grace=0.1) == []     # not the one recorded
        assert child.poll() is None
        assert proc.stop_pids([(child.pid, start)], grace=2) == [child.pid]
        assert child.wait(5) == -15
    finally:
        child.kill()
        child.wait()


def test_pids_in_netns_finds_a_child_in_our_namespace_started_after_a_tick():
    before = proc.boot_ticks_now()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        ours = {proc.netns_inode(os.getpid())}
        assert child.pid in proc.pids_in_netns(ours, started_after=before)
        assert os.getpid() not in proc.pids_in_netns(ours)
        assert child.pid not in proc.pids_in_netns(ours, started_after=proc.start_time(child.pid) + 1)
        assert proc.parent(child.pid) == os.getpid()
        assert "time.sleep(60)" in proc.cmdline(child.pid)
    finally:
        child.kill()
        child.wait()


def test_listening_own_ignores_other_processes():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            assert not proc.listening(os.getpid(), port)            # bound, not listening
            s.listen(1)
            assert proc.listening(os.getpid(), port, own=True)
            assert proc.listening(child.pid, port)                  # its namespace has the listener
            assert not proc.listening(child.pid, port, own=True)    # but it does not hold it
            other = port + 1 if port < 65535 else port - 1
            assert not proc.listening(os.getpid(), other, own=True)
    finally:
        child.kill()
        child.wait()


def test_link_mark_round_trip_and_strangers_marks(tmp_path):
    mark = statedir.link_mark(42, 1234, tmp_path / "knl3")
    assert statedir.parse_link_mark(mark) == (42, 1234, tmp_path / "knl3")
    for alias in ("", "k8snetlab", "k8snetlab x 1 /p", "other 42 1234 /p", "k8snetlab 42 1234"):
        assert statedir.parse_link_mark(alias) is None, alias


def test_owner_alive_only_while_the_recorded_process_runs(tmp_path):
    me = os.getpid()
    alive, dead, broken = tmp_path / "knl1", tmp_path / "knl2", tmp_path / "knl3"
    for d in (alive, dead, broken):
        d.mkdir()
    (alive / statedir.OWNER).write_text(json.dumps({"pid": me, "start": proc.start_time(me)}))
    (dead / statedir.OWNER).write_text(json.dumps({"pid": me, "start": proc.start_time(me) + 1}))
    (broken / statedir.OWNER).write_text("{not json")
    assert statedir.owner_alive(alive)
    assert not statedir.owner_alive(dead) and not statedir.owner_alive(broken)
    assert not statedir.owner_alive(tmp_path / "absent")


def test_records_skip_torn_lines(tmp_path):
    (tmp_path / statedir.PIDS).write_text('{"pid": 1, "start": 2}\n{"pid": 3, "st\n')
    assert list(statedir.records(tmp_path, statedir.PIDS)) == [{"pid": 1, "start": 2}]
    assert list(statedir.records(tmp_path, statedir.LINKS)) == []


def test_state_roots_lists_the_registered_and_the_environment_root(tmp_path, monkeypatch):
    default, mine, registered, gone = (tmp_path / n for n in ("default", "mine", "registered", "gone"))
    for d in (default, mine, registered):
        d.mkdir()
    monkeypatch.setattr(statedir.naming, "STATE_ROOT", str(default))
    monkeypatch.setattr(statedir, "ROOTS_FILE", tmp_path / "roots")
    monkeypatch.setenv("K8SNETLAB_STATE", str(mine))
    (tmp_path / "roots").write_text(f"{registered}\n{gone}\n{registered}\n")
    assert statedir.state_roots() == [default, mine, registered]


def test_end_children_kills_one_that_ignores_sigterm_after_the_shared_grace():
    stubborn = subprocess.Popen([sys.executable, "-c", "import signal, time; "
                                 "signal.signal(signal.SIGTERM, signal.SIG_IGN); print(1, flush=True); time.sleep(60)"],
                                stdout=subprocess.PIPE)
    polite = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert stubborn.stdout.readline()                 # its handler is in place
        assert proc.end_children([stubborn, polite], grace=0.5) == []
        assert polite.returncode == -15 and stubborn.returncode == -9
    finally:
        for p in (stubborn, polite):
            p.kill()
            p.wait()
        stubborn.stdout.close()


def test_wait_listening_names_a_server_that_exits_and_one_that_never_listens():
    dead = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    dead.wait()
    with pytest.raises(K8sNetLabError, match=r"probe exited \(status 3\) before listening on port 1"):
        proc.wait_listening(os.getpid(), 1, 5, "probe", child=dead)
    with pytest.raises(K8sNetLabError, match="nothing listens on port 1 after 0.1 s"):
        proc.wait_listening(os.getpid(), 1, 0.1, "probe")
