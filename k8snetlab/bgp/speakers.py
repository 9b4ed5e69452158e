"""BGP speaker drivers: BIRD 2 and ExaBGP, run in a node's (or router's) namespace.

A driver owns one daemon: it renders the configuration from the speaker's plan, has the
daemon dry-run it, starts the daemon with the host's ``popen_ns`` (the PID is recorded in the
cluster's state for crash cleanup), reloads it when the peers change, stops it by PID, and
asks it for its status through its own control channel.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import psutil

from .. import proc, signals
from ..errors import CommandError, K8sNetLabError, ToolMissing
from . import render
from . import status as st
from .plan import SpeakerPlan

if TYPE_CHECKING:  # pragma: no cover
    from ..pod import NetnsHost

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT = 10.0
STOP_GRACE = 3.0


class SpeakerError(K8sNetLabError):
    """A speaker did not start, reload or answer."""


class Speaker:
    """One BGP daemon in one namespace.

    - ``bird``: ``bird -f -c bird.conf -s bird.ctl -P bird.pid`` (foreground, so the PID we hold
      is the daemon's); ``birdc -s bird.ctl`` for ``configure``, ``show protocols all``,
      ``show route``, ``show memory``. BIRD's kernel protocol installs the learned routes.
    - ``exabgp``: ``python -m exabgp server exabgp.conf``, configured by environment variables
      (listen on the node's address, keep root for the API process, CLI pipes under the state
      dir via ``EXABGP_ROOT``); its API process :mod:`k8snetlab.bgp.installer` installs the
      learned routes. Status goes through ExaBGP's CLI pipes.

    Adding a speaker (FRR, GoBGP...) means one Speaker class declared in the
    ``k8snetlab.bgp_speakers`` entry-point group.
    """

    kind: ClassVar[str]
    tools: ClassVar[tuple[str, ...]] = ()

    def __init__(self, plan: SpeakerPlan, host: "NetnsHost", state_dir: Path):
        self.plan = plan
        self.host = host
        self.dir = state_dir
        self.process: subprocess.Popen | None = None
        self.configured_peers: frozenset[str] = frozenset()
        self.started_at: float | None = None     # time.monotonic() of the last start

    @property
    def name(self) -> str:
        return self.plan.name

    @classmethod
    def check_tools(cls) -> None:
        proc.require(*cls.tools)

    # -- lifecycle ---------------------------------------------------------------------------------
    def configure(self, plan: SpeakerPlan | None = None) -> bool:
        """Render, dry-run and write the configuration; True when it changed."""
        if plan is not None:
            self.plan = plan
        self.dir.mkdir(parents=True, exist_ok=True)
        text = self.render()
        path = self.config_path
        if path.exists() and path.read_text() == text:
            self.configured_peers = self.plan.peer_names()
            return False
        tmp = path.with_name(f".{path.name}.new")
        tmp.write_text(text)
        try:
            self.dry_run(tmp)
        except CommandError as e:
            raise SpeakerError(f"{self.kind} refused the configuration rendered for {self.name} "
                               f"({tmp}): {e}") from None
        tmp.replace(path)
        self.configured_peers = self.plan.peer_names()
        return True

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.running() else None

    def start(self, wait: bool = True) -> None:
        if self.running():
            return
        self.started_at = time.monotonic()
        self.process = self.host.popen_ns(self.command(), log_path=self.dir / f"{self.kind}.out",
                                          what=f"{self.kind} on {self.name}", **self.popen_kwargs())
        self._write_descriptor()
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Return once the daemon answers on its control channel; SpeakerError when it exits
        or after ``timeout`` seconds; a stop signal (main thread) interrupts the wait."""
        deadline = time.monotonic() + timeout
        while not self.ready():
            signals.poll()
            if self.process is None or self.process.poll() is not None:
                raise SpeakerError(f"{self.kind} on {self.name} exited at start (status "
                                   f"{self.process.returncode if self.process else '?'}); "
                                   f"see {self.dir / (self.kind + '.out')}: {self._log_tail()}")
            if time.monotonic() > deadline:
                raise SpeakerError(f"{self.kind} on {self.name} did not come up within {timeout:.0f} s; "
                                   f"see {self.dir / (self.kind + '.out')}")
            time.sleep(0.02)

    def stop(self, graceful: bool = True) -> None:
        """Stop the daemon by its PID: SIGTERM (a graceful BGP shutdown: peers are told with a
        Cease notification) or SIGKILL (a crash: the peers see the TCP connection go)."""
        stop_all([self], graceful)

    def forget(self) -> None:
        """The node left: remove the descriptor so ``bgp status`` no longer lists it."""
        (self.dir / st.DESCRIPTOR).unlink(missing_ok=True)

    def pause(self) -> None:
        """Freeze the daemon (SIGSTOP): it holds its TCP sessions but sends nothing, so the peers
        notice only when their hold timer expires: a hung speaker."""
        if self.running():
            assert self.process is not None
            self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.running():
            assert self.process is not None
            self.process.send_signal(signal.SIGCONT)

    def rss_kb(self) -> int:
        """Resident memory of the daemon and its helper processes (kB)."""
        if not self.running():
            return 0
        assert self.process is not None
        pids = [self.process.pid] + [pid for pid, _ in _descendants(self.process.pid)]
        return sum(_rss_kb(pid) for pid in pids)

    def pss_kb(self) -> int:
        """Proportional memory of the daemon and its helpers (kB): shared pages (the binary,
        libc) divided among the processes sharing them, so a hundred BIRDs are not each
        charged the whole of libc as RSS does."""
        if not self.running():
            return 0
        assert self.process is not None
        pids = [self.process.pid] + [pid for pid, _ in _descendants(self.process.pid)]
        return sum(_pss_kb(pid) for pid in pids)

    # -- to implement ------------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        raise NotImplementedError

    def render(self) -> str:
        raise NotImplementedError

    def dry_run(self, path: Path) -> None:
        raise NotImplementedError

    def command(self) -> list[str]:
        raise NotImplementedError

    def popen_kwargs(self) -> dict[str, Any]:
        return {}

    def ready(self) -> bool:
        raise NotImplementedError

    def reload(self) -> None:
        raise NotImplementedError

    def status(self) -> st.SpeakerStatus:
        return query(self.descriptor())

    def daemon_memory_kb(self) -> int | None:
        """What the daemon itself reports as its memory use (kB), if it can tell."""
        return None

    def control(self) -> dict[str, Any]:
        raise NotImplementedError

    def _cleanup_runtime(self) -> None:
        pass

    # -- descriptor (for `k8snetlab bgp status`) ---------------------------------------------------
    def descriptor(self) -> dict[str, Any]:
        pid = self.pid
        return {"name": self.name, "speaker": self.kind, "role": self.plan.role,
                "pid": pid, "start": proc.start_time(pid) if pid else 0,
                "peers": {p.address: p.name for p in self.plan.peers}, **self.control()}

    def _write_descriptor(self) -> None:
        path = self.dir / st.DESCRIPTOR
        tmp = path.with_name(f".{path.name}.new")
        tmp.write_text(json.dumps(self.descriptor()))
        tmp.replace(path)

    def _log_tail(self, lines: int = 3) -> str:
        try:
            text = (self.dir / f"{self.kind}.out").read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no output)"
        return " | ".join(text[-lines:]) or "(no output)"


# ============================================================================ BIRD

class BirdSpeaker(Speaker):
    kind = "bird"
    tools = ("bird", "birdc")

    @property
    def config_path(self) -> Path:
        return self.dir / "bird.conf"

    @property
    def socket(self) -> Path:
        return self.dir / "bird.ctl"

    def render(self) -> str:
        return render.bird_conf(self.plan, str(self.dir / "bird.log"))

    def dry_run(self, path: Path) -> None:
        proc.run(["bird", "-p", "-c", str(path)], where=self.name)

    def command(self) -> list[str]:
        return ["bird", "-f", "-c", str(self.config_path), "-s", str(self.socket),
                "-P", str(self.dir / "bird.pid")]

    def ready(self) -> bool:
        if not self.socket.exists():
            return False
        try:       # a short timeout: wait_ready keeps its own deadline
            return birdc(self.socket, "show", "status", check=False, timeout=2).returncode == 0
        except CommandError:        # timed out: not ready yet
            return False

    def reload(self) -> None:
        if not self.running():
            return
        out = birdc(self.socket, "configure").stdout
        if "Reconfigur" not in out:
            raise SpeakerError(f"bird on {self.name} did not take the new configuration: {out.strip()}")

    def control(self) -> dict[str, Any]:
        return {"socket": str(self.socket)}

    def daemon_memory_kb(self) -> int | None:
        if not self.running():
            return None
        return parse_bird_memory(birdc(self.socket, "show", "memory").stdout)

    def _cleanup_runtime(self) -> None:
        for f in (self.socket, self.dir / "bird.pid"):
            f.unlink(missing_ok=True)


def stop_all(drivers: list[Speaker], graceful: bool = True, grace: float = STOP_GRACE) -> None:
    """Stop many speakers at once: every daemon signalled, then ``grace`` seconds for all of
    them together, then SIGKILL (a cluster's teardown: one at a time, 200 BIRDs busy with a
    flapping mesh took 3 s each, ten minutes in all)."""
    live = [d for d in drivers if d.process is not None]
    family = [x for d in live if d.process is not None and d.process.poll() is None
              for x in _descendants(d.process.pid)]
    proc.end_children([d.process for d in live if d.process is not None], grace,
                      signal.SIGTERM if graceful else signal.SIGKILL)
    # helpers the daemon started (ExaBGP's API processes) end on their own when it is gone
    # (the route installer takes its routes back first); whatever lingers is stopped
    deadline = time.monotonic() + grace
    while any(proc.running(pid, start) for pid, start in family) and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.stop_pids(family)
    for d in live:
        d.process = None
        d._cleanup_runtime()


def birdc(socket: Path | str, *command: str, check: bool = True, timeout: float = 10) -> subprocess.CompletedProcess:
    return proc.run(["birdc", "-s", str(socket), *command], check=check, timeout=timeout)


_MEM_TOTAL = re.compile(r"^Total:(.*)$", re.MULTILINE)
_MEM_AMOUNT = re.compile(r"([\d.]+)\s*([kMG]?B)\b")
_MEM_SCALE = {"B": 1 / 1024, "kB": 1, "MB": 1024, "GB": 1024 * 1024}


def parse_bird_memory(text: str) -> int | None:
    """The ``Total:`` line of ``birdc show memory``, in kB: BIRD 2.0.12 prints the memory in
    use and its allocator overhead side by side; both are the daemon's, so both count."""
    m = _MEM_TOTAL.search(text)
    if not m:
        return None
    amounts = _MEM_AMOUNT.findall(m.group(1))
    if not amounts:
        return None
    return round(sum(float(v) * _MEM_SCALE[u] for v, u in amounts))


# ============================================================================ ExaBGP

class ExabgpSpeaker(Speaker):
    kind = "exabgp"

    @classmethod
    def check_tools(cls) -> None:
        import importlib.util
        if importlib.util.find_spec("exabgp") is None:
            raise ToolMissing("exabgp", "exabgp", "PyPI")

    @property
    def config_path(self) -> Path:
        return self.dir / "exabgp.conf"

    @property
    def root(self) -> Path:
        """EXABGP_ROOT: ExaBGP looks for its CLI pipes in ROOT/run/."""
        return self.dir / "exabgp"

    @property
    def pipename(self) -> str:
        # unique on the machine: ExaBGP also looks in /run/exabgp/ and /run/ before ROOT/run/
        return "k8snetlab-" + hashlib.sha1(str(self.dir).encode()).hexdigest()[:12]

    def installer(self) -> str:
        args = [sys.executable, "-m", "k8snetlab.bgp.installer"]
        for cidr in self.plan.announce:
            args += ["--announce", cidr]
        for addr in sorted({p.local_address for p in self.plan.peers}):
            args += ["--self", addr]
        return " ".join(args)

    def render(self) -> str:
        return render.exabgp_conf(self.plan, self.installer())

    def env(self) -> dict[str, str]:
        addrs = sorted({p.local_address for p in self.plan.peers}) or [self.plan.router_id]
        env = dict(os.environ)
        env.update({
            "EXABGP_ROOT": str(self.root),
            "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
            "exabgp_tcp_bind": " ".join(addrs),     # listen too: two ExaBGP nodes must reach each other
            "exabgp_tcp_port": "179",
            "exabgp_daemon_user": "root",
            "exabgp_daemon_drop": "false",          # the installer needs CAP_NET_ADMIN
            "exabgp_daemon_daemonize": "false",
            "exabgp_log_destination": "stdout",
            "exabgp_log_statistics": "false",       # a line per message counter otherwise
            "exabgp_api_cli": "true",
            "exabgp_api_pipename": self.pipename,
        })
        return env

    def dry_run(self, path: Path) -> None:
        proc.run([sys.executable, "-m", "exabgp", "validate", str(path)], env=self.env(), where=self.name)

    def command(self) -> list[str]:
        return [sys.executable, "-m", "exabgp", "server", str(self.config_path)]

    def popen_kwargs(self) -> dict[str, Any]:
        run = self.root / "run"
        run.mkdir(parents=True, exist_ok=True)
        for end in ("in", "out"):
            fifo = run / f"{self.pipename}.{end}"
            if not fifo.exists():
                os.mkfifo(fifo, 0o600)
        return {"env": self.env()}

    def ready(self) -> bool:
        try:
            exabgp_cli(self.control(), "show neighbor json", timeout=1.0)
        except SpeakerError:
            return False
        return True

    def reload(self) -> None:
        if self.running():
            assert self.process is not None
            self.process.send_signal(signal.SIGUSR1)   # ExaBGP: reload the configuration

    def control(self) -> dict[str, Any]:
        return {"pipes": str(self.root / "run"), "pipename": self.pipename}

    def _cleanup_runtime(self) -> None:
        for end in ("in", "out"):
            (self.root / "run" / f"{self.pipename}.{end}").unlink(missing_ok=True)


def exabgp_cli(control: dict[str, Any], command: str, timeout: float = 5.0) -> str:
    """Send one command through ExaBGP's CLI pipes and return its answer (without the final
    ``done``). One client at a time per speaker (a lock file beside the pipes)."""
    base = Path(control["pipes"]) / control["pipename"]
    send, recv = f"{base}.in", f"{base}.out"
    with open(f"{base}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            rfd = os.open(recv, os.O_RDONLY | os.O_NONBLOCK)
        except OSError as e:
            raise SpeakerError(f"ExaBGP CLI pipe {recv}: {e.strerror}") from None
        try:
            with contextlib.suppress(BlockingIOError):
                while os.read(rfd, 65536):      # answers nobody read (an earlier timeout)
                    pass
            try:
                wfd = os.open(send, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as e:     # ENXIO: nobody reads the pipe, ExaBGP is not (yet) running
                raise SpeakerError(f"ExaBGP is not serving {send}: {e.strerror}") from None
            try:
                os.write(wfd, command.encode() + b"\n")
            finally:
                os.close(wfd)
            buf = b""
            deadline = time.monotonic() + timeout
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise SpeakerError(f"ExaBGP did not answer {command!r} within {timeout:.0f} s")
                ready, _, _ = select.select([rfd], [], [], left)
                if ready:
                    try:
                        chunk = os.read(rfd, 65536)
                    except BlockingIOError:
                        chunk = b""
                    buf += chunk
                    if not chunk:
                        time.sleep(0.01)   # the writer closed between lines; more may come
                text = buf.decode(errors="replace")
                lines = text.splitlines()
                if text.endswith("\n") and lines and _is_end(lines[-1]):
                    if _is_error(lines[-1]):
                        raise SpeakerError(f"ExaBGP refused {command!r}")
                    return "\n".join(lines[:-1])
        finally:
            os.close(rfd)


def _is_end(line: str) -> bool:
    line = line.strip()
    return line in ("done", "error") or (line.startswith("{") and '"answer"' in line)


def _is_error(line: str) -> bool:
    return line.strip() == "error" or '"answer": "error"' in line


# ============================================================================ status of a descriptor

def query(desc: dict[str, Any]) -> st.SpeakerStatus:
    """Ask a speaker (described by its ``bgp-speaker.json``) for its sessions and routes."""
    name, kind = desc.get("name", "?"), desc.get("speaker", "?")
    pid, start = desc.get("pid"), desc.get("start", 0)
    if not pid or not proc.running(pid, start):
        return st.SpeakerStatus(name, kind, False, error="the daemon is stopped")
    try:
        if kind == "bird":
            sessions = st.parse_bird_protocols(birdc(desc["socket"], "show", "protocols", "all").stdout)
            routes = st.parse_bird_routes(birdc(desc["socket"], "show", "route").stdout)
            return st.SpeakerStatus(name, kind, True, sessions, routes)
        if kind == "exabgp":
            names = desc.get("peers", {})
            sessions = st.parse_exabgp_neighbors(exabgp_cli(desc, "show neighbor json"), names)
            rib = st.parse_exabgp_adj_rib_in(exabgp_cli(desc, "show adj-rib in"))
            counts: dict[str, int] = {}
            for peer, _, _ in rib:
                counts[peer] = counts.get(peer, 0) + 1
            for s in sessions:
                s.routes_received = counts.get(s.address, 0)
            routes = [st.Route(prefix, hop, names.get(peer, peer)) for peer, prefix, hop in rib]
            own = {prefix for _, prefix, _ in st.parse_exabgp_adj_rib_in(exabgp_cli(desc, "show adj-rib out"))}
            routes += [st.Route(prefix, None, "self") for prefix in sorted(own)]
            return st.SpeakerStatus(name, kind, True, sessions, routes)
    except (CommandError, SpeakerError, OSError) as e:
        return st.SpeakerStatus(name, kind, True, error=str(e))
    return st.SpeakerStatus(name, kind, True, error=f"unknown speaker {kind!r}")


# ============================================================================ processes

def _descendants(pid: int) -> list[tuple[int, int]]:
    """(pid, start time) of every process below ``pid``."""
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []
    return [(c.pid, proc.start_time(c.pid)) for c in children]


def _rss_kb(pid: int) -> int:
    try:
        return psutil.Process(pid).memory_info().rss // 1024
    except psutil.Error:
        return 0


def _pss_kb(pid: int) -> int:
    try:
        return psutil.Process(pid).memory_full_info().pss // 1024
    except psutil.Error:
        return 0

