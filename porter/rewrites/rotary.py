"""Replaces HF's rotary embedding plumbing with the engine's rotary layer applied in attention.

HF computes `(cos, sin)` once per forward in a rotary module (a class holding `inv_freq`) and
threads them down as `position_embeddings` to an `apply_rotary_pos_emb(q, k, cos, sin)`-like
function. The port instead gives each attention class `self.rotary_emb = get_rope(config,
head_dim, is_neox_style=...)` and calls `q, k = self.rotary_emb(positions, q, k)` where the source
applied the rotation; `get_rope` reads the rope type, theta, scaling and partial-rotary factor from
the config with transformers' own init functions. The rotary module, its call and its outputs go,
and so do a helper `__init__` calls only to build it (`self._init_rope()`) and the attributes
only its construction read (`self.rope_theta`: a 5.x config may not even have the field).
The rotation style is read from the apply function: half-split (`rotate_half`, GPT-NeoX style) or
interleaved pairs (`x[..., ::2]`, GPT-J style); and its direction from the pair it builds: HF's
`cat((-x2, x1))` turns each pair by its angle, `cat((x2, -x1))` (NanoChat) by minus its angle, which
is `get_rope(..., reverse=True)`.
A rotary module may also rotate q and k itself (`q, k = self.rotary(q, k)`, its forward returning
the pair rotated by the positions of their sequence axis): the call becomes the engine's layer on
the token positions. Built under a condition with an identity for the other choice
(`Rotary(d) if config.rotary else lambda q, k: (q, k)`), the rope is built under that condition,
else None, and q and k rotate only where it is built. Where the module casts its cos/sin tables to
a half dtype whatever the model's (a `dtype=torch.bfloat16` default its own calls never override),
the rope rounds them likewise (`table_dtype=`), so fp32 ports rotate as the source does.
"""

from __future__ import annotations

import re

import libcst as cst
import libcst.matchers as m

from porter.analysis.cst_utils import (
    call_name,
    calls_in,
    code_of,
    dotted_name,
    function_params,
    init_attribute_values,
    names_bound,
    names_in,
    nodes_of,
    self_attribute,
    self_attributes_read,
    statement_targets,
)
from porter.analysis.model_index import ClassInfo, calls_method, init_helpers
from porter.analysis.rotary_tables import angle_table_param, base_param, innermost_call, rescaling_params
from porter.rewrites.base import ClassScopedTransformer, PortContext, Rewrite
from porter.rewrites.statement_pruner import names_read


class RotaryToEngine(Rewrite):
    name = "rotary"

    def apply(self, module: cst.Module, context: PortContext) -> cst.Module:
        index = context.index
        rotary_classes = {
            name for name, info in index.classes.items() if _is_rotary_module(info, index.functions)
        }
        apply_functions = {
            name: _is_neox_style(function, index.functions)
            for name, function in index.functions.items()
            if {"cos", "sin"} <= set(_cos_sin_names(function))
        }
        # `apply(x, sin, cos)`, one tensor per call (GPT-J, CodeGen): the engine's layer rotates q
        # and k together, and pairing separate calls is not done yet, so say so instead of guessing.
        one_tensor = {name for name in apply_functions if _tensors_before_cos_sin(index.functions[name]) < 2}
        # `apply(t, freqs)`: the rotary module returns the angles, and the function rotates one
        # tensor by their cos and sin.
        angle_functions = {
            name for name, function in index.functions.items() if angle_table_param(function) is not None
        }
        apply_functions.update(
            {name: _is_neox_style(index.functions[name], index.functions) for name in angle_functions}
        )
        one_tensor |= angle_functions
        if not apply_functions and not rotary_classes:
            return module
        transformer = _Transformer(context, rotary_classes, apply_functions, one_tensor)
        transformer.rescaling = {
            name: rescaling_params(_method_chain(index, name)) for name in rotary_classes
        }
        transformer.reverse_functions = {
            name for name in apply_functions if _rotates_backwards(index.functions[name], index.functions)
        }
        # A rotary module computing one rope per layer type (`forward(x, position_ids, layer_type)`,
        # OLMo3): each attention passes its own layer's type to get_rope.
        transformer.per_layer_type = any(
            "layer_type" in function_params(method)
            for name in rotary_classes
            for method in index.classes[name].methods.values()
        )
        transformer.built_sizes = _built_sizes(index, rotary_classes)
        context.plan.ignored += _saved_buffer_names(index, rotary_classes, transformer.rotary_attrs)
        module = module.visit(transformer)
        return module.visit(_DropRotaryOnlyAttributes(context, transformer.rotary_inputs))


def _method_chain(index, name: str) -> list[dict[str, cst.FunctionDef]]:
    """The methods of class `name`, then of each of its bases defined in this file, in order."""
    chain, current = [], index.classes.get(name)
    while current is not None:
        chain.append(current.methods)
        current = next((index.classes[b] for b in current.bases if b in index.classes), None)
    return chain


def _saved_buffer_names(index, rotary_classes: set[str], rotary_attrs: set[tuple[str, str]]) -> list[str]:
    """Checkpoint names of the buffers a replaced rotary module kept in its state dict (`inv_freq`
    registered without `persistent=False`, as older releases and remote code did): the engine's rope
    computes its own, so the loader skips them."""
    saved = set()
    for name in rotary_classes:
        for call in calls_in(index.classes[name].node):
            if (
                m.matches(call.func, m.Attribute(value=m.Name("self"), attr=m.Name("register_buffer")))
                and call.args
                and isinstance(call.args[0].value, cst.SimpleString)
                and not _not_persistent(call)
            ):
                saved.add(call.args[0].value.evaluated_value)
    attrs = {attr for _, attr in rotary_attrs}
    return sorted(rf"(^|\.){re.escape(attr)}\.{re.escape(buffer)}$" for attr in attrs for buffer in saved)


def _not_persistent(call: cst.Call) -> bool:
    """`register_buffer(name, value, persistent=False)`, by keyword or as the third argument."""
    for position, arg in enumerate(call.args):
        if (arg.keyword is not None and arg.keyword.value == "persistent") or (
            arg.keyword is None and position == 2
        ):
            return m.matches(arg.value, m.Name("False"))
    return False


def _built_sizes(index, rotary_classes: set[str]) -> dict[tuple[str, str, str], cst.BaseExpression]:
    """(class, rotary attribute, attribute of the rotary module) -> what the class built it with,
    for each attribute the rotary module keeps from its constructor (`self.dim = dim`), read from
    the construction `self.rotary_emb = XRotaryEmbedding(int(factor * self.head_dim), ...)` (in
    `__init__` or a helper, the same value in every branch that builds one), so a read of it
    (`q[..., : self.rotary_emb.dim]`) survives the module's replacement."""
    kept_params = {}
    for name in rotary_classes:
        init = index.classes[name].methods.get("__init__")
        if init is None:
            continue
        params = function_params(init)[1:]
        defaults = {p.name.value: p.default for p in init.params.params if p.default is not None}
        kept_params[name] = (
            params,
            defaults,
            {
                attr: value.value
                for attr, value in init_attribute_values(init).items()
                if isinstance(value, cst.Name) and value.value in params
            },
        )
    found: dict[tuple[str, str, str], cst.BaseExpression | None] = {}
    for info in index.classes.values():
        for method in info.methods.values():
            for assign in m.findall(method, m.Assign(value=m.Call())):
                attr, call = self_attribute(assign.targets[0].target), assign.value
                rotary = call_name(call)
                if attr is None or info.submodules.get(attr) != rotary or rotary not in kept_params:
                    continue
                params, defaults, kept = kept_params[rotary]
                arguments = dict(zip(params, (a.value for a in call.args if a.keyword is None)))
                arguments.update({a.keyword.value: a.value for a in call.args if a.keyword is not None})
                for kept_attr, param in kept.items():
                    value = arguments.get(param, defaults.get(param))
                    key = (info.name, attr, kept_attr)
                    if key in found and (
                        value is None or found[key] is None or not found[key].deep_equals(value)
                    ):
                        found[key] = None  # branches build it differently: nothing to substitute
                    elif key not in found:
                        found[key] = value
    return {key: value for key, value in found.items() if value is not None}


def _is_rotary_module(info: ClassInfo, functions: dict[str, cst.FunctionDef]) -> bool:
    """A module that computes rotary cos/sin: it keeps inverse frequencies under HF's name for them
    (`inv_freq`, a buffer every HF rotary module registers; the text is searched because it is
    registered by string as often as by attribute), or it holds no layer and its forward returns a
    pair computed with sin and cos, in the class or in a function of the file it calls (a sinusoidal
    table split into sin and cos, with no inverse frequencies kept)."""
    if "inv_freq" in code_of(info.node):
        return True
    forward = info.methods.get("forward")
    if forward is None or info.linears() or info.embeddings() or info.submodules:
        return False
    returns = m.findall(forward, m.Return(value=m.Tuple(elements=[m.DoNotCare(), m.DoNotCare()])))
    if not returns:
        return False
    called = [functions[n] for c in calls_in(info.node) if (n := call_name(c)) in functions]
    computed = {_function_of(c) for part in (info.node, *called) for c in calls_in(part)}
    return {"sin", "cos"} <= computed


def _applies_itself(info: ClassInfo) -> bool:
    """A rotary module whose forward takes two tensors and returns the pair rotated (`forward(self,
    q, k)` computing `(q * cos) + (rotate_half(q) * sin), (k * cos) + ...`): the rotation is
    applied inside the module, by the positions of the tensors' sequence axis."""
    forward = info.methods.get("forward")
    if forward is None:
        return False
    params = function_params(forward)[1:]
    if len(params) != 2:
        return False
    returns = m.findall(forward, m.Return(value=m.Tuple(elements=[m.DoNotCare(), m.DoNotCare()])))
    return len(returns) == 1 and all(
        params[i] in names_in(element.value) and params[1 - i] not in names_in(element.value)
        for i, element in enumerate(returns[0].value.elements)
    )


HALF_DTYPES = ("torch.bfloat16", "torch.float16")


def _table_dtype(info: ClassInfo) -> str | None:
    """The half dtype a rotary module casts its cos/sin tables to whatever the model's dtype: a
    method whose `dtype` parameter defaults to one (`def cos_sin(self, seq_len, device="cuda",
    dtype=torch.bfloat16)`), casts with it (`.type(dtype)`, `.to(dtype)`), and is called within the
    class without it (`self.cos_sin(seq_len, q.device)`)."""
    for name, method in info.methods.items():
        params = [p for p in method.params.params]
        for position, param in enumerate(params):
            if param.default is None or code_of(param.default) not in HALF_DTYPES:
                continue
            casts = m.findall(
                method,
                m.Call(
                    func=m.Attribute(attr=m.Name("type") | m.Name("to")),
                    args=[m.Arg(value=m.Name(param.name.value))],
                ),
            )
            calls = [
                call
                for call in calls_in(info.node)
                if m.matches(call.func, m.Attribute(value=m.Name("self"), attr=m.Name(name)))
            ]
            passes = any(
                len([a for a in call.args if a.keyword is None]) >= position
                or any(a.keyword is not None and a.keyword.value == param.name.value for a in call.args)
                for call in calls
            )
            if casts and calls and not passes:
                return code_of(param.default)
    return None


def _optional_rotary_attrs(index, rotary_classes: set[str]) -> dict[tuple[str, str], str]:
    """(class, attribute) -> rotary class, for `self.x = Rotary(...) if condition else lambda q, k:
    (q, k)` in `__init__`: the module where the condition holds, else nothing rotates."""
    found = {}
    for info in index.classes.values():
        init = info.methods.get("__init__")
        if init is None:
            continue
        for assign in m.findall(init, m.Assign(value=m.IfExp(body=m.Call(), orelse=m.Lambda()))):
            rotary = call_name(assign.value.body)
            attr = self_attribute(assign.targets[0].target)
            if attr is not None and rotary in rotary_classes and _is_identity(assign.value.orelse):
                found[(info.name, attr)] = rotary
    return found


def _is_identity(function: cst.Lambda) -> bool:
    """`lambda q, k: (q, k)`: returns its parameters as they came."""
    params = [p.name.value for p in function.params.params]
    body = function.body
    returned = [code_of(e.value) for e in body.elements] if isinstance(body, cst.Tuple) else [code_of(body)]
    return returned == params


def _function_of(call: cst.Call) -> str | None:
    """`sin` for `torch.sin(x)`, `x.sin()` or `sin(x)`: the last name of what is called."""
    func = call.func
    return (
        func.attr.value
        if isinstance(func, cst.Attribute)
        else func.value
        if isinstance(func, cst.Name)
        else None
    )


def _layer_type_expression(init: cst.FunctionDef) -> str | None:
    """This layer's type as `__init__` can read it: the attribute that keeps it
    (`self.attention_type = config.layer_types[i]`), else the lookup itself where `__init__` only
    compares it (`self.is_sliding = config.layer_types[i] == "sliding_attention"`)."""
    lookups: list[str] = []
    for attr, value in init_attribute_values(init).items():
        # the lookup itself, or it when the config has the field (`... if hasattr(...) else None`)
        held = value.body if isinstance(value, cst.IfExp) else value
        if isinstance(held, cst.Subscript) and code_of(held.value).endswith("layer_types"):
            return f"self.{attr}"
        lookups += [
            code_of(node)
            for node in nodes_of(value, cst.Subscript)
            if code_of(node.value).endswith("layer_types")
        ]
    return lookups[0] if lookups else None


def _cos_sin_names(function: cst.FunctionDef) -> list[str]:
    """The function's parameter names, trailing underscores dropped (`cos_`, `sin_`: the tables
    taken under another name so the body can rebind `cos` and `sin`)."""
    return [name.rstrip("_") or name for name in function_params(function)]


def _tensors_before_cos_sin(function: cst.FunctionDef) -> int:
    params = _cos_sin_names(function)
    return min(params.index("cos"), params.index("sin"))


def _is_neox_style(function: cst.FunctionDef, functions: dict[str, cst.FunctionDef]) -> bool:
    code = code_of(function) + "".join(
        code_of(f) for n, f in functions.items() if f"{n}(" in code_of(function)
    )
    return "::2" not in code and "every_two" not in code


def _rotates_backwards(function: cst.FunctionDef, functions: dict[str, cst.FunctionDef]) -> bool:
    """Whether the rotation the apply function (with the helpers it calls) builds turns each pair
    by minus its angle: the pair is `cat((x2, -x1))` or `stack((x2, -x1))` where HF's rotate_half
    and rotate_every_two build `(-x2, x1)`."""
    called = [f for n, f in functions.items() if f is not function and f"{n}(" in code_of(function)]
    for part in (function, *called):
        for call in calls_in(part):
            if call_name(call) not in ("torch.cat", "torch.stack") or not call.args:
                continue
            pair = call.args[0].value
            if not isinstance(pair, (cst.Tuple, cst.List)) or len(pair.elements) != 2:
                continue
            negated = [
                isinstance(e.value, cst.UnaryOperation) and isinstance(e.value.operator, cst.Minus)
                for e in pair.elements
            ]
            if negated == [False, True]:
                return True
    return False


class _Transformer(ClassScopedTransformer):
    def __init__(
        self,
        context: PortContext,
        rotary_classes: set[str],
        apply_functions: dict[str, bool],
        one_tensor: set[str],
    ) -> None:
        super().__init__(context)
        self.rotary_classes, self.apply_functions = rotary_classes, apply_functions
        self.one_tensor = one_tensor
        self.rotary_attrs = {
            (info.name, attr)
            for info in context.index.classes.values()
            for attr, sub in info.submodules.items()
            if sub in rotary_classes
        }
        self.per_layer_type = False  # the rotary module holds one rope per layer type
        self.applied_in: dict[str, bool] = {}  # attention class -> neox style
        self.reverse_functions: set[str] = set()  # apply functions that rotate by minus the angle
        self.reversed_in: set[str] = set()  # attention classes that apply one of those
        self.rotary_dims: dict[str, str] = {}  # attention class -> rotated width, where the source names it
        # (class, attribute) read by a rotary module's construction that was removed
        self.rotary_inputs: set[tuple[str, str]] = set()
        self.built_sizes: dict[tuple[str, str, str], cst.BaseExpression] = {}
        self.rescaling: dict[str, list[str]] = {}  # rotary class -> forward params rescaling its frequencies
        self.rope_bases: dict[str, str] = {}  # attention class -> the rope base its construction passed
        # attention class -> the condition its construction built the rotary module under (the
        # other choice an identity, `lambda q, k: (q, k)`)
        self.rope_conditions: dict[str, cst.BaseExpression] = {}
        self.table_dtypes: dict[str, str] = {}  # attention class -> the dtype its cos/sin tables are cast to
        # (class, attribute) -> rotary class, for a rotary module built under a condition
        self.optional_rotary = _optional_rotary_attrs(context.index, rotary_classes)
        self.rotary_attrs |= set(self.optional_rotary)
        # rotary classes whose forward takes q and k and returns them rotated
        self.self_applying = {
            name: _is_neox_style(context.index.classes[name].node, context.index.functions)
            for name in rotary_classes
            if _applies_itself(context.index.classes[name])
        }

    def leave_Attribute(self, original: cst.Attribute, updated: cst.BaseExpression) -> cst.BaseExpression:
        """`self.rotary_emb.dim` -> what the replaced module was built with for it."""
        inner = updated.value if isinstance(updated, cst.Attribute) else None
        attr = self_attribute(inner) if inner is not None else None
        value = self.built_sizes.get((self.current_class or "", attr or "", updated.attr.value))
        if value is None or self.current_function == "__init__":
            return updated
        self.context.record(
            "rotary", self.where, updated, value, "the size the replaced rotary module was built with"
        )
        return value

    def leave_SimpleStatementLine(self, original, updated: cst.SimpleStatementLine):
        if len(updated.body) != 1 or self.current_class is None:
            return updated
        small = updated.body[0]
        value = getattr(small, "value", None)
        if (
            isinstance(small, cst.Assign)
            and isinstance(value, cst.IfExp)
            and (self.current_class, self_attribute(small.targets[0].target)) in self.optional_rotary
            and self._constructing()
        ):
            self._note_inputs(value.body)
            self.rope_conditions[self.current_class] = value.test
            self.context.record(
                "rotary", self.where, updated, "", "rotary module replaced by the engine's rotary layer"
            )
            return cst.RemovalSentinel.REMOVE
        if isinstance(small, cst.Assign) and isinstance(value, cst.Call):
            attr = self_attribute(innermost_call(value).func)  # `self.rotary_emb(n).to(device)` too
            target_attr = self_attribute(small.targets[0].target)
            rotary = self._rotary_class_of(attr)
            if rotary in self.self_applying and self.current_function == "forward" and len(value.args) == 2:
                return self._rotate_by_position(updated, value, self.self_applying[rotary])
            if (self.current_class, target_attr) in self.rotary_attrs and self._constructing():
                self._note_inputs(value)
                self._note_base(target_attr, value)
                self.context.record(
                    "rotary", self.where, updated, "", "rotary module replaced by the engine's rotary layer"
                )
                return cst.RemovalSentinel.REMOVE
            if (self.current_class, attr) in self.rotary_attrs:
                self._check_rescaling(attr, innermost_call(value))
                self.context.record(
                    "rotary", self.where, updated, "", "cos/sin are computed inside the engine's rotary layer"
                )
                return cst.RemovalSentinel.REMOVE
            name = call_name(value)
            if (
                name in self.apply_functions
                and self.current_function == "forward"
                and len(value.args) >= 2
                and self.current_class in self.context.index.reachable  # others are pruned
            ):
                if name in self.one_tensor:
                    return updated  # paired with its partner call by leave_FunctionDef
                targets = statement_targets(updated)
                q, k = code_of(value.args[0].value), code_of(value.args[1].value)
                new = cst.parse_statement(f"{', '.join(targets)} = self.rotary_emb(positions, {q}, {k})")
                self.applied_in[self.current_class] = self.apply_functions[name]
                if name in self.reverse_functions:
                    self.reversed_in.add(self.current_class)
                self.context.record(
                    "rotary", self.where, updated, new, "rotary embedding applied by position, per token"
                )
                return new
        return updated

    def _rotary_class_of(self, attr: str | None) -> str | None:
        if (self.current_class, attr) in self.optional_rotary:
            return self.optional_rotary[(self.current_class, attr)]
        if (self.current_class, attr) not in self.rotary_attrs:
            return None
        return self.context.index.classes[self.current_class].submodules.get(attr or "")

    def _rotate_by_position(
        self, statement: cst.SimpleStatementLine, call: cst.Call, neox: bool
    ) -> cst.BaseStatement:
        """`q, k = self.rotary(q, k)`, a module rotating q and k itself by the positions of their
        sequence axis, -> the engine's rotary layer rotating them by each token's position (only
        where the construction's condition built the module, when there is one)."""
        q, k = (code_of(a.value) for a in call.args)
        targets = ", ".join(statement_targets(statement))
        rotate = f"{targets} = self.rotary_emb(positions, {q}, {k})"
        if self.current_class in self.rope_conditions:
            new: cst.BaseStatement = cst.parse_statement(f"if self.rotary_emb is not None:\n    {rotate}\n")
        else:
            new = cst.parse_statement(rotate)
        self.applied_in[self.current_class] = neox
        rotary = self._rotary_class_of(self_attribute(call.func))
        table_dtype = _table_dtype(self.context.index.classes[rotary]) if rotary is not None else None
        if table_dtype is not None:
            self.table_dtypes[self.current_class] = table_dtype
        self.context.record(
            "rotary", self.where, statement, new, "rotary embedding applied by position, per token"
        )
        return new

    def _note_base(self, attr: str, construction: cst.Call) -> None:
        """The rope base the construction passes where it is a config field other than the
        `rope_theta` get_rope reads (`RotaryEmbedding(dim, base=config.rotary_emb_base)`)."""
        index = self.context.index
        rotary = index.classes[self.current_class].submodules.get(attr)
        init = next(
            (methods["__init__"] for methods in _method_chain(index, rotary or "") if "__init__" in methods),
            None,
        )
        base = base_param(init) if init is not None else None
        if base is None:
            return
        params = function_params(init)[1:]
        bound = dict(zip(params, (a.value for a in construction.args if a.keyword is None and not a.star)))
        bound.update({a.keyword.value: a.value for a in construction.args if a.keyword is not None})
        value = bound.get(base)
        config = next((p for p in function_params(self._current_init()) if "config" in p), None)
        if (
            isinstance(value, cst.Attribute)
            and m.matches(value.value, m.Name(config or ""))
            and value.attr.value != "rope_theta"
        ):
            self.rope_bases[self.current_class] = f'getattr({config}, "{value.attr.value}", None)'

    def _current_init(self) -> cst.FunctionDef:
        info = self.context.index.classes.get(self.current_class or "")
        return info.methods.get("__init__") if info is not None else cst.parse_statement("def f(): pass")

    def _check_rescaling(self, attr: str, call: cst.Call) -> None:
        """A review item where the call passes the rotary module a value forward computes for a
        parameter that rescales its inverse frequencies (a rope base grown with the prompt): the
        engine's rope takes its frequencies from the config alone, so the port would rotate long
        prompts by other angles than the source."""
        rotary = self.context.index.classes[self.current_class].submodules.get(attr)
        rescaling = self.rescaling.get(rotary or "", [])
        forward = self.context.index.classes[rotary].methods.get("forward") if rescaling else None
        if forward is None:
            return
        params = function_params(forward)[1:]
        for position, arg in enumerate(call.args):
            param = (
                arg.keyword.value
                if arg.keyword is not None
                else params[position]
                if position < len(params)
                else None
            )
            if param in rescaling and not isinstance(arg.value, (cst.Integer, cst.Float)):
                self.context.flag(
                    "rotary",
                    self.where,
                    f"`{rotary}` rescales its frequencies by `{param}={code_of(arg.value)}`, which forward "
                    f"computes (dynamic NTK); the engine's rope reads its frequencies from the config only",
                )

    def _constructing(self) -> bool:
        """In `__init__`, or in a helper `__init__` calls to build attributes (`self._init_rope()`)."""
        if self.current_function == "__init__":
            return True
        info = self.context.index.classes.get(self.current_class or "")
        init = info.methods.get("__init__") if info is not None else None
        return init is not None and self.current_function in init_helpers(init, info.methods)

    def leave_FunctionDef(self, original: cst.FunctionDef, updated: cst.FunctionDef):
        if (
            self.current_function == "forward"
            and len(self.function_stack) == 1
            and self.current_class in self.context.index.reachable
        ):
            updated = self._pair_one_tensor_applies(updated)
            self._note_partial_width(updated)
        return super().leave_FunctionDef(original, updated)

    def _note_partial_width(self, forward: cst.FunctionDef) -> None:
        """Where q and k are rotated on slices of their features (`q_rot = q[..., :w]`, the rotated
        parts concatenated back with the rest), the rotated width is `w`: the engine's rotary layer
        takes it from there rather than from a config field it may not have."""
        info = self.context.plan.attention.get(self.current_class or "")
        if info is None or not info.core_args or self.current_class in self.rotary_dims:
            return
        q, k = info.core_args[:2]
        body = list(forward.body.body)
        rotated = [
            call.args
            for call in calls_in(forward.body)
            if dotted_name(call.func) == "self.rotary_emb" and len(call.args) == 3
        ]
        parts = _parts_of(body, {q, k})
        widths = _rotated_widths(body, {q, k})
        if len(rotated) == 1 and {code_of(a.value) for a in rotated[0][1:]} <= parts and len(widths) == 1:
            self.rotary_dims[self.current_class] = next(iter(widths))

    def _pair_one_tensor_applies(self, forward: cst.FunctionDef) -> cst.FunctionDef:
        """`apply(x, sin, cos)` called once for q and once for k (GPT-J, CodeGen), possibly on the
        first `rotary_dim` features only (`q_rot = q[..., :rotary_dim]`, rotated, concatenated back),
        in one run of top-level statements of forward that ends with q and k rotated: the run becomes
        `q, k = self.rotary_emb(positions, q, k)`, with the rotated width passed to `get_rope`."""
        body = list(forward.body.body)
        hits = [i for i, s in enumerate(body) if any(call_name(c) in self.one_tensor for c in calls_in(s))]
        if not hits:
            return forward
        info = self.context.plan.attention.get(self.current_class or "")
        names = sorted(
            {call_name(c) for i in hits for c in calls_in(body[i]) if call_name(c) in self.one_tensor}
        )
        region = body[hits[0] : hits[-1] + 1]
        q, k = (info.core_args or [None, None])[:2] if info is not None else (None, None)
        assigned = set().union(*(names_bound(s) for s in region))
        widths = _rotated_widths(region, {q, k})
        parts = _parts_of(region, {q, k})  # `q_rot = q[..., :w]`, `q_pass = q[..., w:]`
        after = body[hits[-1] + 1 :]
        # what else the region binds (the table sliced per tensor, its length) is its own business
        # only if nothing after it reads it
        scratch = assigned - {q, k} - parts
        feeders = self._cos_sin_feeders(body[: hits[0]], region, after, {q, k}) if q is not None else set()
        if (
            q is None
            or len(names) != 1
            or hits != list(range(hits[0], hits[-1] + 1))
            or not {q, k} <= assigned
            or any(scratch & names_read(s) for s in after)  # it changes something else too
            or len(widths) > 1  # q and k rotated on different widths: not one rotary layer
            or not self._tests_only_rotary(forward, body, region, feeders)
        ):
            self.context.flag(
                "rotary",
                self.where,
                f"`{names[0]}` rotates one tensor per call, and porter could not pair its calls on q and k",
            )
            return forward
        new = cst.parse_statement(f"{q}, {k} = self.rotary_emb(positions, {q}, {k})")
        self.applied_in[self.current_class] = self.apply_functions[names[0]]
        if names[0] in self.reverse_functions:
            self.reversed_in.add(self.current_class)
        width = next(iter(widths), None)
        if width is not None:
            self.rotary_dims[self.current_class] = width
        self.context.record(
            "rotary",
            self.where,
            "\n".join(code_of(s).strip() for s in region),
            new,
            "q and k rotated together by position, per token"
            + (f" (the first {width} features)" if width else ""),
        )
        for position in feeders:
            self.context.record(
                "rotary",
                self.where,
                body[position],
                "",
                "it only fed cos/sin to the rotation the rotary layer does",
            )
        body[hits[0] : hits[-1] + 1] = [new]
        body = [s for position, s in enumerate(body) if position not in feeders]
        return forward.with_changes(body=forward.body.with_changes(body=body))

    def _tests_only_rotary(
        self, forward: cst.FunctionDef, body: list, region: list, feeders: set[int]
    ) -> bool:
        """Whether every `if` in the rotation region tests only what the rotary module gave (`if
        emb is not None:`, its producer gone or dropped with the feeders): a test of anything else
        (a flag, an input) decides whether to rotate, which the replacement would not keep."""
        # an `if` with an `else` rotates in either branch (partial or whole features); one without
        # may not rotate at all
        tests = [n.test for s in region for n in nodes_of(s, cst.If) if n.orelse is None]
        if not tests:
            return True
        kept = [s for p, s in enumerate(body) if p not in feeders and all(s is not r for r in region)]
        defined = set(function_params(forward)).union(*(names_bound(s) for s in kept))
        return not any(names_in(t) & defined for t in tests)

    def _cos_sin_feeders(self, before: list, region: list, after: list, rotated: set[str]) -> set[int]:
        """Positions in `before` of the statements that only compute what the rotation region reads
        besides q and k (`embed_positions = self._get_embed_positions(position_ids)`, the gather, the
        cos/sin split), as long as they run no submodule of the class."""
        modules = set(self.context.index.classes[self.current_class].init_calls)
        needed = set().union(*(names_read(s) for s in region)) - rotated
        dropped: set[int] = set()
        for position in reversed(range(len(before))):
            statement = before[position]
            # an `if` counts when all it does is bind names (`if isinstance(emb, tuple): ...`)
            targets = (
                set(statement_targets(statement))
                if isinstance(statement, cst.SimpleStatementLine)
                else names_bound(statement)
                if isinstance(statement, cst.If) and _only_binds(statement)
                else set()
            )
            readers = [s for p, s in enumerate(before) if p != position and p not in dropped] + after
            if (
                not targets
                or not targets & needed
                or any(targets & names_read(s) for s in readers)
                or any((self_attribute(c.func) or "") in modules for c in calls_in(statement))
            ):
                continue
            dropped.add(position)
            needed |= names_read(statement)
        return dropped

    def _note_inputs(self, construction: cst.CSTNode) -> None:
        self.rotary_inputs |= {(self.current_class, a) for a in self_attributes_read(construction)}

    def _drop_rotary_builders(self, class_def: cst.ClassDef, original: cst.ClassDef) -> cst.ClassDef:
        """Drops the helpers `__init__` calls only to build the rotary module, and their calls. What
        a helper builds is read from the class as it came (this rewrite has emptied its branches)."""
        methods = {s.name.value: s for s in original.body.body if isinstance(s, cst.FunctionDef)}
        if "__init__" not in methods:
            return class_def
        builders = set()
        for helper in init_helpers(methods["__init__"], methods):
            assigned = set(init_attribute_values(methods[helper]))
            if assigned and all((class_def.name.value, a) in self.rotary_attrs for a in assigned):
                builders.add(helper)
                self._note_inputs(methods[helper])
                self.context.record(
                    "rotary", class_def.name.value, f"def {helper}", "", "it only built the rotary module"
                )
        if not builders:
            return class_def

        def keep(statement: cst.CSTNode) -> bool:
            if isinstance(statement, cst.FunctionDef):
                return statement.name.value not in builders
            return calls_method(statement) not in builders

        def kept(statements) -> list[cst.BaseStatement]:
            """`statements` without the builder calls; an `if` that only called one goes too."""
            result = []
            for statement in statements:
                if isinstance(statement, cst.If) and statement.orelse is None:
                    inner = kept(statement.body.body)
                    if not inner:
                        continue
                    statement = statement.with_changes(body=statement.body.with_changes(body=inner))
                if keep(statement):
                    result.append(statement)
            return result

        body = []
        for statement in class_def.body.body:
            if isinstance(statement, cst.FunctionDef) and statement.name.value == "__init__":
                init_body = kept(statement.body.body)
                statement = statement.with_changes(body=statement.body.with_changes(body=init_body))
            if keep(statement):
                body.append(statement)
        return class_def.with_changes(body=class_def.body.with_changes(body=body))

    def leave_ClassDef(self, original: cst.ClassDef, updated: cst.ClassDef):
        name = updated.name.value
        if any(owner == name for owner, _ in self.rotary_attrs):
            updated = self._drop_rotary_builders(updated, original)
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
        width = f", rotary_dim={self.rotary_dims[class_name]}" if class_name in self.rotary_dims else ""
        layer_type = ""
        if self.per_layer_type:
            type_of_layer = _layer_type_expression(init)
            if type_of_layer is None:
                self.context.flag(
                    "rotary",
                    class_name,
                    "the rope differs per layer type, and this class keeps no layer type",
                )
                return init
            layer_type = f", layer_type={type_of_layer}"
        reverse = ", reverse=True" if class_name in self.reversed_in else ""
        base = f", rope_theta={self.rope_bases[class_name]}" if class_name in self.rope_bases else ""
        table = f", table_dtype={self.table_dtypes[class_name]}" if class_name in self.table_dtypes else ""
        rope = (
            f"get_rope({config}, {info.head_dim}{width}, is_neox_style={neox}{layer_type}{reverse}{base}"
            f"{table})"
        )
        condition = self.rope_conditions.get(class_name)
        if condition is not None:
            rope = f"{rope} if {code_of(condition)} else None"
        statement = cst.parse_statement(f"self.rotary_emb = {rope}")
        self.context.need("engine.layers", "get_rope")
        self.context.record(
            "rotary", class_name, "", statement, "the engine's rotary layer, configured from the config"
        )
        return init.with_changes(body=init.body.with_changes(body=[*init.body.body, statement]))


def _only_binds(statement: cst.If) -> bool:
    """An `if` whose every branch only assigns plain names (or passes)."""
    for line in nodes_of(statement, cst.SimpleStatementLine):
        for small in line.body:
            if isinstance(small, cst.Pass):
                continue
            if not isinstance(small, cst.Assign) or not all(
                isinstance(t.target, cst.Name) for t in small.targets
            ):
                return False
    return not nodes_of(statement, (cst.For, cst.While, cst.With, cst.Try, cst.FunctionDef))


def _parts_of(region: list[cst.BaseStatement], tensors: set[str]) -> set[str]:
    """Names `region` assigns from a slice of one of `tensors` (`k_rot = key[:, :, :, :rotary_dim]`)."""
    found: set[str] = set()
    for statement in region:
        for line in nodes_of(statement, cst.SimpleStatementLine):
            small = line.body[0]
            if (
                isinstance(small, cst.Assign)
                and isinstance(small.value, cst.Subscript)
                and isinstance(small.value.value, cst.Name)
                and small.value.value.value in tensors
            ):
                found.update(statement_targets(line))
    return found


def _rotated_widths(region: list[cst.BaseStatement], tensors: set[str]) -> set[str]:
    """Each `w` of a `t[..., :w]` slice of q or k in `region`: the features the rotation covers."""
    widths: set[str] = set()

    class _Slices(cst.CSTVisitor):
        def visit_Subscript(self, node: cst.Subscript) -> None:
            last = node.slice[-1].slice
            if (
                isinstance(node.value, cst.Name)
                and node.value.value in tensors
                and isinstance(last, cst.Slice)
                and last.lower is None
                and last.upper is not None
            ):
                widths.add(code_of(last.upper))

    for statement in region:
        statement.visit(_Slices())
    return widths


class _DropRotaryOnlyAttributes(ClassScopedTransformer):
    """`self.rope_theta = ...` in `__init__` goes once the rotary module that read it is gone and
    nothing else in the file reads the attribute."""

    def __init__(self, context: PortContext, candidates: set[tuple[str, str]]) -> None:
        super().__init__(context)
        self.candidates = candidates
        self.read_anywhere: set[str] = set()

    def visit_Module(self, node: cst.Module) -> bool:
        reads: set[str] = set()

        class _Reads(cst.CSTVisitor):
            def visit_AssignTarget(self, target: cst.AssignTarget) -> bool:
                return False

            def visit_Attribute(self, attribute: cst.Attribute) -> None:
                # `self.x` and `self.attn.x` read the attribute; `config.x` is the config's field
                if self_attribute(attribute) is not None or isinstance(attribute.value, cst.Attribute):
                    reads.add(attribute.attr.value)

        node.visit(_Reads())
        self.read_anywhere = reads
        return True

    def leave_SimpleStatementLine(self, original, updated: cst.SimpleStatementLine):
        if self.current_function != "__init__" or len(updated.body) != 1:
            return updated
        small = updated.body[0]
        if not isinstance(small, cst.Assign) or len(small.targets) != 1:
            return updated
        attr = self_attribute(small.targets[0].target)
        if (self.current_class, attr) not in self.candidates or attr in self.read_anywhere:
            return updated
        if _calls_module(small.value):
            return updated  # building a module is more than holding a number
        self.context.record("rotary", self.where, updated, "", "only the rotary module read it")
        return cst.RemovalSentinel.REMOVE


def _calls_module(node: cst.CSTNode) -> bool:
    return any(self_attribute(c.func) is not None for c in calls_in(node))
