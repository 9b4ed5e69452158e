"""Nodes, pod sandboxes and containers as Mininet hosts.

A pod sandbox is a Mininet host with no Mininet links: its shell is the process that holds
the pod's network namespace (what the ``pause`` container is in Kubernetes), and the CNI
plugin, not Mininet, gives it its ``eth0``. Containers are further processes started inside
that namespace, so they share it: they reach each other on ``localhost`` as in a real pod.

A node is a Mininet host on the underlay; its namespace is where the CNI plugins and the
mode's node agent work (the node's "host" network namespace).

Besides Mininet's ``cmd`` (a shell line, no exit status), both offer :meth:`run` (checked,
raising :class:`CommandError`) and :meth:`popen_ns` (a process in the namespace).
"""

from __future__ import annotations

import logging
import os
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from mininet.link import Intf
from mininet.node import Host

from . import proc
from .manifests import ContainerSpec, PodSpec
from .clusterspec import NodeSpec

log = logging.getLogger(__name__)

PAUSE_SOURCE = Path(__file__).resolve().parent / "pause.c"     # the sandbox holder, in C


class NetnsHost(Host):
    """A Mininet host with checked command execution in its network namespace."""

    on_popen = None  # set by the cluster: records the PIDs it must stop

    def startShell(self, mnopts: str | None = None) -> None:
        """Mininet's shell, started by ``mnexec -d`` where Mininet says ``-cd``: :meth:`_popen`
        has Popen close the runtime's other descriptors (close_fds, from /proc/self/fd),
        where ``mnexec -c`` calls close() on each of the 20,000 the limit allows (~7 ms of
        CPU a host, x 100 nodes)."""
        super().startShell(mnopts="-d" if mnopts is None else mnopts)

    def _popen(self, cmd: list[str], **params: Any) -> subprocess.Popen:
        params["close_fds"] = True        # Mininet's shell passes False (and relies on -c)
        return super()._popen(cmd, **params)

    @property
    def netns(self) -> str:
        return f"/proc/{self.pid}/ns/net"

    @property
    def mntns(self) -> str | None:
        """The mount namespace programs run here enter too (None: the runtime's own)."""
        return None

    def run(self, args: Sequence[str], **kw: Any) -> subprocess.CompletedProcess:
        """Run a program inside this host's network namespace; raise on non-zero exit."""
        kw.setdefault("where", self.name)
        kw.setdefault("mntns", self.mntns)
        return proc.run(args, netns=self.netns, **kw)

    def popen_ns(self, args: Sequence[str], log_path: str | os.PathLike | None = None,
                 what: str = "", **kw: Any) -> subprocess.Popen:
        """Start a long-running program in this namespace (its PID is recorded for cleanup)."""
        prefix, enter, own_group = self._entering()
        argv = [str(a) for a in args]
        if prefix and "/" not in argv[0] and proc.which(argv[0]) is None:
            raise proc.tool_missing(argv[0])
        out: Any = open(log_path, "ab") if log_path else subprocess.DEVNULL
        if own_group:
            kw.setdefault("process_group", 0)      # setpgid in the child: vfork still serves
        try:
            p = subprocess.Popen([*prefix, *argv], stdin=subprocess.DEVNULL, stdout=out,
                                 stderr=subprocess.STDOUT if log_path else subprocess.DEVNULL,
                                 preexec_fn=enter, **kw)
        except FileNotFoundError:
            raise proc.tool_missing(str(args[0])) from None
        finally:
            if log_path:
                out.close()
        if self.on_popen:
            self.on_popen(p.pid, what or f"{self.name}: {args[0]}")
        return p


    def _entering(self) -> tuple[list[str], Any, bool]:
        """How a child enters this host's namespaces: a command prefix, or a preexec_fn; and
        whether Popen must give it a process group of its own. ``nsenter`` where only the
        network namespace is to be entered: the runtime vforks instead of forking itself
        whole (a BGP speaker per node, at 100 nodes)."""
        ns, mnt = self.netns, self.mntns
        nsenter = proc.which("nsenter")
        if mnt is None and nsenter:
            return [nsenter, f"--net={ns}", "--"], None, True
        return [], lambda: (proc.setns(ns), mnt and proc.setns_mount(mnt), os.setpgrp()), False


class NodeHost(NetnsHost):
    """A Kubernetes node."""

    def __init__(self, name: str, spec: NodeSpec | None = None, state_dir: Path | None = None, **params: Any):
        super().__init__(name, inNamespace=True, **params)
        self.spec = spec
        self.state_dir = state_dir

    @property
    def ip(self) -> str:
        return str(self.spec.ip) if self.spec else self.IP()

    def config(self, mac: Any = None, ip: Any = None, defaultRoute: Any = None, lo: str = "up",
               **params: Any) -> dict[str, Any]:
        """Mininet's host configuration (address on the uplink, ``lo`` up) by netlink and
        ioctl instead of two ``ifconfig`` round trips through the node's shell (x 100 nodes)."""
        intf = self.defaultIntf()
        if intf is None or not isinstance(ip, str) or "/" not in ip or mac is not None \
                or defaultRoute is not None or lo != "up":
            return super().config(mac=mac, ip=ip, defaultRoute=defaultRoute, lo=lo, **params)
        from .netutil import Netns
        with Netns(self.netns, self.name) as ns:
            ns.ensure_addr(intf.name, ip)
            ns.link_up(intf.name)
            ns.link_up("lo")
        intf.ip, intf.prefixLen = ip.split("/")      # what Mininet's Intf.setIP records
        return {"setIP": None}


class RouterHost(NetnsHost):
    """An underlay router: forwarding on, one interface per subnet."""


@dataclass
class Container:
    name: str
    argv: list[str]
    process: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def running(self) -> bool:
        return self.process.poll() is None


class Pod(NetnsHost):
    """A pod sandbox and its containers.

    The sandbox is a network and mount namespace held by one small process (the role of
    Kubernetes' ``pause`` container): our ``pause`` (``k8snetlab/pause.c``), which makes them
    as ``mnexec -n`` makes a Mininet host's, or ``mnexec -n sleep`` where no C compiler is.
    ``self.pid`` is that holder's. Mininet's shell is started only when something first runs
    a command in the pod (``pod.cmd``, the Mininet CLI): it joins the holder's namespaces
    (``mnexec -a``). A thousand pods are a thousand ``pause`` processes, not a thousand
    interactive shells."""

    HOLDER = ("mnexec", "-dnp", "sleep", "infinity")    # without our compiled pause (pause.c)

    def __init__(self, name: str, spec: PodSpec | None = None, holder: Sequence[str] | None = None,
                 **params: Any):
        self._holder: subprocess.Popen | None = None
        self._holder_argv = list(holder or self.HOLDER)
        self._foreign = False
        self.spawned: list[subprocess.Popen] = []     # started with popen_ns (containers...)
        super().__init__(name, inNamespace=True, **params)
        self.spec = spec or PodSpec(name)
        self.node_name: str | None = None
        self.ip: str | None = None          # the pod IP (no prefix) once CNI ADD returned
        self.container_id = ""
        self.result: Any = None             # the CNI result
        self.containers: dict[str, Container] = {}
        self.created_at = 0.0               # time.monotonic() when it was asked for
        self.ready_at = 0.0                 # ... and when it was observed ready
        # time.monotonic() at each step of its start (Kubelet.run_pod): created, picked (a
        # worker took it up), sandbox, cni, containers, ready (each: when that step ended)
        self.marks: dict[str, float] = {}
        # kept by the kubelet's container supervision (k8snetlab/supervisor.py)
        self.ready = True                   # every container runs and its TCP ports listen
        self.restarts: dict[str, int] = {}  # container -> restarts so far
        self.stopping = False               # being deleted: nothing restarts any more
        self.lifecycle = threading.Lock()   # container starts and the final stop take turns

    # -- the sandbox, and a shell on demand ---------------------------------------------------
    def startShell(self, mnopts: str | None = None) -> None:
        if self._holder is None:        # from Node.__init__: only the holder
            # the holder prints "\x01PID" once the namespaces exist (not before): pause.c,
            # or mnexec -p. Not mnexec -c: Popen closes the other descriptors already
            # (close_fds), where -c calls close() on each of the 20,000 the limit allows
            # (~7 ms of CPU per pod)
            try:
                self._holder = subprocess.Popen(self._holder_argv, stdin=subprocess.DEVNULL,
                                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            except FileNotFoundError:
                raise proc.tool_missing(self._holder_argv[0]) from None
            with self._holder.stdout as out:
                line = out.readline()
            if not line.startswith(b"\x01"):
                self._holder.kill()
                self._holder.wait()
                raise OSError(f"pod {self.name}: {self._holder_argv[0]} made no sandbox "
                              f"(it printed {line!r})")
            self.pid = int(line[1:])
            return
        if self.shell is not None:
            return
        holder = self.pid
        self.inNamespace = False        # attach to the holder's namespaces, make none
        try:
            super().startShell(mnopts=f"-da{holder}")
            if self.on_popen:
                self.on_popen(self.shell.pid, f"pod {self.name} shell")
        finally:
            self.inNamespace = True
            self.pid = holder

    # each step of a start (Kubelet.run_pod marks when it ended) and the phase that ends there
    STARTUP_STEPS = (("created", ""), ("picked", "queued"), ("sandbox", "sandbox"), ("cni", "cni"),
                     ("containers", "containers"), ("ready", "readiness"))
    STARTUP_PHASES = tuple(phase for _, phase in STARTUP_STEPS[1:])

    def phase_seconds(self) -> dict[str, float]:
        """Where this pod's startup latency went, from :attr:`marks`: ``queued`` (asked for,
        waiting for a worker), ``sandbox``, ``cni``, ``containers``, ``readiness`` (seconds;
        only the steps it reached)."""
        steps = [(step, phase) for step, phase in self.STARTUP_STEPS if step in self.marks]
        return {phase: self.marks[b] - self.marks[a] for (a, _), (b, phase) in zip(steps, steps[1:])}

    @property
    def touched(self) -> bool:
        """Has anything run in the pod that the runtime did not start and track (a shell,
        Mininet's ``popen``)? Then stopping the pod must look for its processes."""
        return self.shell is not None or self._foreign

    def popen(self, *args: Any, **kwargs: Any) -> subprocess.Popen:
        self._foreign = True
        return super().popen(*args, **kwargs)

    def popen_ns(self, args: Sequence[str], log_path: str | os.PathLike | None = None,
                 what: str = "", **kw: Any) -> subprocess.Popen:
        p = super().popen_ns(args, log_path=log_path, what=what, **kw)
        self.spawned.append(p)
        # mnexec joins the namespaces after Popen returned: wait until it has, so that
        # whoever looks at /proc/PID/net (readiness) sees the pod's, not the runtime's
        want = os.stat(self.netns).st_ino
        deadline = time.monotonic() + 5
        while p.poll() is None and time.monotonic() < deadline:
            try:
                if os.stat(f"/proc/{p.pid}/ns/net").st_ino == want:
                    break
            except OSError:
                break
            time.sleep(0.0005)
        return p

    def _entering(self) -> tuple[list[str], Any, bool]:
        """``mnexec -da <holder>`` joins the sandbox's network and mount namespaces in a new
        session: the runtime vforks instead of forking itself whole (~12 ms of its CPU at
        200 MB, per container)."""
        return ["mnexec", "-da", str(self.pid)], None, False

    def cmd(self, *args: Any, **kwargs: Any) -> str:
        self.startShell()
        return super().cmd(*args, **kwargs)

    def sendCmd(self, *args: Any, **kwargs: Any) -> None:
        self.startShell()
        super().sendCmd(*args, **kwargs)

    def sendInt(self, intr: str = chr(3)) -> None:
        if self.shell is not None:
            super().sendInt(intr)

    def deleteIntfs(self, checkName: bool = True) -> None:
        """Forget the interfaces; the kernel removes them with the namespace (and CNI DEL
        has removed the pod's veth already): no shell is started to delete them."""
        for intf in list(self.intfs.values()):
            self.delIntf(intf)

    def terminate(self) -> None:
        super().terminate()
        if self._holder is not None and self._holder.poll() is None:
            self._holder.kill()
            self._holder.wait()

    @property
    def mntns(self) -> str:
        """The sandbox's own mount namespace (``mnexec -n`` made it, ``/`` private): its
        containers and commands see what is mounted only there, e.g. the pod's
        ``/etc/resolv.conf`` (:mod:`k8snetlab.services.dns`)."""
        return f"/proc/{self.pid}/ns/mnt"

    def attach_interface(self, ifname: str, cidr: str) -> None:
        """Tell Mininet about the interface the CNI plugin made, so IP() and the CLI work."""
        intf = Intf(ifname, node=self, moveIntfFn=lambda *a, **k: None, up=None)
        addr, _, plen = cidr.partition("/")
        intf.ip, intf.prefixLen = addr, int(plen or 32)
        self.ip = addr

    def start_container(self, c: ContainerSpec, log_dir: Path) -> Container | None:
        if not c.argv:
            return None
        log_path = log_dir / f"{self.name}_{c.name}.log"
        # as the kubelet does: HOSTNAME is the pod's name (the UTS namespace is the machine's here)
        env = {**os.environ, "HOSTNAME": self.name, "POD_NAME": self.name, "POD_NAMESPACE": self.spec.namespace}
        p = self.popen_ns(c.argv, log_path=log_path, what=f"pod {self.name} container {c.name}", env=env)
        cont = Container(c.name, c.argv, p, log_path)
        self.containers[c.name] = cont
        return cont

    def signal_containers(self) -> None:
        """SIGTERM every container now; :meth:`stop_containers` then waits for them (a
        cluster stopping signals all its pods' containers first, then waits for each)."""
        with self.lifecycle:
            self.stopping = True
            for c in self.containers.values():
                if c.running():
                    c.process.terminate()

    def signal_holder(self) -> None:
        """SIGKILL the sandbox's holder without waiting (:meth:`terminate` reaps it)."""
        if self._holder is not None and self._holder.poll() is None:
            self._holder.kill()

    def stop_containers(self, grace: float = 1.0) -> None:
        with self.lifecycle:
            self.stopping = True
            self._stop_containers(grace)

    def _stop_containers(self, grace: float) -> None:
        proc.end_children([c.process for c in self.containers.values()], grace)
        self.containers.clear()
