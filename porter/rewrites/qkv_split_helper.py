"""A fused q|k|v projection split into heads by a helper method becomes a split by this rank's sizes.

Some attention classes hand the fused projection's output to a helper (`q, k, v =
self._split_heads(fused_qkv)`) that views it into heads and picks q, k and v out by index, in a
layout that may depend on the configuration (one branch per layout). In the port the projection is
a `QKVParallelLinear`, whose output on each rank is `[q | k | v]` of this rank's heads, so the call
becomes `fused_qkv.split([q_size, kv_size, kv_size], dim=-1)`, each part viewed into heads as the
helper's were (`[T, heads, head_dim]`: a per-head norm or a slice of the head dim may follow); the
layout the helper's views show is the layout the layer loads the fused checkpoint tensor in:
- a view ending `(..., 3, head_dim)` (q, k, v side by side per head) is "per_head";
- a view ending `(..., n + 2, head_dim)` (per KV group: its queries, then one key and one value; a
  single group with no group axis is multi-query's `[q..., k, v]`) is "grouped".
The head size may be the attention's head_dim or a literal the source hard-codes.
A helper with both kinds of branches loads "grouped": per head is grouped with one query per group
(it has as many KV heads as query heads), so one layout reads every configuration. The helper is
left unused and the prune rewrite drops it.
"""

from __future__ import annotations

import libcst as cst

from porter.analysis.cst_utils import calls_in, code_of, self_attribute, statement_targets
from porter.rewrites.base import ClassScopedTransformer, PortContext, Rewrite

VIEWS = ("view", "reshape")


class SplitByHelper(Rewrite):
    name = "qkv-split-helper"

    def apply(self, module: cst.Module, context: PortContext) -> cst.Module:
        found: dict[str, tuple[str, str, str, str]] = {}  # class -> (projection, helper, layout, head_dim)
        for name, info in context.plan.attention.items():
            if len({info.query, info.key, info.value}) != 1:
                continue
            methods = context.index.classes[name].methods
            helper = _helper_called_on(methods.get("forward"), info.query, methods)
            if helper is None:
                continue
            layout = _layout(methods[helper], info.head_dim)
            if layout is None:
                context.flag(
                    "qkv-split-helper",
                    f"{name}.{helper}",
                    "splits the fused q|k|v in a layout porter cannot read",
                )
                continue
            found[name] = (info.query, helper, layout, info.head_dim)
            context.plan.concatenated_qkv.add((name, info.query))
            context.plan.qkv_layouts[(name, info.query)] = [(layout, None)]
        if not found:
            return module
        return module.visit(_Transformer(context, found))


def _helper_called_on(
    forward: cst.FunctionDef | None, projection: str, methods: dict[str, cst.FunctionDef]
) -> str | None:
    """The method forward calls on the projection's output (directly or through one variable)."""
    if forward is None:
        return None
    outputs: set[str] = set()
    for statement in forward.body.body:
        if not isinstance(statement, cst.SimpleStatementLine):
            continue
        for call in calls_in(statement):
            if self_attribute(call.func) == projection:
                outputs |= set(statement_targets(statement))
            method = self_attribute(call.func)
            if method in methods and method not in ("forward", "__init__") and len(call.args) == 1:
                argument = call.args[0].value
                if (
                    code_of(argument) in outputs
                    or self_attribute(getattr(argument, "func", None)) == projection
                ):
                    return method
    return None


def _layout(helper: cst.FunctionDef, head_dim: str) -> str | None:
    layouts = set()
    for call in calls_in(helper):
        func = call.func
        if not (isinstance(func, cst.Attribute) and func.attr.value in VIEWS and len(call.args) >= 2):
            continue
        last = call.args[-1].value
        # A literal last size is the head size the source hard-codes (it reads only checkpoints of
        # that head size); the split keeps the attention's head_dim, equal to it for those.
        if code_of(last) != head_dim and not isinstance(last, cst.Integer):
            continue
        slots = call.args[-2].value
        if code_of(slots) == "3":
            layouts.add("per_head")
        elif (
            isinstance(slots, cst.BinaryOperation)
            and isinstance(slots.operator, cst.Add)
            and code_of(slots.right) == "2"
        ):
            layouts.add("grouped")
        else:
            return None
    if not layouts:
        return None
    return layouts.pop() if len(layouts) == 1 else "grouped"


class _Transformer(ClassScopedTransformer):
    def __init__(self, context: PortContext, found: dict[str, tuple[str, str, str, str]]) -> None:
        super().__init__(context)
        self.found = found

    def leave_Call(self, original: cst.Call, updated: cst.Call) -> cst.BaseExpression:
        entry = self.found.get(self.current_class or "")
        if entry is None or self.current_function != "forward":
            return updated
        projection, helper, layout, head_dim = entry
        if self_attribute(updated.func) != helper:
            return updated
        sizes = f"[self.{projection}.q_size, self.{projection}.kv_size, self.{projection}.kv_size]"
        fused = code_of(updated.args[0].value)
        new = cst.parse_expression(
            f"(part.unflatten(-1, (-1, {head_dim})) for part in {fused}.split({sizes}, dim=-1))"
        )
        self.context.record(
            "qkv-split-helper",
            self.where,
            updated,
            new,
            f"this rank's q, k and v of the fused projection (checkpoint layout {layout})",
        )
        return new
