"""Emits the causal LM's `load_weights`: HF checkpoint names in, the set loaded out.

The method is data plus one call: which checkpoint modules were fused into which packed
parameter (with shard ids), which parameter is tied to which, and which checkpoint tensors are
buffers the engine recomputes. `engine.weights.load_named_weights` does the loading and raises on
any unknown tensor or unloaded parameter, naming them.
"""

from __future__ import annotations

import libcst as cst

from porter.analysis.checkpoint_names import checkpoint_expert_names, checkpoint_renames
from porter.rewrites.base import ClassScopedTransformer, PortContext, Rewrite


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
        renamed = "".join(f"\n        ({p!r}, {r!r})," for p, r in renames)
        experts = _expert_names(self.context)
        fused = "".join(
            f"\n        ({packed!r}, {name!r}, {shard!r}),"
            for packed, name, shard in sorted(plan.fused, key=str)
        )
        tied = "".join(f"\n        {k!r}: {v!r}," for k, v in sorted(plan.tied.items()))
        ignored = "".join(f"\n        {pattern!r}," for pattern in sorted(plan.ignored))
        method = cst.parse_statement(
            "def load_weights(self, weights):\n"
            f"    fused = [{fused}\n    ]\n"
            f"    tied = {{{tied}\n    }}\n"
            f"    ignored = [{ignored}\n    ]\n"
            + (f"    renamed = [{renamed}\n    ]\n" if renames else "")
            + (f"    experts = [{experts}\n    ]\n" if experts else "")
            + "    return load_named_weights(self, weights, fused=fused, tied=tied, ignored=ignored"
            + (", renamed=renamed" if renames else "")
            + (", experts=experts" if experts else "")
            + ")\n"
        )
        self.context.need("engine.weights", "load_named_weights")
        self.context.record(
            "load-weights", self.where, "", method, "load HF checkpoint names into the engine's parameters"
        )
        body = [*updated.body.body, method]
        return super().leave_ClassDef(
            original, updated.with_changes(body=updated.body.with_changes(body=body))
        )


def _expert_names(context: PortContext) -> str:
    """The per-expert checkpoint names transformers stacks, as `load_weights` lines, when the port
    holds stacked experts (a `FusedMoE`) for them to load into."""
    if ("engine.layers.moe", "FusedMoE") not in context.plan.engine_imports:
        return ""
    names = checkpoint_expert_names(context.index.causal_lm, context.source.model_type)
    return "".join(f"\n        ({stacked!r}, {name!r}, {part!r})," for stacked, name, part in names)
