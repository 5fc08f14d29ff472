"""A window of a per-position table cut at the query's positions -> a gather by `positions`.

Batched code reads a table indexed by position (a scale per position, kept as an attribute built
with singleton axes around the position axis) for the query's tokens as a window along the
sequence axis, `table[:, key_len - query_len : key_len]`: with a cache in front, the queries are the
last `query_len` of the `key_len` positions. The engine's attention sees the tokens of many
sequences in one flat axis, each at its own position, so the window becomes `table[0, positions]`:
the leading singleton (batch) axes taken away as the batch axis is, the position axis gathered.
Runs before the batch is flattened, while `q.size(1)` still names the sequence axis.
"""

from __future__ import annotations

import libcst as cst

from porter.analysis.cst_utils import code_of, init_attribute_values, nodes_of, self_attribute
from porter.rewrites.base import ClassScopedTransformer, PortContext, Rewrite


class PositionWindows(Rewrite):
    name = "position-windows"

    def apply(self, module: cst.Module, context: PortContext) -> cst.Module:
        if not context.plan.attention:
            return module
        return module.visit(_Transformer(context))


def _length(node: cst.BaseExpression | None) -> tuple[str, int] | None:
    """(tensor, axis) for `t.size(a)`, `t.size()[a]` or `t.shape[a]` with a literal axis."""
    if isinstance(node, cst.Call) and isinstance(node.func, cst.Attribute) and node.func.attr.value == "size":
        tensor, args = node.func.value, node.args
        if len(args) == 1 and isinstance(args[0].value, cst.Integer) and isinstance(tensor, cst.Name):
            return tensor.value, int(args[0].value.value)
        return None
    if (
        isinstance(node, cst.Subscript)
        and len(node.slice) == 1
        and isinstance(node.slice[0].slice, cst.Index)
    ):
        axis = node.slice[0].slice.value
        held = node.value
        if isinstance(held, cst.Call) and not held.args and isinstance(held.func, cst.Attribute):
            held = held.func if held.func.attr.value == "size" else None
        if (
            isinstance(axis, cst.Integer)
            and isinstance(held, cst.Attribute)
            and held.attr.value in ("shape", "size")
            and isinstance(held.value, cst.Name)
        ):
            return held.value.value, int(axis.value)
    return None


class _Transformer(ClassScopedTransformer):
    def __init__(self, context: PortContext) -> None:
        super().__init__(context)
        self.values: dict[str, cst.BaseExpression] = {}  # forward's names bound once -> their value
        self.query_key: tuple[str, str] | None = None
        self.window_names: set[str] = set()  # locals the replaced windows were cut with

    def visit_FunctionDef(self, node: cst.FunctionDef) -> bool:
        super().visit_FunctionDef(node)
        info = self.context.plan.attention.get(self.current_class or "")
        if node.name.value == "forward" and len(self.function_stack) == 1 and info and info.core_args:
            self.query_key = (info.core_args[0], info.core_args[1])
            bound: dict[str, list[cst.BaseExpression]] = {}
            for assign in nodes_of(node, cst.Assign):
                for target in assign.targets:
                    if isinstance(target.target, cst.Name):
                        bound.setdefault(target.target.value, []).append(assign.value)
            self.values = {name: values[0] for name, values in bound.items() if len(values) == 1}
        return True

    def leave_FunctionDef(self, original: cst.FunctionDef, updated: cst.FunctionDef):
        if len(self.function_stack) == 1:
            if self.window_names:
                updated = self._drop_unread(updated)
            self.query_key, self.values, self.window_names = None, {}, set()
        return super().leave_FunctionDef(original, updated)

    def _drop_unread(self, forward: cst.FunctionDef) -> cst.FunctionDef:
        """Drops `start = k.size(1) - q.size(1)` and the like once no window reads them."""
        written = {id(t.target) for a in nodes_of(forward.body, cst.Assign) for t in a.targets}
        read = {n.value for n in nodes_of(forward.body, cst.Name) if id(n) not in written}
        unread = {name for name in self.window_names if name not in read}
        context, where = self.context, self.where

        class _Drop(cst.CSTTransformer):
            def leave_SimpleStatementLine(self, original, updated):
                small = updated.body[0] if len(updated.body) == 1 else None
                if (
                    isinstance(small, cst.Assign)
                    and len(small.targets) == 1
                    and isinstance(small.targets[0].target, cst.Name)
                    and small.targets[0].target.value in unread
                ):
                    context.record("position-windows", where, updated, "", "it only cut the window")
                    return cst.RemovalSentinel.REMOVE
                return updated

        return forward.with_changes(body=forward.body.visit(_Drop()))

    def _resolved(self, node: cst.BaseExpression | None) -> cst.BaseExpression | None:
        for _ in range(3):
            if isinstance(node, cst.Name) and node.value in self.values:
                node = self.values[node.value]
        return node

    def _window_axis(self, element: cst.SubscriptElement) -> int | None:
        """The sequence axis where `element` is `key_len - query_len : key_len` on it."""
        window = element.slice
        if not isinstance(window, cst.Slice) or window.step is not None or self.query_key is None:
            return None
        names = {
            n.value
            for part in (window.lower, window.upper)
            if part is not None
            for n in nodes_of(part, cst.Name)
        }
        query, key = self.query_key
        upper, lower = _length(self._resolved(window.upper)), self._resolved(window.lower)
        if upper is None or upper[0] != key or not isinstance(lower, cst.BinaryOperation):
            return None
        if not isinstance(lower.operator, cst.Subtract):
            return None
        whole, part = _length(self._resolved(lower.left)), _length(self._resolved(lower.right))
        if whole != upper or part is None or part != (query, upper[1]):
            return None
        self.window_names |= names & set(self.values)
        return upper[1]

    def leave_Subscript(self, original: cst.Subscript, updated: cst.Subscript) -> cst.BaseExpression:
        attr = self_attribute(updated.value)
        if attr is None or self.query_key is None:
            return updated
        elements = list(updated.slice)
        found = [(i, axis) for i, e in enumerate(elements) if (axis := self._window_axis(e)) is not None]
        if len(found) != 1:
            return updated
        position, axis = found[0]
        leading = elements[:position]
        if position != axis or not all(_full(e) for e in leading) or not self._singletons(attr, position):
            self.context.flag(
                "position-windows",
                self.where,
                f"`{code_of(updated)}` cuts the query's positions from `self.{attr}`, and porter could not "
                f"tell that the axes before them are singletons to gather by `positions`",
            )
            return updated
        gathered = [cst.SubscriptElement(cst.Index(cst.Integer("0"))) for _ in leading[:1]]
        gathered.append(cst.SubscriptElement(cst.Index(cst.Name("positions"))))
        new = updated.with_changes(slice=[*gathered, *elements[position + 1 :]])
        self.context.record(
            "position-windows",
            self.where,
            updated,
            new,
            "the queries' window of a per-position table is each token's own position",
        )
        return new

    def _singletons(self, attr: str, count: int) -> bool:
        """Whether `__init__` builds `self.<attr>` with `count` new singleton axes in front
        (`table[None, :, None, None]`): exactly one, the batch axis the flat layout drops."""
        info = self.context.index.classes.get(self.current_class or "")
        init = info.methods.get("__init__") if info is not None else None
        value = init_attribute_values(init).get(attr) if init is not None else None
        if count != 1 or not isinstance(value, cst.Subscript) or len(value.slice) <= count:
            return False
        return all(
            isinstance(e.slice, cst.Index)
            and isinstance(e.slice.value, cst.Name)
            and e.slice.value.value == "None"
            for e in value.slice[:count]
        )


def _full(element: cst.SubscriptElement) -> bool:
    """`:`"""
    window = element.slice
    return (
        isinstance(window, cst.Slice)
        and window.lower is None
        and window.upper is None
        and window.step is None
    )
