"""`k8snetlab up --cli`: the Mininet CLI knows pods and nodes by name; the cluster is gone after."""

import subprocess
import sys

import pytest

from helpers import REPO, THREE_NODES, require_root_and
from leftover_check import left_under, private_state

pytestmark = pytest.mark.integration


def test_up_cli_runs_commands_on_pods_by_name(tmp_path):
    require_root_and("mnexec", "brctl")
    state = tmp_path / "state"
    r = subprocess.run([sys.executable, "-m", "k8snetlab.cli", "up", str(THREE_NODES), "--cni", "host-gw", "--cli"],
                       cwd=REPO, env=private_state(state), input="web-0 ping -c1 -W2 web-1\nnode1 ip route\nexit\n",
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    seen = r.stdout + r.stderr                            # Mininet prints through its logger (stderr)
    assert "1 received" in seen                           # web-1 was replaced by its pod IP
    assert "10.244.1.0/24 via 192.168.1.130 dev eth0" in seen
    assert "cluster stopped and removed" in r.stdout
    assert f"state in {state}/knl" in r.stdout           # its state was where the check below looks
    assert not left_under(state)
