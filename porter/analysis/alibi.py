"""ALiBi, read from the source: which forward inputs carry a bias an ALiBi builder made, and the
builder's own head slopes.

A backbone builds the bias once (`alibi = build_alibi_tensor(mask, heads, dtype)`, or through a
method that returns such a call) and passes it down its layers to each attention, under whatever
name each forward gives it (`alibi`, `position_bias`). The engine's paged attention applies ALiBi
from per-head slopes, so those inputs are dropped like HF plumbing. The slopes come from the builder
itself: the statements that compute its `slopes` local (a backward slice), made a function of the
head count, so a model whose slopes follow another order than the engine's formula keeps its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import libcst as cst

from porter.analysis.bias_scale import VALUE_ARGUMENTS, factor, in_constructor_terms
from porter.analysis.cst_utils import (
    call_name,
    code_of,
    dotted_name,
    function_params,
    is_docstring,
    names_bound,
    names_in,
    nodes_of,
    self_attribute,
    statement_targets,
)
from porter.analysis.model_index import ModelIndex

BUILDER_WORD = "alibi"  # a builder is a function or method whose name says it makes an ALiBi bias
SLOPES_WORD = "slope"  # the builder's local holding the per-head slopes


@dataclass(slots=True)
class Builder:
    """Where the backbone builds the bias: the class, its local, the call, and the function."""

    owner: str
    local: str
    call: cst.Call
    function: cst.FunctionDef | None  # the module function that computes it (through a method wrapper)
    arguments: dict[str, str]  # the function's parameters -> what the call chain passes them


@dataclass(slots=True)
class Slopes:
    """The slopes function porter writes into the port, and the call that gives `heads` slopes."""

    name: str
    code: str
    after: str  # the module-level function it is written after
    extra_arguments: str  # `, alibi_bias_max=4` where the call chain passes a non-default value

    def call(self, heads: str) -> str:
        return f"{self.name}({heads}{self.extra_arguments})"


def _builds_alibi(call: cst.Call) -> bool:
    name = (call_name(call) or self_attribute(call.func) or "").rsplit(".", 1)[-1]
    return BUILDER_WORD in name.lower()


def find_builders(index: ModelIndex) -> list[Builder]:
    """Every `x = <ALiBi builder>(...)` in a reachable class's forward."""
    found = []
    for name in index.reachable:
        info = index.classes[name]
        forward = info.methods.get("forward")
        if forward is None:
            continue
        for statement in nodes_of(forward, cst.SimpleStatementLine):
            small = statement.body[0]
            targets = statement_targets(statement)
            if isinstance(small, cst.Assign) and isinstance(small.value, cst.Call) and len(targets) == 1:
                if _builds_alibi(small.value):
                    function, arguments = _resolve(index, info.methods, small.value)
                    found.append(Builder(name, targets[0], small.value, function, arguments))
    return found


@dataclass(slots=True)
class MaskBias:
    """How a bias reaches a forward parameter: the factor it was multiplied by on the way (code a
    constructor taking `config` evaluates; None: unchanged), the configuration test under which it is
    built (None: always), or why either cannot be read (the line)."""

    scale: str | None
    condition: str | None
    problem: str | None = None


def bias_inputs(index: ModelIndex) -> dict[str, set[str]]:
    """Class -> the forward parameters that receive a builder's bias, followed from the backbone's
    local down every submodule call (direct, or through a loop over a ModuleList) that passes it."""
    return {owner: set(params) for owner, params in mask_biases(index).items()}


def mask_biases(index: ModelIndex) -> dict[str, dict[str, MaskBias]]:
    """Class -> forward parameter -> how a builder's bias reaches it (`bias_inputs`, with the
    factor each step multiplies it by and the test the builder runs under)."""
    carrying: dict[str, dict[str, MaskBias]] = {}
    pending = [(b.owner, b.local, _built(index, b)) for b in find_builders(index)]
    seen: dict[tuple[str, str], MaskBias] = {}
    while pending:
        owner, name, how = pending.pop()
        before = seen.get((owner, name))
        if before is not None:
            if before == how or before.problem is not None:
                continue
            how = MaskBias(
                None, None, f"`{name}` of {owner}.forward carries the ALiBi bias scaled in more than one way"
            )
        seen[(owner, name)] = how
        info = index.classes[owner]
        forward = info.methods.get("forward")
        if forward is None:
            continue
        for derived, derived_how in _carried_into(forward, name, how, info.methods.get("__init__")):
            pending.append((owner, derived, derived_how))
        loop_modules = _loop_modules(forward, info.submodules)
        for call in nodes_of(forward, cst.Call):
            attr = self_attribute(call.func)
            child = info.submodules.get(attr) if attr else loop_modules.get(code_of(call.func))
            child_forward = index.classes[child].methods.get("forward") if child in index.classes else None
            if child_forward is None:
                continue
            params = function_params(child_forward)[1:]
            positional = [a for a in call.args if a.keyword is None and not a.star]
            for position, argument in enumerate(positional):
                if code_of(argument.value) == name and position < len(params):
                    carrying.setdefault(child, {})[params[position]] = how
                    pending.append((child, params[position], how))
            for argument in call.args:
                if argument.keyword is not None and code_of(argument.value) == name:
                    carrying.setdefault(child, {})[argument.keyword.value] = how
                    pending.append((child, argument.keyword.value, how))
    return carrying


def _built(index: ModelIndex, builder: Builder) -> MaskBias:
    """The bias as its builder makes it: unscaled, under the `if` test directly around the builder."""
    info = index.classes[builder.owner]
    forward = info.methods["forward"]
    for branch in nodes_of(forward, cst.If):
        lines = [s for s in branch.body.body if isinstance(s, cst.SimpleStatementLine)]
        if any(call is builder.call for s in lines for call in nodes_of(s, cst.Call)):
            test = in_constructor_terms(code_of(branch.test), info.methods.get("__init__"))
            if test is None:
                return MaskBias(
                    None,
                    None,
                    f"the ALiBi bias is built under `if {code_of(branch.test)}:`, not a configuration test",
                )
            return MaskBias(None, test)
    return MaskBias(None, None)


# What a tensor's metadata reads: its dtype, device or sizes carry none of its values.
METADATA_ATTRIBUTES = {"dtype", "device", "shape"}
METADATA_METHODS = {"size", "dim"}


def _carried_into(
    forward: cst.FunctionDef, name: str, how: MaskBias, init: cst.FunctionDef | None
) -> list[tuple[str, MaskBias]]:
    """Locals of `forward` assigned from an expression that reads the values of `name` (`mask =
    padding + bias.unsqueeze(0)`, `mask = bias`, `mask = torch.masked_fill(bias / c, ...)`): the bias
    travels on under their names, multiplied by what the expression multiplies it by. Reads of its
    dtype, device or sizes only (`x.to(bias.dtype)`) carry nothing, nor does what a submodule or
    method returns (`h = self.attn(h, mask=bias)`: its output, not the bias)."""
    found = []
    for assign in nodes_of(forward, cst.Assign):
        runs_self = any(code_of(c.func).startswith("self.") for c in nodes_of(assign.value, cst.Call))
        if runs_self or name not in _value_names(assign.value):
            continue
        targets = [n for t in assign.targets for n in _target_names(t.target) if n != name]
        if targets:
            derived = _scaled(how, factor(assign.value, name), code_of(assign), init)
            found += [(target, derived) for target in targets]
    return found


def _scaled(how: MaskBias, terms, line: str, init: cst.FunctionDef | None) -> MaskBias:
    """`how`, further multiplied by `terms` (read off `line`)."""
    if how.problem is not None:
        return how
    unreadable = MaskBias(
        None,
        how.condition,
        f"porter cannot read the factor `{' '.join(line.split())}` applies to the ALiBi bias",
    )
    if not isinstance(terms, list):
        return unreadable
    if not terms:
        return how
    scale = in_constructor_terms(" * ".join(f"({t})" for t in terms), init)
    if scale is None:
        return unreadable
    return MaskBias(scale if how.scale is None else f"{how.scale} * {scale}", how.condition)


def _target_names(target: cst.BaseExpression) -> list[str]:
    if isinstance(target, cst.Name):
        return [target.value]
    if isinstance(target, (cst.Tuple, cst.List)):
        return [n for e in target.elements for n in _target_names(e.value)]
    return []


def _value_names(node: cst.CSTNode) -> set[str]:
    """Names whose values `node` reads elementwise (metadata reads and function arguments left out)."""
    found: set[str] = set()

    class _Collect(cst.CSTVisitor):
        def visit_Name(self, name: cst.Name) -> None:
            found.add(name.value)

        def visit_Attribute(self, attribute: cst.Attribute) -> bool:
            if attribute.attr.value not in METADATA_ATTRIBUTES:
                attribute.value.visit(self)
            return False

        def visit_Call(self, call: cst.Call) -> bool:
            # A method of the tensor itself keeps its values (`bias.unsqueeze(0)`), and so do the
            # value arguments of `torch.masked_fill`/`torch.where`; what another function makes of
            # its arguments (`checkpoint(layer, h, bias)`) is not the bias.
            func = call.func
            values = VALUE_ARGUMENTS.get(dotted_name(func) or "")
            if values is not None:  # `torch.where(mask, bias, fill)`: the bias's values pass
                positional = [a.value for a in call.args if a.keyword is None]
                for position in values:
                    if position < len(positional):
                        positional[position].visit(self)
            elif isinstance(func, cst.Attribute) and func.attr.value not in METADATA_METHODS:
                func.value.visit(self)
            return False

    node.visit(_Collect())
    return found


def _loop_modules(forward: cst.FunctionDef, submodules: dict[str, str]) -> dict[str, str]:
    """Loop variable -> class, for `for block in self.blocks` and `for i, block in enumerate(...)`."""
    found = {}
    for loop in nodes_of(forward, cst.For):
        iterable, target = loop.iter, loop.target
        if isinstance(iterable, cst.Call) and call_name(iterable) == "enumerate" and iterable.args:
            iterable = iterable.args[0].value
            target = (
                target.elements[1].value
                if isinstance(target, cst.Tuple) and len(target.elements) == 2
                else None
            )
        if isinstance(iterable, cst.Subscript):  # `self.layers[: n]`
            iterable = iterable.value
        attr = self_attribute(iterable)
        if attr in submodules and isinstance(target, cst.Name):
            found[target.value] = submodules[attr]
    return found


def _resolve(
    index: ModelIndex, methods: dict[str, cst.FunctionDef], call: cst.Call
) -> tuple[cst.FunctionDef | None, dict[str, str]]:
    """The module function a builder call reaches (through a method that only returns a call of it)
    and what the chain passes each of its parameters."""
    passed = _arguments(call)
    method = methods.get(self_attribute(call.func) or "")
    if method is not None:
        body = [s for s in method.body.body if not is_docstring(s)]
        only = body[0].body[0] if len(body) == 1 and isinstance(body[0], cst.SimpleStatementLine) else None
        returned = only.value if isinstance(only, cst.Return) else None
        if not isinstance(returned, cst.Call):
            returned = _one_builder_call(method, index)
        if returned is None:
            return None, {}
        in_method = _bind(method, passed, skip_self=True)
        inner = {param: in_method.get(value, value) for param, value in _arguments(returned).items()}
        call, passed = returned, inner
    function = index.functions.get(call_name(call) or "")
    if function is None:
        return None, {}
    return function, _bind(function, passed)


def _one_builder_call(method: cst.FunctionDef, index: ModelIndex) -> cst.Call | None:
    """The call of a module function building the bias in a method that does more than return it
    (caches it, or builds it another way in training): the one ALiBi builder of the file it calls."""
    calls = [c for c in nodes_of(method, cst.Call) if call_name(c) in index.functions and _builds_alibi(c)]
    if len({call_name(c) for c in calls}) != 1:
        return None
    return calls[0]


def _arguments(call: cst.Call) -> dict[str | int, str]:
    """Position or keyword -> the argument's code."""
    result: dict[str | int, str] = {}
    position = 0
    for argument in call.args:
        if argument.star:
            continue
        if argument.keyword is None:
            result[position] = code_of(argument.value)
            position += 1
        else:
            result[argument.keyword.value] = code_of(argument.value)
    return result


def _bind(function: cst.FunctionDef, passed: dict[str | int, str], skip_self: bool = False) -> dict[str, str]:
    """The function's parameters -> the argument given, or the default's code where none is."""
    params = list(function.params.params)[1 if skip_self else 0 :] + list(function.params.kwonly_params)
    bound = {}
    for position, param in enumerate(params):
        name = param.name.value
        if position in passed and param not in function.params.kwonly_params:
            bound[name] = passed[position]
        elif name in passed:
            bound[name] = passed[name]
        elif param.default is not None:
            bound[name] = code_of(param.default)
    return bound


def _is_literal(code: str) -> bool:
    try:
        node = cst.parse_expression(code)
    except cst.ParserSyntaxError:
        return False
    if isinstance(node, cst.UnaryOperation):
        node = node.expression
    return isinstance(node, (cst.Integer, cst.Float))


def derive_slopes(index: ModelIndex) -> Slopes | str | None:
    """The builder's slopes as a function of the head count (None where no builder is found; a
    message saying why where one is found but its slopes cannot be read off)."""
    builders = find_builders(index)
    if not builders:
        return None
    builder = builders[0]
    if builder.function is None or len({id(b.function) for b in builders}) > 1:
        return f"the ALiBi bias built by `{code_of(builder.call)}` is not one module function porter can read"
    function = builder.function
    body = [s for s in function.body.body if not is_docstring(s)]
    defining = [i for i, s in enumerate(body) if _slope_local(names_bound(s))]
    if not defining:
        return f"`{function.name.value}` has no `{SLOPES_WORD}s` local to read the head slopes from"
    last = defining[-1]
    slopes = _slope_local(names_bound(body[last]))
    statements = [s.visit(_DropDeviceArguments()) for s in _backward_slice(body[: last + 1], {slopes})]
    params = {p.name.value: p for p in function.params.params}
    read = set().union(*(names_in(s) for s in statements)) & set(params)
    required = sorted(name for name in read if params[name].default is None)
    if len(required) != 1:
        return (
            f"the head slopes in `{function.name.value}` read {', '.join(required) or 'no parameter'}; "
            "porter derives them from one head count"
        )
    (heads,) = required
    defaults = [name for name in function_params(function) if name in read and name != heads]
    extra = ""
    for name in defaults:
        default = code_of(params[name].default)
        given = builder.arguments.get(name, default)
        if given != default:
            if not _is_literal(given):
                return f"`{function.name.value}` is called with {name}={given}; porter reads slopes at literal values only"
            extra += f", {name}={given}"
    signature = ", ".join([heads, *(f"{n}={code_of(params[n].default)}" for n in defaults)])
    name = f"{function.name.value}_slopes"
    lines = cst.Module(body=statements).code.rstrip("\n").split("\n")
    code = (
        f"def {name}({signature}):\n"
        f'    """The head slopes `{function.name.value}` computes, [{heads}]."""\n'
        + "".join(f"    {line}\n" if line.strip() else "\n" for line in lines)
        + f"    return {slopes}.flatten()\n"
    )
    return Slopes(name, code, function.name.value, extra)


def _slope_local(names: set[str]) -> str | None:
    return next((n for n in sorted(names) if SLOPES_WORD in n.lower()), None)


def _backward_slice(statements: list[cst.BaseStatement], wanted: set[str]) -> list[cst.BaseStatement]:
    """The statements (whole `if` blocks included) that compute `wanted`, in their order."""
    needed, kept = set(wanted), []
    for statement in reversed(statements):
        assigned = names_bound(statement)
        if not assigned & needed:
            continue
        kept.append(statement)
        if isinstance(statement, cst.SimpleStatementLine):  # an unconditional definition
            needed -= assigned
        needed |= names_in(statement) - {"self"}
    return list(reversed(kept))


class _DropDeviceArguments(cst.CSTTransformer):
    """`device=<anything>` goes: the port builds the slopes under the engine's device."""

    def leave_Call(self, original: cst.Call, updated: cst.Call) -> cst.Call:
        args = [a for a in updated.args if not (a.keyword is not None and a.keyword.value == "device")]
        if args and len(args) < len(updated.args):
            args[-1] = args[-1].with_changes(comma=cst.MaybeSentinel.DEFAULT)
        return updated.with_changes(args=args)
