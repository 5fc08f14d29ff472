"""What each expert of a batched experts module computes between its two projections.

Inside the expert loop, the statement reading the stacked gate|up weight makes the projection and the
one reading the down weight consumes the activated tensor; the statements between are the activation.
Two forms are read:
- `gate, up = linear(x, W[e]).chunk(2, dim=-1)`, then `act(gate) * up`: the engine's named gated
  activation (`GatedActivation`, no module to keep; `porter.analysis.experts` checks the product);
- `p = x @ W[e] [+ b[e]]` then statements turning `p` into `h` (a call of one of the class's own methods
  on `p`, or written in the loop): the source's own activation (`OwnActivation`), kept as a module
  whose forward is that code. Its layout is read from how it splits `p`: `p[..., ::2]` and
  `p[..., 1::2]` alternate gate and up rows, `p.chunk(2, dim=-1)` puts the gate rows first.
Anything else is a problem naming it.
"""

from __future__ import annotations

from dataclasses import dataclass

import libcst as cst
import libcst.matchers as m

from porter.analysis.cst_utils import (
    names_in,
    nodes_of,
    self_attribute,
    self_attributes_read,
    single_assignment,
)

CHUNK_IN_TWO = m.Call(func=m.Attribute(attr=m.Name("chunk")), args=[m.Arg(m.Integer("2")), m.ZeroOrMore()])


def _every_other(start: str | None) -> m.Subscript:
    """`x[..., ::2]` (start None) or `x[..., 1::2]`."""
    lower = m.Integer(start) if start else None
    return m.Subscript(
        slice=[
            m.SubscriptElement(m.Index(m.Ellipsis())),
            m.SubscriptElement(m.Slice(lower=lower, upper=None, step=m.Integer("2"))),
        ]
    )


@dataclass(frozen=True, slots=True)
class GatedActivation:
    """`act(gate) * up` on the halves of a `[gate | up]` projection; `act` is the class's ACT2FN entry."""


@dataclass(frozen=True, slots=True)
class OwnActivation:
    """The source's own activation: `forward(self, <parameter>)` running `body`; `attributes` are the
    experts' `__init__` attributes it reads (assigned by `init_statements`, in order, which read the
    `__init__` parameters `init_parameters`)."""

    parameter: str
    parameters: cst.Parameters  # forward's, as the source wrote them
    body: tuple[cst.BaseStatement, ...]
    returns: cst.Annotation | None
    init_statements: tuple[cst.BaseStatement, ...]
    init_parameters: tuple[str, ...]
    layout: str  # "interleaved" or "concatenated"


def _reads(statement: cst.CSTNode, attr: str) -> bool:
    return attr in self_attributes_read(statement)


def _layout(body: cst.CSTNode, parameter: str) -> str | None:
    if m.findall(body, _every_other(None)) and m.findall(body, _every_other("1")):
        return "interleaved"
    if m.findall(body, CHUNK_IN_TWO):
        return "concatenated"
    return None


def _init_statements(init: cst.FunctionDef, attributes: set[str]) -> list[cst.BaseStatement] | str:
    """The `self.x = ...` lines of `__init__` assigning `attributes` (and what those read), in order."""
    wanted, kept = set(attributes), []
    statements = list(init.body.body)
    for _ in range(8):  # attributes assigned from other attributes, a few levels deep
        grown = set(wanted)
        for statement in statements:
            targets = {self_attribute(t.target) for t in nodes_of(statement, cst.AssignTarget)}
            if targets & wanted:
                grown |= self_attributes_read(statement)
        if grown == wanted:
            break
        wanted = grown
    for statement in statements:
        targets = {self_attribute(t.target) for t in nodes_of(statement, cst.AssignTarget)}
        if targets & wanted:
            if not isinstance(statement, cst.SimpleStatementLine) or len(targets) != 1:
                return "an expert activation reading attributes set by compound statements"
            kept.append(statement)
    missing = wanted - {self_attribute(t.target) for s in kept for t in nodes_of(s, cst.AssignTarget)}
    if missing:
        return f"an expert activation reading attributes __init__ does not set ({', '.join(sorted(missing))})"
    return kept


def read_activation(
    loop: cst.For,
    methods: dict[str, cst.FunctionDef],
    gate_up: str,
    down: str,
    learned: set[str],
    module_names: set[str],
) -> GatedActivation | OwnActivation | str:
    """The activation of the expert loop `loop`, or a problem naming what porter cannot read."""
    body = list(loop.body.body)
    first = next((i for i, s in enumerate(body) if _reads(s, gate_up)), None)
    last = next((i for i, s in enumerate(body) if _reads(s, down)), None)
    if first is None or last is None or last <= first:
        return "an expert loop whose gate|up and down projections porter cannot place"
    projection, between = body[first], body[first + 1 : last]
    if m.findall(projection, CHUNK_IN_TWO):
        return GatedActivation()  # `act(gate) * up` is checked by the experts' reader
    projected = single_assignment(projection)
    activated_line = single_assignment(between[-1]) if between else None
    if projected is None or activated_line is None or activated_line[0] not in names_in(body[last]):
        return "an expert activation porter cannot separate from the projections"
    parameter, activated = projected[0], activated_line[0]
    returns, code = None, list(between)
    function_params = cst.Parameters([cst.Param(cst.Name("self")), cst.Param(cst.Name(parameter))])
    call = m.Call(func=m.Attribute(value=m.Name("self")), args=[m.Arg(m.Name(parameter))])
    assigned = between[0].body[0].value if len(between) == 1 else None
    if assigned is not None and m.matches(assigned, call) and self_attribute(assigned.func) in methods:
        method = methods[self_attribute(assigned.func)]
        params = [p.name.value for p in method.params.params]
        if len(params) != 2:
            return f"an expert activation method ({method.name.value}) taking other inputs"
        parameter, returns, code = params[1], method.returns, list(method.body.body)
        function_params = method.params
    else:
        code.append(cst.parse_statement(f"return {activated}"))
    function = cst.FunctionDef(
        name=cst.Name("forward"),
        params=function_params,
        body=cst.IndentedBlock(code),
    )
    assigned_here = {t.target.value for t in m.findall(function, m.AssignTarget(target=m.Name()))}
    assigned_here |= {e.value.value for e in m.findall(function, m.Element(value=m.Name()))}
    free = names_in(function) - assigned_here - module_names - {"forward", "self", parameter}
    free -= {a.attr.value for a in nodes_of(function, cst.Attribute)}
    free -= {a.keyword.value for a in nodes_of(function, cst.Arg) if a.keyword}
    if free:
        return f"an expert activation reading the loop's own names ({', '.join(sorted(free))})"
    attributes = self_attributes_read(function)
    if attributes & learned:
        return f"an expert activation reading learned weights ({', '.join(sorted(attributes & learned))})"
    if any(self_attribute(c.func) for c in nodes_of(function, cst.Call)):
        return "an expert activation calling further methods"
    layout = _layout(function, parameter)
    if layout is None:
        return "an expert activation whose gate and up rows porter cannot tell apart"
    init = methods["__init__"]
    statements = _init_statements(init, attributes)
    if isinstance(statements, str):
        return statements
    init_params = [p.name.value for p in init.params.params][1:]
    read = set().union(*(names_in(s) for s in statements)) if statements else set()
    return OwnActivation(
        parameter,
        function_params,
        tuple(code),
        returns,
        tuple(statements),
        tuple(p for p in init_params if p in read),
        layout,
    )
