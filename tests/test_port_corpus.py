"""scripts/port_corpus --only X --write-docs PAGE replaces X's rows of the page's table and counts the
summary again, keeping every other row and the note under it."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
_loader = importlib.machinery.SourceFileLoader("port_corpus", str(REPO_ROOT / "scripts" / "port_corpus"))
_spec = importlib.util.spec_from_loader("port_corpus", _loader)
port_corpus = importlib.util.module_from_spec(_spec)
sys.modules["port_corpus"] = port_corpus  # (its dataclasses look their module up)
_loader.exec_module(port_corpus)


def _page(rows: list) -> str:
    text = port_corpus.table(rows, [1, 2])
    summary = port_corpus.summary_line(port_corpus.table_results(text))
    return port_corpus.DOC_HEAD + text + f"\n\n{summary}\n\nMeasured on a CPU.\n"


def test_rows_rerun_replace_their_own_and_keep_the_others():
    Row = port_corpus.Row
    old = [
        Row("a", "remote code, x/a", "port stops", blocker="no causal LM"),
        Row("4.36.2/b", "transformers 4.36.2", "verify fails (tp=2)", 1.0, {"tp1": 5e-7}, "rank 1 failed"),
        Row("4.36.2/c", "transformers 4.36.2", "verifies", 2.0, {"tp1": 4e-7, "tp2": 4e-7}),
    ]
    fresh = port_corpus.table(
        [Row("4.36.2/b", "transformers 4.36.2", "verifies", 3.0, {"tp1": 6e-7, "tp2": 6e-7})], [1, 2]
    )
    order = ["a", "4.36.2/b", "4.36.2/c"]
    page = port_corpus.update_rows(_page(old), fresh, order, "")
    lines = [line for line in page.splitlines() if line.startswith("| ")]
    assert [line.split(" | ")[0] for line in lines[1:]] == ["| a", "| 4.36.2/b", "| 4.36.2/c"]
    assert "| 4.36.2/b | transformers 4.36.2 | verifies | 6.0e-07 | 6.0e-07 | 3.0 |  |" in lines
    assert "rank 1 failed" not in page and "no causal LM" in page
    assert "3 files: 1 port stops, 2 verifies." in page
    assert page.endswith("Measured on a CPU.\n")


def test_a_row_the_table_lacks_goes_where_the_corpus_lists_it():
    Row = port_corpus.Row
    page = _page([Row("a", "s", "verifies"), Row("c", "s", "verifies")])
    fresh = port_corpus.table([Row("b", "s", "port stops", blocker="x")], [1, 2])
    updated = port_corpus.update_rows(page, fresh, ["a", "b", "c"], "Measured again.")
    names = [line.split(" | ")[0] for line in updated.splitlines() if line.startswith("| ")][1:]
    assert names == ["| a", "| b", "| c"]
    assert "3 files: 2 verifies, 1 port stops." in updated and updated.endswith("Measured again.\n")
