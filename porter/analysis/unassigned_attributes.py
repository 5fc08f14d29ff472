"""Attributes a port reads that nothing assigns any more.

A rewrite that replaces a module (the source's rotary class, say) and misses one of its uses leaves
a `self.rotary_emb(...)` that fails only when the port runs. Every `self.x` a method of a class
reads must be assigned by a method of the class or of a base defined in the same file, or be a
method, a class attribute, or something `nn.Module` provides. Classes with a base defined elsewhere
(other than `nn.Module`) are skipped: what they inherit is unknown here.
"""

from __future__ import annotations

from dataclasses import dataclass

import libcst as cst
import libcst.matchers as m
from torch import nn

from porter.analysis.cst_utils import dotted_name

MODULE_BASES = {"nn.Module", "torch.nn.Module", "Module"}
# Names nn.Module gives every instance (training, parameters(), ...), and the names a registration
# call binds by string.
PROVIDED = set(dir(nn.Module())) | set(vars(nn.Module()))
REGISTERING = {"register_buffer", "register_parameter", "add_module", "register_module"}


@dataclass(frozen=True, slots=True)
class UnassignedRead:
    class_name: str
    method: str
    attribute: str


def unassigned_attribute_reads(port: cst.Module, source: cst.Module) -> list[UnassignedRead]:
    """Each `self.x` the port reads (first place per class and attribute) that nothing in the port
    assigns while the source's class of that name did: an assignment a rewrite took away. (A read
    the source could not satisfy either is the source's own, in a branch that does not run.)"""
    port_classes = _collect(port)
    source_defined: dict[str, set[str]] = {}
    for name, info in _collect(source).items():
        source_defined.setdefault(name, set()).update(info.defined)
    found = []
    for name, info in port_classes.items():
        chain = _local_chain(name, port_classes)
        if chain is None:
            continue
        known = PROVIDED.union(*(port_classes[member].defined for member in chain))
        for method, attribute in info.reads:
            if attribute not in known and attribute in source_defined.get(name, ()):
                found.append(UnassignedRead(name, method, attribute))
    return found


@dataclass(slots=True)
class _ClassInfo:
    bases: list[str]
    defined: set[str]  # methods, class attributes, `self.x` assigned or registered by a method
    reads: list[tuple[str, str]]  # (method, attribute), first read of each attribute


def _collect(module: cst.Module) -> dict[str, _ClassInfo]:
    collector = _Collector()
    module.visit(collector)
    return collector.classes


def _local_chain(name: str, classes: dict[str, _ClassInfo]) -> list[str] | None:
    """The class and its bases, all defined here (or nn.Module); None if a base comes from elsewhere."""
    chain, pending = [], [name]
    while pending:
        current = pending.pop()
        if current in chain:
            continue
        chain.append(current)
        for base in classes[current].bases:
            if base in classes:
                pending.append(base)
            elif base not in MODULE_BASES:
                return None
    return chain


class _Collector(cst.CSTVisitor):
    """One pass: per top-level class, what it defines and the `self.x` its methods read."""

    def __init__(self) -> None:
        self.classes: dict[str, _ClassInfo] = {}
        self.current: _ClassInfo | None = None
        self.method: str | None = None
        self.depth = 0  # classes nested in classes are read as part of the outer one

    def visit_ClassDef(self, node: cst.ClassDef) -> None:
        self.depth += 1
        if self.depth == 1:
            self.current = _ClassInfo([dotted_name(b.value) for b in node.bases], set(), [])
            self.classes[node.name.value] = self.current

    def leave_ClassDef(self, original_node: cst.ClassDef) -> None:
        self.depth -= 1
        if self.depth == 0:
            self.current = None

    def visit_FunctionDef(self, node: cst.FunctionDef) -> None:
        if self.current is not None and self.method is None:
            self.current.defined.add(node.name.value)
            self.method = node.name.value

    def leave_FunctionDef(self, original_node: cst.FunctionDef) -> None:
        if self.current is not None and self.method == original_node.name.value:
            self.method = None

    def visit_Attribute(self, node: cst.Attribute) -> None:
        if self.current is not None and self.method is not None and m.matches(node.value, m.Name("self")):
            if all(attribute != node.attr.value for _, attribute in self.current.reads):
                self.current.reads.append((self.method, node.attr.value))

    def visit_Assign(self, node: cst.Assign) -> None:
        self._bind([t.target for t in node.targets])

    def visit_AnnAssign(self, node: cst.AnnAssign) -> None:
        self._bind([node.target])

    def visit_AugAssign(self, node: cst.AugAssign) -> None:
        self._bind([node.target])

    def visit_For(self, node: cst.For) -> None:
        self._bind([node.target])

    def visit_WithItem(self, node: cst.WithItem) -> None:
        if node.asname is not None:
            self._bind([node.asname.name])

    def visit_Call(self, node: cst.Call) -> None:
        func = node.func
        if (
            self.current is not None
            and m.matches(func, m.Attribute(value=m.Name("self")))
            and func.attr.value in REGISTERING
            and node.args
            and isinstance(node.args[0].value, cst.SimpleString)
        ):
            self.current.defined.add(node.args[0].value.evaluated_value)

    def _bind(self, targets: list[cst.BaseExpression]) -> None:
        if self.current is None:
            return
        for target in targets:
            for element in _flatten(target):
                if self.method is None and isinstance(element, cst.Name):
                    self.current.defined.add(element.value)  # a class attribute
                elif m.matches(element, m.Attribute(value=m.Name("self"))):
                    self.current.defined.add(element.attr.value)


def _flatten(target: cst.BaseExpression) -> list[cst.BaseExpression]:
    if isinstance(target, (cst.Tuple, cst.List)):
        return [leaf for element in target.elements for leaf in _flatten(element.value)]
    if isinstance(target, cst.StarredElement):
        return _flatten(target.value)
    return [target]
