"""The engine's RMSNorm in place of the file's own, and fused with the residual add before it.

`SwapRMSNorm`: every `SourceNorm(size, eps)` whose class `porter.analysis.norms` proved to compute
what a configuration of `engine.layers.RMSNorm` computes becomes that RMSNorm (on CUDA it runs as
one Triton kernel instead of six elementwise ones). The source class then goes with the other
unused code.

`FuseResidualNorm`: in a pre-norm decoder layer the residual add, the new residual and the next
norm are three statements, `x = residual + x; residual = x; x = self.norm(x)`. The engine's
RMSNorm does all three in one pass when handed the residual, so they become
`x, residual = self.norm(x, residual)`. Only that exact sequence is rewritten (either operand order
of the add, any names), and only for attributes built as the engine's RMSNorm.
"""

from __future__ import annotations

import inspect

import libcst as cst

from porter.analysis.cst_utils import call_name, code_of, self_attribute, single_assignment
from porter.analysis.engine_names import ENGINE_NORM
from porter.analysis.norms import RMSNormMatch, find_rms_norms
from porter.rewrites.base import ClassScopedTransformer, PortContext, Rewrite


class SwapRMSNorm(Rewrite):
    name = "rms-norm"

    def apply(self, module: cst.Module, context: PortContext) -> cst.Module:
        matches = find_rms_norms(module)
        if not matches:
            return module
        swap = _SwapCalls(context, matches)
        module = module.visit(swap)
        if ENGINE_NORM in matches and not swap.kept:
            # The file's own class has the engine's name: left in place it would shadow the import.
            body = [
                s for s in module.body if not (isinstance(s, cst.ClassDef) and s.name.value == ENGINE_NORM)
            ]
            context.record(
                "rms-norm", ENGINE_NORM, "class " + ENGINE_NORM, "", "shadows the engine's RMSNorm"
            )
            module = module.with_changes(body=body)
        return module


class _SwapCalls(ClassScopedTransformer):
    def __init__(self, context: PortContext, matches: dict[str, RMSNormMatch]) -> None:
        super().__init__(context)
        self.matches = matches
        self.kept = 0  # constructor calls of a matched class left as they were

    def leave_Call(self, original: cst.Call, updated: cst.Call) -> cst.BaseExpression:
        match = self.matches.get(call_name(updated) or "")
        if match is None or self.current_class in self.matches:
            return updated
        arguments = _bind(updated, match)
        if arguments is None:
            self.kept += 1
            return updated
        size, eps = arguments
        new = cst.parse_expression(f"{ENGINE_NORM}({size}, eps={eps}{match.engine_kwargs()})")
        self.context.need("engine.layers", ENGINE_NORM)
        self.context.record(
            "rms-norm",
            self.where,
            updated,
            new,
            "same arithmetic as the engine's RMSNorm (checked by running both), which has a fused kernel",
        )
        return new


def _bind(call: cst.Call, match: RMSNormMatch) -> tuple[str, str] | None:
    """(size, eps) source text of a constructor call, or None for calls it cannot read."""
    positional = [a for a in call.args if a.keyword is None]
    keywords = {a.keyword.value: a for a in call.args if a.keyword is not None}
    if any(a.star for a in call.args) or set(keywords) - {match.size_param, match.eps_param}:
        return None
    values = [code_of(a.value) for a in positional]
    for position, name in enumerate((match.size_param, match.eps_param)):
        if name in keywords:
            if position < len(values):
                return None
            values.append(code_of(keywords[name].value))
    if len(values) == 1:
        if match.eps_default is inspect.Parameter.empty:
            return None
        values.append(repr(match.eps_default))
    return (values[0], values[1]) if len(values) == 2 else None


class FuseResidualNorm(Rewrite):
    name = "fuse-residual-norm"

    def apply(self, module: cst.Module, context: PortContext) -> cst.Module:
        norms = {
            (name, attr)
            for name, info in context.index.classes.items()
            for attr, calls in info.all_init_calls.items()
            if calls and all(call_name(c) == ENGINE_NORM for c in calls)
        }
        if not norms:
            return module
        return module.visit(_FuseResidual(context, norms))


class _FuseResidual(ClassScopedTransformer):
    def __init__(self, context: PortContext, norms: set[tuple[str, str]]) -> None:
        super().__init__(context)
        self.norms = norms

    def leave_IndentedBlock(self, original, updated: cst.IndentedBlock) -> cst.IndentedBlock:
        if self.current_function != "forward" or self.current_class is None:
            return updated
        body = list(updated.body)
        out: list[cst.BaseStatement] = []
        i = 0
        while i < len(body):
            fused = _fuse(body[i : i + 3], self.current_class, self.norms)
            if fused is None:
                out.append(body[i])
                i += 1
                continue
            self.context.record(
                "fuse-residual-norm",
                self.where,
                "\n".join(code_of(s).strip() for s in body[i : i + 3]),
                fused,
                "the residual add and the norm after it in one kernel",
            )
            comments = [line for s in body[i : i + 3] for line in s.leading_lines]  # keep comments
            out.append(fused.with_changes(leading_lines=comments))
            i += 3
        return updated.with_changes(body=out)


def _fuse(
    statements: list[cst.BaseStatement], owner: str, norms: set[tuple[str, str]]
) -> cst.SimpleStatementLine | None:
    """`x = r + x; r = x; x = self.norm(x)` -> `x, r = self.norm(x, r)`."""
    if len(statements) != 3:
        return None
    add, keep, norm = (single_assignment(s) for s in statements)
    if add is None or keep is None or norm is None:
        return None
    hidden, total = add
    residual, kept = keep
    if not (
        isinstance(total, cst.BinaryOperation)
        and isinstance(total.operator, cst.Add)
        and isinstance(kept, cst.Name)
        and kept.value == hidden
        and residual != hidden
        and norm[0] == hidden
    ):
        return None
    operands = {code_of(total.left).strip(), code_of(total.right).strip()}
    if operands != {hidden, residual}:
        return None
    call = norm[1]
    if not isinstance(call, cst.Call) or len(call.args) != 1 or code_of(call.args[0].value).strip() != hidden:
        return None
    attr = self_attribute(call.func)
    if attr is None or (owner, attr) not in norms:
        return None
    return cst.parse_statement(f"{hidden}, {residual} = self.{attr}({hidden}, {residual})")
