"""The one registry every axis uses: built-ins from the table, other packages through entry
points, unknown names listing the valid ones, import failures with their cause."""

from __future__ import annotations

from pathlib import Path

import pytest

from k8snetlab import extensions
from k8snetlab.errors import SpecError
from k8snetlab.registry import ExtensionError, Registry

GROUP = "k8snetlab.test_axis"


@pytest.fixture
def table(monkeypatch):
    """Our table with one more axis for the test (restored afterwards)."""
    def set_(lines: list[str]) -> Registry:
        monkeypatch.setitem(extensions.ENTRY_POINTS, GROUP, lines)
        return Registry("test thing", GROUP)
    return set_


def installed(tmp_path: Path, monkeypatch, dist: str, lines: list[str]) -> None:
    """A distribution on sys.path declaring ``lines`` in GROUP, as pip would leave it."""
    info = tmp_path / f"{dist}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[{GROUP}]\n" + "\n".join(lines) + "\n")
    monkeypatch.syspath_prepend(str(tmp_path))


def test_every_builtin_of_every_axis_loads():
    for group, lines in extensions.ENTRY_POINTS.items():
        reg: Registry = Registry(group, group)
        assert len(reg.names()) == len(lines), group
        for name, obj in reg.items():
            assert obj is not None and reg.source(name) == "k8snetlab"


def test_unknown_name_lists_the_valid_ones(table):
    reg = table(["a = json:dumps", "b = json:loads"])
    with pytest.raises(SpecError, match=r"unknown test thing 'c': use one of a, b"):
        reg.get("c")
    assert reg.get("a") is __import__("json").dumps and "b" in reg and "c" not in reg


def test_a_module_that_fails_to_import_is_an_error_with_its_cause(table, tmp_path, monkeypatch):
    (tmp_path / "knl_broken_mod.py").write_text("import knl_no_such_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = table(["broken = knl_broken_mod:Thing", "missing = knl_no_such_module:Thing"])
    with pytest.raises(ExtensionError, match="test thing 'broken'.*knl_no_such_dependency"):
        reg.get("broken")
    with pytest.raises(ExtensionError, match="test thing 'missing'.*knl_no_such_module"):
        reg.get("missing")
    assert reg.names() == ["broken", "missing"]      # listed, never skipped


def test_a_loaded_object_of_the_wrong_kind_is_refused(monkeypatch):
    monkeypatch.setitem(extensions.ENTRY_POINTS, GROUP, ["x = json:dumps"])
    with pytest.raises(ExtensionError, match="not a Exception subclass"):
        Registry("test thing", GROUP, base=Exception).get("x")


def test_another_package_adds_a_choice_through_entry_points(table, tmp_path, monkeypatch):
    installed(tmp_path, monkeypatch, "knl-extra", ["extra = json:JSONDecoder"])
    reg = table(["a = json:dumps"])
    assert reg.names() == ["a", "extra"]
    assert reg.source("extra") == "knl-extra" and reg.source("a") == "k8snetlab"
    assert reg.get("extra") is __import__("json").JSONDecoder


def test_two_declarations_of_one_name_are_an_error(table, tmp_path, monkeypatch):
    installed(tmp_path, monkeypatch, "knl-clash", ["a = json:loads"])
    reg = table(["a = json:dumps"])
    with pytest.raises(ExtensionError, match="'a' is declared twice.*knl-clash"):
        reg.names()


def test_an_installed_copy_of_this_project_does_not_clash(table, tmp_path, monkeypatch):
    installed(tmp_path, monkeypatch, "k8snetlab", ["a = old_module:dumps"])
    reg = table(["a = json:dumps"])
    assert reg.entry("a").value == "json:dumps"      # the tree being run wins


def test_setup_py_declares_the_same_table():
    import runpy
    repo = Path(__file__).resolve().parents[2]
    text = (repo / "setup.py").read_text()
    assert "**ENTRY_POINTS" in text and "extensions.py" in text
    assert runpy.run_path(str(repo / "k8snetlab" / "extensions.py"))["ENTRY_POINTS"] == extensions.ENTRY_POINTS
