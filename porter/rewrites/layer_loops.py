"""Unzips a loop over the layers from the per-layer caches it walks beside them.

Older backbones loop `for i, (layer, layer_past) in enumerate(zip(self.layers, past_key_values))`:
the tuple of per-layer caches is plumbing the engine replaces with `kv_caches`. The loop keeps
only the layers, `for i, layer in enumerate(self.layers)` (or `for layer in self.layers`), and the
engine-interface rewrite then hands each layer its cache by index. A zipped-in variable read
anywhere but as an argument of the layer call leaves the loop alone (dead-code flags it).
"""

from __future__ import annotations

import libcst as cst

from porter.analysis.cst_utils import call_name, code_of, dotted_name, self_attribute_path
from porter.rewrites.base import ClassScopedTransformer, PortContext, Rewrite


class UnzipLayerLoops(Rewrite):
    name = "layer-loops"

    def apply(self, module: cst.Module, context: PortContext) -> cst.Module:
        return module.visit(_Transformer(context))


class _Transformer(ClassScopedTransformer):
    def leave_For(self, original: cst.For, updated: cst.For) -> cst.For:
        if self.current_function != "forward" or self.current_class is None:
            return updated
        iterable, target, index = updated.iter, updated.target, None
        if call_name(iterable) == "enumerate" and isinstance(target, cst.Tuple) and len(target.elements) == 2:
            iterable, index, target = (
                iterable.args[0].value,
                target.elements[0].value,
                target.elements[1].value,
            )
        if call_name(iterable) != "zip" or not isinstance(target, cst.Tuple):
            return updated
        zipped = [a.value for a in iterable.args]
        names = [e.value for e in target.elements]
        path = self_attribute_path(zipped[0])
        if len(zipped) != len(names) or not path or not isinstance(names[0], cst.Name):
            return updated
        if self.context.index.class_of_path(self.current_class, path) is None:
            return updated
        dropped = self.context.plan.dropped_params.get(self.current_class, set())
        if not all(dotted_name(z) in dropped for z in zipped[1:]):
            return updated
        layer, others = names[0].value, {code_of(n) for n in names[1:]}
        if others & _read_outside_layer_calls(updated.body, layer):
            return updated
        layers = code_of(zipped[0])
        new_iter = f"enumerate({layers})" if index is not None else layers
        new_target = f"{code_of(index)}, {layer}" if index is not None else layer
        new = updated.with_changes(
            target=cst.parse_expression(new_target), iter=cst.parse_expression(new_iter)
        )
        self.context.record(
            "layer-loops",
            self.where,
            f"for {code_of(updated.target)} in {code_of(updated.iter)}",
            f"for {new_target} in {new_iter}",
            "per-layer HF caches are replaced by the engine's kv_caches",
        )
        return new


def _read_outside_layer_calls(body: cst.CSTNode, layer: str) -> set[str]:
    """Names read in `body` other than inside the arguments of a call of `layer`."""
    found: set[str] = set()

    class _Find(cst.CSTVisitor):
        def visit_Call(self, call: cst.Call) -> bool:
            return dotted_name(call.func) != layer

        def visit_Attribute(self, attribute: cst.Attribute) -> bool:
            attribute.value.visit(self)
            return False  # `x.layer_past` is an attribute, not the variable

        def visit_Arg(self, arg: cst.Arg) -> bool:
            arg.value.visit(self)
            return False  # a keyword is not a variable

        def visit_Name(self, name: cst.Name) -> None:
            found.add(name.value)

    body.visit(_Find())
    return found
