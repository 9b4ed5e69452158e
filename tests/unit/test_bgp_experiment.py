"""experiments/bgp_mesh_vs_rr.py without root: its input checks, the clusters it generates, and
the summary's targets computed from rows."""

from __future__ import annotations

import pytest

from k8snetlab import results
from k8snetlab.errors import SpecError

from cli_harness import experiment_module

exp = experiment_module("bgp_mesh_vs_rr.py", "bgp_mesh_vs_rr")


def test_sizes():
    assert exp.sizes("10,20,50", 2) == [10, 20, 50]
    for bad in ("", "x", "2", "201"):
        with pytest.raises(SpecError, match="--nodes"):
            exp.sizes(bad, 2)


def test_generated_clusters_are_valid_and_sized():
    args = exp.build_parser().parse_args(["--reflectors", "3"])
    mesh = exp.flat_cluster(100, "mesh", args)
    rr = exp.flat_cluster(100, "route-reflector", args)
    assert len(mesh.nodes) == 100 and len({n.ip for n in mesh.nodes}) == 100
    assert len({n.pod_cidr for n in mesh.nodes}) == 100 and not mesh.workloads
    assert rr.cni.options.reflectors == ["node1", "node2", "node3"] and rr.cni.invoke == "inprocess"
    assert exp.expected_sessions(100, exp.MESH, 2) == 4950 and exp.expected_sessions(100, exp.RR, 2) == 197


def row(mode, n, metric, value, unit, src="", rnd=1):
    return results.Row("r", "t", exp.NAME, f"flat-{n}", mode, "bird", f"{n} nodes", src, "", rnd, metric, value,
                       unit, None, "k")


def test_summary_targets():
    rows = [row(exp.MESH, 50, "bgp_converge", 1.4, "s"), row(exp.RR, 50, "bgp_converge", 1.6, "s"),
            row(exp.MESH, 50, "bgp_sessions_total", 1225, "count"), row(exp.RR, 50, "bgp_sessions_total", 97, "count"),
            row(exp.MESH, 50, "speaker_pss", 1.9, "MB", "node1"), row(exp.MESH, 50, "speaker_pss", 2.1, "MB", "node2"),
            row(exp.MESH, 50, "speaker_rss", 5.9, "MB", "node1"),
            row(exp.MESH, 50, "bgp_sessions", 49, "count", "node1"), row(exp.RR, 50, "bgp_sessions", 2, "count", "node9")]
    out = exp.summary(rows, [50], 2)
    assert "met           50-node mesh converges <= 10 s (s): 1.4 (one value, no interval)" in out, out
    assert "met           RR sessions <= 0.1 x mesh at 50 nodes (ratio): 0.0792" in out
    assert "met           RR convergence <= 1.5 x mesh at 50 nodes (ratio): 1.14" in out
    assert "met           speaker memory (PSS) <= 5 MB per node, largest (MB): 2.1" in out
    assert "MISSED        speaker memory (RSS" in out
    # three rounds whose interval crosses the limit: never 'met'
    more = [row(exp.MESH, 50, "bgp_converge", v, "s", rnd=k) for k, v in ((2, 1.3), (3, 1.5))]
    more += [row(exp.RR, 50, "bgp_converge", v, "s", rnd=k) for k, v in ((2, 1.9), (3, 2.6))]
    out = exp.summary(rows + more, [50], 2)
    assert "inconclusive  RR convergence <= 1.5 x mesh at 50 nodes (ratio)" in out, out
    rows.append(row(exp.MESH, 50, "bgp_converge", float("nan"), "s", rnd=2))
    assert "not measured" in exp.summary(rows, [50], 2)
