"""An eager attention core written inline in forward: `scores = q @ k^T (* scale, + alibi);
probs = softmax(scores); out = probs @ v`, with the q/k/v reshapes (and KV-head repetition) just
before it and a head merge just after it, found as the span of statements one PagedAttention call
replaces."""

from __future__ import annotations

import libcst as cst

from porter.analysis.cst_utils import (
    call_name,
    calls_in,
    calls_softmax,
    code_of,
    names_in,
    self_attribute,
    statement_targets,
)
from porter.analysis.model_index import ClassInfo

SCORE_CALLS = ("matmul", "bmm", "baddbmm", "einsum")
RESHAPE_CALLS = ("view", "reshape", "transpose", "permute", "contiguous", "flatten", "unflatten")
CAST_CALLS = ("to", "float", "double", "type")
# Names an ALiBi bias goes by in an attention forward; `porter.analysis.alibi` adds the others
# (`position_bias`) by following the bias from where the backbone builds it.
ALIBI = frozenset({"alibi"})


def inline_core(body: list[cst.BaseStatement], info: ClassInfo, bias: frozenset[str] = ALIBI) -> dict | None:
    """Finds `scores = q @ k^T (* scale, + alibi); probs = softmax(scores); out = probs @ v` among the
    top-level statements of forward, with the reshapes of q/k/v (and KV-head repetition) just
    before it and a head merge just after it: the span that one PagedAttention call replaces."""
    scores = _scores(body, bias)
    if scores is None:
        return None
    soft, score_at, q, k, scale, alibi, alibi_scale = scores
    probs = _softmax_targets(body[soft])
    if not probs:
        return None
    out_at = v = output = None
    for j in range(soft + 1, len(body)):
        call = _score_call(body[j])
        if call is not None and names_in(call) & probs:
            operands = _operands(call)
            v = next((code_of(o) for o in operands if not names_in(o) & probs), None)
            out_at, output = j, next(iter(statement_targets(body[j])), None)
            break
        if names_in(body[j]) & probs:
            probs |= set(statement_targets(body[j]))
    if out_at is None or v is None or output is None:
        return None
    start = score_at
    while start > 0:  # q/k/v reshapes and KV-head repetition for the eager matmuls
        previous = body[start - 1]
        targets = set(statement_targets(previous))
        # One tensor at a time: a statement producing q and k together rotates them
        # (`q, k = apply_rotary_pos_emb(q, k, cos, sin)`), which the rotary rewrite keeps.
        reshapes_itself = (
            len(targets) == 1
            and targets <= {q, k, v}
            and targets <= names_in(previous) - targets | targets
            and all(t in names_in(_value_of(previous)) for t in targets)
        )
        if not reshapes_itself or _calls_projection(previous, info):
            break
        start -= 1
    end, merged = out_at, False
    while end + 1 < len(body):  # a head merge of the output
        following = body[end + 1]
        if set(statement_targets(following)) != {output} or not only_reshapes(following, info):
            break
        end, merged = end + 1, True
    return {
        "region": (start, end),
        "relayouts": relayouts(body, start, {q, k, v}, info),
        "qkv": [q, k, v],
        "output": output,
        "scale": scale,
        "alibi": alibi,
        "alibi_scale": alibi_scale,  # None: the bias is added unscaled
        "merged": merged,
    }


def scores_scale(body: list[cst.BaseStatement]) -> str | None:
    """The scale an eager core among `body`'s statements applies to `q @ k^T` before its softmax
    ("1.0" when none), however it then returns its output; None without such a core."""
    scores = _scores(body)
    return scores[4] if scores is not None else None


def _scores(body: list[cst.BaseStatement], bias: frozenset[str] = ALIBI) -> tuple | None:
    """(softmax index, score index, q, k, scale, alibi, alibi scale) of the first softmax over a
    `q @ k^T` product among `body`'s statements."""
    codes = [code_of(s) for s in body]
    soft = next((i for i, c in enumerate(codes) if calls_softmax(c)), None)
    if soft is None:
        return None
    score_at = next((i for i in range(soft, -1, -1) if _score_call(body[i])), None)
    if score_at is None:
        return None
    q, k, scale = _score_operands(_score_call(body[score_at]), body[score_at])
    if q is None or k is None:
        return None
    added = "alibi" in codes[score_at] or bool(names_in(body[score_at]) & bias)
    in_place, alibi, alibi_scale = _in_place_scale(
        body[score_at + 1 : soft], set(statement_targets(body[score_at])), added, bias
    )
    if in_place is not None:
        scale = in_place if scale == "1.0" else f"{scale} * {in_place}"
    return soft, score_at, q, k, scale, alibi, alibi_scale


def _softmax_targets(statement: cst.BaseStatement) -> set[str]:
    """What the softmax statement assigns. Written as an `if`/`else` whose every branch assigns the
    same names (a float16 upcast path beside the plain one: `if w.dtype == torch.float16: w =
    softmax(w, dtype=torch.float32).to(w.dtype) else: w = softmax(w)`), it is all one softmax to the
    engine, whose attention always accumulates in float32."""
    if isinstance(statement, cst.SimpleStatementLine):
        return set(statement_targets(statement))
    if not isinstance(statement, cst.If):
        return set()
    assigned: list[set[str] | None] = []
    node: cst.If | cst.Else | None = statement
    while isinstance(node, cst.If):
        assigned.append(_softmax_block(node.body))
        node = node.orelse
    if node is None:
        return set()  # without an else the softmax may not run at all
    assigned.append(_softmax_block(node.body))
    first = assigned[0]
    return first if first and all(a == first for a in assigned) else set()


def _softmax_block(block: cst.BaseSuite) -> set[str] | None:
    """The names a branch made only of softmax assignments binds (None for any other branch)."""
    statements = list(block.body)
    if not all(isinstance(s, cst.SimpleStatementLine) and calls_softmax(code_of(s)) for s in statements):
        return None
    return {t for s in statements for t in statement_targets(s)}


def _score_call(statement: cst.CSTNode) -> cst.Call | cst.BinaryOperation | None:
    """The product in `statement`: a matmul-like call, or the `@` operator."""
    for call in calls_in(statement):
        name = call.func.attr.value if isinstance(call.func, cst.Attribute) else (call_name(call) or "")
        if name in SCORE_CALLS:
            return call
    products: list[cst.BinaryOperation] = []

    class _Products(cst.CSTVisitor):
        def visit_BinaryOperation(self, node: cst.BinaryOperation) -> None:
            if isinstance(node.operator, cst.MatrixMultiply):
                products.append(node)

    statement.visit(_Products())
    return products[0] if products else None


def _operands(product: cst.Call | cst.BinaryOperation) -> list[cst.BaseExpression]:
    if isinstance(product, cst.BinaryOperation):
        return [product.left, product.right]
    return [a.value for a in product.args if a.keyword is None]


def _in_place_scale(
    statements: list[cst.BaseStatement], scores: set[str], alibi_added: bool, bias: frozenset[str] = ALIBI
) -> tuple[str | None, bool, str | None]:
    """What happens to the scores between the product and the softmax: the factor of `scores /= x`,
    `scores *= x` or `scores = scores / x` (None if none), whether an ALiBi bias is added (`scores +
    alibi...`, also inside `if <bias> is not None:`), and the factor applied after that addition
    (which scales the bias too)."""
    factors, alibi_factors = [], []
    scores = set(scores)
    for statement in statements:
        if isinstance(statement, cst.If) and statement.orelse is None and names_in(statement.test) & bias:
            for (
                inner
            ) in statement.body.body:  # `if position_bias is not None: scores = scores + position_bias`
                value = (
                    getattr(inner.body[0], "value", None)
                    if isinstance(inner, cst.SimpleStatementLine)
                    else None
                )
                if value is not None and names_in(value) & scores and names_in(value) & bias:
                    scores |= set(statement_targets(inner))
                    alibi_added = True
            continue
        if isinstance(statement, cst.If) and statement.orelse is None:
            # `if self.scale_attn_weights: w = w / d ** 0.5`: the factor only where the test holds,
            # for a branch that does nothing but scale (a softcap's tanh between is no scale)
            parts = [_in_place_scale([inner], scores, False, bias)[0] for inner in statement.body.body]
            inner = " * ".join(parts) if parts and None not in parts else None
            if inner is not None:
                factors.append(f"({inner} if {code_of(statement.test)} else 1.0)")
                if alibi_added:
                    alibi_factors.append(factors[-1])
            continue
        small = statement.body[0] if isinstance(statement, cst.SimpleStatementLine) else None
        if isinstance(small, cst.AugAssign) and code_of(small.target) in scores:
            if isinstance(small.operator, cst.DivideAssign):
                factors.append(f"1 / ({code_of(small.value)})")
            elif isinstance(small.operator, cst.MultiplyAssign):
                factors.append(code_of(small.value))
            if alibi_added and factors:
                alibi_factors.append(factors[-1])
        elif (
            isinstance(small, cst.Assign)
            and isinstance(small.value, cst.BinaryOperation)
            and isinstance(small.value.operator, (cst.Divide, cst.Multiply))
            and code_of(small.value.left) in scores
            and not names_in(_scalar_of(small.value.right)) & scores  # the scores' dtype is no factor
        ):  # `scores = scores / x` (GPT-J's `/ self.scale_attn`)
            divide = isinstance(small.value.operator, cst.Divide)
            by = code_of(_scalar_of(small.value.right))
            factors.append(f"1 / ({by})" if divide else by)
            scores |= set(statement_targets(statement))
            if alibi_added:
                alibi_factors.append(factors[-1])
        elif isinstance(small, cst.Assign) and names_in(small.value) & scores:
            scores |= set(statement_targets(statement))  # a view or upcast of the scores
            alibi_added = alibi_added or bool(names_in(small.value) & bias)
    return (
        " * ".join(factors) if factors else None,
        alibi_added,
        " * ".join(alibi_factors) if alibi_factors else None,
    )


def _scalar_of(node: cst.BaseExpression) -> cst.BaseExpression:
    """`x` for `torch.full([], x, dtype=..., device=...)`, the 0-d tensor of one number (made so the
    division keeps the scores' dtype); `node` itself otherwise."""
    if (
        isinstance(node, cst.Call)
        and call_name(node) == "torch.full"
        and len(node.args) >= 2
        and isinstance(node.args[0].value, (cst.List, cst.Tuple))
        and not node.args[0].value.elements
    ):
        return node.args[1].value
    return node


def relayouts(body: list[cst.BaseStatement], end: int, qkv: set[str], info: ClassInfo) -> list[int]:
    """Statements before `end` that only re-lay out q, k or v in place (`q = q.transpose(1, 2).reshape(
    b, h, s, d)`): the batch-era head layout the eager matmuls needed. The engine's rotary layer and
    paged attention take per-token rows in any head layout, so they go with the core."""
    found = []
    for position in range(end):
        statement = body[position]
        targets = set(statement_targets(statement))
        value = _value_of(statement)
        if (
            targets
            and targets <= qkv
            and len(targets) == 1
            and isinstance(value, cst.Call)
            and relayout_source(statement, info) is not None
            and not targets & _sliced_features(body[position + 1 : end])
        ):
            found.append(position)
    return found


def _sliced_features(statements: list[cst.BaseStatement]) -> set[str]:
    """Names sliced on their last axis in `statements` (`q[..., :rotary_dim]`, the features of each
    head a partial rotary turns): their split into heads is what makes the slice per head, so it
    stays."""
    found: set[str] = set()

    class _Slices(cst.CSTVisitor):
        def visit_Subscript(self, node: cst.Subscript) -> None:
            if (
                isinstance(node.value, cst.Name)
                and len(node.slice) > 1
                and isinstance(node.slice[0].slice, cst.Index)
                and isinstance(node.slice[0].slice.value, cst.Ellipsis)
                and isinstance(node.slice[-1].slice, cst.Slice)
            ):
                found.add(node.value.value)

    for statement in statements:
        statement.visit(_Slices())
    return found


def relayout_source(statement: cst.CSTNode, info: ClassInfo) -> str | None:
    """What a relayout statement reshapes: `q` for `q = q.transpose(1, 2).reshape(...)`,
    `self.k_proj(x)` for `key = self._shape(self.k_proj(x), -1, bsz)` (a method of the class that
    only reshapes its first argument: 4.3x's `_shape`/`_split_heads`). Where it is not the target
    itself, the statement also names a new tensor, and `target = source` stays once the relayout
    goes. None when the statement does more than re-lay out one tensor."""
    value, peeled = _value_of(statement), 0
    while isinstance(value, cst.Call):
        method = self_attribute(value.func)
        if method in info.methods and value.args and value.args[0].keyword is None:
            helper = info.methods[method]
            if any(self_attribute(c.func) in info.init_calls for c in calls_in(helper)):
                return None  # the helper runs a layer: it computes, not re-lays out
            value = value.args[0].value
        elif isinstance(value.func, cst.Attribute) and value.func.attr.value in RESHAPE_CALLS:
            value = value.func.value
        elif peeled and self_attribute(value.func) in info.init_calls and not _calls_in_args(value):
            return code_of(value)  # the projection whose output is re-laid out
        else:
            return None
        peeled += 1
    return value.value if isinstance(value, cst.Name) and peeled else None


def _calls_in_args(call: cst.Call) -> bool:
    return any(calls_in(argument.value) for argument in call.args)


def _receiver_root(call: cst.BaseExpression) -> str | None:
    """`q` for `q.transpose(1, 2).reshape(...)`."""
    while isinstance(call, cst.Call) and isinstance(call.func, cst.Attribute):
        call = call.func.value
    return call.value if isinstance(call, cst.Name) else None


def _scaling_of(product: cst.CSTNode, statement: cst.CSTNode) -> cst.BinaryOperation | None:
    """The `product / x` or `product * x` in `statement`, wherever it sits (the assigned value, or
    inside the softmax's argument: `softmax(q @ k^T * scale, dim=-1)`)."""
    found: list[cst.BinaryOperation] = []

    class _Find(cst.CSTVisitor):
        def visit_BinaryOperation(self, node: cst.BinaryOperation) -> None:
            if node.left is product and isinstance(node.operator, (cst.Divide, cst.Multiply)):
                found.append(node)

    statement.visit(_Find())
    return found[0] if found else None


def _score_operands(
    call: cst.Call | cst.BinaryOperation, statement: cst.CSTNode
) -> tuple[str | None, str | None, str]:
    """q and k of the score product (k without its transpose), and the scale it applies."""
    product = call
    if isinstance(call, cst.BinaryOperation):  # `q @ k.transpose(-1, -2)` reads as matmul(q, k^T)
        call = cst.Call(func=cst.Name("matmul"), args=[cst.Arg(call.left), cst.Arg(call.right)])
    keywords = {a.keyword.value: a.value for a in call.args if a.keyword is not None}
    positional = [a.value for a in call.args if a.keyword is None]
    is_baddbmm = isinstance(call.func, cst.Attribute) and call.func.attr.value == "baddbmm"
    if is_baddbmm:
        first, second = keywords.get("batch1"), keywords.get("batch2")
        if first is None:  # torch.baddbmm(bias, q, k) or bias.baddbmm(q, k)
            offset = 1 if call_name(call) == "torch.baddbmm" else 0
            first, second = positional[offset], positional[offset + 1]
        scale = code_of(keywords["alpha"]) if "alpha" in keywords else "1.0"
    else:
        if len(positional) < 2:
            return None, None, "1.0"
        first, second = positional[0], positional[1]
        scale = "1.0"
        value = _scaling_of(product, statement)
        if isinstance(value, cst.BinaryOperation) and isinstance(value.operator, cst.Divide):
            scale = f"1 / ({code_of(value.right)})"
        elif isinstance(value, cst.BinaryOperation) and isinstance(value.operator, cst.Multiply):
            scale = code_of(value.right)
    first = _uncast(first)
    while (
        isinstance(second, cst.Call)
        and isinstance(second.func, cst.Attribute)
        and second.func.attr.value in RESHAPE_CALLS + CAST_CALLS
    ):
        second = second.func.value  # k^T -> k, k.to(torch.float32) -> k
    return (
        code_of(first) if isinstance(first, cst.Name) else None,
        code_of(second) if isinstance(second, cst.Name) else None,
        scale,
    )


def _uncast(node: cst.BaseExpression) -> cst.BaseExpression:
    """`q` for `q.to(torch.float32)` or `q.float()`: an upcast for the product, which paged attention
    computes in float32 anyway."""
    while isinstance(node, cst.Call) and isinstance(node.func, cst.Attribute) and node.func.attr.value in CAST_CALLS:
        node = node.func.value
    return node


def _value_of(statement: cst.CSTNode) -> cst.CSTNode:
    """The right-hand side of a simple assignment (the statement itself otherwise)."""
    if isinstance(statement, cst.SimpleStatementLine) and isinstance(statement.body[0], cst.Assign):
        return statement.body[0].value
    return statement


def _calls_projection(statement: cst.CSTNode, info: ClassInfo) -> bool:
    return any(self_attribute(c.func) in info.init_calls for c in calls_in(statement))


def only_reshapes(statement: cst.CSTNode, info: ClassInfo) -> bool:
    """`x = x.view(...)...` or `x = self._merge_heads(x)` with a method that builds no module."""
    for call in calls_in(statement):
        method = self_attribute(call.func)
        if method in info.methods:
            if any(self_attribute(c.func) in info.init_calls for c in calls_in(info.methods[method])):
                return False
        elif not (isinstance(call.func, cst.Attribute) and call.func.attr.value in RESHAPE_CALLS):
            return False
    return True


def branch_cores(
    body: list[cst.BaseStatement], info: ClassInfo, bias: frozenset[str] = ALIBI
) -> tuple[int, list[tuple]] | None:
    """An `if` at the top level of forward whose branches hold inline cores (an attention path per
    configuration, e.g. one with rotary and one with an ALiBi bias) -> (its position, [(the
    condition that branch runs under, the branch's statements, the core found in them)])."""
    for position, statement in enumerate(body):
        if not isinstance(statement, cst.If):
            continue
        found = []
        for condition, block in _branches(statement):
            statements = list(block.body)
            core = inline_core(statements, info, bias)
            if core is not None:
                found.append((condition, statements, core))
        if found:
            return position, found
    return None


def _branches(statement: cst.If) -> list[tuple[str, cst.BaseSuite]]:
    """(condition, block) of each branch of an if/elif/else chain."""
    result, negated = [], []
    node: cst.If | cst.Else | None = statement
    while node is not None:
        if isinstance(node, cst.If):
            result.append((" and ".join([*negated, _parenthesized(node.test)]), node.body))
            negated.append(negation(node.test))
            node = node.orelse
        else:
            result.append((" and ".join(negated), node.body))
            node = None
    return result


def negation(test: cst.BaseExpression) -> str:
    """`not test`, written simply (`not not x` is `x`)."""
    if isinstance(test, cst.UnaryOperation) and isinstance(test.operator, cst.Not):
        return _parenthesized(test.expression)
    return f"not {_parenthesized(test)}"


def _parenthesized(node: cst.BaseExpression) -> str:
    simple = isinstance(node, (cst.Name, cst.Attribute, cst.Call, cst.Subscript, cst.UnaryOperation))
    return code_of(node) if simple else f"({code_of(node)})"
