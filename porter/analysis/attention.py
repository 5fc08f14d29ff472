"""What an attention class computes, read from its code: which projections make q, k and v, which
one takes the output, how many heads of what size, and the attention core's arguments."""

from __future__ import annotations

from dataclasses import dataclass, field

import libcst as cst
import libcst.matchers as m

from porter.analysis.alibi import bias_inputs, mask_biases
from porter.analysis.config_branches import choice
from porter.analysis.cst_utils import (
    call_name,
    calls_in,
    calls_softmax,
    code_of,
    function_params,
    names_in,
    self_attribute,
    statement_targets,
)
from porter.analysis.head_counts import fused_heads, init_attributes, projection_heads
from porter.analysis.inline_attention import (
    ALIBI,
    branch_cores,
    inline_core,
    only_reshapes,
    relayouts,
    scores_scale,
)
from porter.analysis.model_index import SDPA_CALLS, ClassInfo, ModelIndex, core_modules

HEAD_DIM_WORDS = ("head_dim", "head_size", "attention_head_size", "hidden_size_per_attention_head")


@dataclass(slots=True)
class AttentionInfo:
    name: str
    core: cst.Call  # the call that computes attention (HF interface or eager function)
    core_statement: cst.SimpleStatementLine
    other_cores: list[cst.SimpleStatementLine]  # alternative backends in other branches (upcast/eager paths)
    query: str  # projection attributes; the same one three times for a fused projection
    key: str
    value: str
    output: str | None
    head_dim: str  # expressions valid inside __init__
    num_heads: str
    num_kv_heads: str
    # An eager core written inline in forward: the top-level statements [start, end] it spans.
    inline_region: tuple[int, int] | None = None
    inline_output: str | None = None  # the variable the region leaves the attention output in
    inline_scale: str | None = None
    alibi: bool = False  # the scores add an ALiBi bias
    merged_heads: bool = False  # the region ended by merging heads: the output is [T, H*D]
    core_args: list[str] | None = None  # the q, k, v variables the core reads
    # top-level statements before an inline core that only re-lay out q, k or v (they go with it)
    inline_relayouts: list[int] = field(default_factory=list)
    alibi_scale: str | None = None  # a factor the scores' ALiBi bias is multiplied by
    alibi_condition: str | None = None  # the configuration test under which the bias is added
    alibi_problem: str | None = None  # why the bias a called core's mask carries cannot be ported
    # Inline cores in the branches of a top-level `if` of forward: its position, and per branch
    # (condition, statements, core) as `branch_cores` finds them.
    branch_if: int | None = None
    branch_cores: list[tuple] = field(default_factory=list)
    # `k = repeat_kv(k, groups)` just before a called core: PagedAttention reads KV heads unrepeated
    kv_repeats: list[cst.SimpleStatementLine] = field(default_factory=list)
    # `out = self._merge_heads(out, ...)` right after a called core: the paged call's `.flatten(1)`
    head_merges: list[cst.SimpleStatementLine] = field(default_factory=list)
    # the scale a called core of this file applies itself (GPT-Neo's `_attn`: none, "1.0")
    callee_scale: str | None = None
    # a local-attention window cut into a causal-mask buffer in __init__ (`tril(bias, -window)`)
    band_window: str | None = None
    # the window is the one the backbone gives transformers' mask helper (`porter.analysis.mask_windows`)
    window_from_mask_helper: bool = False


def analyse_attention(index: ModelIndex, name: str) -> AttentionInfo | None:
    info = index.classes[name]
    forward = info.methods.get("forward")
    if forward is None:
        return None
    statements = _flat_statements(forward.body.body)
    sdpa = _only_sdpa(forward, info, index)
    cores = [i for i, s in enumerate(statements) if _core_call(s, info, index, sdpa)]
    inline = branches = None
    if cores:
        # Several backends in branches: take HF's interface dispatch, whose arguments are the standard ones.
        core_at = next(
            (
                i
                for i in cores
                if call_name(_core_call(statements[i], info, index, sdpa)) == "attention_interface"
            ),
            cores[0],
        )
        core = _core_call(statements[core_at], info, index, sdpa)
        other_cores = [statements[i] for i in cores if i != core_at]
        positional = [a.value for a in core.args if a.keyword is None and not a.star]
        if positional and code_of(positional[0]) == "self":
            positional = positional[1:]
        if len(positional) < 3:
            return None
        names = [code_of(p) for p in positional[:3]]
        masks = positional[3:4] + [
            a.value for a in core.args if m.matches(a.keyword, m.Name("attention_mask"))
        ]
        mask_bias = mask_biases(index).get(name, {}).get(code_of(masks[0])) if masks else None
        before, after, core_statement = statements[:core_at], statements[core_at + 1 :], statements[core_at]
        kv_repeats = _kv_repetitions(before, set(names[1:]) - {names[0]}, index)
    else:
        body = list(forward.body.body)
        bias = ALIBI | bias_inputs(index).get(name, set())
        inline, branches = inline_core(body, info, bias), None
        if inline is None:
            branches = branch_cores(body, info, bias)
            if branches is None:
                return None
            _, block, inline = branches[1][0]
        start, end = inline["region"]
        core, core_statement, other_cores = None, (block if branches else body)[end], []
        mask_bias = None
        names, kv_repeats = inline["qkv"], []
        if branches is None:
            before, after = _flat_statements(body[:start]), _flat_statements(body[end + 1 :])
        else:
            before = _flat_statements(body[: branches[0]]) + _flat_statements(block[:start])
            after = _flat_statements(block[end + 1 :])
    linears = set(info.linears())
    q, k, v = (_source_projection(name, before, linears, set(index.functions)) for name in names)
    if None in (q, k, v):
        return None
    output_vars = set(statement_targets(core_statement)) if inline is None else {inline["output"]}
    output = _consumer(output_vars, after, linears)
    head_dim = next((f"self.{a}" for a in init_attributes(info) if a in HEAD_DIM_WORDS), None)
    if head_dim is None:
        return None
    if q == k == v:  # one projection makes q, k and v
        counts = fused_heads(info, q, head_dim)
        if counts is None:
            return None
        num_heads, num_kv_heads = counts
    else:
        num_heads = projection_heads(info, q, head_dim)
        num_kv_heads = num_heads if k == q else projection_heads(info, k, head_dim)
    result = AttentionInfo(
        name, core, core_statement, other_cores, q, k, v, output, head_dim, num_heads, num_kv_heads
    )
    result.core_args = names
    result.kv_repeats = kv_repeats
    if inline is None:
        result.head_merges = _head_merges(statement_targets(core_statement)[:1], after, info)
        if not any(a.keyword is not None and a.keyword.value == "scaling" for a in core.args):
            result.callee_scale = _callee_scale(core, info, index, head_dim)
    if mask_bias is not None:  # the backbone folded its ALiBi bias into the mask the core adds
        result.alibi, result.alibi_scale = True, mask_bias.scale
        result.alibi_condition, result.alibi_problem = mask_bias.condition, mask_bias.problem
        if "config" not in function_params(info.methods["__init__"]) and (
            mask_bias.scale or mask_bias.condition
        ):
            result.alibi_problem = (
                "the ALiBi bias's factor or test reads `config`, which the constructor does not take"
            )
    result.band_window = _band_window(info)
    if result.band_window is None:
        result.band_window = backbone_mask_window(index, info)
        result.window_from_mask_helper = result.band_window is not None
    if inline is not None:
        result.inline_region = inline["region"]
        result.inline_output = inline["output"]
        result.inline_scale = inline["scale"]
        result.alibi = inline["alibi"]
        result.merged_heads = inline["merged"]
        result.inline_relayouts = inline["relayouts"]
        result.alibi_scale = inline["alibi_scale"]
    if branches is not None:
        _with_branch_cores(result, branches, body, info)
    return result


def _callee_scale(core: cst.Call, info: ClassInfo, index: ModelIndex, head_dim: str) -> str | None:
    """The scale a core that is a method or function of this file applies to its scores, in terms
    the constructor can evaluate (its parameters replaced by the call's arguments, the last size of
    the q, k or v it takes by `head_dim`); None when it cannot be read or depends on the callee's
    own locals."""
    method = self_attribute(core.func)
    callee = info.methods.get(method) if method else index.functions.get(call_name(core) or "")
    if callee is None or (found := scores_scale(list(callee.body.body))) is None:
        return None
    params = [p.name.value for p in callee.params.params]
    arguments = {"self": "self"} if method else {}
    positional = [a.value for a in core.args if a.keyword is None and not a.star]
    arguments.update(zip(params[1:] if method else params, (code_of(v) for v in positional)))
    arguments.update({a.keyword.value: code_of(a.value) for a in core.args if a.keyword is not None})
    qkv = set((params[1:] if method else params)[: min(3, len(positional))])
    scale = cst.parse_expression(found).visit(_HeadSizes(qkv, head_dim))
    unbound = names_in(scale) & (set(params) - set(arguments))  # a parameter the call leaves at its default
    if unbound or names_in(scale) - set(params) - {"math", "torch"}:  # or a local of the callee
        return None

    class _Substitute(cst.CSTTransformer):
        def leave_Name(self, original: cst.Name, updated: cst.Name) -> cst.BaseExpression:
            if updated.value not in arguments or arguments[updated.value] == updated.value:
                return updated
            value = cst.parse_expression(arguments[updated.value])
            atom = isinstance(
                value, (cst.Name, cst.Attribute, cst.Subscript, cst.Call, cst.Integer, cst.Float)
            )
            return value if atom else cst.parse_expression(f"({arguments[updated.value]})")

    return code_of(scale.visit(_Substitute()))


class _HeadSizes(cst.CSTTransformer):
    """`v.size(-1)` or `v.shape[-1]` of a q, k or v the core takes -> the head size: each head's
    features are the last axis of all three."""

    def __init__(self, tensors: set[str], head_dim: str) -> None:
        self.tensors, self.head_dim = tensors, head_dim

    def _last_size_of(self, node: cst.BaseExpression) -> bool:
        last = m.UnaryOperation(operator=m.Minus(), expression=m.Integer("1"))
        tensor = m.OneOf(*(m.Name(t) for t in self.tensors)) if self.tensors else None
        if tensor is None:
            return False
        return m.matches(
            node,
            m.Call(func=m.Attribute(value=tensor, attr=m.Name("size")), args=[m.Arg(value=last)])
            | m.Subscript(
                value=m.Attribute(value=tensor, attr=m.Name("shape")),
                slice=[m.SubscriptElement(slice=m.Index(value=last))],
            ),
        )

    def leave_Call(self, original: cst.Call, updated: cst.Call) -> cst.BaseExpression:
        return cst.parse_expression(self.head_dim) if self._last_size_of(updated) else updated

    def leave_Subscript(self, original: cst.Subscript, updated: cst.Subscript) -> cst.BaseExpression:
        return cst.parse_expression(self.head_dim) if self._last_size_of(updated) else updated


def _band_window(info: ClassInfo) -> str | None:
    """`window` (or `window if test else None`) where `__init__` cuts `torch.tril(mask, -window)` out
    of a causal mask, at its top level or under one `if`: GPT-Neo's local attention layers."""
    init = info.methods.get("__init__")
    for statement in init.body.body if init is not None else []:
        test, block = None, [statement]
        if isinstance(statement, cst.If) and statement.orelse is None:
            test, block = code_of(statement.test), list(statement.body.body)
        for call in (c for inner in block for c in calls_in(inner)):
            if call_name(call) == "torch.tril" and len(call.args) >= 2:
                diagonal = call.args[1].value
                if isinstance(diagonal, cst.UnaryOperation) and isinstance(diagonal.operator, cst.Minus):
                    window = code_of(diagonal.expression)
                    return window if test is None else f"{window} if {test} else None"
    return None


def backbone_mask_window(index: ModelIndex, attention: ClassInfo) -> str | None:
    """The window the backbone builds its attention mask with, in the terms of the attention's
    constructor: 4.3x files cut the window into the 4-D mask every layer receives
    (`_prepare_4d_causal_attention_mask(..., sliding_window=self.config.sliding_window)`) instead of
    giving it to the attention. `self.config` of the backbone becomes the `config` the attention's
    constructor takes; anything else the backbone computes cannot be read there."""
    backbone = index.classes.get(index.backbone or "")
    forward = backbone.methods.get("forward") if backbone is not None else None
    init = attention.methods.get("__init__")
    if forward is None or init is None or "config" not in function_params(init):
        return None
    window_argument = m.Arg(keyword=m.Name("sliding_window"))
    for call in m.findall(forward, m.Call(args=[m.ZeroOrMore(), window_argument, m.ZeroOrMore()])):
        value = next(a.value for a in call.args if m.matches(a, window_argument))
        own_config = m.Attribute(value=m.Name("self"), attr=m.Name("config"))
        reads = m.findall(value, m.Name("self"))
        if len(reads) != len(m.findall(value, own_config)) or not reads:
            return None
        return code_of(m.replace(value, own_config, cst.Name("config")))
    return None


def _with_branch_cores(result: AttentionInfo, branches: tuple[int, list[tuple]], body: list, info) -> None:
    """The paged attention's arguments when each branch holds its own core: the scale chosen by the
    branches' conditions (one expression where they agree), the ALiBi bias under the condition of
    the branch that adds it."""
    position, cores = branches
    result.branch_if, result.branch_cores = position, cores
    result.inline_relayouts = relayouts(body, position, set(result.core_args), info)
    scales = [(condition, core["scale"]) for condition, _, core in cores]
    result.inline_scale = choice([*scales[:-1], (None, scales[-1][1])])
    with_alibi = [(condition, core) for condition, _, core in cores if core["alibi"]]
    if with_alibi:
        condition, core = with_alibi[0]
        result.alibi, result.alibi_scale = True, core["alibi_scale"]
        result.alibi_condition = condition if len(with_alibi) < len(cores) else None


def _flat_statements(body) -> list[cst.SimpleStatementLine]:
    result = []
    for statement in body:
        if isinstance(statement, cst.SimpleStatementLine):
            result.append(statement)
        elif hasattr(statement, "body") and hasattr(statement.body, "body"):
            result.extend(_flat_statements(statement.body.body))
            orelse = getattr(statement, "orelse", None)
            while orelse is not None:  # else / elif chains
                result.extend(_flat_statements(orelse.body.body))
                orelse = getattr(orelse, "orelse", None)
    return result


def _kv_repetitions(before: list, kv: set[str], index: ModelIndex) -> list[cst.SimpleStatementLine]:
    """The statements right before the core that repeat the key/value heads for the query heads:
    `k = f(k, n)` with `f` this file's function that expands or repeats, or `repeat_interleave`."""
    found = []
    for statement in reversed(before):
        targets = statement_targets(statement)
        value = getattr(statement.body[0], "value", None)
        if len(targets) != 1 or targets[0] not in kv or not isinstance(value, cst.Call) or not value.args:
            break
        if not repeats_heads(value, index) or code_of(value.args[0].value) != targets[0]:
            break
        found.append(statement)
    return found


# Methods of a hand-written KV-head repetition: a new axis, expanded to the group size, merged back
# into the head axis (`k.unsqueeze(-2)`, `k.expand(-1, -1, -1, groups, -1)`, `k.contiguous().view(...)`).
HAND_REPEAT_METHODS = {"unsqueeze", "expand", "contiguous", "view", "reshape", "flatten"}
HAND_REPEAT_MERGES = {"view", "reshape", "flatten"}


def hand_repetitions(statements: list, kv: set[str]) -> set[int]:
    """Positions in `statements` (one block) of KV-head repetitions written out step by step: per
    tensor of `kv`, assignments `t = t.<methods>(...)` of HAND_REPEAT_METHODS that together add an
    axis, expand it and merge it back (a plain view of t alone is no repetition)."""
    steps: dict[str, list[int]] = {}
    methods: dict[str, set[str]] = {}
    for position, statement in enumerate(statements):
        target, chain = _method_chain_assignment(statement)
        if target in kv and chain and set(chain) <= HAND_REPEAT_METHODS:
            steps.setdefault(target, []).append(position)
            methods.setdefault(target, set()).update(chain)
    return {
        position
        for tensor, positions in steps.items()
        if {"unsqueeze", "expand"} <= methods[tensor] and methods[tensor] & HAND_REPEAT_MERGES
        for position in positions
    }


def _method_chain_assignment(statement) -> tuple[str | None, list[str]]:
    """(`t`, [methods]) of `t = t.a(...).b(...)`, else (None, [])."""
    if not (
        isinstance(statement, cst.SimpleStatementLine)
        and len(statement.body) == 1
        and isinstance(statement.body[0], cst.Assign)
        and len(statement.body[0].targets) == 1
        and isinstance(statement.body[0].targets[0].target, cst.Name)
    ):
        return None, []
    target, value, chain = statement.body[0].targets[0].target.value, statement.body[0].value, []
    while isinstance(value, cst.Call) and isinstance(value.func, cst.Attribute):
        chain.insert(0, value.func.attr.value)
        value = value.func.value
    if not (isinstance(value, cst.Name) and value.value == target):
        return None, []
    return target, chain


# einops' functions that repeat a tensor along a named axis: `repeat(k, "b n h d -> b n (h g) d")`
TENSOR_REPEATS = {("einops", "repeat")}


def repeats_heads(value: cst.BaseExpression, index: ModelIndex) -> bool:
    """`f(k, n)` that repeats key/value heads for the query heads: `repeat_interleave`, this file's
    function that expands or repeats, or einops' `repeat` as the file imports it."""
    if not isinstance(value, cst.Call) or not value.args:
        return False
    name = call_name(value) or ""
    function = index.functions.get(name)
    return (
        name.endswith("repeat_interleave")
        or (function is not None and any(w in code_of(function) for w in (".expand(", ".repeat(")))
        or name in imported_names(index.module, TENSOR_REPEATS)
    )


def imported_names(module: cst.Module, wanted: set[tuple[str, str]]) -> set[str]:
    """How `module` spells each (package, name) in `wanted`: `name` or its alias after `from package
    import name [as alias]`, `package.name` or `alias.name` after `import package [as alias]`, at
    module level or under a module-level `try`/`if`."""
    spelled: set[str] = set()
    packages = {package for package, _ in wanted}

    class _Imports(cst.CSTVisitor):
        def visit_FunctionDef(self, node: cst.FunctionDef) -> bool:
            return False

        def visit_ClassDef(self, node: cst.ClassDef) -> bool:
            return False

        def visit_ImportFrom(self, node: cst.ImportFrom) -> None:
            package = code_of(node.module) if node.module is not None and not node.relative else None
            if package not in packages or isinstance(node.names, cst.ImportStar):
                return
            for alias in node.names:
                if (package, code_of(alias.name)) in wanted:
                    spelled.add(code_of(alias.asname.name) if alias.asname else code_of(alias.name))

        def visit_Import(self, node: cst.Import) -> None:
            for alias in node.names:
                package = code_of(alias.name)
                local = code_of(alias.asname.name) if alias.asname else package
                spelled.update(f"{local}.{name}" for p, name in wanted if p == package)

    module.visit(_Imports())
    return spelled


def _head_merges(output: list[str], after: list, info: ClassInfo) -> list[cst.SimpleStatementLine]:
    """The statements right after a called core that merge heads through a helper of the class
    that runs no module (`out = self._merge_heads(out, heads, size)`)."""
    found = []
    for statement in after:
        value = getattr(statement.body[0], "value", None)
        method = self_attribute(value.func) if isinstance(value, cst.Call) else None
        if (
            not output
            or statement_targets(statement) != output
            or method not in info.methods
            or not value.args
            or code_of(value.args[0].value) != output[0]
            or not only_reshapes(statement, info)
        ):
            break
        found.append(statement)
    return found


def _only_sdpa(forward: cst.FunctionDef, info: ClassInfo, index: ModelIndex) -> bool:
    """torch's scaled_dot_product_attention is the core only where forward has no other: beside an
    eager core (written inline, or called) it is one more backend of the same attention."""
    if any(_core_call(s, info, index) for s in _flat_statements(forward.body.body)):
        return False
    body = list(forward.body.body)
    bias = ALIBI | bias_inputs(index).get(info.name, set())
    return inline_core(body, info, bias) is None and branch_cores(body, info, bias) is None


def _core_call(
    statement: cst.CSTNode, info: ClassInfo, index: ModelIndex, sdpa: bool = False
) -> cst.Call | None:
    """The attention core `statement` calls: HF's interface dispatch, a function or method of the
    file taking a softmax, or (with `sdpa`) torch's scaled_dot_product_attention."""
    found: list[cst.Call] = []

    class _Find(cst.CSTVisitor):
        def visit_Call(self, node: cst.Call) -> None:
            name = call_name(node) or ""
            method = self_attribute(node.func)
            if (
                name == "attention_interface"
                or (sdpa and name in SDPA_CALLS)
                or (name in index.functions and calls_softmax(code_of(index.functions[name])))
            ):
                found.append(node)
            elif method in info.methods and calls_softmax(code_of(info.methods[method])):
                found.append(node)
            elif method in info.submodules and info.submodules[method] in core_modules(
                [info.submodules[method]], index.functions, index.classes
            ):
                found.append(node)  # a submodule that is only an attention core

    statement.visit(_Find())
    return found[0] if found else None


def _source_projection(
    var: str, statements: list, linears: set[str], functions: set[str] = frozenset()
) -> str | None:
    """The Linear attribute whose output flows into `var` (following reassignments backwards).

    A statement that reads what it assigns transforms it (`q = q.view(...)`, `q, k = rotate(q, k,
    cos, sin)`, `k = torch.cat([past_k, k])`): only that variable is followed through it, so the
    cos/sin, cache or other operands it mixes in never lead the trace to another projection. A
    function of this file (in `functions`) that returns one tensor per leading argument (`q, k =
    rotate(q_rot, k_rot, cos, sin)`) is followed from each target to its own argument."""
    wanted = {var}
    for statement in reversed(statements):
        targets = set(statement_targets(statement))
        if not targets & wanted:
            continue
        called = [self_attribute(c.func) for c in calls_in(statement)]
        hits = [c for c in called if c in linears]
        if hits:
            return hits[0]
        if _transforms(statement, targets & wanted):
            continue
        paired = _paired_arguments(statement, functions)
        if paired is not None:
            wanted |= {paired[t] for t in targets & wanted}
            continue
        wanted |= names_in(statement) - targets - {"self"}
    return None


def _paired_arguments(statement: cst.CSTNode, functions: set[str]) -> dict[str, str] | None:
    """`a, b = f(x, y, ...)` with `f` a function of this file and `x`, `y` plain names: {a: x, b: y}."""
    small = statement.body[0] if isinstance(statement, cst.SimpleStatementLine) else None
    if not (
        isinstance(small, cst.Assign)
        and len(small.targets) == 1
        and isinstance(small.targets[0].target, cst.Tuple)
        and isinstance(small.value, cst.Call)
        and call_name(small.value) in functions
    ):
        return None
    targets = [e.value for e in small.targets[0].target.elements]
    positional = [a.value for a in small.value.args if a.keyword is None and not a.star]
    pairs = list(zip(targets, positional))
    if len(pairs) < len(targets) or not all(
        isinstance(t, cst.Name) and isinstance(a, cst.Name) for t, a in pairs
    ):
        return None
    return {t.value: a.value for t, a in pairs}


def _transforms(statement: cst.SimpleStatementLine, variables: set[str]) -> bool:
    """`statement` assigns each of `variables` from an expression that reads it."""
    small = statement.body[0]
    if isinstance(small, cst.AugAssign):
        return True
    value = getattr(small, "value", None)
    return value is not None and variables <= names_in(value)


def _consumer(vars_: set[str], statements: list, linears: set[str]) -> str | None:
    live = set(vars_)
    for statement in statements:
        if names_in(statement) & live:
            hits = [self_attribute(c.func) for c in calls_in(statement) if self_attribute(c.func) in linears]
            if hits:
                return hits[0]
            live |= set(statement_targets(statement))
    return None
