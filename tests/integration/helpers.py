"""Shared pieces of the emulation tests: skip reasons, a TCP peer-address probe, captures."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

REPO = Path(__file__).resolve().parents[2]
THREE_NODES = REPO / "topologies" / "three_nodes.yaml"


def wait_for(fn, timeout: float = 10.0, every: float = 0.2) -> Any:
    """Poll ``fn`` until it returns something truthy or ``timeout`` seconds passed (bounded);
    return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(every)


def kernel_has_ipip() -> bool:
    """Whether this kernel can create an ipip device (asked in a throwaway namespace)."""
    r = subprocess.run(["unshare", "--net", "ip", "link", "add", "probe", "type", "ipip"],
                       capture_output=True, text=True)
    return r.returncode == 0


def require_root_and(*tools: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("emulation tests need root (network namespaces): run 'sudo make test'")
    for t in tools:
        if shutil.which(t) is None and shutil.which(t, path="/usr/sbin:/sbin") is None:
            pytest.skip(f"{t} is not installed ('sudo make deps' installs it)")


# A one-connection TCP server that writes the peer's address to a file, then exits.
PEER_SERVER = (
    "import socket,sys\n"
    "s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1)\n"
    "c,a=s.accept(); data=c.recv(100)\n"
    "open(sys.argv[3],'w').write(a[0]+' '+data.decode())\n"
)


def seen_source(server, client, server_ip: str, tmp: Path, port: int = 7070) -> str:
    """Connect from ``client`` to ``server_ip`` served in ``server``; return what the server saw."""
    out = tmp / f"seen-{server.name}-{port}"
    out.unlink(missing_ok=True)
    srv = server.popen_ns([sys.executable, "-c", PEER_SERVER, "0.0.0.0", str(port), str(out)])
    try:
        deadline = time.monotonic() + 5
        while True:
            r = client.run([sys.executable, "-c",
                            f"import socket; c=socket.create_connection(('{server_ip}', {port}), 2); c.sendall(b'hi')"],
                           check=False)
            if r.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        srv.wait(5)
    finally:
        if srv.poll() is None:
            srv.kill()
            srv.wait()
    return out.read_text().split()[0]


def capture(host, ifname: str, pcap: Path, action, bpf_filter: str = "", count: int = 10, timeout: float = 10):
    """Capture on ``ifname`` inside ``host``'s namespace while ``action()`` runs; return scapy packets."""
    from scapy.all import rdpcap
    args = ["tcpdump", "-i", ifname, "-n", "-U", "--immediate-mode", "-c", str(count), "-w", str(pcap)]
    if bpf_filter:
        args.append(bpf_filter)
    p = host.popen_ns(args)
    try:
        time.sleep(0.5)   # tcpdump has no readiness signal; it prints to stderr which we drop
        action()
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        p.terminate()
        p.wait(5)
    return list(rdpcap(str(pcap)))


def clean_cli() -> subprocess.CompletedProcess:
    """``k8snetlab clean`` as a user runs it (after a ``kill -9`` of a runtime)."""
    return subprocess.run([sys.executable, "-m", "k8snetlab.cli", "clean"], cwd=REPO, capture_output=True,
                          text=True, timeout=60)


@contextlib.contextmanager
def up_then_kill_9(*args: str, timeout: float = 60, **popen_kw: Any) -> Iterator[Path]:
    """``k8snetlab up ARGS`` as a user runs it: yields its state directory once the cluster is
    up, then kills the runtime with SIGKILL, which leaves everything for ``clean`` to find."""
    p = subprocess.Popen([sys.executable, "-m", "k8snetlab.cli", "up", *args], cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen_kw)
    try:
        state = None
        deadline = time.monotonic() + timeout
        assert p.stdout is not None
        for line in p.stdout:          # bounded: the runtime exits (EOF) if it fails
            if line.startswith("up in"):
                state = Path(line.rsplit("state in", 1)[1].strip())
                break
            if time.monotonic() > deadline:
                break
        assert state, "the cluster did not come up"
        yield state
        os.kill(p.pid, signal.SIGKILL)
        p.wait(10)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
