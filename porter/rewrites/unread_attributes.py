"""Attributes nothing reads go from `__init__`, then what only they needed.

HF modules keep values for code the port no longer has: `self.layer_idx` for the cache,
`self.is_causal` and `self.num_key_value_groups` for the eager attention, `self.config` once no
method reads the config, `self.vocab_size` for the loss. An attribute assigned a pure value
(`porter.analysis.attribute_reads`) that no method of its class and nothing elsewhere in the file
reads is removed; then the `__init__` locals only it read, and the `__init__` parameters nothing
reads any more, along with the argument every call of the class passes for them
(`unused_init_params`). Repeated until nothing changes: a parameter gone from the attention can
leave the decoder layer's `layer_idx` unread.
"""

from __future__ import annotations

import libcst as cst

from porter.analysis.attribute_reads import is_pure, unread_attributes
from porter.analysis.cst_utils import code_of, self_attribute
from porter.rewrites.base import PortContext, Rewrite
from porter.rewrites.unread_assignments import drop_unread_assignments
from porter.rewrites.unused_init_params import drop_unused_init_params


class DropUnreadAttributes(Rewrite):
    name = "unread-attributes"

    def apply(self, module: cst.Module, context: PortContext) -> cst.Module:
        while True:
            before = len(context.changes)
            unread = unread_attributes(module)
            module = module.with_changes(
                body=[
                    _drop(s, unread.get(s.name.value, set()), context) if isinstance(s, cst.ClassDef) else s
                    for s in module.body
                ]
            )
            module = drop_unused_init_params(module, context)
            if len(context.changes) == before:
                return module


def _drop(statement: cst.ClassDef, unread: set[str], context: PortContext) -> cst.ClassDef:
    name = statement.name.value
    body = []
    for item in statement.body.body:
        if isinstance(item, cst.FunctionDef) and item.name.value == "__init__":
            if unread:
                item = item.visit(_DropAssignments(unread, context, name))
            item = drop_unread_assignments(item, context, f"{name}.__init__")
        body.append(item)
    return statement.with_changes(body=statement.body.with_changes(body=body))


class _DropAssignments(cst.CSTTransformer):
    def __init__(self, unread: set[str], context: PortContext, class_name: str) -> None:
        self.unread = unread
        self.context = context
        self.where = f"{class_name}.__init__"

    def visit_FunctionDef(self, node: cst.FunctionDef) -> bool:
        return node.name.value == "__init__"  # not into functions defined inside it

    def leave_SimpleStatementLine(self, original, updated):
        kept = []
        for small in updated.body:
            targets = (
                small.targets
                if isinstance(small, cst.Assign)
                else [small]
                if isinstance(small, cst.AnnAssign)
                else []
            )
            if len(targets) == 1 and self_attribute(targets[0].target) in self.unread:
                self.context.record("unread-attributes", self.where, code_of(small), "", "nothing reads it")
                continue
            kept.append(small)
        if not kept:
            return cst.RemoveFromParent()
        return updated.with_changes(body=kept)

    def leave_IndentedBlock(self, original, updated):
        # An `if` whose every branch is left with nothing but `pass` decides nothing.
        body = [s for s in updated.body if not _decides_nothing(s)]
        return updated.with_changes(body=body or [cst.SimpleStatementLine([cst.Pass()])])


def _decides_nothing(statement: cst.BaseStatement) -> bool:
    if not isinstance(statement, cst.If):
        return False
    branches = [statement]
    while isinstance(branches[-1].orelse, cst.If):
        branches.append(branches[-1].orelse)
    last = branches[-1].orelse
    blocks = [b.body for b in branches] + ([last.body] if last else [])
    return all(_only_pass(b) for b in blocks) and all(is_pure(b.test) for b in branches)


def _only_pass(block: cst.BaseSuite) -> bool:
    return all(
        isinstance(s, cst.SimpleStatementLine) and all(isinstance(x, cst.Pass) for x in s.body)
        for s in block.body
    )
