"""Data flow through rotary code that works on angle tables rather than cos/sin pairs.

Some rotary modules return the angles themselves (`freqs`, position x inverse frequency) and leave
cos and sin to the function that rotates one tensor by them (`apply(t, freqs)`); some take, besides
the table's length, an argument that rescales their inverse frequencies on every call (a rope base
recomputed from a factor forward works out). Both are found by following names through assignments,
not by what they are called.
"""

from __future__ import annotations

import libcst as cst

from porter.analysis.cst_utils import call_name, code_of, function_params, names_in, nodes_of

ANGLE_FUNCTIONS = ("cos", "sin")
FREQUENCY_ATTRIBUTE = "self.inv_freq"  # HF's name for a rotary module's inverse frequencies
PLACEMENT = ("device", "dtype")
CASTS = ("to", "type_as", "type")


def angle_table_param(function: cst.FunctionDef) -> str | None:
    """The parameter after the first that `function` takes rotation angles by: both `cos` and `sin`
    are taken of it or of a value computed from it (`freqs.cos()`, `torch.sin(f)` with
    `f = freqs[...]`), and no parameter is itself a cos or sin table."""
    params = function_params(function)
    if len(params) < 2 or {"cos", "sin"} & {p.rstrip("_") for p in params}:
        return None
    rotated = _derived(function, {params[0]})
    for param in params[1:]:
        derived = _derived(function, {param})
        taken = {
            fn
            for call in nodes_of(function, cst.Call)
            if (fn := _angle_of(call, derived, rotated)) is not None
        }
        if taken == set(ANGLE_FUNCTIONS):
            return param
    return None


def _angle_of(call: cst.Call, derived: set[str], rotated: set[str]) -> str | None:
    """`cos`/`sin` where `call` takes it (`x.cos()` or `torch.cos(x)`) of a value derived from the
    angles and not from the tensor rotated (a table built from a length and a width is no rotation)."""
    func = call.func
    if not isinstance(func, cst.Attribute) or func.attr.value not in ANGLE_FUNCTIONS:
        return None
    operand = call.args[0].value if call.args else func.value
    read = names_in(operand)
    return func.attr.value if read & derived and not read & rotated else None


def _derived(function: cst.FunctionDef, start: set[str], barrier: frozenset[str] = frozenset()) -> set[str]:
    """`start` and every name (or `self.x` attribute) assigned from one of them, to a fixed point;
    a name in `barrier` is not followed."""
    found = set(start)
    assigns = nodes_of(function, cst.Assign)
    changed = True
    while changed:
        changed = False
        for assign in assigns:
            if not (_reads(assign.value) & found):
                continue
            for target in assign.targets:
                for name in _written(target.target):
                    if name not in found and name not in barrier:
                        found.add(name)
                        changed = True
    return found


def _reads(node: cst.CSTNode) -> set[str]:
    """Names and `self.x` attributes an expression reads for its value: where a tensor is placed or
    what type it takes (`x.device`, `dtype=`, `.to(d)`) carries no number into it."""
    found: set[str] = set()

    class _Reads(cst.CSTVisitor):
        def visit_Attribute(self, attribute: cst.Attribute) -> bool:
            if attribute.attr.value in PLACEMENT:
                return False
            if isinstance(attribute.value, cst.Name) and attribute.value.value == "self":
                found.add(code_of(attribute))
            attribute.value.visit(self)
            return False

        def visit_Arg(self, arg: cst.Arg) -> bool:
            if arg.keyword is None or arg.keyword.value not in PLACEMENT:
                arg.value.visit(self)
            return False

        def visit_Call(self, call: cst.Call) -> bool:
            if isinstance(call.func, cst.Attribute) and call.func.attr.value in CASTS:
                call.func.value.visit(self)
                return False
            return True

        def visit_Name(self, name: cst.Name) -> None:
            found.add(name.value)

    node.visit(_Reads())
    return found


def _written(target: cst.BaseExpression) -> list[str]:
    if isinstance(target, cst.Name):
        return [target.value]
    if (
        isinstance(target, cst.Attribute)
        and isinstance(target.value, cst.Name)
        and target.value.value == "self"
    ):
        return [code_of(target)]
    if isinstance(target, (cst.Tuple, cst.List)):
        return [n for e in target.elements for n in _written(e.value)]
    return []


def rescaling_params(chain: list[dict[str, cst.FunctionDef]]) -> list[str]:
    """The parameters of a rotary module's `forward` that recompute its inverse frequencies and are
    not the positions: what they feed (through the module's own methods it calls with them) is
    assigned to `self.inv_freq` or registered as `inv_freq`, and nothing combines it with the
    frequencies into angles (`outer(arange(n), inv_freq)` counts positions; a rope-base factor only
    changes the frequencies themselves). `chain`: the methods of the class, then of each base
    class of this file in order (`super().forward(...)` runs the next one's)."""
    forward = _method(chain, "forward")
    if forward is None:
        return []
    found = []
    for param in function_params(forward[0])[1:]:
        reached = _reached(forward[0], {param}, chain[forward[1] :], set())
        if reached["frequencies"] and not reached["positions"]:
            found.append(param)
    return found


def _method(chain: list[dict[str, cst.FunctionDef]], name: str) -> tuple[cst.FunctionDef, int] | None:
    """The method `name` resolves to along `chain`, and the position of the class defining it."""
    return next(((methods[name], i) for i, methods in enumerate(chain) if name in methods), None)


def _reached(
    function: cst.FunctionDef, start: set[str], chain: list[dict[str, cst.FunctionDef]], seen: set
) -> dict[str, bool]:
    """Whether `start` reaches the frequencies, and the positions, in `function` (a method of
    `chain[0]`) and in the methods it calls with them."""
    derived = _derived(function, start, frozenset({FREQUENCY_ATTRIBUTE}))
    angles = _derived(function, {FREQUENCY_ATTRIBUTE})
    reached = {"frequencies": False, "positions": False}
    for assign in nodes_of(function, cst.Assign):
        written = [n for t in assign.targets for n in _written(t.target)]
        read = _reads(assign.value)
        if FREQUENCY_ATTRIBUTE in written:
            reached["frequencies"] |= bool(read & derived)
        elif read & derived and read & angles:
            reached["positions"] = True
    for returned in nodes_of(function, cst.Return):
        read = _reads(returned.value) if returned.value is not None else set()
        reached["positions"] |= bool(read & derived and read & angles)
    for call in nodes_of(function, cst.Call):
        name = call_name(call) or ""
        args = call.args
        if name.endswith("register_buffer") and args and code_of(args[0].value).strip("\"'") == "inv_freq":
            if any(_reads(a.value) & derived for a in args[1:]):
                reached["frequencies"] = True
        func = call.func
        called = None
        if isinstance(func, cst.Attribute) and m_self(func.value):
            called = _method(chain, func.attr.value)
        elif isinstance(func, cst.Attribute) and m_super(func.value) and len(chain) > 1:
            found = _method(chain[1:], func.attr.value)
            called = (found[0], found[1] + 1) if found is not None else None
        if called is not None and (id(called[0]) not in seen):
            callee = called[0]
            params = function_params(callee)[1:]
            passed = {
                (a.keyword.value if a.keyword is not None else params[i] if i < len(params) else "")
                for i, a in enumerate(args)
                if _reads(a.value) & derived
            } - {""}
            if passed:
                inner = _reached(callee, passed, chain[called[1] :], seen | {id(callee)})
                reached = {key: reached[key] or inner[key] for key in reached}
    return reached


def m_self(node: cst.BaseExpression) -> bool:
    return isinstance(node, cst.Name) and node.value == "self"


def m_super(node: cst.BaseExpression) -> bool:
    """`super()`, as a method call's receiver."""
    return isinstance(node, cst.Call) and isinstance(node.func, cst.Name) and node.func.value == "super"


def innermost_call(call: cst.Call) -> cst.Call:
    """The call a chain of method calls on its result starts from: `m(x)` of `m(x).to(d).float()`."""
    while isinstance(call.func, cst.Attribute) and isinstance(call.func.value, cst.Call):
        call = call.func.value
    return call


def base_param(init: cst.FunctionDef) -> str | None:
    """The parameter of a rotary module's `__init__` its inverse frequencies raise to the feature
    exponents (`1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))`): the rope base, whatever
    it is called, directly or through the attribute keeping it (`self.base = base`)."""
    params = function_params(init)[1:]
    kept = {
        code_of(t.target): assign.value.value
        for assign in nodes_of(init, cst.Assign)
        for t in assign.targets
        if isinstance(assign.value, cst.Name) and assign.value.value in params
    }
    for power in nodes_of(init, cst.BinaryOperation):
        if not isinstance(power.operator, cst.Power):
            continue
        if not any((call_name(c) or "").endswith("arange") for c in nodes_of(power.right, cst.Call)):
            continue
        base = code_of(power.left).strip("() ")
        if base in params:
            return base
        if base in kept:
            return kept[base]
    return None
