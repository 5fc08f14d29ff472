"""A rewrite imports what it shares with other rewrites from porter/analysis/ or from a helper module
of porter/rewrites/ (one that holds no rewrite of the pipeline), never from another rewrite."""

from __future__ import annotations

import ast
from pathlib import Path

from porter.pipeline import REWRITES

REWRITES_DIR = Path(__file__).resolve().parents[2] / "porter" / "rewrites"


def test_no_rewrite_imports_from_another_rewrite():
    rewrite_modules = {type(rewrite).__module__ for rewrite in REWRITES}
    found = []
    for module in sorted(rewrite_modules):
        path = REWRITES_DIR / f"{module.rsplit('.', 1)[-1]}.py"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module in rewrite_modules - {module}:
                found.append(f"{module} imports {', '.join(a.name for a in node.names)} from {node.module}")
    assert not found, "\n".join(found)
