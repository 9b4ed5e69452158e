"""The route installer beside ExaBGP: learned BGP routes -> the node's kernel FIB.

ExaBGP speaks BGP but never touches the FIB. It starts this program as an API process
(``process route-installer { run ...; encoder json; }``) in the node's namespace and writes
one JSON object per line to its stdin: ``update`` messages (announced prefixes grouped by next
hop, withdrawn prefixes) and ``state`` messages (a neighbor went up or down). This program
keeps, per prefix, what each peer announced (a small Adj-RIB-In), picks one path (fewest AS
hops, then the lowest peer address: with two route reflectors both send the same path) and
mirrors the choice into the kernel with netlink, ``proto bgp`` (186), so these routes are told
apart from BIRD's (``proto bird``) and from the CNI plugin's.
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import json
import logging
import signal
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, TextIO

RTPROT_BGP = 186
MAIN_TABLE = 254

log = logging.getLogger("k8snetlab.bgp.installer")


@dataclass(frozen=True)
class Path:
    next_hop: str
    as_hops: int


@dataclass
class Rib:
    """What each peer announced, and which path of each prefix the FIB holds."""

    own: frozenset[str] = frozenset()          # our own CIDRs: never installed from a peer
    self_addresses: frozenset[str] = frozenset()
    paths: dict[str, dict[str, Path]] = field(default_factory=dict)   # prefix -> peer -> path
    installed: dict[str, str] = field(default_factory=dict)            # prefix -> next hop

    def best(self, prefix: str) -> Path | None:
        cands = self.paths.get(prefix)
        if not cands:
            return None
        peer = min(cands, key=lambda p: (cands[p].as_hops, ipaddress.ip_address(p)))
        return cands[peer]

    def apply(self, msg: dict[str, Any]) -> list[tuple[str, str | None]]:
        """Fold one ExaBGP message in; return the FIB changes: (prefix, next hop or None)."""
        touched = set()
        neighbor = msg.get("neighbor") or {}
        peer = (neighbor.get("address") or {}).get("peer")
        if peer is None:
            return []
        if msg.get("type") == "state":
            if neighbor.get("state") == "down":
                for prefix, cands in self.paths.items():
                    if cands.pop(peer, None) is not None:
                        touched.add(prefix)
        elif msg.get("type") == "update":
            update = (neighbor.get("message") or {}).get("update") or {}
            hops = len(_as_path((update.get("attribute") or {}).get("as-path")))
            for prefix in _withdrawn(update):
                if self.paths.get(prefix, {}).pop(peer, None) is not None:
                    touched.add(prefix)
            for prefix, next_hop in _announced(update):
                if prefix in self.own or next_hop in self.self_addresses:
                    continue     # our own block, reflected back to us
                self.paths.setdefault(prefix, {})[peer] = Path(next_hop, hops)
                touched.add(prefix)
        changes = []
        for prefix in sorted(touched):
            best = self.best(prefix)
            want = best.next_hop if best else None
            if self.installed.get(prefix) != want:
                changes.append((prefix, want))
                if want is None:
                    self.installed.pop(prefix, None)
                else:
                    self.installed[prefix] = want
        return changes


def _as_path(value: Any) -> list[Any]:
    if isinstance(value, list):
        return value
    if isinstance(value, dict):        # {"0": {"element": "as-sequence", "value": [...]}} in some versions
        out: list[Any] = []
        for seg in value.values():
            out += seg.get("value", []) if isinstance(seg, dict) else []
        return out
    return []


def _nlri(item: Any) -> str | None:
    if isinstance(item, dict):
        return item.get("nlri")
    if isinstance(item, str):
        return item
    return None


def _announced(update: dict[str, Any]) -> Iterable[tuple[str, str]]:
    for family, by_hop in (update.get("announce") or {}).items():
        if family != "ipv4 unicast" or not isinstance(by_hop, dict):
            continue
        for next_hop, items in by_hop.items():
            for item in items:
                prefix = _nlri(item)
                if prefix:
                    yield prefix, next_hop


def _withdrawn(update: dict[str, Any]) -> Iterable[str]:
    for family, items in (update.get("withdraw") or {}).items():
        if family != "ipv4 unicast":
            continue
        for item in items:
            prefix = _nlri(item)
            if prefix:
                yield prefix


class Fib:
    """The node's main table, through one netlink socket (we run in the node's namespace)."""

    def __init__(self) -> None:
        from pyroute2 import IPRoute
        self.ipr = IPRoute()

    def replace(self, prefix: str, next_hop: str) -> None:
        self.ipr.route("replace", dst=prefix, gateway=next_hop, proto=RTPROT_BGP, table=MAIN_TABLE)

    def blackhole(self, prefix: str) -> None:
        self.ipr.route("replace", dst=prefix, type="blackhole", proto=RTPROT_BGP, table=MAIN_TABLE)

    def delete(self, prefix: str) -> None:
        from pyroute2.netlink.exceptions import NetlinkError
        try:
            self.ipr.route("del", dst=prefix, proto=RTPROT_BGP, table=MAIN_TABLE)
        except NetlinkError as e:
            if e.code not in (errno.ESRCH, errno.ENOENT):
                raise

    def close(self) -> None:
        self.ipr.close()


def run(stream: TextIO, rib: Rib, fib: Fib) -> None:
    for cidr in sorted(rib.own):
        fib.blackhole(cidr)
    try:
        for line in stream:
            line = line.strip()
            if not line.startswith("{"):
                continue       # acks ("done") and anything that is not a message
            try:
                msg = json.loads(line)
            except ValueError:
                log.warning("not JSON from ExaBGP: %.200s", line)
                continue
            for prefix, next_hop in rib.apply(msg):
                try:
                    if next_hop is None:
                        fib.delete(prefix)
                    else:
                        fib.replace(prefix, next_hop)
                except Exception as e:   # one bad route must not stop the others
                    log.error("route %s via %s: %s", prefix, next_hop, e)
                    continue
                log.info("%s %s%s", "del" if next_hop is None else "add", prefix,
                         f" via {next_hop}" if next_hop else "")
    finally:   # ExaBGP went away: take back everything we installed
        for prefix in list(rib.installed):
            fib.delete(prefix)
        for cidr in rib.own:
            fib.delete(cidr)
        fib.close()


def _exit(signum: int, frame: Any) -> None:
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    """Like BIRD's kernel protocol it also installs the node's own pod CIDR as a blackhole (what
    Calico does for its block), and removes every route it installed when ExaBGP goes away
    (end of stdin): a stopped speaker leaves no stale routes behind on its node.

        python -m k8snetlab.bgp.installer --announce 10.244.2.0/24 --self 192.168.1.131

    Only pyroute2 and the standard library are imported: the process starts with every speaker.
    """
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--announce", action="append", default=[], help="own CIDR (blackholed, never learned)")
    p.add_argument("--self", dest="addresses", action="append", default=[], help="own address")
    args = p.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s installer %(levelname)s %(message)s")
    rib = Rib(own=frozenset(args.announce), self_addresses=frozenset(args.addresses))
    signal.signal(signal.SIGTERM, _exit)    # stopped: still take the routes back (run's finally)
    try:
        run(sys.stdin, rib, Fib())
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
