"""Decode attention bandwidth: porter's paged CUDA kernel against torch SDPA (flash) on contiguous K/V.

Decode attention is memory-bound: each step must read every cached K and V byte once. Achieved
bandwidth = (K + V bytes + query + output bytes) / median kernel time, reported next to the
device-to-device copy bandwidth measured in the same run (bytes read + bytes written), which is the
practical ceiling. SDPA runs the same attention on the same data laid out contiguously
([batch, kv_heads, context, head_dim]), so the gap to it is the price of paging.

    PYTHONPATH=. python benchmarks/bench_decode_attention.py --json decode_bench.json
"""

from __future__ import annotations

import argparse
import json
import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from engine.kernels import cuda_ops

NUM_HEADS = 32
BLOCK_SIZE = 16
DTYPE = torch.bfloat16
# (batch, context): small-batch long-context (split-K matters), and large-batch short-context.
SHAPES = [(1, 128), (1, 4096), (1, 32768), (16, 4096), (16, 32768), (64, 2048), (256, 128), (128, 4096)]
HEAD_DIMS = (64, 128)
GROUPS = (1, 4, 8)  # query heads per KV head


def median_ms(fn) -> float:
    """Median time of fn in ms; Triton's do_bench flushes L2 between calls, so reads come from HBM."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy of 2 GiB, counting bytes read plus bytes written."""
    source = torch.randn(2**29, device="cuda")
    target = torch.empty_like(source)
    ms = median_ms(lambda: target.copy_(source))
    return 2 * source.numel() * source.element_size() / (ms * 1e-3) / 1e9


def run_shape(batch: int, context: int, head_dim: int, group: int) -> dict:
    num_kv_heads = NUM_HEADS // group
    blocks_per_seq = math.ceil(context / BLOCK_SIZE)
    num_blocks = batch * blocks_per_seq
    shape = (num_blocks, BLOCK_SIZE, num_kv_heads, head_dim)
    key_cache = torch.randn(shape, device="cuda", dtype=DTYPE)
    value_cache = torch.randn(shape, device="cuda", dtype=DTYPE)
    # Scattered blocks, as a long-running cache ends up.
    block_tables = torch.randperm(num_blocks, device="cuda", dtype=torch.int32).view(batch, blocks_per_seq)
    context_lens = torch.full((batch,), context, device="cuda", dtype=torch.int32)
    query = torch.randn(batch, NUM_HEADS, head_dim, device="cuda", dtype=DTYPE)
    scale = head_dim**-0.5

    def paged():
        return cuda_ops.paged_decode_attention(
            query, key_cache, value_cache, block_tables, context_lens, context, scale
        )

    paged_out = paged()
    paged_ms = median_ms(paged)

    def contiguous(cache: torch.Tensor) -> torch.Tensor:  # [batch, kv_heads, context, head_dim]
        rows = cache[block_tables.long()].view(batch, blocks_per_seq * BLOCK_SIZE, num_kv_heads, head_dim)
        return rows[:, :context].transpose(1, 2).contiguous()

    keys, values = contiguous(key_cache), contiguous(value_cache)
    sdpa_query = query.unsqueeze(2)  # [batch, heads, 1, head_dim]

    def sdpa():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(sdpa_query, keys, values, scale=scale, enable_gqa=group > 1)

    try:
        sdpa_out = sdpa().squeeze(2)
        sdpa_ms = median_ms(sdpa)
        max_diff = (sdpa_out.float() - paged_out.float()).abs().max().item()
    except RuntimeError as error:  # flash not available for this shape/build
        sdpa_ms, max_diff = float("nan"), float("nan")
        print(f"  sdpa flash unavailable for {batch}x{context} d{head_dim} g{group}: {error}")

    element = torch.tensor([], dtype=DTYPE).element_size()
    kv_bytes = 2 * batch * context * num_kv_heads * head_dim * element
    io_bytes = 2 * batch * NUM_HEADS * head_dim * element
    total = kv_bytes + io_bytes
    return {
        "batch": batch,
        "context": context,
        "head_dim": head_dim,
        "group": group,
        "num_heads": NUM_HEADS,
        "num_kv_heads": num_kv_heads,
        "bytes": total,
        "paged_us": paged_ms * 1e3,
        "paged_gbs": total / (paged_ms * 1e-3) / 1e9,
        "sdpa_us": sdpa_ms * 1e3,
        "sdpa_gbs": total / (sdpa_ms * 1e-3) / 1e9,
        "max_abs_diff_vs_sdpa": max_diff,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results here as JSON")
    args = parser.parse_args()

    copy_gbs = copy_bandwidth_gbs()
    rows = []
    for head_dim in HEAD_DIMS:
        for group in GROUPS:
            for batch, context in SHAPES:
                row = run_shape(batch, context, head_dim, group)
                row["paged_fraction_of_copy"] = row["paged_gbs"] / copy_gbs
                row["sdpa_fraction_of_copy"] = row["sdpa_gbs"] / copy_gbs
                rows.append(row)
                torch.cuda.empty_cache()

    print(
        f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  dtype {DTYPE}  block {BLOCK_SIZE}"
    )
    print(f"device-to-device copy: {copy_gbs:.0f} GB/s (read + write)")
    header = (
        f"{'D':>4} {'G':>2} {'batch':>5} {'ctx':>6} | {'paged us':>9} {'GB/s':>6} {'of copy':>7} |"
        f" {'sdpa us':>9} {'GB/s':>6} {'of copy':>7} | {'max diff':>8}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['head_dim']:>4} {r['group']:>2} {r['batch']:>5} {r['context']:>6} |"
            f" {r['paged_us']:>9.1f} {r['paged_gbs']:>6.0f} {r['paged_fraction_of_copy']:>7.0%} |"
            f" {r['sdpa_us']:>9.1f} {r['sdpa_gbs']:>6.0f} {r['sdpa_fraction_of_copy']:>7.0%} |"
            f" {r['max_abs_diff_vs_sdpa']:>8.4f}"
        )
    if args.json:
        meta = {
            "device": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "dtype": str(DTYPE),
            "block_size": BLOCK_SIZE,
            "copy_gbs": copy_gbs,
        }
        with open(args.json, "w") as handle:
            json.dump({"meta": meta, "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
