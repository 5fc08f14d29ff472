"""Triton grouped GEMM for mixture-of-experts: tokens sorted by expert, one expert's weights per tile.

Each (token, chosen expert) pair is a row. `align_rows_by_expert` sorts the rows by expert and pads
each expert's run to a multiple of BLOCK_M, so every BLOCK_M tile of the sorted order belongs to one
expert and the tile's program multiplies by that expert's weights only. Two launches:
1. `_gate_up_kernel`: `act(x @ gate[e]^T) * (x @ up[e]^T)` for the tile's rows: both projections
   accumulate in the same program, so the SiLU-and-mul is fused into the epilogue and the `[rows, 2I]`
   projection never reaches memory; writes `[T*k, I]`. The gate and up rows of `gate_up[e]` are its
   first and second halves, or alternate (the interleaved layout); a per-expert bias is added in the
   epilogue. Given an activation of its own (`gated`), the kernel writes the biased `[T*k, 2I]`
   projection in the checkpoint's layout instead and `gated` makes `[T*k, I]` of it.
2. `_down_kernel`: `h @ down[e]^T` (plus the expert's bias) times the row's routing weight; writes
   `[T*k, H]`, summed over k.
The sizes the grid needs come from host-known totals (an upper bound on the padded rows), and the
sort is done with ops that read nothing back, so a step needs no device sync.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import triton
import triton.language as tl


def align_rows_by_expert(
    topk_ids: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row of each sorted slot `[R]`, expert of each BLOCK_M tile `[R / block_m]`).

    Rows are `token * k + slot` of the flattened `topk_ids [T, k]`; a padding slot holds `T * k`
    and a tile past the last expert's holds expert -1. Ids outside `[0, num_experts)` (experts of
    other ranks) are left out. R is the bound `cdiv(T*k, block_m) * block_m + num_experts * block_m`.
    Every size is known on the host and nothing is read back, so the step needs no device sync
    (and can be captured in a CUDA graph).
    """
    flat = topk_ids.reshape(-1).to(torch.int64)
    num_rows = flat.numel()
    device = flat.device
    local = (flat >= 0) & (flat < num_experts)
    bucket = torch.where(local, flat, num_experts)  # other ranks' experts: a bucket never computed
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
    counts.scatter_add_(0, bucket, torch.ones_like(bucket))
    counts = counts[:num_experts]
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    order = torch.sort(bucket, stable=True).indices
    sorted_bucket = bucket[order]
    expert_of_row = sorted_bucket.clamp(max=num_experts - 1)
    rank_in_expert = torch.arange(num_rows, device=device) - (torch.cumsum(counts, 0) - counts)[expert_of_row]
    destination = (padded_end - padded)[expert_of_row] + rank_in_expert
    capacity = triton.cdiv(num_rows, block_m) * block_m + num_experts * block_m
    # Rows of other ranks' experts land in one spare slot past the end, cut off below.
    destination = torch.where(sorted_bucket < num_experts, destination, capacity)
    sorted_rows = torch.full((capacity + 1,), num_rows, dtype=torch.int32, device=device)
    sorted_rows.scatter_(0, destination, order.to(torch.int32))
    tile_starts = torch.arange(capacity // block_m, device=device) * block_m
    tile_expert = torch.searchsorted(padded_end, tile_starts, right=True)
    tile_expert = torch.where(tile_expert < num_experts, tile_expert, -1).to(torch.int32)
    return sorted_rows[:capacity], tile_expert


@triton.jit
def _gate_up_kernel(
    out_ptr,
    x_ptr,
    w_ptr,
    bias_ptr,
    sorted_rows_ptr,
    tile_expert_ptr,
    num_rows,
    top_k,
    hidden,
    intermediate,
    gate_row_step,
    up_row_offset,
    stride_x,
    stride_w_expert,
    stride_w_row,
    stride_bias_expert,
    stride_out,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    FUSE_SILU: tl.constexpr,
):
    tile = tl.program_id(0)
    expert = tl.load(tile_expert_ptr + tile)
    if expert < 0:
        return
    rows = tl.load(sorted_rows_ptr + tile * BLOCK_M + tl.arange(0, BLOCK_M))
    row_valid = rows < num_rows
    tokens = (rows // top_k).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < intermediate
    # Rows of gate_up[e] (and columns of an unfused output) holding feature n's gate and up.
    gate_rows = offs_n * gate_row_step
    up_rows = gate_rows + up_row_offset
    w_expert = w_ptr + expert.to(tl.int64) * stride_w_expert
    acc_gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < hidden
        x = tl.load(
            x_ptr + tokens[:, None] * stride_x + offs_k[None, :],
            mask=row_valid[:, None] & mask_k[None, :],
            other=0.0,
        )
        w_mask = mask_k[:, None] & mask_n[None, :]
        gate_w = tl.load(
            w_expert + gate_rows[None, :] * stride_w_row + offs_k[:, None], mask=w_mask, other=0.0
        )
        up_w = tl.load(w_expert + up_rows[None, :] * stride_w_row + offs_k[:, None], mask=w_mask, other=0.0)
        acc_gate = tl.dot(x, gate_w, acc_gate, input_precision=DOT_PRECISION)
        acc_up = tl.dot(x, up_w, acc_up, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        bias_expert = bias_ptr + expert.to(tl.int64) * stride_bias_expert
        acc_gate += tl.load(bias_expert + gate_rows, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        acc_up += tl.load(bias_expert + up_rows, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out_rows = out_ptr + rows.to(tl.int64)[:, None] * stride_out
    store_mask = row_valid[:, None] & mask_n[None, :]
    if FUSE_SILU:
        activated = acc_gate / (1.0 + tl.exp(-acc_gate)) * acc_up  # silu(gate) * up
        tl.store(out_rows + offs_n[None, :], activated.to(out_ptr.dtype.element_ty), mask=store_mask)
    else:
        tl.store(out_rows + gate_rows[None, :], acc_gate.to(out_ptr.dtype.element_ty), mask=store_mask)
        tl.store(out_rows + up_rows[None, :], acc_up.to(out_ptr.dtype.element_ty), mask=store_mask)


@triton.jit
def _down_kernel(
    out_ptr,
    h_ptr,
    w_ptr,
    bias_ptr,
    weights_ptr,
    sorted_rows_ptr,
    tile_expert_ptr,
    num_rows,
    hidden,
    intermediate,
    stride_h,
    stride_w_expert,
    stride_w_row,
    stride_bias_expert,
    stride_out,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    tile = tl.program_id(0)
    expert = tl.load(tile_expert_ptr + tile)
    if expert < 0:
        return
    rows = tl.load(sorted_rows_ptr + tile * BLOCK_M + tl.arange(0, BLOCK_M))
    row_valid = rows < num_rows
    rows64 = rows.to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < hidden
    w_expert = w_ptr + expert.to(tl.int64) * stride_w_expert
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, intermediate, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < intermediate
        h = tl.load(
            h_ptr + rows64[:, None] * stride_h + offs_k[None, :],
            mask=row_valid[:, None] & mask_k[None, :],
            other=0.0,
        )
        w = tl.load(
            w_expert + offs_n[None, :] * stride_w_row + offs_k[:, None],
            mask=mask_k[:, None] & mask_n[None, :],
            other=0.0,
        )
        acc = tl.dot(h, w, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + expert.to(tl.int64) * stride_bias_expert + offs_n, mask=mask_n, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    routing_weight = tl.load(weights_ptr + rows64, mask=row_valid, other=0.0).to(tl.float32)
    acc = acc * routing_weight[:, None]
    tl.store(
        out_ptr + rows64[:, None] * stride_out + offs_n[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=row_valid[:, None] & mask_n[None, :],
    )


def _tiles(num_rows: int, dtype: torch.dtype) -> dict[str, int]:
    # Decode batches route a few rows to each expert: a small BLOCK_M wastes less on padding.
    block_m = 16 if num_rows <= 256 else 64
    wide = dtype == torch.float32
    return {"BLOCK_M": block_m, "BLOCK_N": 32 if wide else 64, "BLOCK_K": 32 if wide else 64}


def fused_experts(
    hidden_states: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    gate_up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
    interleaved: bool = False,
    gated: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """SiLU-gated experts: `[T, H]` tokens, `gate_up [E, 2I, H]`, `down [E, H, I]`, top-k `[T, k]` -> `[T, H]`.

    Ids outside `[0, E)` contribute nothing (experts of other ranks). Optional biases `[E, 2I]` (in
    gate_up's layout) and `[E, H]`; `interleaved`: gate and up rows alternate, gate first; `gated`:
    an activation taking the `[rows, 2I]` projection in that layout to `[rows, I]`, run in place of
    the fused SiLU-and-mul (on rows the kernel wrote; the down kernel reads no other).
    """
    if hidden_states.dim() != 2 or gate_up.dim() != 3 or down.dim() != 3:
        raise ValueError(
            f"need hidden [T, H], gate_up [E, 2I, H], down [E, H, I]; got {tuple(hidden_states.shape)}, "
            f"{tuple(gate_up.shape)}, {tuple(down.shape)}"
        )
    num_tokens, hidden = hidden_states.shape
    num_experts, double_intermediate, _ = gate_up.shape
    intermediate = double_intermediate // 2
    if gate_up.shape[2] != hidden or tuple(down.shape) != (num_experts, hidden, intermediate):
        raise ValueError(
            f"gate_up {tuple(gate_up.shape)} and down {tuple(down.shape)} do not fit hidden {hidden}"
        )
    if topk_ids.shape != topk_weights.shape or topk_ids.dim() != 2 or topk_ids.shape[0] != num_tokens:
        raise ValueError(
            f"top-k ids {tuple(topk_ids.shape)} and weights {tuple(topk_weights.shape)} must be [T, k]"
        )
    if hidden_states.stride(-1) != 1 or gate_up.stride(-1) != 1 or down.stride(-1) != 1:
        raise ValueError("hidden states and expert weights need a contiguous last dim")
    for bias, shape in (
        (gate_up_bias, (num_experts, double_intermediate)),
        (down_bias, (num_experts, hidden)),
    ):
        if bias is not None and (tuple(bias.shape) != shape or bias.stride(-1) != 1):
            raise ValueError(f"expert bias {tuple(bias.shape)} must be {shape} with a contiguous last dim")
    top_k = topk_ids.shape[1]
    num_rows = num_tokens * top_k
    output = torch.zeros((num_tokens, top_k, hidden), dtype=hidden_states.dtype, device=hidden_states.device)
    if num_rows == 0:
        return output.sum(dim=1)
    config = _tiles(num_rows, hidden_states.dtype)
    sorted_rows, tile_expert = align_rows_by_expert(topk_ids, num_experts, config["BLOCK_M"])
    projected_width = intermediate if gated is None else double_intermediate
    projected = torch.empty(
        (num_rows, projected_width), dtype=hidden_states.dtype, device=hidden_states.device
    )
    weights = topk_weights.reshape(-1).to(torch.float32).contiguous()
    precision = "ieee" if hidden_states.dtype == torch.float32 else "tf32"
    num_tiles = tile_expert.numel()
    device_context = (
        torch.cuda.device(hidden_states.device) if hidden_states.is_cuda else contextlib.nullcontext()
    )
    with device_context:
        _gate_up_kernel[(num_tiles, triton.cdiv(intermediate, config["BLOCK_N"]))](
            projected,
            hidden_states,
            gate_up,
            gate_up if gate_up_bias is None else gate_up_bias,  # never read without HAS_BIAS
            sorted_rows,
            tile_expert,
            num_rows,
            top_k,
            hidden,
            intermediate,
            2 if interleaved else 1,
            1 if interleaved else intermediate,
            hidden_states.stride(0),
            gate_up.stride(0),
            gate_up.stride(1),
            0 if gate_up_bias is None else gate_up_bias.stride(0),
            projected.stride(0),
            DOT_PRECISION=precision,
            HAS_BIAS=gate_up_bias is not None,
            FUSE_SILU=gated is None,
            **config,
        )
        activated = projected if gated is None else gated(projected).contiguous()
        if tuple(activated.shape) != (num_rows, intermediate):
            raise ValueError(
                f"the experts' activation gave {tuple(activated.shape)}, not {(num_rows, intermediate)}"
            )
        activated = activated.to(hidden_states.dtype)
        rows_out = output.view(num_rows, hidden)
        _down_kernel[(num_tiles, triton.cdiv(hidden, config["BLOCK_N"]))](
            rows_out,
            activated,
            down,
            down if down_bias is None else down_bias,  # never read without HAS_BIAS
            weights,
            sorted_rows,
            tile_expert,
            num_rows,
            hidden,
            intermediate,
            activated.stride(0),
            down.stride(0),
            down.stride(1),
            0 if down_bias is None else down_bias.stride(0),
            rows_out.stride(0),
            DOT_PRECISION=precision,
            HAS_BIAS=down_bias is not None,
            **config,
        )
    return output.sum(dim=1)
