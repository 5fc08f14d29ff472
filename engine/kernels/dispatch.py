"""Picks the implementation of each attention op; the layers call only this module.

On CUDA tensors (and unless `reference_forced()`):
- the KV cache write runs the CUDA kernel (`engine/kernels/cuda_ops.py`);
- a decode-only step (one new token per sequence) runs the CUDA paged decode kernel when it supports
  the head dim, dtype and block size;
- every other step (prefill, chunked prefill, prefix-cache hits, mixed) runs the Triton kernel
  (`engine/kernels/triton_attention.py`), as does decode outside the CUDA kernel's shapes.
Everything else (CPU tensors, a query whose dtype differs from the cache's) runs the PyTorch
reference (`engine/kernels/reference.py`). The fast modules are imported only when first taken, so
a CPU-only machine never needs Triton or a CUDA toolchain.

The fused elementwise ops (RMSNorm with the residual add, rotary embedding, gated activations; the
section at the end) follow the same rule through `can_fuse_*` predicates: Triton kernels on CUDA,
the layers' own PyTorch code otherwise.

Environment:
    PORTER_FORCE_REFERENCE=1   always run the reference path, even where a faster kernel exists
                               (to bisect a numerical difference, or to test the oracle itself).

The shape checks live here so every backend is called with the same, validated arguments.
"""

from __future__ import annotations

import os

import torch

from engine.input_metadata import InputMetadata
from engine.kernels.reference import paged_attention_reference, write_kv_cache_reference


def reference_forced() -> bool:
    """True when PORTER_FORCE_REFERENCE=1 asks for the reference path everywhere."""
    return os.environ.get("PORTER_FORCE_REFERENCE", "0") == "1"


def _check_cache(key_cache: torch.Tensor, value_cache: torch.Tensor) -> None:
    if key_cache.dim() != 4 or key_cache.shape != value_cache.shape:
        raise ValueError(
            f"KV caches must both be [num_blocks, block_size, num_kv_heads, head_dim], got "
            f"{tuple(key_cache.shape)} and {tuple(value_cache.shape)}"
        )


def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Writes key/value `[T, KV, D]` into the caches at `slot_mapping` (-1 = skip), in place."""
    _check_cache(key_cache, value_cache)
    expected = (slot_mapping.shape[0], *key_cache.shape[2:])
    if tuple(key.shape) != expected or tuple(value.shape) != expected:
        raise ValueError(
            f"key/value must be {expected} to match slot_mapping and the cache, got "
            f"{tuple(key.shape)} and {tuple(value.shape)}"
        )
    if key_cache.is_cuda and not reference_forced():
        from engine.kernels import cuda_ops

        cuda_ops.write_kv_cache(
            key.to(key_cache.dtype), value.to(value_cache.dtype), key_cache, value_cache, slot_mapping
        )
        return
    write_kv_cache_reference(key, value, key_cache, value_cache, slot_mapping)


def paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    input_metadata: InputMetadata,
    scale: float,
    alibi_slopes: torch.Tensor | None = None,
    sliding_window: int | None = None,
    logits_soft_cap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of the new tokens `[T, H, D]` over the paged cache -> `[T, H, D]` (query dtype).

    `sinks` `[H]`: a per-head logit added to each softmax's denominator (attention sinks)."""
    _check_cache(key_cache, value_cache)
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads = key_cache.shape[2]
    if key_cache.shape[3] != head_dim or num_heads % num_kv_heads != 0:
        raise ValueError(
            f"query {tuple(query.shape)} does not fit a cache with {num_kv_heads} KV heads of dim "
            f"{key_cache.shape[3]}"
        )
    if num_tokens != sum(input_metadata.query_lens_host):
        raise ValueError(
            f"query has {num_tokens} tokens but the metadata's query lengths sum to "
            f"{sum(input_metadata.query_lens_host)}"
        )
    if alibi_slopes is not None and tuple(alibi_slopes.shape) != (num_heads,):
        raise ValueError(f"alibi_slopes must be [{num_heads}], got {tuple(alibi_slopes.shape)}")
    if sinks is not None and tuple(sinks.shape) != (num_heads,):
        raise ValueError(f"sinks must be [{num_heads}], got {tuple(sinks.shape)}")
    if query.is_cuda and not reference_forced() and query.dtype == key_cache.dtype:
        return _paged_attention_cuda(
            query,
            key_cache,
            value_cache,
            input_metadata,
            scale,
            alibi_slopes,
            sliding_window,
            logits_soft_cap,
            sinks,
        )
    return paged_attention_reference(
        query,
        key_cache,
        value_cache,
        input_metadata,
        scale,
        alibi_slopes,
        sliding_window,
        logits_soft_cap,
        sinks,
    )


def _paged_attention_cuda(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    input_metadata: InputMetadata,
    scale: float,
    alibi_slopes: torch.Tensor | None,
    sliding_window: int | None,
    logits_soft_cap: float | None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    from engine.kernels import cuda_ops

    if input_metadata.is_decode_only and cuda_ops.supports_decode(query, key_cache):
        return cuda_ops.paged_decode_attention(
            query,
            key_cache,
            value_cache,
            input_metadata.block_tables,
            input_metadata.context_lens,
            input_metadata.max_context_len,
            scale,
            alibi_slopes,
            sliding_window,
            logits_soft_cap,
            sinks=sinks,
        )
    from engine.kernels import triton_attention

    return triton_attention.paged_prefill_attention(
        query,
        key_cache,
        value_cache,
        input_metadata.block_tables,
        input_metadata.context_lens,
        input_metadata.query_start_loc,
        input_metadata.max_query_len,
        scale,
        alibi_slopes,
        sliding_window,
        logits_soft_cap,
        sinks=sinks,
    )


# --- Fused elementwise kernels: RMSNorm (+ residual add), rotary embedding, gated activations -------
#
# Each op comes as a `can_fuse_*` predicate and the fused call. The layers (`engine/layers/norm.py`,
# `rotary.py`, `activation.py`) keep their PyTorch code as the reference and run it whenever the
# predicate says no: CPU tensors, PORTER_FORCE_REFERENCE=1, or a dtype/layout the kernel does not take.

_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Widest row the Triton RMSNorm holds in registers (engine/kernels/triton_norm.py MAX_HIDDEN).
_MAX_FUSED_NORM_HIDDEN = 16384


def _fused_eligible(*tensors: torch.Tensor) -> bool:
    return not reference_forced() and all(t.is_cuda for t in tensors)


def can_fuse_rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    residual: torch.Tensor | None = None,
    multiply_in_float32: bool = False,
) -> bool:
    """Whether `fused_rms_norm` computes this norm (otherwise the layer runs its PyTorch code)."""
    tensors = (x, weight) if residual is None else (x, weight, residual)
    if not _fused_eligible(*tensors) or x.dtype not in _FUSED_DTYPES or weight.dtype not in _FUSED_DTYPES:
        return False
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        return False
    # Without the float32 multiply the output dtype is the promotion of weight and input: kept simple.
    if not multiply_in_float32 and weight.dtype != x.dtype:
        return False
    return (
        x.dim() >= 1 and 0 < x.shape[-1] <= _MAX_FUSED_NORM_HIDDEN and tuple(weight.shape) == (x.shape[-1],)
    )


def fused_rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    weight_offset: float = 0.0,
    multiply_in_float32: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One Triton pass: `(norm(x + residual), x + residual)`, or `(norm(x), None)`; new tensors."""
    from engine.kernels import triton_norm

    return triton_norm.rms_norm(x, weight, eps, residual, weight_offset, multiply_in_float32)


def can_fuse_rotary(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor) -> bool:
    """Whether `fused_rotary_embedding_` can rotate these `[T, heads, D]` views in place."""
    if not _fused_eligible(positions, query, key) or query.dtype not in _FUSED_DTYPES:
        return False
    if positions.dtype.is_floating_point or positions.dim() != 1 or query.dim() != 3 or key.dim() != 3:
        return False
    # In place needs writable, non-aliased rows: no broadcast (stride 0) dims, q and k distinct.
    return (
        query.dtype == key.dtype
        and query.stride(-1) == 1
        and key.stride(-1) == 1
        and 0 not in query.stride()[:2]
        and 0 not in key.stride()[:2]
        and query.data_ptr() != key.data_ptr()
    )


def fused_rotary_embedding_(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    inv_freq: torch.Tensor,
    scaling: float,
    rotary_dim: int,
    is_neox_style: bool,
) -> None:
    """Rotates the first `rotary_dim` features of each head of query/key `[T, heads, D]` in place."""
    from engine.kernels import triton_rotary

    triton_rotary.rotary_embedding_(positions, query, key, inv_freq, scaling, rotary_dim, is_neox_style)


def can_fuse_gated_activation(x: torch.Tensor) -> bool:
    """Whether `fused_gated_activation` takes this `[..., 2d]` input."""
    return _fused_eligible(x) and x.dtype in _FUSED_DTYPES and x.dim() >= 1 and x.shape[-1] % 2 == 0


def fused_gated_activation(x: torch.Tensor, activation: str) -> torch.Tensor:
    """`act(x[..., :d]) * x[..., d:]` in one Triton pass; activation "silu", "gelu" or "gelu_tanh"."""
    from engine.kernels import triton_activation

    return triton_activation.gated_activation(x, activation)
