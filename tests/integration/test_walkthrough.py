"""The Pod/Service walkthrough runs end to end (--quick) and its checks hold; its captures
are pcap files scapy reads back."""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest

from helpers import REPO, require_root_and
from leftover_check import left_under, private_state

pytestmark = pytest.mark.integration


def test_walkthrough_quick(tmp_path):
    require_root_and("mnexec", "brctl", "iptables", "tcpdump")
    r = subprocess.run([sys.executable, "experiments/walkthrough_pod_service.py", "--quick", "--out", str(tmp_path)],
                       cwd=REPO, env=private_state(tmp_path / "state"), capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "every check held" in r.stdout
    (csv_path,) = tmp_path.glob("walkthrough_pod_service-*.csv")
    rows = list(csv.DictReader(open(csv_path)))
    assert {row["kube_proxy"] for row in rows} >= {"userspace", "iptables"}
    assert all(row["result"] == "pass" for row in rows)
    (md,) = tmp_path.glob("walkthrough_pod_service-*.md")
    assert "pause" in md.read_text()
    from scapy.all import rdpcap
    pcaps = sorted(tmp_path.glob("*-pcap/*.pcap"))
    assert len(pcaps) == 5, pcaps
    for p in pcaps:
        assert len(rdpcap(str(p))) > 0, p
    assert (tmp_path / "state").is_dir()       # its clusters kept their state where the check looks
    assert not left_under(tmp_path / "state")
