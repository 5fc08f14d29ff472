"""Attributes that ask whether an optional attention library is installed (and chosen).

`self._use_flash_attention_2 = is_flash_attn_2_available() and config._attn_implementation == ...`
picks a kernel library the engine never uses: the port runs its own paged attention in place of
either backend, and takes the path that needs no optional package, so such an attribute is False.
Likewise an attribute that records the backend choice (`self._use_sdpa = config._attn_implementation
== "sdpa"`) holds what it holds for the eager backend, whose attention math porter can read.
"""

from __future__ import annotations

import libcst as cst

from porter.analysis.cst_utils import call_name, init_attribute_values
from porter.analysis.model_index import ModelIndex


def optional_backend_flags(index: ModelIndex) -> dict[tuple[str, str], bool]:
    """(class, attribute) -> the value each attribute that asks for an optional library (False) or
    records the attention-backend choice holds in the port."""
    flags: dict[tuple[str, str], bool] = {}
    for name in index.reachable:
        init = index.classes[name].methods.get("__init__")
        for attr, value in init_attribute_values(init).items():
            if any(asks_availability(operand) for operand in _conjuncts(value)):
                flags[(name, attr)] = False
            elif (choice := eager_backend_choice(value)) is not None:
                flags[(name, attr)] = choice
    return flags


BACKEND_ATTRIBUTE = "_attn_implementation"


def eager_backend_choice(node: cst.BaseExpression) -> bool | None:
    """`<config>._attn_implementation ==/!= "name"` decided as if the backend were "eager"."""
    if not (isinstance(node, cst.Comparison) and len(node.comparisons) == 1):
        return None
    left, comparison = node.left, node.comparisons[0]
    if not (
        isinstance(left, cst.Attribute)
        and left.attr.value == BACKEND_ATTRIBUTE
        and isinstance(comparison.comparator, cst.SimpleString)
    ):
        return None
    is_eager = comparison.comparator.evaluated_value == "eager"
    if isinstance(comparison.operator, cst.Equal):
        return is_eager
    if isinstance(comparison.operator, cst.NotEqual):
        return not is_eager
    return None


def _conjuncts(node: cst.BaseExpression) -> list[cst.BaseExpression]:
    """The operands of an `a and b and c` chain (the expression itself otherwise)."""
    if isinstance(node, cst.BooleanOperation) and isinstance(node.operator, cst.And):
        return [*_conjuncts(node.left), *_conjuncts(node.right)]
    return [node]


def asks_availability(node: cst.BaseExpression) -> bool:
    """`is_<package>_available()`: transformers' probe for an optional package."""
    name = (call_name(node) or "").rsplit(".", 1)[-1]
    return name.startswith("is_") and name.endswith("_available")
