"""An RMSNorm over all heads of q or k becomes one that tensor parallelism can split by heads.

Some attention classes normalize the whole projected q (or k) at once, `num_heads * head_dim`
wide, before splitting it into heads (OLMo2). Under tensor parallelism a rank holds only some of
the heads, so a plain `RMSNorm(num_heads * head_dim)` there has the wrong width and the wrong
mean. Such a norm, built as the engine's RMSNorm with the attention's own head count times its
head size, becomes `HeadShardedRMSNorm(heads, head_dim, ...)`: each rank keeps its heads' weight
and all-reduces the sum of squares (`kv=True` for the key heads, which may be replicated).
A norm of one head's width (Qwen3's per-head q/k norms) is left as it is.
"""

from __future__ import annotations

import libcst as cst

from porter.analysis.cst_utils import call_name, code_of, self_attribute
from porter.rewrites.base import ClassScopedTransformer, PortContext, Rewrite
from porter.rewrites.rms_norm import ENGINE_NORM

SHARDED_NORM = "HeadShardedRMSNorm"


class ShardNormsByHead(Rewrite):
    name = "head-sharded-norm"

    def apply(self, module: cst.Module, context: PortContext) -> cst.Module:
        if not context.plan.attention:
            return module
        return module.visit(_Transformer(context))


def _spaced(code: str) -> str:
    return " ".join(code.split())


class _Transformer(ClassScopedTransformer):
    def leave_Assign(self, original: cst.Assign, updated: cst.Assign) -> cst.Assign:
        info = self.context.plan.attention.get(self.current_class or "")
        value = updated.value
        if (
            info is None
            or self.current_function != "__init__"
            or not isinstance(value, cst.Call)
            or call_name(value) != ENGINE_NORM
            or self_attribute(updated.targets[0].target) is None
            or not value.args
            or value.args[0].keyword is not None
        ):
            return updated
        size = value.args[0].value
        if not (isinstance(size, cst.BinaryOperation) and isinstance(size.operator, cst.Multiply)):
            return updated
        left, right = _spaced(code_of(size.left)), _spaced(code_of(size.right))
        head_dim = _spaced(info.head_dim)
        heads = left if right == head_dim else right if left == head_dim else None
        if heads not in (_spaced(info.num_heads), _spaced(info.num_kv_heads)):
            return updated
        kv = heads != _spaced(info.num_heads)
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
