"""kube-proxy ``userspace`` mode: iptables sends Service traffic to a proxy process on the node.

The oldest kube-proxy mode, the one the classic walk-throughs trace: a proxy process per node
(:mod:`.portal_proxy`) accepts each connection and opens a second one to a backend pod,
so the backend sees the node, never the client. The rules and what differs from the other
modes are described at :class:`UserspaceProxier`.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .. import proc
from ..errors import K8sNetLabError
from .model import Snapshot
from .proxy import Proxier

if TYPE_CHECKING:  # pragma: no cover
    from ..cluster_view import ClusterView
    from ..pod import NodeHost
    from .model import KubeProxyOptions

log = logging.getLogger(__name__)

PROXY_PROGRAM = Path(__file__).with_name("portal_proxy.py")
START_TIMEOUT_S = 10.0         # bound on the proxy process coming up
CONTROL_TIMEOUT_S = 60.0       # bound on one apply (opening thousands of sockets takes a moment)
UDP_TIMEOUT_S = 0.25           # kube-proxy's --udp-timeout default

PORTALS_CONTAINER = "KUBE-PORTALS-CONTAINER"
PORTALS_HOST = "KUBE-PORTALS-HOST"
NODEPORT_CONTAINER = "KUBE-NODEPORT-CONTAINER"
NODEPORT_HOST = "KUBE-NODEPORT-HOST"
CHAINS = (PORTALS_CONTAINER, PORTALS_HOST, NODEPORT_CONTAINER, NODEPORT_HOST)

_PORTALS_COMMENT = "handle ClusterIPs; NOTE: this must be before the NodePort rules"
_NODEPORTS_COMMENT = "handle service NodePorts; NOTE: this must be the last rule in the chain"
# chain -> (built-in chain, how the jump is added, the jump's match): kube-proxy's iptablesInit
JUMPS: dict[str, tuple[str, str, str]] = {
    PORTALS_CONTAINER: ("PREROUTING", "-I PREROUTING 1", f'-m comment --comment "{_PORTALS_COMMENT}"'),
    PORTALS_HOST: ("OUTPUT", "-I OUTPUT 1", f'-m comment --comment "{_PORTALS_COMMENT}"'),
    NODEPORT_CONTAINER: ("PREROUTING", "-A PREROUTING",
                         f'-m addrtype --dst-type LOCAL -m comment --comment "{_NODEPORTS_COMMENT}"'),
    NODEPORT_HOST: ("OUTPUT", "-A OUTPUT",
                    f'-m addrtype --dst-type LOCAL -m comment --comment "{_NODEPORTS_COMMENT}"'),
}


# ---------------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class Portal:
    """What the node's proxy serves for one Service port: a proxy port and its backends."""
    id: str                                   # "ns/name:port/TCP" (kube-proxy's ServicePortName + protocol)
    protocol: str
    endpoints: tuple[tuple[str, int], ...]
    affinity: str = "None"
    affinity_timeout: int = 10800

    def to_json(self) -> dict:
        return {"id": self.id, "protocol": self.protocol, "endpoints": [list(e) for e in self.endpoints],
                "affinity": self.affinity, "affinity_timeout": self.affinity_timeout}


@dataclass(frozen=True)
class FrontDoor:
    """One address and port that leads to a portal: a ClusterIP (or LB IP) portal, or a nodePort."""
    portal: str                   # Portal.id
    comment: str                  # "ns/name:port", as kube-proxy's rule comments
    protocol: str
    dport: int
    dst: str | None = None        # None: a nodePort (any local address)


def plan(snap: Snapshot, node: str) -> tuple[list[Portal], list[FrontDoor]]:
    """The portals and front doors of one node for a snapshot (pure: unit-tested)."""
    portals: list[Portal] = []
    doors: list[FrontDoor] = []
    for svc in snap.services:
        if not svc.cluster_ip:            # headless (None) or not allocated: nothing to proxy
            continue
        for port in svc.ports:
            pid = f"{svc.port_name(port)}/{port.protocol}"
            eps = [(e, p) for e, p in snap.port_endpoints(svc, port)]
            all_eps = tuple(sorted((e.ip, p) for e, p in eps))
            portals.append(Portal(pid, port.protocol, all_eps, svc.session_affinity, svc.affinity_timeout))
            comment = svc.port_name(port)
            doors.append(FrontDoor(pid, comment, port.protocol, port.port, svc.cluster_ip))
            if svc.load_balancer_ip:
                doors.append(FrontDoor(pid, comment, port.protocol, port.port, svc.load_balancer_ip))
            if port.node_port is not None:
                target = pid
                if svc.external_traffic_policy == "Local":
                    target = f"{pid}@local"
                    local = tuple(sorted((e.ip, p) for e, p in eps if e.node == node))
                    portals.append(Portal(target, port.protocol, local, svc.session_affinity,
                                          svc.affinity_timeout))
                doors.append(FrontDoor(target, comment, port.protocol, port.node_port))
    return portals, doors


def render_rules(doors: list[FrontDoor], ports: dict[str, int], node_ip: str, redirect: bool = True,
                 jumps: list[str] = ()) -> str:
    """One ``iptables-restore --noflush`` batch: the four chains declared (hence flushed) and
    filled, in the format ``iptables-save`` prints, plus the ``jumps`` from the built-in
    chains that are missing (see :func:`missing_jumps`)."""
    lines = ["*nat", *(f":{c} - [0:0]" for c in CHAINS), *jumps]
    for d in doors:
        port = ports.get(d.portal)
        if port is None:
            raise K8sNetLabError(f"userspace proxy reported no port for {d.portal}")
        p = d.protocol.lower()
        dst = f"-d {d.dst}/32 " if d.dst else ""
        match = f'{dst}-p {p} -m comment --comment "{d.comment}" -m {p} --dport {d.dport}'
        to_node = f"-j DNAT --to-destination {node_ip}:{port}"
        from_pods = f"-j REDIRECT --to-ports {port}" if redirect else to_node
        container, host = (PORTALS_CONTAINER, PORTALS_HOST) if d.dst else (NODEPORT_CONTAINER, NODEPORT_HOST)
        lines.append(f"-A {container} {match} {from_pods}")
        lines.append(f"-A {host} {match} {to_node}")
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def missing_jumps(saved_nat: str) -> list[str]:
    """The jump rules (restore lines) missing from a listing of the nat table's built-in
    chains (``iptables -S`` or ``iptables-save`` format)."""
    have = set()
    for line in saved_nat.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[0] == "-A" and parts[-2] == "-j":
            have.add((parts[1], parts[-1]))
    return [f"{how} {match} -j {chain}" for chain, (builtin, how, match) in JUMPS.items()
            if (builtin, chain) not in have]


# ---------------------------------------------------------------------------------- the proxier
class UserspaceProxier(Proxier):
    """kube-proxy ``--proxy-mode=userspace`` on one node.

    The oldest kube-proxy mode, and the one the classic Kubernetes networking walk-throughs
    trace. Per node:

    - one proxy process (:mod:`.portal_proxy`, started in the node's namespace, its PID
      recorded) holds, for every Service port, a listening socket on a port the kernel picked at
      random. For each connection it accepts it opens a second TCP connection to a backend pod,
      round robin (``sessionAffinity: ClientIP`` honoured), and copies bytes both ways; UDP is
      relayed per client with an idle timeout. So a capture shows two connections: client pod ->
      Service IP inside the pod, node IP -> backend pod IP on the wire. The backend sees the node's
      address (or the node's bridge address for a backend on the same node), never the client's.
    - iptables in the node's ``nat`` table, in kube-proxy's own chains:

      ``KUBE-PORTALS-CONTAINER`` (first in ``PREROUTING``: traffic from pods)
          ``-d <clusterIP>/32 -p tcp --dport <port> -j REDIRECT --to-ports <proxyPort>``
      ``KUBE-PORTALS-HOST`` (first in ``OUTPUT``: traffic from the node itself)
          ``-d <clusterIP>/32 -p tcp --dport <port> -j DNAT --to-destination <nodeIP>:<proxyPort>``
      ``KUBE-NODEPORT-CONTAINER`` / ``KUBE-NODEPORT-HOST`` (last, ``-m addrtype --dst-type LOCAL``)
          the same for ``--dport <nodePort>``.

      A LoadBalancer Service's external IP gets portal rules too, as kube-proxy did for its
      ingress IPs, so pods reaching it are served on their own node.

    ``REDIRECT`` rewrites the destination to the first address of the interface the packet came
    in on: ``cni0``'s gateway address in the bridge layouts. Calico's ``cali*`` veths carry no
    address, and the kernel drops what it cannot redirect, so in the Calico layout the container
    rules ``DNAT`` to ``<nodeIP>:<proxyPort>`` instead (what kube-proxy did when bound to an
    address with ``--bind-address``).

    ``externalTrafficPolicy: Local``: the proxy cannot keep the client's source address (it makes
    a new connection; real kube-proxy never offered Local in this mode). What *can* be honoured is
    the other half: a Local Service's nodePort is served by a second portal holding only the
    node's own endpoints, so a node without one refuses, and a load balancer's health check view
    (only nodes with endpoints) stays true.

    ``sync(snap)`` sends the whole desired portal list to the proxy over its control socket (it
    answers with the proxy ports) and rewrites the four chains in one ``iptables-restore
    --noflush`` batch; the jumps from ``PREROUTING``/``OUTPUT`` are re-added if someone removed
    them, so a periodic sync repairs hand-made damage as kube-proxy's resync does.
    """

    mode = "userspace"
    tools = ("iptables", "iptables-save", "iptables-restore")

    def __init__(self, cluster: "ClusterView", node: "NodeHost", options: "KubeProxyOptions"):
        super().__init__(cluster, node, options)
        self.dir = Path(node.state_dir or ".") / "kube-proxy"
        self.control = self.dir / "control.sock"
        self.log_path = self.dir / "userspace-proxy.log"
        self.process: subprocess.Popen | None = None
        self.ports: dict[str, int] = {}             # portal id -> proxy port, as last reported
        self.redirect = _redirect_works(cluster, node)
        self._udp_doors: dict[str, list[FrontDoor]] = {}
        self._lock = threading.Lock()

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._start_process()

    def _start_process(self) -> None:
        try:
            self.control.unlink()
        except FileNotFoundError:
            pass
        self.process = self.node.popen_ns([sys.executable, str(PROXY_PROGRAM), "--control", str(self.control),
                                           "--node-pid", str(self.node.pid)],
                                          log_path=self.log_path, what=f"kube-proxy userspace on {self.node.name}")
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.control.exists():
            if self.process.poll() is not None:
                raise K8sNetLabError(f"kube-proxy (userspace) on {self.node.name} exited "
                                     f"(status {self.process.returncode}); see {self.log_path}")
            if time.monotonic() > deadline:
                raise K8sNetLabError(f"kube-proxy (userspace) on {self.node.name} did not open its control "
                                     f"socket within {START_TIMEOUT_S:.0f} s; see {self.log_path}")
            time.sleep(0.01)
        log.info("%s: userspace proxy pid %d", self.node.name, self.process.pid)
        self.ports = {}

    def stop(self) -> None:
        with self._lock:
            try:
                if os.path.exists(self.node.netns):
                    self._remove_rules()
            finally:
                self._stop_process()
                super().stop()

    def _stop_process(self) -> None:
        p, self.process = self.process, None
        if p is not None:
            proc.end_child(p, grace=3)
        try:
            self.control.unlink()
        except FileNotFoundError:
            pass

    def _remove_rules(self) -> None:
        saved = self.node.run(["iptables-save", "-t", "nat"]).stdout
        present = {c for c in CHAINS if f":{c} " in saved}
        lines = ["*nat"]
        for line in saved.splitlines():
            parts = line.split()
            if len(parts) >= 4 and parts[0] == "-A" and parts[1] in ("PREROUTING", "OUTPUT") \
                    and parts[-2] == "-j" and parts[-1] in CHAINS:
                lines.append("-D" + line[2:])
        lines += [f":{c} - [0:0]" for c in present] + [f"-X {c}" for c in present] + ["COMMIT"]
        self.node.run(["iptables-restore", "--noflush", "-w"], input="\n".join(lines) + "\n")

    # -- sync ------------------------------------------------------------------------------
    def sync(self, snap: Snapshot) -> None:
        with self._lock:
            portals, doors = plan(snap, self.node.name)
            if self.process is None or self.process.poll() is not None:
                if self.process is not None:
                    log.warning("%s: userspace proxy died (status %s); restarting it (see %s)",
                                self.node.name, self.process.returncode, self.log_path)
                self._start_process()
            ports = self._apply(portals)
            self._flush_moved_udp(doors, ports)
            jumps = missing_jumps(self._builtin_rules())
            text = render_rules(doors, ports, self.node.ip, self.redirect, jumps)
            self.node.run(["iptables-restore", "--noflush", "-w"], input=text)
            self.ports = ports
            self.last = snap

    def _builtin_rules(self) -> str:
        """``iptables -S`` of PREROUTING and OUTPUT: where our jumps live (listing two chains
        is cheap; ``iptables-save`` of thousands of portal rules is not)."""
        return "".join(self.node.run(["iptables", "-w", "-t", "nat", "-S", chain]).stdout
                       for chain in ("PREROUTING", "OUTPUT"))

    def _apply(self, portals: list[Portal]) -> dict[str, int]:
        answer = self.request({"op": "apply", "portals": [p.to_json() for p in portals],
                               "udp_timeout": UDP_TIMEOUT_S})
        return {k: int(v) for k, v in answer["ports"].items()}

    def request(self, req: dict) -> dict:
        """One request to the node's proxy over its control socket (also: ``{"op": "stats"}``)."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(CONTROL_TIMEOUT_S)
                s.connect(str(self.control))
                s.sendall((json.dumps(req) + "\n").encode())
                buf = b""
                while not buf.endswith(b"\n"):
                    chunk = s.recv(1 << 16)
                    if not chunk:
                        break
                    buf += chunk
        except OSError as e:
            raise K8sNetLabError(f"kube-proxy (userspace) on {self.node.name}: control socket {self.control}: "
                                 f"{e}; see {self.log_path}") from None
        try:
            answer = json.loads(buf)
        except ValueError:
            raise K8sNetLabError(f"kube-proxy (userspace) on {self.node.name} gave no answer "
                                 f"({self._log_tail()}); see {self.log_path}") from None
        if not answer.get("ok"):
            raise K8sNetLabError(f"kube-proxy (userspace) on {self.node.name}: {answer.get('error')}")
        return answer

    def _log_tail(self) -> str:
        """The proxy's state for an error message: exit status if it died, its last log line."""
        status = ""
        if self.process is not None and self.process.poll() is not None:
            status = f"exited with status {self.process.returncode}; "
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return status + "no log"
        return status + (lines[-1] if lines else "empty log")

    def stats(self) -> dict[str, dict]:
        """Per portal: its proxy port, endpoints, and how many connections went to each."""
        with self._lock:
            return self.request({"op": "stats"})["portals"]

    def _flush_moved_udp(self, doors: list[FrontDoor], ports: dict[str, int]) -> None:
        """A UDP portal whose proxy port changed (the proxy was restarted): its clients'
        conntrack entries still REDIRECT to the old port and, refreshed by every datagram,
        would never expire. Delete them, as kube-proxy deletes stale UDP entries."""
        for d in doors:
            if d.protocol != "UDP":
                continue
            old = self.ports.get(d.portal)
            if old is None or old == ports.get(d.portal):
                continue
            flt = ("--orig-dst", d.dst, "--orig-port-dst", str(d.dport)) if d.dst \
                else ("--orig-port-dst", str(d.dport))
            self.delete_udp_flows(flt)


def _redirect_works(cluster: "ClusterView", node: "NodeHost") -> bool:
    """False in the Calico layout: pods sit behind address-less ``cali*`` veths, where
    ``REDIRECT`` has no address to redirect to (see :class:`UserspaceProxier`)."""
    try:
        plugins = cluster.mode.plugin_configs(node)
    except Exception:  # a mode without a plugin list: assume a bridge with a gateway address
        return True
    return not any(p.get("type") == "calico" for p in plugins)
