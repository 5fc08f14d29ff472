"""Makes every remaining Linear and the vocabulary embedding tensor-parallel.

Which Linear shards which dimension is read from the data flow of `forward`, not from names:
a Linear fed a rank-sharded tensor is row-parallel (it all-reduces); one whose output reaches a
row-parallel Linear (through elementwise ops, activations, attention) is column-parallel; any
other (a projection in or out of the residual stream) is replicated. The QKV projection and
paged attention produce sharded tensors. `Conv1D(out, in)` stores its weight transposed; the
layer is told so. `nn.Embedding(vocab_size, ...)` becomes `VocabParallelEmbedding`.

A tensor that an engine layer splits by itself (the paged attention's output, by query heads; a
fused projection's, by heads or features) cannot be made whole by keeping a Linear replicated: where
one reaches a module that needs the whole hidden dim (a norm or submodule porter does not know to
work per head, a replicated Linear) or is added to a whole tensor, the port gets a review item,
since at tp > 1 that module would see only its rank's share.

A column-parallel Linear whose output forward cuts into n equal parts (`x.chunk(n, dim=-1)`: a
gate|up or q|k|v projection fused in the checkpoint) becomes a `MergedColumnParallelLinear` of n
parts: each part is sharded on its own, so a rank's output still chunks into its share of every
part (a plain column split would give one rank all of the gate and the other all of the up).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import libcst as cst
import libcst.matchers as m

from porter.analysis.activations import elementwise_attributes
from porter.analysis.cst_utils import (
    call_name,
    calls_in,
    calls_softmax,
    code_of,
    dotted_name,
    init_attribute_values,
    self_attribute,
    spaced,
    statement_targets,
)
from porter.analysis.model_index import EMBEDDING_CALLS, LINEAR_CALLS
from porter.rewrites.base import ClassScopedTransformer, PortContext, Rewrite

# Engine layers whose outputs are sharded by head or feature on each rank.
SHARDED_LAYERS = {
    "QKVParallelLinear",
    "MergedColumnParallelLinear",
    "PagedAttention",
    "HeadShardedRMSNorm",  # norms over a split tensor keep it split
    "FeatureShardedRMSNorm",
    "shard_heads",  # a module with a weight per head, built for this rank's heads
}


class TensorParallelLayers(Rewrite):
    name = "tensor-parallel"

    def apply(self, module: cst.Module, context: PortContext) -> cst.Module:
        kinds: dict[tuple[str, str], str] = {}
        chunked: dict[tuple[str, str], int] = {}
        for name in context.index.reachable:
            info = context.index.classes[name]
            forward = info.methods.get("forward")
            sharded = {a for a, call in info.init_calls.items() if call_name(call) in SHARDED_LAYERS}
            if forward is None or not (info.linears() or sharded):
                continue
            chunked.update({(name, a): n for a, n in _chunked_outputs(forward, set(info.linears())).items()})
            attention = context.plan.attention.get(name)
            class_kinds, misuses = _shard_kinds(
                forward,
                set(info.linears()),
                elementwise_attributes(info) | per_head_modules(info, attention),
                sharded,
                reshape_methods(info),
                last_dim_modules(info, context.index.classes) if attention is not None else set(),
                head_dim=attention.head_dim if attention is not None else None,
            )
            kinds.update({(name, a): k for a, k in class_kinds.items()})
            for misuse in misuses:
                context.flag(self.name, f"{name}.forward", misuse)
        vocab_embeddings = _vocab_embedding_subclasses(context)
        return module.visit(_Transformer(context, kinds, vocab_embeddings, chunked))


def _chunked_outputs(forward: cst.FunctionDef, linears: set[str]) -> dict[str, int]:
    """Linear attribute -> n, for each Linear whose output forward cuts with `.chunk(n, dim=-1)`
    (on the call itself or on the variable that holds it at that point)."""
    holders: dict[str, str] = {}  # variable -> the Linear whose output it holds now
    found: dict[str, int] = {}

    def scan(node: cst.CSTNode) -> None:
        for call in calls_in(node):
            func = call.func
            if not (isinstance(func, cst.Attribute) and func.attr.value == "chunk" and call.args):
                continue
            receiver = func.value
            if isinstance(receiver, cst.Call):
                source = self_attribute(receiver.func)
            else:
                source = holders.get(receiver.value) if isinstance(receiver, cst.Name) else None
            parts = call.args[0].value
            dims = [a.value for a in call.args[1:] if a.keyword is None or a.keyword.value == "dim"]
            last_dim = bool(dims) and code_of(dims[0]) in ("-1", "2")  # [batch, seq, features]: 2 is last
            if source in linears and isinstance(parts, cst.Integer) and last_dim:
                found[source] = int(parts.value)

    def walk(statements) -> None:
        for statement in statements:
            if isinstance(statement, cst.SimpleStatementLine):
                for small in statement.body:
                    value = getattr(small, "value", None)
                    if value is None:
                        continue
                    scan(value)  # before the targets rebind what it reads
                    linear = self_attribute(value.func) if isinstance(value, cst.Call) else None
                    for target in statement_targets(statement):
                        if linear in linears:
                            holders[target] = linear
                        else:
                            holders.pop(target, None)
            elif hasattr(statement, "body") and hasattr(statement.body, "body"):
                walk(statement.body.body)

    walk(forward.body.body)
    return found


def _vocab_embedding_subclasses(context: PortContext) -> set[str]:
    """This file's `nn.Embedding` subclasses that some module builds with the vocabulary size."""
    subclasses = context.index.embedding_classes() - EMBEDDING_CALLS
    found = set()
    for info in context.index.classes.values():
        for calls in info.all_init_calls.values():
            for call in calls:
                if call_name(call) in subclasses and call.args and "vocab" in code_of(call.args[0].value):
                    found.add(call_name(call))
    return found


def _shard_kinds(
    forward: cst.FunctionDef,
    linears: set[str],
    elementwise: set[str],
    sharded_sources: set[str],
    reshape_methods: frozenset[str] = frozenset(),
    last_dim: set[str] = frozenset(),
    head_dim: str | None = None,
) -> tuple[dict[str, str], list[str]]:
    """Linear attribute -> "column" | "row" | "replicated", by a fixed point over the data flow; and
    a review message for each place a tensor an engine layer splits reaches what needs it whole.
    `last_dim`: modules that work on the last dimension alone, per head on a `[..., head_dim]` view."""
    forced: set[str] = set()
    while True:
        flow = _propagate(
            forward, linears, elementwise, forced, sharded_sources, reshape_methods, last_dim, head_dim
        )
        if not flow.poisoned - forced:
            kinds = {
                a: ("replicated" if k == "candidate" or a in forced else k) for a, k in flow.kinds.items()
            }
            return kinds, flow.misuses
        forced |= flow.poisoned


@dataclass(slots=True)
class _Flow:
    """What one pass over forward found (see `_propagate`)."""

    kinds: dict[str, str] = field(default_factory=dict)
    poisoned: set[str] = field(default_factory=set)  # column candidates whose output must stay whole
    misuses: list[str] = field(default_factory=list)  # review messages, in source order


@dataclass(frozen=True, slots=True)
class _Value:
    """A value's sharding: whether it is split across ranks, the column candidates it came through
    (which can be kept replicated to make it whole) and the engine layers that split it by
    themselves (which cannot)."""

    sharded: bool = False
    origins: frozenset[str] = frozenset()
    split_by: frozenset[str] = frozenset()
    # Viewed per head (`[..., heads, head_dim]`): its last dimension is one head's, whole on a rank.
    per_head: bool = False

    @staticmethod
    def join(values: list[_Value]) -> _Value:
        split = [v for v in values if v.sharded]
        return _Value(
            bool(split),
            frozenset().union(*(v.origins for v in values)),
            frozenset().union(*(v.split_by for v in values)),
            bool(split) and all(v.per_head for v in split),
        )


_WHOLE = _Value()


def _propagate(
    forward,
    linears,
    elementwise,
    forced,
    sharded_sources,
    reshape_methods=frozenset(),
    last_dim=frozenset(),
    head_dim=None,
) -> _Flow:
    variables: dict[str, _Value] = {}  # variable -> its sharding, where it is sharded
    sizes: dict[str, str] = {}  # local -> the expression it was last given (a view's size)
    flow = _Flow()

    def per_head_view(node: cst.Call) -> bool:
        """`x.view(..., head_dim)`, `.reshape(...)` or `.unflatten(-1, (..., head_dim))`, the size
        possibly a local (`hidden_shape = (*input_shape, -1, self.head_dim)`)."""
        if head_dim is None or not isinstance(node.func, cst.Attribute) or not node.args:
            return False
        if node.func.attr.value not in ("view", "reshape", "unflatten"):
            return False
        size = code_of(node.args[-1].value).strip()
        size = sizes.get(size, size).replace(" ", "")
        return size.rstrip(",)]").endswith(head_dim.replace(" ", ""))

    def needs_whole(value: _Value, consumer: cst.CSTNode, what: str) -> None:
        flow.poisoned.update(value.origins)
        if value.split_by:
            layers = ", ".join(f"self.{a}" for a in sorted(value.split_by))
            flow.misuses.append(
                f"`{code_of(consumer).strip()}`: {what}, but its input is split across ranks by "
                f"{layers} (each rank holds its share of the heads or features), so at tp > 1 it "
                "would see only that share. Check that it works per head (or port it as a sharded "
                "layer); tp=1 is unaffected"
            )

    def evaluate(node: cst.CSTNode) -> _Value:
        if isinstance(node, cst.Call):
            attr = self_attribute(node.func)
            if m.matches(node.func, m.Attribute(attr=m.Name("expand_as"))) and len(node.args) == 1:
                # `x.expand_as(y)` has y's shape on this rank, split or not: x broadcasts to it or
                # the call fails, so x's own sharding does not reach the result
                evaluate(node.func.value)
                return evaluate(node.args[0].value)
            inner = [evaluate(a.value) for a in node.args]
            if isinstance(node.func, cst.Attribute) and attr is None:
                inner.append(evaluate(node.func.value))
            value = _Value.join(inner)
            if value.sharded and isinstance(node.func, cst.Attribute) and attr is None:
                # a view that puts one head in the last dimension makes it per-head; any other
                # reshape may not keep it so
                if per_head_view(node):
                    return _Value(True, value.origins, value.split_by, True)
                if node.func.attr.value in ("view", "reshape", "flatten", "unflatten"):
                    value = _Value(True, value.origins, value.split_by)
            if attr in linears and attr not in forced:
                if value.sharded:
                    flow.kinds[attr] = "row"
                    for origin in value.origins:
                        flow.kinds[origin] = "column"
                    return _WHOLE
                flow.kinds.setdefault(attr, "candidate")
                return _Value(True, frozenset({attr}))
            if attr in linears:
                needs_whole(value, node, f"self.{attr} is kept whole (replicated)")
                return _WHOLE
            if attr in sharded_sources:
                # The engine layer splits its output by heads (or features) whatever its input.
                return _Value(True, value.origins, value.split_by | {attr})
            if attr in last_dim and value.per_head:
                return value  # one head at a time: a rank holds whole heads
            if (
                attr in elementwise
                or attr == "rotary_emb"
                or attr in reshape_methods
                or _is_elementwise_call(node)
            ):
                return value
            if attr is not None:
                needs_whole(value, node, f"self.{attr} is not known to work on a split tensor")
            else:
                flow.poisoned.update(value.origins)  # a function or method that may mix the hidden dim
            return _WHOLE
        if isinstance(node, cst.Name):
            return variables.get(node.value, _WHOLE)
        if isinstance(node, cst.BinaryOperation):
            left, right = evaluate(node.left), evaluate(node.right)
            if left.sharded != right.sharded and _is_tensor(node.right if left.sharded else node.left):
                needs_whole(left if left.sharded else right, node, "a split tensor meets a whole one")
                return _WHOLE  # sharded + whole tensor (a residual add)
            return _Value.join([left, right])
        children = [evaluate(child) for child in node.children if isinstance(child, cst.BaseExpression)]
        return _Value.join(children) if children else _WHOLE

    def walk(statements) -> None:
        for statement in statements:
            if isinstance(statement, cst.SimpleStatementLine):
                for small in statement.body:
                    value = getattr(small, "value", None)
                    if value is None:
                        continue
                    result = evaluate(value)
                    if isinstance(small, cst.Return):
                        flow.poisoned.update(result.origins)  # a module returns whole tensors
                    for target in statement_targets(statement):
                        sizes[target] = code_of(value).strip()
                        if result.sharded:
                            variables[target] = result
                        else:
                            variables.pop(target, None)
            elif hasattr(statement, "body") and hasattr(statement.body, "body"):
                walk(statement.body.body)
                orelse = getattr(statement, "orelse", None)
                if orelse is not None and hasattr(orelse, "body"):
                    walk(orelse.body.body if hasattr(orelse.body, "body") else [orelse])

    walk(forward.body.body)
    return flow


ELEMENTWISE_FUNCTIONS = {
    "torch.tanh",
    "torch.sigmoid",
    "torch.relu",
    "torch.exp",
    "nn.functional.gelu",
    "nn.functional.silu",
    "nn.functional.relu",
    "F.gelu",
    "F.silu",
    "F.relu",
    "torch.nn.functional.gelu",
    "torch.nn.functional.silu",
}
# Methods that keep a head- or feature-sharded tensor sharded the same way (splits of the fused
# projection, per-head views that the flatten rewrite made rank-agnostic).
ELEMENTWISE_METHODS = {
    "to",
    "contiguous",
    "float",
    "half",
    "type_as",
    "clamp",
    "pow",
    "mul",
    "add",
    "split",
    "chunk",
    "unflatten",
    "view",
    "reshape",
    "flatten",
}


def _is_elementwise_call(node: cst.Call) -> bool:
    name = call_name(node)
    if name in ELEMENTWISE_FUNCTIONS:
        return True
    return (
        isinstance(node.func, cst.Attribute)
        and self_attribute(node.func) is None
        and node.func.attr.value in ELEMENTWISE_METHODS
    )


def _is_tensor(node: cst.BaseExpression) -> bool:
    """A variable or call result (scalars are attributes and literals)."""
    return isinstance(node, (cst.Name, cst.Call, cst.Subscript)) and code_of(node) not in {
        "None",
        "True",
        "False",
    }


def reshape_methods(info) -> frozenset[str]:
    """The class's own helper methods that run no module (head splits and merges): they keep a
    head-sharded tensor head-sharded."""
    found = set()
    for name, method in info.methods.items():
        if name in ("__init__", "forward"):
            continue
        calls_module = any(f"self.{attr}(" in code_of(method) for attr in info.init_calls)
        if not calls_module and not calls_softmax(code_of(method)):
            found.add(name)
    return frozenset(found)


# Reductions a module may make over the last dimension alone and still work one head at a time.
_REDUCTIONS = ("mean", "sum", "norm", "var", "amax", "amin", "logsumexp", "softmax", "std")
# What would move another dimension into the last place, or bring state of its own: not one head's.
_NOT_LAST_DIM = (
    "transpose",
    "permute",
    "view",
    "reshape",
    "flatten",
    "movedim",
    "swapaxes",
    "Parameter(",
    "register_buffer",
)


def last_dim_modules(info, classes) -> set[str]:
    """Attributes of a class built from a class of this file that holds no parameters or modules and
    reduces over the last dimension only (a weightless RMSNorm, NanoChat's q/k norms): on a per-head
    view each head is normalized by itself, so a tensor split by heads stays split through them."""
    found = set()
    for attr, call in info.init_calls.items():
        built = classes.get(call_name(call) or "")
        if built is None or built.init_calls or any(word in code_of(built.node) for word in _NOT_LAST_DIM):
            continue
        reductions = [
            c
            for c in calls_in(built.node)
            if isinstance(c.func, cst.Attribute) and c.func.attr.value in _REDUCTIONS
        ]
        if reductions and all(_over_last_dim(c) for c in reductions):
            found.add(attr)
    return found


def _over_last_dim(call: cst.Call) -> bool:
    dims = [a.value for a in call.args if a.keyword is None or a.keyword.value == "dim"]
    return bool(dims) and code_of(dims[0]).replace(" ", "") in ("-1", "(-1,)")


def per_head_modules(info, attention) -> set[str]:
    """Attributes of an attention class built one head wide (per-head q/k norms, `RMSNorm(head_dim)`):
    they run on each head by itself, so a tensor split by heads stays split through them."""
    if attention is None:
        return set()
    widths = {spaced(attention.head_dim)}
    alias = self_attribute(cst.parse_expression(attention.head_dim))
    init = info.methods.get("__init__")
    if alias is not None and init is not None:  # `self.head_dim`: also what __init__ set it to
        value = init_attribute_values(init).get(alias)
        if isinstance(value, cst.Call) and call_name(value) == "getattr" and len(value.args) == 3:
            # getattr(config, "head_dim", <default>): the attribute it reads, and the default
            name = value.args[1].value
            if isinstance(name, cst.SimpleString):
                widths.add(spaced(f"{code_of(value.args[0].value)}.{name.evaluated_value}"))
            value = value.args[2].value
        if value is not None:
            widths.add(spaced(code_of(value)))
    values = init_attribute_values(init) if init is not None else {}
    plain = {spaced(code_of(_with_plain_attributes(cst.parse_expression(w), values))) for w in widths}

    def one_head(call: cst.Call) -> bool:
        width = _width_argument(call)
        if width is None:
            return False
        return width in widths or spaced(code_of(_with_plain_attributes(cst.parse_expression(width), values))) in plain

    return {attr for attr, call in info.init_calls.items() if one_head(call)}


def _with_plain_attributes(node: cst.BaseExpression, values: dict[str, cst.BaseExpression]) -> cst.BaseExpression:
    """`node` with each `self.x` that __init__ set to a plain name or attribute (`self.hidden_size =
    config.hidden_size`) written as that (`self.hidden_size // self.num_heads` -> `config.hidden_size
    // config.num_attention_heads`): the same width, however the norm's construction spells it."""

    class _Substitute(cst.CSTTransformer):
        def leave_Attribute(self, original: cst.Attribute, updated: cst.Attribute) -> cst.BaseExpression:
            value = values.get(self_attribute(original) or "")
            if isinstance(value, (cst.Name, cst.Attribute)):
                return value
            return updated

    return node.visit(_Substitute())


# Keywords a norm takes its width by (`RMSNorm(dim=head_dim)`, `LayerNorm(normalized_shape=...)`).
WIDTH_KEYWORDS = ("dim", "hidden_size", "normalized_shape", "num_features")


def _width_argument(call: cst.Call) -> str | None:
    """The module's width as the call passes it: its first positional argument or a width keyword."""
    if call.args and call.args[0].keyword is None:
        return spaced(code_of(call.args[0].value))
    for argument in call.args:
        if argument.keyword is not None and argument.keyword.value in WIDTH_KEYWORDS:
            return spaced(code_of(argument.value))
    return None


class _Transformer(ClassScopedTransformer):
    def __init__(
        self,
        context: PortContext,
        kinds: dict[tuple[str, str], str],
        vocab_embeddings: set[str],
        chunked: dict[tuple[str, str], int],
    ) -> None:
        super().__init__(context)
        self.kinds = kinds
        self.vocab_embeddings = vocab_embeddings
        self.chunked = chunked

    def leave_ClassDef(self, original: cst.ClassDef, updated: cst.ClassDef):
        if updated.name.value in self.vocab_embeddings:
            bases = [
                a.with_changes(value=cst.Name("VocabParallelEmbedding"))
                if dotted_name(a.value) in EMBEDDING_CALLS
                else a
                for a in updated.bases
            ]
            self.context.need("engine.layers", "VocabParallelEmbedding")
            self.context.record(
                "tensor-parallel",
                updated.name.value,
                "nn.Embedding",
                "VocabParallelEmbedding",
                "a word embedding (built with the vocab size): vocabulary-parallel",
            )
            updated = updated.with_changes(bases=bases)
        return super().leave_ClassDef(original, updated)

    def leave_Assign(self, original: cst.Assign, updated: cst.Assign) -> cst.Assign:
        if self.current_function != "__init__" or not isinstance(updated.value, cst.Call):
            return updated
        if self.current_class not in self.context.index.reachable:
            return updated  # a task head the prune rewrite removes
        attr = self_attribute(updated.targets[0].target)
        call = updated.value
        name = call_name(call)
        if name in EMBEDDING_CALLS and call.args and "vocab" in code_of(call.args[0].value):
            new = call.with_changes(func=cst.Name("VocabParallelEmbedding"))
            self.context.need("engine.layers", "VocabParallelEmbedding")
            self.context.record("tensor-parallel", self.where, call, new, "vocabulary-parallel embedding")
            return updated.with_changes(value=new)
        if name not in LINEAR_CALLS or attr is None:
            return updated
        kind = self.kinds.get((self.current_class, attr), "replicated")
        layer = {
            "column": "ColumnParallelLinear",
            "row": "RowParallelLinear",
            "replicated": "ReplicatedLinear",
        }[kind]
        args = list(call.args)
        if name == "Conv1D":
            # Conv1D(nf=out, nx=in) stores weight as [in, out].
            args = [
                args[1].with_changes(comma=args[0].comma),
                args[0].with_changes(comma=args[1].comma),
                *args[2:],
            ]
            args.append(cst.Arg(cst.Name("True"), keyword=cst.Name("checkpoint_transposed")))
        parts = self.chunked.get((self.current_class, attr))
        if kind == "column" and parts and len(args) >= 2 and args[1].keyword is None:
            layer = "MergedColumnParallelLinear"
            args[1] = args[1].with_changes(value=_equal_parts(args[1].value, parts))
            why = f"column-parallel, its output cut into {parts} parts: each part sharded on its own"
        else:
            why = f"{kind} by the data flow of forward"
        new = call.with_changes(func=cst.Name(layer), args=args)
        self.context.need("engine.layers", layer)
        self.context.record("tensor-parallel", self.where, call, new, why)
        return updated.with_changes(value=new)


def _equal_parts(size: cst.BaseExpression, parts: int) -> cst.BaseExpression:
    """`[part] * n` for an output size of n equal parts: `2 * x` -> `[x] * 2`, else `[size // n] * n`."""
    if (
        isinstance(size, cst.BinaryOperation)
        and isinstance(size.operator, cst.Multiply)
        and isinstance(size.left, cst.Integer)
        and int(size.left.value) == parts
    ):
        part = code_of(size.right)
    else:
        part = f"({code_of(size)}) // {parts}"
    return cst.parse_expression(f"[{part}] * {parts}")
