"""Multi-latent attention settings of the small verify config.

A latent-attention config sizes its heads by its own settings, not by hidden / heads: the
compressed latent (`kv_lora_rank`), a low-rank query (`q_lora_rank`, None where the query is one
projection), and each head's key parts without and with rope and its value. They shrink to sizes
that keep every part distinct (a latent wider than a head, a value wider than the rope part), so a
part taken for another shows as a shape error or a gap. Where the config's `head_dim` is the rope
part's size (the size its rotary embedding is built for), it follows. The names are the config
settings transformers uses for these sizes.
"""

from __future__ import annotations

from transformers import PretrainedConfig

LATENT, QUERY_LATENT, NOPE, ROPE, VALUE = 32, 48, 16, 8, 12
LATENT_NAMES = {
    "kv_lora_rank": LATENT,
    "qk_nope_head_dim": NOPE,
    "qk_rope_head_dim": ROPE,
    "v_head_dim": VALUE,
}
QUERY_LATENT_NAMES = ("q_lora_rank",)


def _int_setting(config: PretrainedConfig, name: str) -> int | None:
    value = getattr(config, name, None)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def shrink_latent_attention(config: PretrainedConfig, default: PretrainedConfig) -> None:
    """Sets the latent-attention sizes of a config that has them; leaves any other config alone."""
    if _int_setting(default, "kv_lora_rank") is None:
        return
    for name, size in LATENT_NAMES.items():
        if _int_setting(default, name) is not None:
            setattr(config, name, size)
    for name in QUERY_LATENT_NAMES:
        if _int_setting(default, name) is not None:  # None: a full-rank query projection
            setattr(config, name, QUERY_LATENT)
    rope = _int_setting(default, "qk_rope_head_dim")
    if rope is not None and _int_setting(default, "head_dim") == rope:
        config.head_dim = ROPE
    if _int_setting(default, "qk_head_dim") is not None:
        config.qk_head_dim = NOPE + ROPE
