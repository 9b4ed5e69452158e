"""What the README says about behaviour, held against the behaviour (issue 14, item 14).

- The CNI modes table names, per ``cni.type``, exactly the options its ``cni.<type>:``
  section takes (what ``k8snetlab modes`` lists); the reference plugins are chosen with
  ``cni: {type: bridge, reference: true}``, as the README writes it.
- A ``--param`` of the wrong type names the valid parameters, as "Adding a topology" says.
- ``check-model``: the README names every requirement docker mode fails (the integration test
  ``test_docker_fails_a_with_evidence_and_passes_localhost`` checks the behaviour).
- ``--step`` pauses only on a terminal, and says so otherwise.
- The Errors section lists the bounds and the trust model.
"""

from __future__ import annotations

import dataclasses
import io
import re
import sys

import pytest
import yaml

from k8snetlab import checks, spec
from k8snetlab.modes import MODES
from k8snetlab.errors import SpecError

from cli_harness import REPO, THREE_NODES, cli, one_error_line

README = (REPO / "README.md").read_text()
LEAF_SPINE = REPO / "topologies" / "leaf_spine.py"


def section(title: str) -> str:
    start = README.index(f"\n{title}\n")
    nxt = re.search(r"\n#{1,3} ", README[start + len(title) + 2:])
    return README[start:start + len(title) + 2 + (nxt.start() if nxt else len(README))]


def modes_table() -> dict[str, set[str]]:
    rows = {}
    for line in section("### CNI modes").splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
        m = re.fullmatch(r"`([a-z-]+)`", cells[0]) if len(cells) >= 4 else None
        if m:
            rows[m.group(1)] = {re.split(r"[:\s]", span)[0] for span in re.findall(r"`([^`]+)`", cells[-1])}
    return rows


def option_keys(mode: str) -> set[str]:
    return {f.metadata.get("key") or f.name for f in dataclasses.fields(MODES.get(mode).Options)}


def test_modes_table_lists_every_mode_with_exactly_its_options():
    table = modes_table()
    assert sorted(table) == sorted(MODES.names())
    for mode, documented in table.items():
        assert documented == option_keys(mode), f"README row {mode}: {documented} vs {option_keys(mode)}"


def test_reference_plugins_are_chosen_as_the_readme_writes(tmp_path):
    assert "cni: {type: bridge, reference: true}" in README
    d = yaml.safe_load(THREE_NODES.read_text())
    d["cni"] = yaml.safe_load("{type: bridge, reference: true}")
    assert spec.from_dict(d, "c.yaml").cni.reference is True
    d["cni"] = {"type": "bridge", "bridge": {"reference": True}}     # not an option of the section
    with pytest.raises(SpecError, match=r"cni\.bridge"):
        spec.from_dict(d, "c.yaml")


def test_param_of_the_wrong_type_names_the_valid_parameters():
    assert "one of the wrong type" in README and "naming the valid ones" in README
    with pytest.raises(SpecError, match=r"parameter leaves: expected int .* valid parameters are .*leaves"):
        spec.load(LEAF_SPINE, params={"leaves": "four"})
    line = one_error_line(cli("up", str(LEAF_SPINE), "--param", "leaves=four"))
    assert "valid parameters are" in line


def test_readme_names_every_requirement_docker_fails():
    assert "`docker` mode fails (a), (b) and (c)" in " ".join(README.split())


def _walkthrough():
    from cli_harness import experiment_module
    return experiment_module("walkthrough_pod_service.py", "_walkthrough_under_test")


def test_step_pauses_only_on_a_terminal_and_says_so(tmp_path, monkeypatch, capsys):
    assert "on a terminal only" in README
    lab_mod = _walkthrough()
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))         # not a terminal, no Enter to read
    lab = lab_mod.Lab(tmp_path, "r1", pause=True)
    lab.step("1. one")
    lab.step("2. two")
    out = capsys.readouterr().out
    assert out.count("stdin is not a terminal") == 1 and "=== 2. two" in out

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True
    monkeypatch.setattr(sys, "stdin", Tty("\n"))
    asked = []
    monkeypatch.setattr("builtins.input", lambda prompt="": asked.append(prompt) or "")
    lab = lab_mod.Lab(tmp_path, "r2", pause=True)
    lab.step("1. one")
    assert asked and "Enter" in asked[0]


def test_errors_section_lists_the_bounds_and_the_trust_model():
    errors = section("## Errors")
    for needed in (f"{checks.DEFAULT_MAX_PODS:,}", checks.MAX_PODS_ENV, "pod CIDR", f"{checks.MAX_NODES:,}",
                   "alias", "--allow-outside-files", "root"):
        assert needed in errors, needed
    trust = section("## Adding a topology")
    assert "runs as root" in trust and "trust" in trust
