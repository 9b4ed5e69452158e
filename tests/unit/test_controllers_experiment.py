"""experiments/underlay_switching.py without root: the two underlays it builds from one file,
the refusal of a looped file that Linux bridges cannot run, and the summary it prints."""

from __future__ import annotations

import pytest

from k8snetlab import proc, results, switching
from k8snetlab.errors import SpecError

from cli_harness import REPO, experiment_module


def experiment():
    return experiment_module("underlay_switching.py", "underlay_switching")


@pytest.fixture
def ovs_installed(monkeypatch):
    real = proc.which
    monkeypatch.setattr(proc, "which", lambda t: f"/usr/sbin/{t}" if t in switching.OVS_TOOLS else real(t))


def args(*argv: str):
    return experiment().build_parser().parse_args(list(argv))


def test_one_file_two_underlays(ovs_installed):
    v = experiment().variants(args())
    assert list(v) == ["linuxbridge", "ovs+l2_learning"]
    assert v["linuxbridge"].underlay.switch == "linuxbridge"
    assert (v["ovs+l2_learning"].underlay.switch, v["ovs+l2_learning"].underlay.controller) == ("ovs", "l2_learning")
    assert v["linuxbridge"].nodes == v["ovs+l2_learning"].nodes


def test_a_looped_file_cannot_run_on_linux_bridges(ovs_installed):
    with pytest.raises(SpecError, match="form a loop"):
        experiment().variants(args("--controller", "fabric", "--topology", str(REPO / "topologies" / "ovs_fabric.yaml")))


def test_summary_shows_ratios_packet_in_cost_and_flows():
    mod = experiment()

    def row(mode, scenario, metric, value, unit, src="a"):
        return results.Row("r", "t", "underlay_switching", "lab", mode, "", scenario, src, "b", 1, metric,
                           value, unit, None, "k")
    rows = []
    for mode, p50, first, tp, flows in (("linuxbridge", 0.05, 0.12, 8.0, 3), ("ovs+l2_learning", 0.2, 2.2, 0.8, 5)):
        rows += [row(mode, "pod-cross-node", "rtt_p50", p50, "ms"), row(mode, "pod-cross-node", "first_packet_rtt", first, "ms"),
                 row(mode, "pod-cross-node", "tcp_throughput", tp, "Gbit/s"),
                 row(mode, "switch", "flows_per_switch", flows, "count", src="lan"),
                 row(mode, "lifecycle", "cluster_up", 1.0, "s")]
    text = mod.summary(rows, ["linuxbridge", "ovs+l2_learning"])
    assert "ovs+l2_learning/linuxbridge" in text
    assert "0.1" in text.split("tcp_throughput")[1].splitlines()[0]       # 0.8 / 8.0
    assert "ovs+l2_learning             2.000 ms" in text                  # first 2.2 - p50 0.2
    assert "lan 5" in text and "lan 3" in text
