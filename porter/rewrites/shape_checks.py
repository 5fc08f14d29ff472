"""Removes checks of HF's batched tensor shapes: `if x.size() != (bsz, heads, q_len, kv_len): raise`.

Eager attention in older files asserts the `[batch, heads, query, key]` layout of its scores and
outputs. The engine's tensors are flattened over tokens and its attention is one paged call, so
such a check describes a layout that no longer exists; an `if` that only raises and tests a
`.size()` or `.shape` goes. (Checks of config values, which hold in the port too, stay.)
"""

from __future__ import annotations

import libcst as cst

from porter.rewrites.base import ClassScopedTransformer, PortContext, Rewrite


class DropShapeChecks(Rewrite):
    name = "shape-checks"

    def apply(self, module: cst.Module, context: PortContext) -> cst.Module:
        return module.visit(_Transformer(context))


class _Transformer(ClassScopedTransformer):
    def leave_If(self, original: cst.If, updated: cst.If) -> cst.BaseStatement | cst.RemovalSentinel:
        if self.current_function in (None, "__init__") or updated.orelse is not None:
            return updated
        if not _only_raises(updated.body) or not _reads_a_shape(updated.test):
            return updated
        self.context.record(
            "shape-checks",
            self.where,
            f"if {cst.Module(body=[]).code_for_node(updated.test)}: raise ...",
            "",
            "checks the batched eager layout; the engine's tensors are flattened",
        )
        return cst.RemovalSentinel.REMOVE


def _only_raises(block: cst.BaseSuite) -> bool:
    statements = block.body if isinstance(block, cst.IndentedBlock) else [block]
    return bool(statements) and all(
        isinstance(s, cst.SimpleStatementLine) and all(isinstance(small, cst.Raise) for small in s.body)
        for s in statements
    )


def _reads_a_shape(test: cst.BaseExpression) -> bool:
    found = []

    class _Find(cst.CSTVisitor):
        def visit_Call(self, call: cst.Call) -> None:
            if isinstance(call.func, cst.Attribute) and call.func.attr.value == "size":
                found.append(call)

        def visit_Attribute(self, attribute: cst.Attribute) -> None:
            if attribute.attr.value == "shape":
                found.append(attribute)

    test.visit(_Find())
    return bool(found)
