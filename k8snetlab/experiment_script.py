"""What every experiment script shares: its options, progress line, exit codes, and scenarios.

The experiment framework (:mod:`k8snetlab.framework`: shuffled interleaved rounds, intervals,
adaptive rounds, golden signals, reports) is built on these pieces; hostgw_vs_ipip and
cni_modes run on it, the others use these helpers and the framework's statistics.

Every experiment takes ``--topology``, ``--out``, ``--quick`` and ``--repeat`` (plus its own
options), validates everything before it creates anything, runs the modes it compares
*interleaved* (round 1: A B, round 2: A B, ...) so that drift of a shared machine hits all
modes alike, writes one tidy CSV (:mod:`k8snetlab.results`) and prints a summary.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from .cli import guarded, setup_logging, sigterm_as_interrupt

DEFAULT_TOPOLOGY = str(Path(__file__).resolve().parent.parent / "topologies" / "three_nodes.yaml")


def parser(description: str, default_repeat: int = 3) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--topology", default=DEFAULT_TOPOLOGY, help="cluster file (default: %(default)s)")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="a parameter of a Python topology file, e.g. leaves=4; repeatable")
    p.add_argument("--out", default="results", help="directory for the CSV (and plots); default %(default)s")
    p.add_argument("--quick", action="store_true", help="a short smoke run (about a minute on 2 cores)")
    p.add_argument("--repeat", type=int, default=default_repeat, help="interleaved rounds (default %(default)s)")
    p.add_argument("--pin", default="same", choices=("same", "split", "none"),
                   help="CPU placement of iperf3: same = client and server on one CPU, this run's own "
                        "threads on the others while it measures (the steadiest here); split = one CPU "
                        "each; none = the scheduler's choice (default %(default)s)")
    p.add_argument("--pin-cpu", type=int, default=None, metavar="N",
                   help="the CPU for --pin same/split (default: the least busy in a quiet half-second, "
                        "CPU 0 on a tie)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def choose_placement(args: argparse.Namespace):
    """The run's iperf3 placement from ``--pin``/``--pin-cpu``, chosen once, set as the default
    of every :func:`measure.iperf3` call and kept in ``args.placement``. Raises SpecError."""
    from . import hoststat, measure
    from .errors import SpecError
    mode = getattr(args, "pin", "none")
    cpu = getattr(args, "pin_cpu", None)
    cpus = measure.allowed_cpus()
    if mode != "none" and cpu is None and len(cpus) > 1:
        cpu = hoststat.quietest_cpu(cpus)
    try:
        where = measure.placement(mode, cpu, cpus)
    except ValueError as e:
        raise SpecError(f"--pin-cpu: {e}") from None
    measure.set_placement(where)
    args.placement = where
    return where


class Progress:
    """One self-overwriting progress line on a terminal; plain lines otherwise."""

    def __init__(self, total: int, stream=sys.stderr):
        self.total, self.done, self.stream = total, 0, stream
        self.t0 = time.monotonic()
        self.tty = stream.isatty()

    def step(self, what: str) -> None:
        self.done += 1
        pct = 100 * self.done // max(1, self.total)
        bar = "#" * (pct // 5) + "." * (20 - pct // 5)
        line = f"[{bar}] {self.done}/{self.total} {time.monotonic() - self.t0:5.0f}s {what}"
        if self.tty:
            self.stream.write("\r" + line[:110].ljust(110))
            if self.done == self.total:
                self.stream.write("\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def load_topology(args: argparse.Namespace, cni: str | None = None):
    """The cluster spec of ``--topology`` with its ``--param`` values (a .py file's parameters)."""
    from . import spec
    return spec.load(args.topology, cni=cni, params=spec.parse_params(getattr(args, "param", None)))


def output(args: argparse.Namespace, name: str) -> tuple[Path, str, Path]:
    """``--out`` made, a new run id, and the run's CSV path ``<out>/<name>-<run id>.csv``."""
    from . import results
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    run_id = results.new_run_id()
    return out_dir, run_id, out_dir / f"{name}-{run_id}.csv"


def main(run: Callable[[argparse.Namespace], int], p: argparse.ArgumentParser,
         argv: Sequence[str] | None = None) -> int:
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    setup_logging(args.verbose)
    sigterm_as_interrupt()
    prog = os.path.basename(sys.argv[0]) or "experiment"
    return guarded(lambda: (choose_placement(args), run(args))[1], prog)


@dataclass(frozen=True)
class Endpoint:
    """One side of a measurement: a name, a namespace path and an address."""
    name: str
    netns: str
    ip: str


@dataclass(frozen=True)
class Scenario:
    name: str          # node-to-node, pod-same-node, pod-cross-node
    src: Endpoint
    dst: Endpoint


def standard_scenarios(cluster) -> list[Scenario]:
    """The three paths the foundation experiments compare, chosen the same way in every
    cluster built from one file: the first two nodes, the first pods on them."""
    nodes = list(cluster.nodes.values())
    if len(nodes) < 2:
        from .errors import SpecError
        raise SpecError(f"{cluster.spec.source}: the experiment needs at least two nodes")
    n1, n2 = nodes[0], nodes[1]
    on = lambda n: sorted((p for p in cluster.pods.values() if p.node_name == n.name), key=lambda p: p.name)
    p1, p2 = on(n1), on(n2)
    if len(p1) < 2 or not p2:
        from .errors import SpecError
        raise SpecError(f"{cluster.spec.source}: the experiment needs two pods on {n1.name} and one on "
                        f"{n2.name}: give the workloads more replicas")
    ep = lambda h: Endpoint(h.name, h.netns, h.ip)
    return [Scenario("node-to-node", ep(n1), ep(n2)),
            Scenario("pod-same-node", ep(p1[0]), ep(p1[1])),
            Scenario("pod-cross-node", ep(p1[0]), ep(p2[0]))]
