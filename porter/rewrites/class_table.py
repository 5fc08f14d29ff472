"""Builds a submodule chosen from a table of classes as the one class the engine needs.

HF files pick an attention backend by config: `self.attn = ATTENTION_CLASSES[config._attn_implementation](
config, layer_idx)` with a table `{"eager": XAttention, "sdpa": XAttention, "flash_attention_2":
XFlashAttention2}`. The engine has one attention backend (paged attention), so the call builds the
class every entry of the table is or derives from (`XAttention(config, layer_idx)`); the table and
the backend subclasses are then unused and the prune rewrite drops them.
"""

from __future__ import annotations

import libcst as cst

from porter.analysis.model_index import table_class
from porter.rewrites.base import ClassScopedTransformer, PortContext, Rewrite


class BuildTableClass(Rewrite):
    name = "class-table"

    def apply(self, module: cst.Module, context: PortContext) -> cst.Module:
        if not context.index.class_tables:
            return module
        return module.visit(_Transformer(context))


class _Transformer(ClassScopedTransformer):
    def leave_Call(self, original: cst.Call, updated: cst.Call) -> cst.BaseExpression:
        chosen = table_class(updated, self.context.index.class_tables)
        if chosen is None:
            return updated
        new = updated.with_changes(func=cst.Name(chosen))
        self.context.record(
            "class-table",
            self.where,
            updated.func,
            chosen,
            "one backend in the engine: the class every entry of the table derives from",
        )
        return new
