"""Run controller apps: ``python -m controllers [--host H] [--port P] [--state FILE] APP [APP...]``.

What ``ryu-manager`` does for Ryu, for the apps of this registry: import the apps (so their
options exist), parse the framework's configuration, start the OpenFlow listener on
``--host:--port`` and run until SIGTERM. The runtime starts this in the Open vSwitch
namespace of a cluster with ``--host 127.0.0.1`` and stops it by PID.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import controllers  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m controllers", description=__doc__.splitlines()[0])
    p.add_argument("apps", nargs="+", help=f"app names: {', '.join(sorted(controllers.APPS))}")
    p.add_argument("--host", default="127.0.0.1", help="OpenFlow listen address (default %(default)s)")
    p.add_argument("--port", type=int, default=controllers.OPENFLOW_PORT, help="OpenFlow port (default %(default)s)")
    p.add_argument("--state", help=f"file the apps export their view to (sets ${controllers.STATE_ENV})")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.state:
        os.environ[controllers.STATE_ENV] = args.state
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s.%(msecs)03d %(name)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    try:
        infos = [controllers.get(a) for a in args.apps]
        fw = controllers.framework()
        for info in infos:
            importlib.import_module(info.module)
        observe = any(i.observe_links for i in infos)
        if observe:   # registers --observe-links and the LLDP link discovery service
            importlib.import_module(f"{fw}.topology.switches")
    except (controllers.AppError, ImportError) as e:
        print(f"controllers: error: {e}", file=sys.stderr)
        return 2
    cfg = importlib.import_module(f"{fw}.cfg")
    conf_args = ["--ofp-listen-host", args.host, "--ofp-tcp-listen-port", str(args.port)]
    if observe:
        conf_args.append("--observe-links")
    cfg.CONF(args=conf_args, project=fw)
    mgr = importlib.import_module(f"{fw}.base.app_manager").AppManager

    def stop(signum, frame):
        # SIGTERM from the runtime: the apps keep no state worth saving, and the framework's
        # shutdown joins its server threads for seconds; the switches see the TCP close at once
        logging.getLogger("controllers").info("stopping on signal %d", signum)
        logging.shutdown()
        os._exit(0)
    signal.signal(signal.SIGTERM, stop)
    logging.getLogger("controllers").info("%s apps %s on %s:%d", fw, ", ".join(args.apps), args.host, args.port)
    try:
        mgr.run_apps([i.module for i in infos])
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
