"""The out-of-tree example (examples/k8snetlab-example-mode): a CNI mode in its own package,
pip-installed into a throwaway venv that sees this checkout, is listed by ``k8snetlab modes``
and used from a cluster file, without a line of ours changed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run(venv: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([str(venv / "bin" / "python"), *args], capture_output=True, text=True,
                          timeout=120, env=env, cwd=venv.parent)


def test_k8snetlab_modes_lists_the_installed_mode(example_venv):
    r = run(example_venv, "-m", "k8snetlab.cli", "modes")
    assert r.returncode == 0, r.stderr
    line = next((l for l in r.stdout.splitlines() if l.startswith("flat-l2:")), None)
    assert line is not None, r.stdout
    assert line.endswith("(from k8snetlab-example-mode)")
    assert "mtu: default 1500" in r.stdout
    assert "host-gw:" in r.stdout and "(from" not in r.stdout.split("host-gw:")[1].splitlines()[0]


def test_a_cluster_file_using_it_validates(example_venv):
    code = ("from k8snetlab import spec\n"
            f"s = spec.load({str(REPO / 'topologies' / 'three_nodes.yaml')!r}, cni='flat-l2')\n"
            "print(s.cni.type, s.cni.options.mtu)\n"
            "s = spec.with_cni(s, 'flat-l2', **{'flat-l2': {'mtu': 1400}})\n"
            "print(s.cni.options.mtu)\n")
    r = run(example_venv, "-c", code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["flat-l2", "1500", "1400"]


def test_its_options_are_checked_like_ours(example_venv):
    code = ("import yaml\n"
            "from k8snetlab import spec\n"
            "from k8snetlab.errors import SpecError\n"
            f"d = yaml.safe_load(open({str(REPO / 'topologies' / 'three_nodes.yaml')!r}))\n"
            "d['cni'] = {'type': 'flat-l2', 'flat-l2': {'mtu': 100}}\n"
            "try:\n"
            "    spec.from_dict(d, 'bad.yaml')\n"
            "except SpecError as e:\n"
            "    print(e)\n")
    r = run(example_venv, "-c", code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("bad.yaml: cni.flat-l2.mtu: 100 is out of range 576..9000"), r.stdout


def test_without_the_package_the_name_is_unknown():
    r = subprocess.run([sys.executable, "-m", "k8snetlab.cli", "modes"], capture_output=True, text=True,
                       timeout=120, cwd=REPO)
    assert r.returncode == 0 and "flat-l2" not in r.stdout
