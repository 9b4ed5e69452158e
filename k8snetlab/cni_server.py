"""The fast CNI exec path: a thin executable per plugin type and a CNI server per node.

The runtime (ours, or containerd through libcni) still executes the binary named by ``type``
with the ``CNI_*`` environment and stdin, as the CNI specification says. That binary is a thin
shim (the design of Multus' thick plugin, Antrea and Kube-OVN) that forwards the request over a
unix socket to its node's server, which has the plugins imported and runs them in the node's
namespace; with no server listening, the shim runs the full plugin. Details at
:class:`CNIServer` (finding a server, the wire format) and :class:`ServerPool` (where they run).
"""

from __future__ import annotations

import json
import logging
import os
import select
import shutil
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO, Any, Callable

from . import cbuild, proc
from .errors import K8sNetLabError

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent

_PY_SHIM = '''#!{python} -IS
"""CNI plugin (k8snetlab): forwards the request to the CNI server of the node this runs in;
without one, runs the full plugin. The C shim (cni_shim.c) does the same, faster."""
import os, socket, sys
exe = os.path.realpath(__file__)
bin_dir, ptype = os.path.split(exe)
try:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect("%s/../run/%d.sock" % (bin_dir, os.stat("/proc/self/ns/net").st_ino))
except OSError:
    full = os.path.join(bin_dir, ".full", ptype)
    os.execv(full, [full] + sys.argv[1:])
import json
env = {{k: v for k, v in os.environ.items() if k.startswith("CNI_")}}
s.sendall(json.dumps({{"type": ptype, "env": env}}).encode() + b"\\n" + sys.stdin.buffer.read())
s.shutdown(socket.SHUT_WR)
chunks = []
while True:
    b = s.recv(65536)
    if not b:
        break
    chunks.append(b)
rc, _, out = b"".join(chunks).partition(b"\\n")
sys.stdout.buffer.write(out)
sys.stdout.flush()
sys.exit(int(rc or b"1"))
'''

_FULL = ("#!{python}\n"
         "import sys\n"
         "sys.path.insert(0, {repo!r})\n"
         "import {module} as plugin\n"
         "from cni_plugins import skel\n"
         "skel.main(plugin)\n")

SHIM_SOURCE = Path(__file__).resolve().parent / "cni_shim.c"


def compiled_shim(cache_dir: Path) -> Path | None:
    """The C shim, compiled once per source version into ``cache_dir``; None without a C
    compiler (then the Python shim serves, ~10 ms slower per call)."""
    shim = cbuild.compiled(SHIM_SOURCE, cache_dir, "cni-shim")
    if shim is None:
        log.info("CNI plugins are Python shims")
    return shim


def write_plugins(bin_dir: Path, cache_dir: Path | None = None) -> list[str]:
    """Write one executable per plugin type of ours into ``bin_dir`` (the shim), with the
    full plugin program under ``bin_dir/.full``; the servers listen in ``bin_dir/../run``.
    Return the types."""
    from cni_plugins import PLUGINS
    full_dir = bin_dir / ".full"
    full_dir.mkdir(parents=True, exist_ok=True)
    shim = compiled_shim(cache_dir) if cache_dir is not None else None
    for ptype in PLUGINS.names():
        module = PLUGINS.entry(ptype).module
        full = full_dir / ptype
        full.write_text(_FULL.format(python=sys.executable, repo=str(REPO_ROOT), module=module))
        full.chmod(0o755)
        path = bin_dir / ptype
        if shim is not None:
            shutil.copyfile(shim, path)
        else:
            path.write_text(_PY_SHIM.format(python=sys.executable))
        path.chmod(0o755)
    return PLUGINS.names()


def run_dir(bin_dir: Path) -> Path:
    """Where the shims in ``bin_dir`` look for their servers' sockets."""
    return bin_dir.parent / "run"


class CNIServer:
    """Answers the shims started in one node's network namespace.

    The shim finds its server by the inode of the network namespace it was started in
    (``<run dir>/<inode>.sock``): one server per node, no extra environment, nothing a runtime
    must know. Where no server listens (a namespace that is no node of a running cluster, a
    runtime driving the plugins by hand), the shim becomes the plugin itself: it executes the
    full plugin program, stdin untouched, so every plugin stays a complete CNI executable.

    Wire format (both directions, one request per connection): the request is the plugin type
    and the ``CNI_*`` variables as one JSON line, then the raw stdin bytes; the answer is the
    exit status as a decimal line, then the raw stdout bytes.
    """

    def __init__(self, node_netns: str, run_dir: Path, label: str = ""):
        self.node_netns = node_netns
        self.label = label or node_netns
        self.ino = os.stat(node_netns).st_ino
        self.path = Path(run_dir) / f"{self.ino}.sock"
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self.requests = 0

    def start(self) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(self.path))
        sock.listen(128)
        self._sock = sock
        self._thread = threading.Thread(target=self._accept, name=f"cni-server-{self.label}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)     # wakes accept()
            except OSError:
                pass
            sock.close()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        self.path.unlink(missing_ok=True)

    def _accept(self) -> None:
        while self._sock is not None:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True,
                             name=f"cni-request-{self.label}").start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                rc, out = self._answer(conn)
            except Exception as e:   # a broken request: answer in the protocol
                log.warning("CNI server of %s: %s", self.label, e)
                rc, out = 1, json.dumps({"cniVersion": "1.1.0", "code": 999,
                                         "msg": f"CNI server of {self.label}: {e}"}).encode()
            try:
                conn.sendall(b"%d\n" % rc + out)
            except OSError:
                pass

    def _answer(self, conn: socket.socket) -> tuple[int, bytes]:
        chunks = []
        while True:
            b = conn.recv(65536)
            if not b:
                break
            chunks.append(b)
        head, _, stdin = b"".join(chunks).partition(b"\n")
        req = json.loads(head)
        # the caller must run in this node's namespace, as an exec'd plugin would
        pid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
        if os.stat(f"/proc/{pid}/ns/net").st_ino != self.ino:
            raise ValueError(f"caller (pid {pid}) is not in the network namespace of {self.label}")
        from cni_plugins import PLUGINS, skel
        from cni_plugins.inprocess import InProcessInvoker
        ptype = req["type"]
        if ptype not in PLUGINS:
            raise ValueError(f"no plugin of type {ptype!r} here")
        self.requests += 1
        invoker = InProcessInvoker()
        with proc.netns(self.node_netns):
            return skel.dispatch(PLUGINS.get(ptype), dict(req["env"]), stdin, invoker=invoker)


# ---------------------------------------------------------------------------------------
# the servers in worker processes
WORKER_PROGRAM = ("import os, sys\n"
                  "sys.path.insert(0, {repo!r})\n"
                  "from k8snetlab.cni_server import worker_main\n"
                  "worker_main()\n"
                  "os._exit(0)\n")      # its servers are stopped: no interpreter teardown to wait for


ASK_TIMEOUT = 30.0      # seconds a worker has to answer one order (each is a few ms of work)


def pool_size(nodes: int) -> int:
    """Worker processes for ``nodes`` nodes: one per CPU (at least 2, at most one per node)."""
    return max(1, min(nodes, max(2, os.cpu_count() or 1)))


def worker_main(stdin: IO[str] | None = None, stdout: IO[str] | None = None) -> None:
    """A worker's loop: one JSON order per line on stdin, one JSON answer per line on stdout.

    Orders: ``{"op": "serve", "netns": PATH, "run_dir": DIR, "label": NODE}`` starts that
    node's server; ``{"op": "stop", "label": NODE}`` stops it; ``{"op": "requests", "label":
    NODE}`` answers ``{"requests": N}``. At the end of stdin every server stops."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s cni-server[%(process)d] %(levelname)s %(message)s")
    # import what the requests need now, not in the first ADD
    from cni_plugins import PLUGINS, skel  # noqa: F401
    from cni_plugins.inprocess import InProcessInvoker  # noqa: F401
    for name in PLUGINS.names():
        try:
            PLUGINS.get(name)
        except Exception as e:      # said now; a request of that type gets the error as its answer
            logging.getLogger(__name__).warning("CNI plugin %s: %s", name, e)
    servers: dict[str, CNIServer] = {}
    try:
        for line in stdin:
            try:
                order = json.loads(line)
                label = order["label"]
                if order["op"] == "serve":
                    server = CNIServer(order["netns"], Path(order["run_dir"]), label)
                    server.start()
                    servers[label] = server
                    answer: dict[str, Any] = {"ok": True}
                elif order["op"] == "stop":
                    gone = servers.pop(label, None)
                    if gone is not None:
                        gone.stop()
                    answer = {"ok": True}
                elif order["op"] == "requests":
                    answer = {"ok": True, "requests": servers[label].requests if label in servers else 0}
                else:
                    answer = {"error": f"unknown order {order['op']!r}"}
            except Exception as e:      # tell the runtime, keep serving the other nodes
                answer = {"error": f"{type(e).__name__}: {e}"}
            stdout.write(json.dumps(answer) + "\n")
            stdout.flush()
    finally:
        for server in servers.values():
            server.stop()


class _Worker:
    """One worker process and the pipe to it (orders are answered in turn)."""

    def __init__(self, index: int, log_path: Path, record: Callable[[int, str], None] | None):
        self.index = index
        self.log_path = log_path
        with open(log_path, "ab") as log_file:
            self.process = subprocess.Popen(
                [sys.executable, "-c", WORKER_PROGRAM.format(repo=str(REPO_ROOT))],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log_file, text=True,
                start_new_session=True)
        if record is not None:
            record(self.process.pid, f"CNI server worker {index}")
        self._lock = threading.Lock()

    def ask(self, order: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        """Send one order, return its answer; K8sNetLabError if the worker exits, or does not
        answer within ``timeout`` seconds (default :data:`ASK_TIMEOUT`: a hung worker must not
        hang the runtime)."""
        timeout = ASK_TIMEOUT if timeout is None else timeout
        p = self.process
        with self._lock:
            try:
                assert p.stdin is not None and p.stdout is not None
                p.stdin.write(json.dumps(order) + "\n")
                p.stdin.flush()
                # one answer line per order, read whole: nothing waits in the file's buffer
                if not select.select([p.stdout], [], [], timeout)[0]:
                    raise K8sNetLabError(f"CNI server worker {self.index} (pid {p.pid}) did not answer "
                                         f"{order.get('op')} {order.get('label')} within {timeout:g} s; "
                                         f"see {self.log_path}")
                line = p.stdout.readline()
            except OSError:
                line = ""
        if not line:
            raise K8sNetLabError(f"CNI server worker {self.index} (pid {p.pid}) exited "
                                 f"(status {p.poll()}); see {self.log_path}")
        answer = json.loads(line)
        if "error" in answer:
            raise K8sNetLabError(f"CNI server worker {self.index}, {order.get('op')} "
                                 f"{order.get('label')}: {answer['error']}")
        return answer

    def stop(self, timeout: float = 5.0) -> None:
        p = self.process
        if p.stdin is not None:
            try:
                p.stdin.close()         # the worker's end of orders: it stops its servers
            except OSError:
                pass
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)
        if p.stdout is not None:
            p.stdout.close()


class PooledServer:
    """The handle of one node's CNI server in a pool worker (the same face as CNIServer)."""

    def __init__(self, worker: _Worker, node_netns: str, run_dir: Path, label: str):
        self.worker, self.node_netns, self.run_dir, self.label = worker, node_netns, Path(run_dir), label
        self.path = self.run_dir / f"{os.stat(node_netns).st_ino}.sock"

    def start(self) -> None:
        self.worker.ask({"op": "serve", "netns": self.node_netns, "run_dir": str(self.run_dir),
                         "label": self.label})

    def stop(self) -> None:
        if self.worker.process.poll() is None:
            self.worker.ask({"op": "stop", "label": self.label})
        self.path.unlink(missing_ok=True)

    @property
    def requests(self) -> int:
        """Requests this node's server has answered."""
        return int(self.worker.ask({"op": "requests", "label": self.label})["requests"])

    @property
    def pid(self) -> int:
        return self.worker.process.pid


class ServerPool:
    """The worker processes that run the nodes' CNI servers.

    A pool of a few worker processes (one per CPU, as
    Kube-OVN's daemon or Antrea's agent is one process per node, not per pod), each holding the
    servers of some nodes (node *i* on worker *i mod n*). The plugins' work (pyroute2, about a
    millisecond of CPU per netlink request) then runs beside the runtime, not under its
    interpreter lock, and ADDs of nodes on different workers run on different cores. A worker
    is told over its stdin which nodes to serve (one JSON line per order, one answer line each)
    and exits when its stdin closes, i.e. with the runtime, also after a ``kill -9``.
    """

    def __init__(self, run_dir: Path, log_dir: Path, workers: int,
                 record: Callable[[int, str], None] | None = None):
        self.run_dir, self.log_dir = Path(run_dir), Path(log_dir)
        self.size = workers
        self.record = record
        self.workers: list[_Worker] = []
        self._next = 0

    def start(self) -> None:
        self.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for i in range(self.size):
            self.workers.append(_Worker(i, self.log_dir / f"cni-server-{i}.log", self.record))

    def server(self, node_netns: str, label: str) -> PooledServer:
        """A server for one node, on the next worker in turn (not started yet)."""
        if not self.workers:
            raise K8sNetLabError("the CNI server pool is not running")
        worker = self.workers[self._next % len(self.workers)]
        self._next += 1
        return PooledServer(worker, node_netns, self.run_dir, label)

    def pids(self) -> list[int]:
        return [w.process.pid for w in self.workers]

    def cpu_seconds(self) -> float:
        """CPU seconds the workers used so far (user + system, from /proc/PID/stat)."""
        tick = os.sysconf("SC_CLK_TCK")
        total = 0.0
        for pid in self.pids():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / tick
            except (OSError, IndexError, ValueError):
                continue
        return total

    def stop(self) -> None:
        workers, self.workers = self.workers, []
        for w in workers:
            if w.process.stdin is not None:
                try:
                    w.process.stdin.close()
                except OSError:
                    pass
        for w in workers:
            w.stop()
