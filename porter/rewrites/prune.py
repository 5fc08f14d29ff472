"""Drops what the causal LM no longer uses: task heads, the eager attention functions, helpers.

Starting from the causal-LM class, a name is kept if kept code reads it; every top-level class,
function and assignment nobody reads goes (sequence-classification and QA heads, `repeat_kv`,
`eager_attention_forward`, mask builders, `__all__`). Imports are the imports rewrite's business.
"""

from __future__ import annotations

import libcst as cst

from porter.analysis.cst_utils import names_in
from porter.rewrites.base import PortContext, Rewrite


class PruneUnused(Rewrite):
    name = "prune"

    def apply(self, module: cst.Module, context: PortContext) -> cst.Module:
        definitions: dict[str, cst.CSTNode] = {}
        for statement in module.body:
            for name in _defined(statement):
                definitions[name] = statement
        keep: set[str] = set()
        stack = [context.index.causal_lm]
        while stack:
            name = stack.pop()
            if name in keep or name not in definitions:
                continue
            keep.add(name)
            stack.extend(names_in(definitions[name]) & set(definitions))
        body = []
        for statement in module.body:
            defined = _defined(statement)
            if defined and not set(defined) & keep:
                label = ", ".join(defined)
                context.record("prune", "module", label, "", "not used by the causal LM")
                continue
            body.append(statement)
        return module.with_changes(body=body)


def _defined(statement: cst.CSTNode) -> list[str]:
    if isinstance(statement, (cst.ClassDef, cst.FunctionDef)):
        return [statement.name.value]
    if isinstance(statement, cst.SimpleStatementLine):
        names = []
        for small in statement.body:
            if isinstance(small, cst.Assign):
                for target in small.targets:
                    if isinstance(target.target, cst.Name):
                        names.append(target.target.value)
            elif isinstance(small, cst.AnnAssign) and isinstance(small.target, cst.Name):
                names.append(small.target.value)
        return names
    return []
