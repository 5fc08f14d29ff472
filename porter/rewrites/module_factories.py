"""`self.x = factory(C, *args)` -> `self.x = C(*args)` in every `__init__` (and the helpers it
calls): the module a factory builds, written as its constructor (porter.analysis.module_factories),
so every later rewrite reads the layer it is."""

from __future__ import annotations

import libcst as cst

from porter.analysis.cst_utils import self_attribute
from porter.analysis.module_factories import built_call, factory_locals, module_factories
from porter.rewrites.base import ClassScopedTransformer, PortContext, Rewrite


class UnwrapModuleFactories(Rewrite):
    name = "module-factories"

    def apply(self, module: cst.Module, context: PortContext) -> cst.Module:
        factories = module_factories(module)
        return module.visit(_Transformer(context, factories))


class _Transformer(ClassScopedTransformer):
    def __init__(self, context: PortContext, factories: set[str]) -> None:
        super().__init__(context)
        self.factories = factories
        self.local: list[set[str]] = []

    def visit_FunctionDef(self, node: cst.FunctionDef) -> bool:
        self.local.append(factory_locals(node, self.factories))
        return super().visit_FunctionDef(node)

    def leave_FunctionDef(self, original: cst.FunctionDef, updated: cst.FunctionDef):
        self.local.pop()
        return super().leave_FunctionDef(original, updated)

    def leave_Assign(self, original: cst.Assign, updated: cst.Assign) -> cst.Assign:
        if self.current_class is None or not self.local:
            return updated
        if not any(self_attribute(t.target) is not None for t in updated.targets):
            return updated
        if not isinstance(updated.value, cst.Call):
            return updated
        built = built_call(updated.value, self.factories | self.local[-1])
        if built is None:
            return updated
        self.context.record(
            "module-factories",
            self.where,
            updated.value,
            built,
            "the module the factory builds; the engine loads every weight, so its initialisation never runs",
        )
        return updated.with_changes(value=built)
