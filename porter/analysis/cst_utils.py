"""Small libcst helpers shared by analysis and rewrites."""

from __future__ import annotations

import re

import libcst as cst
import libcst.matchers as m


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


def names_in(node: cst.CSTNode) -> set[str]:
    """Every bare name read or written inside `node`."""
    found: set[str] = set()

    class _Collect(cst.CSTVisitor):
        def visit_Name(self, name: cst.Name) -> None:
            found.add(name.value)

        def visit_Attribute(self, attribute: cst.Attribute) -> bool:
            attribute.value.visit(self)
            return False  # the attribute's own name is not a variable

        def visit_Arg(self, arg: cst.Arg) -> bool:
            arg.value.visit(self)
            return False  # a keyword's name is not a variable

    node.visit(_Collect())
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
    return {
        name for line in m.findall(statement, m.SimpleStatementLine()) for name in statement_targets(line)
    }


def calls_in(node: cst.CSTNode) -> list[cst.Call]:
    """Every call inside `node`, outermost first."""
    calls: list[cst.Call] = []

    class _Collect(cst.CSTVisitor):
        def visit_Call(self, call: cst.Call) -> None:
            calls.append(call)

    node.visit(_Collect())
    return calls


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

    init.visit(_Assigns())
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

    node.visit(_Reads())
    return found


_SOFTMAX = re.compile(r"softmax\s*\(", re.IGNORECASE)


def calls_softmax(code: str) -> bool:
    """A softmax in `code`: `F.softmax(x, ...)`, `x.softmax(-1)` or `nn.Softmax(dim=-1)(x)`."""
    return _SOFTMAX.search(code) is not None
