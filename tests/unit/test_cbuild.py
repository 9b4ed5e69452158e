"""Our C programs are compiled once per source, statically where the C library allows."""

from __future__ import annotations

from pathlib import Path

from k8snetlab import cbuild, proc
from k8snetlab.errors import CommandError


def fake_cc(calls: list[list[str]], static_ok: bool = True):
    def run(argv, **kw):
        calls.append(list(argv))
        if "-static" in argv and not static_ok:
            raise CommandError(argv, 1, "", "cannot find -lc")
        Path(argv[argv.index("-o") + 1]).write_bytes(b"\x7fELF")
    return run


def test_a_binary_is_built_once_per_source_and_found_again(tmp_path, monkeypatch):
    src = tmp_path / "x.c"
    src.write_text("int main(void) { return 0; }\n")
    calls: list[list[str]] = []
    monkeypatch.setattr(proc, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(proc, "run", fake_cc(calls))
    first = cbuild.compiled(src, tmp_path, "x")
    assert first is not None and first.exists() and first.name.startswith(".x-")
    assert cbuild.compiled(src, tmp_path, "x") == first and len(calls) == 1
    assert "-static" in calls[0]
    src.write_text("int main(void) { return 1; }\n")      # a new source: a new binary
    second = cbuild.compiled(src, tmp_path, "x")
    assert second != first and len(calls) == 2
    assert not list(tmp_path.glob("*.tmp"))


def test_without_a_static_c_library_the_binary_is_linked_dynamically(tmp_path, monkeypatch):
    src = tmp_path / "x.c"
    src.write_text("int main(void) { return 0; }\n")
    calls: list[list[str]] = []
    monkeypatch.setattr(proc, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(proc, "run", fake_cc(calls, static_ok=False))
    assert cbuild.compiled(src, tmp_path, "x") is not None
    assert ["-static" in c for c in calls] == [True, False]


def test_no_c_compiler_or_a_broken_one_gives_none_and_leaves_nothing(tmp_path, monkeypatch):
    src = tmp_path / "x.c"
    src.write_text("int main(void) { return 0; }\n")
    monkeypatch.setattr(proc, "which", lambda name: None)
    assert cbuild.compiled(src, tmp_path, "x") is None
    monkeypatch.setattr(proc, "which", lambda name: f"/usr/bin/{name}")

    def broken(argv, **kw):
        raise CommandError(argv, 1, "", "internal compiler error")
    monkeypatch.setattr(proc, "run", broken)
    assert cbuild.compiled(src, tmp_path, "x") is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.c"]
