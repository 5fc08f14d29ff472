"""Every field of the port's shared `Plan` is read by some rewrite: a field only ever written is a
decision nobody uses."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

from porter.rewrites.base import Plan

PORTER = Path(__file__).resolve().parents[2] / "porter"
MUTATORS = {"add", "append", "extend", "update", "setdefault", "discard", "clear"}


def fields_read(source: str) -> set[str]:
    """Attributes read off a `plan` (or `*.plan`) anywhere in `source`; a mutation through a method
    (`plan.fused.append(...)`), an augmented assignment or an item store is not a read."""
    tree = ast.parse(source)
    written = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in MUTATORS:
            written.add(id(node.value))
        elif isinstance(node, ast.AugAssign):
            written.add(id(node.target))
        elif isinstance(node, (ast.Assign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            written.update(id(t.value) for t in targets if isinstance(t, ast.Subscript))
    read = set()
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load)):
            continue
        owner = node.value
        names_plan = (isinstance(owner, ast.Name) and owner.id == "plan") or (
            isinstance(owner, ast.Attribute) and owner.attr == "plan"
        )
        if names_plan and id(node) not in written:
            read.add(node.attr)
    return read


def test_every_plan_field_is_read_by_porter():
    read = set().union(*(fields_read(path.read_text()) for path in PORTER.rglob("*.py")))
    unread = [f.name for f in dataclasses.fields(Plan) if f.name not in read]
    assert not unread, f"Plan fields nothing reads: {unread}"


def test_writes_are_not_reads():
    source = "plan.a.append(1)\nplan.b += [2]\nplan.c[k] = 3\ncontext.plan.d = 4\nx = self.context.plan.e\n"
    assert fields_read(source) == {"e"}
