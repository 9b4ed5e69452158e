"""`k8snetlab up --metrics 127.0.0.1:PORT`, scraped by a real Prometheus (Debian's package).

The cluster runs as a user runs it; Prometheus runs on loopback with a throwaway config and
data directory, bounded in time, and is stopped by its PID. The test asks Prometheus' own
API for the interface counters of a pod: the scrape worked end to end.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from helpers import REPO, THREE_NODES, require_root_and
from k8snetlab import proc

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()


def stop(p: subprocess.Popen, sig=signal.SIGTERM) -> None:
    proc.end_child(p, 60, sig)


def test_prometheus_scrapes_per_pod_counters(tmp_path):
    require_root_and("mnexec", "brctl", "prometheus")
    pytest.importorskip("prometheus_client", reason="pip install prometheus_client")
    port, prom_port = free_port(), free_port()
    up = subprocess.Popen([sys.executable, "-m", "k8snetlab.cli", "up", str(THREE_NODES), "--cni", "host-gw",
                           "--metrics", f"127.0.0.1:{port}"], cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True)
    prom = None
    try:
        deadline = time.monotonic() + 180
        for line in up.stdout:
            if "holding the cluster" in line or time.monotonic() > deadline:
                break
        assert up.poll() is None, "k8snetlab up exited"
        text = get(f"http://127.0.0.1:{port}/metrics")
        assert 'k8snetlab_interface_receive_bytes_total{cluster="three-nodes",interface="eth0",kind="pod",name="web-0"}' in text
        (tmp_path / "prometheus.yml").write_text(
            "global: {scrape_interval: 1s}\n"
            f"scrape_configs:\n  - job_name: k8snetlab\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n")
        prom = subprocess.Popen(["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={tmp_path / 'data'}",
                                 f"--web.listen-address=127.0.0.1:{prom_port}"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        query = (f"http://127.0.0.1:{prom_port}/api/v1/query?query="
                 "k8snetlab_interface_receive_packets_total%7Bkind%3D%22pod%22%7D")
        found = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not found:
            time.sleep(1)
            try:
                found = json.loads(get(query))["data"]["result"]
            except (OSError, ValueError, KeyError):
                continue
        assert {r["metric"]["name"] for r in found} >= {f"web-{i}" for i in range(6)}, found
    finally:
        if prom is not None:
            stop(prom)
        stop(up, signal.SIGINT)
    assert up.returncode == 130          # Ctrl-C: "interrupted; everything was torn down"
