"""Rotary position embeddings, with inverse frequencies taken from transformers' own rope-init functions.

`get_rope(config, head_dim)` reads `config.rope_parameters` (rope_type, rope_theta,
partial_rotary_factor, ...) so every rope type a config names (linear, dynamic, yarn, longrope,
llama3, ...) matches HF exactly. cos/sin are computed on the fly in float32 from the positions, like
HF's `*RotaryEmbedding.forward`, and applied in the activations' dtype, like `apply_rotary_pos_emb`.

On CUDA one Triton kernel (`engine.kernels.dispatch.fused_rotary_embedding_`) does the same
arithmetic for query and key at once, in place, computing cos/sin itself from the step's inverse
frequencies (no table, so any position and the length-dependent ropes work, and a decode step stays
capturable in a CUDA graph); the PyTorch code here is the reference it matches.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from engine.kernels import dispatch

DEFAULT_ROPE_THETA = 10000.0
DEFAULT_MAX_POSITION = 2048


class RotaryEmbedding(nn.Module):
    """Rotates the first `rotary_dim` features of every head of q and k by position; the rest pass through.

    neox style rotates the two halves against each other (HF `rotate_half`); gptj style rotates
    interleaved pairs `(x[2i], x[2i+1])` (GPT-J `rotate_every_two`). `reverse` turns every pair the
    other way, by minus its angle: a `rotate_half` returning `(x2, -x1)` instead of HF's `(-x2, x1)`
    (NanoChat). It is done by negating the inverse frequencies (cos stays, sin changes sign).
    `table_dtype` rounds cos and sin to that dtype before they rotate: code that caches its tables in
    bfloat16 whatever the model's dtype rotates by the rounded values, and so does the port.
    """

    def __init__(
        self,
        head_dim: int,
        rotary_dim: int,
        max_position: int,
        inv_freq: torch.Tensor,
        attention_scaling: float = 1.0,
        is_neox_style: bool = True,
        reverse: bool = False,
        table_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if rotary_dim > head_dim or rotary_dim % 2 != 0:
            raise ValueError(f"rotary_dim ({rotary_dim}) must be even and at most head_dim ({head_dim})")
        if tuple(inv_freq.shape) != (rotary_dim // 2,):
            raise ValueError(
                f"inv_freq must hold rotary_dim / 2 = {rotary_dim // 2} frequencies, got {tuple(inv_freq.shape)}"
            )
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim
        # Only informative: cos/sin come from the positions directly, so no table needs to grow.
        self.max_position = max_position
        self.attention_scaling = attention_scaling
        self.is_neox_style = is_neox_style
        self.reverse = reverse
        self.table_dtype = table_dtype
        self.register_buffer("inv_freq", inv_freq.detach().float().clone(), persistent=False)

    def frequencies(self, positions: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Inverse frequencies and cos/sin scaling for this step; length-dependent ropes override it."""
        return self.inv_freq, self.attention_scaling

    def signed_frequencies(self, positions: torch.Tensor) -> tuple[torch.Tensor, float]:
        """`frequencies`, negated for a reversed rotation."""
        inv_freq, scaling = self.frequencies(positions)
        return (-inv_freq if self.reverse else inv_freq), scaling

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 `[T, rotary_dim / 2]` cos and sin of each position's angles, times the scaling."""
        inv_freq, scaling = self.signed_frequencies(positions)
        return self._cos_sin(positions, inv_freq, scaling)

    @staticmethod
    def _cos_sin(
        positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions.float()[:, None] * inv_freq.to(positions.device, torch.float32)[None, :]
        return angles.cos() * scaling, angles.sin() * scaling

    def forward(
        self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions `[T]`; query/key `[T, heads*D]` or `[T, heads, D]`; returns them rotated, same shapes.

        On CUDA the rotation happens in place and the returned tensors are `query` and `key`
        themselves; elsewhere they are new tensors. Either way use the returned pair, and do not
        rely on the inputs keeping their unrotated values.
        """
        inv_freq, scaling = self.signed_frequencies(positions)
        query_heads, key_heads = self._heads(query), self._heads(key)
        # With a contiguous last dim the [T, heads, D] forms are views, so rotating them rotates q/k.
        in_place = query.stride(-1) == 1 and key.stride(-1) == 1
        fusable = self.table_dtype is None  # the fused kernel computes its tables in float32
        if fusable and in_place and dispatch.can_fuse_rotary(positions, query_heads, key_heads):
            inv_freq = inv_freq.to(positions.device, torch.float32)
            dispatch.fused_rotary_embedding_(
                positions, query_heads, key_heads, inv_freq, scaling, self.rotary_dim, self.is_neox_style
            )
            return query, key
        cos, sin = self._cos_sin(positions, inv_freq, scaling)
        if self.table_dtype is not None:
            cos, sin = cos.to(self.table_dtype).float(), sin.to(self.table_dtype).float()
        return self._rotate(query, cos, sin), self._rotate(key, cos, sin)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """x as `[T, heads, head_size]` (a view where the strides allow)."""
        # A [T, heads, D] input carries its own per-head size: a caller that sliced off the rotary
        # part itself (partial rotary done by hand) passes D == rotary_dim.
        head_size = x.shape[-1] if x.dim() == 3 else self.head_dim
        if head_size < self.rotary_dim:
            raise ValueError(f"per-head size {head_size} is smaller than the rotary dim {self.rotary_dim}")
        return x if x.dim() == 3 else x.reshape(x.shape[0], x.shape[-1] // head_size, head_size)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = self._heads(x)
        cos = cos[:, None, :].to(x.dtype)  # [T, 1, rotary_dim / 2], broadcast over heads
        sin = sin[:, None, :].to(x.dtype)
        rotated, passed = x[..., : self.rotary_dim], x[..., self.rotary_dim :]
        if self.is_neox_style:
            first, second = rotated.chunk(2, dim=-1)
            rotated = torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)
        else:
            even, odd = rotated[..., 0::2], rotated[..., 1::2]
            rotated = torch.stack([even * cos - odd * sin, odd * cos + even * sin], dim=-1).flatten(-2)
        return torch.cat([rotated, passed], dim=-1).reshape(shape)

    def extra_repr(self) -> str:
        reverse = ", reverse=True" if self.reverse else ""
        return f"head_dim={self.head_dim}, rotary_dim={self.rotary_dim}, neox={self.is_neox_style}{reverse}"


class LengthDependentRotaryEmbedding(RotaryEmbedding):
    """ "dynamic" and "longrope" ropes: HF picks the frequencies from the longest position of the call.

    The same rule is applied per engine step (max position + 1 over the step's tokens): "dynamic"
    recomputes the NTK frequencies past `max_position_embeddings`, "longrope" switches to the long
    factors past `original_max_position_embeddings`. For one sequence this equals HF's generate; a
    step mixing short and long sequences gives them all the longest one's frequencies, as HF would
    for a padded batch. Reading the max position costs a device sync.
    """

    def __init__(
        self,
        config: Any,
        rope_type: str,
        head_dim: int,
        rotary_dim: int,
        is_neox_style: bool,
        reverse: bool = False,
    ):
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, None)
        max_position = getattr(config, "max_position_embeddings", DEFAULT_MAX_POSITION)
        super().__init__(head_dim, rotary_dim, max_position, inv_freq, scaling, is_neox_style, reverse)
        self.config = config
        self.rope_type = rope_type
        if rope_type == "longrope":
            self.threshold = config.rope_parameters["original_max_position_embeddings"]
            long_inv_freq, _ = ROPE_INIT_FUNCTIONS[rope_type](config, None, seq_len=self.threshold + 1)
            self.register_buffer("long_inv_freq", long_inv_freq.float(), persistent=False)
        else:
            self.threshold = max_position

    def frequencies(self, positions: torch.Tensor) -> tuple[torch.Tensor, float]:
        seq_len = int(positions.max()) + 1 if positions.numel() else 0
        if seq_len <= self.threshold:
            return self.inv_freq, self.attention_scaling
        if self.rope_type == "longrope":
            return self.long_inv_freq, self.attention_scaling
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[self.rope_type](
            self.config, positions.device, seq_len=seq_len
        )
        return inv_freq.float(), scaling


def get_rope(
    config: Any,
    head_dim: int,
    rotary_dim: int | None = None,
    is_neox_style: bool = True,
    layer_type: str | None = None,
    reverse: bool = False,
    rope_theta: float | None = None,
    table_dtype: torch.dtype | None = None,
) -> RotaryEmbedding:
    """The rotary embedding `config` describes, for heads of `head_dim`.

    rotary_dim defaults to `int(head_dim * partial_rotary_factor)`, like HF; pass it explicitly for
    configs that name it directly (GPT-J's `rotary_dim`). Non-default rope types take their inverse
    frequencies and attention scaling from `transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS`.
    A config with one rope per layer type (`rope_parameters = {"sliding_attention": {...},
    "full_attention": {...}}`, OLMo3) takes the layer's `layer_type`. `reverse` rotates by minus
    the angle (see RotaryEmbedding). `rope_theta` is the base of a model that keeps it in a config
    field of its own (remote code's `rotary_emb_base`); None reads the config's `rope_theta`.
    `table_dtype` rounds cos/sin to a dtype the source caches its tables in (default rope only).
    """
    config = _layer_type_config(config, layer_type)
    rope_parameters = dict(getattr(config, "rope_parameters", None) or {})
    if rope_parameters and "rope_type" not in rope_parameters and "type" not in rope_parameters:
        if all(isinstance(v, dict) for v in rope_parameters.values()):
            raise ValueError(
                f"config.rope_parameters holds one rope per layer type ({sorted(rope_parameters)}); "
                f"pass that layer type's config to get_rope"
            )
    rope_type = rope_parameters.get("rope_type", rope_parameters.get("type", "default"))
    max_position = getattr(config, "max_position_embeddings", DEFAULT_MAX_POSITION)
    if rope_type == "default":
        theta = rope_parameters.get("rope_theta", getattr(config, "rope_theta", DEFAULT_ROPE_THETA))
        theta = theta if rope_theta is None else rope_theta
        partial = rope_parameters.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
        if rotary_dim is None:
            rotary_dim = int(head_dim * partial)
        inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float) / rotary_dim))
        return RotaryEmbedding(
            head_dim, rotary_dim, max_position, inv_freq, 1.0, is_neox_style, reverse, table_dtype
        )
    if table_dtype is not None:
        raise ValueError(f"table_dtype is read for the default rope only, not rope_type {rope_type!r}")
    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"unknown rope_type {rope_type!r}; transformers knows {sorted(ROPE_INIT_FUNCTIONS)}")
    if rope_theta is not None and rope_theta != rope_parameters.get("rope_theta", rope_theta):
        raise ValueError(
            f"rope_theta {rope_theta} disagrees with the {rope_parameters['rope_theta']} that rope_type "
            f"{rope_type!r} reads from the config"
        )
    inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](config, None)
    # HF derives the rotated width from the config (head_dim * partial_rotary_factor); take it from there.
    hf_rotary_dim = 2 * inv_freq.numel()
    if rotary_dim is not None and rotary_dim != hf_rotary_dim:
        raise ValueError(
            f"rotary_dim {rotary_dim} disagrees with the {hf_rotary_dim} rotated features transformers "
            f"computes for rope_type {rope_type!r} from this config"
        )
    if rope_type in ("dynamic", "longrope"):
        return LengthDependentRotaryEmbedding(
            config, rope_type, head_dim, hf_rotary_dim, is_neox_style, reverse
        )
    return RotaryEmbedding(
        head_dim, hf_rotary_dim, max_position, inv_freq, attention_scaling, is_neox_style, reverse
    )


def _layer_type_config(config: Any, layer_type: str | None) -> Any:
    """`config` as one layer type sees it: a shallow copy whose `rope_parameters` are that type's
    (transformers' rope-init functions then read them as a single rope's); `config` itself when it
    holds one rope for every layer."""
    per_type = getattr(config, "rope_parameters", None) or {}
    if layer_type is None or not isinstance(per_type.get(layer_type), dict):
        return config
    view = copy.copy(config)
    # Set past the config class's own __setattr__: transformers' strict config dataclasses
    # (ModernBERT-decoder's) validate the field as the per-type dict it holds and refuse one rope.
    object.__setattr__(view, "rope_parameters", dict(per_type[layer_type]))
    return view
