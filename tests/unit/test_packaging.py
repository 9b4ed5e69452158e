"""Packaging: what ``pip install .`` and ``make deps`` give a user.

Each test copies the checkout to a temporary directory and installs it into a fresh virtual
environment (``--system-site-packages``: the dependencies come from the machine, nothing is
downloaded), then runs the installed ``k8snetlab`` command from a directory outside the
checkout, as a user would. The machine's own installation is never touched.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _need_build_tools() -> None:
    for mod in ("venv", "pip", "setuptools", "wheel"):
        if importlib.util.find_spec(mod) is None:
            pytest.skip(f"python module {mod} is missing: 'sudo make deps' installs it")


def _copy_tree(dst: Path) -> Path:
    src = dst / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".git", "__pycache__", "*.egg-info", "build", "dist", "results", ".pytest_cache"))
    return src


def _venv(tmp: Path) -> Path:
    venv = tmp / "venv"
    # no pip of its own: the machine's pip (visible through the system site) installs into it
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
                   check=True, timeout=120)
    return venv


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["PIP_NO_INDEX"] = "1"
    return env


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, env=_clean_env(), capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)


def test_pip_install_gives_a_working_command_with_every_package(tmp_path: Path) -> None:
    """A non-editable install carries every package (k8snetlab.services was left out once) and
    the data files the code reads; ``k8snetlab modes`` and ``k8snetlab up --help`` run."""
    _need_build_tools()
    src, venv = _copy_tree(tmp_path), _venv(tmp_path)
    py = venv / "bin" / "python"
    r = _run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", str(src)], tmp_path)
    assert r.returncode == 0, r.stderr
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    k8snetlab = venv / "bin" / "k8snetlab"
    assert k8snetlab.is_file(), "pip installed no 'k8snetlab' console script"
    r = _run([str(k8snetlab), "modes"], outside)
    assert r.returncode == 0, r.stderr
    assert "host-gw:" in r.stdout and "vxlan:" in r.stdout
    r = _run([str(k8snetlab), "up", "--help"], outside)
    assert r.returncode == 0, r.stderr
    assert "--param" in r.stdout and "--cni" in r.stdout
    # every package of the tree is installed, not imported from a checkout
    code = ("import importlib, pathlib, pkgutil, k8snetlab, cni_plugins, controllers\n"
            "for pkg in (k8snetlab, cni_plugins, controllers):\n"
            "    for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):\n"
            "        if m.ispkg: importlib.import_module(m.name)\n"
            "import k8snetlab.services.proxy, k8snetlab.ebpf, k8snetlab.bgp.render as r\n"
            "print(pathlib.Path(k8snetlab.__file__).parent)\n"
            "assert k8snetlab.ebpf.SOURCE.is_file(), k8snetlab.ebpf.SOURCE\n"
            "assert (r.TEMPLATES / 'bird.conf.j2').is_file(), r.TEMPLATES\n")
    r = _run([str(py), "-c", code], outside)
    assert r.returncode == 0, r.stderr
    installed = Path(r.stdout.strip())
    assert installed.is_relative_to(venv), f"imported from {installed}, not from the install"
    expected = {p.parent.relative_to(src).as_posix().replace("/", ".")
                for top in ("k8snetlab", "cni_plugins", "controllers") for p in (src / top).rglob("__init__.py")}
    r = _run([str(py), "-c", "import importlib.metadata as md; print('\\n'.join(str(f) for f in "
              "md.distribution('k8snetlab').files))"], outside)
    have = {f.rsplit("/", 1)[0].replace("/", ".") for f in r.stdout.split() if f.endswith("__init__.py")}
    assert expected <= have, f"packages left out of the install: {sorted(expected - have)}"


def test_install_self_links_the_command_onto_roots_path_idempotently(tmp_path: Path) -> None:
    """``make deps`` ends with scripts/install-self.sh: the checkout installed editable and
    ``k8snetlab`` linked into a directory on sudo's secure_path; a second run changes nothing."""
    _need_build_tools()
    src, venv = _copy_tree(tmp_path), _venv(tmp_path)
    bindir = tmp_path / "usr-local-bin"
    script = src / "scripts" / "install-self.sh"
    first = _run(["sh", str(script), str(venv / "bin" / "python"), str(bindir)], tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    link = bindir / "k8snetlab"
    assert link.is_symlink() and Path(os.readlink(link)) == venv / "bin" / "k8snetlab"
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    r = _run([str(link), "modes"], outside)
    assert r.returncode == 0, r.stderr
    assert "bridge:" in r.stdout
    # editable: the checkout is the code that runs
    r = _run([str(venv / "bin" / "python"), "-c", "import k8snetlab; print(k8snetlab.__file__)"], outside)
    assert Path(r.stdout.strip()).resolve().is_relative_to(src.resolve()), r.stdout + r.stderr
    second = _run(["sh", str(script), str(venv / "bin" / "python"), str(bindir)], tmp_path)
    assert second.returncode == 0, second.stderr
    assert "already installed editable" in second.stdout and "already" in second.stdout.splitlines()[-1]
    # a file there that is not our link is never overwritten
    link.unlink()
    link.write_text("#!/bin/sh\necho someone else's\n")
    third = _run(["sh", str(script), str(venv / "bin" / "python"), str(bindir)], tmp_path)
    assert third.returncode == 0 and "left alone" in third.stderr
    assert link.read_text().startswith("#!/bin/sh\necho someone")


def test_make_deps_runs_install_self() -> None:
    """The Makefile's ``deps`` target (install-deps.sh) ends by installing the project itself."""
    text = (REPO / "scripts" / "install-deps.sh").read_text()
    assert 'sh scripts/install-self.sh "$PYTHON"' in text
    assert "install-deps.sh" in (REPO / "Makefile").read_text()
