"""Attributes that ask whether an optional attention library is installed (and chosen).

`self._use_flash_attention_2 = is_flash_attn_2_available() and config._attn_implementation == ...`
picks a kernel library the engine never uses: the port runs its own paged attention in place of
either backend, and takes the path that needs no optional package, so such an attribute is False.
"""

from __future__ import annotations

import libcst as cst

from porter.analysis.cst_utils import call_name, init_attribute_values
from porter.analysis.model_index import ModelIndex


def optional_backend_flags(index: ModelIndex) -> dict[tuple[str, str], bool]:
    """(class, attribute) -> False for each attribute that requires an optional library."""
    flags: dict[tuple[str, str], bool] = {}
    for name in index.reachable:
        init = index.classes[name].methods.get("__init__")
        for attr, value in init_attribute_values(init).items():
            if any(asks_availability(operand) for operand in _conjuncts(value)):
                flags[(name, attr)] = False
    return flags


def _conjuncts(node: cst.BaseExpression) -> list[cst.BaseExpression]:
    """The operands of an `a and b and c` chain (the expression itself otherwise)."""
    if isinstance(node, cst.BooleanOperation) and isinstance(node.operator, cst.And):
        return [*_conjuncts(node.left), *_conjuncts(node.right)]
    return [node]


def asks_availability(node: cst.BaseExpression) -> bool:
    """`is_<package>_available()`: transformers' probe for an optional package."""
    name = (call_name(node) or "").rsplit(".", 1)[-1]
    return name.startswith("is_") and name.endswith("_available")
