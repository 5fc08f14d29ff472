"""Fuses separate q, k and v projections into one `QKVParallelLinear` (one GEMM, sharded by head).

In `__init__` the three `nn.Linear` assignments become one `self.qkv_proj = QKVParallelLinear(
hidden, head_dim, num_heads, num_kv_heads, bias=...)`. In `forward` the fused projection runs once,
before the first statement that used any of the three, and is split into this rank's q, k and v;
each `self.q_proj(x)` (etc.) becomes the matching piece. `load_weights` learns the checkpoint
names of the three and their shard ids.
"""

from __future__ import annotations

import libcst as cst

from porter.analysis.attention import AttentionInfo
from porter.analysis.cst_utils import code_of, names_in, self_attribute
from porter.rewrites.base import ClassScopedTransformer, PortContext, Rewrite

FUSED = "qkv_proj"


class FuseQKV(Rewrite):
    name = "fuse-qkv"

    def apply(self, module: cst.Module, context: PortContext) -> cst.Module:
        for info in context.plan.attention.values():
            if len({info.query, info.key, info.value}) == 3:
                for attr, shard in ((info.query, "q"), (info.key, "k"), (info.value, "v")):
                    context.plan.fused.append((FUSED, attr, shard))
        return module.visit(_Transformer(context))


class _Transformer(ClassScopedTransformer):
    def __init__(self, context: PortContext) -> None:
        super().__init__(context)
        self.inserted = False
        self.pieces: dict[str, str] = {}

    @property
    def info(self) -> AttentionInfo | None:
        info = self.context.plan.attention.get(self.current_class or "")
        return info if info is not None and len({info.query, info.key, info.value}) == 3 else None

    def visit_FunctionDef(self, node: cst.FunctionDef) -> bool:
        super().visit_FunctionDef(node)
        if self.info is not None and node.name.value == "forward":
            used = names_in(node)
            self.pieces = {}
            for attr, base in ((self.info.query, "q"), (self.info.key, "k"), (self.info.value, "v")):
                name = base
                while name in used:
                    name += "_"
                self.pieces[attr] = name
            self.inserted = False
        return True

    def leave_SimpleStatementLine(self, original: cst.SimpleStatementLine, updated: cst.SimpleStatementLine):
        info = self.info
        if info is None or len(self.function_stack) != 1:
            return updated
        if self.current_function == "__init__":
            return self._init_statement(updated, info)
        if self.current_function != "forward":
            return updated
        replacer = _ReplaceProjections(self.pieces)
        new = updated.visit(replacer)
        if replacer.argument is None or self.inserted:
            return new
        self.inserted = True
        q, k, v = (self.pieces[a] for a in (info.query, info.key, info.value))
        split = cst.parse_statement(
            f"{q}, {k}, {v} = self.{FUSED}({replacer.argument}).split("
            f"[self.{FUSED}.q_size, self.{FUSED}.kv_size, self.{FUSED}.kv_size], dim=-1)"
        )
        self.context.record("fuse-qkv", self.where, "", split, "one GEMM for q, k and v, split into this rank's heads")
        return cst.FlattenSentinel([split, new])

    def _init_statement(self, statement: cst.SimpleStatementLine, info: AttentionInfo):
        if len(statement.body) != 1 or not isinstance(statement.body[0], cst.Assign):
            return statement
        attr = self_attribute(statement.body[0].targets[0].target)
        if attr not in (info.query, info.key, info.value):
            return statement
        calls = {a: self.context.index.classes[info.name].init_calls[a] for a in (info.query, info.key, info.value)}
        first = next(a for a in self.context.index.classes[info.name].init_calls if a in calls)
        if attr != first:
            return cst.RemovalSentinel.REMOVE
        biases = {code_of(linear_bias(c)) for c in calls.values()}
        if len(biases) != 1:
            self.context.flag("fuse-qkv", self.where, f"q/k/v projections disagree on bias: {sorted(biases)}")
        query = calls[info.query]
        hidden = code_of(query.args[0].value)
        new = cst.parse_statement(
            f"self.{FUSED} = QKVParallelLinear({hidden}, {info.head_dim}, {info.num_heads}, {info.num_kv_heads}, "
            f"bias={code_of(linear_bias(query))})"
        )
        self.context.need("engine.layers", "QKVParallelLinear")
        self.context.record("fuse-qkv", self.where, ", ".join(calls), new, "q, k and v fused, column-parallel by head")
        return new


def linear_bias(call: cst.Call) -> cst.BaseExpression:
    """The bias argument of `nn.Linear(in, out, bias)`, by keyword or position (default True)."""
    for arg in call.args:
        if arg.keyword is not None and arg.keyword.value == "bias":
            return arg.value
    if len(call.args) >= 3 and call.args[2].keyword is None:
        return call.args[2].value
    return cst.Name("True")


class _ReplaceProjections(cst.CSTTransformer):
    def __init__(self, pieces: dict[str, str]) -> None:
        self.pieces, self.argument = pieces, None

    def leave_Call(self, original: cst.Call, updated: cst.Call) -> cst.BaseExpression:
        attr = self_attribute(updated.func)
        if attr in self.pieces and updated.args:
            self.argument = code_of(updated.args[0].value)
            return cst.Name(self.pieces[attr])
        return updated
