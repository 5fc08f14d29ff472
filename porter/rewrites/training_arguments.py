"""A module-level function told whether the model trains, by every caller passing `self.training`,
runs as in inference.

Routing helpers take the flag as a parameter (`sparsemixer(scores, jitter_eps, training=self.training)`)
and branch on it inside, where the rules that know `self.training` is False do not look. Where every
call in the file binds the parameter to `self.training`, the parameter and those arguments go, an
`if flag:` / `if not flag:` keeps the branch inference runs, and any other read of the flag is
`False`. What only the training branches used (a custom autograd function) is then unused and
pruned like any other helper.
"""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cst_utils import dotted_name
from porter.rewrites.base import PortContext, Rewrite

TRAINING = m.Attribute(value=m.Name("self"), attr=m.Name("training"))
RULE = "training-arguments"


class InferenceArguments(Rewrite):
    name = RULE

    def apply(self, module: cst.Module, context: PortContext) -> cst.Module:
        functions = {s.name.value: s for s in module.body if isinstance(s, cst.FunctionDef)}
        flags = {}
        for name, function in functions.items():
            calls = [c for c in m.findall(module, m.Call(func=m.Name(name)))]
            positional = [p.name.value for p in function.params.params]
            for index, parameter in enumerate(positional):
                bound = [_bound(call, parameter, index) for call in calls]
                if calls and all(b is not None and m.matches(b, TRAINING) for b in bound):
                    flags[name] = (parameter, index)
                    break
        if not flags:
            return module
        return module.visit(_Transformer(context, flags))


def _bound(call: cst.Call, parameter: str, index: int) -> cst.BaseExpression | None:
    """What `call` passes for `parameter` (the function's `index`-th positional parameter)."""
    for arg in call.args:
        if arg.keyword is not None and arg.keyword.value == parameter:
            return arg.value
    positional = [a for a in call.args if a.keyword is None and not a.star]
    return positional[index].value if index < len(positional) else None


def _decided(test: cst.BaseExpression, flag: str) -> bool | None:
    """The value of an `if` test on the flag (False when training is off), or None if it tests more."""
    if m.matches(test, m.Name(flag)):
        return False
    if m.matches(test, m.UnaryOperation(operator=m.Not(), expression=m.Name(flag))):
        return True
    return None


class _Transformer(cst.CSTTransformer):
    def __init__(self, context: PortContext, flags: dict[str, tuple[str, int]]) -> None:
        self.context, self.flags = context, flags
        self.function: str | None = None

    def visit_FunctionDef(self, node: cst.FunctionDef) -> None:
        if node.name.value in self.flags and self.function is None:
            self.function = node.name.value

    def leave_FunctionDef(self, original: cst.FunctionDef, updated: cst.FunctionDef) -> cst.FunctionDef:
        if original.name.value != self.function:
            return updated
        self.function = None
        flag, _ = self.flags[original.name.value]
        params = [p for p in updated.params.params if p.name.value != flag]
        return updated.with_changes(params=updated.params.with_changes(params=params))

    def leave_If(self, original: cst.If, updated: cst.If):
        if self.function is None:
            return updated
        flag, _ = self.flags[self.function]
        runs = _decided(original.test, flag)
        if runs is None:
            return updated
        if runs:
            kept = list(updated.body.body)
        elif isinstance(updated.orelse, cst.Else):
            kept = list(updated.orelse.body.body)
        elif isinstance(updated.orelse, cst.If):
            kept = [updated.orelse]
        else:
            kept = []
        self.context.record(
            RULE,
            self.function,
            original,
            cst.Module(body=kept).code.strip(),
            f"`{flag}` is False in inference: every call passes self.training",
        )
        return cst.FlattenSentinel(kept) if kept else cst.RemovalSentinel.REMOVE

    def leave_Name(self, original: cst.Name, updated: cst.Name) -> cst.BaseExpression:
        if self.function is not None and updated.value == self.flags[self.function][0]:
            return cst.Name("False")
        return updated

    # Names that are not reads of the flag: a parameter, a keyword, an attribute (`self.training`).
    def leave_Param(self, original: cst.Param, updated: cst.Param) -> cst.Param:
        return updated.with_changes(name=original.name)

    def leave_Arg(self, original: cst.Arg, updated: cst.Arg) -> cst.Arg:
        return updated.with_changes(keyword=original.keyword)

    def leave_Attribute(self, original: cst.Attribute, updated: cst.Attribute) -> cst.Attribute:
        return updated.with_changes(attr=original.attr)

    def leave_Call(self, original: cst.Call, updated: cst.Call) -> cst.Call:
        name = dotted_name(updated.func)
        if name not in self.flags:
            return updated
        flag, index = self.flags[name]
        positional = 0
        args = []
        for arg in updated.args:
            is_flag = (arg.keyword is not None and arg.keyword.value == flag) or (
                arg.keyword is None and not arg.star and positional == index
            )
            if arg.keyword is None and not arg.star:
                positional += 1
            if not is_flag:
                args.append(arg)
        if args:
            args[-1] = args[-1].with_changes(comma=cst.MaybeSentinel.DEFAULT)
        return updated.with_changes(args=args)
