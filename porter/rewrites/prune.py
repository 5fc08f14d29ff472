"""Drops what the causal LM no longer uses: task heads, the eager attention functions, helpers.

Starting from the causal-LM class, a name is kept if kept code reads it; every top-level class,
function and assignment nobody reads goes (sequence-classification and QA heads, `repeat_kv`,
`eager_attention_forward`, mask builders, `__all__`), and so do non-persistent buffers nothing
reads (`unused_buffers`). Imports are the imports rewrite's business.
"""

from __future__ import annotations

import libcst as cst

from porter.analysis.cst_utils import names_in
from porter.rewrites.base import ClassScopedTransformer, PortContext, Rewrite
from porter.rewrites.unread_assignments import drop_unread_assignments
from porter.rewrites.unused_buffers import drop_unread_buffers


class PruneUnused(Rewrite):
    name = "prune"

    def apply(self, module: cst.Module, context: PortContext) -> cst.Module:
        # Rewrites after dead-code can leave a local unread (`input = input_ids` once flatten-batch
        # removed the reshape that read it): one more sweep over every forward.
        module = module.visit(_UnreadLocals(context))
        module = module.with_changes(
            body=[
                # methods first: a buffer only an uncalled method read goes too
                drop_unread_buffers(_prune_methods(s, context), context) if isinstance(s, cst.ClassDef) else s
                for s in module.body
            ]
        )
        definitions: dict[str, cst.CSTNode] = {}
        for statement in module.body:
            for name in _defined(statement):
                definitions[name] = statement
        keep: set[str] = set()
        stack = [context.index.causal_lm]
        # Top-level code that defines nothing prune could drop (a `try:` around an optional import,
        # an `if` at import time) stays, and runs when the port is imported: what it reads stays too.
        for statement in module.body:
            if not _defined(statement):
                stack.extend(names_in(statement) & set(definitions))
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


CONTRACT_METHODS = {"__init__", "forward", "compute_logits", "load_weights", "extra_repr"}


def _prune_methods(statement: cst.CSTNode, context: PortContext) -> cst.CSTNode:
    """Drops methods of a class that nothing calls any more (mask builders, cache helpers), and
    locals of its `__init__` that nothing reads any more (sizes the fused layers no longer need)."""
    if not isinstance(statement, cst.ClassDef):
        return statement
    statement = statement.with_changes(
        body=statement.body.with_changes(
            body=[
                drop_unread_assignments(item, context, f"{statement.name.value}.__init__")
                if isinstance(item, cst.FunctionDef) and item.name.value == "__init__"
                else item
                for item in statement.body.body
            ]
        )
    )
    while True:
        kept, dropped = [], []
        for item in statement.body.body:
            name = item.name.value if isinstance(item, cst.FunctionDef) else None
            # read as an attribute (`self.name`) by another item; comments do not count
            read = name is not None and any(
                name in _attributes_read(other) for other in statement.body.body if other is not item
            )
            if name and name not in CONTRACT_METHODS and not name.startswith("__") and not read:
                dropped.append(name)
                continue
            kept.append(item)
        if not dropped:
            return statement
        for name in dropped:
            context.record("prune", statement.name.value, f"def {name}", "", "method nothing calls any more")
        statement = statement.with_changes(body=statement.body.with_changes(body=kept))


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


def _attributes_read(node: cst.CSTNode) -> set[str]:
    """Names read as attributes (`x.name`) inside `node`."""
    found: set[str] = set()

    class _Find(cst.CSTVisitor):
        def visit_Attribute(self, attribute: cst.Attribute) -> None:
            found.add(attribute.attr.value)

    node.visit(_Find())
    return found


class _UnreadLocals(ClassScopedTransformer):
    def leave_FunctionDef(self, original: cst.FunctionDef, updated: cst.FunctionDef):
        if updated.name.value == "forward" and len(self.function_stack) == 1:
            updated = drop_unread_assignments(updated, self.context, self.where)
        return super().leave_FunctionDef(original, updated)
