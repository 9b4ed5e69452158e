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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from mininet.link import Intf
from mininet.node import Host

from . import proc
from .manifests import ContainerSpec, PodSpec
from .clusterspec import NodeSpec

log = logging.getLogger(__name__)


class NetnsHost(Host):
    """A Mininet host with checked command execution in its network namespace."""

    on_popen = None  # set by the cluster: records the PIDs it must stop

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
        ns, mnt = self.netns, self.mntns
        out: Any = open(log_path, "ab") if log_path else subprocess.DEVNULL
        try:
            p = subprocess.Popen([str(a) for a in args], stdin=subprocess.DEVNULL, stdout=out,
                                 stderr=subprocess.STDOUT if log_path else subprocess.DEVNULL,
                                 preexec_fn=lambda: (proc.setns(ns), mnt and proc.setns_mount(mnt),
                                                     os.setpgrp()), **kw)
        except FileNotFoundError:
            raise proc.tool_missing(str(args[0])) from None
        finally:
            if log_path:
                out.close()
        if self.on_popen:
            self.on_popen(p.pid, what or f"{self.name}: {args[0]}")
        return p


class NodeHost(NetnsHost):
    """A Kubernetes node."""

    def __init__(self, name: str, spec: NodeSpec | None = None, state_dir: Path | None = None, **params: Any):
        super().__init__(name, inNamespace=True, **params)
        self.spec = spec
        self.state_dir = state_dir

    @property
    def ip(self) -> str:
        return str(self.spec.ip) if self.spec else self.IP()


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
    """A pod sandbox (Mininet host) and its containers."""

    def __init__(self, name: str, spec: PodSpec | None = None, **params: Any):
        super().__init__(name, inNamespace=True, **params)
        self.spec = spec or PodSpec(name)
        self.node_name: str | None = None
        self.ip: str | None = None          # the pod IP (no prefix) once CNI ADD returned
        self.container_id = ""
        self.result: Any = None             # the CNI result
        self.containers: dict[str, Container] = {}
        # kept by the kubelet's container supervision (k8snetlab/supervisor.py)
        self.ready = True                   # every container runs and its TCP ports listen
        self.restarts: dict[str, int] = {}  # container -> restarts so far
        self.stopping = False               # being deleted: nothing restarts any more
        self.lifecycle = threading.Lock()   # container starts and the final stop take turns

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

    def stop_containers(self, grace: float = 1.0) -> None:
        with self.lifecycle:
            self.stopping = True
            self._stop_containers(grace)

    def _stop_containers(self, grace: float) -> None:
        for c in self.containers.values():
            if c.running():
                c.process.terminate()
        for c in self.containers.values():
            try:
                c.process.wait(grace)
            except subprocess.TimeoutExpired:
                c.process.kill()
                c.process.wait(5)
        self.containers.clear()
