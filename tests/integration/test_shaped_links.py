"""Shaped underlay links on a real cluster: the rate holds, the loss is what was asked.

Two host-gw nodes on one subnet whose ports are shaped (a token bucket for the rate, a
classic-BPF random drop for the loss). Node to node:

- TCP goodput over a 200 Mbit/s link stays within 5 % of what the rate leaves for 1448-byte
  payloads in 1514-byte frames;
- 2,000 pings over a link that drops 10 % of packets each way: a ping round trip crosses two
  shaped ports, so it is lost with probability 1 - 0.9**2 = 0.19; the loss counted must lie
  within four standard deviations of the binomial (+-0.035).
"""

from __future__ import annotations

import math

import pytest

from helpers import require_root_and
from k8snetlab import measure, shaping, spec
from k8snetlab.cluster import Cluster

pytestmark = pytest.mark.integration


def shaped_cluster(tmp_path, link: str) -> Cluster:
    f = tmp_path / "shaped.yaml"
    f.write_text("name: shaped\nunderlay:\n  subnets:\n    - name: lan\n      cidr: 192.168.77.0/24\n"
                 f"      link: {link}\n"
                 "nodes:\n  - {name: node1, ip: 192.168.77.10}\n  - {name: node2, ip: 192.168.77.11}\n"
                 "cni: {type: host-gw}\n")
    return Cluster(spec.load(f))


def test_rate_holds_within_5_percent(tmp_path):
    require_root_and("tc", "iperf3", "mnexec")
    with shaped_cluster(tmp_path, "{rate: 200mbit}") as c:
        assert len(c.shaped_links) == 2
        n1, n2 = c.nodes["node1"], c.nodes["node2"]
        got = measure.iperf3(n1.netns, n2.netns, n2.IP(), duration_s=4, omit_s=1)
        limit = 0.2 * shaping.goodput_fraction(1500, 0)
        assert abs(got.gbit_s / limit - 1) < 0.05, f"{got.gbit_s:.4f} Gbit/s against a limit of {limit:.4f}"


def test_loss_within_its_binomial_bound_over_2000_packets(tmp_path):
    require_root_and("tc", "ping", "mnexec")
    with shaped_cluster(tmp_path, "{loss: 10%}") as c:
        n1, n2 = c.nodes["node1"], c.nodes["node2"]
        measure.ping(n1.netns, n2.IP(), count=20, interval_s=0.01)        # ARP before counting
        rtt = measure.ping(n1.netns, n2.IP(), count=2000, interval_s=0.002, timeout_s=60)
        q = 1 - 0.9 ** 2
        bound = 4 * math.sqrt(q * (1 - q) / 2000)
        assert abs(rtt.loss - q) < bound, f"loss {rtt.loss:.4f}, expected {q:.3f} +- {bound:.3f}"
        drops = sum(shaping.qdisc_counters(ns, dev)[0] for ns, dev in c.shaped_links)
        assert drops > 0                  # the drops are the filter's, counted where they happen
