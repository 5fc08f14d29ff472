"""Builds a submodule chosen from a table of classes as the one class the engine needs.

HF files pick an attention backend by config: `self.attn = ATTENTION_CLASSES[config._attn_implementation](
config, layer_idx)` with a table `{"eager": XAttention, "sdpa": XAttention, "flash_attention_2":
XFlashAttention2}`. The engine has one attention backend (paged attention), so the call builds the
class every entry of the table is or derives from (`XAttention(config, layer_idx)`); the table and
the backend subclasses are then unused and the prune rewrite drops them.

The same holds where `__init__` picks the class with an `if` (`if config.sparse_config is not None:
self.self_attn = SparseAttention(...) else: self.self_attn = XAttention(...)`) and a branch builds a
class whose constructor asserts a backend other than eager (`assert self.config._attn_implementation
== "flash_attention_2"`): the port runs eager code everywhere, so that construction would always
fail; the other branch stays.
"""

from __future__ import annotations

import libcst as cst

from porter.analysis.cst_utils import call_name, self_attribute
from porter.analysis.model_index import table_class
from porter.analysis.optional_backends import eager_backend_choice
from porter.rewrites.base import ClassScopedTransformer, PortContext, Rewrite


class BuildTableClass(Rewrite):
    name = "class-table"

    def apply(self, module: cst.Module, context: PortContext) -> cst.Module:
        if context.index.class_tables:
            module = module.visit(_Transformer(context))
        return module.visit(_DropBackendOnlyBuilds(context))


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


class _DropBackendOnlyBuilds(ClassScopedTransformer):
    def leave_If(self, original: cst.If, updated: cst.If) -> cst.BaseStatement | cst.FlattenSentinel:
        if self.current_function != "__init__":
            return updated
        branches: list[cst.BaseSuite] = []
        node: cst.If | cst.Else | None = updated
        while isinstance(node, cst.If):
            branches.append(node.body)
            node = node.orelse
        if node is None:
            return updated
        branches.append(node.body)
        builds = [_single_build(body) for body in branches]
        if any(b is None for b in builds) or len({attr for attr, _ in builds}) != 1:
            return updated
        kept = [body for body, (_, cls) in zip(branches, builds) if not self._needs_other_backend(cls)]
        if len(kept) != 1 or len(kept) == len(branches):
            return updated  # several alternatives left: choosing among them is the config's job
        self.context.record(
            "class-table",
            self.where,
            original,
            cst.Module(body=list(kept[0].body)).code.strip(),
            "the other branches build a class that asserts a backend other than eager",
        )
        return cst.FlattenSentinel(list(kept[0].body))

    def _needs_other_backend(self, name: str) -> bool:
        info = self.context.index.classes.get(name)
        init = info.methods.get("__init__") if info else None
        if init is None:
            return False
        for statement in init.body.body:
            if not isinstance(statement, cst.SimpleStatementLine):
                continue
            for small in statement.body:
                if isinstance(small, cst.Assert) and eager_backend_choice(small.test) is False:
                    return True
        return False


def _single_build(body: cst.BaseSuite) -> tuple[str, str] | None:
    """(attribute, class) of a branch that is just `self.<attribute> = <Class>(...)`."""
    statements = list(body.body) if isinstance(body, cst.IndentedBlock) else []
    if len(statements) != 1 or not isinstance(statements[0], cst.SimpleStatementLine):
        return None
    small = statements[0].body[0] if len(statements[0].body) == 1 else None
    if not isinstance(small, cst.Assign) or len(small.targets) != 1 or not isinstance(small.value, cst.Call):
        return None
    attr, cls = self_attribute(small.targets[0].target), call_name(small.value)
    return (attr, cls) if attr and cls else None
