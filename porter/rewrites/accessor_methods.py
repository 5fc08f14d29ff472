"""`self.get_layer(i)` -> `self.layers[i]` where the method only returns an item of a submodule list.

A method whose body is `return self.<attribute>[<its one parameter>]` hides which module a call runs
(`layer = self._get_layer(index)`; `layer(...)`): the layer loop, the cache threading and the call
rebuilding all read the module through `self.<attribute>[...]`. Written out at every call inside
its class, the method is left unread for the prune rewrite.
"""

from __future__ import annotations

import libcst as cst

from porter.analysis.cst_utils import function_params, is_docstring, self_attribute_path
from porter.rewrites.base import ClassScopedTransformer, PortContext, Rewrite


class InlineItemAccessors(Rewrite):
    name = "accessor-methods"

    def apply(self, module: cst.Module, context: PortContext) -> cst.Module:
        accessors = {
            statement.name.value: _accessors(statement)
            for statement in module.body
            if isinstance(statement, cst.ClassDef)
        }
        if not any(accessors.values()):
            return module
        return module.visit(_Transformer(context, accessors))


def _accessors(cls: cst.ClassDef) -> dict[str, cst.Attribute]:
    """Method name -> the `self.<attribute>` it indexes by its one parameter."""
    found: dict[str, cst.Attribute] = {}
    for item in cls.body.body:
        if not isinstance(item, cst.FunctionDef) or item.decorators or item.name.value == "forward":
            continue
        params = function_params(item)
        body = [s for s in item.body.body if not is_docstring(s)]
        if len(params) != 2 or params[0] != "self" or len(body) != 1:
            continue
        line = body[0]
        if not (isinstance(line, cst.SimpleStatementLine) and isinstance(line.body[0], cst.Return)):
            continue
        value = line.body[0].value
        if (
            isinstance(value, cst.Subscript)
            and isinstance(value.value, cst.Attribute)
            and self_attribute_path(value.value) is not None
            and len(value.slice) == 1
            and isinstance(value.slice[0].slice, cst.Index)
            and isinstance(value.slice[0].slice.value, cst.Name)
            and value.slice[0].slice.value.value == params[1]
        ):
            found[item.name.value] = value.value
    return found


class _Transformer(ClassScopedTransformer):
    def __init__(self, context: PortContext, accessors: dict[str, dict[str, cst.Attribute]]) -> None:
        super().__init__(context)
        self.accessors = accessors

    def leave_Call(self, original: cst.Call, updated: cst.Call) -> cst.BaseExpression:
        func = updated.func
        own = self.accessors.get(self.current_class or "", {})
        if not (
            isinstance(func, cst.Attribute)
            and isinstance(func.value, cst.Name)
            and func.value.value == "self"
            and func.attr.value in own
            and len(updated.args) == 1
            and updated.args[0].keyword is None
            and not updated.args[0].star
        ):
            return updated
        new = cst.Subscript(
            value=own[func.attr.value], slice=[cst.SubscriptElement(cst.Index(updated.args[0].value))]
        )
        self.context.record(
            "accessor-methods", self.where, updated, new, "the submodule the method returns, indexed in place"
        )
        return new
