"""Makes the imports right for the new file: absolute, used, and including the engine's layers.

Relative imports (`from ...activations import ACT2FN`) are resolved against the source's module
path inside transformers; imports nothing reads any more go; the engine names other rewrites
asked for are added as `from engine.layers import ...` lines, sorted.
"""

from __future__ import annotations

import libcst as cst

from porter.analysis.cst_utils import code_of, dotted_name, is_docstring, names_in
from porter.rewrites.base import PortContext, Rewrite


class FixImports(Rewrite):
    name = "imports"

    def apply(self, module: cst.Module, context: PortContext) -> cst.Module:
        used = set()
        for statement in module.body:
            if not _is_import(statement):
                used |= names_in(statement)
        body: list[cst.BaseStatement] = []
        for statement in module.body:
            if not _is_import(statement):
                body.append(statement)
                continue
            kept = _rewrite_import(statement.body[0], used, context)
            if kept is not None:
                body.append(statement.with_changes(body=[kept]))
        engine_lines = _engine_imports(context, used)
        first_code = next(i for i, s in enumerate(body) if not _is_import(s) and not is_docstring(s))
        return module.with_changes(body=[*body[:first_code], *engine_lines, *body[first_code:]])


def _is_import(statement: cst.CSTNode) -> bool:
    return isinstance(statement, cst.SimpleStatementLine) and isinstance(
        statement.body[0], (cst.Import, cst.ImportFrom)
    )


def _rewrite_import(node: cst.Import | cst.ImportFrom, used: set[str], context: PortContext):
    if isinstance(node, cst.Import):
        names = [a for a in node.names if (a.evaluated_alias or a.evaluated_name).split(".")[0] in used]
        return node.with_changes(names=_commas(names)) if names else None
    if isinstance(node.names, cst.ImportStar):
        return node
    names = [a for a in node.names if (a.evaluated_alias or a.evaluated_name) in used]
    if not names:
        return None
    module_name = dotted_name(node.module) if node.module is not None else ""
    if node.relative:
        base = context.source.module
        if base is None:
            context.flag(
                "imports", "module", f"relative import `{code_of(node)}` in a file outside transformers"
            )
            return node.with_changes(names=_commas(names))
        parts = base.split(".")[: -len(node.relative)]
        absolute = ".".join([*parts, module_name] if module_name else parts)
        return node.with_changes(relative=[], module=cst.parse_expression(absolute), names=_commas(names))
    return node.with_changes(names=_commas(names))


def _commas(names):
    names = list(names)
    if names:
        names[-1] = names[-1].with_changes(comma=cst.MaybeSentinel.DEFAULT)
    return names


def _engine_imports(context: PortContext, used: set[str]) -> list[cst.BaseStatement]:
    by_module: dict[str, list[str]] = {}
    for module, name in context.plan.engine_imports:
        if name in used:  # a rewrite may ask for a layer that a later one replaced
            by_module.setdefault(module, []).append(name)
    return [
        cst.parse_statement(f"from {module} import {', '.join(sorted(names))}")
        for module, names in sorted(by_module.items())
    ]
