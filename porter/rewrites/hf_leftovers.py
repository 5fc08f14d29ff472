"""What HF's code keeps for its own library and a hand-written engine model would not have.

- Calls of the module's logger (`logger.warning_once("... without passing a `layer_idx` ...")`):
  the engine does not log from inside a model. The logger itself, and its import, go with the
  pruning and import rewrites once nothing calls it.
- `# TODO` / `# FIXME` and `# Copied from ...` comments: notes for HF's own maintenance.
- `self.layers[: self.config.num_hidden_layers]` where `self.layers` holds exactly that many
  layers: the slice is `self.layers`.
- A temporary passed straight on (`outputs = self.model(...)` then `hidden_states = outputs`): the
  value goes to its final name; and no blank line opens a method's body.
- Shapes kept from the batched layout (`input_shape = x.shape[:-1]`, `hidden_shape = (*input_shape,
  -1, D)`) used only to split the last dimension into heads (`.view(hidden_shape)` ->
  `.unflatten(-1, (-1, D))`) and to merge heads back (`.reshape(*input_shape, -1)` -> `.flatten(1)`:
  the engine's hidden states are `[tokens, hidden]`).
"""

from __future__ import annotations

import re

import libcst as cst

from porter.analysis.cst_utils import code_of, dotted_name, names_in, spaced
from porter.rewrites.base import PortContext, Rewrite
from porter.rewrites.batch_shapes import drop_batch_shapes
from porter.rewrites.passed_on import fold_passed_on

MAINTENANCE_COMMENT = re.compile(r"#\s*(TODO|FIXME|Copied from)\b", re.IGNORECASE)
LOGGER_FACTORIES = {"logging.get_logger", "logging.getLogger"}


class DropHFLeftovers(Rewrite):
    name = "hf-leftovers"

    def apply(self, module: cst.Module, context: PortContext) -> cst.Module:
        loggers = {
            target.target.value
            for statement in module.body
            if isinstance(statement, cst.SimpleStatementLine)
            for small in statement.body
            if isinstance(small, cst.Assign)
            and isinstance(small.value, cst.Call)
            and dotted_name(small.value.func) in LOGGER_FACTORIES
            for target in small.targets
            if isinstance(target.target, cst.Name)
        }
        module = module.visit(_Leftovers(loggers, context))
        module = module.visit(_WholeLayerSlices(context))
        return module.with_changes(
            body=[_class_functions(s, context) if isinstance(s, cst.ClassDef) else s for s in module.body]
        )


def _class_functions(statement: cst.ClassDef, context: PortContext) -> cst.ClassDef:
    body = []
    for item in statement.body.body:
        if isinstance(item, cst.FunctionDef):
            where = f"{statement.name.value}.{item.name.value}"
            item = _no_opening_blank(fold_passed_on(drop_batch_shapes(item, context, where), context, where))
        body.append(item)
    return statement.with_changes(body=statement.body.with_changes(body=body))


def _no_opening_blank(function: cst.FunctionDef) -> cst.FunctionDef:
    """No blank line opening the body (where a docstring or the statements before were)."""
    body = list(function.body.body)
    if body and body[0].leading_lines and not any(line.comment for line in body[0].leading_lines):
        body[0] = body[0].with_changes(leading_lines=[])
        return function.with_changes(body=function.body.with_changes(body=body))
    return function


class _Leftovers(cst.CSTTransformer):
    def __init__(self, loggers: set[str], context: PortContext) -> None:
        self.loggers = loggers
        self.context = context

    def leave_EmptyLine(self, original: cst.EmptyLine, updated: cst.EmptyLine):
        if updated.comment is not None and MAINTENANCE_COMMENT.match(updated.comment.value):
            self.context.record(
                "hf-leftovers", "module", updated.comment.value, "", "a note for HF's maintainers"
            )
            return cst.RemoveFromParent()
        return updated

    def leave_TrailingWhitespace(self, original, updated):
        if updated.comment is not None and MAINTENANCE_COMMENT.match(updated.comment.value):
            return updated.with_changes(comment=None, whitespace=cst.SimpleWhitespace(""))
        return updated

    def leave_SimpleStatementLine(self, original, updated):
        kept = [s for s in updated.body if not self._logs(s)]
        if len(kept) == len(updated.body):
            return updated
        self.context.record(
            "hf-leftovers", "module", code_of(original), "", "the engine does not log from a model"
        )
        return updated.with_changes(body=kept) if kept else cst.RemoveFromParent()

    def leave_IndentedBlock(self, original, updated):
        body = [s for s in updated.body if not _empty_if(s)]
        return updated.with_changes(body=body or [cst.SimpleStatementLine([cst.Pass()])])

    def _logs(self, small: cst.BaseSmallStatement) -> bool:
        call = small.value if isinstance(small, cst.Expr) else None
        return (
            isinstance(call, cst.Call)
            and isinstance(call.func, cst.Attribute)
            and isinstance(call.func.value, cst.Name)
            and call.func.value.value in self.loggers
        )


def _empty_if(statement: cst.BaseStatement) -> bool:
    """An `if` (no `else`) whose body is only `pass` and whose test only compares names."""
    return (
        isinstance(statement, cst.If)
        and statement.orelse is None
        and all(
            isinstance(s, cst.SimpleStatementLine) and all(isinstance(x, cst.Pass) for x in s.body)
            for s in statement.body.body
        )
        and not _has_call(statement.test)
    )


def _has_call(node: cst.CSTNode) -> bool:
    found = []

    class _Find(cst.CSTVisitor):
        def visit_Call(self, call: cst.Call) -> None:
            found.append(call)

    node.visit(_Find())
    return bool(found)


class _WholeLayerSlices(cst.CSTTransformer):
    """`self.layers[: self.config.n]` -> `self.layers` where `__init__` built `self.layers` from
    `range(config.n)` (the same count, read off `self.config` or the `config` parameter)."""

    def __init__(self, context: PortContext) -> None:
        self.context = context
        self.counts: dict[str, str] = {}

    def visit_ClassDef(self, node: cst.ClassDef) -> None:
        self.counts = {}
        for item in node.body.body:
            if isinstance(item, cst.FunctionDef) and item.name.value == "__init__":
                item.visit(_LayerCounts(self.counts))

    def leave_Subscript(self, original: cst.Subscript, updated: cst.Subscript) -> cst.BaseExpression:
        attr = dotted_name(updated.value)
        if not attr or not attr.startswith("self.") or attr[5:] not in self.counts or len(updated.slice) != 1:
            return updated
        piece = updated.slice[0].slice
        if not (isinstance(piece, cst.Slice) and piece.lower is None and piece.step is None and piece.upper):
            return updated
        upper = spaced(code_of(piece.upper))
        count = self.counts[attr[5:]]
        if upper not in (count, f"self.{count}"):
            return updated
        self.context.record("hf-leftovers", "module", code_of(original), attr, "the slice holds every layer")
        return updated.value


class _LayerCounts(cst.CSTVisitor):
    """`self.x = nn.ModuleList([... for _ in range(n)])` -> {"x": code of n}."""

    def __init__(self, counts: dict[str, str]) -> None:
        self.counts = counts

    def visit_Assign(self, node: cst.Assign) -> None:
        target = dotted_name(node.targets[0].target) if len(node.targets) == 1 else None
        value = node.value
        if not (target and target.startswith("self.") and isinstance(value, cst.Call) and value.args):
            return
        inner = value.args[0].value
        if isinstance(inner, (cst.ListComp, cst.GeneratorExp)) and inner.for_in.inner_for_in is None:
            loop = inner.for_in.iter
            if isinstance(loop, cst.Call) and dotted_name(loop.func) == "range" and len(loop.args) == 1:
                if names_in(loop.args[0].value) <= {"config"}:
                    self.counts[target[5:]] = spaced(code_of(loop.args[0].value))
