"""The CNI servers' worker processes, without root: the order protocol of a worker (one JSON
order per line, one answer per line, a bad order answered and the worker going on), nodes
dealt out over the workers in turn, and a worker that ends with its pipe."""

from __future__ import annotations

import io
import json

import pytest

from k8snetlab import cni_server
from k8snetlab.errors import K8sNetLabError


def answers(orders: str) -> list[dict]:
    out = io.StringIO()
    cni_server.worker_main(io.StringIO(orders), out)
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_a_worker_answers_every_order_in_turn_and_goes_on_after_bad_ones():
    got = answers('{"op": "requests", "label": "node1"}\n'
                  '{"op": "reboot", "label": "node1"}\n'
                  'not json\n'
                  '{"op": "serve", "label": "node9", "netns": "/nonexistent/ns", "run_dir": "/nonexistent"}\n'
                  '{"op": "stop", "label": "node1"}\n')
    assert got[0] == {"ok": True, "requests": 0}
    assert "unknown order 'reboot'" in got[1]["error"]
    assert "error" in got[2] and "error" in got[3] and "/nonexistent/ns" in got[3]["error"]
    assert got[4] == {"ok": True}


def test_pool_size_is_one_worker_per_cpu_and_never_more_than_nodes(monkeypatch):
    monkeypatch.setattr(cni_server.os, "cpu_count", lambda: 8)
    assert [cni_server.pool_size(n) for n in (0, 1, 3, 100)] == [1, 1, 3, 8]
    monkeypatch.setattr(cni_server.os, "cpu_count", lambda: 1)
    assert cni_server.pool_size(100) == 2


def test_nodes_are_dealt_over_the_workers_and_the_workers_end_with_the_pool(tmp_path):
    pool = cni_server.ServerPool(tmp_path / "run", tmp_path / "logs", 2)
    pool.start()
    try:
        pids = pool.pids()
        assert len(set(pids)) == 2
        servers = [pool.server("/proc/self/ns/net", f"node{i}") for i in range(4)]
        assert [s.pid for s in servers] == [pids[0], pids[1], pids[0], pids[1]]
        assert servers[1].requests == 0          # an order answered by a live worker
        procs = [w.process for w in pool.workers]
    finally:
        pool.stop()
    assert all(p.poll() is not None for p in procs), "a worker outlived its pool"
    with pytest.raises(K8sNetLabError, match="not running"):
        pool.server("/proc/self/ns/net", "node5")


def test_a_dead_worker_is_one_clear_error(tmp_path):
    pool = cni_server.ServerPool(tmp_path / "run", tmp_path / "logs", 1)
    pool.start()
    try:
        server = pool.server("/proc/self/ns/net", "node1")
        pool.workers[0].process.kill()
        pool.workers[0].process.wait()
        with pytest.raises(K8sNetLabError, match=r"CNI server worker 0 \(pid \d+\) exited"):
            server.start()
    finally:
        pool.stop()


def test_a_worker_that_never_answers_is_one_clear_error_not_a_hang(tmp_path, monkeypatch):
    """Every wait of a cluster's start is bounded: a worker that reads its orders and answers
    none (hung) fails the order after the timeout, naming the worker and its log."""
    monkeypatch.setattr(cni_server, "WORKER_PROGRAM", "import sys\nfor line in sys.stdin:\n    pass\n")
    monkeypatch.setattr(cni_server, "ASK_TIMEOUT", 0.3)
    pool = cni_server.ServerPool(tmp_path / "run", tmp_path / "logs", 1)
    pool.start()
    try:
        with pytest.raises(K8sNetLabError, match=r"worker 0 \(pid \d+\) did not answer serve node1 within 0.3 s"):
            pool.server("/proc/self/ns/net", "node1").start()
    finally:
        pool.stop()
    assert all(w.process.poll() is not None for w in pool.workers) or not pool.workers
