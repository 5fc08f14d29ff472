"""Builds a Linear subclass whose forward is only the affine map as the Linear it is.

Some files subclass `nn.Linear` to spell the same product differently (`x @ self.weight.T` plus
`self.bias` added separately, for rounding in low precision). The engine's parallel linear layers
compute `x W^T + b`; so a subclass with no `__init__` or helper of its own, whose forward reads
only `self.weight` and `self.bias`, is constructed as its base, and the tensor-parallel rewrite
shards it like any Linear. A subclass doing more in forward is a review item wherever it is built,
except a router: a subclass built beside a batched experts module whose forward picks the top k
(`porter.analysis.experts`). Its choice is per token over every expert, so it stays as written, whole
on every rank, as its routing function's input must be.
"""

from __future__ import annotations

import libcst as cst

from porter.analysis.cst_utils import call_name, code_of, dotted_name, self_attribute
from porter.analysis.experts import find_experts, top_k_of
from porter.analysis.model_index import LINEAR_CALLS, ClassInfo, ModelIndex
from porter.rewrites.base import ClassScopedTransformer, PortContext, Rewrite

PRODUCTS = ("@", "matmul(", "F.linear(", "functional.linear(", "mm(")


class PlainLinear(Rewrite):
    name = "plain-linear"

    def apply(self, module: cst.Module, context: PortContext) -> cst.Module:
        subclasses = {
            name: next(b for b in info.bases if b in LINEAR_CALLS)
            for name, info in context.index.classes.items()
            if any(b in LINEAR_CALLS for b in info.bases)
        }
        if not subclasses:
            return module
        plain = {name: base for name, base in subclasses.items() if _is_affine(context.index.classes[name])}
        other = set(subclasses) - set(plain) - _routers(context.index)
        return module.visit(_Transformer(context, plain, other))


def _routers(index: ModelIndex) -> set[str]:
    """Classes built beside a batched experts module whose forward takes a top-k."""
    experts, _ = find_experts(index)
    routers = set()
    for info in index.classes.values():
        built = {call_name(call) for call in info.init_calls.values()}
        if not built & set(experts):
            continue
        for name in built - set(experts):
            router = index.classes.get(name or "")
            if router is not None and "forward" in router.methods and top_k_of(router.methods["forward"]):
                routers.add(router.name)
    return routers


def _is_affine(info: ClassInfo) -> bool:
    """Only a forward, reading only `self.weight` and `self.bias`, with a product in it."""
    forward = info.methods.get("forward")
    if forward is None or set(info.methods) != {"forward"}:
        return False
    attributes: set[str] = set()

    class _Attributes(cst.CSTVisitor):
        def visit_Attribute(self, node: cst.Attribute) -> None:
            attr = self_attribute(node)
            if attr is not None:
                attributes.add(attr)

    forward.visit(_Attributes())
    return (
        "weight" in attributes
        and attributes <= {"weight", "bias"}
        and any(p in code_of(forward) for p in PRODUCTS)
    )


class _Transformer(ClassScopedTransformer):
    def __init__(self, context: PortContext, plain: dict[str, str], other: set[str]) -> None:
        super().__init__(context)
        self.plain, self.other = plain, other

    def leave_Call(self, original: cst.Call, updated: cst.Call) -> cst.BaseExpression:
        name = call_name(updated)
        if name in self.other and self.current_class in self.context.index.reachable:
            self.context.flag("plain-linear", self.where, f"{name} subclasses a Linear with its own forward")
        if name not in self.plain:
            return updated
        new = updated.with_changes(func=cst.parse_expression(self.plain[name]))
        self.context.record(
            "plain-linear",
            self.where,
            dotted_name(updated.func) or name,
            self.plain[name],
            f"{name}.forward computes only x W^T + b",
        )
        return new
