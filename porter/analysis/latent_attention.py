"""Multi-latent attention (MLA), recognised in an attention class by what its forward computes.

The shape read (every name is the source's own):
- keys and values come from an up-projection `self.UP(latent)` cut per head into a key part and a
  value part (`split(x, [NOPE, V], dim=-1)`), in forward or in a method forward calls with the
  latent and the rope key;
- the latent is a norm of the first part of a down-projection's output cut in two
  (`split(self.DOWN(h), [RANK, ROPE], dim=-1)`); the second part is the rope key, shared by all heads;
- the query is the concatenation of two parts of one projection's per-head view
  (`split(q, [NOPE, ROPE], dim=-1)`), that projection being one Linear or a low-rank pair with a norm
  between, possibly chosen per configuration by an `if`;
- the rope part of q and the rope key are rotated by module functions (a half-split or interleaved
  style each, an `if` picking between styles being a config setting);
- the core gets `cat(q_nope, q_rope)`, the expanded keys and the values, and its output goes to one
  output projection.

`latent_attention(index, name)` gives the pieces, None for a class without a latent, or a string
naming what it could not decide for one that has the latent but not the rest of the shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import libcst as cst
import libcst.matchers as m

from porter.analysis.cst_utils import (
    assigned_names,
    call_name,
    calls_in,
    calls_softmax,
    code_of,
    function_params,
    names_in,
    nodes_of,
    self_attribute,
    spaced,
)
from porter.analysis.model_index import LINEAR_CALLS, ModelIndex

# Methods that only re-lay a tensor out (a head view, a single-head 4-D view for HF's cache).
RELAYOUTS = {"view", "reshape", "transpose", "contiguous", "unsqueeze", "expand", "flatten"}


@dataclass(slots=True)
class LatentAttention:
    """What the latent-attention rewrite needs, as source expressions and names."""

    up: str  # the up-projection attribute (keys and values from the latent)
    down: str  # the projection whose output is cut into latent and rope key
    norm: str  # the latent's norm
    query: list[str]  # query projections, outermost (per-head output) first per configuration
    query_inner: list[str]  # projections feeding those (a low-rank query's first half)
    output: str  # the output projection
    num_heads: str
    nope: str
    rope: str
    value: str
    rank: str
    scale: str
    q_nope: str  # names in forward
    q_rope: str
    latent: str
    rope_key: str
    query_view: cst.BaseStatement  # the statement viewing q into heads
    head_size: str  # per-head size of that view
    core: cst.BaseStatement  # the core's statement
    output_name: str
    rotary: cst.BaseStatement  # the statement (or `if`) rotating q's and the key's rope parts
    neox_style: str  # expression: True where half-split, False where interleaved
    removed: list[cst.BaseStatement] = field(default_factory=list)  # query cat, key/value expansion


def latent_attention(index: ModelIndex, name: str) -> LatentAttention | str | None:
    info = index.classes[name]
    forward, init = info.methods.get("forward"), info.methods.get("__init__")
    if forward is None or init is None:
        return None
    body = list(forward.body.body)
    core_at = _core_statement(body, index.functions, info.methods)
    if core_at is None:
        return None
    core_call = _value(body[core_at])
    args = [a.value for a in core_call.args if a.keyword is None]
    if args and m.matches(args[0], m.Name("self")):
        args = args[1:]
    if len(args) < 3 or not all(isinstance(a, cst.Name) for a in args[:3]):
        return None
    query, key, value = (a.value for a in args[:3])
    expansion = _key_value_expansion(body, core_at, key, value, info.methods)
    if expansion is None:
        return None  # keys and values not made from a latent: ordinary attention
    up, nope, value_size, latent, rope_key, expansion_statement = expansion
    where = f"the latent attention of {name}"
    down_split = _split_defining(body, latent, body.index(expansion_statement))
    if down_split is None:
        return f"{where}: where its latent `{latent}` comes from (a norm of a cut projection output)"
    (down, norm, rank, rope, split_names) = down_split
    if split_names[1] != rope_key:
        return f"{where}: the rope key `{rope_key}` is not the second part of `self.{down}`'s output"
    cat_at = _assignment_of(body, query, core_at)
    cat = _value(body[cat_at]) if cat_at is not None else None
    if not (
        isinstance(cat, cst.Call)
        and call_name(cat) in ("torch.cat", "torch.concat")
        and isinstance(cat.args[0].value, (cst.Tuple, cst.List))
        and len(cat.args[0].value.elements) == 2
        and all(isinstance(e.value, cst.Name) for e in cat.args[0].value.elements)
    ):
        return f"{where}: the query `{query}` is not a concatenation of its nope and rope parts"
    q_nope, q_rope = (e.value.value for e in cat.args[0].value.elements)
    query_parts = _query_parts(body, q_nope, q_rope, cat_at)
    if isinstance(query_parts, str):
        return f"{where}: {query_parts}"
    query_view, head_size, query_outer, query_inner, q_nope_size, q_rope_size = query_parts
    if spaced(code_of(q_nope_size)) != spaced(nope) or spaced(code_of(q_rope_size)) != spaced(rope):
        return f"{where}: the query's parts ({code_of(q_nope_size)}, {code_of(q_rope_size)}) differ from the key's ({nope}, {rope})"
    rotary = _rotary_statement(body, q_rope, rope_key, cat_at, index.functions)
    if isinstance(rotary, str):
        return f"{where}: {rotary}"
    output = _output_projection(body, core_at)
    if output is None:
        return f"{where}: no output projection applied to the core's output"
    output_name, output_attr = output
    heads = _heads_of(init, up, nope, value_size)
    if heads is None:
        return f"{where}: the head count (`self.{up}`'s output is not heads * ({nope} + {value_size}))"
    scale = next(
        (code_of(a.value) for a in core_call.args if a.keyword and a.keyword.value in ("scaling", "scale")),
        None,
    )
    if scale is None:
        return f"{where}: the softmax scale (the core is passed no `scaling=`)"
    config = function_params(init)[1] if len(function_params(init)) > 1 else None
    for size in (heads, nope, rope, value_size, rank, scale):
        stray = names_in(cst.parse_expression(size)) - {"self", config}
        if stray:
            return f"{where}: `{size}` reads {', '.join(sorted(stray))}, which `__init__` does not have"
    return LatentAttention(
        up=up,
        down=down,
        norm=norm,
        query=query_outer,
        query_inner=query_inner,
        output=output_attr,
        num_heads=heads,
        nope=nope,
        rope=rope,
        value=value_size,
        rank=rank,
        scale=scale,
        q_nope=q_nope,
        q_rope=q_rope,
        latent=latent,
        rope_key=rope_key,
        query_view=query_view,
        head_size=head_size,
        core=body[core_at],
        output_name=output_name,
        rotary=rotary[0],
        neox_style=rotary[1],
        removed=[body[cat_at], expansion_statement],
    )


def _value(statement: cst.CSTNode) -> cst.BaseExpression | None:
    if isinstance(statement, cst.SimpleStatementLine) and isinstance(
        statement.body[0], (cst.Assign, cst.AnnAssign, cst.Expr)
    ):
        return statement.body[0].value
    return None


def _targets(statement: cst.CSTNode) -> list[str]:
    if isinstance(statement, cst.SimpleStatementLine) and isinstance(statement.body[0], cst.Assign):
        return [n for t in statement.body[0].targets for n in assigned_names(t.target)]
    if isinstance(statement, cst.SimpleStatementLine) and isinstance(statement.body[0], cst.AnnAssign):
        return assigned_names(statement.body[0].target)
    if isinstance(statement, cst.If):
        return sorted({n for line in nodes_of(statement, cst.SimpleStatementLine) for n in _targets(line)})
    return []


def _core_statement(body, functions, methods) -> int | None:
    """Index of the statement calling the attention core: the interface dispatch, or a function or
    method of the file computing a softmax."""
    dispatch_names = {
        t
        for s in body
        for t in _targets(s)
        if "ALL_ATTENTION_FUNCTIONS" in code_of(_value(s) or cst.Name("x"))
    }
    for position, statement in enumerate(body):
        call = _value(statement)
        if not isinstance(call, cst.Call):
            continue
        name = call_name(call) or ""
        method = self_attribute(call.func)
        if (
            name in dispatch_names
            or (name in functions and calls_softmax(code_of(functions[name])))
            or (method in methods and calls_softmax(code_of(methods[method])))
        ):
            return position
    return None


def _assignment_of(body, name: str, before: int) -> int | None:
    """Index of the last statement before `before` binding `name`."""
    for position in range(before - 1, -1, -1):
        if name in _targets(body[position]):
            return position
    return None


def _strip_relayouts(node: cst.BaseExpression) -> cst.BaseExpression:
    while (
        isinstance(node, cst.Call)
        and isinstance(node.func, cst.Attribute)
        and node.func.attr.value in RELAYOUTS
    ):
        node = node.func.value
    return node


def _origin(body, name: str, before: int) -> tuple[cst.BaseExpression | None, int | None]:
    """What `name` holds before statement `before`, through re-layouts of itself (`x = x.view(...)`)."""
    while True:
        at = _assignment_of(body, name, before)
        if at is None:
            return None, None
        value = _value(body[at])
        if value is None:
            return None, at
        stripped = _strip_relayouts(value)
        if isinstance(stripped, cst.Name) and stripped.value == name and stripped is not value:
            before = at
            continue
        return stripped, at


def _split(statement: cst.CSTNode) -> tuple[cst.BaseExpression, list[str], list[str]] | None:
    """(what is cut, the part sizes, the target names) of `a, b = split(x, [A, B], dim=-1)`."""
    value = _value(statement)
    if not isinstance(value, cst.Call) or not value.args:
        return None
    if call_name(value) == "torch.split" and len(value.args) >= 2:
        source, sizes = value.args[0].value, value.args[1].value
    elif isinstance(value.func, cst.Attribute) and value.func.attr.value == "split":
        source, sizes = value.func.value, value.args[0].value
    else:
        return None
    if not isinstance(sizes, (cst.List, cst.Tuple)) or len(sizes.elements) != 2:
        return None
    return source, [code_of(e.value) for e in sizes.elements], _targets(statement)


def _key_value_expansion(body, core_at: int, key: str, value: str, methods):
    """(up attribute, nope size, value size, latent name, rope key name, statement) where key and
    value come from one call of a method of the class given the latent and the rope key."""
    at = _assignment_of(body, key, core_at)
    if at is None or _targets(body[at]) != [key, value]:
        return None
    call = _value(body[at])
    method = self_attribute(call.func) if isinstance(call, cst.Call) else None
    helper = methods.get(method or "")
    args = [a.value for a in call.args] if helper is not None else []
    if helper is None or len(args) != 2 or not all(isinstance(a, cst.Name) for a in args):
        return None
    params = function_params(helper)[1:3]
    helper_body = list(helper.body.body)
    for position, statement in enumerate(helper_body):
        cut = _split(statement)
        if cut is None or not isinstance(cut[0], cst.Name):
            continue
        source, _ = _origin(helper_body, cut[0].value, position)
        if not (isinstance(source, cst.Call) and self_attribute(source.func) and source.args):
            continue
        argument = source.args[0].value
        if isinstance(argument, cst.Name) and argument.value in params:
            latent_param = argument.value
            rope_param = next(p for p in params if p != latent_param)
            by_param = dict(zip(params, (a.value for a in args)))
            return (
                self_attribute(source.func),
                cut[1][0],
                cut[1][1],
                by_param[latent_param],
                by_param[rope_param],
                body[at],
            )
    return None


def _split_defining(body, name: str, before: int):
    """(down attribute, norm attribute, first size, second size, split targets) for a latent that
    is `self.NORM(part)` of `part, rope = split(self.DOWN(x), [RANK, ROPE], dim=-1)`."""
    source, at = _origin(body, name, before)
    if not (isinstance(source, cst.Call) and self_attribute(source.func) and source.args):
        return None
    norm = self_attribute(source.func)
    part = _strip_relayouts(source.args[0].value)
    if not isinstance(part, cst.Name):
        return None
    split_at = _assignment_of(body, part.value, at)
    cut = _split(body[split_at]) if split_at is not None else None
    if cut is None or cut[2][0] != part.value or not isinstance(cut[0], cst.Name):
        return None
    down, _ = _origin(body, cut[0].value, split_at)
    if not (isinstance(down, cst.Call) and self_attribute(down.func)):
        return None
    return self_attribute(down.func), norm, cut[1][0], cut[1][1], cut[2]


def _query_parts(body, q_nope: str, q_rope: str, before: int):
    """(head view statement, per-head size, outer projections, inner projections, nope size, rope size)."""
    split_at = _assignment_of(body, q_nope, before)
    cut = _split(body[split_at]) if split_at is not None else None
    if cut is None or cut[2] != [q_nope, q_rope] or not isinstance(cut[0], cst.Name):
        return f"`{q_nope}` and `{q_rope}` are not the two parts of one split query"
    name = cut[0].value
    view_at = _assignment_of(body, name, split_at)
    view = _value(body[view_at]) if view_at is not None else None
    calls = [c for c in calls_in(view) if isinstance(c.func, cst.Attribute)] if view is not None else []
    shape = next((c for c in calls if c.func.attr.value in ("view", "reshape")), None)
    stripped = _strip_relayouts(view) if view is not None else None
    if shape is None or not (isinstance(stripped, cst.Name) and stripped.value == name):
        return f"the query `{name}` is not viewed into heads before it is split"
    dims = shape.args[0].value if len(shape.args) == 1 else None
    if isinstance(dims, cst.Name):
        dims_at = _assignment_of(body, dims.value, view_at)
        dims = _value(body[dims_at]) if dims_at is not None else None
    elements = (
        [e.value for e in dims.elements]
        if isinstance(dims, (cst.Tuple, cst.List))
        else [a.value for a in shape.args]
    )
    if not elements:
        return f"the per-head size of the query view of `{name}`"
    projections_at = _assignment_of(body, name, view_at)
    outer, inner = [], []
    for line in nodes_of(body[projections_at], cst.SimpleStatementLine) if projections_at is not None else []:
        value = _value(line)
        if name not in _targets(line) or not isinstance(value, cst.Call) or not self_attribute(value.func):
            return f"the query `{name}` is not a projection's output"
        outer.append(self_attribute(value.func))
        inner += [self_attribute(c.func) for c in calls_in(value)[1:] if self_attribute(c.func)]
    if not outer:
        return f"the projection the query `{name}` comes from"
    return (
        body[view_at],
        code_of(elements[-1]),
        outer,
        inner,
        cst.parse_expression(cut[1][0]),
        cst.parse_expression(cut[1][1]),
    )


def _interleaved(function: cst.FunctionDef, functions: dict[str, cst.FunctionDef]) -> bool:
    """A rotation of adjacent feature pairs: strided slices `x[..., ::2]`, or the features read as
    complex numbers (`view_as_complex` of pairs); otherwise the halves are rotated (rotate_half)."""
    called = [
        f
        for n, f in functions.items()
        if f is not function and any(call_name(c) == n for c in calls_in(function))
    ]
    for part in (function, *called):
        if m.findall(part, m.Slice(step=m.Integer("2"))):
            return True
        if any((call_name(c) or "").endswith("view_as_complex") for c in calls_in(part)):
            return True
    return False


def _rotary_statement(body, q_rope: str, rope_key: str, before: int, functions):
    """(statement, neox-style expression) for the rotation of q's rope part and the rope key: one call
    of a module function, or an `if` choosing between two by a setting."""
    for position in range(before - 1, -1, -1):
        statement = body[position]
        if not {q_rope, rope_key} <= set(_targets(statement)):
            continue
        if isinstance(statement, cst.If):
            branches = [
                statement.body,
                statement.orelse.body if isinstance(statement.orelse, cst.Else) else None,
            ]
            if branches[1] is None or len(branches[0].body) != 1 or len(branches[1].body) != 1:
                return "the rotation of the rope parts is chosen in a way other than one `if`/`else`"
            styles = [_rotation_style(b.body[0], q_rope, rope_key, functions) for b in branches]
            if any(s is None for s in styles):
                return "a rotation of the rope parts that is not a call of a module function"
            if styles[0] == styles[1]:
                return statement, str(not styles[0])
            test = code_of(statement.test)
            return statement, (f"not {test}" if styles[0] else test)
        style = _rotation_style(statement, q_rope, rope_key, functions)
        if style is None:
            return "a rotation of the rope parts that is not a call of a module function"
        return statement, str(not style)
    return f"no rotation of `{q_rope}` and `{rope_key}`"


def _rotation_style(statement, q_rope: str, rope_key: str, functions) -> bool | None:
    """True for interleaved pairs, False for half-split; None if the statement is no such rotation."""
    call = _value(statement)
    name = call_name(call) if isinstance(call, cst.Call) else None
    if name not in functions or _targets(statement) != [q_rope, rope_key]:
        return None
    return _interleaved(functions[name], functions)


def _output_projection(body, core_at: int) -> tuple[str, str] | None:
    """(core output name, output projection attribute): `out = self.O(out)` after the core."""
    targets = _targets(body[core_at])
    if not targets:
        return None
    name = targets[0]
    for statement in body[core_at + 1 :]:
        value = _value(statement)
        if (
            isinstance(value, cst.Call)
            and self_attribute(value.func)
            and value.args
            and isinstance(_strip_relayouts(value.args[0].value), cst.Name)
            and _strip_relayouts(value.args[0].value).value == name
        ):
            return name, self_attribute(value.func)
    return None


def _heads_of(init: cst.FunctionDef, up: str, nope: str, value_size: str) -> str | None:
    """H in the up-projection's output size `H * (NOPE + V)`."""
    for call in linear_calls(init).get(up, []):
        if len(call.args) < 2:
            continue
        size = call.args[1].value
        if isinstance(size, cst.BinaryOperation) and isinstance(size.operator, cst.Multiply):
            per_head = {spaced(f"{nope} + {value_size}"), spaced(f"({nope} + {value_size})")}
            if spaced(code_of(size.right)) in per_head:
                return code_of(size.left)
            if spaced(code_of(size.left)) in per_head:
                return code_of(size.right)
    return None


def linear_calls(init: cst.FunctionDef) -> dict[str, list[cst.Call]]:
    """self.<attr> -> the Linear constructions assigned to it in `__init__` (also inside `a if c else b`)."""
    found: dict[str, list[cst.Call]] = {}
    for assign in nodes_of(init, cst.Assign):
        attr = self_attribute(assign.targets[0].target)
        if attr is None:
            continue
        for call in calls_in(assign.value):
            if call_name(call) in LINEAR_CALLS:
                found.setdefault(attr, []).append(call)
    return found
