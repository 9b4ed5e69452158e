"""What the speakers say about themselves: sessions and routes, parsed from their own output.

Status is never taken from our bookkeeping: it is asked of each running daemon through its
control channel (``birdc -s SOCK show protocols all`` / ``show route``; ExaBGP's CLI pipes
``show neighbor json`` / ``show adj-rib in``) and parsed here. The parsers are pure
functions of the text, unit-tested on captured output.

Each speaker leaves a small descriptor, ``bgp-speaker.json``, in its state directory (the
node's, or ``routers/<name>/`` for underlay routers): which daemon it is, its control socket
or pipes and its PID. ``k8snetlab bgp status`` finds the descriptors of running clusters
under ``/run/k8snetlab`` and asks each daemon.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DESCRIPTOR = "bgp-speaker.json"
ESTABLISHED = "Established"


@dataclass
class Session:
    peer: str                  # the peer's name (node or router), from the session's description
    address: str               # the peer's address
    state: str                 # Established, Active, Connect, OpenSent, Idle, down...
    since: str                 # when the state was entered, as the speaker prints it
    routes_received: int | None = None

    @property
    def established(self) -> bool:
        return self.state == ESTABLISHED


@dataclass
class Route:
    prefix: str
    next_hop: str | None       # None for the speaker's own (blackhole) block
    via: str                   # the protocol or peer the route came from
    best: bool = True


@dataclass
class SpeakerStatus:
    name: str
    speaker: str               # bird | exabgp
    running: bool
    sessions: list[Session] = field(default_factory=list)
    routes: list[Route] = field(default_factory=list)
    error: str = ""

    def established(self) -> int:
        return sum(1 for s in self.sessions if s.established)

    def prefixes(self) -> set[str]:
        return {r.prefix for r in self.routes}


# ------------------------------------------------------------------------ BIRD

_PROTO_LINE = re.compile(r"^(?P<name>\S+)\s+(?P<proto>\S+)\s+(?P<table>\S+)\s+(?P<state>\S+)\s+"
                         r"(?P<since>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?|\S+)\s*(?P<info>.*)$")
_ROUTES = re.compile(r"Routes:\s+(\d+) imported")


def parse_bird_protocols(text: str) -> list[Session]:
    """BGP sessions from ``birdc show protocols all``."""
    sessions: list[Session] = []
    current: dict[str, Any] | None = None

    def flush() -> None:
        if current is not None:
            sessions.append(Session(current.get("description") or current["name"], current.get("address", ""),
                                    current.get("bgp_state") or current["info"] or current["state"],
                                    current["since"], current.get("routes")))

    for line in text.splitlines():
        if not line.strip() or line.startswith(("BIRD ", "Name ")):
            continue
        if not line[0].isspace():
            m = _PROTO_LINE.match(line)
            flush()
            current = None
            if m and m.group("proto") == "BGP":
                current = {"name": m.group("name"), "state": m.group("state"), "since": m.group("since"),
                           "info": m.group("info").split()[0] if m.group("info").split() else ""}
            continue
        if current is None:
            continue
        key, _, value = line.strip().partition(":")
        value = value.strip()
        if key == "Description":
            current["description"] = value
        elif key == "BGP state":
            current["bgp_state"] = value
        elif key == "Neighbor address":
            current["address"] = value
        elif key == "Routes":
            m = _ROUTES.search(line)
            if m:
                current["routes"] = int(m.group(1))
    flush()
    return sessions


_ROUTE_HEAD = re.compile(r"^(?P<prefix>\d+\.\d+\.\d+\.\d+/\d+)\s+(?P<rest>.*)$")
_ROUTE_ALT = re.compile(r"^\s+(?P<rest>(unicast|blackhole|unreachable|prohibit)\s.*)$")
_ROUTE_SRC = re.compile(r"^(?P<type>\S+)\s+\[(?P<proto>\S+)[^\]]*\]\s*(?P<star>\*)?")
_VIA = re.compile(r"^\s+via\s+(?P<gw>\d+\.\d+\.\d+\.\d+)")


def parse_bird_routes(text: str) -> list[Route]:
    """Routes from ``birdc show route`` (every path; ``best`` marks the selected one)."""
    routes: list[Route] = []
    prefix = None
    for line in text.splitlines():
        head = _ROUTE_HEAD.match(line)
        alt = None if head else _ROUTE_ALT.match(line)
        if head or alt:
            if head:
                prefix = head.group("prefix")
            rest = (head or alt).group("rest")  # type: ignore[union-attr]
            src = _ROUTE_SRC.match(rest)
            if src and prefix:
                routes.append(Route(prefix, None, src.group("proto"), bool(src.group("star"))))
            continue
        via = _VIA.match(line)
        if via and routes and routes[-1].next_hop is None and routes[-1].prefix == prefix:
            routes[-1].next_hop = via.group("gw")
    return routes


def name_protocols(sessions: list[Session]) -> dict[str, str]:
    return {s.address: s.peer for s in sessions}


# ------------------------------------------------------------------------ ExaBGP

_EXA_STATE = {"established": ESTABLISHED, "idle": "Idle", "active": "Active", "connect": "Connect",
              "opensent": "OpenSent", "openconfirm": "OpenConfirm"}


def parse_exabgp_neighbors(text: str, names: dict[str, str] | None = None) -> list[Session]:
    """Sessions from ExaBGP's ``show neighbor json`` (one JSON list)."""
    names = names or {}
    data = _first_json(text)
    out = []
    for n in data if isinstance(data, list) else []:
        addr = str((n.get("peer") or {}).get("address", ""))
        fsm = str(n.get("fsm", n.get("state", ""))).lower()
        state = _EXA_STATE.get(fsm, fsm or "unknown")
        since = _since(n.get("duration"))
        out.append(Session(names.get(addr, addr), addr, state, since))
    return out


_EXA_RIB = re.compile(r"^(?:neighbor\s+)?(?P<peer>\d+\.\d+\.\d+\.\d+)\s.*?ipv4 unicast\s+"
                      r"(?P<prefix>\d+\.\d+\.\d+\.\d+/\d+)\s+next-hop\s+(?P<hop>\S+)")


def parse_exabgp_adj_rib_in(text: str) -> list[tuple[str, str, str]]:
    """(peer address, prefix, next hop) from ExaBGP's ``show adj-rib in``, one route a line:
    ``192.168.1.129 ipv4 unicast 10.244.0.0/24 next-hop 192.168.1.129`` (the JSON form of
    this command leaves the next hop out)."""
    out = []
    for line in text.splitlines():
        m = _EXA_RIB.match(line.strip())
        if m:
            out.append((m.group("peer"), m.group("prefix"), m.group("hop")))
    return out


def _first_json(text: str) -> Any:
    for line in text.splitlines():
        line = line.strip()
        if line.startswith(("[", "{")):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return None


def _since(seconds: Any, now: float | None = None) -> str:
    """ExaBGP reports how long a session is in its state; print when it entered it, as BIRD
    does (local time)."""
    try:
        s = float(seconds)
    except (TypeError, ValueError):
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime((now or time.time()) - s))


# ------------------------------------------------------------------------ tables

def table(statuses: list[SpeakerStatus]) -> str:
    """One block per speaker: its sessions (peer, state, since, routes received)."""
    from ..results import format_table
    blocks = []
    for st in statuses:
        if not st.running:
            blocks.append(f"{st.name} ({st.speaker}): not running{': ' + st.error if st.error else ''}")
            continue
        head = (f"{st.name} ({st.speaker}): {st.established()}/{len(st.sessions)} sessions established, "
                f"{len(st.prefixes())} prefixes")
        rows = [[s.peer, s.address, s.state, s.since, s.routes_received] for s in st.sessions]
        body = format_table(["peer", "address", "state", "since", "routes received"], rows) if rows else "  (no sessions)"
        blocks.append(head + "\n" + "\n".join("  " + line for line in body.splitlines()))
    return "\n\n".join(blocks)


# ------------------------------------------------------------------------ running clusters

def descriptors(state_dir: Path) -> Iterator[dict[str, Any]]:
    """The speaker descriptors of one cluster state directory (nodes first, then routers)."""
    for sub in ("nodes", "routers"):
        for path in sorted((state_dir / sub).glob(f"*/{DESCRIPTOR}")):
            try:
                yield json.loads(path.read_text())
            except (OSError, ValueError):
                continue
