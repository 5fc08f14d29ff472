"""Mixture-of-experts modules, found by what they do: read-only facts for the fused-MoE rewrite.

A batched experts module (transformers 5's `*Experts`) is a class whose forward loops over experts
and scatters each expert's output back with `index_add_`, and whose `__init__` holds the experts'
weights as two stacked 3-D parameters: the one with a doubled dim (`2 * intermediate`) is gate|up,
the other down. The dims name the sizes: `[E, 2I, H]` and `[E, H, I]` as `F.linear` reads them,
`[E, H, 2I]` and `[E, I, H]` for weights stored transposed. Two further 2-D parameters, `[E, 2I]` and
`[E, H]`, are the projections' biases. What each expert computes between its projections is read by
`porter.analysis.expert_activation`: `act(gate) * up` on a `[gate | up]` projection split by
`chunk(2)`, or the source's own activation (its gate and up rows interleaved or concatenated);
anything else is a construct the engine's FusedMoE does not compute and is reported instead.

The router is the class built beside the experts whose forward takes a `topk`: its last `topk`'s
`k` is the number of experts per token.
"""

from __future__ import annotations

import builtins
from dataclasses import dataclass

import libcst as cst
import libcst.matchers as m

from porter.analysis.cst_utils import (
    code_of,
    init_attribute_values,
    nodes_of,
    self_attribute,
    self_attributes_read,
)
from porter.analysis.expert_activation import OwnActivation, read_activation
from porter.analysis.model_index import ModelIndex

BIAS_NAMES = ("gate_up_proj_bias", "down_proj_bias")  # FusedMoE's, so checkpoint names carry over

PARAMETER_ALLOCATORS = ("empty", "zeros", "ones", "randn", "rand")


@dataclass(frozen=True, slots=True)
class ExpertsModule:
    """Sizes are expressions over the class's `__init__` parameters (`config.num_local_experts`)."""

    name: str
    gate_up: str  # attribute of the stacked gate|up parameter
    down: str
    num_experts: cst.BaseExpression
    hidden_size: cst.BaseExpression
    intermediate_size: cst.BaseExpression
    activation: cst.BaseExpression | None  # the ACT2FN key
    transposed: bool  # stored [E, in, out] rather than F.linear's [E, out, in]
    bias: bool = False  # both projections carry a per-expert bias
    own_activation: OwnActivation | None = None  # the source's activation, kept as a module


@dataclass(frozen=True, slots=True)
class ExpertsProblem:
    name: str
    message: str


def loops_with_index_add(function: cst.FunctionDef) -> bool:
    """A `for` loop whose body scatters results back with `index_add_`."""
    index_add = m.Call(func=m.Attribute(attr=m.Name("index_add_")))
    return any(m.findall(loop, index_add) for loop in nodes_of(function, cst.For))


def _stacked_parameters(init: cst.FunctionDef, rank: int = 3) -> dict[str, list[cst.BaseExpression]]:
    """`self.x = nn.Parameter(torch.empty(a, b, c))` -> {x: [a, b, c]}, for allocations of `rank` dims."""
    found = {}
    allocation = m.Call(func=m.Attribute(attr=m.OneOf(*(m.Name(n) for n in PARAMETER_ALLOCATORS))))
    for assign in m.findall(init, m.Assign(value=m.Call(func=m.Attribute(attr=m.Name("Parameter"))))):
        attr = self_attribute(assign.targets[0].target)
        inner = assign.value.args[0].value if assign.value.args else None
        if not attr or not m.matches(inner, allocation):
            continue
        dims = [arg.value for arg in inner.args if arg.keyword is None]
        if len(dims) == 1 and isinstance(dims[0], (cst.Tuple, cst.List)):  # torch.empty((E, I, H))
            dims = [element.value for element in dims[0].elements]
        if len(dims) == rank:
            found[attr] = dims
    return found


def holds_stacked_weights(node: cst.ClassDef) -> bool:
    """A class whose `__init__` allocates 3-D parameters (experts' weights stacked on a first dim)."""
    init = next(
        (s for s in node.body.body if isinstance(s, cst.FunctionDef) and s.name.value == "__init__"), None
    )
    return init is not None and bool(_stacked_parameters(init))


def _halved(dim: cst.BaseExpression) -> cst.BaseExpression | None:
    """`x` for the dim `2 * x` (or `x * 2`), else None."""
    if isinstance(dim, cst.BinaryOperation) and isinstance(dim.operator, cst.Multiply):
        for two, other in ((dim.left, dim.right), (dim.right, dim.left)):
            if isinstance(two, cst.Integer) and two.value == "2":
                return other
    return None


def _resolve(expression: cst.BaseExpression, values: dict[str, cst.BaseExpression], depth: int = 0):
    """`expression` with each `self.x` replaced by what `__init__` assigned to it (transitively)."""
    if depth > 8:
        return expression

    class _Inline(cst.CSTTransformer):
        def leave_Attribute(self, original: cst.Attribute, updated: cst.Attribute) -> cst.BaseExpression:
            attr = self_attribute(original)
            if attr in values:
                return _resolve(values[attr], values, depth + 1)
            return updated

    return expression.visit(_Inline())


def _biases(
    init: cst.FunctionDef, forward: cst.FunctionDef, experts: str, doubled_dim: str, hidden: str
) -> dict[str, str]:
    """The 2-D `[E, 2I]` (gate|up) and `[E, H]` (down) parameters forward reads: {attr: which}."""
    found = {}
    for attr, dims in _stacked_parameters(init, rank=2).items():
        if attr not in self_attributes_read(forward) or code_of(dims[0]) != experts:
            continue
        which = {doubled_dim: "gate_up_proj_bias", hidden: "down_proj_bias"}.get(code_of(dims[1]))
        if which:
            found[attr] = which
    return found


def _expert_loop(forward: cst.FunctionDef) -> cst.For:
    index_add = m.Call(func=m.Attribute(attr=m.Name("index_add_")))
    return next(loop for loop in nodes_of(forward, cst.For) if m.findall(loop, index_add))


def read_experts(
    info_node: cst.ClassDef, methods: dict[str, cst.FunctionDef], module_names: frozenset[str] = frozenset()
) -> ExpertsModule | ExpertsProblem | None:
    """The facts of a batched experts class, a problem naming what does not fit, or None."""
    forward, init = methods.get("forward"), methods.get("__init__")
    if forward is None or init is None or not loops_with_index_add(forward):
        return None
    name = info_node.name.value
    stacked = _stacked_parameters(init)
    values = init_attribute_values(init)
    parameters = {
        a for a, v in values.items() if m.matches(v, m.Call(func=m.Attribute(attr=m.Name("Parameter"))))
    }
    if len(stacked) != 2:
        return (
            None if not stacked else ExpertsProblem(name, f"experts holding {len(stacked)} stacked weights")
        )
    doubled = {
        attr: [i for i, dim in enumerate(dims) if _halved(dim) is not None] for attr, dims in stacked.items()
    }
    gate_up = next((attr for attr, where in doubled.items() if where), None)
    if gate_up is None:
        return ExpertsProblem(name, "stacked experts weights with no doubled (gate|up) dim")
    down = next(attr for attr in stacked if attr != gate_up)
    experts, second, third = stacked[gate_up]
    transposed = doubled[gate_up] == [2]
    intermediate = _halved(third if transposed else second)
    hidden = second if transposed else third
    expected_down = [experts, intermediate, hidden] if transposed else [experts, hidden, intermediate]
    if [code_of(d) for d in stacked[down]] != [code_of(d) for d in expected_down]:
        return ExpertsProblem(name, f"expert weights whose shapes do not pair ({gate_up}, {down})")
    biases = _biases(
        init, forward, code_of(experts), code_of(third if transposed else second), code_of(hidden)
    )
    extra = sorted((parameters - set(stacked) - set(biases)) & self_attributes_read(forward))
    if extra:
        return ExpertsProblem(name, f"experts with further learned weights ({', '.join(extra)})")
    if biases and (len(biases) != 2 or any(attr != which for attr, which in biases.items())):
        return ExpertsProblem(
            name, f"expert biases other than one each named {' and '.join(BIAS_NAMES)} ({', '.join(biases)})"
        )
    found = read_activation(_expert_loop(forward), methods, gate_up, down, parameters, set(module_names))
    if isinstance(found, str):
        return ExpertsProblem(name, found)
    own = found if isinstance(found, OwnActivation) else None
    if own is None:
        problem = _check_computation(forward, values)
        if problem:
            return ExpertsProblem(name, problem)
    activation = next(
        (
            value.slice[0].slice.value
            for attr, value in values.items()
            if attr in self_attributes_read(forward) and m.matches(value, m.Subscript(value=m.Name("ACT2FN")))
        ),
        None,
    )
    return ExpertsModule(
        name,
        gate_up,
        down,
        _resolve(experts, values),
        _resolve(hidden, values),
        _resolve(intermediate, values),
        None if activation is None or own else _resolve(activation, values),
        transposed,
        bool(biases),
        own,
    )


def _check_computation(forward: cst.FunctionDef, values: dict[str, cst.BaseExpression]) -> str | None:
    """None when each expert computes `act(gate) * up` from `[gate | up].chunk(2)`, else what differs."""
    chunks = m.findall(
        forward, m.Call(func=m.Attribute(attr=m.Name("chunk")), args=[m.Arg(m.Integer("2")), m.ZeroOrMore()])
    )
    if len(chunks) != 1:
        return "an expert computation other than act(gate) * up on a [gate | up] projection"
    act_calls = [
        call
        for call in m.findall(forward, m.Call(func=m.Attribute(value=m.Name("self"))))
        if m.matches(values.get(self_attribute(call.func)), m.Subscript(value=m.Name("ACT2FN")))
    ]
    products = m.findall(forward, m.BinaryOperation(operator=m.Multiply(), left=m.Call()))
    if len(act_calls) != 1 or not any(product.left.deep_equals(act_calls[0]) for product in products):
        return "an expert activation other than act(gate) * up"
    return None


def find_experts(index: ModelIndex) -> tuple[dict[str, ExpertsModule], list[ExpertsProblem]]:
    """Every reachable batched experts class, and those whose computation FusedMoE does not cover."""
    found, problems = {}, []
    names = frozenset(module_level_names(index.module))
    for name in index.reachable:
        info = index.classes[name]
        result = read_experts(info.node, info.methods, names)
        if isinstance(result, ExpertsModule):
            found[name] = result
        elif isinstance(result, ExpertsProblem):
            problems.append(result)
    return found, problems


def module_level_names(module: cst.Module) -> set[str]:
    """Names a module binds at its top level: imports, classes, functions, assignments."""
    names: set[str] = set()
    for statement in module.body:
        if isinstance(statement, (cst.ClassDef, cst.FunctionDef)):
            names.add(statement.name.value)
        for alias in nodes_of(statement, cst.ImportAlias):
            bound = alias.asname.name if alias.asname else alias.name
            while isinstance(bound, cst.Attribute):
                bound = bound.value
            names.add(bound.value)
        if isinstance(statement, cst.SimpleStatementLine):
            for target in m.findall(statement, m.AssignTarget(target=m.Name())):
                names.add(target.target.value)
    return names | set(dir(builtins))


def top_k_of(router: cst.FunctionDef) -> cst.BaseExpression | None:
    """The `k` of the last `topk` a router's forward takes (or the `top_k=` it passes a helper)."""
    k = None
    for call in nodes_of(router, cst.Call):
        if m.matches(call.func, m.Attribute(attr=m.Name("topk")) | m.Name("topk")):
            keyword = next((a.value for a in call.args if a.keyword and a.keyword.value == "k"), None)
            positional = [a.value for a in call.args if not a.keyword]
            offset = 0 if isinstance(call.func, cst.Attribute) and not _is_module_call(call.func) else 1
            k = keyword if keyword is not None else (positional[offset] if len(positional) > offset else k)
        for arg in call.args:
            if arg.keyword and arg.keyword.value == "top_k" and k is None:
                k = arg.value
    return k


def _is_module_call(func: cst.Attribute) -> bool:
    """`torch.topk(x, k)` (the tensor is the first argument) rather than `x.topk(k)`."""
    return m.matches(func.value, m.Name("torch"))
