"""Shared pieces of the Services tests: what every kube-proxy mode must do end to end
(:data:`KUBE_PROXY_E2E`), the modes a test runs in, backends that say who answered, teardown
checks. A kube-proxy mode without an entry here fails the collection of those tests."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import pytest

from k8snetlab import proc
from k8snetlab.services.proxy import PROXIERS
from leftover_check import Footprint


@dataclass(frozen=True)
class Expect:
    """What a kube-proxy mode does that the e2e tests check."""
    damage: tuple[str, ...]              # a command that deletes the mode's rules by hand
    rules: tuple[str, ...]               # a command that shows the mode's rules
    keeps_pod_source: bool = True        # a backend sees the client pod's IP (no SNAT for pods)
    keeps_external_source: bool = True   # externalTrafficPolicy: Local keeps the client's address
    underlay: str = "linuxbridge"        # the underlay switch the mode serves
    tested_in: str = "test_services_e2e.py, test_dns.py, test_loadbalancer.py"


KUBE_PROXY_E2E: dict[str, Expect] = {
    "iptables": Expect(damage=("iptables", "-t", "nat", "-F", "KUBE-SERVICES"),
                       rules=("iptables-save", "-t", "nat")),
    "nftables": Expect(damage=("nft", "delete", "table", "ip", "kube-proxy"),
                       rules=("nft", "list", "table", "ip", "kube-proxy")),
    # a proxy process: the backend sees the node, never the client (kube-proxy never offered
    # Local source preservation in this mode)
    "userspace": Expect(keeps_pod_source=False, keeps_external_source=False,
                        damage=("iptables", "-t", "nat", "-F", "KUBE-PORTALS-CONTAINER"),
                        rules=("iptables-save", "-t", "nat")),
    # needs a kernel with IPVS; refused at load time here
    "ipvs": Expect(damage=("ipvsadm", "--clear"), rules=("ipvsadm", "--list", "--numeric")),
    # the OVS switch is the proxy: flows on the underlay, not rules on the nodes
    "openflow": Expect(damage=("ovs-ofctl", "del-flows", "-O", "OpenFlow13"),
                       rules=("ovs-ofctl", "dump-flows", "-O", "OpenFlow13"),
                       underlay="ovs", tested_in="test_ovs_service_lb.py"),
}


def expect(mode: str) -> Expect:
    try:
        return KUBE_PROXY_E2E[mode]
    except KeyError:
        raise AssertionError(f"kube-proxy mode {mode!r} states no e2e expectations: add it to "
                             "KUBE_PROXY_E2E in tests/integration/services_helpers.py") from None


def kube_proxy_modes(underlay: str = "linuxbridge") -> list:
    """Every registered kube-proxy mode as a test parameter: those serving ``underlay`` run (a
    cluster file they cannot serve then fails the test), the others skip saying why."""
    params = []
    for mode in PROXIERS.names():
        e = expect(mode)
        why = PROXIERS.get(mode).unavailable()
        if e.underlay != underlay:
            mark = [pytest.mark.skip(reason=f"kube-proxy {mode} serves an {e.underlay} underlay: "
                                            f"tested in {e.tested_in}")]
        elif why is not None:
            mark = [pytest.mark.skip(reason=f"kube-proxy {mode} cannot run on this machine: {why}")]
        else:
            mark = []
        params.append(pytest.param(mode, marks=mark, id=mode))
    return params


def runnable_modes(underlay: str = "linuxbridge") -> list[str]:
    """The modes of :func:`kube_proxy_modes` that run here."""
    return [p.values[0] for p in kube_proxy_modes(underlay) if not p.marks]


# each backend answers every connection with "<its own address> <the peer address it sees>"
WHO = ("import socket\n"
       "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
       "s.bind(('0.0.0.0', 8080)); s.listen(128)\n"
       "while True:\n"
       "    c, a = s.accept()\n"
       "    c.sendall(f'{c.getsockname()[0]} {a[0]}\\n'.encode()); c.close()\n")

# N connections from one process; one line per answer ("ERR ..." for a failure)
ASK = ("import socket, sys\n"
       "ip, port, n, t = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])\n"
       "for _ in range(n):\n"
       "    try:\n"
       "        c = socket.create_connection((ip, port), t); print(c.makefile().readline().strip()); c.close()\n"
       "    except OSError as e:\n"
       "        print('ERR', e)\n")


def ask(host, ip: str, port: int, n: int, timeout: float = 3) -> list[str]:
    """``n`` connections from ``host`` to ip:port, each bounded by ``timeout`` seconds."""
    return host.run([sys.executable, "-c", ASK, ip, str(port), str(n), str(timeout)],
                    timeout=60).stdout.splitlines()


def stop_and_check(c) -> None:
    """Stop the cluster (if it still runs); nothing of it may be left: no proxy process, no
    state, no link (other clusters, e.g. of tests running beside us, are not ours to judge)."""
    if c.state is None or c.services is None:    # never started, or stopped (and checked) already
        return
    footprint = Footprint(c)
    procs = [getattr(p, "process", None) for p in c.services.proxiers.values()]
    pids = [(p.pid, proc.start_time(p.pid)) for p in procs if p is not None]
    c.stop()
    left = footprint.problems() + [f"proxy pid {pid}" for pid, start in pids if proc.running(pid, start)]
    assert not left, left
