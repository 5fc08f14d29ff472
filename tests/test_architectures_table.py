"""The supported-architectures table in docs/user-guide.md lists exactly the engine's registry, and
its generator renders verify results as the table's columns."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from engine.models.registry import registered_architectures

REPO_ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location(
    "architectures_table", REPO_ROOT / "scripts" / "architectures_table.py"
)
table_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(table_script)


def _rows(table: str) -> list[list[str]]:
    lines = [line for line in table.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


def test_the_user_guide_table_lists_exactly_the_registered_architectures():
    text = (REPO_ROOT / "docs" / "user-guide.md").read_text()
    start, end = text.index(table_script.BEGIN), text.index(table_script.END)
    listed = {row[0]: row[1].strip("`") for row in _rows(text[start:end])}
    registered = {name: module.rsplit(".", 1)[-1] for name, (module, _) in registered_architectures().items()}
    assert listed == registered, (
        "docs/user-guide.md's architectures table is not the registry's: "
        "run .venv/bin/python scripts/architectures_table.py --write"
    )


def test_results_become_one_column_per_kind_of_run(tmp_path):
    for name, tp, passed, max_rel in (("opt-tp1", 1, True, 1.2e-7), ("opt-tp2", 2, False, 0.25)):
        run = {"architecture": "OPTForCausalLM", "tp": tp, "device": "cpu", "dtype": "float32"}
        (tmp_path / f"{name}.json").write_text(json.dumps({**run, "passed": passed, "max_rel": max_rel}))
    (tmp_path / "summary.json").write_text("[]")  # verify_all's summary: not a run
    results = table_script.results_from_runs(tmp_path)
    rows = _rows(table_script.render_table(results))
    header = table_script.render_table(results).splitlines()[1]
    assert "cpu float32 tp=1 | cpu float32 tp=2" in header
    opt = next(row for row in rows if row[0] == "OPTForCausalLM")
    assert opt[1:] == ["`opt`", "pass 1.2e-07", "FAIL 2.5e-01"]
    llama = next(row for row in rows if row[0] == "LlamaForCausalLM")
    assert llama[2:] == ["–", "–"]


def test_the_table_is_replaced_between_its_markers_only():
    text = f"before\n{table_script.BEGIN}\nold\n{table_script.END}\nafter\n"
    new = table_script.replace_table(text, f"{table_script.BEGIN}\nnew\n{table_script.END}\n")
    assert new == f"before\n{table_script.BEGIN}\nnew\n{table_script.END}\nafter\n"
