"""Attention sinks in an attention core, found by what the core does with a learned per-head value.

A sink is a logit with no value that joins each head's softmax denominator. Cores write it two ways:
- as an extra score column: the module's parameter is concatenated onto the scores (`torch.cat`),
  the softmax taken, and the last column dropped again (`probs[..., :-1]`);
- as a rescaling of the output by `sigmoid(logsumexp(scores) - sink)`, which is the same thing.
`sink_parameters(core)` names the attributes of the core's module used either way; the engine's
PagedAttention takes them as `sinks=`.
"""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cst_utils import names_in, nodes_of, statement_targets


def _owner_attributes(node: cst.CSTNode, owner: str) -> set[str]:
    return {
        attribute.attr.value
        for attribute in m.findall(node, m.Attribute(value=m.Name(owner)))
        if isinstance(attribute, cst.Attribute)
    }


def _drops_last_column(function: cst.FunctionDef) -> bool:
    """A `x[..., :-1]` slice somewhere in `function`."""
    last_dropped = m.SubscriptElement(
        m.Slice(lower=None, upper=m.UnaryOperation(operator=m.Minus(), expression=m.Integer("1")))
    )
    return bool(
        m.findall(function, m.Subscript(slice=[m.SubscriptElement(m.Index(m.Ellipsis())), last_dropped]))
    )


def sink_parameters(function: cst.FunctionDef) -> set[str]:
    """Attributes of the core's module (its first parameter) that act as attention sinks."""
    params = function.params.params
    if not params:
        return set()
    owner = params[0].name.value
    statements = list(nodes_of(function, cst.SimpleStatementLine))
    logsumexp_names = {
        name
        for statement in statements
        if m.findall(statement, m.Call(func=m.Attribute(attr=m.Name("logsumexp")) | m.Name("logsumexp")))
        for name in statement_targets(statement)
    }
    drops_last_column = _drops_last_column(function)
    found: set[str] = set()
    for statement in statements:
        read = _owner_attributes(statement, owner)
        if not read:
            continue
        extra_column = drops_last_column and _reaches_cat(statements, statement, owner)
        lse_scale = bool(m.findall(statement, SIGMOID)) and bool(names_in(statement) & logsumexp_names)
        if extra_column or lse_scale:
            found |= read
    return found


SIGMOID = m.Call(func=m.Attribute(attr=m.Name("sigmoid")) | m.Name("sigmoid"))
CAT = m.Call(func=m.Attribute(attr=m.Name("cat")))


def _reaches_cat(statements: list, statement: cst.CSTNode, owner: str) -> bool:
    """The owner's attribute is concatenated in `statement`, or a name `statement` binds from it is
    concatenated in another."""
    if any(_owner_attributes(call, owner) for call in m.findall(statement, CAT)):
        return True
    bound = set(statement_targets(statement))
    later = statements[statements.index(statement) + 1 :]
    return any(bound & names_in(call) for other in later for call in m.findall(other, CAT))
