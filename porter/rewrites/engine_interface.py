"""Rewrites `forward` down the module hierarchy to the engine's calling convention.

The causal LM and its backbone take `(input_ids, positions, kv_caches, input_metadata)`; a class
below takes its own data inputs (`hidden_states`, ...) plus whichever of `positions`, `kv_cache`
(one layer's cache) or `kv_caches`, and `input_metadata` its children need: attention needs the
cache and the metadata, a module that took `position_ids` takes `positions`.

- HF plumbing parameters (masks, caches, output flags, labels, `**kwargs`) and alternative inputs
  (`inputs_embeds`, `token_type_ids`) leave the signature; `position_ids` becomes `positions`.
- Every call of a rewritten submodule is rebuilt from the callee's new signature; a loop over a
  ModuleList of layers gains an index (`enumerate`) to pass each layer its `kv_caches[i]`.
- A rewritten forward returns one tensor: a `ModelOutput(...)` return becomes its first field, a
  tuple return its first element, and callers that unpacked or indexed the result are adjusted.
Statements left referring to removed parameters are the dead-code rewrite's business.
"""

from __future__ import annotations

import libcst as cst

from porter.analysis.cst_utils import (
    call_name,
    code_of,
    dotted_name,
    function_params,
    is_docstring,
    nodes_of,
    self_attribute_path,
)
from porter.analysis.signatures import (
    DROPPED_OUTPUT,
    ENGINE_PARAMS,
    OUTPUT_DATA_FIELDS,
    OUTPUT_DROPPED_FIELDS,
    POSITION_PARAMS,
    compute_signatures,
    dropped_params,
)
from porter.rewrites.base import ClassScopedTransformer, PortContext, Rewrite


class EngineInterface(Rewrite):
    name = "engine-interface"

    def apply(self, module: cst.Module, context: PortContext) -> cst.Module:
        context.plan.signatures = compute_signatures(
            context.index, context.plan.decided_unread, context.plan.cache_inputs
        )
        context.plan.dropped_params = dropped_params(context.index, context.plan.signatures)
        return module.visit(_Transformer(context))


class _Transformer(ClassScopedTransformer):
    def __init__(self, context: PortContext) -> None:
        super().__init__(context)
        self.index = context.index
        self.signatures = context.plan.signatures
        self.loop_layers: dict[str, tuple[str, str | None]] = {}  # loop var -> (class, index var)
        self.result_vars: set[str] = set()
        self.not_variables: set[int] = set()  # ids of Name nodes that are attribute or keyword names
        self.bound_names: set[int] = set()  # ids of Name nodes an assignment binds

    @property
    def in_rewritten_forward(self) -> bool:
        return (
            self.current_function == "forward"
            and self.current_class in self.signatures
            and len(self.function_stack) == 1
        )

    # -- signature -------------------------------------------------------------------------------
    def visit_FunctionDef(self, node: cst.FunctionDef) -> bool:
        super().visit_FunctionDef(node)
        self.loop_layers, self.result_vars = {}, set()
        self.tuple_vars: dict[str, cst.BaseExpression] = {}
        # Names a submodule's tuple result was unpacked into besides its tensor (`presents`): what the
        # submodule no longer returns, read from here on as the dropped output.
        self.dropped_results: set[str] = set()
        return True

    def leave_FunctionDef(self, original: cst.FunctionDef, updated: cst.FunctionDef):
        if not self.in_rewritten_forward:
            return super().leave_FunctionDef(original, updated)
        new_params = self.signatures[self.current_class]
        old = {p.name.value: p for p in (*updated.params.params, *updated.params.kwonly_params)}
        params = [updated.params.params[0]]  # self
        for name in new_params:
            if name in old:
                # Every input is given on every step, so defaults (mostly `= None`) go.
                params.append(
                    old[name].with_changes(
                        comma=cst.MaybeSentinel.DEFAULT, default=None, equal=cst.MaybeSentinel.DEFAULT
                    )
                )
            else:
                params.append(cst.Param(cst.Name(name)))
        body = list(updated.body.body)
        if body and is_docstring(body[0]):
            body = body[1:]  # it documents the HF arguments that are gone
        new = updated.with_changes(
            params=cst.Parameters(params=params), returns=None, body=updated.body.with_changes(body=body)
        )
        self.context.record(
            "engine-interface",
            self.where,
            _signature(updated),
            _signature(new),
            "engine calling convention: flattened tokens, paged KV cache, step metadata",
        )
        return super().leave_FunctionDef(original, new)

    def visit_Attribute(self, node: cst.Attribute) -> bool:
        self.not_variables.add(id(node.attr))
        return True

    def visit_Arg(self, node: cst.Arg) -> bool:
        if node.keyword is not None:
            self.not_variables.add(id(node.keyword))
        return True

    def visit_AssignTarget(self, node: cst.AssignTarget) -> bool:
        # A name bound again (`hidden_states, _ = self.mlp(x)` after `_` took a dropped result of
        # another call) is a new value: only reads of a dropped result stand in for it.
        if isinstance(node.target, (cst.Name, cst.Tuple)):
            self.bound_names.update(id(name) for name in nodes_of(node.target, cst.Name))
        return True

    def leave_Name(self, original: cst.Name, updated: cst.Name) -> cst.Name:
        if (
            self.current_class in self.signatures
            and "forward" in self.function_stack
            and updated.value in POSITION_PARAMS
            and id(original) not in self.not_variables
        ):
            return updated.with_changes(value="positions")
        if (
            self.in_rewritten_forward
            and updated.value in self.dropped_results
            and id(original) not in self.not_variables
            and id(original) not in self.bound_names
        ):
            return updated.with_changes(value=DROPPED_OUTPUT)
        return updated

    # -- loops over layers -----------------------------------------------------------------------
    def visit_For(self, node: cst.For) -> bool:
        if not self.in_rewritten_forward:
            return True
        iterable, index_var, loop_var = node.iter, None, node.target
        if call_name(iterable) == "enumerate" and isinstance(node.target, cst.Tuple):
            iterable = iterable.args[0].value
            index_var = dotted_name(node.target.elements[0].value)
            loop_var = node.target.elements[1].value
        if isinstance(iterable, cst.Subscript):
            iterable = iterable.value
        path = self_attribute_path(iterable)
        child = self.index.class_of_path(self.current_class, path) if path else None
        if child is not None and isinstance(loop_var, cst.Name):
            self.loop_layers[loop_var.value] = (child, index_var)
        return True

    def visit_Assign(self, node: cst.Assign) -> bool:
        """`layer = self.layers[index]` in a loop body: `layer(...)` runs that layer, whose cache is
        `kv_caches[index]`."""
        target = node.targets[0].target if len(node.targets) == 1 else None
        value = node.value
        if (
            self.in_rewritten_forward
            and isinstance(target, cst.Name)
            and isinstance(value, cst.Subscript)
            and len(value.slice) == 1
            and isinstance(value.slice[0].slice, cst.Index)
        ):
            path = self_attribute_path(value.value)
            child = self.index.class_of_path(self.current_class, path) if path else None
            if child is not None:
                self.loop_layers[target.value] = (child, code_of(value.slice[0].slice.value))
        return True

    def leave_For(self, original: cst.For, updated: cst.For) -> cst.BaseStatement:
        if not self.in_rewritten_forward or not isinstance(updated.target, cst.Name):
            return updated
        entry = self.loop_layers.get(updated.target.value)
        if entry is None or entry[1] is not None or "kv_cache" not in self.signatures.get(entry[0], []):
            return updated
        new = updated.with_changes(
            target=cst.parse_expression(f"layer_idx, {updated.target.value}"),
            iter=cst.parse_expression(f"enumerate({code_of(updated.iter)})"),
        )
        self.context.record(
            "engine-interface",
            self.where,
            f"for {code_of(updated.target)} in {code_of(updated.iter)}",
            f"for layer_idx, {code_of(updated.target)} in enumerate(...)",
            "each layer gets its own KV cache",
        )
        return new

    # -- calls of rewritten submodules -----------------------------------------------------------
    def leave_Call(self, original: cst.Call, updated: cst.Call) -> cst.BaseExpression:
        if not self.in_rewritten_forward:
            return updated
        callee, index_expr = self._callee(updated.func)
        if callee is None or callee not in self.signatures:
            return updated
        callee_forward = self.index.classes[callee].methods["forward"]
        original_params = function_params(callee_forward)[1:]
        args: list[cst.Arg] = []
        use_keywords = False
        for name in self.signatures[callee]:
            value = self._engine_value(name, index_expr)
            if value is None:
                arg = _find_arg(updated, name, original_params)
                if arg is None:
                    use_keywords = True
                    continue
                value = arg.value
            keyword = cst.Name(name) if use_keywords else None
            args.append(
                cst.Arg(
                    value=value,
                    keyword=keyword,
                    equal=cst.AssignEqual(cst.SimpleWhitespace(""), cst.SimpleWhitespace(""))
                    if keyword
                    else cst.MaybeSentinel.DEFAULT,
                )
            )
        new = updated.with_changes(args=args)
        self.context.record(
            "engine-interface", self.where, original, new, f"call {callee} with its engine signature"
        )
        return new

    def _callee(self, func: cst.BaseExpression) -> tuple[str | None, str | None]:
        if isinstance(func, cst.Name) and func.value in self.loop_layers:
            child, index_var = self.loop_layers[func.value]
            return child, index_var or "layer_idx"
        if isinstance(func, cst.Subscript):
            path = self_attribute_path(func.value)
            index = code_of(func.slice[0].slice.value) if isinstance(func.slice[0].slice, cst.Index) else None
            return (self.index.class_of_path(self.current_class, path) if path else None), index
        path = self_attribute_path(func)
        return (self.index.class_of_path(self.current_class, path) if path else None), None

    def _engine_value(self, name: str, index_expr: str | None) -> cst.BaseExpression | None:
        if name not in ENGINE_PARAMS:
            return None
        if name == "kv_cache":
            own = self.signatures[self.current_class]
            if "kv_cache" in own:
                return cst.Name("kv_cache")
            if index_expr is None:
                self.context.flag(
                    "engine-interface",
                    self.where,
                    "a layer needing a KV cache is called outside a layer loop",
                )
                return cst.Name("kv_cache")
            return cst.parse_expression(f"kv_caches[{index_expr}]")
        return cst.Name(name)

    # -- results of rewritten submodules ---------------------------------------------------------
    def leave_Assign(self, original: cst.Assign, updated: cst.Assign) -> cst.Assign:
        target = updated.targets[0].target
        value = updated.value
        if isinstance(value, cst.BinaryOperation) and isinstance(value.operator, cst.Add):
            value = value.left  # `outputs = (hidden_states,) + outputs[1:]` starts with the same tensor
        if self.in_rewritten_forward and isinstance(target, cst.Name) and isinstance(value, cst.Tuple):
            if value.elements:  # `outputs = (hidden_states, ...)`, returned later
                self.tuple_vars[target.value] = value.elements[0].value
        if (
            self.in_rewritten_forward
            and isinstance(target, cst.Tuple)
            and target.elements
            and isinstance(updated.value, cst.Name)
            and updated.value.value in self.result_vars
        ):
            # `hidden_states, kv_cache = layer_ret` of a result kept under a name: its one tensor.
            first = target.elements[0].value
            self._drop_results(target)
            self.context.record(
                "engine-interface", self.where, target, first, "the submodule returns one tensor"
            )
            return updated.with_changes(targets=[cst.AssignTarget(first)])
        if not self.in_rewritten_forward or not isinstance(updated.value, cst.Call):
            return updated
        callee, _ = self._callee(updated.value.func)
        if callee is None or callee not in self.signatures:
            return updated
        target = updated.targets[0].target
        if isinstance(target, cst.Tuple) and target.elements:
            first = target.elements[0].value
            self._drop_results(target)
            self.context.record(
                "engine-interface", self.where, target, first, f"{callee} now returns one tensor"
            )
            return updated.with_changes(targets=[cst.AssignTarget(first)])
        if isinstance(target, cst.Name):
            self.result_vars.add(target.value)
        return updated

    def _drop_results(self, target: cst.Tuple) -> None:
        first = target.elements[0].value
        for element in target.elements[1:]:
            if isinstance(element.value, cst.Name) and not (
                isinstance(first, cst.Name) and first.value == element.value.value
            ):
                self.dropped_results.add(element.value.value)

    def leave_AnnAssign(self, original: cst.AnnAssign, updated: cst.AnnAssign):
        if self.in_rewritten_forward and isinstance(updated.value, cst.Call) and updated.value is not None:
            callee, _ = self._callee(updated.value.func)
            if callee in self.signatures and isinstance(updated.target, cst.Name):
                self.result_vars.add(updated.target.value)
                # The annotation named a ModelOutput class; the result is a tensor now.
                return cst.Assign(targets=[cst.AssignTarget(updated.target)], value=updated.value)
        return updated

    def leave_Attribute(self, original: cst.Attribute, updated: cst.Attribute) -> cst.BaseExpression:
        if (
            self.in_rewritten_forward
            and isinstance(updated.value, cst.Name)
            and updated.value.value in self.result_vars
        ):
            if updated.attr.value in OUTPUT_DATA_FIELDS:
                return updated.value
            if updated.attr.value in OUTPUT_DROPPED_FIELDS:
                return cst.Name(DROPPED_OUTPUT)
        return updated

    def leave_Subscript(self, original: cst.Subscript, updated: cst.Subscript) -> cst.BaseExpression:
        if (
            self.in_rewritten_forward
            and isinstance(updated.value, cst.Name)
            and updated.value.value in self.result_vars
            and code_of(updated.slice[0]) == "0"
        ):
            return updated.value
        return updated

    # -- returns ---------------------------------------------------------------------------------
    def leave_Return(self, original: cst.Return, updated: cst.Return) -> cst.Return:
        if not self.in_rewritten_forward or updated.value is None:
            return updated
        value = updated.value
        if isinstance(value, cst.Call) and "Output" in (call_name(value) or ""):
            fields = {a.keyword.value: a.value for a in value.args if a.keyword is not None}
            data = next((fields[f] for f in OUTPUT_DATA_FIELDS if f in fields), None)
            if data is None and value.args:
                data = value.args[0].value
            if data is not None:
                self.context.record(
                    "engine-interface", self.where, value, data, "return the tensor, not a ModelOutput"
                )
                return updated.with_changes(value=data)
        if isinstance(value, cst.Name) and value.value in self.tuple_vars:
            first = self.tuple_vars[value.value]
            self.context.record(
                "engine-interface", self.where, value, first, "return the tensor the output tuple starts with"
            )
            return updated.with_changes(value=first)
        if isinstance(value, cst.Tuple) and value.elements:
            first = value.elements[0].value
            self.context.record(
                "engine-interface", self.where, value, first, "attention weights and caches are not returned"
            )
            return updated.with_changes(value=first)
        return updated


def _find_arg(call: cst.Call, name: str, original_params: list[str]) -> cst.Arg | None:
    for arg in call.args:
        if arg.keyword is not None and arg.keyword.value == name:
            return arg
    positional = [a for a in call.args if a.keyword is None and not a.star]
    if name in original_params and original_params.index(name) < len(positional):
        return positional[original_params.index(name)]
    return None


def _signature(function: cst.FunctionDef) -> str:
    return f"def {function.name.value}({code_of(function.params)})"
