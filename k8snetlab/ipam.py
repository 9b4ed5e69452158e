"""Host-local IPAM: which pod holds which IP of a node's pod CIDR, kept on disk.

The address book behind every CNI plugin of the testbed, behaving like the reference
``host-local`` plugin (round-robin allocation from range sets, one file per address, an
``flock``-ed directory it can share with host-local itself). The on-disk layout and the
locking are described at :class:`HostLocalStore`; error codes follow the CNI spec.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path
from typing import Iterator, Sequence

from .errors import K8sNetLabError

log = logging.getLogger(__name__)

DEFAULT_DATA_DIR = "/var/lib/cni/networks"   # host-local's default
LOCK_FILE = "lock"
LAST_RESERVED_PREFIX = "last_reserved_ip."
TMP_PREFIX = ".tmp-"
LINE_SEP = "\r\n"          # host-local writes "\r\n"; both are read

_NETWORK_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")
_RANGE_KEYS = ("subnet", "rangeStart", "rangeEnd", "gateway")
_MAX_OWNER_FILE = 4096   # an IP file is a container id and an interface name


class IPAMError(K8sNetLabError):
    """An address could not be allocated, released or read.

    ``code`` is the CNI well-known error code a plugin should return, ``msg`` the one
    line for a person (also ``str(e)``), ``details`` optional extra text.
    """

    INVALID_ENV = 4          # CNI_CONTAINERID / CNI_IFNAME unusable (empty, newline)
    IO_FAILURE = 5           # the state directory cannot be read or written
    INVALID_CONFIG = 7       # bad range, requested IP outside the ranges or a gateway
    UNSUPPORTED_FIELD = 2    # an unknown key in a range object
    TRY_AGAIN_LATER = 11     # range exhausted, requested IP held by another container,
                             # state locked too long: all clear when pods go away

    def __init__(self, msg: str, code: int, details: str = ""):
        self.msg, self.code, self.details = msg, code, details
        super().__init__(msg)


# --------------------------------------------------------------------------- ranges

def _addr(value: object, what: str) -> IPv4Address:
    if isinstance(value, IPv4Address):
        return value
    try:
        return IPv4Address(str(value).strip())
    except ValueError:
        raise IPAMError(f"IPAM range: {what} {value!r} is not an IPv4 address "
                        f"(write it like '10.244.1.10')", IPAMError.INVALID_CONFIG) from None


@dataclass(frozen=True)
class Range:
    """One pool of addresses: ``subnet`` and the inclusive part ``range_start..range_end``.

    Defaults as host-local: ``gateway`` is the first address of the subnet, the range
    runs from the first address (the gateway is skipped when handing out) to the last
    one before the broadcast address. Strings are accepted and converted; after
    construction every field is set.
    """

    subnet: IPv4Network
    range_start: IPv4Address | None = None
    range_end: IPv4Address | None = None
    gateway: IPv4Address | None = None

    def __post_init__(self) -> None:
        subnet = self.subnet
        if not isinstance(subnet, IPv4Network):
            try:
                # strict=False: host-local accepts "10.244.1.1/24" as 10.244.1.0/24
                subnet = IPv4Network(str(subnet).strip(), strict=False)
            except ValueError:
                raise IPAMError(f"IPAM range: subnet {self.subnet!r} is not an IPv4 CIDR "
                                f"(write it like '10.244.1.0/24')",
                                IPAMError.INVALID_CONFIG) from None
        if subnet.prefixlen > 30:
            raise IPAMError(f"IPAM range: subnet {subnet} is too small to allocate from "
                            f"(use a /30 or larger)", IPAMError.INVALID_CONFIG)
        first, last = subnet.network_address + 1, subnet.broadcast_address - 1
        gateway = first if self.gateway is None else _addr(self.gateway, "gateway")
        start = first if self.range_start is None else _addr(self.range_start, "rangeStart")
        end = last if self.range_end is None else _addr(self.range_end, "rangeEnd")
        for what, ip in (("gateway", gateway), ("rangeStart", start), ("rangeEnd", end)):
            if ip not in subnet:
                raise IPAMError(f"IPAM range: {what} {ip} is not in subnet {subnet} "
                                f"(pick an address inside it or leave {what} out)",
                                IPAMError.INVALID_CONFIG)
        if gateway in (subnet.network_address, subnet.broadcast_address):
            raise IPAMError(f"IPAM range: gateway {gateway} is the network or broadcast "
                            f"address of {subnet} (leave it out for {first})",
                            IPAMError.INVALID_CONFIG)
        if start > end:
            raise IPAMError(f"IPAM range: rangeStart {start} is after rangeEnd {end} "
                            f"in {subnet} (swap them)", IPAMError.INVALID_CONFIG)
        object.__setattr__(self, "subnet", subnet)
        object.__setattr__(self, "gateway", gateway)
        object.__setattr__(self, "range_start", start)
        object.__setattr__(self, "range_end", end)

    @classmethod
    def from_conf(cls, d: dict) -> "Range":
        """A range object of a CNI ``ipam`` section: ``subnet`` (required),
        ``rangeStart``, ``rangeEnd``, ``gateway``."""
        if not isinstance(d, dict):
            raise IPAMError(f"IPAM range: expected an object like "
                            f"{{\"subnet\": \"10.244.1.0/24\"}}, got {d!r}",
                            IPAMError.INVALID_CONFIG)
        unknown = sorted(set(d) - set(_RANGE_KEYS))
        if unknown:
            raise IPAMError(f"IPAM range: unsupported key {unknown[0]!r}="
                            f"{d[unknown[0]]!r} (valid keys: {', '.join(_RANGE_KEYS)})",
                            IPAMError.UNSUPPORTED_FIELD)
        if not d.get("subnet"):
            raise IPAMError("IPAM range: 'subnet' is required "
                            "(for example \"subnet\": \"10.244.1.0/24\")",
                            IPAMError.INVALID_CONFIG)
        return cls(subnet=d["subnet"], range_start=d.get("rangeStart"),
                   range_end=d.get("rangeEnd"), gateway=d.get("gateway"))

    def contains(self, ip: IPv4Address) -> bool:
        """True if ``ip`` lies within ``range_start..range_end``."""
        a, b = _bounds(self)
        return a <= int(ip) <= b

    def __str__(self) -> str:
        return f"{self.subnet} ({self.range_start}-{self.range_end})"


def rangesets_from_conf(ipam: dict) -> list[list[Range]]:
    """The range sets of a CNI ``ipam`` section, like host-local reads them.

    ``ranges`` is a list of range sets (one address is allocated from each); the
    deprecated form with ``subnet`` etc. at the top level is one set of one range.
    """
    if "ranges" in ipam:
        sets = ipam["ranges"]
        if not isinstance(sets, list) or not sets or not all(
                isinstance(s, list) and s for s in sets):
            raise IPAMError("IPAM: 'ranges' must be a non-empty list of non-empty lists "
                            "of range objects ([[{\"subnet\": \"10.244.1.0/24\"}]])",
                            IPAMError.INVALID_CONFIG)
        return [[Range.from_conf(r) for r in s] for s in sets]
    if "subnet" in ipam:
        return [[Range.from_conf({k: ipam[k] for k in _RANGE_KEYS if k in ipam})]]
    raise IPAMError("IPAM: no 'ranges' (or 'subnet') in the ipam section "
                    "(add \"ranges\": [[{\"subnet\": \"10.244.1.0/24\"}]])",
                    IPAMError.INVALID_CONFIG)


def _check_rangeset(ranges: Sequence[Range]) -> None:
    if not ranges:
        raise IPAMError("IPAM: empty range set (give at least one range)",
                        IPAMError.INVALID_CONFIG)
    for i, a in enumerate(ranges):
        if not isinstance(a, Range):
            raise IPAMError(f"IPAM: range set entry {a!r} is not a Range "
                            f"(build it with Range.from_conf)", IPAMError.INVALID_CONFIG)
        for b in ranges[:i]:
            (a0, a1), (b0, b1) = _bounds(a), _bounds(b)
            if a0 <= b1 and b0 <= a1:
                raise IPAMError(f"IPAM: ranges {b} and {a} overlap "
                                f"(make them disjoint)", IPAMError.INVALID_CONFIG)


def _bounds(r: Range) -> tuple[int, int]:
    assert r.range_start is not None and r.range_end is not None   # set by __post_init__
    return int(r.range_start), int(r.range_end)


def _rangeset_str(ranges: Sequence[Range]) -> str:
    return ", ".join(str(r) for r in ranges)


@dataclass(frozen=True)
class Allocation:
    """An address handed out: ``address`` carries the prefix length of its subnet."""

    address: IPv4Interface
    gateway: IPv4Address | None
    range: Range


# --------------------------------------------------------------------------- store

def _parse_owner(text: str) -> tuple[str, str] | None:
    """``(container_id, ifname)`` from an IP file; ``(id, "")`` for the legacy form;
    None if the content is not a reservation."""
    lines = text.replace("\r\n", "\n").strip().split("\n")
    if len(lines) == 1 and lines[0].strip():
        return lines[0].strip(), ""
    if len(lines) == 2 and lines[0].strip() and lines[1].strip():
        return lines[0].strip(), lines[1].strip()
    return None


def _check_owner(container_id: str, ifname: str) -> None:
    for what, value in (("container id (CNI_CONTAINERID)", container_id),
                        ("interface name (CNI_IFNAME)", ifname)):
        if not isinstance(value, str) or not value.strip() or value != value.strip() \
                or "\n" in value or "\r" in value:
            raise IPAMError(f"IPAM: invalid {what} {value!r} (it must be non-empty, "
                            f"one line, without surrounding spaces)", IPAMError.INVALID_ENV)


class HostLocalStore:
    """The allocations of one network (CNI ``name``) on one node.

    Holds no open files or cached state between calls: any number of instances, in any
    number of threads and processes, can work on the same directory at once.
    ``lock_timeout`` (seconds, None = wait forever) bounds the wait for the lock.

    Addresses come loosely round robin, starting after the last one reserved, so a
    crash-looping pod does not get the same IP back until the range has been run through;
    the gateway, the network and the broadcast address are never handed out.

    Where the state lives
        ``<data_dir>/<network>/`` (host-local's default ``data_dir`` is
        ``/var/lib/cni/networks``; the testbed uses a directory under its own state root).

    Files in that directory
        ``<ip>``                   one per allocated address, named by the dotted IPv4
                                   address; content ``<container_id>\\n<ifname>``. A file
                                   holding only ``<container_id>`` (written by old host-local
                                   versions) is read as owned by that container on any
                                   interface. ``\\r\\n`` (today's host-local) is read too.
        ``last_reserved_ip.<n>``   the address last handed out from range set ``n``
                                   (the index of the set in the config's ``ranges`` list).
        ``lock``                   empty; ``flock(2)``-ed for every operation.
        ``.tmp-*``                 a file being written; a leftover of a crashed writer is
                                   removed by the next allocation.

        Any other name is not ours and is left alone (logged at debug level). An ``<ip>``
        file whose content is not one of the forms above (for instance empty) still keeps
        its address out of use, is listed by :meth:`HostLocalStore.allocations` with the
        owner ``("", "")``, logs a warning, and is released by :meth:`HostLocalStore.gc`.

    Locking and atomic writes
        Every operation holds an exclusive ``flock`` on ``lock`` for its whole duration, on
        a descriptor opened for that operation only: flock excludes other processes *and*
        other threads of this one, and a process that dies holding it loses it. That is the
        lock host-local takes, so both can share a directory. An ``<ip>`` file is written to
        a temporary file, then ``link(2)``-ed to its name: the link fails if the name exists
        and the file appears complete or not at all, so a crash never leaves a half-written
        reservation and one address is never reserved twice. ``last_reserved_ip`` is written
        to a temporary file and renamed over. Nothing is fsync-ed (nor does host-local): a
        process that dies leaves the page cache intact, and what a power loss would lose is
        the namespaces the addresses belong to as well; an fsync per pod on a journalled
        filesystem was most of an ADD's wall time.
    """

    def __init__(self, data_dir: str | os.PathLike, network: str,
                 lock_timeout: float | None = 60.0):
        if not isinstance(network, str) or not _NETWORK_NAME_RE.match(network) \
                or network in (".", ".."):
            raise IPAMError(f"IPAM: network name {network!r} cannot name a state directory "
                            f"(use letters, digits, '-', '_' and '.')",
                            IPAMError.INVALID_CONFIG)
        self.network = network
        self.dir = Path(data_dir) / network
        self.lock_timeout = lock_timeout

    def __repr__(self) -> str:
        return f"HostLocalStore({str(self.dir)!r})"

    # ----------------------------------------------------------------- public API

    def allocate(self, container_id: str, ifname: str, ranges: Sequence[Range],
                 request: IPv4Address | None = None, *, rangeset_index: int = 0
                 ) -> Allocation:
        """Reserve one address of the range set ``ranges`` for ``(container_id, ifname)``.

        If the pair already holds an address in these ranges, that one is returned
        (ADD retried after a lost reply gets the same IP). ``request`` asks for one
        address (CNI_ARGS ``IP=``); ``rangeset_index`` names the ``last_reserved_ip``
        file, as host-local numbers its range sets.
        """
        _check_owner(container_id, ifname)
        if not isinstance(rangeset_index, int) or rangeset_index < 0:
            raise IPAMError(f"IPAM: rangeset_index {rangeset_index!r} must be the index "
                            f"(0, 1, ...) of the range set in 'ranges'",
                            IPAMError.INVALID_CONFIG)
        ranges = list(ranges)
        _check_rangeset(ranges)
        gateways = {r.gateway for r in ranges}
        if request is not None:
            request = _addr(request, "requested IP")
            self._check_request(request, ranges, gateways)

        with self._io(f"allocating an address for {container_id}/{ifname}"), self._locked():
            self._remove_stale_tmp()
            owners = self._scan()
            held = sorted(ip for ip, who in owners.items()
                          if who == (container_id, ifname)
                          and any(r.contains(ip) for r in ranges))
            if held:
                ip = request if request in held else held[0]
                if request is not None and request != ip:
                    raise IPAMError(
                        f"IPAM: {container_id}/{ifname} already holds {ip} in network "
                        f"'{self.network}', not the requested {request} (release it first)",
                        IPAMError.INVALID_CONFIG)
                log.debug("%s/%s already holds %s", container_id, ifname, ip)
                return self._allocation(ip, ranges)

            if request is not None:
                if request in owners or not self._reserve(request, container_id, ifname):
                    who = owners.get(request, ("?", "?"))
                    raise IPAMError(
                        f"IPAM: requested IP {request} in network '{self.network}' is held "
                        f"by {who[0] or '?'}/{who[1] or '?'} (release that pod first, or "
                        f"request another address)", IPAMError.TRY_AGAIN_LATER)
                self._write_last_reserved(rangeset_index, request)
                log.debug("allocated requested %s to %s/%s", request, container_id, ifname)
                return self._allocation(request, ranges)

            start = self._read_last_reserved(rangeset_index, ranges)
            for ip in self._candidates(ranges, start):
                if ip in owners or ip in gateways:
                    continue
                if self._reserve(ip, container_id, ifname):
                    self._write_last_reserved(rangeset_index, ip)
                    log.debug("allocated %s to %s/%s", ip, container_id, ifname)
                    return self._allocation(ip, ranges)
                owners[ip] = ("", "")   # appeared behind our back: someone ignores the lock
        raise IPAMError(
            f"IPAM: no free address in range set {_rangeset_str(ranges)} of network "
            f"'{self.network}' (delete pods, run gc, or widen rangeStart/rangeEnd)",
            IPAMError.TRY_AGAIN_LATER)

    def release(self, container_id: str, ifname: str) -> list[IPv4Address]:
        """Free every address of ``(container_id, ifname)``; releasing nothing succeeds.

        Like host-local, reservations written without an interface name are released
        for their container id when no exact match exists.
        """
        _check_owner(container_id, ifname)
        with self._io(f"releasing the addresses of {container_id}/{ifname}"), \
                self._locked(create=False):
            owners = self._scan()
            ips = [ip for ip, who in owners.items() if who == (container_id, ifname)]
            if not ips:
                ips = [ip for ip, who in owners.items() if who == (container_id, "")]
            for ip in sorted(ips):
                self._unlink(ip)
                log.debug("released %s of %s/%s", ip, container_id, ifname)
            return sorted(ips)

    def get(self, container_id: str, ifname: str) -> IPv4Address | None:
        """The (lowest) address held by ``(container_id, ifname)``, or None."""
        _check_owner(container_id, ifname)
        with self._io(f"reading the addresses of {container_id}/{ifname}"), \
                self._locked(create=False):
            owners = self._scan()
        exact = sorted(ip for ip, who in owners.items() if who == (container_id, ifname))
        legacy = sorted(ip for ip, who in owners.items() if who == (container_id, ""))
        return (exact or legacy or [None])[0]

    def allocations(self) -> dict[IPv4Address, tuple[str, str]]:
        """Every reserved address and its ``(container_id, ifname)``, in address order.

        ``ifname`` is "" for a legacy reservation; ``("", "")`` marks a file whose owner
        cannot be read (the address stays reserved until gc or a person removes it).
        """
        with self._io("listing allocations"), self._locked(create=False):
            owners = self._scan()
        return dict(sorted(owners.items()))

    def gc(self, valid: set[tuple[str, str]]) -> list[IPv4Address]:
        """CNI 1.1 GC: release every address whose owner is not in ``valid``.

        ``valid`` holds the ``(container_id, ifname)`` attachments the runtime still
        has. A legacy reservation (no ifname) is kept if its container id appears in
        ``valid``; an unreadable one is released. The lock, ``last_reserved_ip`` and
        foreign files are left alone.
        """
        valid = {(str(c), str(i)) for c, i in valid}
        valid_ids = {c for c, _ in valid}
        with self._io("garbage-collecting allocations"), self._locked(create=False):
            owners = self._scan()
            stale = []
            for ip, (cid, ifname) in sorted(owners.items()):
                if (cid, ifname) in valid or (cid and not ifname and cid in valid_ids):
                    continue
                self._unlink(ip)
                stale.append(ip)
                log.info("gc released %s of %s/%s", ip, cid or "?", ifname or "?")
            return stale

    def remove_all(self) -> None:
        """Delete the network's state directory (cluster teardown); missing is fine."""
        with self._io("removing the IPAM state"):
            if not self.dir.exists():
                return
            with self._locked(create=False), contextlib.suppress(FileNotFoundError):
                shutil.rmtree(self.dir)
            log.info("removed IPAM state %s", self.dir)

    # ----------------------------------------------------------------- internals

    def _check_request(self, ip: IPv4Address, ranges: list[Range],
                       gateways: set[IPv4Address]) -> None:
        r = next((r for r in ranges if r.contains(ip)), None)
        if r is None:
            raise IPAMError(f"IPAM: requested IP {ip} is not in range set "
                            f"{_rangeset_str(ranges)} (request an address inside it)",
                            IPAMError.INVALID_CONFIG)
        if ip in gateways or ip in (r.subnet.network_address, r.subnet.broadcast_address):
            raise IPAMError(f"IPAM: requested IP {ip} is the gateway, network or broadcast "
                            f"address of {r.subnet} (request another address)",
                            IPAMError.INVALID_CONFIG)

    @staticmethod
    def _allocation(ip: IPv4Address, ranges: list[Range]) -> Allocation:
        r = next(r for r in ranges if r.contains(ip))
        return Allocation(IPv4Interface(f"{ip}/{r.subnet.prefixlen}"), r.gateway, r)

    @staticmethod
    def _candidates(ranges: list[Range], last: IPv4Address | None) -> Iterator[IPv4Address]:
        """Every address of the set once, starting after ``last`` (round robin) or at
        the start of the first range; network and broadcast addresses skipped."""
        spans = [(*_bounds(r), r) for r in ranges]
        k, first = 0, spans[0][0]
        if last is not None:
            k = next(i for i, (a, b, _) in enumerate(spans) if a <= int(last) <= b)
            first = int(last) + 1
        order = [(first, spans[k][1], spans[k][2])]
        order += [spans[(k + j) % len(spans)] for j in range(1, len(spans))]
        if last is not None:
            order.append((spans[k][0], int(last), spans[k][2]))
        for a, b, r in order:
            net, bcast = int(r.subnet.network_address), int(r.subnet.broadcast_address)
            for n in range(a, b + 1):
                if n != net and n != bcast:
                    yield IPv4Address(n)

    @contextlib.contextmanager
    def _io(self, doing: str) -> Iterator[None]:
        """Turn a filesystem failure into an IPAMError naming the directory."""
        try:
            yield
        except OSError as e:
            where = e.filename or self.dir
            raise IPAMError(f"IPAM: {doing} failed: {where}: {e.strerror or e} (check "
                            f"that {self.dir.parent} is a writable directory)",
                            IPAMError.IO_FAILURE, details=repr(e)) from e

    @contextlib.contextmanager
    def _locked(self, create: bool = True) -> Iterator[bool]:
        """Hold the exclusive flock on ``<dir>/lock``, on a descriptor of our own.

        Yields True; with ``create=False`` a missing state directory is not made and
        the block runs unlocked with False (there is nothing to read or release).
        """
        deadline = None if self.lock_timeout is None else time.monotonic() + self.lock_timeout
        lock_path = self.dir / LOCK_FILE
        while True:
            if create:
                self.dir.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except FileNotFoundError:
                if create:
                    raise
                yield False
                return
            try:
                self._flock(fd, deadline)
                # remove_all() may have deleted the directory while we waited: the lock
                # we got is then on an orphan file; start over on the current one.
                try:
                    st, cur = os.fstat(fd), os.stat(lock_path)
                    same = (st.st_dev, st.st_ino) == (cur.st_dev, cur.st_ino)
                except FileNotFoundError:
                    same = False
            except BaseException:
                os.close(fd)
                raise
            if same:
                break
            os.close(fd)
        try:
            yield True
        finally:
            os.close(fd)   # closing the only descriptor releases the flock

    def _flock(self, fd: int, deadline: float | None) -> None:
        if deadline is None:
            fcntl.flock(fd, fcntl.LOCK_EX)
            return
        pause = 0.0005
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise IPAMError(
                        f"IPAM: {self.dir / LOCK_FILE} stayed locked for "
                        f"{self.lock_timeout:g} s (another process hangs holding it: "
                        f"find it with 'fuser -v {self.dir / LOCK_FILE}')",
                        IPAMError.TRY_AGAIN_LATER) from None
                time.sleep(pause)
                pause = min(pause * 2, 0.02)

    def _scan(self) -> dict[IPv4Address, tuple[str, str]]:
        """Every IP file and its owner; ``("", "")`` when the content is unreadable."""
        owners: dict[IPv4Address, tuple[str, str]] = {}
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return owners
        for name in names:
            if name == LOCK_FILE or name.startswith((LAST_RESERVED_PREFIX, TMP_PREFIX)):
                continue
            try:
                ip = IPv4Address(name)
            except ValueError:
                log.debug("ignoring %s in %s: not an IPAM file", name, self.dir)
                continue
            path = self.dir / name
            try:
                with open(path, "rb") as f:
                    raw = f.read(_MAX_OWNER_FILE + 1)
            except IsADirectoryError:
                log.debug("ignoring directory %s", path)
                continue
            except FileNotFoundError:
                continue
            owner = None
            if len(raw) <= _MAX_OWNER_FILE:
                try:
                    owner = _parse_owner(raw.decode("utf-8"))
                except UnicodeDecodeError:
                    owner = None
            if owner is None:
                log.warning("IPAM file %s does not name its owner (expected "
                            "'container_id\\nifname'): %s stays reserved; run gc or delete "
                            "the file if no pod uses it", path, ip)
                owner = ("", "")
            owners[ip] = owner
        return owners

    def _reserve(self, ip: IPv4Address, container_id: str, ifname: str) -> bool:
        """Create ``<dir>/<ip>`` complete or not at all; False if it exists."""
        data = f"{container_id}{LINE_SEP}{ifname}".encode()
        path = self.dir / str(ip)
        tmp = self.dir / f"{TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
            try:
                os.link(tmp, path)
                return True
            except FileExistsError:
                return False
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                    raise
            # a filesystem without hard links: exclusive create, we hold the lock
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            except FileExistsError:
                return False
            try:
                os.write(fd, data)
            except BaseException:
                os.close(fd)
                os.unlink(path)
                raise
            os.close(fd)
            return True
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def _unlink(self, ip: IPv4Address) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.dir / str(ip))

    def _remove_stale_tmp(self) -> None:
        """Under the lock no one is writing: a temporary file is a crashed writer's."""
        for name in os.listdir(self.dir):
            if name.startswith(TMP_PREFIX):
                with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                    os.unlink(self.dir / name)
                    log.info("removed %s, left by a crashed IPAM writer", name)

    def _read_last_reserved(self, index: int, ranges: list[Range]) -> IPv4Address | None:
        """The round-robin cursor; None (start over) if missing, unreadable or no longer
        inside the ranges (host-local: losing round robin once is not critical)."""
        path = self.dir / f"{LAST_RESERVED_PREFIX}{index}"
        try:
            ip = IPv4Address(path.read_text(encoding="ascii", errors="replace").strip())
        except FileNotFoundError:
            return None
        except (ValueError, IsADirectoryError):
            log.warning("ignoring unreadable %s: round robin restarts at the range start",
                        path)
            return None
        return ip if any(r.contains(ip) for r in ranges) else None

    def _write_last_reserved(self, index: int, ip: IPv4Address) -> None:
        path = self.dir / f"{LAST_RESERVED_PREFIX}{index}"
        tmp = self.dir / f"{TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex}"
        try:
            tmp.write_text(str(ip), encoding="ascii")
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
