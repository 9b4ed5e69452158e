"""Cluster specs the bgp unit tests share: N nodes on one subnet, two racks with ToR routers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from k8snetlab import spec
from k8snetlab.bgp import plan

REPO = Path(__file__).resolve().parents[2]


def flat(n: int, **bgp: Any) -> spec.ClusterSpec:
    return spec.from_dict({
        "name": f"flat-{n}",
        "underlay": {"subnets": [{"name": "lan", "cidr": "192.168.0.0/16"}]},
        "nodes": [{"name": f"node{i + 1}", "ip": f"192.168.1.{10 + i}"} for i in range(n)],
        "cni": {"type": "bgp", "bgp": bgp}}, "flat.yaml")


def two_racks(**bgp: Any) -> spec.ClusterSpec:
    return spec.with_cni(spec.load(REPO / "topologies" / "two_racks.yaml"), "bgp", bgp={"peerWithToR": True, **bgp})


def build(s: spec.ClusterSpec) -> plan.BgpPlan:
    return plan.build(s, s.cni.options)
