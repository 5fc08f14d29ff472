"""Modules that project hidden states onto the vocabulary, read from what they compute.

Beside `nn.Linear(hidden, vocab)` a file may write its LM head as a class of its own: a module
holding one weight Parameter `[out, in]` built from two constructor arguments, whose forward returns
`F.linear(hidden, weight)`. Such a class is a head when the call that builds it passes the
vocabulary as the output size. Its forward may first normalise each row of the weight
(`F.normalize(self.weight)`); where every path through forward uses the normalised rows (or stores
them back in the parameter before the plain read), the head is a plain projection by a weight
normalised once, at load time.
"""

from __future__ import annotations

from dataclasses import dataclass

import libcst as cst

from porter.analysis.cst_utils import call_name, code_of, function_params, nodes_of, self_attribute

LINEAR_FUNCTIONS = {"F.linear", "nn.functional.linear", "torch.nn.functional.linear", "functional.linear"}
NORMALIZE_FUNCTIONS = {
    "F.normalize",
    "nn.functional.normalize",
    "torch.nn.functional.normalize",
    "functional.normalize",
}
PARAMETER_CALLS = {"nn.Parameter", "torch.nn.Parameter", "Parameter"}
TENSOR_FACTORIES = {"empty", "zeros", "ones", "randn", "rand"}


@dataclass(frozen=True, slots=True)
class HeadModule:
    """A class of the file that computes `hidden @ weight.T` with a `[out, in]` weight of its own."""

    weight: str  # the parameter's attribute
    out_param: str  # the constructor parameter giving the output size
    in_param: str  # the constructor parameter giving the input size
    normalize_rows: bool  # each row of the weight is made unit-length before the product


def head_module(init: cst.FunctionDef | None, forward: cst.FunctionDef | None) -> HeadModule | None:
    """What `__init__`/`forward` of a class make of it: a `HeadModule`, or None for anything else."""
    if init is None or forward is None:
        return None
    params = function_params(init)[1:]
    shapes = {}
    for assign in nodes_of(init, cst.Assign):
        attr = self_attribute(assign.targets[0].target)
        value = assign.value
        if attr is None or call_name(value) not in PARAMETER_CALLS or not value.args:
            continue
        shape = _factory_shape(value.args[0].value)
        if shape is not None and all(name in params for name in shape):
            shapes[attr] = shape
    returned = [r.value for r in nodes_of(forward, cst.Return) if r.value is not None]
    if len(returned) != 1 or call_name(returned[0]) not in LINEAR_FUNCTIONS:
        return None
    call = returned[0]
    if len(call.args) != 2 or any(a.keyword is not None for a in call.args):
        return None
    weight = _weight_read(call.args[1].value, forward, shapes)
    if weight is None:
        return None
    attr, normalized = weight
    out_param, in_param = shapes[attr]
    return HeadModule(attr, out_param, in_param, normalized)


def _factory_shape(node: cst.BaseExpression) -> tuple[str, str] | None:
    """`("a", "b")` for `torch.empty((a, b))` / `torch.zeros(a, b)` of two plain names."""
    name = call_name(node)
    if name is None or name.split(".")[-1] not in TENSOR_FACTORIES:
        return None
    args = [a.value for a in node.args if a.keyword is None]
    if len(args) == 1 and isinstance(args[0], (cst.Tuple, cst.List)):
        args = [e.value for e in args[0].elements]
    if len(args) != 2 or not all(isinstance(a, cst.Name) for a in args):
        return None
    return args[0].value, args[1].value


def _normalized(node: cst.BaseExpression, attr: str) -> bool:
    """`F.normalize(self.<attr>)`: rows made unit-length in the L2 norm (the default p=2, dim=1)."""
    if call_name(node) not in NORMALIZE_FUNCTIONS or len(node.args) != 1 or node.args[0].keyword:
        return False
    return self_attribute(node.args[0].value) == attr


def _unwrapped(node: cst.BaseExpression) -> cst.BaseExpression:
    """The tensor inside `nn.Parameter(x)`."""
    if call_name(node) in PARAMETER_CALLS and len(node.args) == 1:
        return node.args[0].value
    return node


def _weight_read(
    node: cst.BaseExpression, forward: cst.FunctionDef, shapes: dict[str, tuple[str, str]]
) -> tuple[str, bool] | None:
    """(parameter, normalised) for the weight `F.linear` takes: the parameter itself, its
    normalised rows, or a local name every assignment of which is one of those."""
    if self_attribute(node) in shapes:
        values = [node]
    elif isinstance(node, cst.Name):
        values = [
            a.value
            for a in nodes_of(forward, cst.Assign)
            if any(isinstance(t.target, cst.Name) and t.target.value == node.value for t in a.targets)
        ]
    else:
        return None
    attrs = {self_attribute(v) or self_attribute(_call_arg(v)) for v in values}
    if len(attrs) != 1 or None in attrs or next(iter(attrs)) not in shapes:
        return None
    attr = next(iter(attrs))
    normalized = [v for v in values if _normalized(v, attr)]
    plain = [v for v in values if self_attribute(v) == attr]
    if len(normalized) + len(plain) != len(values):
        return None
    if not normalized:
        return attr, False
    # A plain read after some path normalised the rows: it reads them normalised only where forward
    # stored them back (`self.w = nn.Parameter(F.normalize(self.w))`, `self.w.data = ...`) and
    # nothing stores anything else there.
    stores = [
        a.value for a in nodes_of(forward, cst.Assign) if any(_stores_into(t.target, attr) for t in a.targets)
    ]
    if plain and (not stores or not all(_normalized(_unwrapped(v), attr) for v in stores)):
        return None
    return attr, True


def _call_arg(node: cst.BaseExpression) -> cst.BaseExpression | None:
    return node.args[0].value if isinstance(node, cst.Call) and node.args else None


def _stores_into(target: cst.BaseExpression, attr: str) -> bool:
    """`self.<attr> = ...` or `self.<attr>.data = ...`."""
    if self_attribute(target) == attr:
        return True
    return (
        isinstance(target, cst.Attribute)
        and target.attr.value == "data"
        and self_attribute(target.value) == attr
    )


def bound_argument(call: cst.Call, init: cst.FunctionDef, param: str) -> cst.BaseExpression | None:
    """The expression `call` passes for `param` of the constructor `init` (by keyword or position)."""
    for arg in call.args:
        if arg.keyword is not None and arg.keyword.value == param:
            return arg.value
    params = function_params(init)[1:]
    positional = [a.value for a in call.args if a.keyword is None and not a.star]
    position = params.index(param) if param in params else None
    if position is not None and position < len(positional):
        return positional[position]
    return None


def names_vocabulary(node: cst.BaseExpression | None) -> bool:
    """An output size that is the vocabulary (`config.vocab_size`, `config.padded_vocab_size`)."""
    return node is not None and "vocab_size" in code_of(node)
