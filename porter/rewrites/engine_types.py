"""Forward parameters typed as the engine types them.

The engine's inputs carry the engine's types: `input_ids: torch.Tensor`, `positions:
torch.Tensor`, `kv_cache: KVCache` (one layer's), `kv_caches: list[KVCache]`, `input_metadata:
InputMetadata`, whatever HF annotated (`position_ids: torch.LongTensor | None` became `positions`
with its old annotation). A data input's HF annotation, in a forward the engine-interface rewrite
wrote or where the input has no default, loses what the engine never passes: `| None` and
`Optional[...]` (every input is given on every step), torch's legacy tensor classes
(`torch.FloatTensor` -> `torch.Tensor`, in a forward's return annotation too), and a one-element
`tuple[...]` around a tensor.
"""

from __future__ import annotations

import libcst as cst

from porter.analysis.cst_utils import code_of, dotted_name
from porter.rewrites.base import ClassScopedTransformer, PortContext, Rewrite

ENGINE_TYPES = {
    "input_ids": "torch.Tensor",
    "positions": "torch.Tensor",
    "kv_cache": "KVCache",
    "kv_caches": "list[KVCache]",
    "input_metadata": "InputMetadata",
}
ENGINE_TYPE_IMPORTS = {"KVCache": "engine.kv_cache", "InputMetadata": "engine.input_metadata"}
LEGACY_TENSORS = {
    f"torch.{kind}Tensor"
    for kind in ("Float", "Long", "Int", "Bool", "Half", "BFloat16", "Double", "Byte", "Short", "Char")
}


class EngineTypes(Rewrite):
    name = "engine-types"

    def apply(self, module: cst.Module, context: PortContext) -> cst.Module:
        if not _imports_torch(module):
            return module  # `torch.Tensor` would name nothing
        for name, source in ENGINE_TYPE_IMPORTS.items():
            context.need(source, name)
        return module.visit(_Transformer(context))


class _Transformer(ClassScopedTransformer):
    def visit_FunctionDef(self, node: cst.FunctionDef) -> bool:
        # An input the body tests against None (the residual the first layer is not given) is optional.
        self.tested_for_none = {
            code_of(c.left).strip()
            for c in _comparisons(node.body)
            if any(isinstance(t.operator, cst.Is) and _is_none(t.comparator) for t in c.comparisons)
        }
        return super().visit_FunctionDef(node)

    def leave_Param(self, original: cst.Param, updated: cst.Param) -> cst.Param:
        if self.current_function != "forward" or len(self.function_stack) != 1 or not self.current_class:
            return updated
        name = updated.name.value
        if name in ENGINE_TYPES:
            annotation = cst.Annotation(cst.parse_expression(ENGINE_TYPES[name]))
        elif (
            updated.annotation is not None
            and name not in self.tested_for_none
            and (self.current_class in self.context.plan.signatures or updated.default is None)
        ):
            # A forward the engine-interface rewrite wrote, or an input every caller passes.
            annotation = updated.annotation.with_changes(
                annotation=_engine_form(updated.annotation.annotation)
            )
        else:
            return updated
        if updated.annotation is not None and annotation.annotation.deep_equals(
            updated.annotation.annotation
        ):
            return updated
        # A parameter without an annotation is one the engine-interface rewrite added (the source
        # has no such text to point at): the change has only its typed form.
        before = f"{name}: {code_of(updated.annotation.annotation)}" if updated.annotation else ""
        self.context.record(
            "engine-types",
            self.where,
            before,
            f"{name}: {code_of(annotation.annotation)}",
            "the engine's type",
        )
        return updated.with_changes(annotation=annotation)

    def leave_FunctionDef(self, original: cst.FunctionDef, updated: cst.FunctionDef):
        returns = updated.returns
        if (
            self.current_function == "forward"
            and len(self.function_stack) == 1
            and returns is not None
            and dotted_name(returns.annotation) in LEGACY_TENSORS
        ):
            updated = updated.with_changes(
                returns=returns.with_changes(annotation=cst.parse_expression("torch.Tensor"))
            )
        return super().leave_FunctionDef(original, updated)


def _engine_form(annotation: cst.BaseExpression) -> cst.BaseExpression:
    """`X | None` -> X, `Optional[X]` -> X, `torch.FloatTensor` -> `torch.Tensor`, `tuple[X]` -> X."""
    if isinstance(annotation, cst.BinaryOperation) and isinstance(annotation.operator, cst.BitOr):
        if _is_none(annotation.right):
            return _engine_form(annotation.left)
        if _is_none(annotation.left):
            return _engine_form(annotation.right)
    if isinstance(annotation, cst.Subscript) and len(annotation.slice) == 1:
        inner = annotation.slice[0].slice
        if isinstance(inner, cst.Index) and dotted_name(annotation.value) in (
            "Optional",
            "typing.Optional",
            "tuple",
        ):
            return _engine_form(inner.value)
    if dotted_name(annotation) in LEGACY_TENSORS:
        return cst.parse_expression("torch.Tensor")
    return annotation


def _is_none(node: cst.BaseExpression) -> bool:
    return isinstance(node, cst.Name) and node.value == "None"


def _imports_torch(module: cst.Module) -> bool:
    return any(
        isinstance(small, cst.Import)
        and any(code_of(alias).strip().rstrip(",") == "torch" for alias in small.names)
        for statement in module.body
        if isinstance(statement, cst.SimpleStatementLine)
        for small in statement.body
    )


def _comparisons(node: cst.CSTNode) -> list[cst.Comparison]:
    found: list[cst.Comparison] = []

    class _Find(cst.CSTVisitor):
        def visit_Comparison(self, comparison: cst.Comparison) -> None:
            found.append(comparison)

    node.visit(_Find())
    return found
