"""Reading projections: the bias a Linear is built with, and the names that hold a fused
projection's output as it came out."""

from __future__ import annotations

import libcst as cst

from porter.analysis.cst_utils import nodes_of, self_attribute, statement_targets


def linear_bias(call: cst.Call) -> cst.BaseExpression:
    """The bias argument of `nn.Linear(in, out, bias)`, by keyword or position (default True)."""
    for arg in call.args:
        if arg.keyword is not None and arg.keyword.value == "bias":
            return arg.value
    if len(call.args) >= 3 and call.args[2].keyword is None:
        return call.args[2].value
    return cst.Name("True")


# Elementwise methods: the fused output stays q|k|v side by side through them (`qkv.clamp(...)`).
ELEMENTWISE_METHODS = {"clamp", "clamp_", "clip", "to", "float", "half", "bfloat16", "contiguous"}


def flat_outputs(forward: cst.FunctionDef, attr: str) -> set[str]:
    """Names that hold `self.<attr>(x)` as it came out (q|k|v side by side): assigned from the call,
    and only ever reassigned elementwise from themselves (`qkv = qkv.clamp(min=-c, max=c)`)."""
    flat, other = set(), set()
    for line in nodes_of(forward, cst.SimpleStatementLine):
        small = line.body[0]
        if not isinstance(small, cst.Assign):
            continue
        for target in statement_targets(line):
            value = small.value
            receiver = (
                value.func.value
                if isinstance(value, cst.Call) and isinstance(value.func, cst.Attribute)
                else None
            )
            if isinstance(value, cst.Call) and self_attribute(value.func) == attr:
                flat.add(target)
            elif (
                isinstance(receiver, cst.Name)
                and receiver.value == target
                and value.func.attr.value in ELEMENTWISE_METHODS
            ):
                continue
            else:
                other.add(target)
    return flat - other
