"""Removes the batch dimension: the engine's tensors are `[num_tokens, ...]`, sequences end to end.

- `bsz, seq_len, _ = x.size()` (or `.shape`) keeps only the token count: `seq_len = x.shape[0]`;
- view/reshape arguments naming the batch size go; a per-head view ending in the head size
  becomes `unflatten(-1, (-1, head_dim))`, so the head count is whatever this rank holds;
- in attention, `.transpose(1, 2)` or `.permute(0, 2, 1, 3)` (heads <-> sequence) goes: per-token
  rows stay `[T, H, D]`;
- a head merge of the paged attention's output sized by the global width
  (`reshape(bsz, q_len, self.hidden_size)`) infers it (`reshape(q_len, -1)`): a rank holds its heads;
- a token-id or position tensor reshaped to 2-D (`input_ids.view(-1, input_ids.shape[-1])`,
  `position_ids.unsqueeze(0)`) stays 1-D;
- in an attention class, a head split sized `x.size()[:-1] + (num_heads, head_size)` infers the
  head count (`+ (-1, head_size)`): a rank holds its heads; a head merge sized
  `x.size()[:-2] + (num_heads * head_size,)` infers its width (`+ (-1,)`) likewise;
- in an attention class, an `if` chain on a tensor's rank (`len(t.shape) == 5` / `== 4`) keeps the
  rank-4 branch, where per-token `[T, H, D]` rows stand for the batched `[B, S, H, D]`;
- a reshape back to a batch-shaped size the function built (`output_shape = (-1, seq_length,
  hidden)`, then `hidden_states.view(output_shape)`) goes, with the sizes only it read: the
  hidden states stay `[num_tokens, hidden]` (GPT-Neo's `seq_length = inputs_embeds.shape[1]` is the
  hidden width once tokens are flattened, so its view failed);
- a module-level helper that an attention class calls with the positions and that returns a
  per-position factor shaped for batched queries (`scale[:, None, :, None]`: `[B, S]` positions to
  `[B, 1, S, 1]` against `[B, H, S, D]`) returns it for per-token rows instead
  (`scale[:, None, None]`: `[T]` to `[T, 1, 1]` against `[T, H, D]`);
- an einops pattern that keeps its first two axes in place on both sides (`rearrange(x,
  "b q (h gs d) -> b q h gs d", ...)`: batch and sequence, only the trailing axes regrouped) loses
  the batch axis on both sides (`"q (h gs d) -> q h gs d"`), and a size given for it;
- in an attention class that folds its heads into the batch (`x.reshape(batch * heads, seq,
  head_dim)`), the fold and the views after it that undo it (a heads-first split, the merge of
  `heads * head_dim`) go, or become `flatten(1)`: per-token rows `[T, H, D]` hold heads on their own axis.
"""

from __future__ import annotations

import re

import libcst as cst

from porter.analysis.cst_utils import (
    assigned_names,
    calls_in,
    code_of,
    dotted_name,
    names_in,
    statement_targets,
)
from porter.analysis.einops_patterns import einops_names, pattern_function, without_leading_axis
from porter.rewrites.base import ClassScopedTransformer, PortContext, Rewrite
from porter.rewrites.unread_assignments import drop_unread_assignments

ONE_DIMENSIONAL = {"input_ids", "positions"}
RESHAPES = {"view", "reshape"}


class FlattenBatch(Rewrite):
    name = "flatten-batch"

    def apply(self, module: cst.Module, context: PortContext) -> cst.Module:
        module = module.visit(_Transformer(context, einops_names(module)))
        helpers = _position_helpers(module, context)
        return module.visit(_PositionFactors(context, helpers)) if helpers else module


def _position_helpers(module: cst.Module, context: PortContext) -> set[str]:
    """Module-level functions that an attention class's methods call with the positions."""
    functions = {s.name.value for s in module.body if isinstance(s, cst.FunctionDef)}
    called: set[str] = set()
    for statement in module.body:
        if not (isinstance(statement, cst.ClassDef) and statement.name.value in context.plan.attention):
            continue
        for call in calls_in(statement):
            name = dotted_name(call.func)
            if name in functions and any(code_of(a.value) == "positions" for a in call.args):
                called.add(name)
    return called


# `[:, None, :, None]`: batch and sequence kept, unit axes for the heads and the head dim.
_BATCHED_FACTOR = ["slice", "None", "slice", "None"]


class _PositionFactors(cst.CSTTransformer):
    """In the helpers found above, `return x[:, None, :, None]` -> `return x[:, None, None]`."""

    def __init__(self, context: PortContext, helpers: set[str]) -> None:
        self.context = context
        self.helpers = helpers
        self.function: str | None = None

    def visit_FunctionDef(self, node: cst.FunctionDef) -> bool:
        if self.function is None and node.name.value in self.helpers:
            self.function = node.name.value
            return True
        return self.function is not None

    def leave_FunctionDef(self, original: cst.FunctionDef, updated: cst.FunctionDef) -> cst.FunctionDef:
        if original.name.value == self.function:
            self.function = None
        return updated

    def visit_ClassDef(self, node: cst.ClassDef) -> bool:
        return False

    def leave_Return(self, original: cst.Return, updated: cst.Return) -> cst.Return:
        value = updated.value
        if self.function is None or not isinstance(value, cst.Subscript):
            return updated
        kinds = [
            "slice"
            if isinstance(e.slice, cst.Slice) and e.slice.lower is e.slice.upper is e.slice.step is None
            else code_of(e.slice).strip()
            for e in value.slice
        ]
        if kinds != _BATCHED_FACTOR:
            return updated
        new = updated.with_changes(
            value=value.with_changes(slice=[value.slice[0], value.slice[1], value.slice[3]])
        )
        self.context.record(
            "flatten-batch",
            self.function,
            original,
            new,
            "per-position factor for per-token rows: [T, 1, 1] against [T, H, D], not [B, 1, S, 1]",
        )
        return new


class _Transformer(ClassScopedTransformer):
    def __init__(self, context: PortContext, einops: dict[str, str]) -> None:
        super().__init__(context)
        self.einops = einops  # local names of einops and its pattern functions
        self.batch_names: set[str] = set()
        self.attention_outputs: set[str] = set()  # variables holding the paged attention's output
        self.folds_heads = False

    @property
    def active(self) -> bool:
        if self.current_function is None or self.current_function == "__init__":
            return False
        if self.current_function == "forward":
            # every module the model runs sees [num_tokens, ...], rewritten signature or not
            return (
                self.current_class in self.context.plan.signatures
                or self.current_class in self.context.index.reachable
            )
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
        self.batch_names, self.attention_outputs = set(), set()
        self.folds_heads = False  # this function folded heads into the batch ([B*H, S, D])
        return True

    def leave_FunctionDef(self, original: cst.FunctionDef, updated: cst.FunctionDef):
        if self.active and self.current_class not in self.context.plan.attention:
            updated = self._drop_batch_reshapes(updated)
        return super().leave_FunctionDef(original, updated)

    def _drop_batch_reshapes(self, function: cst.FunctionDef) -> cst.FunctionDef:
        body = list(function.body.body)
        batch_shapes = {
            statement_targets(s)[0]
            for s in body
            if len(statement_targets(s)) == 1 and _batch_shaped(getattr(s.body[0], "value", None))
        }
        kept = [s for s in body if not _reshapes_to(s, batch_shapes)]
        if len(kept) == len(body):
            return function
        for statement in body:
            if statement not in kept:
                self.context.record(
                    "flatten-batch",
                    self.where,
                    statement,
                    "",
                    "no batch dimension to restore: [T, hidden] stays",
                )
        function = function.with_changes(body=function.body.with_changes(body=kept))
        return drop_unread_assignments(function, self.context, self.where)

    def leave_SimpleStatementLine(self, original, updated: cst.SimpleStatementLine):
        self._track_attention_output(original)
        if not self.active or len(updated.body) != 1 or not isinstance(updated.body[0], cst.Assign):
            return updated
        assign = updated.body[0]
        if len(assign.targets) == 1 and code_of(assign.targets[0].target) == code_of(assign.value):
            # `key = key`: what was left of `key = key.permute(0, 2, 1, 3)`
            self.context.record("flatten-batch", self.where, original, "", "no head/sequence swap left to do")
            return cst.RemovalSentinel.REMOVE
        target = assign.targets[0].target
        names = assigned_names(target)
        source = _size_source(assign.value)
        # `[batch, seq, hidden]` activations, or `[batch, seq]` token ids and positions
        rank = 2 if source in ONE_DIMENSIONAL else 3
        if isinstance(target, cst.Tuple) and source is not None and len(names) >= rank:
            seq_at = len(names) - (rank - 1)  # the token count: the dimension after the batch
            self.batch_names |= {n for n in names[:seq_at] if n != "_"}
            kept = names[seq_at:]
            if all(n == "_" for n in kept):
                self.context.record("flatten-batch", self.where, updated, "", "no batch dimension to measure")
                return cst.RemovalSentinel.REMOVE
            if all(n == "_" for n in kept[1:]):
                new = cst.parse_statement(f"{kept[0]} = {source}.shape[0]")
            else:  # a feature size read later stays bound: `seq_len, hidden_size = x.shape`
                new = cst.parse_statement(f"{', '.join(kept)} = {source}.shape")
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

    def leave_If(self, original: cst.If, updated: cst.If) -> cst.BaseStatement | cst.FlattenSentinel:
        """An `if` chain on a tensor's rank in an attention class (`if len(t.shape) == 5: ... elif
        len(t.shape) == 4: ... else: raise`, GPT-J's head split) keeps the rank-4 branch: per-token
        rows `[T, H, D]` stand where the batched `[B, S, H, D]` stood (and would hit the `raise`)."""
        if not self.active or self.current_class not in self.context.plan.attention:
            return updated
        branches: list[tuple[int, cst.BaseSuite]] = []
        node: cst.If | cst.Else | None = updated
        while isinstance(node, cst.If):
            rank = _rank_test(node.test)
            if rank is None:
                return updated
            branches.append((rank, node.body))
            node = node.orelse
        kept = next((body for rank, body in branches if rank == 4), None)
        if kept is None or len(branches) < 2 or not isinstance(kept, cst.IndentedBlock):
            return updated
        self.context.record(
            "flatten-batch", self.where, original, "", "per-token rows [T, H, D] take the rank-4 branch"
        )
        return cst.FlattenSentinel(kept.body)

    def leave_BinaryOperation(
        self, original: cst.BinaryOperation, updated: cst.BinaryOperation
    ) -> cst.BaseExpression:
        """`x.size()[:-1] + (num_heads, head_size)` in an attention class: the head split of a
        helper (`new_shape = ...; x.view(new_shape)`). The count becomes -1: a rank holds its heads.
        Likewise the merge `x.size()[:-2] + (num_heads * head_size,)` infers its width."""
        if (
            self.active
            and self.current_class in self.context.plan.attention
            and isinstance(updated.operator, cst.Add)
            and _leading_shape(updated.left, "-2")
            and isinstance(updated.right, cst.Tuple)
            and len(updated.right.elements) == 1
            and code_of(updated.right.elements[0].value) != "-1"
        ):
            width = updated.right.elements[0].with_changes(value=cst.parse_expression("-1"))
            new = updated.with_changes(right=updated.right.with_changes(elements=[width]))
            self.context.record(
                "flatten-batch", self.where, original, new, "merge heads; the width is this rank's heads"
            )
            return new
        if (
            not self.active
            or self.current_class not in self.context.plan.attention
            or not isinstance(updated.operator, cst.Add)
            or not _leading_shape(updated.left)
            or not isinstance(updated.right, cst.Tuple)
            or len(updated.right.elements) != 2
            or code_of(updated.right.elements[0].value) == "-1"
        ):
            return updated
        heads = updated.right.elements[0].with_changes(value=cst.parse_expression("-1"))
        new = updated.with_changes(
            right=updated.right.with_changes(elements=[heads, updated.right.elements[1]])
        )
        self.context.record(
            "flatten-batch", self.where, original, new, "split heads; head count is this rank's"
        )
        return new

    def leave_Call(self, original: cst.Call, updated: cst.Call) -> cst.BaseExpression:
        if self.active and self.einops and pattern_function(updated, self.einops):
            return self._unbatched_pattern(original, updated)
        if not self.active or not isinstance(updated.func, cst.Attribute):
            return updated
        method = updated.func.attr.value
        receiver = updated.func.value
        swaps_heads_and_tokens = [code_of(a.value) for a in updated.args] in (
            ["1", "2"],
            ["0", "2", "1", "3"],
        )
        if method in ("transpose", "permute") and self.head_dim and swaps_heads_and_tokens:
            self.context.record(
                "flatten-batch",
                self.where,
                original,
                receiver,
                "no batch dimension: [T, H, D] needs no transpose",
            )
            return receiver
        if method in RESHAPES and updated.args:
            folded = self._folded_heads(updated)
            if folded is not None:
                self.context.record("flatten-batch", self.where, original, folded[0], folded[1])
                return folded[0]
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
            if (
                isinstance(receiver, cst.Name)
                and receiver.value in self.attention_outputs
                and len(args) == 2
                and code_of(args[-1].value) not in ("-1", head_dim)
            ):
                args[-1] = args[-1].with_changes(value=cst.parse_expression("-1"))
                new = updated.with_changes(args=args)
                self.context.record(
                    "flatten-batch", self.where, original, new, "merged heads: the width is this rank's heads"
                )
                return new
            if len(args) != len(updated.args):
                args[-1] = args[-1].with_changes(comma=cst.MaybeSentinel.DEFAULT)
                new = updated.with_changes(args=args)
                self.context.record("flatten-batch", self.where, original, new, "batch dimension removed")
                return new
        return updated

    def _folded_heads(self, call: cst.Call) -> tuple[cst.BaseExpression, str] | None:
        """The views of an attention that folds its heads into the batch (`[B*H, S, D]`, Bloom's
        layout, for a `bmm` or a rotary module over `[*, S, D]`), in per-token rows `[T, H, D]`:
        - the fold `x.reshape(batch * heads, seq, head_dim)` goes: heads keep their own axis;
        - after it, a heads-first split `x.reshape(batch, heads, -1, head_dim)` goes: the rows are
          that split already;
        - after it, the merge `x.reshape(batch, seq, heads * head_dim)` is `x.flatten(1)`: this
          rank's heads side by side."""
        # the head count is the one the view names (`self.num_heads`), which the attention's
        # analysis may spell otherwise (`config.n_head`): only the batch and the head size are matched
        head_dim = self.head_dim
        if head_dim is None or self.current_class not in self.context.plan.attention:
            return None
        receiver = call.func.value
        sizes = [code_of(a.value) for a in call.args]
        first = call.args[0].value
        if (
            isinstance(first, cst.BinaryOperation)
            and isinstance(first.operator, cst.Multiply)
            and {code_of(first.left), code_of(first.right)} & self.batch_names
            and sizes[-1] == head_dim
        ):
            self.folds_heads = True
            return receiver, "heads folded into the batch: per-token rows [T, H, D] keep their heads axis"
        if not self.folds_heads:
            return None
        if len(sizes) == 4 and sizes[0] in self.batch_names and sizes[3] == head_dim:
            return receiver, "a heads-first split: per-token rows [T, H, D] are split by head already"
        width = call.args[-1].value
        if (
            len(sizes) >= 2
            and set(sizes[:-1]) <= self.batch_names
            and isinstance(width, cst.BinaryOperation)
            and isinstance(width.operator, cst.Multiply)
            and code_of(width.right) == head_dim
        ):
            new = cst.parse_expression(f"{code_of(receiver)}.flatten(1)")
            return new, "merge heads of per-token rows [T, H, D]: this rank's heads side by side"
        return None

    def _unbatched_pattern(self, original: cst.Call, updated: cst.Call) -> cst.Call:
        """`rearrange(x, "b q (h d) -> b q h d", d=...)` -> `rearrange(x, "q (h d) -> q h d", d=...)`."""
        at = next(
            (
                i
                for i, a in enumerate(updated.args)
                if (a.keyword is None and i == 1) or (a.keyword is not None and a.keyword.value == "pattern")
            ),
            None,
        )
        if at is None or not isinstance(updated.args[at].value, cst.SimpleString):
            return updated
        literal = updated.args[at].value
        dropped = without_leading_axis(literal.evaluated_value)
        if dropped is None:
            return updated
        pattern, batch = dropped
        quote = literal.quote
        args = list(updated.args)
        args[at] = args[at].with_changes(value=cst.SimpleString(f"{literal.prefix}{quote}{pattern}{quote}"))
        args = [a for a in args if a.keyword is None or a.keyword.value != batch]
        args[-1] = args[-1].with_changes(comma=cst.MaybeSentinel.DEFAULT)
        new = updated.with_changes(args=args)
        self.context.record(
            "flatten-batch", self.where, original, new, "tokens are flattened: the pattern has no batch axis"
        )
        return new

    def _track_attention_output(self, statement: cst.SimpleStatementLine) -> None:
        """Follows the paged attention's output (`self.attn(...)`) through reassignments that run no
        projection, so its head merge is known when it comes."""
        targets = statement_targets(statement)
        if not targets or self.current_class not in self.context.plan.attention:
            return
        calls = [dotted_name(c.func) or "" for c in calls_in(statement)]
        if "self.attn" in calls or (
            names_in(statement.body[0].value) & self.attention_outputs
            and not any(c.startswith("self.") for c in calls)
        ):
            self.attention_outputs |= set(targets)
        else:
            self.attention_outputs -= set(targets)


def _rank_test(test: cst.BaseExpression) -> int | None:
    """n of `len(x.shape) == n`, `x.dim() == n` or `x.ndim == n`."""
    if not (
        isinstance(test, cst.Comparison)
        and len(test.comparisons) == 1
        and isinstance(test.comparisons[0].operator, cst.Equal)
        and isinstance(test.comparisons[0].comparator, cst.Integer)
    ):
        return None
    left = code_of(test.left).replace(" ", "")
    rank = re.fullmatch(r"len\(\w+\.(shape|size\(\))\)|\w+\.dim\(\)|\w+\.ndim", left)
    return int(test.comparisons[0].comparator.value) if rank else None


def _leading_shape(node: cst.BaseExpression, cut_at: str = "-1") -> bool:
    """`x.size()[:-1]` or `x.shape[:-1]`: every dimension but the last (`cut_at` "-2": but the
    last two)."""
    if not (isinstance(node, cst.Subscript) and len(node.slice) == 1):
        return False
    cut = node.slice[0].slice
    base = node.value
    is_shape = (isinstance(base, cst.Attribute) and base.attr.value == "shape") or (
        isinstance(base, cst.Call)
        and isinstance(base.func, cst.Attribute)
        and base.func.attr.value == "size"
        and not base.args
    )
    return (
        is_shape
        and isinstance(cut, cst.Slice)
        and cut.lower is None
        and cut.upper is not None
        and code_of(cut.upper).replace(" ", "") == cut_at
    )


def _batch_shaped(value: cst.BaseExpression | None) -> bool:
    """A size whose first entry is an inferred batch: `(-1, seq, hidden)` or `(-1,) + ...`."""
    while isinstance(value, cst.BinaryOperation) and isinstance(value.operator, cst.Add):
        value = value.left
    return (
        isinstance(value, cst.Tuple)
        and bool(value.elements)
        and code_of(value.elements[0].value).replace(" ", "") == "-1"
    )


def _reshapes_to(statement: cst.BaseStatement, sizes: set[str]) -> bool:
    """`x = x.view(size)` (or `.reshape`) with `size` one of `sizes`."""
    if not isinstance(statement, cst.SimpleStatementLine) or len(statement_targets(statement)) != 1:
        return False
    value = getattr(statement.body[0], "value", None)
    return (
        isinstance(value, cst.Call)
        and isinstance(value.func, cst.Attribute)
        and value.func.attr.value in RESHAPES
        and code_of(value.func.value) == statement_targets(statement)[0]
        and len(value.args) == 1
        and code_of(value.args[0].value) in sizes
    )


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
    while _is_cast(value):  # `position_ids.view(-1, seq_length).long()`: ids are long already
        value = value.func.value
    if not (isinstance(value, cst.Call) and isinstance(value.func, cst.Attribute)):
        return False
    return dotted_name(value.func.value) == name and value.func.attr.value in {"view", "reshape", "unsqueeze"}


def _is_cast(value: cst.BaseExpression) -> bool:
    return (
        isinstance(value, cst.Call)
        and isinstance(value.func, cst.Attribute)
        and value.func.attr.value in ("long", "int", "contiguous")
        and not value.args
    )
