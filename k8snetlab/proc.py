"""Running external programs, entering network namespaces, and the processes we started.

Every external command goes through :func:`run`, which checks the exit status and raises
:class:`CommandError` (Mininet's ``Node.cmd`` loses the status). A process we started is
known by its PID *and* start time, so a reused PID is never signalled. Namespaces are entered
with ``setns(2)`` on the calling thread only, so :func:`netns` is safe in a thread pool.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
from typing import Iterable, Iterator, Sequence

import psutil

from .errors import CommandError, K8sNetLabError, NotRoot, ToolMissing

CLONE_NEWNET = 0x40000000
CLONE_NEWNS = 0x00020000

# program -> (package, registry) for the one-line "not installed" message
TOOLS: dict[str, tuple[str, str]] = {
    "ip": ("iproute2", "Debian"),
    "tc": ("iproute2", "Debian"),
    "mnexec": ("mininet", "Debian"),
    "brctl": ("bridge-utils", "Debian"),
    "iperf3": ("iperf3", "Debian"),
    "ping": ("iputils-ping", "Debian"),
    "clang": ("clang", "Debian"),
    "llc": ("llvm", "Debian"),
    "bpftool": ("bpftool", "Debian"),
    "tcpdump": ("tcpdump", "Debian"),
    "iptables": ("iptables", "Debian"),
    "iptables-save": ("iptables", "Debian"),
    "iptables-restore": ("iptables", "Debian"),
    "nft": ("nftables", "Debian"),
    "conntrack": ("conntrack", "Debian"),
    "bird": ("bird2", "Debian"),
    "birdc": ("bird2", "Debian"),
    "exabgp": ("exabgp", "PyPI"),
    "dnsmasq": ("dnsmasq-base", "Debian"),
    "dig": ("dnsutils", "Debian"),
    "sockperf": ("sockperf", "Debian"),
    "ovs-vsctl": ("openvswitch-switch", "Debian"),
    "ovs-ofctl": ("openvswitch-switch", "Debian"),
    "ovs-appctl": ("openvswitch-common", "Debian"),
    "ovsdb-tool": ("openvswitch-common", "Debian"),
    "ovsdb-server": ("openvswitch-switch", "Debian"),
    "ovs-vswitchd": ("openvswitch-switch", "Debian"),
    "ethtool": ("ethtool", "Debian"),
}

_libc = ctypes.CDLL(None, use_errno=True)


def which(tool: str) -> str | None:
    return shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


def tool_missing(program: str) -> ToolMissing:
    """The error for a program that is not installed, naming its package."""
    pkg, kind = TOOLS.get(os.path.basename(program), (program, "Debian"))
    return ToolMissing(program, pkg, kind)


def require(*tools: str) -> dict[str, str]:
    """Return {tool: path}; raise ToolMissing (naming the package) for the first absent one."""
    found = {}
    for tool in tools:
        path = which(tool)
        if path is None:
            raise tool_missing(tool)
        found[tool] = path
    return found


def require_root(what: str = "building an emulated cluster") -> None:
    if os.geteuid() != 0:
        raise NotRoot(what)


def run(args: Sequence[str], *, input: str | bytes | None = None, timeout: float = 60,
        netns: str | None = None, env: dict[str, str] | None = None, check: bool = True,
        where: str = "", mntns: str | None = None,
        cpus: set[int] | None = None) -> subprocess.CompletedProcess:
    """Run a program (never through a shell); raise CommandError unless it exits 0.

    ``netns`` is a namespace path (``/proc/PID/ns/net``); the child enters it before exec.
    ``mntns`` (``/proc/PID/ns/mnt``): the child enters that mount namespace too (a pod's).
    ``cpus``: the child runs only on these CPUs (sched_setaffinity before exec).
    """
    args = shown = [str(a) for a in args]     # errors name the program, not nsenter
    text = not isinstance(input, bytes)
    enter = None
    if netns and not mntns and not cpus and _nsenter():
        # nsenter enters the namespace and execs the program: the runtime vforks, where a
        # preexec_fn makes it fork itself whole (tens of ms at a few hundred MB)
        if "/" not in args[0] and which(args[0]) is None:
            raise tool_missing(args[0])
        args = [_nsenter(), f"--net={netns}", "--", *args]
    elif netns or mntns or cpus:
        def enter() -> None:
            if netns:
                setns(netns)
            if mntns:
                setns_mount(mntns)
            if cpus:
                os.sched_setaffinity(0, cpus)
    try:
        proc = subprocess.run(args, input=input, capture_output=True, text=text, timeout=timeout,
                              env=env, preexec_fn=enter)
    except FileNotFoundError:
        raise tool_missing(shown[0]) from None
    except subprocess.TimeoutExpired as e:
        raise CommandError(shown, -1, "", f"timed out after {timeout} s", where) from e
    if check and proc.returncode != 0:
        out = proc.stdout if text else proc.stdout.decode(errors="replace")
        err = proc.stderr if text else proc.stderr.decode(errors="replace")
        raise CommandError(shown, proc.returncode, out, err, where)
    return proc


_NSENTER: list[str | None] = []


def _nsenter() -> str | None:
    """The path of util-linux's ``nsenter`` (None without it), looked up once."""
    if not _NSENTER:
        _NSENTER.append(which("nsenter"))
    return _NSENTER[0]


def _setns(path: str, nstype: int) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, nstype) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


def setns(path: str) -> None:
    """Move the calling thread into the network namespace at ``path``."""
    _setns(path, CLONE_NEWNET)


def setns_mount(path: str) -> None:
    """Move the calling process into the mount namespace at ``path`` (``/proc/PID/ns/mnt``),
    keeping its working directory. For a forked child before exec (``preexec_fn``) only: the
    kernel refuses it to a thread sharing its filesystem context, i.e. any multi-threaded one."""
    cwd = os.getcwd()
    _setns(path, CLONE_NEWNS)
    try:
        os.chdir(cwd)       # setns moved us to the namespace's root directory
    except OSError:
        pass


@contextlib.contextmanager
def netns(path: str | None) -> Iterator[None]:
    """Run the body in the network namespace ``path`` (None: stay), then come back."""
    if path is None:
        yield
        return
    home = os.open(f"/proc/self/task/{threading.get_native_id()}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        setns(path)
        try:
            yield
        finally:
            if _libc.setns(home, CLONE_NEWNET) != 0:  # pragma: no cover - cannot fail for our own ns
                err = ctypes.get_errno()
                raise OSError(err, f"setns back: {os.strerror(err)}")
    finally:
        os.close(home)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cmdline(pid: int) -> str:
    """The process's argv joined by spaces ('' if it is gone)."""
    try:
        return " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return ""


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state is [0], starttime [19]).

    Read by hand for the start time: psutil gives it only as wall-clock seconds, which move
    when the clock is set, and a start time recorded in a state file must never change."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields if len(fields) > 19 else None


def running(pid: int, start: int) -> bool:
    """Is ``pid`` still the process that started at ``start`` (and not a zombie)?"""
    fields = _stat(pid)
    return fields is not None and fields[0] not in ("Z", "X") and int(fields[19]) == start


def start_time(pid: int) -> int:
    """Start time of a process in clock ticks since boot (guards against PID reuse); 0 if gone."""
    fields = _stat(pid)
    return int(fields[19]) if fields else 0


def boot_ticks_now() -> int:
    """Now, in the unit of :func:`start_time` (a process started later has a larger one)."""
    return int(time.clock_gettime(time.CLOCK_BOOTTIME) * os.sysconf("SC_CLK_TCK"))


def parent(pid: int) -> int:
    """The parent PID of ``pid`` (0 if it is gone)."""
    try:
        return psutil.Process(pid).ppid()
    except psutil.Error:
        return 0


def netns_inode(pid: int) -> int | None:
    """The inode number of the network namespace ``pid`` lives in (None if it is gone)."""
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


def pids_in_netns(inodes: set[int], started_after: int = 0) -> list[int]:
    """PIDs (not ours) whose network namespace is one of ``inodes``, started after a tick count."""
    me = os.getpid()
    return [pid for pid in psutil.pids()
            if pid != me and netns_inode(pid) in inodes and start_time(pid) >= started_after]


def stop_pids(pids: list[tuple[int, int]], grace: float = 1.0) -> list[int]:
    """SIGTERM processes we started, given as (pid, start time), wait up to ``grace`` for all
    of them together, SIGKILL the rest; return the PIDs that were running. A PID whose start
    time does not match (reused by another process) is never signalled."""
    alive = [(pid, start) for pid, start in pids if start and running(pid, start)]
    for pid, _ in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    left = alive
    while left and time.monotonic() < deadline:
        time.sleep(0.02)
        left = [(pid, start) for pid, start in left if running(pid, start)]
    for pid, _ in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return [pid for pid, _ in alive]


def end_children(children: Iterable[subprocess.Popen], grace: float,
                 sig: int = signal.SIGTERM) -> list[subprocess.Popen]:
    """End children we started (not reaped yet, so their PIDs cannot have been reused), all
    signalled at once: ``sig``, up to ``grace`` seconds for all of them together, then SIGKILL
    and up to 5 more; return those that still have not exited."""
    running = [p for p in children if p.poll() is None]
    for p in running:
        p.send_signal(sig)
    deadline = time.monotonic() + grace
    killed = []
    for p in running:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            killed.append(p)
    stuck = []
    for p in killed:
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            stuck.append(p)
    return stuck


def end_child(p: subprocess.Popen, grace: float, sig: int = signal.SIGTERM) -> bool:
    """:func:`end_children` for one; True once it has exited."""
    return not end_children([p], grace, sig)


def listening(pid: int, port: int, own: bool = False) -> bool:
    """Is a TCP socket listening on ``port`` in the network namespace of ``pid``? With
    ``own``: one that ``pid`` itself holds (not another program's on that port).

    Read from /proc/PID/net/tcp{,6}, the tables of PID's namespace, without entering it:
    psutil reads /proc/net, the caller's namespace, so it cannot see a node's or pod's sockets."""
    inodes: set[str] = set()
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{table}") as f:
                next(f, None)
                for line in f:
                    fields = line.split()
                    # sl local_address rem_address st ... inode (field 9); 0A = LISTEN
                    if len(fields) > 9 and fields[3] == "0A" \
                            and int(fields[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add(fields[9])
        except OSError:     # gone, or no IPv6 in this kernel
            continue
    if not own or not inodes:
        return bool(inodes)
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:[") and target[8:-1] in inodes:
                return True
    return False


def wait_listening(pid: int, port: int, timeout: float, what: str,
                   child: subprocess.Popen | None = None) -> None:
    """Return once a TCP socket listens on ``port`` in ``pid``'s namespace; raise
    K8sNetLabError naming ``what`` after ``timeout`` seconds, or at once if ``child`` (the
    server we started) exits first."""
    deadline = time.monotonic() + timeout
    while not listening(pid, port):
        if child is not None and child.poll() is not None:
            raise K8sNetLabError(f"{what} exited (status {child.returncode}) before listening on port {port}")
        if time.monotonic() > deadline:
            raise K8sNetLabError(f"{what}: nothing listens on port {port} after {timeout:g} s")
        time.sleep(0.02)


_SIOCGIFFLAGS, _SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
_IFREQ_FLAGS = struct.Struct("16sH14x")     # struct ifreq with ifr_flags


def if_flags(sock: socket.socket, ifname: str) -> int:
    """The flags of interface ``ifname`` (SIOCGIFFLAGS on ``sock``, a socket made in its
    namespace); OSError (ENODEV) when there is none."""
    return _IFREQ_FLAGS.unpack(fcntl.ioctl(sock, _SIOCGIFFLAGS, _IFREQ_FLAGS.pack(ifname.encode(), 0)))[1]


def if_set_up(sock: socket.socket, ifname: str) -> None:
    """Set ``ifname`` up unless it is (two ioctls on ``sock``, a socket of its namespace)."""
    flags = if_flags(sock, ifname)
    if not flags & IFF_UP:
        fcntl.ioctl(sock, _SIOCSIFFLAGS, _IFREQ_FLAGS.pack(ifname.encode(), flags | IFF_UP))


def loopback_up(netns_path: str) -> None:
    """Set ``lo`` up in a namespace (what CNI's loopback plugin does), with ioctls on a
    socket made inside it: no netlink socket, no process."""
    with netns(netns_path):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with s:
        if_set_up(s, "lo")
