"""Removes the code that served parameters the engine interface dropped.

Conditions are decided where the port knows the answer: a dropped parameter is None (an absent
`inputs_embeds`, no cache, no mask, no output flags), `input_ids`/`positions`/the caches/the
metadata are always given, `self.training` and `self.gradient_checkpointing` are False, and a
module-level flag whose every assignment binds the same literal bool has that value. A choice of
HF attention backend (`config._attn_implementation == "sdpa"`) takes the eager branch:
it writes the attention math out (scale, biases) where porter can read it, and the engine
replaces every backend by paged attention anyway. An
`if` whose test is decided keeps only the branch that runs. Then, in statement order, a statement
that reads a removed name goes too: a fresh variable it assigned is removed with it (so a causal
mask and everything built from it disappear), while a variable that already held a value keeps
it (an in-place masking step is dropped, the data flow survives).
"""

from __future__ import annotations

import libcst as cst

from porter.analysis.alibi import bias_inputs, find_builders
from porter.analysis.constructor_flags import constructor_flags, literal_attributes
from porter.analysis.cst_utils import (
    dotted_name,
    function_params,
    names_in,
)
from porter.analysis.module_flags import module_flags
from porter.analysis.optional_backends import optional_backend_flags
from porter.analysis.signatures import (
    ABSENT_INPUTS,
    DROPPED_OUTPUT,
    ENGINE_PARAMS,
    POSITION_PARAMS,
    compute_signatures,
    dropped_params,
)
from porter.rewrites.base import ClassScopedTransformer, PortContext, Rewrite
from porter.rewrites.statement_pruner import Pruner, integers_bound_once
from porter.rewrites.unread_assignments import drop_unread_assignments


class DecideConditions(Rewrite):
    """The first half, run before the attention and rotary rewrites read the code: conditions the
    engine decides keep only the branch that runs (so a cross-attention or cache branch is gone
    before anyone traces q/k/v through it); nothing else is removed yet."""

    name = "decide-conditions"

    def apply(self, module: cst.Module, context: PortContext) -> cst.Module:
        signatures = compute_signatures(context.index, cache_inputs=context.plan.cache_inputs)
        context.plan.dropped_params = dropped_params(context.index, signatures)
        context.plan.alibi_inputs = bias_inputs(context.index)
        context.plan.alibi_builders = {dotted_name(b.call.func) or "" for b in find_builders(context.index)}
        context.plan.module_flags = module_flags(module)
        read_before = _inputs_read(module, set(context.index.reachable))
        module = module.visit(_Transformer(context, cascade=False))
        # Deciding those branches can leave a submodule uncalled (a cross-attention block), which
        # fixes flags its siblings were built with; decide again with those.
        context.reindex(module)
        context.plan.constant_attributes = {
            **literal_attributes(context.index),
            **optional_backend_flags(context.index),
            **constructor_flags(context.index),
        }
        module = module.visit(_Transformer(context, cascade=False))
        read_after = _inputs_read(module, set(read_before))
        context.plan.decided_unread = {
            name: inputs - read_after.get(name, set()) for name, inputs in read_before.items()
        }
        return module


def _inputs_read(module: cst.Module, classes: set[str]) -> dict[str, set[str]]:
    """Per class named, the forward inputs its body reads."""
    found = {}
    for statement in module.body:
        if isinstance(statement, cst.ClassDef) and statement.name.value in classes:
            for item in statement.body.body:
                if isinstance(item, cst.FunctionDef) and item.name.value == "forward":
                    found[statement.name.value] = set(function_params(item)[1:]) & names_in(item.body)
    return found


class RemoveDeadCode(Rewrite):
    name = "dead-code"

    def apply(self, module: cst.Module, context: PortContext) -> cst.Module:
        return module.visit(_Transformer(context, cascade=True))


class _Transformer(ClassScopedTransformer):
    def __init__(self, context: PortContext, cascade: bool) -> None:
        super().__init__(context)
        self.cascade = cascade

    def leave_FunctionDef(self, original: cst.FunctionDef, updated: cst.FunctionDef):
        dropped = self.context.plan.dropped_params.get(self.current_class or "", set())
        if (
            len(self.function_stack) == 1
            and updated.name.value == "forward"
            and self.current_class is not None
        ):
            current = set(function_params(updated)) - dropped
            # An ALiBi bias leaves the signature but not the model: the paged attention applies it,
            # so `if position_bias is not None:` keeps the branch that adds it, for that rewrite to
            # read. (A bias only some configurations build was made a test of the flag already.)
            alibi = self.context.plan.alibi_inputs.get(self.current_class, set()) & dropped
            pruner = Pruner(
                self.context,
                self.where,
                dead=(dropped | {DROPPED_OUTPUT}) - ABSENT_INPUTS - (set() if self.cascade else alibi),
                absent=dropped - alibi,
                present=(current & set(ENGINE_PARAMS))
                | ({"positions", "input_ids"} - dropped)
                | (POSITION_PARAMS & current)
                | alibi,
                live=current,
                cascade=self.cascade,
                attributes={
                    a: v
                    for (c, a), v in self.context.plan.constant_attributes.items()
                    if c == self.current_class
                },
                keywords=_extra_keywords(original) & dropped,
                numbers=integers_bound_once(updated),
            )
            info = self.context.index.classes.get(self.current_class)
            pruner.modules = set(info.init_calls) if info else set()
            body = pruner.block(list(updated.body.body)) or [cst.SimpleStatementLine([cst.Pass()])]
            updated = updated.with_changes(body=updated.body.with_changes(body=body))
            if self.cascade:
                updated = drop_unread_assignments(updated, self.context, self.where)
        return super().leave_FunctionDef(original, updated)


def _extra_keywords(function: cst.FunctionDef) -> set[str]:
    """The name of `function`'s `**` parameter, if it has one."""
    star = function.params.star_kwarg
    return {star.name.value} if star is not None else set()
