"""The pure parts of experiments/scale.py: the clusters it builds are valid cluster files in
every mode (bgp included) and for kube-proxy, and its targets take their verdicts from
intervals (met only when the whole interval is under the limit)."""

from __future__ import annotations

from pathlib import Path

import pytest

from k8snetlab import results, spec
from cli_harness import experiment_module

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def sc():
    return experiment_module("scale.py", "scale_under_test")


@pytest.mark.parametrize("mode", ["host-gw", "ipip", "bgp"])
def test_every_mode_builds_a_valid_cluster_of_ten_pods_per_node(sc, mode):
    s = spec.from_dict(sc.cluster_dict(1000, mode, "exec"), "scale")
    assert len(s.nodes) == 100 and len(s.pods()) == 1000 and s.cni.type == mode


@pytest.mark.parametrize("mode", ["host-gw", "ipip", "bgp"])
def test_every_mode_builds_a_valid_cluster_of_2000_pods(sc, mode, monkeypatch):
    """--large: bgp at 200 nodes uses route reflectors (a mesh is refused on this kernel's
    neighbour table, whatever the machine it runs on says)."""
    from k8snetlab.bgp import plan
    monkeypatch.setattr(plan, "neighbour_limit", lambda: 16384)
    s = spec.from_dict(sc.cluster_dict(2000, mode, "exec"), "scale")
    assert len(s.nodes) == 200 and len(s.pods()) == 2000
    if mode == "bgp":
        assert s.cni.options.topology == "route-reflector" and s.cni.options.reflectors == ["node1", "node2"]


def test_kube_proxy_cluster_puts_ten_pods_behind_each_service(sc):
    s = spec.from_dict(sc.proxy_dict(200), "scale-proxy")
    assert len(s.nodes) == 20 and len(s.pods()) == 200 and len(s.services) == 20
    by_app: dict[str, int] = {}
    for p in s.pods():
        by_app[p.labels["app"]] = by_app.get(p.labels["app"], 0) + 1
    assert set(by_app.values()) == {10} and len(by_app) == 20


def test_a_target_is_met_only_when_its_whole_interval_is_under_the_limit(sc):
    assert "[    met     ]" in sc.target("up", (20.0, 18.0, 22.0), 30, " s", 3)
    assert "[   MISSED   ]" in sc.target("up", (40.0, 35.0, 45.0), 30, " s", 3)
    line = sc.target("up", (29.0, 25.0, 33.0), 30, " s", 3)
    assert "inconclusive" in line and "[25, 33], n 3" in line
    assert "n 1: no interval" in sc.target("up", (20.0, 20.0, 20.0), 30, " s", 1)
    assert "n/a" in sc.target("up", None, 30)


def test_bootstrap_interval_of_a_median_holds_the_median(sc):
    vals = [10.0, 11.0, 12.0, 13.0, 50.0, 9.0, 10.5]
    value, lo, hi = sc.boot_ci(vals, sc.statistics.median)
    assert value == 11.0 and lo <= value <= hi and hi < 50
    assert sc.boot_ci([5.0], sc.statistics.median) == (5.0, 5.0, 5.0)


def row(sc, mode, scenario, metric, value, rnd=1):
    return results.Row("r", "t", "scale", "flat", mode, "", scenario, "", "", rnd, metric, value, "s", None, "k", 1.0)


def test_report_has_the_time_table_and_the_growth_exponent_from_rounds(sc):
    rows = []
    for rnd, (a, b) in enumerate([(2.0, 20.0), (2.2, 21.0), (1.9, 19.0)], start=1):
        rows += [row(sc, "host-gw", "100 pods", "pods_up", a, rnd), row(sc, "host-gw", "1000 pods", "pods_up", b, rnd)]
        rows += [row(sc, "host-gw", "1000 pods", m, 1.0, rnd) for m in ("underlay_cpu", "agents_cpu", "pods_cpu",
                                                                          "cni_servers_cpu", "pods_down")]
    text = sc.report(rows, [100, 1000], ["host-gw"], {})
    assert "Where the time goes" in text and "CNI servers" in text
    line = next(l for l in text.splitlines() if "growth exponent" in l)
    assert "n 3" in line and "1" in line      # log10(20/2) = 1.0 from the medians
    assert "host-gw 1000 pods up" in text and "met" in text


def test_startup_p99_interval_is_over_rounds_and_the_table_says_where_the_time_went(sc):
    rounds = [[0.1 * i for i in range(1, 101)], [0.2 * i for i in range(1, 101)], [0.15 * i for i in range(1, 101)]]
    (value, lo, hi), n = sc.startup_p99_est(rounds)
    assert n == 3 and value == pytest.approx((9.9 + 19.8 + 14.85) / 3) and lo < value < hi
    (one, lo1, hi1), n1 = sc.startup_p99_est(rounds[:1])
    assert n1 == 1 and one == pytest.approx(9.9) and lo1 == one == hi1     # one round: no interval
    from k8snetlab.pod import Pod
    assert sc.STARTUP_PHASES == Pod.STARTUP_PHASES      # the table's columns: the pod's own phases
    phases = {p: [0.001 * (k + 1)] * 300 for k, p in enumerate(sc.STARTUP_PHASES)}
    extra = {"startup_rounds": rounds, "startup_phases": phases, "startup_batches": {0: [(1, 0.05)] * 3}}
    text = sc.report([], [100], ["host-gw"], extra)
    assert "queued" in text and "readiness" in text and "slow-start batches" in text
    line = next(l for l in text.splitlines() if "pod startup p99" in l)
    assert "n 3" in line and "MISSED" in line and "runtime RSS" not in text


def test_each_cluster_waits_for_the_kernel_to_end_the_last_ones_namespaces(sc, monkeypatch):
    """settle_kernel waits while a kworker runs the netns workqueue, stops after a second
    without it, gives up at its timeout, and waits two seconds where no kworker is seen."""
    clock = [0.0]
    monkeypatch.setattr(sc.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(sc.time, "sleep", lambda s: clock.__setitem__(0, clock[0] + s))
    states = iter([True] * 8 + [False, True] + [False] * 10)      # 2 s at it, a blip, then quiet
    monkeypatch.setattr(sc, "netns_cleanup_running", lambda: next(states))
    assert sc.settle_kernel(poll=0.25) == 2.5 + sc.SETTLE_QUIET_S - 0.25
    monkeypatch.setattr(sc, "netns_cleanup_running", lambda: True)
    clock[0] = 0.0
    assert sc.settle_kernel(timeout=60) == 60
    monkeypatch.setattr(sc, "netns_cleanup_running", lambda: None)
    clock[0] = 0.0
    assert sc.settle_kernel() == 2.0


def test_a_kworker_at_the_netns_workqueue_is_seen(sc, monkeypatch, tmp_path):
    import builtins
    comms = {"1": "systemd\n", "7": "kworker/u8:1+netns\n", "9": "kworker/0:2-events\n"}
    real_open = builtins.open
    monkeypatch.setattr(sc.os, "listdir", lambda path: [*comms, "self"])
    monkeypatch.setattr(builtins, "open", lambda path, *a, **k: __import__("io").StringIO(comms[path.split("/")[2]])
                        if str(path).startswith("/proc/") else real_open(path, *a, **k))
    assert sc.netns_cleanup_running() is True
    comms["7"] = "kworker/u8:1-netns\n"         # done with it: "-" is the last workqueue it ran
    assert sc.netns_cleanup_running() is False
    del comms["7"], comms["9"]
    assert sc.netns_cleanup_running() is None
