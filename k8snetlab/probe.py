"""A who-are-you probe: the server names itself and the address it saw; the client asks many.

Standard library only, so it runs as a plain program inside any pod or node namespace::

    python3 probe.py serve NAME PORT            # answers every TCP connection with one JSON line
    python3 probe.py ask TIMEOUT HOST:PORT ...  # one JSON line per target, concurrently

The server's line is ``{"name": NAME, "peer": <client address it saw>, "local": <address the
client reached>}``: what the Kubernetes network model is about (who answered, and did the
source address survive the trip unchanged). The client adds ``target``, ``ok`` and ``error``.
"""

from __future__ import annotations

import json
import socket
import socketserver
import sys
from concurrent.futures import ThreadPoolExecutor


def serve(name: str, port: int) -> None:
    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            peer = self.request.getpeername()[0]
            local = self.request.getsockname()[0]
            self.request.sendall((json.dumps({"name": name, "peer": peer, "local": local}) + "\n").encode())

    socketserver.ThreadingTCPServer.allow_reuse_address = True
    with socketserver.ThreadingTCPServer(("0.0.0.0", port), Handler) as srv:
        srv.daemon_threads = True
        srv.serve_forever()


def ask_one(target: str, timeout: float) -> dict:
    host, _, port = target.rpartition(":")
    out = {"target": target, "ok": False}
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as s:
            s.settimeout(timeout)
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
        out.update(json.loads(data), ok=True)
    except (OSError, ValueError) as e:
        out["error"] = type(e).__name__ if isinstance(e, socket.timeout) else str(e)
    return out


def ask(timeout: float, targets: list[str]) -> None:
    with ThreadPoolExecutor(max(1, min(16, len(targets)))) as ex:
        for res in ex.map(lambda t: ask_one(t, timeout), targets):
            print(json.dumps(res), flush=True)


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "serve":
        serve(sys.argv[2], int(sys.argv[3]))
    elif len(sys.argv) >= 3 and sys.argv[1] == "ask":
        ask(float(sys.argv[2]), sys.argv[3:])
    else:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
