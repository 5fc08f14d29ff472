"""Removes the batch dimension: the engine's tensors are `[num_tokens, ...]`, sequences end to end.

- `bsz, seq_len, _ = x.size()` (or `.shape`) keeps only the token count: `seq_len = x.shape[0]`;
- view/reshape arguments naming the batch size go; a per-head view ending in the head size
  becomes `unflatten(-1, (-1, head_dim))`, so the head count is whatever this rank holds;
- in attention, `.transpose(1, 2)` (heads <-> sequence) goes: per-token rows stay `[T, H, D]`;
- a token-id or position tensor reshaped to 2-D (`input_ids.view(-1, input_ids.shape[-1])`,
  `position_ids.unsqueeze(0)`) stays 1-D.
"""

from __future__ import annotations

import libcst as cst

from porter.analysis.cst_utils import assigned_names, code_of, dotted_name
from porter.rewrites.base import ClassScopedTransformer, PortContext, Rewrite

ONE_DIMENSIONAL = {"input_ids", "positions"}
RESHAPES = {"view", "reshape"}


class FlattenBatch(Rewrite):
    name = "flatten-batch"

    def apply(self, module: cst.Module, context: PortContext) -> cst.Module:
        return module.visit(_Transformer(context))


class _Transformer(ClassScopedTransformer):
    def __init__(self, context: PortContext) -> None:
        super().__init__(context)
        self.batch_names: set[str] = set()

    @property
    def active(self) -> bool:
        if self.current_function is None or self.current_function == "__init__":
            return False
        if self.current_function == "forward":
            return self.current_class in self.context.plan.signatures
        # An attention class's helpers (head split/merge) see the same [num_tokens, ...] tensors.
        return self.current_class in self.context.plan.attention

    @property
    def head_dim(self) -> str | None:
        info = self.context.plan.attention.get(self.current_class or "")
        return info.head_dim if info else None

    @property
    def head_count(self) -> str | None:
        info = self.context.plan.attention.get(self.current_class or "")
        return info.num_heads if info else None

    def visit_FunctionDef(self, node: cst.FunctionDef) -> bool:
        super().visit_FunctionDef(node)
        self.batch_names = set()
        return True

    def leave_SimpleStatementLine(self, original, updated: cst.SimpleStatementLine):
        if not self.active or len(updated.body) != 1 or not isinstance(updated.body[0], cst.Assign):
            return updated
        assign = updated.body[0]
        target = assign.targets[0].target
        names = assigned_names(target)
        source = _size_source(assign.value)
        if isinstance(target, cst.Tuple) and source is not None and len(names) >= 3:
            self.batch_names |= {n for n in names[:-2] if n != "_"}
            seq = names[-2]
            if seq == "_":
                self.context.record("flatten-batch", self.where, updated, "", "no batch dimension to measure")
                return cst.RemovalSentinel.REMOVE
            new = cst.parse_statement(f"{seq} = {source}.shape[0]")
            self.context.record(
                "flatten-batch", self.where, updated, new, "tokens are flattened: one leading dimension"
            )
            return new
        if (
            isinstance(target, cst.Name)
            and target.value in ONE_DIMENSIONAL
            and _reshapes_itself(assign.value, target.value)
        ):
            self.context.record(
                "flatten-batch", self.where, updated, "", f"{target.value} stays 1-D ([num_tokens])"
            )
            return cst.RemovalSentinel.REMOVE
        return updated

    def leave_Call(self, original: cst.Call, updated: cst.Call) -> cst.BaseExpression:
        if not self.active or not isinstance(updated.func, cst.Attribute):
            return updated
        method = updated.func.attr.value
        receiver = updated.func.value
        if method == "transpose" and self.head_dim and [code_of(a.value) for a in updated.args] == ["1", "2"]:
            self.context.record(
                "flatten-batch",
                self.where,
                original,
                receiver,
                "no batch dimension: [T, H, D] needs no transpose",
            )
            return receiver
        if method in RESHAPES and updated.args:
            args = [a for a in updated.args if code_of(a.value) not in self.batch_names]
            head_dim = self.head_dim
            heads = self.head_count
            if (
                heads
                and len(args) >= 3
                and code_of(args[-1].value) == head_dim
                and "-1" not in [code_of(a.value) for a in args]
            ):
                # the global head count is not this rank's: let the view infer it
                args = [
                    a.with_changes(value=cst.parse_expression("-1")) if code_of(a.value) == heads else a
                    for a in args
                ]
            if head_dim and len(args) == 3 and code_of(args[-1].value) == head_dim:
                new = cst.parse_expression(f"{code_of(receiver)}.unflatten(-1, (-1, {head_dim}))")
                self.context.record(
                    "flatten-batch", self.where, original, new, "split heads; head count is this rank's"
                )
                return new
            if len(args) != len(updated.args):
                args[-1] = args[-1].with_changes(comma=cst.MaybeSentinel.DEFAULT)
                new = updated.with_changes(args=args)
                self.context.record("flatten-batch", self.where, original, new, "batch dimension removed")
                return new
        return updated


def _size_source(value: cst.BaseExpression) -> str | None:
    if (
        isinstance(value, cst.Call)
        and isinstance(value.func, cst.Attribute)
        and value.func.attr.value == "size"
        and not value.args
    ):
        return code_of(value.func.value)
    if isinstance(value, cst.Attribute) and value.attr.value == "shape":
        return code_of(value.value)
    return None


def _reshapes_itself(value: cst.BaseExpression, name: str) -> bool:
    if not (isinstance(value, cst.Call) and isinstance(value.func, cst.Attribute)):
        return False
    return dotted_name(value.func.value) == name and value.func.attr.value in {"view", "reshape", "unsqueeze"}
