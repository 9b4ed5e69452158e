"""The one layer that changes the datapath: links, addresses, routes, neighbours, sysctls.

Plugins and node agents never build shell strings; they call one verb here per change
(``ensure_bridge``, ``add_veth``, ``add_route``, ``set_sysctl``...). Each verb talks netlink
through pyroute2 on a socket opened *inside* the target namespace (a netlink socket stays
bound to the namespace it was created in), so a verb costs one or two syscalls, not a
process. Every failure raises :class:`NetlinkError` saying what was asked, where, and why.

Verbs are idempotent where the CNI contract needs it: ``ensure_*`` accept what is already
there, ``del_*`` treat "already gone" as success.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import logging
import os
import socket
import struct
import threading
from typing import Any, Iterable

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError as _PyNetlinkError

from . import proc
from .errors import NetlinkError

log = logging.getLogger(__name__)

RTNH_F_ONLINK = 4
SCOPE_LINK = 253
SCOPE_UNIVERSE = 0
MAIN_TABLE = 254
NUD_PERMANENT = 0x80
NUD_NOARP = 0x40
NTF_SELF = 0x02
RTPROT_STATIC = 4
_SIOCGIFINDEX = 0x8933
_SIOCGIFMTU, _SIOCGIFHWADDR = 0x8921, 0x8927


class Netns:
    """A handle on one network namespace: a netlink socket opened inside it.

    ``path`` is a namespace file (``/proc/PID/ns/net``); None means the caller's own.
    ``label`` names the namespace in error messages (a node or pod name).
    """

    def __init__(self, path: str | None, label: str = ""):
        self.path = path
        self.label = label or (path or "current namespace")
        self._ipr: IPRoute | None = None
        try:
            with proc.netns(path):
                # an ioctl socket in the namespace: a name -> index lookup or a link going up
                # is one syscall there, a pyroute2 request ~1 ms of Python; and a raw netlink
                # socket for the requests encoded by hand (_Rtnl)
                self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._rtnl = _Rtnl()
                self.ino = _thread_netns_ino()
        except OSError as e:
            raise NetlinkError(f"cannot enter network namespace of {self.label} ({path}): "
                               f"{e.strerror}; is the pod or node still running?") from None

    @property
    def ipr(self) -> IPRoute:
        """pyroute2's socket in the namespace, opened on first use (~0.7 ms of CPU: a pod's
        ADD needs none, only the requests not encoded by hand do)."""
        if self._ipr is None:
            with self._inside():
                self._ipr = IPRoute()
        return self._ipr

    def _inside(self) -> Any:
        """Enter this namespace (the one the ioctl socket was made in)."""
        if self.path is not None:
            return proc.netns(self.path)
        if _thread_netns_ino() != self.ino:
            raise NetlinkError(f"{self.label}: pyroute2 asked for outside the namespace the handle was made in")
        return contextlib.nullcontext()

    # -- plumbing ---------------------------------------------------------------------------
    def close(self) -> None:
        if self._ipr is not None:
            self._ipr.close()
        self._sock.close()
        self._rtnl.close()

    def __enter__(self) -> "Netns":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _call(self, what: str, fn, *args: Any, ok: Iterable[int] = (), **kw: Any) -> Any:
        try:
            return fn(*args, **kw)
        except _PyNetlinkError as e:
            if e.code in ok:
                return None
            raise NetlinkError(f"{what} in {self.label}: {os.strerror(e.code)}") from None

    # -- links ------------------------------------------------------------------------------
    def index(self, ifname: str) -> int | None:
        """The interface's index, None if there is none (one ioctl, SIOCGIFINDEX)."""
        name = ifname.encode()
        if not name or len(name) > 15:
            return None
        try:
            res = fcntl.ioctl(self._sock, _SIOCGIFINDEX, struct.pack("16si12x", name, 0))
        except OSError as e:
            if e.errno in (errno.ENODEV, errno.ENXIO, errno.EINVAL):
                return None
            raise NetlinkError(f"look up {ifname} in {self.label}: {e.strerror}") from None
        return struct.unpack("16si12x", res)[1]

    def require_index(self, ifname: str | int) -> int:
        """The index of ``ifname``; an int is taken as the index already (saves a request)."""
        if isinstance(ifname, int):
            return ifname
        idx = self.index(ifname)
        if idx is None:
            raise NetlinkError(f"no interface {ifname!r} in {self.label}")
        return idx

    def link(self, ifname: str) -> dict[str, Any] | None:
        """The link's index, ifname, mtu, mac, master, alias, up and kind; None if there is none
        (one request)."""
        try:
            msg = self.ipr.link("get", ifname=ifname)[0]
        except _PyNetlinkError as e:
            if e.code in (errno.ENODEV, errno.ENOENT, errno.EINVAL):
                return None
            raise NetlinkError(f"look up {ifname} in {self.label}: {os.strerror(e.code)}") from None
        return _link_info(msg)

    def links(self) -> list[dict[str, Any]]:
        """Every link here, as :meth:`link` describes one (one dump)."""
        return [_link_info(msg) for msg in self.ipr.get_links()]

    def link_brief(self, ifname: str) -> dict[str, Any] | None:
        """The link's index, mtu, mac and up, by ioctls (no master, no kind: see :meth:`link`);
        None if there is none. What a CNI result needs of an interface, in microseconds."""
        idx = self.index(ifname)
        if idx is None:
            return None
        name = ifname.encode()
        try:
            hw = fcntl.ioctl(self._sock, _SIOCGIFHWADDR, struct.pack("16s16x", name))[18:24]
            mtu = struct.unpack("16si12x", fcntl.ioctl(self._sock, _SIOCGIFMTU, struct.pack("16si12x", name, 0)))[1]
            flags = proc.if_flags(self._sock, ifname)
        except OSError as e:
            if e.errno in (errno.ENODEV, errno.ENXIO):
                return None
            raise NetlinkError(f"look up {ifname} in {self.label}: {e.strerror}") from None
        return {"index": idx, "ifname": ifname, "mtu": mtu, "mac": ":".join(f"{b:02x}" for b in hw),
                "up": bool(flags & proc.IFF_UP)}

    def ensure_bridge(self, name: str, mtu: int | None = None) -> int:
        """Create bridge ``name`` (or accept the one there), set it up; return its index.
        A bridge this process saw already (same namespace, name and index) and still up is
        accepted by two ioctls: every pod's ADD after the first."""
        idx = self.index(name)
        if idx is not None and _BRIDGES.get((self.ino, name)) == idx and self._is_up(name):
            return idx
        info = self.link(name)
        if info is not None and info["kind"] == "bridge" and info["up"]:
            _BRIDGES[(self.ino, name)] = info["index"]
            return info["index"]
        proc_kw = {"mtu": mtu} if mtu else {}
        created = self._call(f"create bridge {name}", self.ipr.link, "add", ifname=name, kind="bridge",
                             ok=(errno.EEXIST,), **proc_kw) is not None
        idx = self.require_index(name)
        info = self.link(name)
        if info and info["kind"] not in (None, "bridge"):
            raise NetlinkError(f"{name} in {self.label} exists but is a {info['kind']}, not a bridge")
        if created and info and info["mac"]:
            # Pin the new bridge's MAC (as the CNI bridge plugin does): a bridge whose address
            # was never set takes the lowest MAC of its ports, so it would change whenever that
            # pod leaves, and the other pods' ARP entries for the gateway would point at a MAC
            # nobody owns until they expire (seconds of lost packets). Only at creation: setting
            # an address, even the same one, flushes the bridge's neighbour entries.
            self._call(f"pin the MAC of {name}", self.ipr.link, "set", index=idx, address=info["mac"])
        self.link_up(name)
        if info and info["kind"] == "bridge":
            _BRIDGES[(self.ino, name)] = idx
        return idx

    def _is_up(self, ifname: str) -> bool:
        try:
            return bool(proc.if_flags(self._sock, ifname) & proc.IFF_UP)
        except OSError:
            return False

    def add_veth(self, ifname: str, peer_ifname: str, peer: "Netns", mtu: int | None = None,
                 peer_mac: str | None = None, master: str | int | None = None, up: bool = False) -> int:
        """Create veth ``ifname`` here with its peer ``peer_ifname`` in namespace ``peer``;
        both ends get ``mtu``; this end is enslaved to ``master`` and set up if asked, all in
        the one request that creates it."""
        fd = os.open(peer.path or f"/proc/self/task/{threading.get_native_id()}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            # one hand-encoded RTM_NEWLINK, what ``ip link add ... type veth peer ...`` sends
            err = self._rtnl.veth_add(ifname, peer_ifname, fd, mtu=mtu, peer_mac=peer_mac,
                                      master=None if master is None else self.require_index(master), up=up)
        finally:
            os.close(fd)
        if err:
            raise NetlinkError(f"create veth {ifname} <-> {peer.label}:{peer_ifname} in {self.label}: "
                               f"{os.strerror(err)}")
        return self.require_index(ifname)

    def set_mtu(self, ifname: str | int, mtu: int) -> None:
        self._call(f"set mtu {mtu} on {ifname}", self.ipr.link, "set",
                   index=self.require_index(ifname), mtu=mtu)

    def link_up(self, ifname: str | int) -> None:
        if isinstance(ifname, str):     # by name: two ioctls (SIOCGIFFLAGS, SIOCSIFFLAGS)
            try:
                proc.if_set_up(self._sock, ifname)
            except OSError as e:
                if e.errno in (errno.ENODEV, errno.ENXIO, errno.EINVAL):
                    raise NetlinkError(f"no interface {ifname!r} in {self.label}") from None
                raise NetlinkError(f"set {ifname} up in {self.label}: {e.strerror}") from None
            return
        self._call(f"set {ifname} up", self.ipr.link, "set", index=self.require_index(ifname),
                   state="up")

    def link_down(self, ifname: str) -> None:
        self._call(f"set {ifname} down", self.ipr.link, "set", index=self.require_index(ifname),
                   state="down")

    def link_stats(self, ifname: str) -> dict[str, int]:
        """The interface's counters (``rx_packets``, ``tx_bytes``, ...: IFLA_STATS64)."""
        msg = self.ipr.get_links(self.require_index(ifname))[0]
        stats = msg.get("IFLA_STATS64") or msg.get("IFLA_STATS") or {}
        return {k: int(v) for k, v in dict(stats).items()}

    def set_alias(self, ifname: str | int, alias: str) -> None:
        """Set the link's ``ifalias`` (a free-form label the kernel keeps with it)."""
        self._call(f"set the alias of {ifname}", self.ipr.link, "set",
                   index=self.require_index(ifname), ifalias=alias)

    def set_master(self, ifname: str, bridge: str) -> None:
        self._call(f"attach {ifname} to {bridge}", self.ipr.link, "set",
                   index=self.require_index(ifname), master=self.require_index(bridge))

    def set_brport(self, ifname: str | int, **attrs: Any) -> None:
        """Bridge port options, e.g. ``mode=1`` (IFLA_BRPORT_MODE: hairpin, one hand-encoded
        request as ``bridge link set ... hairpin on`` sends it)."""
        if set(attrs) == {"mode"}:
            err = self._rtnl.brport_mode(self.require_index(ifname), int(attrs["mode"]))
            if err:
                raise NetlinkError(f"set bridge port options {attrs} on {ifname} in {self.label}: "
                                   f"{os.strerror(err)}")
            return
        self._call(f"set bridge port options {attrs} on {ifname}", self.ipr.brport, "set",
                   index=self.require_index(ifname), **attrs)

    def del_link(self, ifname: str) -> bool:
        """Delete ``ifname``; True if it existed. Already gone is success."""
        idx = self.index(ifname)
        if idx is None:
            return False
        self._call(f"delete {ifname}", self.ipr.link, "del", index=idx, ok=(errno.ENODEV,))
        return True

    def can_create(self, kind: str, probe: str) -> bool:
        """Can a link of ``kind`` be made here? Creates ``probe`` of that kind and deletes it."""
        try:
            self.ipr.link("add", ifname=probe, kind=kind)
        except _PyNetlinkError as e:
            if e.code == errno.EOPNOTSUPP:       # the kernel has no such link type
                return False
            raise NetlinkError(f"create {kind} {probe} in {self.label}: {os.strerror(e.code)}") from None
        self.del_link(probe)
        return True

    def add_link(self, ifname: str, kind: str, **attrs: Any) -> int:
        """Create a link of any other kind (vxlan, dummy...), accepting an existing one."""
        self._call(f"create {kind} {ifname}", self.ipr.link, "add", ifname=ifname, kind=kind,
                   ok=(errno.EEXIST,), **attrs)
        return self.require_index(ifname)

    # -- addresses --------------------------------------------------------------------------
    def ensure_addr(self, ifname: str | int, cidr: str) -> None:
        iface = ipaddress.ip_interface(cidr)
        if iface.version == 4:      # one hand-encoded request (what pyroute2 sends, ~40x cheaper)
            err = self._rtnl.addr_add(self.require_index(ifname), iface)
            if err and err != errno.EEXIST:
                raise NetlinkError(f"add address {cidr} to {ifname} in {self.label}: {os.strerror(err)}")
            return
        self._call(f"add address {cidr} to {ifname}", self.ipr.addr, "add",
                   index=self.require_index(ifname), address=str(iface.ip),
                   prefixlen=iface.network.prefixlen, ok=(errno.EEXIST,))

    def del_addr(self, ifname: str, cidr: str) -> None:
        """Remove an address; already gone (or no such interface) is success."""
        idx = self.index(ifname)
        if idx is None:
            return
        iface = ipaddress.ip_interface(cidr)
        self._call(f"delete address {cidr} from {ifname}", self.ipr.addr, "del", index=idx,
                   address=str(iface.ip), prefixlen=iface.network.prefixlen,
                   ok=(errno.EADDRNOTAVAIL, errno.ENOENT, errno.ENODEV))

    def addrs(self, ifname: str) -> list[str]:
        idx = self.index(ifname)
        if idx is None:
            return []
        return [f"{a.get('address')}/{a['prefixlen']}" for a in self.ipr.get_addr(index=idx, family=2)]

    # -- routes -----------------------------------------------------------------------------
    def add_route(self, dst: str, *, gateway: str | None = None, dev: str | int | None = None,
                  onlink: bool = False, scope: int | None = None, proto: int | None = None,
                  src: str | None = None, table: int = MAIN_TABLE, replace: bool = True,
                  mtu: int | None = None) -> None:
        """Add (by default replace) a route; ``dst`` is a CIDR or 'default'."""
        kw: dict[str, Any] = {"dst": _dst(dst), "table": table}
        if gateway:
            kw["gateway"] = gateway
        if dev:
            kw["oif"] = self.require_index(dev)
        if onlink:
            kw["flags"] = RTNH_F_ONLINK
        if scope is not None:
            kw["scope"] = scope
        elif not gateway and dev:
            kw["scope"] = SCOPE_LINK
        if proto is not None:
            kw["proto"] = proto
        if src:
            kw["prefsrc"] = src
        if mtu:
            kw["metrics"] = {"mtu": mtu}
        what = f"route {dst}" + (f" via {gateway}" if gateway else "") + (f" dev {dev}" if dev else "")
        if ":" in kw["dst"] or (gateway and ":" in gateway):      # IPv6: pyroute2
            self._call(what, self.ipr.route, "replace" if replace else "add", **kw)
            return
        err = self._rtnl.route(kw["dst"], gateway=gateway, oif=kw.get("oif"), scope=kw.get("scope", SCOPE_UNIVERSE),
                               proto=RTPROT_STATIC if proto is None else proto, onlink=onlink, table=table,
                               mtu=mtu, prefsrc=src, replace=replace)
        if err:
            raise NetlinkError(f"{what} in {self.label}: {os.strerror(err)}")

    def add_multipath_route(self, dst: str, gateways: list[str], table: int = MAIN_TABLE) -> None:
        """Replace the route to ``dst`` with one over several gateways of equal weight (ECMP)."""
        what = f"route {dst} via " + ", ".join(gateways)
        self._call(what, self.ipr.route, "replace", dst=_dst(dst), table=table,
                   multipath=[{"gateway": g} for g in gateways])

    def replace_routes(self, routes: list[dict[str, Any]]) -> None:
        """Replace many routes at once: ``{"dst", "gateway", "dev", "onlink", "mtu"}`` each
        (``dev`` by name). A node agent at 100 nodes programs 99 routes per node, 9,900 in
        all: each is one hand-encoded request here (~25 us of CPU), where a pyroute2 request
        costs about a millisecond. Raises NetlinkError naming the route the kernel refused."""
        index: dict[str, int] = {}
        for r in routes:
            dev = r.get("dev")
            oif = None
            if dev:
                oif = index.get(dev) or index.setdefault(dev, self.require_index(dev))
            dst = _dst(r["dst"])
            err = self._rtnl.route(dst, gateway=r.get("gateway"), oif=oif,
                                   scope=SCOPE_LINK if dev and not r.get("gateway") else SCOPE_UNIVERSE,
                                   proto=RTPROT_STATIC, onlink=bool(r.get("onlink")), mtu=r.get("mtu"))
            if err:
                via = f" via {r['gateway']}" if r.get("gateway") else ""
                raise NetlinkError(f"route {dst}{via} dev {dev} in {self.label}: {os.strerror(err)}")

    def del_route(self, dst: str, *, table: int = MAIN_TABLE, **match: Any) -> bool:
        """Delete a route; True if it existed. Already gone is success."""
        res = self._call(f"delete route {dst}", self.ipr.route, "del", dst=_dst(dst), table=table,
                         ok=(errno.ESRCH, errno.ENOENT, errno.ENODEV), **match)
        return res is not None

    def route_dsts(self, table: int = MAIN_TABLE) -> set[str]:
        """The destinations (CIDR, or ``default``) of ``table``'s routes: one route dump and
        no link dump (a node agent's periodic check, x nodes, every period)."""
        return {f"{r.get('dst')}/{r['dst_len']}" if r.get("dst") else "default"
                for r in self.ipr.get_routes(family=2, table=table)}

    def routes(self, table: int = MAIN_TABLE) -> list[dict[str, Any]]:
        """Routes of ``table`` as plain dicts: dst (CIDR), gateway, dev, scope, flags, proto."""
        names = {l["index"]: l.get("ifname") for l in self.ipr.get_links()}
        out = []
        for r in self.ipr.get_routes(family=2, table=table):
            dst = r.get("dst")
            out.append({"dst": f"{dst}/{r['dst_len']}" if dst else "default",
                        "gateway": r.get("gateway"), "dev": names.get(r.get("oif")),
                        "scope": r["scope"], "flags": r["flags"], "proto": r["proto"]})
        return out

    # -- neighbours and forwarding database (VXLAN VTEPs) ---------------------------------
    def set_neigh(self, ifname: str, ip: str, mac: str) -> None:
        self._call(f"neighbour {ip} lladdr {mac} dev {ifname}", self.ipr.neigh, "replace",
                   ifindex=self.require_index(ifname), dst=ip, lladdr=mac, state=NUD_PERMANENT)

    def del_neigh(self, ifname: str, ip: str) -> None:
        idx = self.index(ifname)
        if idx is not None:
            self._call(f"delete neighbour {ip} dev {ifname}", self.ipr.neigh, "del", ifindex=idx,
                       dst=ip, ok=(errno.ENOENT, errno.ESRCH))

    def set_fdb(self, ifname: str, mac: str, dst_ip: str) -> None:
        self._call(f"fdb {mac} dst {dst_ip} dev {ifname}", self.ipr.fdb, "replace",
                   ifindex=self.require_index(ifname), lladdr=mac, dst=dst_ip,
                   state=NUD_PERMANENT, flags=NTF_SELF)

    def del_fdb(self, ifname: str, mac: str, dst_ip: str) -> None:
        idx = self.index(ifname)
        if idx is not None:
            self._call(f"delete fdb {mac} dev {ifname}", self.ipr.fdb, "del", ifindex=idx,
                       lladdr=mac, dst=dst_ip, flags=NTF_SELF, ok=(errno.ENOENT, errno.ESRCH))

    def flush_neigh(self, ip: str | None = None) -> int:
        """Forget IPv4 neighbour entries on every interface: ``ip``'s (``ip neigh flush to
        IP``), or every learned one (``ip neigh flush all``: permanent and noarp entries stay);
        return how many there were."""
        entries = [(n["ifindex"], n.get("NDA_DST")) for n in self.ipr.get_neighbours(family=2)
                   if (n.get("NDA_DST") == ip if ip else not n["state"] & (NUD_PERMANENT | NUD_NOARP))]
        for idx, dst in entries:
            self._call(f"delete neighbour {dst}", self.ipr.neigh, "del", ifindex=idx, dst=dst,
                       ok=(errno.ENOENT, errno.ESRCH))
        return len(entries)

    def neighbours(self, ifname: str) -> set[tuple[str, str]]:
        """(IP, MAC) of the IPv4 neighbour entries on ``ifname`` (one dump)."""
        idx = self.index(ifname)
        if idx is None:
            return set()
        return {(n.get("NDA_DST"), n.get("NDA_LLADDR")) for n in self.ipr.get_neighbours(family=2, ifindex=idx)}

    def fdb_entries(self, ifname: str) -> set[tuple[str, str]]:
        """(MAC, destination IP) of the forwarding-database entries of ``ifname`` (one dump)."""
        idx = self.index(ifname)
        if idx is None:
            return set()
        return {(n.get("NDA_LLADDR"), n.get("NDA_DST")) for n in self.ipr.fdb("dump", ifindex=idx)}

    # -- conntrack --------------------------------------------------------------------------
    def delete_conntrack(self, protocol: int, orig_dst: str | None = None, orig_dport: int | None = None,
                         reply_src: str | None = None) -> int:
        """Delete the conntrack entries matching all the given fields (what ``conntrack -D
        -p PROTO --orig-dst .. --orig-port-dst .. --reply-src ..`` does); return how many."""
        from pyroute2 import Conntrack
        from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple
        orig = NFCTAttrTuple(proto=protocol, daddr=orig_dst, dport=orig_dport)
        reply = NFCTAttrTuple(saddr=reply_src) if reply_src else None
        # all of it inside the namespace: pyroute2 opens the socket on first use, not at creation
        with proc.netns(self.path), contextlib.closing(Conntrack()) as ct:
            found = list(ct.dump_entries(tuple_orig=orig, tuple_reply=reply))
            for entry in found:
                self._call(f"delete conntrack entry {entry}", ct.entry, "del", tuple_orig=entry.tuple_orig,
                           ok=(errno.ENOENT,))
        return len(found)

    # -- traffic control (the bandwidth plugin's shaping) -------------------------------------
    def route_dev(self, dst: str) -> str | None:
        """The interface the namespace would send a packet to ``dst`` out of (``ip route get``)."""
        out = self._call(f"route get {dst}", self.ipr.route, "get", dst=dst, ok=(errno.ENETUNREACH,))
        oif = out[0].get_attr("RTA_OIF") if out else None
        if oif is None:
            return None
        link = self._call(f"look up interface {oif}", self.ipr.link, "get", index=oif)
        return link[0].get_attr("IFLA_IFNAME")

    def peer_index(self, ifname: str) -> int | None:
        """The ifindex of a veth's peer (in the peer's own namespace), from IFLA_LINK."""
        msg = self._call(f"look up {ifname}", self.ipr.link, "get", index=self.require_index(ifname))
        return msg[0].get_attr("IFLA_LINK") if msg else None

    def link_by_index(self, index: int) -> dict[str, Any] | None:
        msg = self._call(f"look up interface {index}", self.ipr.link, "get", index=index, ok=(errno.ENODEV,))
        return self.link(msg[0].get_attr("IFLA_IFNAME")) if msg else None

    def add_tbf(self, ifname: str | int, rate_bits: int, burst_bytes: int, limit_bytes: int) -> None:
        """A token bucket (``tbf``) as the root qdisc (handle 1:) of ``ifname``: ``rate_bits``
        per second, a bucket of ``burst_bytes``, at most ``limit_bytes`` queued. The request
        carries the parameters and rate table only, as the netlink library of the reference
        plugins sends it (no TCA_TBF_BURST), so the kernel keeps the bucket as a time."""
        self._call(f"tbf rate {rate_bits}bit on {ifname}", self.ipr.tc, "add", "tbf",
                   self.require_index(ifname), 0x10000, rate=f"{rate_bits}bit", burst=burst_bytes,
                   limit=limit_bytes)

    def add_ingress_qdisc(self, ifname: str | int) -> None:
        self._call(f"ingress qdisc on {ifname}", self.ipr.tc, "add", "ingress",
                   self.require_index(ifname), 0xFFFF0000)

    def add_redirect(self, ifname: str | int, to: str | int) -> None:
        """Everything that enters ``ifname`` leaves through ``to`` (a u32 filter matching all
        on the ingress qdisc, action mirred egress redirect): what the ifb trick needs."""
        self._call(f"redirect {ifname} ingress to {to}", self.ipr.tc, "add-filter", "u32",
                   self.require_index(ifname), parent=0xFFFF0000, prio=1, protocol=0x0003,
                   keys=["0x0/0x0+0"], target=0x10001,
                   action={"kind": "mirred", "direction": "egress", "action": "redirect",
                           "ifindex": self.require_index(to)})

    def qdiscs(self, ifname: str | int) -> list[dict[str, Any]]:
        """The qdiscs of ``ifname``: kind, handle, parent, and for tbf rate (bytes/s), limit, buffer."""
        out = []
        for q in self._call(f"list qdiscs of {ifname}", self.ipr.get_qdiscs, index=self.require_index(ifname)) or []:
            d = {"kind": q.get_attr("TCA_KIND"), "handle": q["handle"], "parent": q["parent"]}
            opts = q.get_attr("TCA_OPTIONS")
            parms = opts.get_attr("TCA_TBF_PARMS") if d["kind"] == "tbf" and opts else None
            if parms:
                d.update(rate=parms["rate"], limit=parms["limit"], buffer=parms["buffer"])
            out.append(d)
        return out

    def filters(self, ifname: str | int, parent: int = 0xFFFF0000) -> list[dict[str, Any]]:
        """The tc filters under ``parent`` of ``ifname``: kind and the ifindex they redirect to."""
        out = []
        for f in self._call(f"list filters of {ifname}", self.ipr.get_filters,
                            index=self.require_index(ifname), parent=parent) or []:
            kind = f.get_attr("TCA_KIND")
            opts = f.get_attr("TCA_OPTIONS")
            to = None
            acts = opts.get_attr("TCA_U32_ACT") if kind == "u32" and opts else None
            for act in (acts.get_attrs("TCA_ACT_PRIO_1") if acts else []) or []:
                mirred = act.get_attr("TCA_ACT_OPTIONS")
                parms = mirred.get_attr("TCA_MIRRED_PARMS") if mirred else None
                if parms:
                    to = parms["ifindex"]
            if kind:
                out.append({"kind": kind, "redirect_to": to})
        return out

    # -- sysctls ----------------------------------------------------------------------------
    def set_sysctl(self, key: str, value: str | int) -> str:
        """Write ``net.*`` sysctl ``key`` in this namespace; return the old value."""
        return set_sysctl(key, value, self.path, self.label)

    def get_sysctl(self, key: str) -> str:
        return get_sysctl(key, self.path, self.label)


def _thread_netns_ino() -> int:
    """The inode of the network namespace the calling thread is in (setns is per thread)."""
    return os.stat(f"/proc/self/task/{threading.get_native_id()}/ns/net").st_ino


def _link_info(msg: Any) -> dict[str, Any]:
    return {"index": msg["index"], "ifname": msg.get("ifname"), "mtu": msg.get("mtu"),
            "mac": msg.get("address"), "master": msg.get("master"), "alias": msg.get("ifalias") or "",
            "up": bool(msg["flags"] & 1), "kind": _link_kind(msg)}


class _Rtnl:
    """A raw rtnetlink socket for the two requests every pod and node agent makes many of
    (an IPv4 address, a route): encoded by hand, as ``ip`` sends them (what pyroute2 sends
    too: no broadcast, ``proto static``), ~25 us of CPU each where pyroute2's machinery
    costs ~1 ms. Opened in the namespace like the pyroute2 socket beside it."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0)
        self.sock.bind((0, 0))
        self.seq = 0

    def close(self) -> None:
        self.sock.close()

    def request(self, msgtype: int, flags: int, body: bytes) -> int:
        """Send one request asking for an ACK; return 0 or the errno the kernel answered."""
        self.seq += 1
        seq = self.seq
        self.sock.send(struct.pack("=LHHLL", 16 + len(body), msgtype, flags | _NLM_F_REQUEST | _NLM_F_ACK,
                                   seq, 0) + body)
        while True:
            data = self.sock.recv(65536)
            off = 0
            while off + 16 <= len(data):
                length, kind, _, s, _ = struct.unpack_from("=LHHLL", data, off)
                if kind == _NLMSG_ERROR and s == seq:
                    return -struct.unpack_from("=i", data, off + 16)[0]
                if length < 16:
                    break
                off += (length + 3) & ~3

    def veth_add(self, ifname: str, peer_ifname: str, peer_ns_fd: int, mtu: int | None = None,
                 peer_mac: str | None = None, master: int | None = None, up: bool = False) -> int:
        """A veth pair: ``ifname`` here (on ``master``, up if asked), ``peer_ifname`` in the
        namespace of ``peer_ns_fd``; both ends ``mtu``."""
        peer = struct.pack("=BBHiII", socket.AF_UNSPEC, 0, 0, 0, 0, 0) + _rtattr(_IFLA_IFNAME, peer_ifname.encode() + b"\0")
        if mtu:
            peer += _rtattr(_IFLA_MTU, struct.pack("=I", mtu))
        if peer_mac:
            peer += _rtattr(_IFLA_ADDRESS, bytes.fromhex(peer_mac.replace(":", "")))
        peer += _rtattr(_IFLA_NET_NS_FD, struct.pack("=I", peer_ns_fd))
        info = _rtattr(_IFLA_INFO_KIND, b"veth\0") + _rtattr(_IFLA_INFO_DATA, _rtattr(_VETH_INFO_PEER, peer))
        flags = proc.IFF_UP if up else 0
        body = struct.pack("=BBHiII", socket.AF_UNSPEC, 0, 0, 0, flags, flags)
        body += _rtattr(_IFLA_IFNAME, ifname.encode() + b"\0")
        if mtu:
            body += _rtattr(_IFLA_MTU, struct.pack("=I", mtu))
        if master is not None:
            body += _rtattr(_IFLA_MASTER, struct.pack("=I", master))
        body += _rtattr(_IFLA_LINKINFO, info)
        return self.request(_RTM_NEWLINK, _NLM_F_CREATE | _NLM_F_EXCL, body)

    def brport_mode(self, index: int, mode: int) -> int:
        """IFLA_BRPORT_MODE of a bridge port (1: hairpin), in IFLA_PROTINFO of an AF_BRIDGE
        RTM_SETLINK (nested: without the flag the kernel reads it as an STP state)."""
        body = struct.pack("=BBHiII", _AF_BRIDGE, 0, 0, index, 0, 0)
        body += _rtattr(_IFLA_PROTINFO | _NLA_F_NESTED, _rtattr(_IFLA_BRPORT_MODE, struct.pack("=B", mode)))
        return self.request(_RTM_SETLINK, 0, body)

    def addr_add(self, index: int, iface: Any) -> int:
        ip = iface.ip.packed
        body = struct.pack("=BBBBI", socket.AF_INET, iface.network.prefixlen, 0, 0, index)
        return self.request(_RTM_NEWADDR, _NLM_F_CREATE | _NLM_F_EXCL,
                            body + _rtattr(_IFA_LOCAL, ip) + _rtattr(_IFA_ADDRESS, ip))

    def route(self, dst: str, *, gateway: str | None = None, oif: int | None = None, scope: int = 0,
              proto: int = RTPROT_STATIC, onlink: bool = False, table: int = MAIN_TABLE,
              mtu: int | None = None, prefsrc: str | None = None, replace: bool = True) -> int:
        net = ipaddress.IPv4Network(dst, strict=False)
        body = struct.pack("=BBBBBBBBI", socket.AF_INET, net.prefixlen, 0, 0, table if table < 256 else 252,
                           proto, scope, _RTN_UNICAST, RTNH_F_ONLINK if onlink else 0)
        body += _rtattr(_RTA_TABLE, struct.pack("=I", table))
        if net.prefixlen:
            body += _rtattr(_RTA_DST, net.network_address.packed)
        if gateway:
            body += _rtattr(_RTA_GATEWAY, ipaddress.IPv4Address(gateway).packed)
        if oif:
            body += _rtattr(_RTA_OIF, struct.pack("=I", oif))
        if prefsrc:
            body += _rtattr(_RTA_PREFSRC, ipaddress.IPv4Address(prefsrc).packed)
        if mtu:
            body += _rtattr(_RTA_METRICS, _rtattr(_RTAX_MTU, struct.pack("=I", int(mtu))))
        return self.request(_RTM_NEWROUTE, _NLM_F_CREATE | (_NLM_F_REPLACE if replace else _NLM_F_EXCL), body)


def _rtattr(kind: int, payload: bytes) -> bytes:
    n = 4 + len(payload)
    return struct.pack("=HH", n, kind) + payload + b"\0" * (-n % 4)


_NLMSG_ERROR, _RTM_NEWADDR, _RTM_NEWROUTE, _RTN_UNICAST = 2, 20, 24, 1
_NLM_F_REQUEST, _NLM_F_ACK, _NLM_F_REPLACE, _NLM_F_EXCL, _NLM_F_CREATE = 0x1, 0x4, 0x100, 0x200, 0x400
_IFA_ADDRESS, _IFA_LOCAL = 1, 2
_RTM_NEWLINK, _RTM_SETLINK, _AF_BRIDGE, _NLA_F_NESTED = 16, 19, 7, 0x8000
_IFLA_ADDRESS, _IFLA_IFNAME, _IFLA_MTU, _IFLA_MASTER, _IFLA_PROTINFO, _IFLA_LINKINFO, _IFLA_NET_NS_FD = 1, 3, 4, 10, 12, 18, 28
_IFLA_INFO_KIND, _IFLA_INFO_DATA, _VETH_INFO_PEER, _IFLA_BRPORT_MODE = 1, 2, 1, 4
_BRIDGES: dict[tuple[int, str], int] = {}   # (namespace inode, name) -> index of a bridge seen up
_RTA_DST, _RTA_OIF, _RTA_GATEWAY, _RTA_PREFSRC, _RTA_METRICS, _RTA_TABLE, _RTAX_MTU = 1, 4, 5, 7, 8, 15, 2


def _link_kind(msg: Any) -> str | None:
    info = msg.get("IFLA_LINKINFO")
    return info.get("IFLA_INFO_KIND") if info else None


def _dst(dst: str) -> str:
    if dst == "default":
        return "0.0.0.0/0"
    return str(ipaddress.ip_network(dst, strict=False))


def _sysctl_path(key: str) -> str:
    """``net.ipv4.ip_forward`` or, for names holding dots (``flannel.1``), the slash form
    ``net/ipv4/conf/flannel.1/proxy_arp``."""
    if not key.startswith(("net.", "net/")):
        raise ValueError(f"only net.* sysctls are per namespace, not {key!r}")
    return "/proc/sys/" + (key if "/" in key else key.replace(".", "/"))


def set_sysctl(key: str, value: str | int, netns_path: str | None = None, label: str = "") -> str:
    """Write a ``net.*`` sysctl inside ``netns_path`` (the file is opened from inside it,
    which is what makes /proc/sys/net per namespace); return the old value."""
    path = _sysctl_path(key)
    try:
        with proc.netns(netns_path):
            with open(path, "r+") as f:
                old = f.read().strip()
                f.seek(0)
                f.write(f"{value}\n")
    except OSError as e:
        raise NetlinkError(f"sysctl {key}={value} in {label or netns_path}: {e.strerror}") from None
    return old


def get_sysctl(key: str, netns_path: str | None = None, label: str = "") -> str:
    try:
        with proc.netns(netns_path):
            with open(_sysctl_path(key)) as f:
                return f.read().strip()
    except OSError as e:
        raise NetlinkError(f"read sysctl {key} in {label or netns_path}: {e.strerror}") from None


def ip_batch(commands: Iterable[str], where: str, netns_path: str | None = None) -> None:
    """Many link changes in one ``ip -batch`` (one program, one netlink socket): what the
    underlay uses for hundreds of links at once, where a request each would cost a Python
    round trip per link. Raises CommandError naming ``where`` if any line fails."""
    text = "".join(c.rstrip("\n") + "\n" for c in commands)
    if text:
        proc.run(["ip", "-batch", "-"], input=text, netns=netns_path, where=where)
