"""A forward parameter carrying HF's KV cache under a name the engine uses (`kv_cache`, `kv_caches`)
is renamed inside that forward before the engine's own parameter of that name arrives.

Recognised by role (porter.analysis.cache_inputs), the source's cache is dropped like any HF cache:
its `if kv_cache is not None:` branch is decided away and whatever it feeds goes. Under the engine's
name it would pass for the engine's always-present paged cache instead, and the source's
concatenation onto its past keys would stay. Renamed, the two never meet.
"""

from __future__ import annotations

import libcst as cst

from porter.analysis.cst_utils import names_in
from porter.analysis.signatures import ENGINE_PARAMS
from porter.rewrites.base import ClassScopedTransformer, PortContext

PREFIX = "source_"


def rename_colliding_caches(module: cst.Module, context: PortContext) -> cst.Module:
    """Renames, per class, the cache parameters in `context.plan.cache_inputs` that carry an engine
    name, and updates that plan entry to the new names."""
    renames: dict[str, dict[str, str]] = {}
    for owner, params in context.plan.cache_inputs.items():
        forward = (
            context.index.classes[owner].methods.get("forward") if owner in context.index.classes else None
        )
        if forward is None:
            continue
        taken = names_in(forward)
        for param in sorted(params & set(ENGINE_PARAMS)):
            new = PREFIX + param
            while new in taken:
                new = PREFIX + new
            renames.setdefault(owner, {})[param] = new
    if not renames:
        return module
    module = module.visit(_Transformer(context, renames))
    for owner, mapping in renames.items():
        context.plan.cache_inputs[owner] = {mapping.get(p, p) for p in context.plan.cache_inputs[owner]}
    return module


class _Transformer(ClassScopedTransformer):
    def __init__(self, context: PortContext, renames: dict[str, dict[str, str]]) -> None:
        super().__init__(context)
        self.renames = renames
        self.not_variables: set[int] = set()  # ids of Name nodes that are attribute or keyword names

    @property
    def mapping(self) -> dict[str, str]:
        if self.function_stack[:1] != ["forward"]:
            return {}
        return self.renames.get(self.current_class or "", {})

    def visit_Attribute(self, node: cst.Attribute) -> bool:
        self.not_variables.add(id(node.attr))
        return True

    def visit_Arg(self, node: cst.Arg) -> bool:
        if node.keyword is not None:
            self.not_variables.add(id(node.keyword))
        return True

    def leave_Name(self, original: cst.Name, updated: cst.Name) -> cst.Name:
        new = self.mapping.get(updated.value)
        if new is None or id(original) in self.not_variables:
            return updated
        return updated.with_changes(value=new)

    def leave_FunctionDef(self, original: cst.FunctionDef, updated: cst.FunctionDef):
        mapping = self.mapping
        if mapping and len(self.function_stack) == 1:
            renamed = [p for p in mapping if p in names_in(original.params)]
            if renamed:
                self.context.record(
                    "hf-plumbing",
                    self.where,
                    ", ".join(renamed),
                    ", ".join(mapping[p] for p in renamed),
                    "the source's own KV cache, renamed apart from the engine's parameter of that name",
                )
        return super().leave_FunctionDef(original, updated)
