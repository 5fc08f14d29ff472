"""The residual stream passed between decoder layers, so both norms of a pre-norm layer fuse the add.

A pre-norm layer that starts `residual = h; h = self.input_norm(h)` and ends `h = residual + h;
return h`, run by a backbone loop `h = layer(h, ...)` followed by `h = self.norm(h)`, adds the
residual at the end of one layer only for the next norm to read it. With the engine's RMSNorm on
both sides the add moves into the next norm (vLLM's layout): the layer takes and returns the
residual,

    if residual is None:
        residual = h
        h = self.input_norm(h)
    else:
        h, residual = self.input_norm(h, residual)
    ...
    return h, residual

the loop threads it (`residual = None` before, `h, residual = layer(h, residual, ...)`), and the
final norm takes it too (`h, _ = self.norm(h, residual)`). Each norm then computes
`norm(h + residual)` as before, in one kernel with the add. Only that exact shape is rewritten.
"""

from __future__ import annotations

import libcst as cst

from porter.analysis.cst_utils import call_name, code_of, names_in, self_attribute
from porter.analysis.engine_names import ENGINE_NORM
from porter.rewrites.base import PortContext, Rewrite


class PassResidualStream(Rewrite):
    name = "residual-stream"

    def apply(self, module: cst.Module, context: PortContext) -> cst.Module:
        layer, backbone = context.index.decoder_layer, context.index.backbone
        if layer is None or backbone is None or layer == backbone:
            return module
        norms = {
            (name, attr)
            for name, info in context.index.classes.items()
            for attr, calls in info.all_init_calls.items()
            if calls and all(call_name(c) == ENGINE_NORM for c in calls)
        }
        layer_forward = context.index.classes[layer].methods.get("forward")
        backbone_forward = context.index.classes[backbone].methods.get("forward")
        if layer_forward is None or backbone_forward is None:
            return module
        new_layer = _layer(layer_forward, {a for c, a in norms if c == layer})
        layer_lists = {a for a, c in context.index.classes[backbone].submodules.items() if c == layer}
        new_backbone = _backbone(backbone_forward, {a for c, a in norms if c == backbone}, layer_lists)
        if new_layer is None or new_backbone is None:
            return module
        context.record(
            "residual-stream",
            f"{layer}.forward",
            "",
            "return hidden_states, residual",
            __doc__.split("\n")[0],
        )
        context.record(
            "residual-stream", f"{backbone}.forward", "", code_of(new_backbone).strip(), "the norm adds it"
        )
        replaced = {id(layer_forward): new_layer, id(backbone_forward): new_backbone}
        return module.visit(_Replace(replaced))


def _assign(statement: cst.CSTNode) -> tuple[str, cst.BaseExpression] | None:
    if isinstance(statement, cst.SimpleStatementLine) and len(statement.body) == 1:
        node = statement.body[0]
        if (
            isinstance(node, cst.Assign)
            and len(node.targets) == 1
            and isinstance(node.targets[0].target, cst.Name)
        ):
            return node.targets[0].target.value, node.value
    return None


def _norm_of(value: cst.BaseExpression, hidden: str, norms: set[str]) -> str | None:
    """`attr` of `self.attr(hidden)` when attr is one of `norms`."""
    if (
        isinstance(value, cst.Call)
        and len(value.args) == 1
        and code_of(value.args[0].value).strip() == hidden
    ):
        attr = self_attribute(value.func)
        return attr if attr in norms else None
    return None


def _layer(forward: cst.FunctionDef, norms: set[str]) -> cst.FunctionDef | None:
    params = forward.params.params
    body = list(forward.body.body)
    if len(params) < 2 or len(body) < 4 or "residual" in {p.name.value for p in params}:
        return None
    hidden = params[1].name.value
    keep, first = _assign(body[0]), _assign(body[1])
    add, last = _assign(body[-2]), body[-1]
    if not (keep and first and add and keep[0] != hidden and code_of(keep[1]).strip() == hidden):
        return None
    residual = keep[0]
    norm = _norm_of(first[1], hidden, norms) if first[0] == hidden else None
    total = add[1]
    if not (
        norm
        and add[0] == hidden
        and isinstance(total, cst.BinaryOperation)
        and isinstance(total.operator, cst.Add)
        and {code_of(total.left).strip(), code_of(total.right).strip()} == {hidden, residual}
        and isinstance(last, cst.SimpleStatementLine)
        and code_of(last).strip() == f"return {hidden}"
    ):
        return None
    opening = cst.parse_statement(
        f"if {residual} is None:\n    {residual} = {hidden}\n    {hidden} = self.{norm}({hidden})\n"
        f"else:\n    {hidden}, {residual} = self.{norm}({hidden}, {residual})\n"
    ).with_changes(leading_lines=body[0].leading_lines)
    closing = cst.parse_statement(f"return {hidden}, {residual}").with_changes(
        leading_lines=body[-2].leading_lines
    )
    typed = cst.Annotation(cst.parse_expression("torch.Tensor | None"))
    new_params = [params[0], params[1], cst.Param(cst.Name(residual), annotation=typed), *params[2:]]
    return forward.with_changes(
        params=forward.params.with_changes(
            params=[p.with_changes(comma=cst.MaybeSentinel.DEFAULT) for p in new_params]
        ),
        body=forward.body.with_changes(body=[opening, *body[2:-2], closing]),
    )


def _backbone(forward: cst.FunctionDef, norms: set[str], layer_lists: set[str]) -> cst.FunctionDef | None:
    body = list(forward.body.body)
    if "residual" in names_in(forward) or "_" in names_in(forward):
        return None
    for index, loop in enumerate(body[:-1]):
        if not (
            isinstance(loop, cst.For)
            and isinstance(loop.body, cst.IndentedBlock)
            and len(loop.body.body) == 1
        ):
            continue
        step = _assign(loop.body.body[0])
        after = _assign(body[index + 1])
        if not (step and after and isinstance(step[1], cst.Call) and step[1].args and after[0] == step[0]):
            continue
        hidden, call = step
        if code_of(call.args[0].value).strip() != hidden or call.args[0].keyword is not None:
            continue
        # the call runs a layer of the loop over the layer list, and only it
        iterated = {self_attribute(n) for n in _attributes(loop.iter)} & layer_lists
        if not iterated or code_of(call.func).strip() not in names_in(loop.target):
            continue
        norm = _norm_of(after[1], hidden, norms)
        if norm is None:
            continue
        args = list(call.args)
        threaded = call.with_changes(args=[args[0], cst.Arg(cst.Name("residual")), *args[1:]])
        step_line = cst.parse_statement(f"{hidden}, residual = x").with_changes(
            leading_lines=loop.body.body[0].leading_lines
        )
        step_line = step_line.with_changes(body=[step_line.body[0].with_changes(value=threaded)])
        new_loop = loop.with_changes(body=loop.body.with_changes(body=[step_line]))
        start = cst.parse_statement("residual = None").with_changes(leading_lines=loop.leading_lines)
        final = cst.parse_statement(f"{hidden}, _ = self.{norm}({hidden}, residual)").with_changes(
            leading_lines=body[index + 1].leading_lines
        )
        new_body = [*body[:index], start, new_loop.with_changes(leading_lines=[]), final, *body[index + 2 :]]
        return forward.with_changes(body=forward.body.with_changes(body=new_body))
    return None


def _attributes(node: cst.CSTNode) -> list[cst.Attribute]:
    found: list[cst.Attribute] = []

    class _Find(cst.CSTVisitor):
        def visit_Attribute(self, attribute: cst.Attribute) -> None:
            found.append(attribute)

    node.visit(_Find())
    return found


class _Replace(cst.CSTTransformer):
    def __init__(self, replaced: dict[int, cst.FunctionDef]) -> None:
        self.replaced = replaced

    def leave_FunctionDef(self, original: cst.FunctionDef, updated: cst.FunctionDef):
        return self.replaced.get(id(original), updated)
