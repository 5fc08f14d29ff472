"""Turns multi-latent attention (`porter.analysis.latent_attention`) into the engine's MultiLatentAttention.

The query's statements, the down-projection, its cut and the latent's norm stay as written; what
changes:
- q's head view is taken per token (`q.view(q.shape[0], -1, head_size)`), the latent and the rope
  key lose their single-head 4-D views (the engine caches them flat);
- the rotation of the rope parts becomes `q_rope, rope_key = self.rotary_emb(positions, q_rope,
  rope_key)`, `get_rope(config, rope_size, is_neox_style=...)`: half-split rotation is GPT-NeoX
  style, interleaved pairs (strided slices or complex pairs) GPT-J style (either rotates q and the key
  alike, so their dot product is the source's whatever the order of the rotated features); an `if`
  choosing between the two by a setting passes that setting;
- the query's concatenation, the key/value expansion by the up-projection and the core become
  `out = self.attn(q_nope, q_rope, latent, rope_key, kv_cache, input_metadata)`, a
  `MultiLatentAttention(heads, nope, rope, value, rank, scale, self.<up>)` which caches the latent
  and absorbs the up-projection; the core's batch-shaped output reshape goes;
- the projections are made tensor-parallel by heads: the query's per-head projection and the
  up-projection column-parallel, the output projection row-parallel, the down-projection and a
  low-rank query's first half replicated (every rank caches the same latent). A Linear of the class
  with none of these roles is a review item.
"""

from __future__ import annotations

import libcst as cst

from porter.analysis.cst_utils import code_of, function_params, names_in, self_attribute, statement_targets
from porter.analysis.latent_attention import (
    RELAYOUTS,
    LatentAttention,
    latent_attention,
    linear_calls,
)
from porter.rewrites.base import ClassScopedTransformer, PortContext, Rewrite

RULE = "latent-attention"
MLA_LAYER = "MultiLatentAttention"
SHARDING_REASONS = {
    "ColumnParallelLinear": "output rows grouped by head: each rank computes its heads",
    "RowParallelLinear": "reads the heads' outputs: each rank its own, then an all-reduce",
    "ReplicatedLinear": "feeds the latent or the low-rank query every rank needs whole",
}


class LatentAttentionToEngine(Rewrite):
    name = RULE

    def apply(self, module: cst.Module, context: PortContext) -> cst.Module:
        found: dict[str, LatentAttention] = {}
        for name in sorted(context.index.attention):
            result = latent_attention(context.index, name)
            if isinstance(result, str):
                context.flag(RULE, name, f"cannot decide {result}")
            elif result is not None:
                found[name] = result
        if not found:
            return module
        context.need("engine.layers", MLA_LAYER)
        context.need("engine.layers", "get_rope")
        return module.visit(_Transformer(context, found))


class _Transformer(ClassScopedTransformer):
    def __init__(self, context: PortContext, found: dict[str, LatentAttention]) -> None:
        super().__init__(context)
        self.found = found

    def leave_ClassDef(self, original: cst.ClassDef, updated: cst.ClassDef):
        mla = self.found.get(updated.name.value)
        if mla is None:
            return super().leave_ClassDef(original, updated)
        members = []
        for item in updated.body.body:
            if isinstance(item, cst.FunctionDef) and item.name.value == "forward":
                item = self._forward(item, mla)
            elif isinstance(item, cst.FunctionDef) and item.name.value == "__init__":
                item = self._init(item, mla)
            members.append(item)
        code = "".join(code_of(m) for m in members)
        kept = []
        for item in members:
            # The expansion helper: nothing calls it once the engine layer absorbs the up-projection.
            if (
                isinstance(item, cst.FunctionDef)
                and item.name.value not in ("__init__", "forward")
                and f"self.{item.name.value}(" not in code
            ):
                self.context.record(
                    RULE, updated.name.value, f"def {item.name.value}", "", "expansion helper, unused"
                )
                continue
            kept.append(item)
        updated = updated.with_changes(body=updated.body.with_changes(body=kept))
        return super().leave_ClassDef(original, updated)

    def _forward(self, forward: cst.FunctionDef, mla: LatentAttention) -> cst.FunctionDef:
        where = f"{self.current_class}.forward"
        body = []
        after_core = False
        for statement in forward.body.body:
            if any(statement.deep_equals(r) for r in mla.removed):
                self.context.record(RULE, where, statement, "", "the latent is attended without expanding it")
                continue
            if statement.deep_equals(mla.core):
                new = cst.parse_statement(
                    f"{mla.output_name} = self.attn({mla.q_nope}, {mla.q_rope}, {mla.latent}, {mla.rope_key}, "
                    "kv_cache, input_metadata)"
                )
                self.context.record(RULE, where, statement, new, "attention over the paged latent cache")
                body.append(new)
                after_core = True
                continue
            if statement.deep_equals(mla.rotary):
                new = cst.parse_statement(
                    f"{mla.q_rope}, {mla.rope_key} = self.rotary_emb(positions, {mla.q_rope}, {mla.rope_key})"
                )
                self.context.record(RULE, where, statement, new, "the engine's rotary on the rope parts")
                body.append(new)
                continue
            if statement.deep_equals(mla.query_view):
                target = _single_target(statement)
                new = cst.parse_statement(f"{target} = {target}.view({target}.shape[0], -1, {mla.head_size})")
                self.context.record(RULE, where, statement, new, "query heads per token")
                body.append(new)
                continue
            target = _single_target(statement)
            value = _assigned_value(statement)
            if target in (mla.latent, mla.rope_key) and value is not None and _relayouts(value):
                base = _strip(value)
                if isinstance(base, cst.Name) and base.value == target:
                    self.context.record(RULE, where, statement, "", "the cache takes the latent flat")
                    continue
                new = statement.with_deep_changes(statement.body[0], value=base)
                self.context.record(RULE, where, statement, new, "the cache takes the latent flat")
                body.append(new)
                continue
            if after_core and target == mla.output_name and value is not None and _relayouts(value):
                base = _strip(value)
                if isinstance(base, cst.Name) and base.value == target:
                    self.context.record(RULE, where, statement, "", "the layer returns [tokens, heads * v]")
                    continue
            body.append(statement)
        body = self._drop_unread(body, where)
        if body:  # the statements removed before the first one kept leave no blank line at the top
            comments = [line for line in body[0].leading_lines if line.comment is not None]
            body[0] = body[0].with_changes(leading_lines=comments)
        return forward.with_changes(body=forward.body.with_changes(body=body))

    def _drop_unread(self, body: list, where: str) -> list:
        """Locals the removed statements were the only readers of (batch sizes, shapes, the backend
        lookup), provided computing them calls no module of the class."""
        changed = True
        while changed:
            changed = False
            for position, statement in enumerate(body):
                targets = _all_targets(statement)
                value = _assigned_value(statement)
                if not targets or value is None or _calls_self(value):
                    continue
                later = (
                    set().union(*(names_in(s) for s in body[position + 1 :]))
                    if position + 1 < len(body)
                    else set()
                )
                if not targets & later:
                    self.context.record(
                        RULE, where, statement, "", "read only by what the engine layer replaced"
                    )
                    body = body[:position] + body[position + 1 :]
                    changed = True
                    break
        return body

    def _init(self, init: cst.FunctionDef, mla: LatentAttention) -> cst.FunctionDef:
        where = f"{self.current_class}.__init__"
        kinds = {
            mla.up: "ColumnParallelLinear",
            mla.output: "RowParallelLinear",
            mla.down: "ReplicatedLinear",
        }
        kinds.update({attr: "ColumnParallelLinear" for attr in mla.query})
        kinds.update({attr: "ReplicatedLinear" for attr in mla.query_inner if attr not in kinds})
        calls = linear_calls(init)
        for attr in sorted(set(calls) - set(kinds)):
            self.context.flag(
                RULE, where, f"`self.{attr}` has no role in the latent attention to shard it by"
            )
        swaps = {}
        for attr, attr_calls in calls.items():
            if attr in kinds:
                self.context.need("engine.layers", kinds[attr])
                for call in attr_calls:
                    swaps[call] = call.with_changes(func=cst.Name(kinds[attr]))
        init = init.visit(_SwapCalls(swaps))
        for call, new in swaps.items():
            self.context.record(RULE, where, call, new, SHARDING_REASONS[new.func.value])
        config = function_params(init)[1]
        added = [
            f"self.rotary_emb = get_rope({config}, {mla.rope}, is_neox_style={mla.neox_style})",
            f"self.attn = {MLA_LAYER}({mla.num_heads}, {mla.nope}, {mla.rope}, {mla.value}, {mla.rank}, "
            f"{mla.scale}, self.{mla.up})",
        ]
        statements = [cst.parse_statement(code) for code in added]
        for statement in statements:
            self.context.record(RULE, where, "", statement, "the engine's rotary and latent attention")
        return init.with_changes(body=init.body.with_changes(body=[*init.body.body, *statements]))


class _SwapCalls(cst.CSTTransformer):
    def __init__(self, swaps: dict[cst.Call, cst.Call]) -> None:
        self.swaps = swaps

    def leave_Call(self, original: cst.Call, updated: cst.Call) -> cst.BaseExpression:
        new = self.swaps.get(original)
        return updated.with_changes(func=new.func) if new is not None else updated


def _single_target(statement: cst.CSTNode) -> str | None:
    if (
        isinstance(statement, cst.SimpleStatementLine)
        and isinstance(statement.body[0], cst.Assign)
        and len(statement.body[0].targets) == 1
        and isinstance(statement.body[0].targets[0].target, cst.Name)
    ):
        return statement.body[0].targets[0].target.value
    return None


def _all_targets(statement: cst.CSTNode) -> set[str]:
    return set(statement_targets(statement))


def _assigned_value(statement: cst.CSTNode) -> cst.BaseExpression | None:
    if isinstance(statement, cst.SimpleStatementLine) and isinstance(
        statement.body[0], (cst.Assign, cst.AnnAssign)
    ):
        return statement.body[0].value
    return None


def _relayouts(node: cst.BaseExpression) -> bool:
    return (
        isinstance(node, cst.Call)
        and isinstance(node.func, cst.Attribute)
        and node.func.attr.value in RELAYOUTS
    )


def _strip(node: cst.BaseExpression) -> cst.BaseExpression:
    while _relayouts(node):
        node = node.func.value
    return node


def _calls_self(node: cst.BaseExpression) -> bool:
    found = []

    class _Find(cst.CSTVisitor):
        def visit_Call(self, call: cst.Call) -> None:
            if self_attribute(call.func) is not None:
                found.append(call)

    node.visit(_Find())
    return bool(found)
