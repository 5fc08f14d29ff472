"""Submodules the port never runs go, and the checkpoint tensors they held are skipped on load.

Deciding the engine's branches can leave a module built in `__init__` that nothing calls any
more: a decoder layer's cross-attention (`self.encoder_attn`, its norm), which a decoder-only
model never runs, but whose weights its checkpoint still holds (built always, or only under a
flag like `config.add_cross_attention`). Building it would cost memory for nothing, and
dropping it without a word would make the loader stop on its tensors as unknown, so the assignment
goes and `load_weights` is told to skip the tensors under that attribute.
"""

from __future__ import annotations

import re

import libcst as cst

from porter.analysis.cst_utils import call_name, nodes_of, self_attribute
from porter.rewrites.base import ClassScopedTransformer, PortContext, Rewrite

# What torch's and the engine's layer classes are called by (`nn.Linear`, `ColumnParallelLinear`,
# `VocabParallelEmbedding`, `nn.LayerNorm`, `nn.ModuleList`).
LAYER_SUFFIXES = ("Linear", "Embedding", "Norm", "ModuleList", "Conv1D")


class DropUnusedModules(Rewrite):
    name = "unused-modules"

    def apply(self, module: cst.Module, context: PortContext) -> cst.Module:
        unused: dict[str, set[str]] = {}
        for name in context.index.reachable:
            info = context.index.classes[name]
            init = info.methods.get("__init__")
            if init is None:
                continue
            built = {id(target.target) for assign in nodes_of(init, cst.Assign) for target in assign.targets}
            read = {
                self_attribute(node)
                for method in info.methods.values()
                for node in (n for n in nodes_of(method, cst.Attribute) if self_attribute(n) is not None)
                if id(node) not in built
            }
            for statement in nodes_of(init, cst.Assign):
                attr = self_attribute(statement.targets[0].target) if len(statement.targets) == 1 else None
                if attr and attr not in read and _builds_module(statement.value, context):
                    unused.setdefault(name, set()).add(attr)
        if not unused:
            return module
        kept_elsewhere = {
            attr
            for name, info in context.index.classes.items()
            if name in context.index.reachable
            for attr in info.init_calls
            if attr not in unused.get(name, set())
        }
        for attrs in unused.values():
            for attr in sorted(attrs - kept_elsewhere):
                context.plan.ignored.append(rf"(^|\.){re.escape(attr)}\.")
        return module.visit(_Transformer(context, unused))


def _builds_module(value: cst.BaseExpression, context: PortContext) -> bool:
    """A call constructing a layer: a class of this file, a Linear, embedding, norm or ModuleList."""
    if not isinstance(value, cst.Call):
        return False
    name = call_name(value) or ""
    return name in context.index.classes or name.split(".")[-1].endswith(LAYER_SUFFIXES)


class _Transformer(ClassScopedTransformer):
    def __init__(self, context: PortContext, unused: dict[str, set[str]]) -> None:
        super().__init__(context)
        self.unused = unused

    def leave_SimpleStatementLine(self, original: cst.SimpleStatementLine, updated: cst.SimpleStatementLine):
        attrs = self.unused.get(self.current_class or "", set())
        if self.current_function != "__init__" or not attrs or not isinstance(updated.body[0], cst.Assign):
            return updated
        if self_attribute(updated.body[0].targets[0].target) in attrs:
            self.context.record(
                "unused-modules",
                self.where,
                updated,
                "",
                "a module the port never runs (its checkpoint tensors are skipped on load)",
            )
            return cst.RemovalSentinel.REMOVE
        return updated

    def leave_If(self, original: cst.If, updated: cst.If):
        """`if config.add_cross_attention:` left with nothing to build goes too."""
        if self.current_function == "__init__" and not updated.body.body and updated.orelse is None:
            return cst.RemovalSentinel.REMOVE
        return updated
