"""Verify results: kept in a cache directory outside the package, read back by `porter list`."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from porter.cli import _record_verify, app
from porter.port import ENGINE_MODELS
from porter.verify.results import load_results, record_result, results_path


def test_results_go_to_the_cache_directory_named_by_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("PORTER_CACHE_DIR", str(tmp_path / "cache"))
    assert results_path() == tmp_path / "cache" / "verified.json"
    monkeypatch.delenv("PORTER_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert results_path() == tmp_path / "xdg" / "porter" / "verified.json"


def test_a_verify_result_is_recorded_outside_the_package_and_listed(tmp_path, monkeypatch):
    monkeypatch.setenv("PORTER_CACHE_DIR", str(tmp_path))
    before = sorted(p.name for p in ENGINE_MODELS.iterdir())
    _record_verify("OPTForCausalLM", 2, "cpu", "float32", 1.234e-7, True)
    assert sorted(p.name for p in ENGINE_MODELS.iterdir()) == before
    assert load_results()["OPTForCausalLM"]["tp2-cpu-float32"] == {"passed": True, "max_rel": 1.23e-07}
    result = CliRunner().invoke(app, ["list"], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    opt_row = next(line for line in result.output.splitlines() if "OPTForCausalLM" in line)
    assert "tp2-cpu-float32: pass (1.2e-07)" in opt_row


def test_a_later_run_replaces_the_same_runs_result_and_keeps_others(tmp_path):
    path = tmp_path / "verified.json"
    record_result("A", "tp1-cpu-float32", 1e-7, True, path)
    record_result("A", "tp2-cpu-float32", 2e-7, True, path)
    record_result("A", "tp1-cpu-float32", 0.5, False, path)
    assert load_results(path) == {
        "A": {
            "tp1-cpu-float32": {"passed": False, "max_rel": 0.5},
            "tp2-cpu-float32": {"passed": True, "max_rel": 2e-07},
        }
    }


def test_an_unwritable_cache_never_fails_a_verify(tmp_path):
    blocker = tmp_path / "not_a_directory"
    blocker.write_text("")
    record_result("A", "tp1-cpu-float32", 1e-7, True, blocker / "verified.json")
    assert load_results(blocker / "verified.json") == {}


def test_a_corrupt_results_file_reads_as_none(tmp_path):
    path = Path(tmp_path / "verified.json")
    path.write_text("{not json")
    assert load_results(path) == {}
