"""Emits the causal LM's `load_weights`: HF checkpoint names in, the set loaded out.

Loading is described by data on the class, nano-vllm's way: `packed_modules_mapping` (which
checkpoint modules were fused into which packed parameter, with shard ids), `tied_weights`,
`ignored_weights` (checkpoint tensors that are buffers the engine recomputes), and where needed
`renamed_weights` and `expert_weights`. `load_weights` is one call of the shared loader,
`engine.weights.load_declared_weights`, which raises on any unknown tensor or unloaded parameter,
naming them.
"""

from __future__ import annotations

import libcst as cst

from porter.analysis.checkpoint_names import checkpoint_expert_names, checkpoint_renames
from porter.analysis.cst_utils import code_of, is_docstring
from porter.rewrites.base import ClassScopedTransformer, PortContext, Rewrite

QKV_SHARDS = ("q", "k", "v")


class EmitLoadWeights(Rewrite):
    name = "load-weights"

    def apply(self, module: cst.Module, context: PortContext) -> cst.Module:
        return module.visit(_Transformer(context))


def _source_name(pattern: str) -> str:
    """`embed_out` from the rename pattern `^embed_out\\.` (and `input_linear` from
    `block\\.input_linear\\.weight`: the module, not the tensor's own name)."""
    parts = pattern.strip("^$").replace("\\.", ".").strip(".").split(".")
    if len(parts) > 1 and parts[-1] in ("weight", "bias"):
        parts = parts[:-1]
    return parts[-1]


class _Transformer(ClassScopedTransformer):
    def leave_ClassDef(self, original: cst.ClassDef, updated: cst.ClassDef):
        if updated.name.value != self.context.index.causal_lm:
            return super().leave_ClassDef(original, updated)
        plan = self.context.plan
        # Remote code saves its checkpoint under its own module names: transformers' load-time
        # renames belong to transformers' classes, whatever name the remote classes share with them.
        renames, unsupported = (
            ([], [])
            if self.context.source.remote_code
            else checkpoint_renames(updated.name.value, self.context.source.model_type)
        )
        # A rename is for modules named as in current transformers; a source that still uses the
        # checkpoint's name (an older file) needs none.
        attributes = {a for info in self.context.index.classes.values() for a in info.init_calls}
        renames = [(p, r) for p, r in renames if _source_name(p) not in attributes]
        for transform in unsupported:
            self.context.flag(
                "load-weights", self.where, f"checkpoint conversion beyond a rename: {transform}"
            )
        tables = _tables(plan, renames, _expert_names(self.context))
        method = cst.parse_statement(
            "def load_weights(self, weights):\n    return load_declared_weights(self, weights)\n"
        )
        self.context.need("engine.weights", "load_declared_weights")
        self.context.record(
            "load-weights",
            self.where,
            "",
            "\n".join([*(code_of(t) for t in tables), code_of(method)]),
            "load HF checkpoint names into the engine's parameters",
        )
        head = list(updated.body.body)
        first = 1 if head and is_docstring(head[0]) else 0
        body = [*head[:first], *tables, *head[first:], method]
        return super().leave_ClassDef(
            original, updated.with_changes(body=updated.body.with_changes(body=body))
        )


def _tables(plan, renames: list[tuple[str, str]], experts: list) -> list[cst.BaseStatement]:
    """The class-level tables `load_declared_weights` reads; an empty one is left out."""
    packed: dict[str, list[tuple[str, str | int]]] = {}
    for target, source, shard in sorted(plan.fused, key=lambda f: (f[0], _shard_order(f[2]))):
        packed.setdefault(target, []).append((source, shard))
    values = {
        "packed_modules_mapping": packed,
        "tied_weights": dict(sorted(plan.tied.items())),
        "ignored_weights": sorted(plan.ignored),
        "renamed_weights": renames,
        "expert_weights": experts,
    }
    return [cst.parse_statement(f"{name} = {value!r}\n") for name, value in values.items() if value]


def _shard_order(shard: str | int) -> tuple[int, int | str]:
    """q, k, v in that order; numbered shards by number."""
    if isinstance(shard, str) and shard in QKV_SHARDS:
        return (0, QKV_SHARDS.index(shard))
    return (1, shard) if isinstance(shard, int) else (2, shard)


def _expert_names(context: PortContext) -> list[tuple[str, str, int | None]]:
    """The per-expert checkpoint names transformers stacks, as `load_weights` lines, when the port
    holds stacked experts (a `FusedMoE`) for them to load into."""
    if ("engine.layers.moe", "FusedMoE") not in context.plan.engine_imports:
        return []
    return list(checkpoint_expert_names(context.index.causal_lm, context.source.model_type))
