"""A fused q|k|v projection laid out in blocks becomes a split by this rank's sizes.

Some checkpoints were trained sharded over n model-parallel devices and keep that layout: the fused
output is n equal blocks, each holding its share of the heads of all three projections side by
side, in some order (`qkv.reshape(qkv.shape[:-1] + (4, -1))`, then `query, value, key =
torch.split(blocks, local_dim, dim=-1)`, then a helper merging the blocks' heads into one heads
axis). In the port the projection is a `QKVParallelLinear` that loads the checkpoint tensor as n
blocks in that order (`checkpoint_blocks`, `checkpoint_order`), numbering heads block by block as
the helper did, so each rank's output is `[q | k | v]` of its heads: the reshape and split become
one `.split([q_size, kv_size, kv_size], dim=-1)`, and each helper call a view into heads.
The blocks may also be cut from the projection's call directly by their width
(`qkv = self.qkv_proj(x).view(*shape, -1, 3 * local_dim)` with `local_dim = dim // self.mp_num`):
the view goes and the statement keeps the projection.
"""

from __future__ import annotations

from dataclasses import dataclass

import libcst as cst

from porter.analysis.attention import AttentionInfo
from porter.analysis.cst_utils import (
    call_name,
    calls_in,
    code_of,
    init_attribute_values,
    self_attribute,
    statement_targets,
)
from porter.analysis.inline_attention import only_reshapes
from porter.analysis.model_index import ClassInfo
from porter.analysis.projections import flat_outputs
from porter.rewrites.base import ClassScopedTransformer, PortContext, Rewrite


class SplitBlockedQKV(Rewrite):
    name = "blocked-qkv"

    def apply(self, module: cst.Module, context: PortContext) -> cst.Module:
        found: dict[str, _Blocks] = {}
        for name, info in context.plan.attention.items():
            if len({info.query, info.key, info.value}) != 1:
                continue
            owner = context.index.classes[name]
            forward = owner.methods.get("forward")
            attributes = init_attribute_values(owner.methods.get("__init__"))
            blocks = _find_blocks(forward, info, attributes) if forward is not None else None
            if blocks is None:
                continue
            if isinstance(blocks, str):
                context.flag("blocked-qkv", name, blocks)
                continue
            found[name] = blocks
            context.plan.concatenated_qkv.add((name, info.query))
            context.plan.qkv_layouts[(name, info.query)] = [("concatenated", None)]
            context.plan.qkv_blocks[(name, info.query)] = (blocks.count, blocks.order)
        return module.visit(_Transformer(context, found)) if found else module


@dataclass(slots=True)
class _Blocks:
    """Where forward cuts the blocked output, and what each cut becomes."""

    count: str  # how many blocks: `4`
    order: str  # the order of q, k and v in each block: "qvk"
    reshape: int  # top-level statement of forward viewing the output as blocks
    split: int  # the one cutting the blocks into three
    names: dict[str, str]  # role ("q", "k", "v") -> the variable forward gives it
    source: str  # the variable holding the projection's output
    # what the reshape statement becomes when it also ran the projection (`qkv = self.qkv_proj(x)`)
    kept: cst.BaseStatement | None = None


def _find_blocks(
    forward: cst.FunctionDef, info: AttentionInfo, attributes: dict[str, cst.BaseExpression]
) -> _Blocks | str | None:
    body = list(forward.body.body)
    flat = flat_outputs(forward, info.query)
    literals = _int_locals(body)
    for position, statement in enumerate(body):
        count, source = _block_reshape(statement, flat, literals)
        kept = None
        if count is None:
            count, kept = _block_view(statement, info.query, body, attributes)
            source = statement_targets(statement)[0] if kept is not None else None
        if count is None:
            continue
        (view,) = statement_targets(statement)
        for later in range(position + 1, len(body)):
            targets = statement_targets(body[later])
            if len(targets) == 3 and _splits_last_axis(body[later], view):
                roles = dict(zip(info.core_args or [], "qkv"))
                if set(targets) != set(roles):
                    return (
                        f"{info.query} holds q, k and v in {count} blocks, cut into {', '.join(targets)}, "
                        "which porter cannot match to the attention's q, k and v"
                    )
                order = "".join(roles[t] for t in targets)
                names = {roles[t]: t for t in targets}
                return _Blocks(count, order, position, later, names, source, kept)
    return None


def _block_view(
    statement: cst.BaseStatement,
    attr: str,
    body: list[cst.BaseStatement],
    attributes: dict[str, cst.BaseExpression],
) -> tuple[str | None, cst.BaseStatement | None]:
    """(n, `y = self.<attr>(x)`) for `y = self.<attr>(x).view(*shape, -1, 3 * local)` where forward
    computes `local = width // n` (n an integer, or `self.n` set to one in `__init__`): blocks of
    q, k and v `local` wide each, n of them across the fused output."""
    small = statement.body[0] if isinstance(statement, cst.SimpleStatementLine) else None
    value = small.value if isinstance(small, cst.Assign) and len(statement_targets(statement)) == 1 else None
    if not (
        isinstance(value, cst.Call)
        and isinstance(value.func, cst.Attribute)
        and value.func.attr.value in ("reshape", "view")
        and isinstance(value.func.value, cst.Call)
        and self_attribute(value.func.value.func) == attr
        and len(value.args) >= 2
        and _is_minus_one(value.args[-2].value)
    ):
        return None, None
    width = value.args[-1].value
    if not (
        isinstance(width, cst.BinaryOperation)
        and isinstance(width.operator, cst.Multiply)
        and isinstance(width.left, cst.Integer)
        and width.left.value == "3"
        and isinstance(width.right, cst.Name)
    ):
        return None, None
    count = _divisor_of(width.right.value, body, attributes)
    if count is None:
        return None, None
    return count, statement.with_changes(body=[small.with_changes(value=value.func.value)])


def _is_minus_one(node: cst.BaseExpression) -> bool:
    return (
        isinstance(node, cst.UnaryOperation)
        and isinstance(node.operator, cst.Minus)
        and isinstance(node.expression, cst.Integer)
        and node.expression.value == "1"
    )


def _divisor_of(
    name: str, body: list[cst.BaseStatement], attributes: dict[str, cst.BaseExpression]
) -> str | None:
    """n for `name = width // n` in `body`: an integer, or `self.n` that `__init__` sets to one."""
    for statement in body:
        small = statement.body[0] if isinstance(statement, cst.SimpleStatementLine) else None
        if not (isinstance(small, cst.Assign) and statement_targets(statement) == [name]):
            continue
        value = small.value
        if not (isinstance(value, cst.BinaryOperation) and isinstance(value.operator, cst.FloorDivide)):
            return None
        divisor = value.right
        held = attributes.get(self_attribute(divisor) or "")
        divisor = held if held is not None else divisor
        return divisor.value if isinstance(divisor, cst.Integer) else None
    return None


def _int_locals(body: list[cst.BaseStatement]) -> dict[str, str]:
    """`mp_num = 4` at the top level of forward: name -> the integer."""
    found = {}
    for statement in body:
        small = statement.body[0] if isinstance(statement, cst.SimpleStatementLine) else None
        if isinstance(small, cst.Assign) and isinstance(small.value, cst.Integer):
            for name in statement_targets(statement):
                found[name] = small.value.value
    return found


def _block_reshape(
    statement: cst.BaseStatement, flat: set[str], literals: dict[str, str]
) -> tuple[str | None, str | None]:
    """(n, x) for `y = x.reshape(x.shape[:-1] + (n, -1))` (or `.view`) with x the fused output."""
    small = statement.body[0] if isinstance(statement, cst.SimpleStatementLine) else None
    value = small.value if isinstance(small, cst.Assign) and len(statement_targets(statement)) == 1 else None
    if not (
        isinstance(value, cst.Call)
        and isinstance(value.func, cst.Attribute)
        and value.func.attr.value in ("reshape", "view")
        and isinstance(value.func.value, cst.Name)
        and value.func.value.value in flat
        and len(value.args) == 1
    ):
        return None, None
    source = value.func.value.value
    shape = value.args[0].value
    if not (
        isinstance(shape, cst.BinaryOperation)
        and isinstance(shape.operator, cst.Add)
        and code_of(shape.left).replace(" ", "") == f"{source}.shape[:-1]"
        and isinstance(shape.right, cst.Tuple)
        and len(shape.right.elements) == 2
        and code_of(shape.right.elements[1].value).replace(" ", "") == "-1"
    ):
        return None, None
    count = shape.right.elements[0].value
    if isinstance(count, cst.Integer):
        return count.value, source
    if isinstance(count, cst.Name) and count.value in literals:
        return literals[count.value], source
    return None, None


def _splits_last_axis(statement: cst.BaseStatement, view: str) -> bool:
    """`a, b, c = torch.split(view, size, dim=-1)` or `view.split(size, dim=-1)`."""
    for call in calls_in(statement):
        as_function = call_name(call) == "torch.split" and call.args and code_of(call.args[0].value) == view
        as_method = (
            isinstance(call.func, cst.Attribute)
            and call.func.attr.value == "split"
            and code_of(call.func.value) == view
        )
        if as_function or as_method:
            keywords = {a.keyword.value: code_of(a.value) for a in call.args if a.keyword is not None}
            return keywords.get("dim", "").replace(" ", "") == "-1"
    return False


class _Transformer(ClassScopedTransformer):
    def __init__(self, context: PortContext, found: dict[str, _Blocks]) -> None:
        super().__init__(context)
        self.found = found

    def leave_FunctionDef(self, original: cst.FunctionDef, updated: cst.FunctionDef):
        blocks = self.found.get(self.current_class or "")
        if blocks is None or self.current_function != "forward" or len(self.function_stack) != 1:
            return super().leave_FunctionDef(original, updated)
        info = self.context.plan.attention[self.current_class]
        attr = info.query
        body = list(updated.body.body)
        q, k, v = (blocks.names[role] for role in "qkv")
        split = cst.parse_statement(
            f"{q}, {k}, {v} = {blocks.source}.split("
            f"[self.{attr}.q_size, self.{attr}.kv_size, self.{attr}.kv_size], dim=-1)"
        )
        self.context.record(
            "blocked-qkv",
            self.where,
            "\n".join(code_of(body[i]).strip() for i in (blocks.reshape, blocks.split)),
            split,
            f"the layer loads the {blocks.count} blocks ({blocks.order}) into this rank's [q | k | v]",
        )
        body[blocks.split] = split.with_changes(leading_lines=body[blocks.split].leading_lines)
        if blocks.kept is not None:
            body[blocks.reshape] = blocks.kept
        else:
            del body[blocks.reshape]
        class_info = self.context.index.classes[self.current_class]
        merges = _HeadMerges(self.context, self.where, set(blocks.names.values()), info.head_dim, class_info)
        body = [statement.visit(merges) for statement in body]
        return super().leave_FunctionDef(
            original, updated.with_changes(body=updated.body.with_changes(body=body))
        )


class _HeadMerges(cst.CSTTransformer):
    """`q = self._split_heads(q, ...)` -> `q = q.unflatten(-1, (-1, head_dim))`: the helper merged
    the blocks' heads into one heads axis; this rank's part holds its heads in that order."""

    def __init__(
        self, context: PortContext, where: str, names: set[str], head_dim: str, info: ClassInfo
    ) -> None:
        self.context, self.where, self.names, self.head_dim, self.info = context, where, names, head_dim, info

    def leave_Assign(self, original: cst.Assign, updated: cst.Assign) -> cst.Assign:
        value = updated.value
        target = code_of(updated.targets[0].target) if len(updated.targets) == 1 else None
        if (
            target in self.names
            and isinstance(value, cst.Call)
            and self_attribute(value.func) in self.info.methods
            and only_reshapes(cst.SimpleStatementLine([cst.Expr(value)]), self.info)
            and value.args
            and code_of(value.args[0].value) == target
        ):
            new = cst.parse_expression(f"{target}.unflatten(-1, (-1, {self.head_dim}))")
            self.context.record(
                "blocked-qkv", self.where, value, new, "this rank's heads, in the blocks' order"
            )
            return updated.with_changes(value=new)
        return updated
