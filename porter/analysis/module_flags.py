"""Module-level flags fixed at import: a name every assignment of which, all at module level, binds
the same literal `True` or `False` (`if torch_npu_found: NPU_ATTN = True else: NPU_ATTN = False`
commented down to `NPU_ATTN = False` on both paths). A test of such a flag inside the model is
decided like a constructor flag."""

from __future__ import annotations

import libcst as cst

from porter.analysis.cst_utils import fast_visit


def module_flags(module: cst.Module) -> dict[str, bool]:
    values: dict[str, set[object]] = {}
    for statement in module.body:
        if isinstance(statement, (cst.ClassDef, cst.FunctionDef)):
            continue
        fast_visit(statement, _Assignments(values))
    nested: dict[str, set[object]] = {}
    for statement in module.body:
        if isinstance(statement, (cst.ClassDef, cst.FunctionDef)):
            fast_visit(statement, _Assignments(nested, declared_only=True))
    return {
        name: next(iter(found))
        for name, found in values.items()
        if len(found) == 1 and isinstance(next(iter(found)), bool) and name not in nested
    }


class _Assignments(cst.CSTVisitor):
    """Every name an assignment, augmented assignment, `for`, `with ... as`, import or walrus binds,
    with the literal bool it binds (or a marker for anything else). With `declared_only`, only
    names a function rebinds through `global`."""

    OTHER = object()

    def __init__(self, values: dict[str, set[object]], declared_only: bool = False) -> None:
        self.values = values
        self.declared_only = declared_only

    def _bind(self, target: cst.BaseExpression, value: object) -> None:
        if isinstance(target, cst.Name):
            self.values.setdefault(target.value, set()).add(value)
        elif isinstance(target, (cst.Tuple, cst.List)):
            for element in target.elements:
                self._bind(element.value, self.OTHER)
        elif isinstance(target, cst.StarredElement):
            self._bind(target.value, self.OTHER)

    def visit_Global(self, node: cst.Global) -> None:
        for item in node.names:
            self.values.setdefault(item.name.value, set()).add(self.OTHER)

    def visit_Assign(self, node: cst.Assign) -> None:
        if self.declared_only:
            return
        literal = _literal_bool(node.value)
        for target in node.targets:
            self._bind(target.target, self.OTHER if literal is None else literal)

    def visit_AnnAssign(self, node: cst.AnnAssign) -> None:
        if not self.declared_only:
            literal = _literal_bool(node.value) if node.value is not None else None
            self._bind(node.target, self.OTHER if literal is None else literal)

    def visit_AugAssign(self, node: cst.AugAssign) -> None:
        if not self.declared_only:
            self._bind(node.target, self.OTHER)

    def visit_For(self, node: cst.For) -> None:
        if not self.declared_only:
            self._bind(node.target, self.OTHER)

    def visit_AsName(self, node: cst.AsName) -> None:
        if not self.declared_only and isinstance(node.name, cst.Name):
            self._bind(node.name, self.OTHER)

    def visit_ImportAlias(self, node: cst.ImportAlias) -> None:
        if not self.declared_only and node.asname is None and isinstance(node.name, cst.Name):
            self._bind(node.name, self.OTHER)

    def visit_NamedExpr(self, node: cst.NamedExpr) -> None:
        if not self.declared_only:
            self._bind(node.target, self.OTHER)


def _literal_bool(value: cst.BaseExpression) -> bool | None:
    if isinstance(value, cst.Name) and value.value in ("True", "False"):
        return value.value == "True"
    return None
