"""Kernel drop reasons per network namespace, counted while a run measures.

Every packet the kernel frees as a drop passes ``skb:kfree_skb`` with its ``enum
skb_drop_reason``; :class:`DropCounter` counts them by (namespace inode, reason) with a small
BPF program, and reasons that are not packet loss are kept apart (:data:`NOISE`).
"""

from __future__ import annotations

import collections
import ctypes
import json
import logging
import os
import pathlib
import re
import shutil
import struct
from typing import Collection, Mapping

from . import ebpf, proc
from .errors import K8sNetLabError

log = logging.getLogger(__name__)

SOURCE = pathlib.Path(__file__).resolve().parent / "bpf" / "drops.c"
PROG, MAP, WATCH = "knl_kfree_skb", "knl_drops", "knl_watch"
KEY = struct.Struct("=II")           # struct drop_key: netns inode, reason
VALUE = struct.Struct("=Q")
BTF = "/sys/kernel/btf/vmlinux"
BPFFS = "/sys/fs/bpf"
# not packet loss: no reason given, or the queues of a socket being closed
NOISE = frozenset({"NOT_SPECIFIED", "QUEUE_PURGE", "SOCKET_CLOSE", "TCP_CLOSE"})
BPF_RAW_TRACEPOINT_OPEN = 17


class DropsUnavailable(K8sNetLabError):
    """Drop reasons cannot be counted here (no BTF, no bpffs, no tool, not root, ...)."""


# ---------------------------------------------------------------- reason names (pure)

_ENUM_RE = re.compile(r"^\[\d+\] ENUM 'skb_drop_reason' ")
_VALUE_RE = re.compile(r"^\s+'(?:SKB_DROP_REASON_|SKB_)?([A-Z0-9_]+)' val=(\d+)")


def parse_reason_enum(btf_raw: str) -> dict[int, str]:
    """value -> name (``NO_SOCKET``, prefix dropped) of ``enum skb_drop_reason`` in the
    output of ``bpftool btf dump file ... format raw``."""
    out: dict[int, str] = {}
    inside = False
    for line in btf_raw.splitlines():
        if _ENUM_RE.match(line):
            inside = True
            continue
        if inside:
            m = _VALUE_RE.match(line)
            if not m:
                break
            out[int(m.group(2))] = m.group(1)
    return out


def reason_name(names: Mapping[int, str], code: int) -> str:
    """The name of a reason code; a subsystem's reason (code >> 16) or an unknown one by number."""
    if code in names:
        return names[code]
    if code >> 16:
        return f"SUBSYS{code >> 16}_{code & 0xFFFF}"
    return f"REASON_{code}"


def split_noise(counts: Mapping[str, int]) -> tuple[int, int]:
    """(real drops, drops whose reason is in :data:`NOISE`) of reason name -> count."""
    noise = sum(n for r, n in counts.items() if r in NOISE)
    return sum(counts.values()) - noise, noise


def delta(before: Mapping[tuple[int, int], int], after: Mapping[tuple[int, int], int],
          names: Mapping[int, str], netns: Collection[int] | None = None) -> collections.Counter:
    """(netns inode, reason name) -> drops between two snapshots, for ``netns`` only (all if None)."""
    out: collections.Counter = collections.Counter()
    for (ns, code), n in after.items():
        if netns is not None and ns not in netns:
            continue
        d = n - before.get((ns, code), 0)
        if d > 0:
            out[(ns, reason_name(names, code))] += d
    return out


# ---------------------------------------------------------------- the counter

class _RawTpAttr(ctypes.Structure):
    _fields_ = [("name", ctypes.c_uint64), ("prog_fd", ctypes.c_uint32), ("_pad", ctypes.c_uint32),
                ("cookie", ctypes.c_uint64)]


def _obj_get(path: str) -> int:
    attr = ebpf._ObjGetAttr()
    buf = ctypes.create_string_buffer(os.fsencode(path))
    attr.pathname = ctypes.addressof(buf)
    try:
        return ebpf._bpf(ebpf.BPF_OBJ_GET, attr)
    except OSError as e:
        raise DropsUnavailable(f"cannot open the BPF program pinned at {path}: {e.strerror}") from None


def _reason_names() -> dict[int, str]:
    """The kernel's drop reasons, cached per kernel (the BTF dump is 12 MB of text)."""
    st = os.stat(BTF)
    cache = ebpf.CACHE_DIR / f"drop-reasons-{os.uname().release}-{st.st_size}.json"
    try:
        return {int(k): v for k, v in json.loads(cache.read_text()).items()}
    except (OSError, ValueError):
        pass
    names = parse_reason_enum(proc.run(["bpftool", "btf", "dump", "file", BTF, "format", "raw"],
                                       timeout=60, where="reading the kernel's BTF").stdout)
    if not names:
        raise DropsUnavailable(f"{BTF} has no enum skb_drop_reason (kernel older than 5.17?)")
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(names))
    except OSError as e:
        log.debug("cannot cache drop reasons in %s: %s", cache, e)
    return names


def _compile() -> pathlib.Path:
    return ebpf.compile_cached(SOURCE)


class DropCounter:
    """``skb:kfree_skb`` counted by (netns inode, reason) while it is started.

    ``start()`` raises DropsUnavailable (naming what is missing) or CommandError;
    ``snapshot()`` reads the counts; ``stop()`` detaches (also by the context manager).

    It loads ``bpf/drops.c`` (a raw tracepoint program, CO-RE against the kernel's BTF) and
    counts into a hash map; a caller names the namespaces to count (:meth:`watch`: the
    machine's other namespaces are not counted), reads the map before and after a measurement
    and keeps the difference for the namespaces of the path it measured (:func:`delta`). The
    reason names come from the kernel's BTF (``enum skb_drop_reason``), so ``NO_SOCKET``, ``TCP_OFOMERGE``, ``QDISC_DROP`` ... are the kernel's
    own. Reasons that are not packet loss are kept apart (:data:`NOISE`): ``NOT_SPECIFIED`` (a
    ``kfree_skb()`` whose caller gave no reason) and what closing a socket frees
    (``QUEUE_PURGE``, ``SOCKET_CLOSE``, ``TCP_CLOSE``: every iperf3 test ends so).

    Nothing stays behind: the program and map are pinned only for the moment it takes to open
    them, then unpinned; the program stays attached while this process holds the link's file
    descriptor, so a killed run detaches it by exiting.
    """

    def __init__(self) -> None:
        self.names: dict[int, str] = {}
        self.link_fd = -1
        self.map: ebpf.PinnedMap | None = None
        self.watched: ebpf.PinnedMap | None = None
        self.last: collections.Counter = collections.Counter()   # set by the caller per measurement

    def start(self) -> "DropCounter":
        if os.geteuid() != 0:
            raise DropsUnavailable("counting kernel drops needs root (a BPF program)")
        if not os.path.exists(BTF):
            raise DropsUnavailable(f"no {BTF}: the kernel has no BTF for CO-RE")
        where = ebpf.fs_type_at(BPFFS)
        if where is None or where[1] != ebpf.BPF_FS_TYPE:
            raise DropsUnavailable(f"no bpf filesystem mounted at {BPFFS}")
        proc.require("bpftool", "clang")
        self.names = _reason_names()
        obj = _compile()
        pin = pathlib.Path(BPFFS) / f"k8snetlab-drops-{os.getpid()}-{os.urandom(3).hex()}"
        pin.mkdir()
        try:
            proc.run(["bpftool", "prog", "load", str(obj), str(pin / "prog"), "type", "raw_tracepoint",
                      "pinmaps", str(pin / "maps")], where="loading the drop-reason counter")
            prog_fd = _obj_get(str(pin / "prog"))
            try:
                name = ctypes.create_string_buffer(b"kfree_skb")
                attr = _RawTpAttr(name=ctypes.addressof(name), prog_fd=prog_fd)
                try:
                    self.link_fd = ebpf._bpf(BPF_RAW_TRACEPOINT_OPEN, attr)
                except OSError as e:
                    raise DropsUnavailable(f"cannot attach to the kfree_skb tracepoint: {e.strerror}") from None
            finally:
                os.close(prog_fd)
            self.map = ebpf.PinnedMap(str(pin / "maps" / MAP), KEY.size, VALUE.size)
            self.watched = ebpf.PinnedMap(str(pin / "maps" / WATCH), 4, 1)
        except BaseException:
            self.stop()
            raise
        finally:
            shutil.rmtree(pin, ignore_errors=True)        # unpin: the fds keep them alive
        log.info("counting kernel drop reasons (skb:kfree_skb, %d reasons known)", len(self.names))
        return self

    def watch(self, inodes: Collection[int]) -> None:
        """Count drops in these network namespaces (inodes) too; only watched ones are counted."""
        if self.watched is None:
            raise DropsUnavailable("the drop counter is not started")
        for ino in inodes:
            self.watched.update(struct.pack("=I", ino), b"\x01")

    def snapshot(self) -> dict[tuple[int, int], int]:
        if self.map is None:
            return {}
        return {KEY.unpack(k): VALUE.unpack(v[:8])[0] for k, v in self.map.items()}

    def stop(self) -> None:
        for m in (self.map, self.watched):
            if m is not None:
                m.close()
        self.map = self.watched = None
        if self.link_fd >= 0:
            os.close(self.link_fd)
            self.link_fd = -1

    def __enter__(self) -> "DropCounter":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def netns_inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None
