"""Forwards of a port that no longer return anything although the source's returned a value.

A rewrite that removes a statement whose name the `return` read takes the return with it (a head's
input assigned from a helper that read a dropped input); the port would then hand the engine None.
"""

from __future__ import annotations

import libcst as cst

from porter.analysis.cst_utils import nodes_of


def forwards_without_return(port: cst.Module, source: cst.Module) -> list[str]:
    """`Class.forward` of each class whose forward returns a value in `source` and none in `port`."""
    returning = {name for name, forward in _forwards(source).items() if _returns_value(forward)}
    return [
        f"{name}.forward"
        for name, forward in _forwards(port).items()
        if name in returning and not _returns_value(forward)
    ]


def _forwards(module: cst.Module) -> dict[str, cst.FunctionDef]:
    found = {}
    for statement in module.body:
        if isinstance(statement, cst.ClassDef):
            for item in statement.body.body:
                if isinstance(item, cst.FunctionDef) and item.name.value == "forward":
                    found[statement.name.value] = item
    return found


def _returns_value(function: cst.FunctionDef) -> bool:
    return any(r.value is not None for r in nodes_of(function.body, cst.Return))
