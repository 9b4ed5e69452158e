"""An Open vSwitch underlay, driven by an OpenFlow controller app (``underlay.switch: ovs``).

What a Mininet user gets with ``mn --switch ovs,datapath=user --controller remote``, owned by
the cluster from start to stop and isolated from anything else on the machine:
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from mininet.node import OVSSwitch, Switch

from . import proc
from .errors import K8sNetLabError
from .netutil import Netns
from .switching import OVS_TOOLS

if TYPE_CHECKING:  # pragma: no cover
    from .statedir import StateDir
    from .clusterspec import ClusterSpec

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
SCHEMA_CANDIDATES = ("/usr/share/openvswitch/vswitch.ovsschema", "/usr/local/share/openvswitch/vswitch.ovsschema")
OPENFLOW_VERSION = "OpenFlow13"
CONTROLLER_HOST, CONTROLLER_PORT = "127.0.0.1", 6653
START_TIMEOUT_S = 20.0        # bound on each daemon's and the controller's start
READY_TIMEOUT_S = 20.0        # bound on switches connecting and the app discovering the links
RECONNECT_MS = 1000           # a switch retries a lost controller at least this often


def choose_datapath() -> tuple[str, str]:
    """(``kernel`` | ``user``, why) for this machine's kernel."""
    if os.path.isdir("/sys/module/openvswitch"):
        return "kernel", "the kernel has the openvswitch module"
    return "user", "the kernel has no openvswitch module: userspace datapath (netdev)"


def _new_netns() -> None:
    """preexec_fn: the child gets a network namespace of its own (unshare(2))."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(proc.CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare(CLONE_NEWNET): {os.strerror(err)}")
    os.setpgrp()


class OvsUnderlay:
    """The Open vSwitch daemons and controller of one cluster. ``start()``, then the cluster
    builds its switches with :meth:`switch_class`; ``stop()`` after Mininet has stopped.

    - **A private Open vSwitch.** Each cluster runs its own ``ovsdb-server`` (database in the
      cluster's state directory, ``/run/k8snetlab/knlN/ovs/``) and ``ovs-vswitchd``, started here
      as our child processes and stopped by PID. Both run in a network namespace of their own
      (held by a ``sleep`` process): the bridges' internal ports, the datapath's ``ovs-netdev``
      port and the switch ends of every underlay veth live there, not in the root namespace. A
      system Open vSwitch, if there is one, is never contacted (every ``ovs-vsctl`` names our
      database; ``OVS_RUNDIR`` points the tools at our sockets).
    - **The datapath** is chosen automatically and logged: ``kernel`` where the kernel has the
      ``openvswitch`` module, else ``user`` (netdev: packets cross ``ovs-vswitchd`` in user space,
      slower and CPU-hungry). With ``user``, transmit checksum offload is turned off on the hosts'
      underlay interfaces: a packet with a checksum left to the NIC would reach the other side
      unfinished through the AF_PACKET sockets of the userspace datapath, and TCP would stall.
    - **The controller**: ``python -m controllers APP`` (os-ken, or Ryu where installed) runs in
      the same namespace and listens on its loopback, ``127.0.0.1:6653``; every bridge connects to
      it (OpenFlow 1.3, ``fail_mode=secure``: nothing is forwarded that the app did not allow).
      With ``controller: none`` the bridges are ``fail_mode=standalone`` learning switches.
    - **Switches** are Mininet ``OVSSwitch`` objects (:class:`OvsSwitch`) whose shells live in that
      namespace, so Mininet builds links into it, and the Mininet CLI works: ``dpctl dump-flows``,
      ``knl1s1 ovs-ofctl -O OpenFlow13 dump-flows knl1s1``. Every ``ovs-vsctl`` call is checked.

    From the root namespace: ``ovs-vsctl --db=unix:/run/k8snetlab/knlN/ovs/db.sock show`` and
    ``OVS_RUNDIR=/run/k8snetlab/knlN/ovs ovs-ofctl -O OpenFlow13 dump-flows knlNs1``.
    """

    def __init__(self, spec: "ClusterSpec", state: "StateDir"):
        self.spec = spec
        self.state = state
        self.app: str | None = None if spec.underlay.controller in ("none", None) else spec.underlay.controller
        self.run_dir = state.path / "ovs"
        self.datapath, self.datapath_why = choose_datapath()
        self._holder: subprocess.Popen | None = None
        self._procs: list[tuple[str, subprocess.Popen]] = []     # started in this order

    # -- paths and tools -------------------------------------------------------------------------
    @property
    def netns(self) -> str:
        """The namespace of ovs-vswitchd, its ports and the controller."""
        assert self._holder is not None, "Open vSwitch is not started"
        return f"/proc/{self._holder.pid}/ns/net"

    @property
    def db_sock(self) -> Path:
        return self.run_dir / "db.sock"

    @property
    def state_file(self) -> Path:
        """Where the controller app exports its view (see controllers.export_state)."""
        return self.run_dir / "controller-state.json"

    def env(self) -> dict[str, str]:
        run = str(self.run_dir)
        return {**os.environ, "OVS_RUNDIR": run, "OVS_DBDIR": run, "OVS_LOGDIR": run}

    def vsctl(self, *args: str, timeout: float = 15) -> str:
        """``ovs-vsctl`` on our database; waits until ovs-vswitchd applied the change."""
        out = proc.run(["ovs-vsctl", f"--db=unix:{self.db_sock}", f"--timeout={int(timeout)}", *args],
                       env=self.env(), timeout=timeout + 5, where="Open vSwitch")
        return out.stdout

    def ofctl(self, *args: str) -> str:
        """``ovs-ofctl -O OpenFlow13`` on one of our bridges (found by name in OVS_RUNDIR)."""
        return proc.run(["ovs-ofctl", "-O", OPENFLOW_VERSION, *args], env=self.env(),
                        where="Open vSwitch").stdout

    def flows(self, bridge: str, table: int | None = None) -> list[str]:
        """The bridge's flows, one ``dump-flows`` line each (the reply header dropped)."""
        args = ["dump-flows", bridge] + ([f"table={table}"] if table is not None else [])
        return [line.strip() for line in self.ofctl(*args).splitlines()
                if line.strip() and not line.startswith(("OFPST_FLOW", "NXST_FLOW"))]

    def controller_state(self) -> dict[str, Any]:
        import controllers
        return controllers.read_state(self.state_file)

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        tools = proc.require(*OVS_TOOLS, *(["ethtool"] if self.datapath == "user" else []))
        schema = next((s for s in SCHEMA_CANDIDATES if os.path.exists(s)), None)
        if schema is None:
            raise K8sNetLabError("Open vSwitch's database schema vswitch.ovsschema is missing: "
                                 "apt-get install --reinstall openvswitch-common")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        log.info("Open vSwitch: %s", self.datapath_why)
        self._holder = subprocess.Popen(["sleep", "infinity"], stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        preexec_fn=_new_netns)
        self.state.record_pid(self._holder.pid, "Open vSwitch namespace holder")
        self._wait(lambda: proc.start_time(self._holder.pid) and
                   os.stat(self.netns).st_ino != os.stat("/proc/self/ns/net").st_ino, "namespace")
        self.state.record_netns(self._holder.pid, "Open vSwitch")
        with Netns(self.netns, "Open vSwitch namespace") as ns:
            ns.link_up("lo")
        db = self.run_dir / "conf.db"
        proc.run([tools["ovsdb-tool"], "create", db, schema], where="Open vSwitch")
        r = self.run_dir
        self._daemon("ovsdb-server", [tools["ovsdb-server"], str(db), f"--remote=punix:{self.db_sock}",
                                      f"--unixctl={r / 'ovsdb-server.ctl'}", f"--log-file={r / 'ovsdb-server.log'}",
                                      "--no-chdir"], ready=self.db_sock)
        proc.run(["ovs-vsctl", f"--db=unix:{self.db_sock}", "--no-wait", "init"], env=self.env(), where="Open vSwitch")
        self._daemon("ovs-vswitchd", [tools["ovs-vswitchd"], f"unix:{self.db_sock}",
                                      f"--unixctl={r / 'ovs-vswitchd.ctl'}", f"--log-file={r / 'ovs-vswitchd.log'}",
                                      "--no-chdir", *(["--disable-system"] if self.datapath == "user" else [])],
                     ready=r / "ovs-vswitchd.ctl")
        if self.app:
            self._start_controller()

    def _daemon(self, name: str, args: list[str], ready: Path) -> subprocess.Popen:
        log_path = self.run_dir / f"{name}.out"
        with open(log_path, "ab") as out:
            p = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                 env=self.env(), preexec_fn=self._enter)
        self._procs.append((name, p))
        self.state.record_pid(p.pid, name)
        self._wait(lambda: ready.exists(), name, p, self.run_dir / f"{name}.log")
        return p

    def _enter(self) -> None:
        proc.setns(self.netns)
        os.setpgrp()     # Ctrl-C at the terminal is the runtime's to handle, not theirs

    def _wait(self, ok: Callable[[], Any], what: str, p: subprocess.Popen | None = None,
              log_path: Path | None = None, timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while not ok():
            if p is not None and p.poll() is not None:
                raise K8sNetLabError(f"{what} exited with status {p.returncode} while starting"
                                     f"{_tail(log_path)}")
            if time.monotonic() > deadline:
                raise K8sNetLabError(f"{what} not ready after {timeout:.0f} s{_tail(log_path)}")
            time.sleep(0.02)

    def _start_controller(self) -> None:
        assert self.app is not None
        log_path = self.run_dir / "controller.log"
        # service_lb reads what to serve from a file the openflow kube-proxy mode writes
        env = {**self.env(), "PYTHONPATH": str(REPO_ROOT), "K8SNETLAB_SERVICES": str(self.run_dir / "services.json")}
        with open(log_path, "ab") as out:
            p = subprocess.Popen([sys.executable, "-m", "controllers", "--host", CONTROLLER_HOST,
                                  "--port", str(CONTROLLER_PORT), "--state", str(self.state_file), self.app],
                                 cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                 stderr=subprocess.STDOUT, preexec_fn=self._enter)
        self._procs.append(("controller", p))
        self.state.record_pid(p.pid, f"controller {self.app}")
        self._wait(lambda: proc.listening(p.pid, CONTROLLER_PORT), f"controller app {self.app}", p, log_path)
        log.info("controller %s listening on %s:%d (pid %d, log %s)", self.app, CONTROLLER_HOST,
                 CONTROLLER_PORT, p.pid, log_path)

    def controller_pid(self) -> int | None:
        return next((p.pid for n, p in self._procs if n == "controller"), None)

    def pids(self) -> dict[str, int]:
        """What runs for this underlay: name -> PID (for tests: all gone after stop)."""
        out = {name: p.pid for name, p in self._procs}
        if self._holder is not None:
            out["holder"] = self._holder.pid
        return out

    def switch_class(self) -> Callable[..., "OvsSwitch"]:
        """What Mininet instantiates for each switch of this cluster."""
        return functools.partial(OvsSwitch, underlay=self)

    @property
    def controller_target(self) -> str | None:
        return f"tcp:{CONTROLLER_HOST}:{CONTROLLER_PORT}" if self.app else None

    def wait_ready(self, switches: list["OvsSwitch"], links: int) -> float:
        """Bounded wait until every bridge is connected to the controller and, for an app that
        exports its view, it has discovered the ``links`` switch-to-switch links. Returns the
        seconds waited; logs a warning (does not fail) when the bound is reached."""
        t0 = time.monotonic()
        if not self.app or not switches:
            return 0.0
        deadline = t0 + READY_TIMEOUT_S
        import controllers
        exports = controllers.get(self.app).exports
        while time.monotonic() < deadline:
            if exports:   # the app's own view: immediate (ovsdb's is_connected lags by seconds)
                if len(self.controller_state().get("switches", ())) >= len(switches):
                    break
            else:
                states = self.vsctl("--bare", "--columns=is_connected", "list", "Controller").split()
                if len(states) >= len(switches) and all(s == "true" for s in states):
                    break
            time.sleep(0.02)
        else:
            log.warning("not every switch connected to controller %s within %.0f s (see %s)", self.app,
                        READY_TIMEOUT_S, self.run_dir / "controller.log")
        if links and exports:
            while time.monotonic() < deadline:
                view = self.controller_state()
                if len(view.get("switches", ())) >= len(switches) and len(view.get("links", ())) >= links:
                    break
                time.sleep(0.05)
            else:
                log.warning("controller %s discovered %d of %d links within %.0f s", self.app,
                            len(self.controller_state().get("links", ())), links, READY_TIMEOUT_S)
        waited = time.monotonic() - t0
        log.info("%d switches connected to %s in %.2f s", len(switches), self.app, waited)
        return waited

    def prepare_host_side(self, host: Any, ifname: str) -> None:
        """A host's interface on an OVS switch: with the userspace datapath, compute checksums
        in the host (see :class:`OvsUnderlay`)."""
        if self.datapath == "user":
            host.run(["ethtool", "-K", ifname, "tx", "off"])

    def prepare_all(self, switches: list[Switch]) -> None:
        for sw in switches:
            for intf in sw.intfList():
                link = intf.link
                if link is None:
                    continue
                other = link.intf1 if link.intf2 is intf else link.intf2
                if not isinstance(other.node, Switch):
                    self.prepare_host_side(other.node, other.name)

    def set_link(self, intf: str, up: bool) -> None:
        """Carrier of a switch port (and so of its peer) up or down: a link failure."""
        with Netns(self.netns, "Open vSwitch namespace") as ns:
            (ns.link_up if up else ns.link_down)(intf)

    def tx_packets(self, intf: str) -> int:
        """Packets a switch port has sent (its veth's counter): which uplink carries traffic."""
        with Netns(self.netns, "Open vSwitch namespace") as ns:
            return ns.link_stats(intf)["tx_packets"]

    def describe(self) -> str:
        ctl = f"controller {self.app} on {CONTROLLER_HOST}:{CONTROLLER_PORT}" if self.app else \
            "no controller (standalone learning bridges)"
        return (f"underlay: Open vSwitch, {self.datapath} datapath, {ctl}; "
                f"ovs-vsctl --db=unix:{self.db_sock} show")

    def stop(self) -> None:
        """Stop the controller, ovs-vswitchd, ovsdb-server and the namespace, newest first."""
        errors = []
        for name, p in reversed(self._procs):
            if name == "ovs-vswitchd" and p.poll() is None:
                # a clean exit removes the datapath and its ports; then the signal is a no-op
                r = proc.run(["ovs-appctl", "-t", str(self.run_dir / "ovs-vswitchd.ctl"), "exit", "--cleanup"],
                             env=self.env(), check=False, timeout=10)
                if r.returncode != 0:
                    log.debug("ovs-appctl exit: %s", r.stderr.strip())
            if not proc.end_child(p, grace=3.0):
                errors.append(name)
        self._procs.clear()
        if self._holder is not None:
            proc.end_child(self._holder, grace=1.0)
            self._holder = None
        if errors:
            raise K8sNetLabError(f"could not stop {', '.join(errors)}")


def _tail(path: Path | None, lines: int = 1) -> str:
    if path is None:
        return ""
    try:
        text = [l for l in path.read_text(errors="replace").splitlines() if l.strip()]
    except OSError:
        return ""
    return f": {' | '.join(text[-lines:])} (log {path})" if text else f" (log {path})"


# ---------------------------------------------------------------------------------- the switch
_PORT_RE = re.compile(r"-eth(\d+)$")


class OvsSwitch(OVSSwitch):
    """Mininet's OVSSwitch on our private Open vSwitch: its shell in the OVS namespace (so
    Mininet creates its veth ends there), every ovs-vsctl call checked, ports numbered like
    their names (``knl1s1-eth3`` is OpenFlow port 3)."""

    isSetup = True   # Mininet's OVSSwitch.setup() asks the system's ovsdb; OvsUnderlay.start checked ours

    def __init__(self, name: str, underlay: OvsUnderlay, **params: Any):
        self.underlay = underlay          # before Node.__init__: _popen needs it
        super().__init__(name, failMode="secure" if underlay.app else "standalone",
                         datapath=underlay.datapath, protocols=OPENFLOW_VERSION,
                         reconnectms=RECONNECT_MS, **params)

    def _popen(self, cmd: Any, **params: Any) -> subprocess.Popen:
        ns, before = self.underlay.netns, params.get("preexec_fn")
        params["preexec_fn"] = lambda: (proc.setns(ns), before and before())
        params.setdefault("env", self.underlay.env())
        return super()._popen(cmd, **params)

    @staticmethod
    def ofport(intf: Any, fallback: int) -> int:
        m = _PORT_RE.search(str(intf))
        return int(m.group(1)) if m else fallback

    def _port_args(self, intf: Any) -> list[str]:
        return ["--", "add-port", self.name, str(intf),
                "--", "set", "Interface", str(intf), f"ofport_request={self.ofport(intf, self.ports[intf])}"]

    def start(self, controllers: Any) -> None:
        int(self.dpid, 16)
        u = self.underlay
        args = ["--", "--if-exists", "del-br", self.name, "--", "add-br", self.name,
                "--", "set", "Bridge", self.name,
                f"datapath_type={'netdev' if u.datapath == 'user' else 'system'}",
                f"fail_mode={self.failMode}", f"protocols={self.protocols}",
                f"other-config:datapath-id={self.dpid}", "other-config:disable-in-band=true",
                f"other-config:dp-desc={self.name}"]
        for intf in self.intfList():
            if self.ports[intf] and str(intf) != "lo":
                args += self._port_args(intf)
        if u.controller_target:
            args += ["--", "--id=@c", "create", "Controller", f'target="{u.controller_target}"',
                     f"max_backoff={RECONNECT_MS}", "--", "set", "Bridge", self.name, "controller=@c"]
        u.vsctl(*args)

    def attach(self, intf: Any) -> None:
        """A port added to the running switch (a node or host joining)."""
        self.underlay.vsctl(*self._port_args(intf))
        self.underlay.set_link(str(intf), up=True)

    def detach(self, intf: Any) -> None:
        self.underlay.vsctl("--if-exists", "del-port", self.name, str(intf))

    def delIntf(self, intf: Any) -> None:
        """Mininet deleted the port's veth (a node left, or teardown): drop the port from the
        bridge too (without waiting for ovs-vswitchd: it may be stopping)."""
        try:
            self.underlay.vsctl("--no-wait", "--if-exists", "del-port", self.name, str(intf))
        except K8sNetLabError as e:
            log.debug("del-port %s: %s", intf, e)
        super().delIntf(intf)

    def vsctl(self, *args: Any, **kwargs: Any) -> str:
        return self.underlay.vsctl(*(str(a) for a in args))

    def dpctl(self, *args: Any) -> str:
        """Mininet CLI's ``dpctl``: ovs-ofctl on this bridge."""
        try:
            return self.underlay.ofctl(args[0], self.name, *(str(a) for a in args[1:]))
        except K8sNetLabError as e:
            return f"{e}\n"

    def connected(self) -> bool:
        if not self.underlay.app:
            return True
        out = self.underlay.vsctl("--bare", "--columns=is_connected", "list", "Controller")
        return "true" in out.split()

    def stop(self, deleteIntfs: bool = True) -> None:
        try:
            self.underlay.vsctl("--if-exists", "del-br", self.name)
        except K8sNetLabError as e:
            log.warning("removing bridge %s: %s", self.name, e)
        Switch.stop(self, deleteIntfs)

    @classmethod
    def batchStartup(cls, switches: Any, run: Any = None) -> Any:
        return switches        # start() did everything

    @classmethod
    def batchShutdown(cls, switches: Any, run: Any = None) -> Any:
        """Remove every bridge in one transaction (Mininet then ends the shells)."""
        if switches:
            args = [a for s in switches for a in ("--", "--if-exists", "del-br", s.name)]
            try:
                switches[0].underlay.vsctl(*args)
            except K8sNetLabError as e:   # keep Mininet's stop going: the database goes anyway
                log.warning("removing bridges: %s", e)
        return switches


def switch_links(cluster: Any, a: str, b: str) -> list[tuple[str, str]]:
    """The links between switches ``a`` and ``b`` (names from the cluster file) as pairs of
    port names (the port on a, the port on b)."""
    sa, sb = cluster.switches[a], cluster.switches[b]
    return [(str(x), str(y)) for x, y in sa.connectionsTo(sb)]
