"""Replaces HF's rotary embedding plumbing with the engine's rotary layer applied in attention.

HF computes `(cos, sin)` once per forward in a rotary module (a class holding `inv_freq`) and
threads them down as `position_embeddings` to an `apply_rotary_pos_emb(q, k, cos, sin)`-like
function. The port instead gives each attention class `self.rotary_emb = get_rope(config,
head_dim, is_neox_style=...)` and calls `q, k = self.rotary_emb(positions, q, k)` where the source
applied the rotation; `get_rope` reads the rope type, theta, scaling and partial-rotary factor from
the config with transformers' own init functions. The rotary module, its call and its outputs go.
The rotation style is read from the apply function: half-split (`rotate_half`, GPT-NeoX style) or
interleaved pairs (`x[..., ::2]`, GPT-J style).
"""

from __future__ import annotations

import libcst as cst

from porter.analysis.cst_utils import call_name, code_of, function_params, self_attribute, statement_targets
from porter.rewrites.base import ClassScopedTransformer, PortContext, Rewrite


class RotaryToEngine(Rewrite):
    name = "rotary"

    def apply(self, module: cst.Module, context: PortContext) -> cst.Module:
        index = context.index
        rotary_classes = {name for name, info in index.classes.items() if "inv_freq" in code_of(info.node)}
        apply_functions = {
            name: _is_neox_style(function, index.functions)
            for name, function in index.functions.items()
            if {"cos", "sin"} <= set(function_params(function))
        }
        if not apply_functions and not rotary_classes:
            return module
        return module.visit(_Transformer(context, rotary_classes, apply_functions))


def _is_neox_style(function: cst.FunctionDef, functions: dict[str, cst.FunctionDef]) -> bool:
    code = code_of(function) + "".join(
        code_of(f) for n, f in functions.items() if f"{n}(" in code_of(function)
    )
    return "::2" not in code and "every_two" not in code


class _Transformer(ClassScopedTransformer):
    def __init__(
        self, context: PortContext, rotary_classes: set[str], apply_functions: dict[str, bool]
    ) -> None:
        super().__init__(context)
        self.rotary_classes, self.apply_functions = rotary_classes, apply_functions
        self.rotary_attrs = {
            (info.name, attr)
            for info in context.index.classes.values()
            for attr, sub in info.submodules.items()
            if sub in rotary_classes
        }
        self.applied_in: dict[str, bool] = {}  # attention class -> neox style

    def leave_SimpleStatementLine(self, original, updated: cst.SimpleStatementLine):
        if len(updated.body) != 1 or self.current_class is None:
            return updated
        small = updated.body[0]
        value = getattr(small, "value", None)
        if isinstance(small, cst.Assign) and isinstance(value, cst.Call):
            attr = self_attribute(value.func)
            target_attr = self_attribute(small.targets[0].target)
            if (self.current_class, target_attr) in self.rotary_attrs and self.current_function == "__init__":
                self.context.record(
                    "rotary", self.where, updated, "", "rotary module replaced by the engine's rotary layer"
                )
                return cst.RemovalSentinel.REMOVE
            if (self.current_class, attr) in self.rotary_attrs:
                self.context.record(
                    "rotary", self.where, updated, "", "cos/sin are computed inside the engine's rotary layer"
                )
                return cst.RemovalSentinel.REMOVE
            name = call_name(value)
            if name in self.apply_functions and self.current_function == "forward" and len(value.args) >= 2:
                targets = statement_targets(updated)
                q, k = code_of(value.args[0].value), code_of(value.args[1].value)
                new = cst.parse_statement(f"{', '.join(targets)} = self.rotary_emb(positions, {q}, {k})")
                self.applied_in[self.current_class] = self.apply_functions[name]
                self.context.record(
                    "rotary", self.where, updated, new, "rotary embedding applied by position, per token"
                )
                return new
        return updated

    def leave_ClassDef(self, original: cst.ClassDef, updated: cst.ClassDef):
        name = updated.name.value
        if name in self.applied_in:
            updated = updated.with_changes(
                body=updated.body.with_changes(
                    body=[
                        self._with_rope(s, name)
                        if isinstance(s, cst.FunctionDef) and s.name.value == "__init__"
                        else s
                        for s in updated.body.body
                    ]
                )
            )
        return super().leave_ClassDef(original, updated)

    def _with_rope(self, init: cst.FunctionDef, class_name: str) -> cst.FunctionDef:
        info = self.context.plan.attention.get(class_name)
        params = function_params(init)
        config = next((p for p in params if "config" in p), None)
        if info is None or config is None:
            self.context.flag(
                "rotary", class_name, "rotary applied in a class without a config or known head size"
            )
            return init
        neox = self.applied_in[class_name]
        statement = cst.parse_statement(
            f"self.rotary_emb = get_rope({config}, {info.head_dim}, is_neox_style={neox})"
        )
        self.context.need("engine.layers", "get_rope")
        self.context.record(
            "rotary", class_name, "", statement, "the engine's rotary layer, configured from the config"
        )
        return init.with_changes(body=init.body.with_changes(body=[*init.body.body, statement]))
