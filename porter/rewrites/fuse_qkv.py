"""Fuses separate q, k and v projections into one `QKVParallelLinear` (one GEMM, sharded by head).

In `__init__` the three `nn.Linear` assignments become one `self.qkv_proj = QKVParallelLinear(
hidden, head_dim, num_heads, num_kv_heads, bias=...)`. In `forward` the fused projection runs once,
before the first statement that used any of the three, and is split into this rank's q, k and v;
each `self.q_proj(x)` (etc.) becomes the matching piece. `load_weights` learns the checkpoint
names of the three and their shard ids.

A projection that already makes q, k and v (GPT-2's `c_attn`, Phi-3's `qkv_proj`) becomes a
`QKVParallelLinear` that loads the fused checkpoint tensor in its layout, and the split of its
output (`.split(size, dim)`, or three slices of the last axis at global offsets) takes this rank's
q, k and v sizes instead. Slices that do not cut it into q|k|v end to end are a review item:
sharded as a plain column-parallel Linear, the projection would give wrong heads at tp > 1.
"""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.attention import AttentionInfo
from porter.analysis.cst_utils import (
    ReplaceProjectionCalls,
    call_name,
    code_of,
    names_in,
    self_attribute,
    statement_targets,
)
from porter.analysis.engine_names import FUSED_QKV
from porter.analysis.model_index import LINEAR_CALLS
from porter.analysis.projections import flat_outputs, linear_bias
from porter.rewrites.base import ClassScopedTransformer, PortContext, Rewrite
from porter.rewrites.unread_assignments import drop_unread_assignments

RESHAPE_METHODS = {"view", "reshape", "unsqueeze", "transpose", "contiguous"}


class FuseQKV(Rewrite):
    name = "fuse-qkv"

    def apply(self, module: cst.Module, context: PortContext) -> cst.Module:
        separate_inputs: set[str] = set()
        for name, info in context.plan.attention.items():
            if len({info.query, info.key, info.value}) == 3:
                inputs = _projection_inputs(context.index.classes[name].methods.get("forward"), info)
                if len(inputs) > 1:
                    # One GEMM for the three is only right when they read one tensor.
                    context.flag(
                        "fuse-qkv",
                        name,
                        f"q, k and v projections read different inputs ({', '.join(sorted(inputs))}); "
                        "porter fuses them only when they read one tensor",
                    )
                    separate_inputs.add(name)
                    continue
                for attr, shard in ((info.query, "q"), (info.key, "k"), (info.value, "v")):
                    context.plan.fused.append((FUSED_QKV, attr, shard))
        module = module.visit(_Transformer(context, separate_inputs))
        return module.visit(_ConcatenatedQKV(context))


class _ConcatenatedQKV(ClassScopedTransformer):
    """One projection already holds q, k and v side by side (`c_attn(x).split(size, dim=2)`): it
    becomes a `QKVParallelLinear` that loads the fused checkpoint tensor in its concatenated layout,
    and the split takes this rank's q, k and v sizes."""

    def _fused_attr(self) -> tuple[AttentionInfo, str] | None:
        info = self.context.plan.attention.get(self.current_class or "")
        if info is None or len({info.query, info.key, info.value}) != 1:
            return None
        return info, info.query

    def __init__(self, context: PortContext) -> None:
        super().__init__(context)
        self.branches: list[list[str]] = []  # [test, "body" | "orelse"] of the enclosing ifs
        self.sliced_forward = False  # this forward's fused output was cut by slices (now one split)
        self.flat_outputs: set[str] = set()  # names holding the fused projection's output as it came

    def visit_FunctionDef(self, node: cst.FunctionDef) -> bool:
        super().visit_FunctionDef(node)
        found = self._fused_attr()
        if found is not None and node.name.value == "forward":
            self.flat_outputs = flat_outputs(node, found[1])
        return True

    def visit_If(self, node: cst.If) -> bool:
        self.branches.append([code_of(node.test), "body"])
        return True

    def visit_Else(self, node: cst.Else) -> bool:
        if self.branches:
            self.branches[-1][1] = "orelse"
        return True

    def leave_If(self, original: cst.If, updated: cst.If) -> cst.BaseStatement:
        self.branches.pop()
        return updated

    def leave_Call(self, original: cst.Call, updated: cst.Call) -> cst.BaseExpression:
        found = self._fused_attr()
        if found is None or self.current_function != "forward":
            return updated
        _, attr = found
        func = updated.func
        if not (isinstance(func, cst.Attribute) and func.attr.value in ("split", "chunk")):
            return updated
        if func.attr.value == "chunk" and not (updated.args and code_of(updated.args[0].value) == "3"):
            return updated
        if updated.args and f"self.{attr}.q_size" in code_of(updated.args[0].value):
            return updated  # already this rank's sizes (the split-helper rewrite wrote it)
        # Walk the batch-era reshapes between the projection and its split: `.unsqueeze(1)` (a fake
        # head axis) means q|k|v side by side; a `.view(..., heads, 3 * head_dim)` means per head.
        node, layout = func.value, "concatenated"
        while (
            isinstance(node, cst.Call)
            and isinstance(node.func, cst.Attribute)
            and node.func.attr.value in RESHAPE_METHODS
        ):
            if node.func.attr.value in ("view", "reshape"):
                layout = "per_head"
            node = node.func.value
        projected = isinstance(node, cst.Call) and self_attribute(node.func) == attr
        if not projected and not (isinstance(node, cst.Name) and node.value in self.flat_outputs):
            return updated
        sizes = f"[self.{attr}.q_size, self.{attr}.kv_size, self.{attr}.kv_size]"
        new = cst.parse_expression(f"{code_of(node)}.split({sizes}, dim=-1)")
        branch = tuple(self.branches[-1]) if self.branches else None
        self.context.plan.concatenated_qkv.add((self.current_class, attr))
        self.context.plan.qkv_layouts.setdefault((self.current_class, attr), []).append((layout, branch))
        self.context.record(
            "fuse-qkv",
            self.where,
            original,
            new,
            f"this rank's q, k and v out of the fused projection ({layout})",
        )
        return new

    def leave_IndentedBlock(
        self, original: cst.IndentedBlock, updated: cst.IndentedBlock
    ) -> cst.IndentedBlock:
        """`qkv = self.qkv_proj(x)` cut by three slices of the last axis (`qkv[..., :q]`,
        `qkv[..., q : q + kv]`, `qkv[..., q + kv :]`) -> one split by this rank's sizes."""
        found = self._fused_attr()
        if found is None or self.current_function != "forward":
            return updated
        _, attr = found
        statements = list(updated.body)
        # Slices of the projection's flat output only: once the variable is reassigned (GPT-NeoX's
        # `qkv = qkv.view(..., heads, 3 * head_size)`), its slices cut heads, not q|k|v.
        slices, flat = [], set()
        for i, statement in enumerate(statements):
            cut = _last_axis_slice(statement, flat)
            if cut is not None:
                slices.append((i, *cut))
            targets = statement_targets(statement) if isinstance(statement, cst.SimpleStatementLine) else []
            value = getattr(statement.body[0], "value", None) if targets else None
            flat -= set(targets)
            if len(targets) == 1 and isinstance(value, cst.Call) and self_attribute(value.func) == attr:
                flat.add(targets[0])
        if not slices:
            return updated
        ordered = sorted(slices, key=lambda cut: (cut[3] is not None, cut[4] is None))
        if len(slices) != 3 or len({cut[2] for cut in slices}) != 1 or not _tiles(ordered):
            # Left as they are, the projection would shard as one column-parallel Linear and each
            # rank would cut its output at the global offsets: wrong at tp > 1, with nothing to show it.
            self.context.flag(
                "fuse-qkv",
                self.where,
                f"{attr} makes q, k and v, cut by slices porter cannot map to this rank's heads",
            )
            return updated
        (first, q, source, _, _), (_, k, _, _, _), (_, v, _, _, _) = ordered
        split = cst.parse_statement(
            f"{q}, {k}, {v} = {source}.split("
            f"[self.{attr}.q_size, self.{attr}.kv_size, self.{attr}.kv_size], dim=-1)"
        )
        branch = tuple(self.branches[-1]) if self.branches else None
        self.context.plan.concatenated_qkv.add((self.current_class, attr))
        self.context.plan.qkv_layouts.setdefault((self.current_class, attr), []).append(
            ("concatenated", branch)
        )
        self.context.record(
            "fuse-qkv",
            self.where,
            "\n".join(code_of(statements[i]).strip() for i, *_ in slices),
            split,
            "this rank's q, k and v out of the fused projection (concatenated), not the global offsets",
        )
        dropped = {i for i, *_ in slices} - {first}
        self.sliced_forward = True  # the offsets' locals (`query_pos = H * head_dim`) may go unread
        return updated.with_changes(
            body=[split if i == first else s for i, s in enumerate(statements) if i not in dropped]
        )

    def leave_FunctionDef(self, original: cst.FunctionDef, updated: cst.FunctionDef):
        if self.sliced_forward and self.current_function == "forward":
            self.sliced_forward = False
            updated = drop_unread_assignments(updated, self.context, self.where)
        return super().leave_FunctionDef(original, updated)

    def leave_ClassDef(self, original: cst.ClassDef, updated: cst.ClassDef):
        name = updated.name.value
        attrs = {a for c, a in self.context.plan.concatenated_qkv if c == name}
        if attrs:
            updated = updated.visit(_FusedInit(self.context, self.context.plan.attention[name], attrs))
        return super().leave_ClassDef(original, updated)


class _FusedInit(cst.CSTTransformer):
    def __init__(self, context: PortContext, info: AttentionInfo, attrs: set[str]) -> None:
        self.context, self.info, self.attrs = context, info, attrs

    def leave_Assign(self, original: cst.Assign, updated: cst.Assign) -> cst.Assign:
        attr = self_attribute(updated.targets[0].target)
        call = updated.value
        if attr not in self.attrs or not isinstance(call, cst.Call) or call_name(call) not in LINEAR_CALLS:
            return updated
        transposed = call_name(call) == "Conv1D"  # Conv1D(out, in) stores its weight as [in, out]
        out = call.args[0].value if transposed else call.args[1].value
        hidden = call.args[1].value if transposed else call.args[0].value
        # (a name or `self.` attribute: sized per configuration)
        if not _three_parts(out) and not isinstance(out, cst.Name) and self_attribute(out) is None:
            return updated  # another configuration of the same attribute (a cross-attention k/v-only variant)
        info = self.info
        layout = self._layout(attr)
        blocks = self.context.plan.qkv_blocks.get((info.name, attr))
        new = cst.parse_expression(
            f"QKVParallelLinear({code_of(hidden)}, {info.head_dim}, {info.num_heads}, {info.num_kv_heads}, "
            f"bias={code_of(linear_bias(call)) if not transposed else 'True'}, checkpoint_layout={layout}"
            + (", checkpoint_transposed=True" if transposed else "")
            + (f", checkpoint_blocks={blocks[0]}, checkpoint_order={blocks[1]!r}" if blocks else "")
            + ")"
        )
        self.context.need("engine.layers", "QKVParallelLinear")
        self.context.record("fuse-qkv", info.name, call, new, "fused q|k|v projection, sharded by head")
        return updated.with_changes(value=new)

    def _layout(self, attr: str) -> str:
        """The layout expression: one layout, or a choice by the same condition forward branches on."""
        uses = self.context.plan.qkv_layouts.get((self.info.name, attr), [])
        layouts = {layout for layout, _ in uses}
        if len(layouts) == 1:
            return repr(layouts.pop())
        branches = {branch[1]: (layout, branch[0]) for layout, branch in uses if branch}
        if set(branches) == {"body", "orelse"} and branches["body"][1] == branches["orelse"][1]:
            test = branches["body"][1]
            return f"{branches['body'][0]!r} if {test} else {branches['orelse'][0]!r}"
        self.context.flag(
            "fuse-qkv",
            self.info.name,
            f"{attr} is split in several layouts under conditions porter cannot pair",
        )
        return repr("concatenated")


def _projection_inputs(forward: cst.FunctionDef | None, info: AttentionInfo) -> set[str]:
    """The tensors forward passes the q, k and v projections, each followed back through plain
    aliases (`current_states = hidden_states`, what a decoder-only port leaves of a cross-attention
    choice)."""
    if forward is None:
        return set()
    aliases: dict[str, str] = {}
    inputs: set[str] = set()

    class _Find(cst.CSTVisitor):
        def visit_Assign(self, node: cst.Assign) -> None:
            if len(node.targets) == 1 and isinstance(node.targets[0].target, cst.Name):
                if isinstance(node.value, cst.Name):
                    aliases[node.targets[0].target.value] = node.value.value

        def visit_Call(self, node: cst.Call) -> None:
            if self_attribute(node.func) in (info.query, info.key, info.value) and node.args:
                argument = code_of(node.args[0].value)
                seen = set()
                while argument in aliases and argument not in seen:
                    seen.add(argument)
                    argument = aliases[argument]
                inputs.add(argument)

    forward.visit(_Find())
    return inputs


def _tiles(ordered: list[tuple]) -> bool:
    """Three (index, target, source, lower, upper) slices cover the last axis end to end, in order."""
    (_, _, _, lower_q, upper_q), (_, _, _, lower_k, upper_k), (_, _, _, lower_v, upper_v) = ordered
    return lower_q is None and upper_v is None and upper_q == lower_k and upper_k == lower_v


def _last_axis_slice(
    statement: cst.BaseStatement, sources: set[str]
) -> tuple[str, str, str | None, str | None] | None:
    """(target, source, lower, upper) of `target = source[..., lower:upper]` with `source` in
    `sources` (bounds as source text, None where left open)."""
    if not isinstance(statement, cst.SimpleStatementLine) or len(statement_targets(statement)) != 1:
        return None
    value = getattr(statement.body[0], "value", None)
    if not (
        isinstance(value, cst.Subscript)
        and isinstance(value.value, cst.Name)
        and value.value.value in sources
    ):
        return None
    elements = [e.slice for e in value.slice]
    if (
        len(elements) != 2
        or not (isinstance(elements[0], cst.Index) and isinstance(elements[0].value, cst.Ellipsis))
        or not isinstance(elements[1], cst.Slice)
        or elements[1].step is not None
    ):
        return None
    cut = elements[1]
    bound = lambda node: None if node is None else code_of(node).replace(" ", "")  # noqa: E731
    return statement_targets(statement)[0], value.value.value, bound(cut.lower), bound(cut.upper)


def _three_parts(out: cst.BaseExpression) -> bool:
    """`3 * E` or `E * 3` (MHA), or a sum with a doubled term, `E + 2 * kv` or `(kv * 2 + H) * D`
    (MQA/GQA): one projection producing q, k and v."""
    code = code_of(out).replace(" ", "")
    return code.startswith("3*") or code.endswith("*3") or bool(m.findall(out, _SUM_WITH_DOUBLED_TERM))


_DOUBLED = m.BinaryOperation(operator=m.Multiply(), left=m.Integer("2")) | m.BinaryOperation(
    operator=m.Multiply(), right=m.Integer("2")
)
_SUM_WITH_DOUBLED_TERM = m.BinaryOperation(operator=m.Add(), left=_DOUBLED) | m.BinaryOperation(
    operator=m.Add(), right=_DOUBLED
)


class _Transformer(ClassScopedTransformer):
    def __init__(self, context: PortContext, separate_inputs: set[str]) -> None:
        super().__init__(context)
        self.separate_inputs = separate_inputs  # attention classes left unfused
        self.inserted = False
        self.pieces: dict[str, str] = {}

    @property
    def info(self) -> AttentionInfo | None:
        if self.current_class in self.separate_inputs:
            return None
        info = self.context.plan.attention.get(self.current_class or "")
        return info if info is not None and len({info.query, info.key, info.value}) == 3 else None

    def leave_FunctionDef(self, original: cst.FunctionDef, updated: cst.FunctionDef):
        if self.info is not None and self.current_function == "forward" and self.inserted:
            updated = self._drop_unread_aliases(updated)
        return super().leave_FunctionDef(original, updated)

    def _drop_unread_aliases(self, forward: cst.FunctionDef) -> cst.FunctionDef:
        """`current_states = hidden_states` that only k and v's projections read: the fused
        projection reads the original, so nothing reads the alias any more."""
        body = list(forward.body.body)
        kept = []
        for position, statement in enumerate(body):
            small = statement.body[0] if isinstance(statement, cst.SimpleStatementLine) else None
            if (
                isinstance(small, cst.Assign)
                and len(statement.body) == 1
                and len(small.targets) == 1
                and isinstance(small.targets[0].target, cst.Name)
                and isinstance(small.value, cst.Name)
                and small.targets[0].target.value
                not in {n for s in body[position + 1 :] for n in names_in(s)}
            ):
                self.context.record(
                    "fuse-qkv", self.where, statement, "", "an alias only the projections read"
                )
                continue
            kept.append(statement)
        return forward.with_changes(body=forward.body.with_changes(body=kept))

    def visit_FunctionDef(self, node: cst.FunctionDef) -> bool:
        super().visit_FunctionDef(node)
        if self.info is not None and node.name.value == "forward":
            used = names_in(node)
            self.pieces = {}
            for attr, base in ((self.info.query, "q"), (self.info.key, "k"), (self.info.value, "v")):
                name = base
                while name in used:
                    name += "_"
                self.pieces[attr] = name
            self.inserted = False
        return True

    def leave_SimpleStatementLine(self, original: cst.SimpleStatementLine, updated: cst.SimpleStatementLine):
        info = self.info
        if info is None or len(self.function_stack) != 1:
            return updated
        if self.current_function == "__init__":
            return self._init_statement(updated, info)
        if self.current_function != "forward":
            return updated
        replacer = ReplaceProjectionCalls(self.pieces)
        new = updated.visit(replacer)
        if replacer.argument is None or self.inserted:
            return new
        self.inserted = True
        q, k, v = (self.pieces[a] for a in (info.query, info.key, info.value))
        split = cst.parse_statement(
            f"{q}, {k}, {v} = self.{FUSED_QKV}({replacer.argument}).split("
            f"[self.{FUSED_QKV}.q_size, self.{FUSED_QKV}.kv_size, self.{FUSED_QKV}.kv_size], dim=-1)"
        )
        self.context.record(
            "fuse-qkv", self.where, "", split, "one GEMM for q, k and v, split into this rank's heads"
        )
        return cst.FlattenSentinel([split, new])

    def _init_statement(self, statement: cst.SimpleStatementLine, info: AttentionInfo):
        if len(statement.body) != 1 or not isinstance(statement.body[0], cst.Assign):
            return statement
        attr = self_attribute(statement.body[0].targets[0].target)
        if attr not in (info.query, info.key, info.value):
            return statement
        calls = {
            a: self.context.index.classes[info.name].init_calls[a] for a in (info.query, info.key, info.value)
        }
        first = next(a for a in self.context.index.classes[info.name].init_calls if a in calls)
        if attr != first:
            return cst.RemovalSentinel.REMOVE
        biases = {code_of(linear_bias(c)) for c in calls.values()}
        if len(biases) != 1:
            self.context.flag("fuse-qkv", self.where, f"q/k/v projections disagree on bias: {sorted(biases)}")
        query = calls[info.query]
        hidden = code_of(query.args[0].value)
        new = cst.parse_statement(
            f"self.{FUSED_QKV} = QKVParallelLinear({hidden}, {info.head_dim}, {info.num_heads}, {info.num_kv_heads}, "
            f"bias={code_of(linear_bias(query))})"
        )
        self.context.need("engine.layers", "QKVParallelLinear")
        self.context.record(
            "fuse-qkv", self.where, ", ".join(calls), new, "q, k and v fused, column-parallel by head"
        )
        return new
