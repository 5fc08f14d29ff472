"""Fuses a gated MLP's two input projections into one `MergedColumnParallelLinear`.

Two Linears of one class with the same input size and output size, both applied to the same
tensor in `forward` (`act(self.gate_proj(x)) * self.up_proj(x)`), become `self.gate_up_proj =
MergedColumnParallelLinear(in, [out, out])`; forward runs it once and chunks it into the two
halves, each rank holding its shard of both. `load_weights` learns the two checkpoint names.
"""

from __future__ import annotations

import libcst as cst

from porter.analysis.cst_utils import ReplaceProjectionCalls, code_of, names_in, self_attribute
from porter.analysis.engine_names import FUSED_GATE_UP
from porter.rewrites.base import ClassScopedTransformer, PortContext, Rewrite


class FuseGateUp(Rewrite):
    name = "fuse-gate-up"

    def apply(self, module: cst.Module, context: PortContext) -> cst.Module:
        pairs: dict[str, tuple[str, str]] = {}
        for name in context.index.reachable:
            info = context.index.classes[name]
            forward = info.methods.get("forward")
            if forward is None or name in context.plan.attention:
                continue
            pair = _gated_pair(info.linears(), forward)
            if pair is not None:
                pairs[name] = pair
                context.plan.fused += [(FUSED_GATE_UP, pair[0], 0), (FUSED_GATE_UP, pair[1], 1)]
        return module.visit(_Transformer(context, pairs)) if pairs else module


def _gated_pair(linears: dict[str, cst.Call], forward: cst.FunctionDef) -> tuple[str, str] | None:
    arguments: dict[str, set[str]] = {}

    class _Calls(cst.CSTVisitor):
        def visit_Call(self, node: cst.Call) -> None:
            attr = self_attribute(node.func)
            if attr in linears and node.args:
                arguments.setdefault(attr, set()).add(code_of(node.args[0].value))

    forward.visit(_Calls())
    order = list(linears)
    for i, first in enumerate(order):
        for second in order[i + 1 :]:
            a, b = linears[first], linears[second]
            same_shape = [code_of(x.value) for x in a.args[:2]] == [code_of(x.value) for x in b.args[:2]]
            same_input = arguments.get(first) == arguments.get(second) and len(arguments.get(first, ())) == 1
            if same_shape and same_input and _gated(forward, first, second):
                return first, second
    return None


def _gated(forward: cst.FunctionDef, first: str, second: str) -> bool:
    """The two projections meet in a product, one of them through an activation: `act(a(x)) * b(x)`
    (directly or through variables), which is what makes them a gated pair and not, say, k and v."""
    code = code_of(forward).replace(" ", "")
    direct = f"(self.{first}(" in code and f"self.{second}(" in code and "*" in code
    return direct and any(word in code for word in ("act", "silu", "gelu", "relu", "sigmoid", "swish"))


class _Transformer(ClassScopedTransformer):
    def __init__(self, context: PortContext, pairs: dict[str, tuple[str, str]]) -> None:
        super().__init__(context)
        self.pairs = pairs
        self.names: tuple[str, str] = ("gate", "up")
        self.inserted = False

    def visit_FunctionDef(self, node: cst.FunctionDef) -> bool:
        super().visit_FunctionDef(node)
        pair = self.pairs.get(self.current_class or "")
        if pair and node.name.value == "forward":
            used = names_in(node)
            names = []
            for base in ("gate", "up"):
                while base in used:
                    base += "_"
                names.append(base)
            self.names, self.inserted = (names[0], names[1]), False
        return True

    def leave_SimpleStatementLine(self, original, updated: cst.SimpleStatementLine):
        pair = self.pairs.get(self.current_class or "")
        if pair is None or len(self.function_stack) != 1:
            return updated
        if (
            self.current_function == "__init__"
            and len(updated.body) == 1
            and isinstance(updated.body[0], cst.Assign)
        ):
            attr = self_attribute(updated.body[0].targets[0].target)
            if attr == pair[1]:
                return cst.RemovalSentinel.REMOVE
            if attr == pair[0]:
                call = updated.body[0].value
                size_in, size_out = code_of(call.args[0].value), code_of(call.args[1].value)
                rest = "".join(f", {code_of(a)}" for a in call.args[2:])
                new = cst.parse_statement(
                    f"self.{FUSED_GATE_UP} = MergedColumnParallelLinear({size_in}, [{size_out}, {size_out}]{rest})"
                )
                self.context.need("engine.layers", "MergedColumnParallelLinear")
                self.context.record(
                    "fuse-gate-up",
                    self.where,
                    f"{pair[0]}, {pair[1]}",
                    new,
                    "one GEMM for both gated-MLP inputs",
                )
                return new
            return updated
        if self.current_function != "forward":
            return updated
        replacer = ReplaceProjectionCalls({pair[0]: self.names[0], pair[1]: self.names[1]})
        new = updated.visit(replacer)
        if replacer.argument is None or self.inserted:
            return new
        self.inserted = True
        split = cst.parse_statement(
            f"{self.names[0]}, {self.names[1]} = self.{FUSED_GATE_UP}({replacer.argument}).chunk(2, dim=-1)"
        )
        self.context.record(
            "fuse-gate-up", self.where, "", split, "run the fused projection once, split its halves"
        )
        return cst.FlattenSentinel([split, new])
