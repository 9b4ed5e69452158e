"""Link properties: parsing, load-time refusals, the header-overhead limits (no root)."""

import subprocess
import sys
from pathlib import Path

import pytest

from k8snetlab import shaping, spec
from k8snetlab.errors import SpecError

REPO = Path(__file__).resolve().parents[2]


def test_rates_in_tc_and_iperf3_spelling():
    assert shaping.parse_rate("1gbit", "x") == 1e9
    assert shaping.parse_rate("100mbit", "x") == 1e8
    assert shaping.parse_rate("5G", "x") == 5e9
    for bad in ("fast", "0mbit", "-1gbit", "1 furlong", True):
        with pytest.raises(SpecError):
            shaping.parse_rate(bad, "x")


def test_loss_as_percentage_or_fraction():
    assert shaping.parse_loss("0.5%", "x") == pytest.approx(0.005)
    assert shaping.parse_loss(0.1, "x") == pytest.approx(0.1)
    for bad in ("150%", "100%", -0.1, "lots"):
        with pytest.raises(SpecError):
            shaping.parse_loss(bad, "x")


def test_delay_is_refused_without_netem_naming_the_qdisc():
    with pytest.raises(SpecError, match="netem"):
        shaping.parse_link({"delay": "10ms"}, "w", has_netem=lambda: False)
    props = shaping.parse_link({"delay": "10ms", "jitter": "1ms"}, "w", has_netem=lambda: True)
    assert (props.delay_ms, props.jitter_ms) == (10, 1)
    with pytest.raises(SpecError, match="jitter needs a delay"):
        shaping.parse_link({"jitter": "1ms"}, "w", has_netem=lambda: True)
    with pytest.raises(SpecError, match="unknown link property"):
        shaping.parse_link({"bandwidth": "1gbit"}, "w")
    with pytest.raises(SpecError):
        shaping.parse_link({"mtu": 20}, "w")


def test_header_overhead_limits_of_the_issue():
    hg = shaping.goodput_fraction(1500, 0)
    assert hg == pytest.approx(1448 / 1514)
    assert shaping.goodput_fraction(1480, 20) / hg == pytest.approx(1428 / 1448)     # 0.986
    assert shaping.goodput_fraction(1450, 50) / hg == pytest.approx(1398 / 1448)     # 0.965
    assert shaping.encap_bytes("ipip", {"ipipMode": "CrossSubnet"}) == 0
    assert shaping.encap_bytes("ipip", {}) == 20
    assert shaping.encap_bytes("vxlan", {}) == 50


def test_loss_threshold_is_the_share_of_the_random_u32_range():
    assert shaping.loss_threshold(0.25) == 2 ** 30
    assert shaping.loss_threshold(0) == 0
    assert shaping.loss_threshold(0.9999999999) == 0xFFFFFFFF


def cluster_file(tmp_path, link):
    f = tmp_path / "c.yaml"
    f.write_text("name: shaped\nunderlay:\n  subnets:\n    - name: lan\n      cidr: 192.168.1.0/24\n"
                 f"      link: {link}\n"
                 "nodes:\n  - {name: n1, ip: 192.168.1.10}\n  - {name: n2, ip: 192.168.1.11}\n"
                 "cni: {type: host-gw}\n")
    return f


def test_link_properties_load_into_the_spec(tmp_path):
    s = spec.load(cluster_file(tmp_path, "{rate: 1gbit, loss: 1%, mtu: 1500}"))
    assert s.underlay.subnets[0].link == shaping.LinkProps(rate_bps=1e9, loss=0.01, mtu=1500)
    assert shaping.with_link_rate(s, "100mbit").underlay.subnets[0].link.rate_bps == 1e8


@pytest.mark.parametrize("link,word", [("{rate: fast}", "rate"), ("{loss: 150%}", "loss")])
def test_bad_link_properties_stop_at_load_with_one_line(tmp_path, link, word):
    p = subprocess.run([sys.executable, "-m", "k8snetlab.cli", "check-model", str(cluster_file(tmp_path, link))],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and f"link.{word}" in lines[0], p.stderr
