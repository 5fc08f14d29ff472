"""The engine calling convention each class's forward gets, decided before any forward changes.

The causal LM and its backbone take `(input_ids, positions, kv_caches, input_metadata)`; a class
below takes its own data inputs plus whichever of `positions`, `kv_cache` (one layer's cache) or
`kv_caches`, and `input_metadata` its children need. HF plumbing parameters (masks, caches, output
flags, labels, `**kwargs`), an ALiBi bias under any name (`porter.analysis.alibi`), alternative
inputs (`inputs_embeds`) and optional inputs no call in the file passes
(`porter.analysis.optional_inputs`) are dropped; `position_ids` becomes `positions`. Read-only: the
engine-interface and dead-code rewrites act on it.
"""

from __future__ import annotations

import libcst as cst

from porter.analysis.alibi import bias_inputs
from porter.analysis.cst_utils import function_params, names_in
from porter.analysis.model_index import ModelIndex
from porter.analysis.optional_inputs import never_passed

PLUMBING = {
    "attention_mask",
    "past_key_values",
    "past_key_value",
    "layer_past",
    "use_cache",
    "output_attentions",
    "output_router_logits",
    "output_hidden_states",
    "return_dict",
    "labels",
    "head_mask",
    "cross_attn_head_mask",
    "cache_position",
    "encoder_hidden_states",
    "encoder_attention_mask",
    "logits_to_keep",
    "num_logits_to_keep",
    "past_key_values_length",
    "layer_head_mask",
    "cross_attn_layer_head_mask",
    "kwargs",
    "flash_attn_kwargs",
    "position_embeddings",  # HF's (cos, sin); the rotary rewrite applies rotary from positions instead
    "alibi",  # HF's precomputed ALiBi bias; PagedAttention applies ALiBi from per-head slopes instead
}
ABSENT_INPUTS = {"inputs_embeds", "token_type_ids"}
POSITION_PARAMS = {"position_ids"}
ENGINE_PARAMS = ["input_ids", "positions", "kv_caches", "kv_cache", "input_metadata"]
TOP_LEVEL_SIGNATURE = ["input_ids", "positions", "kv_caches", "input_metadata"]
# Name that stands in for a dropped part of a submodule's old output (`outputs.past_key_values`);
# the dead-code rewrite removes whatever reads it.
DROPPED_OUTPUT = "_porter_dropped_output"
OUTPUT_DATA_FIELDS = ("last_hidden_state", "logits")
OUTPUT_DROPPED_FIELDS = {
    "past_key_values",
    "hidden_states",
    "attentions",
    "cross_attentions",
    "loss",
    "aux_loss",
}


def compute_signatures(
    index: ModelIndex,
    decided_unread: dict[str, set[str]] | None = None,
    cache_inputs: dict[str, set[str]] | None = None,
) -> dict[str, list[str]]:
    """New forward parameters (after self) of every class whose forward changes. `decided_unread`:
    per class, the inputs its forward read only in branches the engine decided away;
    `cache_inputs`: per class, the parameters carrying HF's KV cache under any name
    (`porter.analysis.cache_inputs`), dropped like the plumbing known by name."""
    needs: dict[str, set[str]] = {}

    def need(name: str, trail: tuple[str, ...] = ()) -> set[str]:
        if name in needs:
            return needs[name]
        if name in trail or name not in index.classes:
            return set()
        info = index.classes[name]
        forward = info.methods.get("forward")
        result: set[str] = set()
        if forward is not None:
            if name in index.attention:
                result |= {"kv_cache", "input_metadata"}
            if set(function_params(forward)) & POSITION_PARAMS or "positions" in names_in(forward.body):
                result.add("positions")
            for attr, child in info.submodules.items():
                child_needs = need(child, (*trail, name))
                if attr in info.module_lists:
                    child_needs = {"kv_caches" if n == "kv_cache" else n for n in child_needs}
                result |= child_needs
            if name in (index.causal_lm, index.backbone):
                result |= set(TOP_LEVEL_SIGNATURE)
            if name == index.backbone != index.causal_lm and _embedded_above(index, forward):
                result.discard("input_ids")
        needs[name] = result
        return result

    unpassed = never_passed(index)
    alibi = bias_inputs(index)  # an ALiBi bias under another name (`position_bias`) goes like `alibi`
    signatures: dict[str, list[str]] = {}
    for name in index.reachable:
        forward = index.classes[name].methods.get("forward")
        if forward is None:
            continue
        engine = need(name)
        original = function_params(forward)[1:]
        # `input_ids` is the engine's input where the backbone (or a class above it) needs it; in a
        # module below the backbone it is plain data (a word embedding's input).
        engine_names = set(ENGINE_PARAMS) if "input_ids" in engine else set(ENGINE_PARAMS) - {"input_ids"}
        # A data input that only a branch decided away read goes (a learned position embedding that
        # took `input_ids` only for the batch's shape when no positions were given).
        decided_away = (decided_unread or {}).get(name, set())
        kept = [
            p
            for p in original
            if p not in PLUMBING | ABSENT_INPUTS | POSITION_PARAMS
            and p not in (cache_inputs or {}).get(name, ())
            and p not in engine_names
            and p not in unpassed.get(name, ())
            and p not in alibi.get(name, ())
            and (p not in decided_away or name in (index.causal_lm, index.backbone))
        ]
        starred = forward.params.star_kwarg is not None or isinstance(forward.params.star_arg, cst.Param)
        if engine or kept != original or starred:
            signatures[name] = kept + [p for p in ENGINE_PARAMS if p in engine]
    return signatures


def _embedded_above(index: ModelIndex, backbone_forward: cst.FunctionDef) -> bool:
    """The backbone takes no `input_ids` and a class it is run from takes them: the tokens are
    embedded above it, which hands it hidden states (a layer stack under a model holding the
    embedding)."""
    if "input_ids" in function_params(backbone_forward):
        return False
    return any(
        "input_ids" in function_params(forward)
        for name in index.reachable
        if name not in (index.backbone, index.causal_lm)
        and index.backbone in index.classes[name].submodules.values()
        and (forward := index.classes[name].methods.get("forward")) is not None
    )


def dropped_params(index: ModelIndex, signatures: dict[str, list[str]]) -> dict[str, set[str]]:
    """Per class, the forward parameters the engine interface removes."""
    dropped = {}
    for name, params in signatures.items():
        forward = index.classes[name].methods["forward"]
        star = [
            p.name.value
            for p in (forward.params.star_kwarg, forward.params.star_arg)
            if isinstance(p, cst.Param)
        ]
        dropped[name] = (set(function_params(forward)[1:]) | set(star)) - set(params) - POSITION_PARAMS
    return dropped
