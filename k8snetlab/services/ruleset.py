"""Has anyone touched the node's netfilter rules since kube-proxy last wrote them? Asked cheaply.

A partial sync rewrites only what changed in the desired state; it trusts that the rest of
its rules are still there. Someone running ``iptables -t nat -F``, deleting the jumps from
PREROUTING, or ``nft flush table ip kube-proxy`` breaks that trust, and only a full sync
repairs it. Listing the rules each sync to compare them costs too much (``iptables-save -t
nat`` at 5,000 Services: 0.5 s with iptables-nft; a netlink dump of the table 0.25-1.2 s), so
the proxiers compare a fingerprint of the whole ruleset instead, taken around their own
writes:
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct
from typing import Iterator

from .. import proc

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_GETGEN = 16
NFTA_GEN_ID = 1
NLM_F_REQUEST = 1
NLMSG_ERROR, NLMSG_DONE = 2, 3

SOL_IP = 0
IPT_SO_GET_INFO = 64           # IPT_BASE_CTL
_IPT_GETINFO = struct.Struct("32sI5I5III")   # struct ipt_getinfo

_libc = ctypes.CDLL(None, use_errno=True)


class RulesetUnreadable(OSError):
    """The kernel would not say (no nf_tables, a table that does not exist...)."""


def _nlmsgs(data: bytes) -> Iterator[tuple[int, bytes]]:
    off = 0
    while off + 16 <= len(data):
        length, typ = struct.unpack_from("IH", data, off)
        if length < 16:
            return
        yield typ, data[off + 16:off + length]
        off += (length + 3) & ~3


def nft_generation(netns: str | None) -> int:
    """The nf_tables ruleset generation of the namespace ``netns`` (None: this one)."""
    with proc.netns(netns):
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    try:
        body = struct.pack("BBH", socket.AF_UNSPEC, 0, 0)      # struct nfgenmsg
        sock.send(struct.pack("IHHII", 16 + len(body), (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN,
                              NLM_F_REQUEST, 1, 0) + body)
        for typ, payload in _nlmsgs(sock.recv(65536)):
            if typ == NLMSG_ERROR:
                (err,) = struct.unpack_from("i", payload)
                raise RulesetUnreadable(-err, f"NFT_MSG_GETGEN: {os.strerror(-err)}")
            off = 4                                             # past the nfgenmsg
            while off + 4 <= len(payload):
                alen, atype = struct.unpack_from("HH", payload, off)
                if alen < 4:
                    break
                if atype & 0x7FFF == NFTA_GEN_ID:
                    return struct.unpack_from(">I", payload, off + 4)[0]
                off += (alen + 3) & ~3
        raise RulesetUnreadable(errno.EPROTO, "NFT_MSG_GETGEN: no generation in the answer")
    finally:
        sock.close()


def legacy_table_info(netns: str | None, table: str) -> tuple[int, int]:
    """(number of entries, blob size) of an iptables-legacy ``table`` in ``netns``."""
    with proc.netns(netns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    try:
        buf = ctypes.create_string_buffer(_IPT_GETINFO.pack(table.encode(), 0, *[0] * 10, 0, 0))
        size = ctypes.c_uint32(_IPT_GETINFO.size)
        if _libc.getsockopt(sock.fileno(), SOL_IP, IPT_SO_GET_INFO, buf, ctypes.byref(size)) != 0:
            err = ctypes.get_errno()
            raise RulesetUnreadable(err, f"IPT_SO_GET_INFO {table}: {os.strerror(err)}")
        fields = _IPT_GETINFO.unpack(buf.raw[:_IPT_GETINFO.size])
        return fields[-2], fields[-1]
    finally:
        sock.close()


class RulesetWatch:
    """The fingerprint of a node's rules right after our last write, and a comparison with now.

    ``backend``: ``nft`` (nf_tables generation) or ``legacy`` (``tables``' entry counts and sizes).

    - **nf_tables** (the nftables mode, and iptables-nft, Debian's default iptables) numbers the
      committed transactions of each network namespace: the ruleset generation, one netlink
      request (``NFT_MSG_GETGEN``; ``nft monitor`` prints it), about 30-60 us whatever the number
      of rules. Every foreign change bumps it; reads (``iptables -S``, ``nft list``) do not. Our
      own write bumps it by at most one per transaction (``nft -f``: one; ``iptables-restore``:
      one per table section), so a foreign change racing with our write shows as a jump larger
      than that and is caught too.
    - **iptables-legacy** has no generation; the kernel tells each table's number of entries and
      the size of its blob (``IPT_SO_GET_INFO``, what ``iptables-legacy-save`` asks first): any
      rule added, deleted or flushed changes them.

    Any difference means a full sync. The fingerprint cannot tell our chains from other agents'
    (another writer in the node's namespace, e.g. a NetworkPolicy agent, costs us one full sync
    per change of its rules), and a legacy rule replaced by one of exactly the same size is not
    seen: the hourly full sync still repairs those.
    """

    def __init__(self, netns: str | None, backend: str = "nft",
                 tables: tuple[str, ...] = ("mangle", "nat", "filter")):
        self.netns, self.backend, self.tables = netns, backend, tables
        self._mark: object = None

    def fingerprint(self) -> object:
        """What the kernel says now (None when it cannot say: every sync is then a full one)."""
        try:
            if self.backend == "nft":
                return nft_generation(self.netns)
            out = []
            for t in self.tables:
                try:
                    out.append(legacy_table_info(self.netns, t))
                except RulesetUnreadable as e:
                    if e.errno != errno.ENOENT:      # a table nobody made yet is a state too
                        raise
                    out.append(None)
            return tuple(out)
        except (OSError, struct.error):
            return None

    def changed(self, now: object) -> bool:
        """Is ``now`` (a :meth:`fingerprint`) other than the one after our last write?"""
        return self._mark is None or now is None or now != self._mark

    def wrote(self, before: object, transactions: int) -> None:
        """Record the fingerprint after our own write of at most ``transactions`` commits,
        given the one taken just ``before`` it. A foreign change that slipped in between
        (the generation moved further than our commits account for) leaves nothing recorded,
        so the next sync is a full one."""
        after = self.fingerprint()
        if self.backend == "nft" and (not isinstance(before, int) or not isinstance(after, int)
                                      or not 0 <= after - before <= transactions):
            after = None
        self._mark = after

    def forget(self) -> None:
        self._mark = None
