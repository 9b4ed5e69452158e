#!/usr/bin/env python3
"""The node's proxy process of kube-proxy's ``userspace`` mode (one per node).

Standard library only, run by path (not as a module), so it starts fast and imports nothing
of the testbed. What it does per connection and its control protocol: :class:`Proxy`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import resource
import signal
import socket
import struct
import sys
import time
from dataclasses import dataclass, field

log = logging.getLogger("kube-proxy-userspace")

CONNECT_TIMEOUT_S = 1.0        # per backend try; another endpoint is tried after a failure
BACKLOG = 1024
UDP_TIMEOUT_S = 0.25           # kube-proxy's --udp-timeout default
UDP_BUFSIZE = 65535
WANT_NOFILE = 65536
CONTROL_LIMIT = 256 << 20      # longest control request (bytes)            # kube-proxy raised RLIMIT_NOFILE too: one socket per Service port
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
_PKTINFO = struct.Struct("=I4s4s")      # struct in_pktinfo: ifindex, spec_dst, addr

Endpoint = tuple[str, int]


@dataclass
class Balancer:
    """Round robin over a portal's endpoints, with optional ClientIP affinity (kube-proxy's
    ``LoadBalancerRR``): an affine client keeps its endpoint while it is still listed and
    was used within ``affinity_timeout`` seconds. The stats list endpoints in rotation order."""

    endpoints: list[Endpoint] = field(default_factory=list)
    affinity: bool = False
    affinity_timeout: float = 10800.0
    index: int = 0
    sticky: dict[str, tuple[Endpoint, float]] = field(default_factory=dict)

    def update(self, endpoints: list[Endpoint], affinity: bool, timeout: float) -> None:
        if set(endpoints) != set(self.endpoints):
            # as kube-proxy: a new endpoint set is shuffled and the rotation restarts, so the
            # proxies of different nodes do not all send their first client to the same pod
            self.endpoints = random.sample(endpoints, len(endpoints))
            self.index = 0
        self.affinity, self.affinity_timeout = affinity, timeout
        live = set(self.endpoints)
        self.sticky = {c: v for c, v in self.sticky.items() if affinity and v[0] in live}

    def pick(self, client_ip: str, exclude: set[Endpoint] = frozenset()) -> Endpoint | None:
        now = time.monotonic()
        if self.affinity:
            rec = self.sticky.get(client_ip)
            if rec and rec[0] not in exclude and rec[0] in self.endpoints \
                    and now - rec[1] < self.affinity_timeout:
                self.sticky[client_ip] = (rec[0], now)
                return rec[0]
        for _ in range(len(self.endpoints)):
            ep = self.endpoints[self.index % len(self.endpoints)]
            self.index = (self.index + 1) % len(self.endpoints)
            if ep not in exclude:
                if self.affinity:
                    self.sticky[client_ip] = (ep, now)
                return ep
        return None

    def forget(self, client_ip: str) -> None:
        self.sticky.pop(client_ip, None)


# ---------------------------------------------------------------------------------- TCP
class _Half(asyncio.Protocol):
    """One side of a proxied TCP connection; bytes read are written to the other side.
    Flow control: when the other side's send buffer fills, this side stops reading."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: "_Half | None" = None
        self.eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        # read nothing before the other side is linked (see _Inbound._connect): a backend that
        # answers at once would otherwise have its first bytes and its FIN dropped
        transport.pause_reading()  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer
        if peer is not None and peer.transport is not None and peer.transport.can_write_eof():
            peer.transport.write_eof()
        if peer is not None and peer.eof:
            self._close_both()
        return True     # keep our sending direction open (half-close)

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self._close_both()

    def _close_both(self) -> None:
        for half in (self, self.peer):
            if half is not None and half.transport is not None and not half.transport.is_closing():
                half.transport.close()


class _Inbound(_Half):
    """The client's connection, accepted on the proxy port: connect a backend, then pipe."""

    def __init__(self, portal: "TcpPortal") -> None:
        super().__init__()
        self.portal = portal

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        assert self.transport is not None
        client_ip = self.transport.get_extra_info("peername")[0]
        loop = asyncio.get_running_loop()
        tried: set[Endpoint] = set()
        while not self.transport.is_closing():
            ep = self.portal.balancer.pick(client_ip, tried)
            if ep is None:
                break
            tried.add(ep)
            out = _Half()
            try:
                await asyncio.wait_for(loop.create_connection(lambda: out, ep[0], ep[1]),
                                       CONNECT_TIMEOUT_S)
            except (OSError, asyncio.TimeoutError) as e:
                log.info("%s: backend %s:%d failed (%s); trying another", self.portal.id, ep[0], ep[1],
                         e.__class__.__name__)
                self.portal.balancer.forget(client_ip)
                continue
            self.portal.count(ep)
            if self.transport.is_closing():     # the client gave up meanwhile
                if out.transport is not None:
                    out.transport.close()
                return
            self.peer, out.peer = out, self
            self.transport.resume_reading()
            assert out.transport is not None
            out.transport.resume_reading()
            return
        log.info("%s: no backend reachable for %s: closing", self.portal.id, client_ip)
        self.transport.abort()


class Portal:
    """One Service port on this node: a proxy port and its endpoints."""

    protocol = ""

    def __init__(self, pid: str) -> None:
        self.id = pid
        self.balancer = Balancer()
        self.port = 0
        self.served: dict[str, int] = {}

    def count(self, ep: Endpoint) -> None:
        key = f"{ep[0]}:{ep[1]}"
        self.served[key] = self.served.get(key, 0) + 1

    async def update(self, endpoints: list[Endpoint], affinity: bool, timeout: float) -> None:
        self.balancer.update(endpoints, affinity, timeout)

    def close(self) -> None:
        raise NotImplementedError


def _bound_socket(kind: int, port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, kind)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setblocking(False)
    try:
        s.bind(("0.0.0.0", port))
    except OSError:
        s.close()
        raise
    return s


class TcpPortal(Portal):
    """Listens only while there are endpoints; otherwise the port is bound, not listening,
    so a SYN is answered with a reset (connection refused)."""

    protocol = "TCP"

    def __init__(self, pid: str) -> None:
        super().__init__(pid)
        self.sock: socket.socket | None = _bound_socket(socket.SOCK_STREAM, 0)
        self.port = self.sock.getsockname()[1]
        self.server: asyncio.AbstractServer | None = None

    async def update(self, endpoints: list[Endpoint], affinity: bool, timeout: float) -> None:
        await super().update(endpoints, affinity, timeout)
        loop = asyncio.get_running_loop()
        if endpoints and self.server is None:
            assert self.sock is not None
            sock, self.sock = self.sock, None
            self.server = await loop.create_server(lambda: _Inbound(self), sock=sock, backlog=BACKLOG)
        elif not endpoints and self.server is not None:
            self.server.close()         # established connections go on; new SYNs get a reset
            self.server = None
            try:
                self.sock = _bound_socket(socket.SOCK_STREAM, self.port)
            except OSError:             # taken meanwhile: another random port (the rules follow)
                self.sock = _bound_socket(socket.SOCK_STREAM, 0)
                self.port = self.sock.getsockname()[1]

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        if self.sock is not None:
            self.sock.close()


# ---------------------------------------------------------------------------------- UDP
@dataclass
class _Session:
    sock: socket.socket
    endpoint: Endpoint
    client: tuple[str, int]
    local: bytes                 # the address the client's datagrams arrived at (4 bytes)
    last: float


class UdpPortal(Portal):
    """Per-client sessions: datagrams of one client address go to one backend through one
    connected socket; replies go back from the address the client's datagrams were delivered
    to (IP_PKTINFO), so that the node's conntrack can undo the REDIRECT/DNAT."""

    protocol = "UDP"

    def __init__(self, pid: str) -> None:
        super().__init__(pid)
        self.sock = _bound_socket(socket.SOCK_DGRAM, 0)
        self.sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        self.port = self.sock.getsockname()[1]
        self.sessions: dict[tuple[str, int], _Session] = {}
        self.timeout = UDP_TIMEOUT_S
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(self.sock.fileno(), self._from_clients)

    async def update(self, endpoints: list[Endpoint], affinity: bool, timeout: float) -> None:
        await super().update(endpoints, affinity, timeout)
        live = set(endpoints)
        for key, s in list(self.sessions.items()):
            if s.endpoint not in live:
                self._end(key)

    def _from_clients(self) -> None:
        for _ in range(64):    # bounded batch, then let the loop breathe
            try:
                data, anc, _flags, client = self.sock.recvmsg(UDP_BUFSIZE, socket.CMSG_SPACE(_PKTINFO.size))
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.debug("%s: recvmsg: %s", self.id, e)
                return
            local = b"\0\0\0\0"
            for level, kind, payload in anc:
                if level == socket.IPPROTO_IP and kind == IP_PKTINFO:
                    local = _PKTINFO.unpack(payload[:_PKTINFO.size])[2]
            self._forward(data, client, local)

    def _forward(self, data: bytes, client: tuple[str, int], local: bytes) -> None:
        s = self.sessions.get(client)
        if s is None:
            ep = self.balancer.pick(client[0])
            if ep is None:
                return              # no endpoints: dropped, as kube-proxy did
            out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            out.setblocking(False)
            try:
                out.connect(ep)
            except OSError as e:
                log.info("%s: backend %s:%d: %s", self.id, ep[0], ep[1], e)
                out.close()
                return
            s = _Session(out, ep, client, local, time.monotonic())
            self.sessions[client] = s
            self.count(ep)
            self.loop.add_reader(out.fileno(), self._from_backend, client)
        s.last = time.monotonic()
        try:
            s.sock.send(data)
        except OSError as e:      # e.g. ECONNREFUSED reported for an earlier datagram
            log.info("%s: send to %s:%d: %s", self.id, s.endpoint[0], s.endpoint[1], e)
            self._end(client)
            self.balancer.forget(client[0])

    def _from_backend(self, client: tuple[str, int]) -> None:
        s = self.sessions.get(client)
        if s is None:
            return
        for _ in range(64):
            try:
                data = s.sock.recv(UDP_BUFSIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:      # the backend is gone (ICMP port unreachable)
                log.info("%s: backend %s:%d: %s", self.id, s.endpoint[0], s.endpoint[1], e)
                self._end(client)
                self.balancer.forget(client[0])
                return
            s.last = time.monotonic()
            try:
                self.sock.sendmsg([data], [(socket.IPPROTO_IP, IP_PKTINFO, _PKTINFO.pack(0, s.local, b"\0" * 4))],
                                  0, client)
            except OSError as e:
                log.debug("%s: reply to %s: %s", self.id, client, e)

    def _end(self, client: tuple[str, int]) -> None:
        s = self.sessions.pop(client, None)
        if s is not None:
            self.loop.remove_reader(s.sock.fileno())
            s.sock.close()

    def expire(self, now: float) -> None:
        for key, s in list(self.sessions.items()):
            if now - s.last > self.timeout:
                self._end(key)

    def close(self) -> None:
        for key in list(self.sessions):
            self._end(key)
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()


# ---------------------------------------------------------------------------------- control
class Proxy:
    """The proxy: its portals, and the control socket that drives it.

    This is the program the classic Kubernetes networking walk-throughs trace with tcpdump: for
    every Service port it holds a listening socket on a port the kernel picked at random, and
    iptables in the node (``KUBE-PORTALS-CONTAINER``: ``REDIRECT``, ``KUBE-PORTALS-HOST``:
    ``DNAT``, see :mod:`k8snetlab.services.userspace`) sends Service traffic there. For each
    accepted connection it opens a *second* TCP connection to a backend pod, chosen round robin
    (``sessionAffinity: ClientIP`` keeps a client on one backend), and copies bytes both ways.
    So two connections exist: client pod -> Service IP (the pod's view; the node's conntrack
    turns it into client pod -> node:proxyPort), and node IP -> backend pod IP on the wire. UDP
    is proxied per client (one socket to the backend per client address and port), with an idle
    timeout, as kube-proxy did.

    A portal without endpoints keeps its port *bound but not listening*: a SYN gets a reset,
    so clients see "connection refused" at once (as with kube-proxy's REJECT rules) and the
    random port stays ours.

    It is a plain asyncio program using only the standard library, run by path (not as a
    module) so that it starts fast and imports nothing of the testbed. The runtime drives it
    over a Unix control socket, one JSON object per line, one answer per request:

        {"op": "apply", "portals": [<portal>...], "udp_timeout": 0.25}
            -> {"ok": true, "ports": {"<portal id>": <proxy port>, ...}}
        {"op": "stats"} -> {"ok": true, "portals": {"<id>": {"port": ..., "connections": {...}}}}

        <portal> = {"id": "default/web:http/TCP", "protocol": "TCP" | "UDP",
                    "endpoints": [["10.244.1.2", 8080], ...],
                    "affinity": "None" | "ClientIP", "affinity_timeout": 10800}

    ``apply`` carries the whole desired state: portals it does not name are closed; existing
    ones keep their port; UDP sessions and affinity entries of removed endpoints are dropped (the
    userspace counterpart of flushing stale conntrack entries). SIGTERM stops it, and so does the
    end of the node (``--node-pid``: the process holding the node's namespace).

        python3 portal_proxy.py --control /run/k8snetlab/knl1/nodes/node1/kube-proxy/control.sock         --node-pid 4242
    """
    def __init__(self) -> None:
        self.portals: dict[str, Portal] = {}
        self.udp_timeout = UDP_TIMEOUT_S

    async def apply(self, portals: list[dict], udp_timeout: float | None = None) -> dict[str, int]:
        if udp_timeout is not None:
            self.udp_timeout = float(udp_timeout)
        want = {p["id"]: p for p in portals}
        for pid in [p for p in self.portals if p not in want]:
            self.portals.pop(pid).close()
            log.info("closed portal %s", pid)
        for pid, p in want.items():
            portal = self.portals.get(pid)
            if portal is not None and portal.protocol != p["protocol"]:
                self.portals.pop(pid).close()
                portal = None
            if portal is None:
                portal = TcpPortal(pid) if p["protocol"] == "TCP" else UdpPortal(pid)
                self.portals[pid] = portal
                log.info("opened portal %s on port %d", pid, portal.port)
            if isinstance(portal, UdpPortal):
                portal.timeout = self.udp_timeout
            eps = [(str(ip), int(port)) for ip, port in p.get("endpoints", [])]
            await portal.update(eps, p.get("affinity") == "ClientIP", float(p.get("affinity_timeout", 10800)))
        return {pid: portal.port for pid, portal in self.portals.items()}

    def stats(self) -> dict:
        return {pid: {"protocol": p.protocol, "port": p.port, "connections": dict(p.served),
                      "endpoints": [f"{ip}:{port}" for ip, port in p.balancer.endpoints]}
                for pid, p in self.portals.items()}

    async def expire_loop(self) -> None:
        while True:
            await asyncio.sleep(max(0.05, self.udp_timeout / 2))
            now = time.monotonic()
            for p in list(self.portals.values()):
                if isinstance(p, UdpPortal):
                    p.expire(now)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                try:
                    req = json.loads(line)
                    if req.get("op") == "apply":
                        ans = {"ok": True, "ports": await self.apply(req.get("portals", []), req.get("udp_timeout"))}
                    elif req.get("op") == "stats":
                        ans = {"ok": True, "portals": self.stats()}
                    else:
                        ans = {"ok": False, "error": f"unknown op {req.get('op')!r}"}
                except Exception as e:  # answer, never die: the runtime reports the error
                    log.exception("request failed")
                    ans = {"ok": False, "error": f"{e.__class__.__name__}: {e}"}
                writer.write((json.dumps(ans) + "\n").encode())
                await writer.drain()
        except asyncio.CancelledError:   # shutting down while the runtime is connected
            pass
        finally:
            writer.close()

    def close(self) -> None:
        for p in self.portals.values():
            p.close()
        self.portals.clear()


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = WANT_NOFILE if hard == resource.RLIM_INFINITY else min(WANT_NOFILE, hard)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


async def watch_node(pid: int, stop: asyncio.Event) -> None:
    """Stop when the process holding the node's namespace is gone (the node left the cluster):
    a kube-proxy lives and dies with its node."""
    try:
        fd = os.pidfd_open(pid)       # readable once that very process has ended
    except OSError:
        fd = None                     # gone already
    if fd is not None:
        gone = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_reader(fd, gone.set)
        try:
            await gone.wait()
        finally:
            loop.remove_reader(fd)
            os.close(fd)
    log.info("node process %d is gone: stopping", pid)
    stop.set()


async def serve(control: str, node_pid: int | None = None) -> None:
    proxy = Proxy()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if os.path.exists(control):
        os.unlink(control)
    # one request holds every portal of the node: thousands of Services make megabytes
    server = await asyncio.start_unix_server(proxy.handle, path=control, limit=CONTROL_LIMIT)
    expiry = loop.create_task(proxy.expire_loop())
    watch = loop.create_task(watch_node(node_pid, stop)) if node_pid else None
    log.info("userspace proxy ready, control socket %s", control)
    try:
        await stop.wait()
    finally:
        if watch is not None:
            watch.cancel()
        expiry.cancel()
        server.close()
        proxy.close()
        try:
            os.unlink(control)
        except OSError:
            pass
        log.info("userspace proxy stopped")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="kube-proxy userspace mode: the node's proxy process")
    p.add_argument("--control", required=True, help="Unix socket the runtime drives the proxy through")
    p.add_argument("--node-pid", type=int, help="exit when this process (the node's namespace holder) is gone")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(message)s")
    _raise_nofile()
    asyncio.run(serve(args.control, args.node_pid))
    return 0


if __name__ == "__main__":
    sys.exit(main())
