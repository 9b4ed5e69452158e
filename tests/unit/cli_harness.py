"""The harness of the command-line tests: the CLI and an experiment run as real processes told
they are not root, with a guard that exits 99 if a cluster were ever constructed, and the
check that a refusal is exactly one line on stderr with exit status 2."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import yaml

REPO = Path(__file__).resolve().parents[2]
THREE_NODES = REPO / "topologies" / "three_nodes.yaml"
EXPERIMENT = REPO / "experiments" / "hostgw_vs_ipip.py"
EXPERIMENT_PROG = EXPERIMENT.name

# Run as "not root", and make building a cluster impossible whatever the CLI does: a unit test
# must never create namespaces, even if a regression lets it past validation and the root check.
NOT_ROOT = ("import os, runpy, sys\n"
             "os.geteuid = lambda: 65534\n"
             "from k8snetlab import cluster as _cluster\n"
             "def _refuse(*a, **k):\n"
             "    sys.stderr.write('TEST GUARD: a cluster would have been built\\n')\n"
             "    os._exit(99)\n"
             "_cluster.Cluster.__init__ = _refuse\n")
def run(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)


def cli(*args: str) -> subprocess.CompletedProcess:
    """``python -m k8snetlab.cli ARGS`` as a user without root."""
    code = NOT_ROOT + (f"sys.argv = ['k8snetlab', *{list(args)!r}]\n"
                        "runpy.run_module('k8snetlab.cli', run_name='__main__', alter_sys=True)\n")
    return run(["-c", code])


def experiment(*args: str) -> subprocess.CompletedProcess:
    """``python experiments/hostgw_vs_ipip.py ARGS`` as a user without root."""
    code = NOT_ROOT + (f"sys.argv = [{str(EXPERIMENT)!r}, *{list(args)!r}]\n"
                        f"runpy.run_path({str(EXPERIMENT)!r}, run_name='__main__')\n")
    return run(["-c", code])


def one_error_line(p: subprocess.CompletedProcess, prog: str = "k8snetlab", status: int = 2) -> str:
    assert p.returncode == status, (p.returncode, p.stdout, p.stderr)
    lines = p.stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{p.stderr}"
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    assert "Traceback" not in p.stderr
    assert p.stdout == ""
    return lines[0]


def cluster(**top: Any) -> dict[str, Any]:
    d = yaml.safe_load(THREE_NODES.read_text())
    d.update(top)
    return d


def experiment_module(script: str, name: str) -> Any:
    """``experiments/<script>`` imported as module ``name`` (the scripts are not a package)."""
    import importlib.util
    mod_spec = importlib.util.spec_from_file_location(name, REPO / "experiments" / script)
    module = importlib.util.module_from_spec(mod_spec)
    sys.modules[mod_spec.name] = module
    mod_spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def signals_installed() -> Iterator[None]:
    """k8snetlab's signal handlers installed for a test, the previous ones restored after."""
    from k8snetlab import signals
    previous = signals.install()
    try:
        yield
    finally:
        signals.restore(previous)
