"""Makes the imports right for the new file: absolute, used, and including the engine's layers.

Relative imports (`from ...activations import ACT2FN`) are resolved against the source's module
path inside transformers; an import of a module next to a remote-code file names that module in the
package the port's siblings are copied into (`from .x_code.configuration_x import XConfig`);
imports nothing reads any more go; the engine names other rewrites asked for are added as
`from engine.layers import ...` lines, sorted.
"""

from __future__ import annotations

import libcst as cst

from porter.analysis.cst_utils import code_of, dotted_name, is_docstring, names_in
from porter.analysis.transformers_modules import (
    absolute_module,
    installed_has,
    presumed_module,
    reaches_outside_folder,
)
from porter.rewrites.base import PortContext, Rewrite


class FixImports(Rewrite):
    name = "imports"

    def apply(self, module: cst.Module, context: PortContext) -> cst.Module:
        used = set()
        for statement in module.body:
            if not _is_import(statement):
                used |= names_in(statement)
        transformers_style = context.source.module is None and reaches_outside_folder(context.source)
        body: list[cst.BaseStatement] = []
        for statement in module.body:
            statement = _sibling_fallback(statement, context)
            if not _is_import(statement):
                body.append(statement)
                continue
            for kept in _rewrite_import(statement.body[0], used, context, transformers_style):
                body.append(statement.with_changes(body=[kept]))
        engine_lines = _engine_imports(context, used)
        first_code = next(i for i, s in enumerate(body) if not _is_import(s) and not is_docstring(s))
        return module.with_changes(body=[*body[:first_code], *engine_lines, *body[first_code:]])


def _sibling_fallback(statement: cst.BaseStatement, context: PortContext) -> cst.BaseStatement:
    """`try: from .configuration_x import XConfig except ImportError: from configuration_x import
    XConfig` (a file that loads as a package module or from its own directory) is one import of that
    sibling: in the port both name the same module of the package next to it."""
    if not isinstance(statement, cst.Try) or statement.orelse or statement.finalbody:
        return statement
    blocks = [statement.body, *(handler.body for handler in statement.handlers)]
    imports = [s for block in blocks for s in block.body]
    if not imports or not all(_is_import(s) and isinstance(s.body[0], cst.ImportFrom) for s in imports):
        return statement
    modules = {dotted_name(s.body[0].module) if s.body[0].module else "" for s in imports}
    names = {
        tuple((a.evaluated_name, a.evaluated_alias) for a in s.body[0].names)
        for s in imports
        if not isinstance(s.body[0].names, cst.ImportStar)
    }
    if (
        len(modules) != 1
        or len(names) != 1
        or next(iter(modules)).split(".")[0] not in context.source.siblings
    ):
        return statement
    return imports[0].with_changes(leading_lines=statement.leading_lines)


def _is_import(statement: cst.CSTNode) -> bool:
    return isinstance(statement, cst.SimpleStatementLine) and isinstance(
        statement.body[0], (cst.Import, cst.ImportFrom)
    )


def _rewrite_import(
    node: cst.Import | cst.ImportFrom, used: set[str], context: PortContext, transformers_style: bool
) -> list[cst.Import | cst.ImportFrom]:
    """The import statements `node` becomes: only the names still used, and nothing relative that
    the port's place cannot resolve."""
    if isinstance(node, cst.Import):
        names = [a for a in node.names if (a.evaluated_alias or a.evaluated_name).split(".")[0] in used]
        return [node.with_changes(names=_commas(names))] if names else []
    if isinstance(node.names, cst.ImportStar):
        return [node]
    names = [a for a in node.names if (a.evaluated_alias or a.evaluated_name) in used]
    if not names:
        return []
    module_name = dotted_name(node.module) if node.module is not None else ""
    if node.relative and transformers_style:
        # A file of transformers' own tree, copied out of it or from another release: what the
        # installed transformers still has comes from there, the rest from what sits beside it.
        absolute = absolute_module(presumed_module(context.source), len(node.relative), module_name)
        present = [a for a in names if installed_has(absolute, a.evaluated_name)]
        missing = [a for a in names if a not in present]
        imports = [_absolute(node, absolute, present)] if present else []
        if missing:
            imports += _rewrite_outside_transformers(
                node.with_changes(names=_commas(missing)), context, absolute
            )
        return imports
    return _rewrite_outside_transformers(node.with_changes(names=_commas(names)), context)


def _rewrite_outside_transformers(
    node: cst.ImportFrom, context: PortContext, installed_module: str | None = None
) -> list[cst.ImportFrom]:
    module_name = dotted_name(node.module) if node.module is not None else ""
    if len(node.relative) <= 1 and module_name.split(".")[0] in context.source.siblings:
        # Remote code's own module (its configuration, a helper): it travels with the port, in a
        # package next to it.
        package = context.source.sibling_package
        return [
            node.with_changes(relative=[cst.Dot()], module=cst.parse_expression(f"{package}.{module_name}"))
        ]
    if node.relative:
        base = context.source.module
        if base is None:
            names = ", ".join(a.evaluated_name for a in node.names)
            context.flag(
                "imports",
                "module",
                f"relative import `{code_of(node)}` in a file outside transformers"
                if installed_module is None
                else f"`{names}` from `{installed_module}`, which the installed transformers does not define",
            )
            return [node]
        parts = base.split(".")[: -len(node.relative)]
        return [_absolute(node, ".".join([*parts, module_name] if module_name else parts), node.names)]
    return [node]


def _absolute(node: cst.ImportFrom, module: str, names) -> cst.ImportFrom:
    return node.with_changes(relative=[], module=cst.parse_expression(module), names=_commas(names))


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
