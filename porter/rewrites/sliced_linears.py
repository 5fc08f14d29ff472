"""Keeps the module call where a branch also computes the same layers from slices of their weights.

Files of transformers 4.3x carry `if config.pretraining_tp > 1:` branches: they split
`self.q_proj.weight` (and the others) into slices, apply `F.linear` per slice and concatenate or
sum the parts, which is the product the layer computes, arranged to reproduce a pretraining run's
rounding. The engine shards its layers itself, so of `if <test>: <sliced> else: <module calls>`
only the branch that uses the modules stays, whichever side it is on.
"""

from __future__ import annotations

import libcst as cst

from porter.analysis.cst_utils import call_name, calls_in, self_attribute
from porter.rewrites.base import ClassScopedTransformer, PortContext, Rewrite

FUNCTIONAL_LINEAR = {"F.linear", "nn.functional.linear", "torch.nn.functional.linear"}


class KeepModuleCalls(Rewrite):
    name = "sliced-linears"

    def apply(self, module: cst.Module, context: PortContext) -> cst.Module:
        return module.visit(_Transformer(context))


class _Transformer(ClassScopedTransformer):
    def leave_If(self, original: cst.If, updated: cst.If) -> cst.BaseStatement | cst.FlattenSentinel:
        info = self.context.index.classes.get(self.current_class or "")
        if (
            info is None
            or self.current_function in (None, "__init__")
            or not isinstance(updated.orelse, cst.Else)
        ):
            return updated
        modules = set(info.init_calls)
        body, orelse = updated.body, updated.orelse.body
        for sliced, kept in ((body, orelse), (orelse, body)):
            weights = _weights_read(sliced) & modules
            if (
                weights
                and any(call_name(c) in FUNCTIONAL_LINEAR for c in calls_in(sliced))
                and not _weights_read(kept)
                and weights <= _modules_used(kept)
            ):
                self.context.record(
                    "sliced-linears",
                    self.where,
                    f"if {cst.Module(body=[]).code_for_node(updated.test)}: ...",
                    "",
                    f"{', '.join(sorted(weights))} computed from weight slices; the module call stays",
                )
                return cst.FlattenSentinel(kept.body)
        return updated


def _weights_read(node: cst.CSTNode) -> set[str]:
    """`x` of each `self.x.weight` read inside `node`."""
    found: set[str] = set()

    class _Find(cst.CSTVisitor):
        def visit_Attribute(self, attribute: cst.Attribute) -> None:
            owner = self_attribute(attribute.value)
            if owner is not None and attribute.attr.value == "weight":
                found.add(owner)

    node.visit(_Find())
    return found


def _modules_used(node: cst.CSTNode) -> set[str]:
    """`x` of each `self.x` read inside `node` other than through its `.weight`."""
    found: set[str] = set()

    class _Find(cst.CSTVisitor):
        def visit_Attribute(self, attribute: cst.Attribute) -> bool:
            if attribute.attr.value == "weight" and self_attribute(attribute.value) is not None:
                return False
            attr = self_attribute(attribute)
            if attr is not None:
                found.add(attr)
            return True

    node.visit(_Find())
    return found
