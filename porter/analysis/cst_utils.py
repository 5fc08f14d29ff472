"""Small libcst helpers shared by analysis and rewrites."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator
from typing import TypeVar

import libcst as cst

T = TypeVar("T", bound=cst.CSTNode)


def dotted_name(node: cst.BaseExpression | None) -> str | None:
    """`a.b.c` for a Name/Attribute chain, else None."""
    if isinstance(node, cst.Name):
        return node.value
    if isinstance(node, cst.Attribute):
        head = dotted_name(node.value)
        return f"{head}.{node.attr.value}" if head else None
    return None


def self_attribute(node: cst.BaseExpression | None) -> str | None:
    """`x` for `self.x`, else None."""
    if isinstance(node, cst.Attribute) and isinstance(node.value, cst.Name) and node.value.value == "self":
        return node.attr.value
    return None


def self_attribute_path(node: cst.BaseExpression | None) -> list[str] | None:
    """`["a", "b"]` for `self.a.b`, else None."""
    name = dotted_name(node)
    if not name or not name.startswith("self."):
        return None
    return name.split(".")[1:]


# The analyses walk every tree many times over; libcst's visitors pay for hooks on every node and
# attribute, so the read-only walks below go through the children directly, in the order a visitor
# meets them (source order), and skip the fields that hold only layout (whitespace, comments,
# parentheses, commas, colons), where no name, call or statement can be.
_LAYOUT_FIELDS = frozenset(
    {
        "colon",
        "comma",
        "dot",
        "empty_lines",
        "equal",
        "first_colon",
        "first_line",
        "footer",
        "header",
        "last_line",
        "lbrace",
        "lbracket",
        "leading_lines",
        "lines_after_decorators",
        "lpar",
        "newline",
        "rbrace",
        "rbracket",
        "rpar",
        "second_colon",
        "semicolon",
        "trailing_comma",
        "trailing_whitespace",
    }
)
_CHILD_FIELDS: dict[type, tuple[str, ...]] = {}


class _FieldOrder(cst.CSTVisitor):
    """Records the fields of one node in the order libcst visits them."""

    def __init__(self, root: cst.CSTNode) -> None:
        self.root = root
        self.fields: list[str] = []

    def on_visit(self, node: cst.CSTNode) -> bool:
        return node is self.root

    def on_visit_attribute(self, node: cst.CSTNode, attribute: str) -> None:
        if node is self.root and attribute not in self.fields:
            self.fields.append(attribute)

    def on_leave(self, original_node: cst.CSTNode) -> None:
        return None

    def on_leave_attribute(self, original_node: cst.CSTNode, attribute: str) -> None:
        return None


def _child_fields(node: cst.CSTNode) -> tuple[str, ...]:
    """The fields of `node`'s type that may hold code, in the order libcst visits them."""
    recorder = _FieldOrder(node)
    node.visit(recorder)
    rest = [f.name for f in dataclasses.fields(node) if f.name not in recorder.fields]
    fields = tuple(
        name
        for name in (*recorder.fields, *rest)
        if name not in _LAYOUT_FIELDS and not name.startswith("whitespace")
    )
    _CHILD_FIELDS[type(node)] = fields
    return fields


def walk(node: cst.CSTNode, enter: Callable[[cst.CSTNode], bool] | None = None) -> Iterator[cst.CSTNode]:
    """`node` and every node inside it, parents before children, in source order (as a visitor or
    `m.findall` meets them), layout left out; `enter(n)` False yields `n` but not its children."""
    stack = [node]
    fields_of = _CHILD_FIELDS
    while stack:
        current = stack.pop()
        yield current
        if enter is not None and not enter(current):
            continue
        fields = fields_of.get(type(current))
        if fields is None:
            fields = _child_fields(current)
        children: list = []
        for name in fields:
            value = getattr(current, name)
            if isinstance(value, cst.CSTNode):
                children.append(value)
            elif isinstance(value, (tuple, list)):
                children.extend(value)
        if children:
            stack.extend(c for c in reversed(children) if isinstance(c, cst.CSTNode))


def nodes_of(node: cst.CSTNode, kind: type[T] | tuple[type, ...]) -> list[T]:
    """Every node of `kind` inside `node` (itself included), in source order: `m.findall(node,
    m.Kind())` without the matcher machinery (`kind` holds code, never layout)."""
    found = []
    stack = [node]
    fields_of = _CHILD_FIELDS
    while stack:
        current = stack.pop()
        if isinstance(current, kind):
            found.append(current)
        fields = fields_of.get(type(current))
        if fields is None:
            fields = _child_fields(current)
        children: list = []
        for name in fields:
            value = getattr(current, name)
            if isinstance(value, cst.CSTNode):
                children.append(value)
            elif isinstance(value, (tuple, list)):
                children.extend(value)
        if children:
            stack.extend(c for c in reversed(children) if isinstance(c, cst.CSTNode))
    return found


def fast_visit(node: cst.CSTNode, visitor: cst.CSTVisitor) -> None:
    """`node.visit(visitor)` for a read-only visitor with `visit_<Type>` hooks only (no leave hooks,
    no hooks on layout), through the same walk as `nodes_of`: each hook meets its nodes in source
    order, and a hook returning False skips that node's children, as libcst does."""
    hooks: dict[type, Callable | None] = {}
    stack = [node]
    fields_of = _CHILD_FIELDS
    while stack:
        current = stack.pop()
        kind = type(current)
        if kind in hooks:
            hook = hooks[kind]
        else:
            hook = hooks[kind] = getattr(visitor, f"visit_{kind.__name__}", None)
        if hook is not None and hook(current) is False:
            continue
        fields = fields_of.get(kind)
        if fields is None:
            fields = _child_fields(current)
        children: list = []
        for name in fields:
            value = getattr(current, name)
            if isinstance(value, cst.CSTNode):
                children.append(value)
            elif isinstance(value, (tuple, list)):
                children.extend(value)
        if children:
            stack.extend(c for c in reversed(children) if isinstance(c, cst.CSTNode))


def _names_enter(node: cst.CSTNode) -> bool:
    return not isinstance(node, (cst.Attribute, cst.Arg))


def names_in(node: cst.CSTNode) -> set[str]:
    """Every bare name read or written inside `node` (not an attribute's own name, nor a keyword's)."""
    found: set[str] = set()
    pending = [node]
    while pending:
        current = pending.pop()
        # `a.b` reads what `a` names; `f(key=v)` reads `v`.
        if isinstance(current, cst.Attribute):
            pending.append(current.value)
            continue
        if isinstance(current, cst.Arg):
            pending.append(current.value)
            continue
        for inner in walk(current, _names_enter):
            if isinstance(inner, cst.Name):
                found.add(inner.value)
            elif inner is not current and isinstance(inner, (cst.Attribute, cst.Arg)):
                pending.append(inner)
    return found


def assigned_names(target: cst.BaseExpression) -> list[str]:
    """Names bound by an assignment target (`a`, `a, b`, `(a, _)`)."""
    if isinstance(target, cst.Name):
        return [target.value]
    if isinstance(target, (cst.Tuple, cst.List)):
        names: list[str] = []
        for element in target.elements:
            names.extend(assigned_names(element.value))
        return names
    if isinstance(target, cst.StarredElement):
        return assigned_names(target.value)
    if isinstance(target, cst.Subscript) and isinstance(target.value, cst.Name):
        return [target.value.value]  # `mapping[key] = ...` updates `mapping`
    return []


def single_assignment(statement: cst.CSTNode) -> tuple[str, cst.BaseExpression] | None:
    """`name = value` alone on its line, as (name, value); None for any other statement."""
    if not isinstance(statement, cst.SimpleStatementLine) or len(statement.body) != 1:
        return None
    node = statement.body[0]
    if (
        not isinstance(node, cst.Assign)
        or len(node.targets) != 1
        or not isinstance(node.targets[0].target, cst.Name)
    ):
        return None
    return node.targets[0].target.value, node.value


def statement_targets(statement: cst.BaseStatement) -> list[str]:
    """Names a simple assignment statement binds (empty for anything else)."""
    if not isinstance(statement, cst.SimpleStatementLine):
        return []
    names: list[str] = []
    for small in statement.body:
        if isinstance(small, cst.Assign):
            for target in small.targets:
                names.extend(assigned_names(target.target))
        elif isinstance(small, (cst.AnnAssign, cst.AugAssign)):
            names.extend(assigned_names(small.target))
    return names


def names_bound(statement: cst.CSTNode) -> set[str]:
    """Names a statement binds by simple assignment, in any block inside it (every branch of an `if`)."""
    return {name for line in nodes_of(statement, cst.SimpleStatementLine) for name in statement_targets(line)}


def calls_in(node: cst.CSTNode) -> list[cst.Call]:
    """Every call inside `node`, outermost first."""
    return nodes_of(node, cst.Call)


def call_name(node: cst.BaseExpression | None) -> str | None:
    """Dotted name of the function a Call calls."""
    return dotted_name(node.func) if isinstance(node, cst.Call) else None


def function_params(function: cst.FunctionDef) -> list[str]:
    params = function.params
    names = [p.name.value for p in (*params.posonly_params, *params.params, *params.kwonly_params)]
    return names


def is_docstring(statement: cst.CSTNode) -> bool:
    """A statement that is only a string literal (a module, class or function docstring)."""
    return (
        isinstance(statement, cst.SimpleStatementLine)
        and isinstance(statement.body[0], cst.Expr)
        and isinstance(statement.body[0].value, (cst.SimpleString, cst.ConcatenatedString))
    )


def code_of(node: cst.CSTNode) -> str:
    return cst.Module(body=[]).code_for_node(node)


def spaced(code: str) -> str:
    """`code` with every run of whitespace made one space: expressions compared by their text."""
    return " ".join(code.split())


class ReplaceProjectionCalls(cst.CSTTransformer):
    """Replaces `self.<attr>(x)` by a name per attribute, remembering the argument `x` it was given
    (how the fusion rewrites swap separate projections for pieces of one fused projection)."""

    def __init__(self, pieces: dict[str, str]) -> None:
        self.pieces = pieces
        self.argument: str | None = None

    def leave_Call(self, original: cst.Call, updated: cst.Call) -> cst.BaseExpression:
        attr = self_attribute(updated.func)
        if attr in self.pieces and updated.args:
            self.argument = code_of(updated.args[0].value)
            return cst.Name(self.pieces[attr])
        return updated


def init_attribute_values(init: cst.FunctionDef | None) -> dict[str, cst.BaseExpression]:
    """`self.<attr> = <value>` in an `__init__`: the first value assigned to each attribute."""
    found: dict[str, cst.BaseExpression] = {}
    if init is None:
        return found

    class _Assigns(cst.CSTVisitor):
        def visit_Assign(self, node: cst.Assign) -> None:
            attr = self_attribute(node.targets[0].target)
            if attr is not None:
                found.setdefault(attr, node.value)

    fast_visit(init, _Assigns())
    return found


def self_attributes_read(node: cst.CSTNode) -> set[str]:
    """`x` of every `self.x` read inside `node` (assignment targets excluded)."""
    found: set[str] = set()

    class _Reads(cst.CSTVisitor):
        def visit_AssignTarget(self, target: cst.AssignTarget) -> bool:
            return False

        def visit_Attribute(self, attribute: cst.Attribute) -> None:
            attr = self_attribute(attribute)
            if attr is not None:
                found.add(attr)

    fast_visit(node, _Reads())
    return found


_SOFTMAX = re.compile(r"softmax\s*\(", re.IGNORECASE)


def calls_softmax(code: str) -> bool:
    """A softmax in `code`: `F.softmax(x, ...)`, `x.softmax(-1)` or `nn.Softmax(dim=-1)(x)`."""
    return _SOFTMAX.search(code) is not None
