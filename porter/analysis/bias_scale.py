"""The factor an expression multiplies a bias by on its way into a mask.

A backbone may fold its ALiBi bias into the attention mask (`mask = torch.masked_fill(alibi /
math.sqrt(head_dim), mask < -1, min)`): the attention then adds `alibi / sqrt(head_dim)` to its
scaled scores, so the slopes PagedAttention applies must carry the same factor. `factor` reads it off
one assignment's value: reshapes and dtype casts keep the values, `torch.masked_fill` and
`torch.where` pass those of their value arguments (the masked positions the engine's causal
attention cuts anyway), `*` and `/` by an expression not reading the bias scale them, and `+` of
something else leaves them. Anything else reading the bias gives UNKNOWN: a port must not guess it.
"""

from __future__ import annotations

import libcst as cst

from porter.analysis.cst_utils import code_of, dotted_name, init_attribute_values, names_in, self_attribute

UNKNOWN = "unknown"  # the bias's values are read in a way whose factor porter cannot decide

# Methods that move or cast a tensor's values without changing them.
KEEPING_METHODS = {
    "reshape", "view", "view_as", "reshape_as", "unsqueeze", "squeeze", "to", "expand", "expand_as",
    "transpose", "permute", "contiguous", "flatten", "unflatten", "float", "half", "bfloat16",
    "type", "type_as", "clone", "detach", "repeat", "masked_fill",
}  # fmt: skip
METADATA = {"dtype", "device", "shape", "size", "dim"}
# torch functions -> the positions of arguments whose values the result keeps where not masked.
VALUE_ARGUMENTS = {"torch.masked_fill": (0,), "torch.where": (1, 2)}

Factor = list[str] | str | None  # terms multiplied together; UNKNOWN; None: the values are not read


def _reads(node: cst.CSTNode, name: str) -> bool:
    return name in names_in(node)


def _one(factors: list[Factor]) -> Factor:
    """The factor several branches agree on; UNKNOWN where they differ."""
    read = [f for f in factors if f is not None]
    if not read:
        return None
    return read[0] if all(f == read[0] for f in read) else UNKNOWN


def factor(node: cst.BaseExpression, name: str) -> Factor:
    """The terms `node` multiplies the values of `name` by (`[]`: unchanged)."""
    if isinstance(node, cst.Name):
        return [] if node.value == name else None
    if not _reads(node, name):
        return None
    if isinstance(node, cst.Attribute):
        return None if node.attr.value in METADATA else UNKNOWN
    if isinstance(node, cst.Subscript):
        return factor(node.value, name)
    if isinstance(node, cst.Comparison):  # a mask: positions, not values
        return None
    if isinstance(node, cst.IfExp):
        return _one([factor(node.body, name), factor(node.orelse, name)])
    if isinstance(node, cst.BinaryOperation):
        return _binary(node, name)
    if isinstance(node, cst.Call):
        return _call(node, name)
    return UNKNOWN


def _binary(node: cst.BinaryOperation, name: str) -> Factor:
    left, right = factor(node.left, name), factor(node.right, name)
    if left is not None and right is not None or UNKNOWN in (left, right):
        return UNKNOWN
    operator = node.operator
    if isinstance(operator, cst.Add):
        return left if left is not None else right
    if isinstance(operator, cst.Subtract) and left is not None:
        return left
    if isinstance(operator, cst.Multiply):
        return [*left, code_of(node.right)] if left is not None else [*right, code_of(node.left)]
    if isinstance(operator, cst.Divide) and left is not None:
        return [*left, f"1 / ({code_of(node.right)})"]
    return UNKNOWN


def _call(node: cst.Call, name: str) -> Factor:
    func = node.func
    if self_attribute(func) is not None or (dotted_name(func) or "").startswith("self."):
        return None  # what a submodule or method returns is its output, not the bias
    qualified = dotted_name(func) or ""
    if qualified in VALUE_ARGUMENTS:
        positional = [a.value for a in node.args if a.keyword is None]
        values = [positional[i] for i in VALUE_ARGUMENTS[qualified] if i < len(positional)]
        return _one([factor(v, name) for v in values])
    if qualified.startswith("torch."):
        return UNKNOWN
    if isinstance(func, cst.Attribute):
        if func.attr.value in METADATA:
            return None
        base = factor(func.value, name)
        if base is None:
            return UNKNOWN if any(factor(a.value, name) is not None for a in node.args) else None
        return base if func.attr.value in KEEPING_METHODS else UNKNOWN
    return None  # what a function makes of its arguments (`checkpoint(layer, h, bias)`) is not the bias


def in_constructor_terms(code: str, init: cst.FunctionDef | None) -> str | None:
    """`code` of a forward, in the terms a constructor taking `config` can evaluate: `self.config`
    becomes `config`, `self.x` the config expression `__init__` assigns it; None where it reads
    anything else."""
    values = init_attribute_values(init)
    unreadable = False

    class _Substitute(cst.CSTTransformer):
        def leave_Attribute(self, original: cst.Attribute, updated: cst.Attribute) -> cst.BaseExpression:
            nonlocal unreadable
            attr = self_attribute(updated)
            if attr is None:
                return updated
            if attr == "config":
                return cst.Name("config")
            value = values.get(attr)
            if value is None or names_in(value) - {"config", "math"}:
                unreadable = True
                return updated
            atom = isinstance(
                value, (cst.Name, cst.Attribute, cst.Subscript, cst.Call, cst.Integer, cst.Float)
            )
            return value if atom else cst.parse_expression(f"({code_of(value)})")

    result = cst.parse_expression(code).visit(_Substitute())
    if unreadable or names_in(result) - {"config", "math"}:
        return None
    return code_of(result)
