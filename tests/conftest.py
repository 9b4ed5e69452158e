"""Fixtures both test levels share."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_MODE = REPO / "examples" / "k8snetlab-example-mode"


@pytest.fixture(scope="session")
def example_venv(tmp_path_factory) -> Path:
    """A throwaway venv seeing our dependencies (system site packages) with the out-of-tree
    example mode installed into it, not editable and offline. The checkout itself is not
    installed: callers put it on PYTHONPATH, as the tests run from any worktree."""
    where = tmp_path_factory.mktemp("example-venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(where)], check=True,
                   capture_output=True, timeout=120)
    r = subprocess.run([str(where / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-deps",
                        "--no-index", "--no-build-isolation", str(EXAMPLE_MODE)],
                       capture_output=True, text=True, timeout=300, cwd=where.parent)
    assert r.returncode == 0, r.stderr
    return where
