"""One gated-activation layer on the fused gate|up projection, in place of chunk, act and multiply.

After fuse-gate-up a gated MLP reads

    gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
    ... self.act_fn(gate) * up ...

with `self.act_fn = ACT2FN[<name>]`. The engine's `get_gated_activation(<name>)` returns a layer
that takes `[gate | up]` and computes `act(gate) * up` in one kernel on CUDA (and through
transformers' own activation otherwise), so the MLP becomes

    gate_up = self.gate_up_proj(x)
    ... self.act_fn(gate_up) ...

Rewritten only where `gate` and `up` are read nowhere else and `self.act_fn` is used only there.
"""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cst_utils import code_of, names_in, nodes_of, self_attribute
from porter.analysis.engine_names import FUSED_GATE_UP
from porter.rewrites.base import ClassScopedTransformer, PortContext, Rewrite

ENGINE_FACTORY = "get_gated_activation"
_ACTIVATION_TABLES = {"ACT2FN", "ACT2CLS"}


class FuseGatedActivation(Rewrite):
    name = "gated-activation"

    def apply(self, module: cst.Module, context: PortContext) -> cst.Module:
        plans: dict[str, tuple[str, str, str, str]] = {}
        for name, info in context.index.classes.items():
            forward, init = info.methods.get("forward"), info.methods.get("__init__")
            if forward is None or init is None or FUSED_GATE_UP not in info.init_calls:
                continue
            plan = _plan(forward, init)
            if plan is not None:
                plans[name] = plan
        return module.visit(_Transformer(context, plans)) if plans else module


def _activation_attribute(init: cst.FunctionDef) -> dict[str, str]:
    """`self.<attr> = ACT2FN[<key>]` in __init__: attr -> key source."""
    found: dict[str, str] = {}
    for node in nodes_of(init, cst.Assign):
        value = node.value
        attr = self_attribute(node.targets[0].target)
        if (
            attr is not None
            and isinstance(value, cst.Subscript)
            and isinstance(value.value, cst.Name)
            and value.value.value in _ACTIVATION_TABLES
            and len(value.slice) == 1
        ):
            found[attr] = code_of(value.slice[0].slice.value).strip()
    return found


def _plan(forward: cst.FunctionDef, init: cst.FunctionDef) -> tuple[str, str, str, str] | None:
    """(gate name, up name, activation attribute, activation key), if the forward has the pattern."""
    activations = _activation_attribute(init)
    split = None
    for node in nodes_of(forward, cst.Assign):
        target, value = node.targets[0].target, node.value
        if (
            isinstance(target, cst.Tuple)
            and len(target.elements) == 2
            and all(isinstance(e.value, cst.Name) for e in target.elements)
            and f"self.{FUSED_GATE_UP}(" in code_of(value).replace(" ", "")
            and code_of(value).replace(" ", "").endswith(".chunk(2,dim=-1)")
        ):
            split = (target.elements[0].value.value, target.elements[1].value.value)
    if split is None:
        return None
    gate, up = split
    for attr, key in activations.items():
        product = m.BinaryOperation(
            left=m.Call(
                func=m.Attribute(value=m.Name("self"), attr=m.Name(attr)), args=[m.Arg(m.Name(gate))]
            ),
            operator=m.Multiply(),
            right=m.Name(up),
        )
        products = m.findall(forward, product)
        uses = [n for n in m.findall(forward, m.Attribute(value=m.Name("self"), attr=m.Name(attr)))]
        reads = [n for n in m.findall(forward, m.Name(gate) | m.Name(up))]
        # gate and up: once in the split, once in the product; the activation only in the product
        if len(products) == 1 and len(uses) == 1 and len(reads) == 4:
            return gate, up, attr, key
    return None


class _Transformer(ClassScopedTransformer):
    def __init__(self, context: PortContext, plans: dict[str, tuple[str, str, str, str]]) -> None:
        super().__init__(context)
        self.plans = plans
        self.fused_name = "gate_up"

    def visit_FunctionDef(self, node: cst.FunctionDef) -> bool:
        super().visit_FunctionDef(node)
        if node.name.value == "forward" and self.current_class in self.plans:
            used = names_in(node)
            self.fused_name = "gate_up"
            while self.fused_name in used:
                self.fused_name += "_"
        return True

    def leave_Assign(self, original: cst.Assign, updated: cst.Assign) -> cst.Assign:
        plan = self.plans.get(self.current_class or "")
        if plan is None or len(self.function_stack) != 1:
            return updated
        gate, up, attr, key = plan
        target = updated.targets[0].target
        if self.current_function == "__init__" and self_attribute(target) == attr:
            new = updated.with_changes(value=cst.parse_expression(f"{ENGINE_FACTORY}({key})"))
            self.context.need("engine.layers", ENGINE_FACTORY)
            self.context.record(
                "gated-activation", self.where, updated, new, "act(gate) * up as one layer on [gate | up]"
            )
            return new
        if self.current_function == "forward" and isinstance(target, cst.Tuple):
            names = [e.value.value for e in target.elements if isinstance(e.value, cst.Name)]
            if names == [gate, up]:
                value = updated.value
                assert isinstance(value, cst.Call) and isinstance(value.func, cst.Attribute)
                fused = value.func.value  # `self.gate_up_proj(x)` without `.chunk(2, dim=-1)`
                return updated.with_changes(
                    targets=[cst.AssignTarget(cst.Name(self.fused_name))], value=fused
                )
        return updated

    def leave_BinaryOperation(self, original, updated: cst.BinaryOperation) -> cst.BaseExpression:
        plan = self.plans.get(self.current_class or "")
        if plan is None or self.current_function != "forward":
            return updated
        gate, up, attr, _ = plan
        if code_of(updated).replace(" ", "") == f"self.{attr}({gate})*{up}":
            new = cst.parse_expression(f"self.{attr}({self.fused_name})")
            self.context.record("gated-activation", self.where, updated, new, "one kernel on [gate | up]")
            return new
        return updated
