"""Calico-style IP-in-IP without an ipip device: tc BPF programs on a node's underlay.

The kernel here has no ``ipip`` device (``tunl0``), so ``ipipMode`` is built from two
programs in ``bpf/ipip_tc.c`` attached with a ``clsact`` qdisc to the node's ``eth0``:
egress encapsulates packets for remote pod CIDRs, ingress decapsulates packets from peer
nodes. The remote pod CIDRs stay routed host-gw style (``via <node> dev eth0``), so the
kernel fills in the underlay MAC address and the program only inserts the outer header.
tc egress was chosen over route encap (``lwt_xmit``) because it keeps GSO working (see the
comment at the top of the C source).

Each node loads its own copy of the object, with its maps pinned under a directory the
caller gives (on a bpffs mount the caller owns), so nodes and clusters never share maps.
The tunnel table is changed through ``bpf(2)`` on the pinned maps (ctypes, no fork per
entry); loading and attaching use ``bpftool`` and ``tc`` inside the node's namespace.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import hashlib
import ipaddress
import logging
import os
import pathlib
import platform
import re
import struct
import subprocess
from typing import Iterator, Mapping

import psutil

from . import naming, proc
from .netutil import Netns
from .errors import (CommandError, K8sNetLabError, KernelFeatureMissing, NetlinkError,
                     SpecError)

log = logging.getLogger(__name__)

SOURCE = pathlib.Path(__file__).resolve().parent / "bpf" / "ipip_tc.c"
CACHE_DIR = pathlib.Path("/var/cache/k8snetlab/bpf")
CFLAGS = ("-O2", "-g", "-Wall", "-target", "bpf")

ENCAP_PROG = "knl_ipip_encap"      # tc egress
DECAP_PROG = "knl_ipip_decap"      # tc ingress
TUNNELS_MAP = "knl_tunnels"
PEERS_MAP = "knl_peers"
STATS_MAP = "knl_stats"
STAT_NAMES = ("encap", "encap_err", "decap", "decap_err")   # enum knl_stat, in order
FILTER_PREF = 1000                  # tc priority of our two filters; detach deletes only these

TUNNEL_KEY = struct.Struct("=I4s")  # struct knl_tunnel_key: host-order prefixlen, be32 addr
TUNNEL_VALUE = struct.Struct("4s4s")  # struct knl_tunnel: be32 remote, be32 local
PEER_KEY_SIZE, PEER_VALUE = 4, b"\x01"

BPF_FS_TYPE = "bpf"


class BpfError(K8sNetLabError):
    """Loading, attaching or changing the eBPF IPIP datapath failed."""


# --- key/value packing (pure, unit-tested) -------------------------------------------------

def _ipv4(text: str, what: str) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(text)
    except ValueError:
        raise SpecError(f"invalid {what} {text!r}: expected an IPv4 address such as 192.168.1.2") \
            from None


def pack_tunnel_key(cidr: str | ipaddress.IPv4Network) -> bytes:
    """LPM trie key for a pod CIDR: prefix length in host order, network in network order."""
    try:
        net = cidr if isinstance(cidr, ipaddress.IPv4Network) else ipaddress.IPv4Network(cidr, strict=True)
    except ValueError as e:
        raise SpecError(f"invalid pod CIDR {cidr!r} for the IPIP tunnel map: {e}") from None
    return TUNNEL_KEY.pack(net.prefixlen, net.network_address.packed)


def unpack_tunnel_key(raw: bytes) -> str:
    prefixlen, addr = TUNNEL_KEY.unpack(raw)
    return str(ipaddress.IPv4Network((ipaddress.IPv4Address(addr), prefixlen)))


def pack_tunnel_value(remote_ip: str, local_ip: str) -> bytes:
    return TUNNEL_VALUE.pack(_ipv4(remote_ip, "remote node IP").packed,
                             _ipv4(local_ip, "local node IP").packed)


def unpack_tunnel_value(raw: bytes) -> tuple[str, str]:
    """(remote, local) node addresses of a tunnel entry."""
    remote, local = TUNNEL_VALUE.unpack(raw)
    return str(ipaddress.IPv4Address(remote)), str(ipaddress.IPv4Address(local))


def pack_peer_key(ip: str) -> bytes:
    return _ipv4(ip, "peer node IP").packed


def unpack_peer_key(raw: bytes) -> str:
    return str(ipaddress.IPv4Address(raw))


def sum_percpu_u64(raw: bytes, ncpus: int) -> int:
    """Total of one per-CPU u64 map value (each CPU's slot is 8 bytes)."""
    return sum(struct.unpack(f"={ncpus}Q", raw[:8 * ncpus]))


def parse_cpu_list(text: str) -> int:
    """Number of CPUs in a kernel CPU list such as '0-1' or '0,2-5'."""
    n = 0
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        n += int(hi or lo) - int(lo) + 1
    return n


def possible_cpus() -> int:
    with open("/sys/devices/system/cpu/possible") as f:
        return parse_cpu_list(f.read())


def object_name(source: bytes, clang_version: str, flags: tuple[str, ...], stem: str = "ipip_tc") -> str:
    """Cache file name of a compiled object: changes with the source, compiler and flags."""
    digest = hashlib.sha256()
    for part in (source, clang_version.encode(), " ".join(flags).encode()):
        digest.update(part)
        digest.update(b"\0")
    return f"{stem}-{digest.hexdigest()[:16]}.o"


def fs_type_at(path: str, mounts: list[tuple[str, str]] | None = None) -> tuple[str, str] | None:
    """(mount point, fs type) of the mount holding ``path`` (the last, innermost match);
    ``mounts``: (mount point, fs type) in mount order, by default this namespace's."""
    if mounts is None:
        mounts = [(p.mountpoint, p.fstype) for p in psutil.disk_partitions(all=True)]
    real = os.path.realpath(path)
    best: tuple[str, str] | None = None
    for point, fstype in mounts:
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= len(best[0])):
            best = (point, fstype)
    return best


# --- compiling -----------------------------------------------------------------------------

def _multiarch(clang: str) -> str:
    out = proc.run([clang, "-print-multiarch"], check=False).stdout.strip()
    if out:
        return out
    return {"x86_64": "x86_64-linux-gnu", "aarch64": "aarch64-linux-gnu"}.get(
        platform.machine(), f"{platform.machine()}-linux-gnu")


def compile_object(force: bool = False) -> pathlib.Path:
    """Compile ``bpf/ipip_tc.c`` (cached); return the .o."""
    return compile_cached(SOURCE, force=force)


def compile_cached(src: pathlib.Path, extra_flags: tuple[str, ...] = (), force: bool = False) -> pathlib.Path:
    """Compile one of our BPF C files with clang, cached by a hash of the source, the compiler
    and the flags (``extra_flags``: e.g. ``-D`` values); return the .o."""
    clang = proc.require("clang")["clang"]
    version = proc.run([clang, "--version"]).stdout
    flags = (*CFLAGS, f"-I/usr/include/{_multiarch(clang)}", *extra_flags)
    out = CACHE_DIR / object_name(src.read_bytes(), version, flags, src.stem)
    if out.exists() and not force:
        return out
    try:
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BpfError(f"cannot create the BPF object cache {CACHE_DIR}: {e.strerror}") from None
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    log.info("compiling %s -> %s", src.name, out)
    try:
        proc.run([clang, *flags, "-c", str(src), "-o", str(tmp)], where=f"compiling {src.name}")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


# --- bpf(2) on pinned maps -----------------------------------------------------------------

BPF_MAP_LOOKUP_ELEM, BPF_MAP_UPDATE_ELEM, BPF_MAP_DELETE_ELEM, BPF_MAP_GET_NEXT_KEY = 1, 2, 3, 4
BPF_OBJ_GET, BPF_OBJ_GET_INFO_BY_FD = 7, 15
BPF_ANY = 0

_NR_BPF = {"x86_64": 321, "aarch64": 280, "riscv64": 280, "loongarch64": 280, "ppc64le": 361,
           "s390x": 351, "i686": 357, "armv7l": 386}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _ObjGetAttr(ctypes.Structure):
    _fields_ = [("pathname", ctypes.c_uint64), ("bpf_fd", ctypes.c_uint32),
                ("file_flags", ctypes.c_uint32)]


class _ElemAttr(ctypes.Structure):
    _fields_ = [("map_fd", ctypes.c_uint32), ("_pad", ctypes.c_uint32),
                ("key", ctypes.c_uint64), ("value", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


class _InfoAttr(ctypes.Structure):
    _fields_ = [("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32),
                ("info", ctypes.c_uint64)]


class _MapInfo(ctypes.Structure):     # the head of struct bpf_map_info
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32),
                ("key_size", ctypes.c_uint32), ("value_size", ctypes.c_uint32),
                ("max_entries", ctypes.c_uint32), ("map_flags", ctypes.c_uint32),
                ("name", ctypes.c_char * 16)]


def _bpf(cmd: int, attr: ctypes.Structure) -> int:
    """Call bpf(2); return its result or raise OSError with errno."""
    nr = _NR_BPF.get(platform.machine())
    if nr is None:
        raise KernelFeatureMissing(f"bpf(2) syscall number unknown for {platform.machine()}")
    ret = _libc.syscall(ctypes.c_long(nr), ctypes.c_int(cmd), ctypes.byref(attr),
                        ctypes.c_uint(ctypes.sizeof(attr)))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def _buf(data: bytes | int) -> ctypes.Array:
    return ctypes.create_string_buffer(data, len(data)) if isinstance(data, bytes) \
        else ctypes.create_string_buffer(data)


class PinnedMap:
    """A BPF map opened from its bpffs pin: lookup, update, delete, iterate keys.

    For a per-CPU map give ``ncpus``: a lookup then returns one 8-byte-aligned slot per
    possible CPU.
    """

    def __init__(self, path: str, key_size: int, value_size: int, ncpus: int | None = None):
        self.path = path
        attr = _ObjGetAttr()
        path_buf = ctypes.create_string_buffer(os.fsencode(path))
        attr.pathname = ctypes.addressof(path_buf)
        try:
            self.fd = _bpf(BPF_OBJ_GET, attr)
        except OSError as e:
            raise BpfError(f"cannot open BPF map pinned at {path}: {e.strerror}"
                           " (is the datapath attached?)") from None
        try:
            info = self.info()
        except OSError as e:
            os.close(self.fd)
            raise BpfError(f"cannot read BPF map info of {path}: {e.strerror}") from None
        if (info.key_size, info.value_size) != (key_size, value_size):
            os.close(self.fd)
            raise BpfError(f"BPF map {path} has key/value size {info.key_size}/"
                           f"{info.value_size}, expected {key_size}/{value_size}: "
                           "the object and k8snetlab/ebpf.py disagree")
        self.key_size, self.value_size = key_size, value_size
        self.buf_size = value_size if ncpus is None else (value_size + 7) // 8 * 8 * ncpus

    def info(self) -> _MapInfo:
        info = _MapInfo()
        attr = _InfoAttr(bpf_fd=self.fd, info_len=ctypes.sizeof(info),
                         info=ctypes.addressof(info))
        _bpf(BPF_OBJ_GET_INFO_BY_FD, attr)
        return info

    def _elem(self, what: str, cmd: int, key: ctypes.Array | None, value: ctypes.Array | None,
              flags: int = 0) -> bool:
        """One element operation; False if there is no such key (ENOENT), BpfError on any
        other failure."""
        attr = _ElemAttr(map_fd=self.fd, flags=flags)
        attr.key = ctypes.addressof(key) if key is not None else 0
        attr.value = ctypes.addressof(value) if value is not None else 0
        try:
            _bpf(cmd, attr)
        except OSError as e:
            if e.errno == errno.ENOENT:
                return False
            raise BpfError(f"BPF map {what} failed on {self.path}: {e.strerror}") from None
        return True

    def update(self, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
        if not self._elem("update", BPF_MAP_UPDATE_ELEM, _buf(key), _buf(value), flags):
            raise BpfError(f"BPF map update failed on {self.path}: {os.strerror(errno.ENOENT)}")

    def delete(self, key: bytes) -> bool:
        """Remove ``key``; False if it was not there."""
        return self._elem("delete", BPF_MAP_DELETE_ELEM, _buf(key), None)

    def lookup(self, key: bytes) -> bytes | None:
        value = _buf(self.buf_size)
        return value.raw if self._elem("lookup", BPF_MAP_LOOKUP_ELEM, _buf(key), value) else None

    def keys(self) -> Iterator[bytes]:
        key: ctypes.Array | None = None
        while True:
            nxt = _buf(self.key_size)
            if not self._elem("iteration", BPF_MAP_GET_NEXT_KEY, key, nxt):
                return
            yield nxt.raw
            key = nxt

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        for key in list(self.keys()):        # snapshot: entries may change while we read
            value = self.lookup(key)
            if value is not None:
                yield key, value

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# --- the datapath of one node ----------------------------------------------------------------

_GONE_MARKERS = ("Cannot find device", "No such device", "Cannot find specified qdisc",
                 "No such file or directory", "Invalid handle")


@dataclasses.dataclass
class IpipTcDatapath:
    """tc BPF IP-in-IP on one node's underlay interface."""

    name: str                # node name, for messages
    netns_path: str          # the node's /proc/<pid>/ns/net (or /run/netns/<name>)
    ifname: str              # the node's underlay interface, normally eth0
    local_ip: str            # the node's underlay address: outer source of what it sends
    pin_dir: str             # a directory on a bpffs mount the caller owns
    obj: pathlib.Path | None = None    # compiled object; None: compile_object()
    _maps: dict[str, PinnedMap] = dataclasses.field(default_factory=dict, init=False,
                                                    repr=False)
    _made_pin_dir: bool = dataclasses.field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        _ipv4(self.local_ip, f"underlay address of node {self.name}")

    @property
    def progs_dir(self) -> str:
        return os.path.join(self.pin_dir, "progs")

    @property
    def maps_dir(self) -> str:
        return os.path.join(self.pin_dir, "maps")

    def _tc(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return proc.run(["tc", *args], netns=self.netns_path, check=check,
                        where=f"node {self.name}")

    # attach / detach

    def attach(self) -> None:
        """Load both programs (maps pinned under pin_dir) and hook them to ifname.

        The maps start empty, also on a re-attach: the caller (re)installs tunnels and peers.
        A failed attach removes whatever it had made before the error leaves.
        """
        proc.require("bpftool", "tc")
        obj = self.obj or compile_object()
        where = fs_type_at(self.pin_dir)
        if where is None or where[1] != BPF_FS_TYPE:
            raise BpfError(f"node {self.name}: pin directory {self.pin_dir} is not on a bpffs "
                           "mount: call ebpf.mount_bpffs() on a parent directory first")
        if not os.path.exists(self.netns_path):
            raise BpfError(f"node {self.name}: network namespace {self.netns_path} is gone")
        log.info("node %s: attaching eBPF IPIP on %s (maps in %s)", self.name, self.ifname,
                 self.maps_dir)
        self.close()                      # a re-attach loads new maps
        self._unpin()                     # leftovers of a killed run would make loadall fail
        if not os.path.isdir(self.pin_dir):
            os.makedirs(self.pin_dir)
            self._made_pin_dir = True
        try:
            proc.run(["bpftool", "prog", "loadall", str(obj), self.progs_dir,
                      "type", "classifier", "pinmaps", self.maps_dir],
                     where=f"node {self.name}")
            for prog in (ENCAP_PROG, DECAP_PROG):
                if not os.path.exists(os.path.join(self.progs_dir, prog)):
                    raise BpfError(f"node {self.name}: bpftool did not pin program {prog} in "
                                   f"{self.progs_dir}")
            qdiscs = self._tc("qdisc", "show", "dev", self.ifname).stdout
            if not re.search(r"^qdisc clsact ", qdiscs, re.M):
                self._tc("qdisc", "add", "dev", self.ifname, "clsact")
            for direction, prog in (("egress", ENCAP_PROG), ("ingress", DECAP_PROG)):
                self._tc("filter", "replace", "dev", self.ifname, direction,
                         "pref", str(FILTER_PREF), "handle", "1", "bpf", "da",
                         "object-pinned", os.path.join(self.progs_dir, prog))
        except BaseException:
            log.warning("node %s: eBPF IPIP attach failed, rolling back", self.name)
            self.detach()
            raise

    def attached(self) -> bool:
        """True if both our filters are on the interface."""
        if not os.path.exists(self.netns_path):
            return False
        return all(self._has_filter(d) for d in ("egress", "ingress"))

    def _filters(self, direction: str) -> str | None:
        """`tc filter show` of one direction; None if the device or namespace is gone."""
        try:
            r = self._tc("filter", "show", "dev", self.ifname, direction, check=False)
        except (OSError, subprocess.SubprocessError):      # setns failed: namespace gone
            return None
        if r.returncode != 0:
            if any(m in r.stderr for m in _GONE_MARKERS):
                return None
            raise CommandError(r.args, r.returncode, r.stdout, r.stderr, f"node {self.name}")
        return r.stdout

    def _has_filter(self, direction: str) -> bool:
        out = self._filters(direction)
        return out is not None and f" pref {FILTER_PREF} bpf " in out

    def detach(self) -> None:
        """Remove our filters, the clsact qdisc once it holds no filter, and the pins.

        Idempotent; whatever is already gone (namespace, device, qdisc, pins) is success.
        """
        log.info("node %s: detaching eBPF IPIP from %s", self.name, self.ifname)
        if os.path.exists(self.netns_path):
            try:
                self._detach_tc()
            except (OSError, subprocess.SubprocessError):
                if os.path.exists(self.netns_path):
                    raise
                # the namespace went away under us: its filters went with it
        self.close()
        self._unpin()
        if self._made_pin_dir:
            try:
                os.rmdir(self.pin_dir)
            except FileNotFoundError:
                pass
            except OSError as e:
                log.warning("node %s: left %s in place: %s", self.name, self.pin_dir, e.strerror)
            self._made_pin_dir = False

    def _detach_tc(self) -> None:
        for direction in ("egress", "ingress"):
            if self._has_filter(direction):
                r = self._tc("filter", "del", "dev", self.ifname, direction,
                             "pref", str(FILTER_PREF), check=False)
                if r.returncode != 0 and self._has_filter(direction):
                    raise CommandError(r.args, r.returncode, r.stdout, r.stderr,
                                       f"node {self.name}")
        remaining = [self._filters(d) for d in ("egress", "ingress")]
        if any(out is None for out in remaining):
            return                                          # device gone: nothing to remove
        if any(out and out.strip() for out in remaining):
            log.info("node %s: keeping clsact on %s, it still holds other filters",
                     self.name, self.ifname)
            return
        r = self._tc("qdisc", "del", "dev", self.ifname, "clsact", check=False)
        if r.returncode != 0 and not any(m in r.stderr for m in _GONE_MARKERS):
            raise CommandError(r.args, r.returncode, r.stdout, r.stderr, f"node {self.name}")

    def _unpin(self) -> None:
        for sub in (self.progs_dir, self.maps_dir):
            if not os.path.isdir(sub):
                continue
            for entry in os.listdir(sub):
                try:
                    os.unlink(os.path.join(sub, entry))
                except FileNotFoundError:
                    pass
            try:
                os.rmdir(sub)
            except FileNotFoundError:
                pass

    def close(self) -> None:
        """Close the map file descriptors this object holds (the maps stay pinned)."""
        for m in self._maps.values():
            m.close()
        self._maps.clear()

    # maps

    def _map(self, name: str, key_size: int, value_size: int,
             ncpus: int | None = None) -> PinnedMap:
        m = self._maps.get(name)
        if m is None:
            m = self._maps[name] = PinnedMap(os.path.join(self.maps_dir, name),
                                             key_size, value_size, ncpus)
        return m

    def _tunnels(self) -> PinnedMap:
        return self._map(TUNNELS_MAP, TUNNEL_KEY.size, TUNNEL_VALUE.size)

    def _peers(self) -> PinnedMap:
        return self._map(PEERS_MAP, PEER_KEY_SIZE, len(PEER_VALUE))

    def set_tunnel(self, cidr: str, remote_ip: str) -> None:
        """Send packets for ``cidr`` to node ``remote_ip`` inside IPIP (add or replace)."""
        self._tunnels().update(pack_tunnel_key(cidr), pack_tunnel_value(remote_ip, self.local_ip))
        log.debug("node %s: tunnel %s -> %s", self.name, cidr, remote_ip)

    def add_tunnels(self, tunnels: list[tuple[ipaddress.IPv4Network, ipaddress.IPv4Address]]) -> None:
        """For each (pod CIDR, remote node) what :meth:`add_peer` and then :meth:`set_tunnel`
        do, packed straight from the address objects: a node agent's start at 200 nodes is
        39,800 pairs, and parsing each address back from text was most of their cost."""
        peers, tunnels_map = self._peers(), self._tunnels()
        local = _ipv4(self.local_ip, "local node IP").packed
        for cidr, remote in tunnels:
            peers.update(remote.packed, PEER_VALUE)
            tunnels_map.update(pack_tunnel_key(cidr), TUNNEL_VALUE.pack(remote.packed, local))

    def del_tunnel(self, cidr: str) -> None:
        if self._tunnels().delete(pack_tunnel_key(cidr)):
            log.debug("node %s: tunnel %s removed", self.name, cidr)

    def tunnels(self) -> dict[str, str]:
        """The tunnel map as {pod CIDR: remote node IP}."""
        return {unpack_tunnel_key(k): unpack_tunnel_value(v)[0]
                for k, v in self._tunnels().items()}

    def sync_tunnels(self, wanted: Mapping[str, str]) -> None:
        """Make the tunnel map exactly ``wanted`` ({pod CIDR: remote node IP})."""
        want = {unpack_tunnel_key(pack_tunnel_key(c)): r for c, r in wanted.items()}
        have = self.tunnels()
        for cidr, remote in want.items():
            if have.get(cidr) != remote:
                self.set_tunnel(cidr, remote)
        for cidr in have.keys() - want.keys():
            self.del_tunnel(cidr)

    def add_peer(self, ip: str) -> None:
        """Accept IPIP packets whose outer source is node ``ip``."""
        self._peers().update(pack_peer_key(ip), PEER_VALUE)

    def del_peer(self, ip: str) -> None:
        self._peers().delete(pack_peer_key(ip))

    def peers(self) -> set[str]:
        return {unpack_peer_key(k) for k in self._peers().keys()}

    def stats(self) -> dict[str, int]:
        """Packet counters of the programs: encap, encap_err, decap, decap_err."""
        ncpus = possible_cpus()
        m = self._map(STATS_MAP, 4, 8, ncpus)
        out = {}
        for i, name in enumerate(STAT_NAMES):
            raw = m.lookup(struct.pack("=I", i))
            out[name] = sum_percpu_u64(raw, ncpus) if raw else 0
        return out


# --- bpffs and kernel probes -----------------------------------------------------------------

def _is_bpffs_mountpoint(path: str) -> bool:
    where = fs_type_at(path)
    return where is not None and where[0] == os.path.realpath(path) and where[1] == BPF_FS_TYPE


def mount_bpffs(path: str) -> None:
    """Mount a bpffs at ``path`` (created if needed); nothing to do if one is already there."""
    os.makedirs(path, exist_ok=True)
    if _is_bpffs_mountpoint(path):
        return
    r = proc.run(["mount", "-t", "bpf", "bpf", path], check=False)
    if r.returncode != 0:
        detail = (r.stderr or r.stdout).strip().splitlines()
        raise KernelFeatureMissing(
            f"cannot mount bpffs at {path} ({detail[-1] if detail else f'exit {r.returncode}'}):"
            " the eBPF IPIP datapath needs root and a kernel with CONFIG_BPF_SYSCALL")
    log.debug("mounted bpffs at %s", path)


def umount_bpffs(path: str) -> None:
    """Unmount the bpffs at ``path`` (lazily); nothing to do if none is mounted there."""
    for _ in range(8):                      # stacked mounts: take them all off
        if not os.path.exists(path) or not _is_bpffs_mountpoint(path):
            return
        proc.run(["umount", "-l", path])
        log.debug("unmounted bpffs at %s", path)
    raise BpfError(f"bpffs still mounted at {path} after 8 unmounts")


def kernel_has_ipip(netns_path: str) -> bool:
    """True if an ``ipip`` device can be created in the namespace (it is deleted again).

    Where the kernel has ipip, the first such device also brings up the fallback ``tunl0`` in
    that namespace; it stays (Calico uses it anyway).
    """
    if not os.path.exists(netns_path):
        raise NetlinkError(f"cannot probe for ipip: network namespace {netns_path} is gone")
    probe = naming.check_ifname(f"{naming.PREFIX}ipip{os.getpid() % 100000}")
    with Netns(netns_path, "probing for ipip") as ns:
        found = ns.can_create("ipip", probe)
    if not found:
        log.debug("kernel has no ipip device")   # the caller says what follows
    return found


def have_tools() -> str | None:
    """None if clang, bpftool and tc are installed, else the one line naming the missing one."""
    try:
        proc.require("clang", "bpftool", "tc")
    except K8sNetLabError as e:
        return str(e)
    return None


__all__ = [
    "BpfError", "IpipTcDatapath", "PinnedMap", "compile_object", "kernel_has_ipip",
    "mount_bpffs", "umount_bpffs", "pack_tunnel_key", "unpack_tunnel_key", "pack_tunnel_value",
    "unpack_tunnel_value", "pack_peer_key", "unpack_peer_key", "have_tools",
]
