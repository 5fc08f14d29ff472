"""Triton multi-latent attention over the paged latent cache, and the cache write (CUDA path of
`engine.layers.mla`; `engine/kernels/mla_reference.py` is the oracle).

One program takes one new token and BLOCK_H of its heads, and streams the token's visible cached
rows `[latent | rope key]` (gathered through the block table) with an online softmax: scores are
`q_latent . latent + q_rope . rope_key`, the weighted sum is over the latents. Every head of the
block reads the same rows, so a row is loaded once per BLOCK_H heads. The grid and the arguments come
from tensor shapes only (each program finds its sequence by binary search over `query_start_loc`),
so a launch needs no device sync and fits a captured CUDA graph; decode, prefill and mixed steps
take the same kernel.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["num_seqs", "stride_table_seq"])
def _latent_attention_kernel(
    out_ptr,
    query_ptr,
    cache_ptr,
    block_tables_ptr,
    context_lens_ptr,
    query_start_loc_ptr,
    num_seqs,
    num_heads,
    scale,
    block_size,
    stride_q_token,
    stride_q_head,
    stride_o_token,
    stride_o_head,
    stride_cache_block,
    stride_cache_token,
    stride_table_seq,
    RANK: tl.constexpr,
    ROPE: tl.constexpr,
    RANK_PAD: tl.constexpr,
    ROPE_PAD: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    token = tl.program_id(0)
    head_block = tl.program_id(1)
    # The last sequence whose first new token is at or before this one.
    lo = 0
    hi = num_seqs
    while hi - lo > 1:
        mid = (lo + hi) // 2
        first = tl.load(query_start_loc_ptr + mid)
        lo = tl.where(first <= token, mid, lo)
        hi = tl.where(first <= token, hi, mid)
    seq = lo
    q_start = tl.load(query_start_loc_ptr + seq)
    query_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    context_len = tl.load(context_lens_ptr + seq)
    kv_end = context_len - query_len + (token - q_start) + 1  # rows 0 ..= this token's own

    offs_h = head_block * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_h = offs_h < num_heads
    offs_r = tl.arange(0, RANK_PAD)
    mask_r = offs_r < RANK
    offs_p = tl.arange(0, ROPE_PAD)
    mask_p = offs_p < ROPE
    q_rows = query_ptr + token.to(tl.int64) * stride_q_token + offs_h[:, None] * stride_q_head
    q_latent = tl.load(q_rows + offs_r[None, :], mask=mask_h[:, None] & mask_r[None, :], other=0.0)
    q_rope = tl.load(q_rows + RANK + offs_p[None, :], mask=mask_h[:, None] & mask_p[None, :], other=0.0)

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)  # running max, log2 units
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, RANK_PAD], dtype=tl.float32)
    table = block_tables_ptr + seq * stride_table_seq
    for start_n in range(0, kv_end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < kv_end
        block_number = tl.load(table + offs_n // block_size, mask=mask_n, other=0).to(tl.int64)
        row = block_number * stride_cache_block + (offs_n % block_size) * stride_cache_token
        latent = tl.load(
            cache_ptr + row[None, :] + offs_r[:, None], mask=mask_n[None, :] & mask_r[:, None], other=0.0
        )  # [RANK_PAD, BLOCK_N]
        rope_key = tl.load(
            cache_ptr + row[None, :] + RANK + offs_p[:, None],
            mask=mask_n[None, :] & mask_p[:, None],
            other=0.0,
        )
        s = tl.dot(q_latent, latent, input_precision=DOT_PRECISION)
        s = tl.dot(q_rope, rope_key, s, input_precision=DOT_PRECISION)
        s = tl.where(mask_n[None, :], s * (scale * 1.4426950408889634), float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(
            p.to(latent.dtype), tl.trans(latent), acc * alpha[:, None], input_precision=DOT_PRECISION
        )
        m_i = m_new

    out = acc / l_i[:, None]
    tl.store(
        out_ptr + token.to(tl.int64) * stride_o_token + offs_h[:, None] * stride_o_head + offs_r[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=mask_h[:, None] & mask_r[None, :],
    )


@triton.jit
def _write_rows_kernel(
    rows_ptr,
    cache_ptr,
    slot_mapping_ptr,
    block_size,
    stride_row,
    stride_cache_block,
    stride_cache_token,
    WIDTH: tl.constexpr,
    WIDTH_PAD: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token)
    if slot >= 0:
        offs = tl.arange(0, WIDTH_PAD)
        mask = offs < WIDTH
        values = tl.load(rows_ptr + token.to(tl.int64) * stride_row + offs, mask=mask)
        destination = (
            cache_ptr + (slot // block_size) * stride_cache_block + (slot % block_size) * stride_cache_token
        )
        tl.store(destination + offs, values.to(cache_ptr.dtype.element_ty), mask=mask)


def _device(tensor: torch.Tensor):
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def write_latent_rows(rows: torch.Tensor, latent_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """`[T, 1, D]` rows into `[blocks, block_size, 1, D]` at `slot_mapping` (int64, -1 = skip), in place."""
    if (
        rows.dim() != 3
        or tuple(rows.shape[1:]) != tuple(latent_cache.shape[2:])
        or latent_cache.shape[2] != 1
    ):
        raise ValueError(f"rows {tuple(rows.shape)} do not fit the latent cache {tuple(latent_cache.shape)}")
    if rows.shape[0] != slot_mapping.shape[0] or latent_cache.stride(-1) != 1:
        raise ValueError(f"{rows.shape[0]} rows for {slot_mapping.shape[0]} slots, or a strided cache row")
    if rows.shape[0] == 0:
        return
    rows = rows.reshape(rows.shape[0], -1)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    width = rows.shape[1]
    with _device(rows):
        _write_rows_kernel[(rows.shape[0],)](
            rows,
            latent_cache,
            slot_mapping,
            latent_cache.shape[1],
            rows.stride(0),
            latent_cache.stride(0),
            latent_cache.stride(1),
            WIDTH=width,
            WIDTH_PAD=triton.next_power_of_2(width),
        )


def latent_attention(
    query: torch.Tensor,
    latent_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    kv_lora_rank: int,
) -> torch.Tensor:
    """Absorbed queries `[T, H, rank + rope]` over the latent cache `[blocks, block_size, 1, rank + rope]`
    -> `[T, H, rank]` (query dtype). Metadata int32: block_tables `[S, max_blocks]`, context_lens
    `[S]` (rows once this step's are written, which they must already be), query_start_loc `[S+1]`."""
    num_tokens, num_heads, width = query.shape
    if latent_cache.dim() != 4 or latent_cache.shape[2] != 1 or latent_cache.shape[3] != width:
        raise ValueError(
            f"query {tuple(query.shape)} does not fit the latent cache {tuple(latent_cache.shape)}"
        )
    if query.stride(-1) != 1 or latent_cache.stride(-1) != 1:
        raise ValueError("query and latent cache need a contiguous last dim")
    rope = width - kv_lora_rank
    num_seqs = context_lens.shape[0]
    out = torch.empty(num_tokens, num_heads, kv_lora_rank, dtype=query.dtype, device=query.device)
    if num_tokens == 0 or num_seqs == 0:
        return out
    if block_tables.stride(-1) != 1:
        block_tables = block_tables.contiguous()
    block_h = 16
    wide = kv_lora_rank >= 256 or query.dtype == torch.float32
    with _device(query):
        _latent_attention_kernel[(num_tokens, triton.cdiv(num_heads, block_h))](
            out,
            query,
            latent_cache,
            block_tables,
            context_lens.contiguous(),
            query_start_loc.contiguous(),
            num_seqs,
            num_heads,
            float(scale),
            latent_cache.shape[1],
            query.stride(0),
            query.stride(1),
            out.stride(0),
            out.stride(1),
            latent_cache.stride(0),
            latent_cache.stride(1),
            block_tables.stride(0),
            RANK=kv_lora_rank,
            ROPE=rope,
            RANK_PAD=max(16, triton.next_power_of_2(kv_lora_rank)),
            ROPE_PAD=max(16, triton.next_power_of_2(rope)),
            BLOCK_H=block_h,
            BLOCK_N=16 if wide else 32,
            DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
            num_warps=8 if wide else 4,
        )
    return out
