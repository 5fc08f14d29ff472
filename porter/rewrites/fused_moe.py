"""Batched experts modules -> the engine's `FusedMoE`.

Where a class builds a batched experts module (`porter.analysis.experts`: stacked gate|up and down
weights, an expert loop scattering with `index_add_`), the construction becomes
`FusedMoE(num_experts, top_k, hidden_size, intermediate_size, activation=...)` with the sizes read
from the experts' own `__init__` (its parameters bound to the call's arguments) and `top_k` from
the router built beside it. The call site keeps its arguments `(hidden_states, top_k_index,
top_k_weights)`, which FusedMoE takes in that order, and the experts class goes: every rank holds
its shard of every expert and the layer all-reduces once. Experts whose projections carry biases
build it with `bias=True`. Where the experts compute their own activation between the projections
(`porter.analysis.expert_activation`), the experts class becomes `<Experts>Activation`, a module whose
forward is that code and whose `__init__` keeps the attributes it reads, passed as
`activation=<Experts>Activation(...)` with the `gate_up_layout` its slicing shows. Experts computing
something else stop the port, naming it.
"""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cst_utils import call_name, code_of, init_attribute_values, names_in, self_attribute
from porter.analysis.expert_activation import OwnActivation
from porter.analysis.experts import ExpertsModule, find_experts, top_k_of
from porter.rewrites.base import ClassScopedTransformer, PortContext, Rewrite


class FuseExperts(Rewrite):
    name = "fused-moe"

    def apply(self, module: cst.Module, context: PortContext) -> cst.Module:
        experts, problems = find_experts(context.index)
        for problem in problems:
            context.flag(
                self.name, f"{problem.name}.forward", f"{problem.message} is not computed by FusedMoE"
            )
        if not experts:
            return module
        context.need("engine.layers.moe", "FusedMoE")
        module = module.visit(_Transformer(context, experts))
        body = []
        for statement in module.body:
            if isinstance(statement, cst.ClassDef) and statement.name.value in experts:
                own = experts[statement.name.value].own_activation
                if own is not None:
                    body.append(activation_class(statement, own))
            else:
                body.append(statement)
        return module.with_changes(body=body)


def activation_name(experts: str) -> str:
    return f"{experts}Activation"


def activation_class(experts: cst.ClassDef, own: OwnActivation) -> cst.ClassDef:
    """The experts class reduced to its activation: the attributes it reads, and its code as forward."""
    init = cst.ensure_type(
        cst.parse_statement(
            f"def __init__(self{''.join(', ' + p for p in own.init_parameters)}):\n    super().__init__()\n"
        ),
        cst.FunctionDef,
    )
    init = init.with_changes(body=init.body.with_changes(body=[*init.body.body, *own.init_statements]))
    forward = cst.ensure_type(
        cst.parse_statement(f"def forward(self, {own.parameter}):\n    pass\n"), cst.FunctionDef
    )
    forward = forward.with_changes(
        params=own.parameters, body=forward.body.with_changes(body=list(own.body)), returns=own.returns
    )
    docstring = cst.parse_statement(
        f'"""The activation of {experts.name.value}: an expert\'s gate|up projection -> its gated output."""'
    )
    return experts.with_changes(
        name=cst.Name(activation_name(experts.name.value)),
        decorators=[],
        body=experts.body.with_changes(body=[docstring, init, forward]),
    )


def bind_arguments(function: cst.FunctionDef, call: cst.Call) -> dict[str, cst.BaseExpression]:
    """Each parameter of `function` (after `self`) -> the expression `call` passes it (or its default)."""
    params = list(function.params.params)[1:] + list(function.params.kwonly_params)
    bound = {p.name.value: p.default for p in params if p.default is not None}
    positional = [a.value for a in call.args if not a.keyword and not a.star]
    for param, value in zip(params, positional):
        bound[param.name.value] = value
    bound.update({a.keyword.value: a.value for a in call.args if a.keyword})
    return bound


def substitute(expression: cst.BaseExpression, bound: dict[str, cst.BaseExpression]) -> cst.BaseExpression:
    """`expression` (over a function's parameters) with each parameter name replaced by its argument."""

    class _Substitute(cst.CSTTransformer):
        def leave_Attribute(self, original: cst.Attribute, updated: cst.Attribute) -> cst.Attribute:
            return updated.with_changes(attr=original.attr)  # `x.name` is no parameter

        def leave_Name(self, original: cst.Name, updated: cst.Name) -> cst.BaseExpression:
            return bound.get(original.value, updated)

    return expression.visit(_Substitute())


class _Transformer(ClassScopedTransformer):
    def __init__(self, context: PortContext, experts: dict[str, ExpertsModule]) -> None:
        super().__init__(context)
        self.experts = experts

    @m.call_if_inside(m.FunctionDef(name=m.Name("__init__")))
    def leave_Assign(self, original: cst.Assign, updated: cst.Assign) -> cst.Assign:
        built = call_name(updated.value)
        if built not in self.experts or self_attribute(updated.targets[0].target) is None:
            return updated
        found = self.experts[built]
        experts_init = self.context.index.classes[built].methods["__init__"]
        bound = bind_arguments(experts_init, updated.value)
        top_k = self._top_k()
        arguments = [
            substitute(found.num_experts, bound),
            top_k if top_k is not None else cst.Name("None"),
            substitute(found.hidden_size, bound),
            substitute(found.intermediate_size, bound),
        ]
        if any("self" in names_in(a) for a in arguments):
            self.context.flag(
                "fused-moe", self.where, f"sizes of {built} that depend on the experts' own state"
            )
            return updated
        code = ", ".join(code_of(a) for a in arguments)
        if found.activation is not None:
            code += f", activation={code_of(substitute(found.activation, bound))}"
        if found.transposed:
            code += ", checkpoint_transposed=True"
        own = found.own_activation
        if own is not None:
            passed = [code_of(bound[p]) for p in own.init_parameters if p in bound]
            if len(passed) != len(own.init_parameters):
                self.context.flag(
                    "fused-moe", self.where, f"{built}'s activation reads settings the call leaves out"
                )
                return updated
            code += f", activation={activation_name(built)}({', '.join(passed)})"
            if own.layout != "concatenated":
                code += f", gate_up_layout={own.layout!r}"
        if found.bias:
            code += ", bias=True"
        replacement = updated.with_changes(value=cst.parse_expression(f"FusedMoE({code})"))
        self.context.record(
            "fused-moe",
            self.where,
            original,
            replacement,
            f"{built}'s stacked experts -> one FusedMoE (experts sharded by intermediate size, one all-reduce)",
        )
        if top_k is None:
            self.context.flag("fused-moe", self.where, f"no top-k found in the router built beside {built}")
        return replacement

    def _top_k(self) -> cst.BaseExpression | None:
        """The router's `k`, over this `__init__`'s names: the class built here whose forward takes a top-k."""
        info = self.context.index.classes[self.class_stack[-1]]
        for call in info.init_calls.values():
            router = self.context.index.classes.get(call_name(call) or "")
            if router is None or "forward" not in router.methods or "__init__" not in router.methods:
                continue
            k = top_k_of(router.methods["forward"])
            if k is None:
                continue
            values = init_attribute_values(router.methods["__init__"])
            attr = self_attribute(k)
            resolved = values.get(attr, k) if attr else k
            resolved = substitute(resolved, bind_arguments(router.methods["__init__"], call))
            return None if "self" in names_in(resolved) else resolved
        return None
