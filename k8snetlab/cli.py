"""``k8snetlab``: the command line.

    k8snetlab up FILE [--cni TYPE] [--cli]   start a cluster, print it, hold it until Ctrl-C
        [--param NAME=VALUE ...]             parameters of a .py topology (leaves=4)
    k8snetlab clean                          remove what killed runs left (only the testbed's)
    k8snetlab compare A.csv B.csv            B/A per metric with a 95 % interval: faster, slower, no change
    k8snetlab modes                          the CNI types and their options
    k8snetlab controllers                    the OpenFlow controller apps (underlay.controller)
    k8snetlab bgp status [--cluster NAME]    BGP sessions and routes per node, asked of the speakers
    k8snetlab check-model FILE [--cni A,B]   the Kubernetes network model, checked, with evidence
    k8snetlab policy matrix [--namespace NS] [--port P]   reachability probed vs the NetworkPolicies
    k8snetlab policy explain SRC DST PORT    which policy/rule allows a flow, or which isolation denies it

Only this module (and the experiments' ``main``) prints and picks exit codes: 0 success,
1 a failure during a run, 2 bad input (file, option, missing tool, not root) with one line
naming the problem and the fix.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Callable, Sequence

from .errors import K8sNetLabError, NotRoot, SpecError, ToolMissing, KernelFeatureMissing

log = logging.getLogger("k8snetlab")

BAD_INPUT = (SpecError, ToolMissing, NotRoot, KernelFeatureMissing)


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)-7s %(message)s", datefmt="%H:%M:%S")


def sigterm_as_interrupt() -> None:
    """SIGTERM tears the cluster down like Ctrl-C does (and SIGINT works also when the
    process started with it ignored); see :mod:`k8snetlab.signals`."""
    from . import signals
    signals.install()


def guarded(fn: Callable[[], int], prog: str = "k8snetlab") -> int:
    """Run ``fn``; turn our errors into one line on stderr and an exit status."""
    try:
        return fn()
    except BrokenPipeError:
        # the reader went away ('k8snetlab compare ... | head'): not an error of ours; stdout
        # is pointed at /dev/null so that the flush at exit does not fail again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141      # as a shell reports a command ended by SIGPIPE
    except BAD_INPUT as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except K8sNetLabError as e:
        print(f"{prog}: failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; everything was torn down", file=sys.stderr)
        return 130
    finally:
        from . import signals
        signals.quiet()             # exiting: a late signal must not raise on the way out


def allow_outside_files(args: argparse.Namespace) -> None:
    """``--allow-outside-files``: workload files outside the cluster file's directory."""
    from .checks import ALLOW_OUTSIDE_ENV
    if getattr(args, "allow_outside_files", False):
        os.environ[ALLOW_OUTSIDE_ENV] = "1"


def cmd_up(args: argparse.Namespace) -> int:
    from .cluster import Cluster
    from .proc import require_root
    from . import signals, spec
    allow_outside_files(args)
    s = spec.load(args.file, cni=args.cni, params=spec.parse_params(args.param))
    if args.metrics:
        from .metrics import parse_listen
        parse_listen(args.metrics)
    require_root()
    sigterm_as_interrupt()
    with Cluster(s) as c:
        print("\n".join(c.describe()))
        print(f"up in {c.timings['start_s']:.2f} s; state in {c.state.path if c.state else '?'}")
        server = _serve_metrics(c, args.metrics) if args.metrics else None
        if server is not None:
            print(f"metrics: http://{args.metrics}/metrics (Prometheus text format)")
        if args.cli:
            c.cli()
        else:
            print("holding the cluster; press Ctrl-C to tear it down", flush=True)
            signals.wait()
    print("cluster stopped and removed")
    return 0


def _serve_metrics(cluster, listen: str):
    """Per-node and per-pod counters for Prometheus while the cluster runs (k8snetlab.metrics)."""
    from .metrics import serve
    return serve(cluster, listen)


def cmd_clean(args: argparse.Namespace) -> int:
    from .cleanup import clean
    from .proc import require_root
    require_root("k8snetlab clean")
    report = clean()
    for line in report.lines():
        print(f"removed {line}")
    if report.empty():
        print("nothing to clean")
    for name in report.unowned:
        print(f"left alone: interface {name} (named like the testbed's but not marked as made by a "
              f"dead cluster; if it is a leftover: ip link del {name})")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """B against A per metric: ratio B/A with its interval and faster / slower / no change."""
    import os
    from . import compare, results
    a_rows, b_rows = results.read_rows(args.a), results.read_rows(args.b)
    entries = compare.compare(a_rows, b_rows, a_name=args.a, b_name=args.b)
    headers, body = compare.table(entries)
    try:
        print(f"A = {args.a}\nB = {args.b}")
        note = compare.placement_note(a_rows, b_rows)
        if note:
            print(note)
        print(results.format_table(headers, body))
        changed = [e for e in entries if e.verdict in ("faster", "slower", "higher", "lower")]
        print(f"\n{len(changed)} of {len(entries)} metrics changed beyond their 95 % interval")
        sys.stdout.flush()
    except BrokenPipeError:          # '| head' closed the pipe: not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    return 0


def cmd_check_model(args: argparse.Namespace) -> int:
    from . import conformance, spec
    from .proc import require_root
    allow_outside_files(args)
    s = spec.load(args.file)
    modes = [m.strip() for m in (args.cni if args.cni is not None else s.cni.type).split(",") if m.strip()]
    if not modes:
        raise SpecError(f"--cni {args.cni!r}: name at least one mode, e.g. --cni host-gw,ipip")
    require_root("k8snetlab check-model")
    sigterm_as_interrupt()
    results = conformance.check_modes(s, modes)
    failed = False
    for mode, checks in results.items():
        print("\n".join(conformance.format_report(mode, checks, details=args.details)))
        if args.csv:
            conformance.write_csv(args.csv, mode, checks, append=mode != modes[0])
        failed |= any(c.passed is False for c in checks if c.check in conformance.REQUIREMENTS)
    if args.csv:
        print(f"every check with its evidence: {args.csv}")
    return 1 if failed else 0


def cmd_controllers(args: argparse.Namespace) -> int:
    import controllers
    for name, app in controllers.APPS.items():
        notes = [n for n, on in (("handles loops", app.loops), ("LLDP discovery", app.observe_links)) if on]
        extra = f" [{', '.join(notes)}]" if notes else ""
        print(f"{name}: {app.description}{extra}{_from(controllers.APPS, name)}")
    return 0


def _from(registry: Any, name: str) -> str:
    """`` (from PACKAGE)`` for a choice another installed package declares."""
    from .registry import OURS
    source = registry.source(name)
    return "" if source == OURS else f" (from {source})"


def cmd_extensions(args: argparse.Namespace) -> int:
    """Every axis of choice: entry-point group, names, where each is declared."""
    from .extensions import ENTRY_POINTS
    from .registry import Registry
    for group in ENTRY_POINTS:
        reg: Registry[Any] = Registry(group.split(".", 1)[1], group)
        names = ", ".join(f"{n}{_from(reg, n)}" for n in reg.names()) or "(none)"
        print(f"{group}: {names}")
    return 0


def cmd_modes(args: argparse.Namespace) -> int:
    import dataclasses
    from . import options
    from .modes import MODES
    for name in MODES.names():
        mode = MODES.get(name)
        doc = (mode.__doc__ or sys.modules[mode.__module__].__doc__ or "-").strip().splitlines()[0]
        print(f"{name}: {doc}{_from(MODES, name)}")
        for f in dataclasses.fields(mode.Options):
            key = f.metadata.get("key") or f.name
            choices = options.choice_names(f)
            extra = f" ({'|'.join(choices)})" if choices else ""
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
            print(f"    {key}: default {default!r}{extra}  {f.metadata.get('help', '')}")
    return 0


def cmd_bgp_status(args: argparse.Namespace) -> int:
    from .bgp import status_report
    from .proc import require_root
    require_root("k8snetlab bgp status (the speakers' control sockets)")
    print(status_report(args.cluster))
    return 0


def cmd_policy_matrix(args: argparse.Namespace) -> int:
    from .policy import cluster_state
    from .policy.matrix import run_matrix
    from .proc import require_root
    require_root("k8snetlab policy matrix (probes run in the pods' namespaces)")
    protocols = tuple(p.strip().upper() for p in args.protocol.split(",") if p.strip())
    bad = [p for p in protocols if p not in ("TCP", "UDP")]
    if bad or not protocols:
        raise SpecError(f"--protocol {args.protocol}: use TCP, UDP or TCP,UDP")
    if not 1 <= args.port <= 65535:
        raise SpecError(f"--port {args.port}: must be 1-65535")
    state = cluster_state(args.cluster)
    if args.namespace and not set(args.namespace) <= set(state["namespaces"]):
        missing = sorted(set(args.namespace) - set(state["namespaces"]))
        raise SpecError(f"--namespace {missing[0]}: no such namespace: there are {', '.join(sorted(state['namespaces']))}")
    tables = run_matrix(state, args.port, protocols, args.namespace, args.timeout)
    print("\n\n".join(t.format() for t in tables))
    return 1 if any(t.differences for t in tables) else 0


def cmd_policy_explain(args: argparse.Namespace) -> int:
    from .policy import cluster_state
    from .policy.matrix import explain
    from .proc import require_root
    require_root("k8snetlab policy explain (rule counters are read in the nodes' namespaces)")
    if not 1 <= args.port <= 65535:
        raise SpecError(f"port {args.port}: must be 1-65535")
    proto = args.protocol.upper()
    if proto not in ("TCP", "UDP"):
        raise SpecError(f"--protocol {args.protocol}: use TCP or UDP")
    print(explain(cluster_state(args.cluster), args.src, args.dst, args.port, proto))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="k8snetlab", description="An emulated Kubernetes cluster network.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start a cluster and hold it until Ctrl-C")
    up.add_argument("file", help="cluster file (topologies/*.yaml, or a *.py generator)")
    up.add_argument("--cni", help="override cni.type (bridge, host-gw, ipip, ...)")
    up.add_argument("--cli", action="store_true", help="open the Mininet CLI (pod names are hosts)")
    up.add_argument("--metrics", metavar="127.0.0.1:PORT",
                    help="serve per-node and per-pod counters for Prometheus on this loopback address")
    up.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                    help="a parameter of a Python topology file (topologies/*.py), e.g. leaves=4; repeatable")
    up.add_argument("--allow-outside-files", action="store_true",
                    help="read workloads: [{file: ...}] also outside the cluster file's directory")
    up.set_defaults(fn=cmd_up)
    cl = sub.add_parser("clean", help="remove what killed runs left behind")
    cl.set_defaults(fn=cmd_clean)
    cmp_ = sub.add_parser("compare", help="compare two runs of one experiment: B/A per metric with its "
                          "95 %% interval, faster / slower / no significant change")
    cmp_.add_argument("a")
    cmp_.add_argument("b")
    cmp_.set_defaults(fn=cmd_compare)
    cm = sub.add_parser("check-model", help="check the Kubernetes network model on a cluster "
                        "(exit 1 when a requirement fails)")
    cm.add_argument("file", help="cluster file")
    cm.add_argument("--cni", help="modes to check, comma-separated (default: the file's cni.type)")
    cm.add_argument("--csv", help="write every check with its evidence to this CSV file")
    cm.add_argument("--details", action="store_true", help="list every failed check")
    cm.add_argument("--allow-outside-files", action="store_true",
                    help="read workloads: [{file: ...}] also outside the cluster file's directory")
    cm.set_defaults(fn=cmd_check_model)
    md = sub.add_parser("modes", help="list CNI types and their options")
    md.set_defaults(fn=cmd_modes)
    ctl = sub.add_parser("controllers", help="list the OpenFlow controller apps for underlay.controller")
    ctl.set_defaults(fn=cmd_controllers)
    ext = sub.add_parser("extensions", help="list every axis of choice (entry-point groups) and what is installed")
    ext.set_defaults(fn=cmd_extensions)
    bgp = sub.add_parser("bgp", help="BGP speakers of running clusters (cni bgp)")
    bgp_sub = bgp.add_subparsers(dest="bgp_command", required=True)
    bst = bgp_sub.add_parser("status", help="sessions (peer, state, since, routes received) per node")
    bst.add_argument("--cluster", help="a cluster name or state dir (knlN); default: every running cluster")
    bst.set_defaults(fn=cmd_bgp_status)
    pol = sub.add_parser("policy", help="NetworkPolicy on a running cluster: reachability matrix, explain")
    pol_sub = pol.add_subparsers(dest="policy_command", required=True)
    pm = pol_sub.add_parser("matrix", help="probe every pod pair; expected vs observed (exit 1 on a difference)")
    pm.add_argument("--namespace", action="append", help="only pods of this namespace (repeatable)")
    pm.add_argument("--port", type=int, default=80, help="port to probe (default 80)")
    pm.add_argument("--protocol", default="TCP", help="TCP, UDP or TCP,UDP (default TCP)")
    pm.add_argument("--timeout", type=float, default=1.0, help="s to wait for each probe (default 1)")
    pm.add_argument("--cluster", help="a cluster name or state dir (knlN) when several run")
    pm.set_defaults(fn=cmd_policy_matrix)
    pe = pol_sub.add_parser("explain", help="which policy and rule allow SRC -> DST:PORT, or what denies it")
    pe.add_argument("src", help="a pod (ns/name or its host name, e.g. a.x) or an IPv4 address")
    pe.add_argument("dst", help="a pod (ns/name or host name) or an IPv4 address")
    pe.add_argument("port", type=int)
    pe.add_argument("--protocol", default="TCP")
    pe.add_argument("--cluster", help="a cluster name or state dir (knlN) when several run")
    pe.set_defaults(fn=cmd_policy_explain)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """The ``k8snetlab`` command. Called with ``argv`` (from Python, a test), it puts the
    caller's signal handlers back when it returns; run as a program it keeps its own to the
    end, so that a late signal cannot raise on the way out."""
    from . import signals
    previous = signals.install()    # first: a signal while loading is a clean exit too

    def run() -> int:
        args = parser().parse_args(argv)
        setup_logging(args.verbose)
        return args.fn(args)
    try:
        return guarded(run)
    finally:
        if argv is not None:
            signals.restore(previous)
        else:
            signals.ignore()        # done: a late signal must not kill the exit (status 143)


if __name__ == "__main__":
    sys.exit(main())
