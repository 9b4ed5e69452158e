"""The out-of-tree example mode (examples/k8snetlab-example-mode), installed into a throwaway
venv, brings a cluster up: pods on different nodes reach each other with the MTU it was given,
and nothing is left after it stops."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from helpers import REPO, require_root_and

pytestmark = pytest.mark.integration

UP = """
import json, sys
from k8snetlab import spec
from k8snetlab.cluster import Cluster
s = spec.with_cni(spec.load(sys.argv[1]), "flat-l2", **{"flat-l2": {"mtu": 1400}})
out = {}
with Cluster(s) as c:
    a, b = sorted((p for p in c.pods.values()), key=lambda p: p.node_name)[::len(c.pods) - 1]
    out["nodes"] = [a.node_name, b.node_name]
    out["ping"] = a.run(["ping", "-c", "1", "-W", "2", b.ip], check=False).returncode
    out["link"] = a.run(["ip", "-o", "link", "show", "dev", "eth0"]).stdout
    out["state"] = str(c.state.path)
print(json.dumps(out))
"""


def test_the_installed_mode_brings_a_cluster_up(example_venv):
    require_root_and("mnexec", "brctl")
    r = subprocess.run([str(example_venv / "bin" / "python"), "-c", UP, str(REPO / "topologies" / "three_nodes.yaml")],
                       capture_output=True, text=True, timeout=300, cwd=example_venv.parent,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.splitlines()[-1])
    assert out["nodes"][0] != out["nodes"][1] and out["ping"] == 0
    assert "mtu 1400" in out["link"]
    assert not os.path.exists(out["state"])
