"""einops patterns (`"b q (h gs d) -> b q h gs d"`) read as axes, for rewrites that change a tensor's rank."""

from __future__ import annotations

import re

import libcst as cst

from porter.analysis.cst_utils import dotted_name

_AXIS = re.compile(r"\([^)]*\)|\S+")
# einops' functions whose second argument is a pattern with `->` (repeat adds axes, reduce drops them).
PATTERN_FUNCTIONS = {"rearrange", "repeat", "reduce"}


def axes(side: str) -> list[str]:
    """The axes of one side of a pattern: names, `(grouped names)`, `...`, `1`."""
    return _AXIS.findall(side)


def without_leading_axis(pattern: str) -> tuple[str, str] | None:
    """(the pattern with its first axis gone on both sides, that axis's name) when the first two axes
    are the same plain names on both sides (`b q ... -> b q ...`: both kept in place, only the trailing
    axes regrouped), else None."""
    if pattern.count("->") != 1:
        return None
    left, right = (axes(side) for side in pattern.split("->"))
    if len(left) < 3 or len(right) < 3 or left[:2] != right[:2]:
        return None
    if not all(re.fullmatch(r"[A-Za-z_]\w*", axis) for axis in left[:2]):
        return None
    return f"{' '.join(left[1:])} -> {' '.join(right[1:])}", left[0]


def einops_names(module: cst.Module) -> dict[str, str]:
    """Local names bound to einops' pattern functions (`from einops import rearrange [as r]`) and to
    the module (`import einops`): name -> what it is (`rearrange`, ... or `einops`)."""
    found: dict[str, str] = {}
    for statement in module.body:
        if not isinstance(statement, cst.SimpleStatementLine):
            continue
        for small in statement.body:
            if isinstance(small, cst.ImportFrom) and dotted_name(small.module) == "einops":
                if isinstance(small.names, cst.ImportStar):
                    continue
                for alias in small.names:
                    name = dotted_name(alias.name)
                    if name in PATTERN_FUNCTIONS:
                        local = alias.asname.name.value if alias.asname else name
                        found[local] = name
            elif isinstance(small, cst.Import):
                for alias in small.names:
                    if dotted_name(alias.name) == "einops":
                        found[alias.asname.name.value if alias.asname else "einops"] = "einops"
    return found


def pattern_function(call: cst.Call, names: dict[str, str]) -> str | None:
    """`rearrange` / `repeat` / `reduce` when `call` calls one of einops' pattern functions."""
    func = dotted_name(call.func)
    if func is None:
        return None
    if func in names and names[func] != "einops":
        return names[func]
    head, _, attr = func.rpartition(".")
    if head and names.get(head) == "einops" and attr in PATTERN_FUNCTIONS:
        return attr
    return None
