"""A router's score, top-k and renormalise statements -> the engine's named routing function.

Two shapes, matched statement by statement in a forward:
- softmax over all experts, then the top k, then (maybe under a flag) divided by their sum:
  `p = softmax(logits, dim=-1)`, `w, i = topk(p, k, dim=-1)`, `[if flag:] w /= w.sum(-1, keepdim=True)`
  -> `w, i = softmax_top_k(logits, k, renormalize=flag)`;
- the top k logits, then a softmax over those: `l, i = topk(logits, k, dim=-1)`,
  `w = softmax(l, dim=-1)[.cast]` -> `w, i = top_k_softmax(logits, k)` `[w = w.cast]`.
A statement is folded in only where nothing else reads what it bound. Other routing (sigmoid scores
with grouped choice, sparse mixers) runs as the source wrote it: it is per-token code already.
"""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cst_utils import code_of, names_in
from porter.rewrites.base import ClassScopedTransformer, PortContext, Rewrite

MODULE = "engine.layers.moe"
SOFTMAX_FUNCTIONS = m.Attribute(attr=m.Name("softmax")) | m.Name("softmax")


class FoldRouting(Rewrite):
    name = "routing"

    def apply(self, module: cst.Module, context: PortContext) -> cst.Module:
        return module.visit(_Transformer(context))


def _single_assign(statement: cst.CSTNode) -> cst.Assign | None:
    if isinstance(statement, cst.SimpleStatementLine) and len(statement.body) == 1:
        small = statement.body[0]
        if isinstance(small, cst.Assign) and len(small.targets) == 1:
            return small
    return None


def _softmax_input(value: cst.BaseExpression) -> cst.BaseExpression | None:
    """`x` of `softmax(x, dim=-1, ...)` / `x.softmax(dim=-1)` over the last dim; `.float()` dropped."""
    if not m.matches(value, m.Call(func=SOFTMAX_FUNCTIONS)):
        return None
    positional = [a.value for a in value.args if not a.keyword]
    dims = [a.value for a in value.args if a.keyword and a.keyword.value == "dim"]
    method = isinstance(value.func, cst.Attribute) and not m.matches(
        value.func.value, m.Name() | m.Attribute(attr=m.Name("functional"))
    )
    source = value.func.value if method else (positional[0] if positional else None)
    if source is None or len(dims) != 1 or code_of(dims[0]) not in ("-1", "1"):
        return None
    if m.matches(source, m.Call(func=m.Attribute(attr=m.Name("float")), args=[])):
        source = source.func.value
    return source


def _topk(value: cst.BaseExpression) -> tuple[cst.BaseExpression, cst.BaseExpression] | None:
    """(input, k) of `torch.topk(x, k, dim=-1)` / `x.topk(k, dim=-1)` (no other options)."""
    if not m.matches(value, m.Call(func=m.Attribute(attr=m.Name("topk")))):
        return None
    positional = [a.value for a in value.args if not a.keyword]
    keywords = {a.keyword.value: a.value for a in value.args if a.keyword}
    if set(keywords) - {"k", "dim"} or ("dim" in keywords and code_of(keywords["dim"]) != "-1"):
        return None
    if m.matches(value.func.value, m.Name("torch")):
        positional = positional or [None]
        source, rest = positional[0], positional[1:]
    else:
        source, rest = value.func.value, positional
    k = keywords.get("k", rest[0] if rest else None)
    return (source, k) if source is not None and k is not None else None


def _renormalisation(statement: cst.CSTNode, weights: str) -> cst.BaseExpression | None:
    """The condition under which `statement` divides `weights` by its sum over the last dim
    (`cst.Name("True")` when unconditional), else None."""
    condition: cst.BaseExpression = cst.Name("True")
    if isinstance(statement, cst.If) and statement.orelse is None and len(statement.body.body) == 1:
        condition, statement = statement.test, statement.body.body[0]
    if not isinstance(statement, cst.SimpleStatementLine) or len(statement.body) != 1:
        return None
    total = m.Call(func=m.Attribute(value=m.Name(weights), attr=m.Name("sum")))
    small = statement.body[0]
    divided = m.matches(
        small, m.AugAssign(target=m.Name(weights), operator=m.DivideAssign(), value=total)
    ) or m.matches(
        small,
        m.Assign(
            targets=[m.AssignTarget(m.Name(weights))],
            value=m.BinaryOperation(left=m.Name(weights), operator=m.Divide(), right=total),
        ),
    )
    return condition if divided else None


class _Transformer(ClassScopedTransformer):
    def leave_IndentedBlock(
        self, original: cst.IndentedBlock, updated: cst.IndentedBlock
    ) -> cst.IndentedBlock:
        body = list(updated.body)
        index = 0
        while index < len(body):
            folded = self._fold_softmax_top_k(body, index) or self._fold_top_k_softmax(body, index)
            if folded:
                count, replacement = folded
                self.context.record(
                    "routing",
                    self.where,
                    "\n".join(code_of(s).strip() for s in body[index : index + count]),
                    "\n".join(code_of(s).strip() for s in replacement),
                    "the router's statements are one named routing function of the engine",
                )
                body[index : index + count] = replacement
            index += 1
        return updated.with_changes(body=body)

    def _reads_after(self, body: list, start: int, name: str) -> bool:
        return any(name in names_in(statement) for statement in body[start:])

    def _fold_softmax_top_k(self, body: list, index: int):
        probs_assign, top_assign = (
            _single_assign(body[index]),
            index + 1 < len(body) and _single_assign(body[index + 1]),
        )
        if not probs_assign or not top_assign or not isinstance(probs_assign.targets[0].target, cst.Name):
            return None
        logits = _softmax_input(probs_assign.value)
        top = _topk(top_assign.value)
        probs = probs_assign.targets[0].target.value
        target = top_assign.targets[0].target
        if logits is None or top is None or not m.matches(top[0], m.Name(probs)):
            return None
        if not m.matches(target, m.Tuple([m.Element(m.Name()), m.Element(m.Name())])):
            return None
        weights = target.elements[0].value.value
        count, condition = 2, cst.Name("False")
        if index + 2 < len(body):
            found = _renormalisation(body[index + 2], weights)
            if found is not None:
                count, condition = 3, found
        if self._reads_after(body, index + count, probs):
            return None
        call = f"softmax_top_k({code_of(logits)}, {code_of(top[1])}, renormalize={code_of(condition)})"
        self.context.need(MODULE, "softmax_top_k")
        return count, [
            body[index + 1].with_changes(body=[top_assign.with_changes(value=cst.parse_expression(call))])
        ]

    def _fold_top_k_softmax(self, body: list, index: int):
        top_assign, weights_assign = (
            _single_assign(body[index]),
            index + 1 < len(body) and _single_assign(body[index + 1]),
        )
        if not top_assign or not weights_assign or not isinstance(weights_assign.targets[0].target, cst.Name):
            return None
        top = _topk(top_assign.value)
        target = top_assign.targets[0].target
        if top is None or not m.matches(target, m.Tuple([m.Element(m.Name()), m.Element(m.Name())])):
            return None
        top_logits = target.elements[0].value.value
        weights = weights_assign.targets[0].target.value
        value, cast = weights_assign.value, None
        if m.matches(value, m.Call(func=m.Attribute(value=m.Call(func=SOFTMAX_FUNCTIONS)))):
            value, cast = (
                value.func.value,
                value.with_changes(func=value.func.with_changes(value=cst.Name(weights))),
            )
        if not m.matches(_softmax_input(value), m.Name(top_logits)) or self._reads_after(
            body, index + 2, top_logits
        ):
            return None
        new_target = target.with_changes(
            elements=[target.elements[0].with_changes(value=cst.Name(weights)), target.elements[1]]
        )
        call = cst.parse_expression(f"top_k_softmax({code_of(top[0])}, {code_of(top[1])})")
        self.context.need(MODULE, "top_k_softmax")
        replacement = [
            body[index].with_changes(
                body=[top_assign.with_changes(targets=[cst.AssignTarget(new_target)], value=call)]
            )
        ]
        if cast is not None:
            replacement.append(body[index + 1].with_changes(body=[weights_assign.with_changes(value=cast)]))
        return 2, replacement
