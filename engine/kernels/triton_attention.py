"""Triton attention for prefill and mixed steps: any number of new tokens per sequence, over the paged cache.

Covers what the decode kernel does not: whole prompts, chunked prefill, prefix-cache hits (new tokens
that start after cached context), and steps that mix those with decode tokens. New token j of
sequence i sits at KV index `context_lens[i] - query_lens[i] + j` and attends causally to KV indices
`0 ..= that index` (see `engine/input_metadata.py`); its own K/V must already be in the cache.

One program takes BLOCK_M new tokens of one sequence for one query head and streams that
sequence's K/V tiles (gathered through the block table) with an online softmax, flash-attention
style. The grid is sized from host-known totals only (`num_tokens // BLOCK_M + num_seqs` query
blocks), and each program finds its sequence by binary search over `query_start_loc`, so the launch
needs no device sync and fits a captured CUDA graph.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl


@triton.jit
def _tanh(x):
    # exp-based tanh: saturates to +-1 for large |x| (exp overflows to inf, or underflows to 0).
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


# Arguments that change from step to step are not specialised on (Triton would otherwise compile a
# variant for each of "== 1" and "divisible by 16"), so a run compiles once per tile config and dtype
# instead of stalling mid-run on a new batch size or block-table width.
@triton.jit(do_not_specialize=["num_seqs", "stride_table_seq"])
def _paged_prefill_kernel(
    out_ptr,
    query_ptr,
    key_cache_ptr,
    value_cache_ptr,
    block_tables_ptr,
    context_lens_ptr,
    query_start_loc_ptr,
    alibi_slopes_ptr,
    sinks_ptr,
    num_seqs,
    scale,
    soft_cap,
    sliding_window,
    block_size,
    stride_q_token,
    stride_q_head,
    stride_o_token,
    stride_o_head,
    stride_cache_block,
    stride_cache_token,
    stride_cache_head,
    stride_table_seq,
    queries_per_kv,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_ALIBI: tl.constexpr,
    USE_SOFT_CAP: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    USE_SINKS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    head = tl.program_id(1)

    # Sequence i owns query blocks [qsl[i] // BLOCK_M + i, qsl[i+1] // BLOCK_M + i + 1): at least
    # cdiv(query_len, BLOCK_M) of them. Find the last i whose first block is <= pid_m.
    lo = 0
    hi = num_seqs
    while hi - lo > 1:
        mid = (lo + hi) // 2
        first_block = tl.load(query_start_loc_ptr + mid) // BLOCK_M + mid
        lo = tl.where(first_block <= pid_m, mid, lo)
        hi = tl.where(first_block <= pid_m, hi, mid)
    seq = lo

    q_start = tl.load(query_start_loc_ptr + seq)
    query_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    q_block = pid_m - (q_start // BLOCK_M + seq)
    if q_block * BLOCK_M >= query_len:
        return
    context_len = tl.load(context_lens_ptr + seq)
    prior_len = context_len - query_len  # KV tokens cached before this step's tokens

    offs_m = q_block * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < query_len
    q_pos = prior_len + offs_m  # KV index of each query token
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    mask_d = offs_d < HEAD_DIM
    q_rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(
        query_ptr + q_rows[:, None] * stride_q_token + head * stride_q_head + offs_d[None, :],
        mask=mask_m[:, None] & mask_d[None, :],
        other=0.0,
    )
    kv_head = head // queries_per_kv
    if USE_ALIBI:
        slope = tl.load(alibi_slopes_ptr + head).to(tl.float32)

    # Keys this block can see: up to its last query's position, and from the first query's window on.
    kv_end = prior_len + tl.minimum(q_block * BLOCK_M + BLOCK_M, query_len)
    if USE_WINDOW:
        kv_begin = tl.maximum(prior_len + q_block * BLOCK_M - sliding_window + 1, 0)
        kv_begin = (kv_begin // BLOCK_N) * BLOCK_N
    else:
        kv_begin = 0

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max, log2 units
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    table = block_tables_ptr + seq * stride_table_seq
    for start_n in range(kv_begin, kv_end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < kv_end
        block_number = tl.load(table + offs_n // block_size, mask=mask_n, other=0).to(tl.int64)
        row_offset = (
            block_number * stride_cache_block
            + (offs_n % block_size) * stride_cache_token
            + kv_head * stride_cache_head
        )
        k = tl.load(
            key_cache_ptr + row_offset[None, :] + offs_d[:, None],
            mask=mask_n[None, :] & mask_d[:, None],
            other=0.0,
        )
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * scale
        distance = q_pos[:, None] - offs_n[None, :]  # >= 0 where causally visible
        if USE_ALIBI:
            s = s - slope * distance.to(tl.float32)
        if USE_SOFT_CAP:
            s = soft_cap * _tanh(s / soft_cap)
        visible = (distance >= 0) & mask_n[None, :]
        if USE_WINDOW:
            visible = visible & (distance < sliding_window)
        s = tl.where(visible, s * 1.4426950408889634, float("-inf"))  # to log2 units: exp2 is cheaper

        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with nothing visible yet keeps max -inf; subtract 0 there so no inf - inf appears.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            value_cache_ptr + row_offset[:, None] + offs_d[None, :],
            mask=mask_n[:, None] & mask_d[None, :],
            other=0.0,
        )
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    if USE_SINKS:
        # The sink joins the denominator only: rescale to a max that includes it, then add its exp.
        sink = tl.load(sinks_ptr + head).to(tl.float32) * 1.4426950408889634
        m_final = tl.maximum(m_i, sink)
        alpha = tl.exp2(m_i - m_final)
        acc = acc * alpha[:, None]
        l_i = l_i * alpha + tl.exp2(sink - m_final)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(
        out_ptr + q_rows[:, None] * stride_o_token + head * stride_o_head + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=mask_m[:, None] & mask_d[None, :],
    )


def _launch_config(head_dim_pad: int, dtype: torch.dtype, max_query_len: int) -> dict[str, int]:
    # fp32 tiles and 256-wide heads hold twice the registers per row: smaller tiles avoid spills.
    wide = head_dim_pad >= 256 or dtype == torch.float32
    block_m = 16 if max_query_len <= 16 else (32 if wide else 64)
    return {
        "BLOCK_M": block_m,
        "BLOCK_N": 32 if wide else 64,
        "num_warps": 4,
        "num_stages": 1 if wide else 2,
    }


def paged_prefill_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    max_query_len: int,
    scale: float,
    alibi_slopes: torch.Tensor | None = None,
    sliding_window: int | None = None,
    logits_soft_cap: float | None = None,
    out: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of each sequence's new tokens, query `[T, H, D]`, over the paged cache -> `[T, H, D]`.

    query_start_loc int32 `[S+1]` (cumulative new-token starts), context_lens int32 `[S]` (KV tokens
    once this step's are written, which they must already be), block_tables int32 `[S, max_blocks]`,
    caches `[blocks, block_size, KV, D]` with a contiguous last dim, alibi_slopes `[H]`.
    `max_query_len` (host int) only picks tile sizes. Scores are `scale*q.k`, minus
    `slope*(q_idx - k_idx)` with ALiBi, then `cap*tanh(s/cap)`, then masked causally and to
    `q_idx - k_idx < sliding_window`. `sinks` `[H]`: a per-head logit in each softmax's denominator.
    """
    if query.dim() != 3 or key_cache.dim() != 4 or key_cache.shape != value_cache.shape:
        raise ValueError(
            f"need query [T, H, D] and caches [blocks, block_size, KV, D], got {tuple(query.shape)}, "
            f"{tuple(key_cache.shape)}, {tuple(value_cache.shape)}"
        )
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads = key_cache.shape[2]
    num_seqs = context_lens.shape[0]
    if key_cache.shape[3] != head_dim or num_heads % num_kv_heads != 0:
        raise ValueError(f"query {tuple(query.shape)} does not fit cache {tuple(key_cache.shape)}")
    if key_cache.stride() != value_cache.stride() or key_cache.stride(-1) != 1 or query.stride(-1) != 1:
        raise ValueError("query and caches need a contiguous last dim, and K/V caches equal strides")
    if key_cache.dtype != value_cache.dtype:
        raise ValueError(f"key/value caches differ in dtype: {key_cache.dtype} and {value_cache.dtype}")
    for name, tensor in (
        ("block_tables", block_tables),
        ("context_lens", context_lens),
        ("query_start_loc", query_start_loc),
    ):
        if tensor.dtype != torch.int32 or tensor.device != query.device:
            raise ValueError(f"{name} must be int32 on {query.device}, got {tensor.dtype} on {tensor.device}")
    if (
        tuple(query_start_loc.shape) != (num_seqs + 1,)
        or block_tables.dim() != 2
        or block_tables.shape[0] != num_seqs
    ):
        raise ValueError(
            f"{num_seqs} sequences, but query_start_loc {tuple(query_start_loc.shape)} and "
            f"block_tables {tuple(block_tables.shape)}"
        )
    if alibi_slopes is not None and tuple(alibi_slopes.shape) != (num_heads,):
        raise ValueError(f"alibi_slopes must be [{num_heads}], got {tuple(alibi_slopes.shape)}")
    if sinks is not None and tuple(sinks.shape) != (num_heads,):
        raise ValueError(f"sinks must be [{num_heads}], got {tuple(sinks.shape)}")
    if out is None:
        out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    elif out.shape != query.shape or out.stride(-1) != 1 or out.dtype != query.dtype:
        raise ValueError("out must be shaped like the query, in its dtype, with a contiguous last dim")
    if num_tokens == 0 or num_seqs == 0:
        return out
    if block_tables.stride(-1) != 1:
        block_tables = block_tables.contiguous()
    if alibi_slopes is not None:
        alibi_slopes = alibi_slopes.to(device=query.device, dtype=torch.float32).contiguous()
    if sinks is not None:
        sinks = sinks.to(device=query.device, dtype=torch.float32).contiguous()

    head_dim_pad = max(16, triton.next_power_of_2(head_dim))
    config = _launch_config(head_dim_pad, query.dtype, max_query_len)
    grid = (num_tokens // config["BLOCK_M"] + num_seqs, num_heads)
    window = 0 if sliding_window is None else int(sliding_window)
    device_context = torch.cuda.device(query.device) if query.is_cuda else contextlib.nullcontext()
    with device_context:
        _paged_prefill_kernel[grid](
            out,
            query,
            key_cache,
            value_cache,
            block_tables,
            context_lens.contiguous(),
            query_start_loc.contiguous(),
            alibi_slopes if alibi_slopes is not None else context_lens,  # never read without ALiBi
            sinks if sinks is not None else context_lens,  # never read without sinks
            num_seqs,
            float(scale),
            float(logits_soft_cap) if logits_soft_cap else 1.0,
            window,
            key_cache.shape[1],
            query.stride(0),
            query.stride(1),
            out.stride(0),
            out.stride(1),
            key_cache.stride(0),
            key_cache.stride(1),
            key_cache.stride(2),
            block_tables.stride(0),
            num_heads // num_kv_heads,
            HEAD_DIM=head_dim,
            HEAD_DIM_PAD=head_dim_pad,
            USE_ALIBI=alibi_slopes is not None,
            USE_SOFT_CAP=bool(logits_soft_cap),
            USE_WINDOW=window > 0,
            USE_SINKS=sinks is not None,
            DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
            **config,
        )
    return out
