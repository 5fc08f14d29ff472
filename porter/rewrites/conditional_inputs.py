"""Tests of an input's presence that a configuration flag decides become tests of that flag.

Where the source builds an input only under a flag (see `porter.analysis.conditional_inputs`) and
the engine drops the input, a layer's `if alibi is None:` becomes `if not self.config.alibi:` (and
`alibi is not None` becomes `self.config.alibi`): both paths stay, chosen by the configuration at
run time, instead of the dead-code rewrite reading the dropped input as always None. A class that
keeps no `self.config` to ask is a review item.
"""

from __future__ import annotations

import libcst as cst

from porter.analysis.conditional_inputs import conditional_inputs
from porter.analysis.cst_utils import code_of, function_params, init_attribute_values
from porter.analysis.signatures import compute_signatures, dropped_params
from porter.rewrites.base import ClassScopedTransformer, PortContext, Rewrite


class ConditionalInputs(Rewrite):
    name = "conditional-inputs"

    def apply(self, module: cst.Module, context: PortContext) -> cst.Module:
        dropped = set().union(
            *dropped_params(
                context.index, compute_signatures(context.index, cache_inputs=context.plan.cache_inputs)
            ).values()
        )
        flags = conditional_inputs(context.index, dropped)
        if not flags:
            return module
        return module.visit(_Transformer(context, flags))


class _Transformer(ClassScopedTransformer):
    def __init__(self, context: PortContext, flags: dict[str, str]) -> None:
        super().__init__(context)
        self.flags = flags

    def _inputs(self) -> set[str]:
        """The flagged inputs the current forward takes."""
        info = self.context.index.classes.get(self.current_class or "")
        forward = info.methods.get("forward") if info else None
        if forward is None or self.current_function != "forward" or len(self.function_stack) != 1:
            return set()
        if self.current_class not in self.context.index.reachable:
            return set()  # an unused backend variant, pruned later
        return set(function_params(forward)) & set(self.flags)

    def leave_Comparison(self, original: cst.Comparison, updated: cst.Comparison) -> cst.BaseExpression:
        if len(updated.comparisons) != 1 or not isinstance(updated.left, cst.Name):
            return updated
        name, comparison = updated.left.value, updated.comparisons[0]
        if name not in self._inputs() or code_of(comparison.comparator) != "None":
            return updated
        if not isinstance(comparison.operator, (cst.Is, cst.IsNot)):
            return updated
        attributes = init_attribute_values(
            self.context.index.classes[self.current_class].methods.get("__init__")
        )
        if code_of(attributes.get("config", cst.Name("_"))) != "config":
            self.context.flag(
                "conditional-inputs",
                self.where,
                f"`{code_of(updated)}` depends on {self.flags[name]}, no self.config",
            )
            return updated
        flag = f"self.{self.flags[name]}"
        new = cst.parse_expression(f"not {flag}" if isinstance(comparison.operator, cst.Is) else flag)
        self.context.record(
            "conditional-inputs",
            self.where,
            updated,
            new,
            f"the source builds `{name}` only when {self.flags[name]}",
        )
        return new
