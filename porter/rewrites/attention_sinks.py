"""Attention sinks read by the attention core -> `PagedAttention(..., sinks=self.<sink>)`.

The core (`porter.analysis.sinks`) reads a learned per-head logit of its module and puts it in each
head's softmax denominator. The attention class keeps that parameter (so the checkpoint loads it
under its own name, whole on every rank) and hands it to its PagedAttention, which takes this
rank's heads of it at each step. Runs after the core became a PagedAttention call.
"""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cst_utils import code_of, self_attribute
from porter.analysis.sinks import sink_parameters
from porter.rewrites.base import ClassScopedTransformer, PortContext, Rewrite

PARAMETER = m.Call(func=m.Attribute(attr=m.Name("Parameter")) | m.Name("Parameter"))
PAGED_ATTENTION = m.Call(func=m.Name("PagedAttention"))


class AttentionSinks(Rewrite):
    name = "attention-sinks"

    def apply(self, module: cst.Module, context: PortContext) -> cst.Module:
        source = cst.parse_module(context.source.text)  # the cores as written, before they were replaced
        sinks = {
            name
            for statement in source.body
            if isinstance(statement, cst.FunctionDef)
            for name in sink_parameters(statement)
        }
        if not sinks:
            return module
        return module.visit(_Transformer(context, sinks))


class _Transformer(ClassScopedTransformer):
    def __init__(self, context: PortContext, sinks: set[str]) -> None:
        super().__init__(context)
        self.sinks = sinks

    def leave_FunctionDef(self, original: cst.FunctionDef, updated: cst.FunctionDef) -> cst.FunctionDef:
        if updated.name.value != "__init__" or not self.class_stack:
            return super().leave_FunctionDef(original, updated)
        body = list(updated.body.body)
        held = [
            (index, self_attribute(assign.targets[0].target))
            for index, statement in enumerate(body)
            for assign in m.findall(statement, m.Assign(value=PARAMETER))
            if self_attribute(assign.targets[0].target) in self.sinks
        ]
        attention = [index for index, statement in enumerate(body) if m.findall(statement, PAGED_ATTENTION)]
        if not held or not attention:
            return super().leave_FunctionDef(original, updated)
        (sink_index, sink), paged_index = held[0], attention[0]
        if sink_index > paged_index:
            self.context.flag(
                "attention-sinks", self.where, f"`self.{sink}` is made after the PagedAttention that reads it"
            )
            return super().leave_FunctionDef(original, updated)
        call = m.findall(body[paged_index], PAGED_ATTENTION)[0]
        new_call = call.with_changes(
            args=[
                *call.args,
                cst.Arg(
                    cst.parse_expression(f"self.{sink}"),
                    keyword=cst.Name("sinks"),
                    equal=cst.AssignEqual(cst.SimpleWhitespace(""), cst.SimpleWhitespace("")),
                ),
            ]
        )
        body[paged_index] = body[paged_index].deep_replace(call, new_call)
        self.context.record(
            "attention-sinks",
            self.where,
            code_of(call),
            code_of(new_call),
            f"the core puts `self.{sink}` in each head's softmax denominator: PagedAttention's sinks",
        )
        updated = updated.with_changes(body=updated.body.with_changes(body=body))
        return super().leave_FunctionDef(original, updated)
