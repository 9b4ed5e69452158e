"""Not root: every command that builds namespaces stops with one line and status 2,
after validating the file (so a bad file is reported first) and before creating anything."""

from pathlib import Path

from k8snetlab import cli

THREE_NODES = Path(__file__).resolve().parents[2] / "topologies" / "three_nodes.yaml"


def test_up_as_non_root_is_one_line_exit_2(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    monkeypatch.setenv("K8SNETLAB_STATE", str(tmp_path / "state"))
    assert cli.main(["up", str(THREE_NODES)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("k8snetlab: error:") and "needs root" in err and "sudo" in err
    assert "\n" not in err
    assert not (tmp_path / "state").exists()


def test_clean_as_non_root_is_exit_2(monkeypatch, capsys):
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    assert cli.main(["clean"]) == 2
    assert "needs root" in capsys.readouterr().err
