"""An RMSNorm over all heads of q or k becomes one that tensor parallelism can split by heads.

Some attention classes normalize the whole projected q (or k) at once, `num_heads * head_dim`
wide, before splitting it into heads (OLMo2). Under tensor parallelism a rank holds only some of
the heads, so a plain `RMSNorm(num_heads * head_dim)` there has the wrong width and the wrong
mean. Such a norm, built as the engine's RMSNorm with the attention's own head count times its
head size, becomes `HeadShardedRMSNorm(heads, head_dim, ...)`: each rank keeps its heads' weight
and all-reduces the sum of squares (`kv=True` for the key heads, which may be replicated).
A norm of one head's width (Qwen3's per-head q/k norms) is left as it is.

Likewise a norm that forward applies to a tensor tensor parallelism splits (BitNet's sub-norms):
the paged attention's output, sharded by query heads, becomes `HeadShardedRMSNorm(heads,
head_dim, ...)`; an activation computed from a fused column-parallel projection (`act(gate_up)`),
sharded by features, becomes `FeatureShardedRMSNorm(size, ...)`. The tensor-parallel rewrite then
sees their outputs as sharded, so the Linear after them is row-parallel.

A module an attention class builds with a weight per head, sized by a `(num_heads, head_dim)` tuple
(a q/k LayerNorm normalizing each head with its own weight), is built for this rank's heads instead, `(local_heads(num_heads),
head_dim)`, and wrapped in `shard_heads(..., num_heads)`, which makes its per-head parameters load
this rank's rows of the checkpoint (`kv=True` for the key heads).
"""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.activations import elementwise_attributes
from porter.analysis.attention import AttentionInfo
from porter.analysis.cst_utils import call_name, code_of, self_attribute, spaced, statement_targets
from porter.analysis.engine_names import ENGINE_NORM
from porter.rewrites.base import ClassScopedTransformer, PortContext, Rewrite

SHARDED_NORM = "HeadShardedRMSNorm"
PER_HEAD_WRAPPER = "shard_heads"
LOCAL_HEADS = "local_heads"
FEATURE_SHARDED_NORM = "FeatureShardedRMSNorm"
# Engine layers whose output each rank holds only its share of: by features (a fused gate|up
# projection) or by query heads (the paged attention). q and k, split by heads out of the fused
# q|k|v projection, are the constructor-size rule's business (below).
SPLIT_BY_FEATURES = {"MergedColumnParallelLinear"}
SPLIT_BY_HEADS = {"PagedAttention"}
RESHAPES = {"view", "reshape", "contiguous", "flatten", "float", "to", "chunk", "split"}


class ShardNormsByHead(Rewrite):
    name = "head-sharded-norm"

    def apply(self, module: cst.Module, context: PortContext) -> cst.Module:
        on_split = {}  # (class, norm attribute) -> "heads" | "features"
        for name in context.index.reachable:
            info = context.index.classes[name]
            if "forward" in info.methods:
                on_split.update({(name, a): k for a, k in _norms_on_split_tensors(info).items()})
        if not context.plan.attention and not on_split:
            return module
        return module.visit(_Transformer(context, on_split))


def _norms_on_split_tensors(info) -> dict[str, str]:
    """Norm attribute -> how its input is split ("heads" | "features"), for each engine RMSNorm that
    forward applies to a tensor derived, through activations, elementwise arithmetic and reshapes,
    from the paged attention's output or a fused column-parallel projection's."""
    layers = {a: call_name(c) for a, c in info.init_calls.items()}
    norms = {a for a, layer in layers.items() if layer == ENGINE_NORM}
    activations = elementwise_attributes(info)
    split: dict[str, str] = {}  # variable -> "heads" | "features"
    found: dict[str, str] = {}

    def kind(node: cst.CSTNode) -> str | None:
        if isinstance(node, cst.Name):
            return split.get(node.value)
        if isinstance(node, cst.Call):
            attr = self_attribute(node.func)
            if layers.get(attr) in SPLIT_BY_HEADS:
                return "heads"
            if layers.get(attr) in SPLIT_BY_FEATURES:
                return "features"
            inner = next((k for k in (kind(a.value) for a in node.args) if k), None)
            if attr in norms and inner:
                found.setdefault(attr, inner)
                return inner
            if attr in activations:
                return inner
            if isinstance(node.func, cst.Attribute) and attr is None and node.func.attr.value in RESHAPES:
                return kind(node.func.value)
            return None
        if isinstance(node, cst.BinaryOperation):
            return kind(node.left) or kind(node.right)
        return None

    for statement in info.methods["forward"].body.body:
        if not isinstance(statement, cst.SimpleStatementLine):
            continue
        for small in statement.body:
            value = getattr(small, "value", None)
            if value is None:
                continue
            result = kind(value)
            for target in statement_targets(statement):
                if result:
                    split[target] = result
                else:
                    split.pop(target, None)
    return found


class _Transformer(ClassScopedTransformer):
    def __init__(self, context: PortContext, on_split: dict[tuple[str, str], str]) -> None:
        super().__init__(context)
        self.on_split = on_split

    def leave_Assign(self, original: cst.Assign, updated: cst.Assign) -> cst.Assign:
        attr = self_attribute(updated.targets[0].target)
        per_head = self._per_head_weights(updated)
        if per_head is not None:
            return per_head
        split = self.on_split.get((self.current_class or "", attr or ""))
        if split is not None and self.current_function == "__init__" and isinstance(updated.value, cst.Call):
            return self._on_split_tensor(updated, split)
        member = self._attention_member(updated)
        if member is None:
            return updated
        info, value = member
        if call_name(value) != ENGINE_NORM or not value.args or value.args[0].keyword is not None:
            return updated
        size = value.args[0].value
        heads = self._heads_of_size(size, info)
        if heads is None and spaced(code_of(size)) != spaced(info.head_dim):
            # A norm applied to the whole q (or k) out of the fused projection is as wide as all its
            # heads, however its size is spelled (`config.hidden_size`): the source could not run otherwise.
            piece = _fused_piece_normed(
                self.context.index.classes[self.current_class].methods.get("forward"), attr
            )
            heads = {"q": spaced(info.num_heads), "k": spaced(info.num_kv_heads)}.get(piece or "")
        if heads is None:
            return updated
        kv = heads != spaced(info.num_heads)
        rest = [code_of(a.with_changes(comma=cst.MaybeSentinel.DEFAULT)) for a in value.args[1:]]
        arguments = ", ".join([heads, info.head_dim, *rest, *(["kv=True"] if kv else [])])
        new = cst.parse_expression(f"{SHARDED_NORM}({arguments})")
        self.context.need("engine.layers", SHARDED_NORM)
        self.context.record(
            "head-sharded-norm",
            self.where,
            value,
            new,
            "normalizes all heads at once: each rank keeps its heads and all-reduces the sum of squares",
        )
        return updated.with_changes(value=new)

    @staticmethod
    def _heads_of_size(size: cst.BaseExpression, info: AttentionInfo) -> str | None:
        """The head count of a norm sized `heads * head_dim` (query or key/value heads), else None."""
        if not (isinstance(size, cst.BinaryOperation) and isinstance(size.operator, cst.Multiply)):
            return None
        left, right = spaced(code_of(size.left)), spaced(code_of(size.right))
        head_dim = spaced(info.head_dim)
        heads = left if right == head_dim else right if left == head_dim else None
        return heads if heads in (spaced(info.num_heads), spaced(info.num_kv_heads)) else None

    def _attention_member(self, updated: cst.Assign) -> tuple[AttentionInfo, cst.Call] | None:
        """(the class's attention facts, the call) for `self.x = Call(...)` in an attention class's
        __init__; None for any other assignment."""
        info = self.context.plan.attention.get(self.current_class or "")
        value = updated.value
        if (
            info is None
            or self.current_function != "__init__"
            or not isinstance(value, cst.Call)
            or self_attribute(updated.targets[0].target) is None
        ):
            return None
        return info, value

    def _per_head_weights(self, updated: cst.Assign) -> cst.Assign | None:
        """`self.x = Module(..., (num_heads, head_dim), ...)` in an attention class's __init__ ->
        `self.x = shard_heads(Module(..., (local_heads(num_heads), head_dim), ...), num_heads)`."""
        member = self._attention_member(updated)
        if member is None or call_name(member[1]) == PER_HEAD_WRAPPER:
            return None
        info, value = member
        # query heads last: where the two counts are one expression (MHA), the heads split as queries
        head_counts = {spaced(info.num_kv_heads): True, spaced(info.num_heads): False}
        for index, arg in enumerate(value.args):
            size = arg.value
            if not (isinstance(size, cst.Tuple) and len(size.elements) == 2):
                continue
            heads, width = size.elements
            kv = head_counts.get(spaced(code_of(heads.value)))
            if kv is None or spaced(code_of(width.value)) != spaced(info.head_dim):
                continue
            count = code_of(heads.value)
            kv_arg = ", kv=True" if kv else ""
            local = heads.with_changes(value=cst.parse_expression(f"{LOCAL_HEADS}({count}{kv_arg})"))
            args = list(value.args)
            args[index] = arg.with_changes(value=size.with_changes(elements=[local, width]))
            built = value.with_changes(args=args)
            new = cst.parse_expression(f"{PER_HEAD_WRAPPER}(__built__, {count}{kv_arg})")
            new = new.with_changes(args=[new.args[0].with_changes(value=built), *new.args[1:]])
            self.context.need("engine.layers", PER_HEAD_WRAPPER)
            self.context.need("engine.layers", LOCAL_HEADS)
            self.context.record(
                "head-sharded-norm",
                self.where,
                value,
                new,
                "holds a weight per head: built for this rank's heads, each loading its rows of the checkpoint",
            )
            return updated.with_changes(value=new)
        return None

    def _on_split_tensor(self, updated: cst.Assign, split: str) -> cst.Assign:
        value = updated.value
        rest = [code_of(a.with_changes(comma=cst.MaybeSentinel.DEFAULT)) for a in value.args[1:]]
        info = self.context.plan.attention.get(self.current_class or "")
        if info is not None and value.args and spaced(code_of(value.args[0].value)) == spaced(info.head_dim):
            return updated  # one head's width: a per-head norm, which every rank runs whole
        if split == "heads" and info is not None:
            new = cst.parse_expression(f"{SHARDED_NORM}({', '.join([info.num_heads, info.head_dim, *rest])})")
            reason = "normalizes the attention output, which each rank holds only its heads of"
        elif split == "features":
            size = code_of(value.args[0].value)
            new = cst.parse_expression(f"{FEATURE_SHARDED_NORM}({', '.join([size, *rest])})")
            reason = "normalizes an activation each rank holds only its features of"
        else:
            self.context.flag(
                "head-sharded-norm", self.where, "a norm on a tensor split by heads outside attention"
            )
            return updated
        self.context.need("engine.layers", new.func.value)
        self.context.record(
            "head-sharded-norm", self.where, value, new, reason + ": it all-reduces the sum of squares"
        )
        return updated.with_changes(value=new)


def _fused_piece_normed(forward: cst.FunctionDef | None, norm: str | None) -> str | None:
    """Which piece ("q" or "k") of a fused projection `forward` applies `self.<norm>` to directly,
    the pieces coming from `q, k, v = self.<fused>(x).split([...q_size, ...kv_size, ...kv_size])`."""
    if forward is None or norm is None:
        return None
    pieces: dict[str, str] = {}
    for assign in m.findall(forward, m.Assign(value=m.Call(func=m.Attribute(attr=m.Name("split"))))):
        target = assign.targets[0].target
        sizes = assign.value.args[0].value if assign.value.args else None
        if not (isinstance(target, cst.Tuple) and isinstance(sizes, cst.List) and len(target.elements) == 3):
            continue
        size_names = [getattr(element.value, "attr", None) for element in sizes.elements]
        if [getattr(n, "value", None) for n in size_names] != ["q_size", "kv_size", "kv_size"]:
            continue
        for name, element in zip("qk", target.elements[:2]):
            if isinstance(element.value, cst.Name):
                pieces[element.value.value] = name
    for call in m.findall(forward, m.Call(func=m.Attribute(value=m.Name("self"), attr=m.Name(norm)))):
        if len(call.args) == 1 and isinstance(call.args[0].value, cst.Name):
            return pieces.get(call.args[0].value.value)
    return None
