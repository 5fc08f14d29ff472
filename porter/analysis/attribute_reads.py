"""Which `self.<attribute> = <value>` of a file's `__init__`s nothing reads (read-only analysis).

An attribute is read when a method of its class (or of a class related to it by inheritance in
the file) reads `self.<attribute>`, or when anything in the file reads `.<attribute>` off some
other object (`self.self_attn.head_dim`, `layer.attention_type`, `getattr(x, "name")`). Reads off
an `__init__` parameter (`config.hidden_size`) or an imported module (`torch.float32`) are not
reads of a port's attribute. Only classes built on `nn.Module` alone are considered: a torch base
such as `nn.Embedding` reads attributes (`padding_idx`) from code outside the file.
"""

from __future__ import annotations

import libcst as cst
import torch

from porter.analysis.cst_utils import calls_in, dotted_name, function_params, self_attribute

MODULE_BASES = {"nn.Module", "torch.nn.Module", "Module"}
# What nn.Module itself reads or defines (`training`, `forward`, ...).
MODULE_ATTRIBUTES = frozenset(dir(torch.nn.Module))
# Calls that compute a value and nothing else: an attribute holding their result can go unread.
PURE_CALLS = frozenset(
    {"getattr", "hasattr", "int", "float", "bool", "str", "len", "min", "max", "abs", "round", "isinstance"}
)


def is_pure(expression: cst.CSTNode) -> bool:
    """No call in `expression` but `PURE_CALLS` and `math.*` (nothing built, nothing changed)."""
    names = [dotted_name(call.func) or "" for call in calls_in(expression)]
    return all(name in PURE_CALLS or name.startswith("math.") for name in names)


def module_families(module: cst.Module) -> dict[str, set[str]]:
    """Class -> every class of the file it inherits from or that inherits from it, for classes
    whose bases are nn.Module or such classes of the file."""
    bases = {
        s.name.value: [dotted_name(b.value) or "" for b in s.bases]
        for s in module.body
        if isinstance(s, cst.ClassDef)
    }
    plain: set[str] = set()
    while True:
        more = {
            name
            for name, found in bases.items()
            if name not in plain and found and all(b in MODULE_BASES or b in plain for b in found)
        }
        if not more:
            break
        plain |= more
    families = {name: {name} for name in plain}
    for name in plain:
        for base in bases[name]:
            if base in plain:
                families[name] |= families[base]
                for member in families[name]:
                    families[member] = families[name]
    return families


def attribute_reads(module: cst.Module) -> tuple[dict[str, set[str]], set[str]]:
    """(class -> attributes its methods read off `self`, attributes read off anything else)."""
    imported = {
        (alias.evaluated_alias or alias.evaluated_name).split(".")[0]
        for statement in module.body
        if isinstance(statement, cst.SimpleStatementLine)
        for small in statement.body
        if isinstance(small, (cst.Import, cst.ImportFrom)) and not isinstance(small.names, cst.ImportStar)
        for alias in small.names
    }
    own: dict[str, set[str]] = {}
    other: set[str] = set()
    for statement in module.body:
        if isinstance(statement, cst.ClassDef):
            found = own.setdefault(statement.name.value, set())
            for item in statement.body.body:
                if isinstance(item, cst.FunctionDef):
                    params = set(function_params(item)) - {"self"} if item.name.value == "__init__" else set()
                    item.visit(_Reads(imported | params, found, other))
        else:
            statement.visit(_Reads(imported, set(), other))
    return own, other


class _Reads(cst.CSTVisitor):
    def __init__(self, skipped: set[str], own: set[str], other: set[str]) -> None:
        self.skipped, self.own, self.other = skipped, own, other

    def visit_AssignTarget(self, node: cst.AssignTarget) -> bool:
        if isinstance(node.target, cst.Attribute):
            node.target.value.visit(self)  # `self.x.y = v` reads `self.x`, writes `y`
            return False
        return True

    def visit_AnnAssign(self, node: cst.AnnAssign) -> bool:
        if isinstance(node.target, cst.Attribute):
            node.target.value.visit(self)
            if node.value is not None:
                node.value.visit(self)
            return False
        return True

    def visit_Attribute(self, node: cst.Attribute) -> None:
        if self_attribute(node) is not None:
            self.own.add(node.attr.value)
        elif not (isinstance(node.value, cst.Name) and node.value.value in self.skipped):
            self.other.add(node.attr.value)

    def visit_Call(self, node: cst.Call) -> None:
        if isinstance(node.func, cst.Name) and node.func.value in ("getattr", "hasattr", "setattr"):
            receiver = node.args[0].value if node.args else None
            if isinstance(receiver, cst.Name) and receiver.value in self.skipped:
                return
            if len(node.args) > 1 and isinstance(node.args[1].value, cst.SimpleString):
                self.other.add(node.args[1].value.evaluated_value)


def unread_attributes(module: cst.Module) -> dict[str, set[str]]:
    """Class -> attributes its `__init__` assigns a pure value (`is_pure`) that nothing reads."""
    families = module_families(module)
    own, other = attribute_reads(module)
    found: dict[str, set[str]] = {}
    for statement in module.body:
        if not isinstance(statement, cst.ClassDef) or statement.name.value not in families:
            continue
        read = other.union(*(own.get(member, set()) for member in families[statement.name.value]))
        init = next(
            (i for i in statement.body.body if isinstance(i, cst.FunctionDef) and i.name.value == "__init__"),
            None,
        )
        for assign in _assignments(init) if init else ():
            targets = assign.targets if isinstance(assign, cst.Assign) else [assign]
            attr = self_attribute(targets[0].target) if len(targets) == 1 else None
            if (
                attr
                and attr not in read
                and attr not in MODULE_ATTRIBUTES
                and assign.value is not None
                and is_pure(assign.value)
            ):
                found.setdefault(statement.name.value, set()).add(attr)
    return found


def _assignments(function: cst.FunctionDef) -> list[cst.Assign | cst.AnnAssign]:
    found: list[cst.Assign | cst.AnnAssign] = []

    class _Find(cst.CSTVisitor):
        def visit_Assign(self, node: cst.Assign) -> None:
            found.append(node)

        def visit_AnnAssign(self, node: cst.AnnAssign) -> None:
            found.append(node)

    function.body.visit(_Find())
    return found
