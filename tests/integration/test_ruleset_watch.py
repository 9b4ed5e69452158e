"""The kube-proxy's cheap check that a node's rules are as it left them (k8snetlab/services/
ruleset.py), on a throwaway namespace: our own writes are recorded, anyone else's change is
seen, for nf_tables (the generation) and iptables-legacy (entries and size per table)."""

from __future__ import annotations

import os
import subprocess
import uuid

import pytest

from helpers import require_root_and
from k8snetlab.services.ruleset import RulesetWatch

pytestmark = pytest.mark.integration

OURS = "*nat\n:KUBE-SERVICES - [0:0]\n-A KUBE-SERVICES -d 10.96.0.1/32 -j RETURN\nCOMMIT\n" \
       "*filter\n:KUBE-FORWARD - [0:0]\n-A KUBE-FORWARD -j ACCEPT\nCOMMIT\n"


@pytest.fixture
def netns():
    require_root_and("ip", "iptables-nft-restore", "iptables-legacy-restore", "nft")
    name = f"knltest-rw-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    yield name
    subprocess.run(["ip", "netns", "del", name], check=True)
    assert not os.path.exists(f"/run/netns/{name}")


def run(ns: str, *args: str, text: str | None = None) -> None:
    subprocess.run(["ip", "netns", "exec", ns, *args], input=text, text=True, check=True, capture_output=True)


@pytest.mark.parametrize("backend", ["nft", "legacy"])
def test_own_writes_are_recorded_and_foreign_changes_seen(netns, backend):
    w = RulesetWatch(f"/run/netns/{netns}", backend, ("nat", "filter"))
    assert w.changed(w.fingerprint())                  # nothing recorded yet
    before = w.fingerprint()
    run(netns, f"iptables-{backend}-restore", "--noflush", text=OURS)
    w.wrote(before, 2)
    assert not w.changed(w.fingerprint())
    run(netns, f"iptables-{backend}", "-t", "nat", "-S")          # reading changes nothing
    assert not w.changed(w.fingerprint())
    run(netns, f"iptables-{backend}", "-t", "nat", "-F")
    assert w.changed(w.fingerprint())


def test_a_foreign_write_racing_ours_is_not_recorded(netns):
    w = RulesetWatch(f"/run/netns/{netns}", "nft")
    before = w.fingerprint()
    run(netns, "nft", "add", "table", "ip", "someone-else")           # slips in before our write
    run(netns, "iptables-nft-restore", "--noflush", text=OURS)
    w.wrote(before, 2)
    assert w.changed(w.fingerprint())                                # the next sync is a full one
