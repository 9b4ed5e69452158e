"""docker mode without root: what it refuses, and the rules it writes."""

import pytest

from k8snetlab import spec
from k8snetlab.errors import SpecError
from k8snetlab.modes.docker import _nat_rules, publish_rules

BASE = {"underlay": {"subnets": [{"name": "lan", "cidr": "192.168.1.0/24"}]},
        "nodes": [{"name": "n1", "ip": "192.168.1.2"}], "cni": {"type": "docker"}}


def test_underlay_overlapping_docker0_is_refused():
    d = {**BASE, "underlay": {"subnets": [{"name": "lan", "cidr": "172.17.5.0/24"}]},
         "nodes": [{"name": "n1", "ip": "172.17.5.2"}]}
    with pytest.raises(SpecError, match="overlaps Docker's 172.17.0.0/16"):
        spec.from_dict(d, "f.yaml")


def test_docker_rules_are_dockerds():
    assert "-A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE" in _nat_rules()
    dnat, masq = publish_rules("172.17.0.2", "TCP", 8080, 80)
    assert dnat[2:] == ["DOCKER", "!", "-i", "docker0", "-p", "tcp", "-m", "tcp", "--dport", "8080",
                        "-j", "DNAT", "--to-destination", "172.17.0.2:80"]
    assert "MASQUERADE" in masq


def test_docker_mode_loads():
    assert spec.from_dict(BASE, "f.yaml").cni.type == "docker"
