"""Triton rotary embedding: rotates query and key in place, one launch for both.

cos/sin are computed in the kernel exactly as `engine.layers.rotary.RotaryEmbedding.cos_sin` does
(`float(position) * inv_freq` in float32, CUDA's cosf/sinf, times the attention scaling) and then
rounded to the activations' dtype, and every product and sum is rounded like the eager reference,
so no cos/sin table is kept: nothing grows with max_position_embeddings, any position works, and a
rope whose frequencies change with the step's length just passes that step's inv_freq.

One program takes one token and BLOCK_H heads of either the query or the key (grid axis 1 covers
the query's head blocks, then the key's). The grid comes from host-known sizes only, so a launch
fits a captured CUDA graph.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from engine.kernels import triton_math
from engine.kernels.triton_math import round_to

_ELEMENTS_PER_PROGRAM = 1024  # rotated pairs per program: BLOCK_H heads x rotary_dim / 2


@triton.jit
def _rotate_heads(
    base_ptr,
    stride_head,
    first_head,
    num_heads,
    cos,
    sin,
    offs,
    pair_mask,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    IS_NEOX: tl.constexpr,
):
    dtype = base_ptr.dtype.element_ty
    heads = first_head + tl.arange(0, BLOCK_H)
    mask = (heads < num_heads)[:, None] & pair_mask[None, :]
    rows = base_ptr + heads.to(tl.int64)[:, None] * stride_head
    if IS_NEOX:  # pairs (i, i + rotary_dim / 2): the two halves, HF's rotate_half
        first = rows + offs[None, :]
        second = rows + (offs + HALF)[None, :]
    else:  # pairs (2i, 2i + 1): GPT-J's rotate_every_two
        first = rows + (2 * offs)[None, :]
        second = rows + (2 * offs + 1)[None, :]
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(second, mask=mask, other=0.0).to(tl.float32)
    # Each product and sum rounded to the activation dtype, like the eager `x1 * cos - x2 * sin`.
    out1 = round_to(x1 * cos[None, :], dtype) - round_to(x2 * sin[None, :], dtype)
    out2 = round_to(x2 * cos[None, :], dtype) + round_to(x1 * sin[None, :], dtype)
    tl.store(first, out1.to(dtype), mask=mask)
    tl.store(second, out2.to(dtype), mask=mask)


@triton.jit
def _rotary_kernel(
    query_ptr,
    key_ptr,
    positions_ptr,
    inv_freq_ptr,
    scaling,
    num_query_heads,
    num_key_heads,
    stride_q_token,
    stride_q_head,
    stride_k_token,
    stride_k_head,
    HALF: tl.constexpr,
    HALF_PAD: tl.constexpr,
    BLOCK_H: tl.constexpr,
    IS_NEOX: tl.constexpr,
    PRECISE: tl.constexpr,
):
    token = tl.program_id(0)
    head_block = tl.program_id(1)
    dtype = query_ptr.dtype.element_ty

    offs = tl.arange(0, HALF_PAD)
    pair_mask = offs < HALF
    inv_freq = tl.load(inv_freq_ptr + offs, mask=pair_mask, other=0.0)
    angle = tl.load(positions_ptr + token).to(tl.float32) * inv_freq
    cos = round_to(triton_math.cos(angle, PRECISE) * scaling, dtype)
    sin = round_to(triton_math.sin(angle, PRECISE) * scaling, dtype)

    query_blocks = tl.cdiv(num_query_heads, BLOCK_H)
    if head_block < query_blocks:
        _rotate_heads(
            query_ptr + token.to(tl.int64) * stride_q_token,
            stride_q_head,
            head_block * BLOCK_H,
            num_query_heads,
            cos,
            sin,
            offs,
            pair_mask,
            HALF,
            BLOCK_H,
            IS_NEOX,
        )
    else:
        _rotate_heads(
            key_ptr + token.to(tl.int64) * stride_k_token,
            stride_k_head,
            (head_block - query_blocks) * BLOCK_H,
            num_key_heads,
            cos,
            sin,
            offs,
            pair_mask,
            HALF,
            BLOCK_H,
            IS_NEOX,
        )


def rotary_embedding_(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    inv_freq: torch.Tensor,
    scaling: float,
    rotary_dim: int,
    is_neox_style: bool,
) -> None:
    """Rotates the first `rotary_dim` features of every head of query `[T, Hq, D]` and key `[T, Hk, D']`.

    In place; the features past `rotary_dim` are not touched. positions `[T]` (any integer dtype,
    any order), inv_freq float32 `[rotary_dim / 2]` on the same device, `scaling` multiplies cos and
    sin. query and key may be strided views (e.g. of a fused qkv projection) but need a contiguous
    last dim, one dtype, and must not overlap.
    """
    if query.dim() != 3 or key.dim() != 3:
        raise ValueError(
            f"query and key must be [T, heads, D], got {tuple(query.shape)} and {tuple(key.shape)}"
        )
    num_tokens = positions.shape[0]
    if positions.dim() != 1 or query.shape[0] != num_tokens or key.shape[0] != num_tokens:
        raise ValueError(
            f"positions {tuple(positions.shape)}, query {tuple(query.shape)} and key {tuple(key.shape)} "
            f"disagree on the token count"
        )
    if rotary_dim % 2 or rotary_dim > min(query.shape[2], key.shape[2]) or rotary_dim <= 0:
        raise ValueError(f"rotary_dim {rotary_dim} must be even, positive and at most the head sizes")
    if tuple(inv_freq.shape) != (rotary_dim // 2,) or inv_freq.dtype != torch.float32:
        raise ValueError(
            f"inv_freq must be float32 [{rotary_dim // 2}], got {inv_freq.dtype} {tuple(inv_freq.shape)}"
        )
    if query.dtype != key.dtype or query.stride(-1) != 1 or key.stride(-1) != 1:
        raise ValueError("query and key need one dtype and a contiguous last dim (they are rotated in place)")
    if num_tokens == 0:
        return
    half = rotary_dim // 2
    half_pad = triton.next_power_of_2(half)
    block_h = max(1, min(_ELEMENTS_PER_PROGRAM // half_pad, triton.next_power_of_2(max(query.shape[1], 1))))
    head_blocks = triton.cdiv(query.shape[1], block_h) + triton.cdiv(key.shape[1], block_h)
    device_context = torch.cuda.device(query.device) if query.is_cuda else contextlib.nullcontext()
    with device_context:
        _rotary_kernel[(num_tokens, head_blocks)](
            query,
            key,
            positions.contiguous(),
            inv_freq.contiguous(),
            float(scaling),
            query.shape[1],
            key.shape[1],
            query.stride(0),
            query.stride(1),
            key.stride(0),
            key.stride(1),
            HALF=half,
            HALF_PAD=half_pad,
            BLOCK_H=block_h,
            IS_NEOX=is_neox_style,
            PRECISE=triton_math.PRECISE,
            num_warps=4,
            # No fused multiply-adds: in float32 they would round differently from the eager ops.
            enable_fp_fusion=False,
        )
