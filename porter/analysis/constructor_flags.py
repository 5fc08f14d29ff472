"""Attributes that hold a constructor argument nobody who matters ever passes.

`self.is_cross_attention = is_cross_attention` with `is_cross_attention=False` in the signature is
always False in the port when every instance the model still calls is built without that
argument; an instance built with it but never called (a cross-attention block behind a config flag
whose branch in forward is gone) does not count.
"""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cst_utils import (
    call_name,
    code_of,
    init_attribute_values,
    nodes_of,
    self_attribute,
    self_attributes_read,
)
from porter.analysis.model_index import ModelIndex

LITERALS = {"False": False, "True": True, "None": None}


def constructor_flags(index: ModelIndex) -> dict[tuple[str, str], bool | None]:
    """(class, attribute) -> the constant value it holds in every instance the model calls."""
    flags: dict[tuple[str, str], bool | None] = {}
    for name in index.reachable:
        info = index.classes[name]
        init = info.methods.get("__init__")
        if init is None:
            continue
        defaults = _literal_defaults(init)
        positions = [p.name.value for p in init.params.params][1:]
        for attr, param in _attributes_from_params(init).items():
            if param not in defaults:
                continue
            builds = list(_called_instances(index, name))
            if builds and all(not _passes(call, param, positions) for call in builds):
                flags[(name, attr)] = defaults[param]
    return flags


def _literal_defaults(init: cst.FunctionDef) -> dict[str, bool | None]:
    found = {}
    for param in (*init.params.params, *init.params.kwonly_params):
        if param.default is not None and code_of(param.default) in LITERALS:
            found[param.name.value] = LITERALS[code_of(param.default)]
    return found


def _attributes_from_params(init: cst.FunctionDef) -> dict[str, str]:
    found: dict[str, str] = {}

    class _Assigns(cst.CSTVisitor):
        def visit_Assign(self, node: cst.Assign) -> None:
            attr = self_attribute(node.targets[0].target)
            if attr is not None and isinstance(node.value, cst.Name):
                found.setdefault(attr, node.value.value)

    init.visit(_Assigns())
    return found


def _called_instances(index: ModelIndex, class_name: str):
    """Calls that build `class_name` and are assigned to an attribute some forward still calls."""
    for owner in index.reachable:
        info = index.classes[owner]
        forward_code = code_of(info.methods["forward"]) if "forward" in info.methods else ""
        for attr, calls in info.all_init_calls.items():
            for call in calls:
                built = call
                if call_name(call) in {"nn.ModuleList", "torch.nn.ModuleList", "ModuleList"} and call.args:
                    element = call.args[0].value
                    built = getattr(element, "elt", None) or built
                if call_name(built) != class_name:
                    continue
                called = (
                    f"self.{attr}(" in forward_code
                    or f"self.{attr}[" in forward_code
                    or f"in self.{attr}" in forward_code
                )
                if called or attr in info.module_lists:
                    yield built


def _passes(call: cst.Call, param: str, positions: list[str]) -> bool:
    positional = [a for a in call.args if a.keyword is None and not a.star]
    if any(a.star for a in call.args):
        return True  # **kwargs could carry it
    if any(a.keyword is not None and a.keyword.value == param for a in call.args):
        return True
    return param in positions and positions.index(param) < len(positional)


def literal_attributes(index: ModelIndex) -> dict[tuple[str, str], bool | None]:
    """(class, attribute) -> the literal `__init__` gives it (`self.model_parallel = False`) where no
    method the forward runs assigns it again: only an API the engine never calls changes it (4.3x's
    `parallelize()`), so in the port it keeps that value."""
    flags: dict[tuple[str, str], bool | None] = {}
    for name in index.reachable:
        info = index.classes[name]
        init = info.methods.get("__init__")
        literals = {
            attr: LITERALS[value.value]
            for attr, value in init_attribute_values(init).items()
            if isinstance(value, cst.Name) and value.value in LITERALS
        }
        if not literals or init is None:
            continue
        assigned_in_init = [self_attribute(t.target) for a in nodes_of(init, cst.Assign) for t in a.targets]
        reassigned = {
            self_attribute(target.target)
            for method in _run_by_forward(info)
            for assign in m.findall(method, m.Assign() | m.AugAssign())
            for target in (assign.targets if isinstance(assign, cst.Assign) else [assign])
        }
        for attr, value in literals.items():
            if attr not in reassigned and assigned_in_init.count(attr) == 1:
                flags[(name, attr)] = value
    return flags


def _run_by_forward(info) -> list[cst.FunctionDef]:
    """`forward` and the methods of the class it calls, directly or through each other."""
    names, pending = set(), ["forward"]
    while pending:
        name = pending.pop()
        if name in names or name not in info.methods:
            continue
        names.add(name)
        pending += [a for a in self_attributes_read(info.methods[name]) if a in info.methods]
    return [info.methods[n] for n in sorted(names)]
