"""Decode attention bandwidth: porter's paged CUDA kernel against torch SDPA (flash) on contiguous K/V.

Decode attention is memory-bound: each step must read every cached K and V byte once. Achieved
bandwidth = (K + V bytes + query + output bytes) / time per call, reported next to the
device-to-device copy bandwidth measured in the same run (bytes read + bytes written, 2 GiB), which
is the practical ceiling. SDPA runs the same attention on the same data laid out contiguously
([batch, kv_heads, context, head_dim]), so the gap to it is the price of paging. "copy us" is an
elementwise kernel moving the same number of bytes: what any kernel of this size costs at the least.

How calls are timed: as the engine runs them, back to back in a CUDA graph (one decode step is a
graph of every layer), each call on its own copy of the cache, with enough copies that no call
finds its data in L2. (Flushing L2 by zeroing a buffer before each timed call, as
`triton.testing.do_bench` does, leaves up to a whole L2 of dirty lines whose write-back the timed
call pays for: 10-20% of a 100 MB call.)

    PYTHONPATH=. python benchmarks/bench_decode_attention.py --json decode_bench.json
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.graph_timing import graph_time_us
from benchmarks.roofline import copy_bandwidth
from engine.kernels import cuda_ops

NUM_HEADS = 32
BLOCK_SIZE = 16
DTYPE = torch.bfloat16
# (batch, context): small-batch long-context (split-K matters), and large-batch short-context.
SHAPES = [
    (1, 128),
    (1, 4096),
    (1, 32768),
    (4, 4096),
    (16, 4096),
    (16, 32768),
    (64, 2048),
    (256, 128),
    (128, 4096),
]
HEAD_DIMS = (64, 128)
GROUPS = (1, 4, 8)  # query heads per KV head
MIN_CALLS = 24  # calls per timed graph


def copies_for(nbytes: int) -> int:
    """Distinct inputs to cycle through so that, together, they overflow L2 three times."""
    l2_bytes = torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size
    return max(2, math.ceil(3 * l2_bytes / nbytes))


def cycle(make_call: Callable[[int], Callable[[], object]], copies: int) -> list[Callable[[], object]]:
    return [make_call(i % copies) for i in range(max(copies, MIN_CALLS))]


@dataclass
class PagedProblem:
    """One decode-attention call's inputs, with distinct caches and outputs to cycle through."""

    batch: int
    context: int
    head_dim: int
    group: int
    query: torch.Tensor
    key_caches: list[torch.Tensor]
    value_caches: list[torch.Tensor]
    block_tables: torch.Tensor
    context_lens: torch.Tensor
    outs: list[torch.Tensor]

    @property
    def num_kv_heads(self) -> int:
        return NUM_HEADS // self.group

    @property
    def copies(self) -> int:
        return len(self.outs)

    @property
    def bytes(self) -> int:
        """K and V read once, plus the query read and the output written."""
        element = self.query.element_size()
        kv = 2 * self.batch * self.context * self.num_kv_heads * self.head_dim * element
        return kv + 2 * self.query.numel() * element

    def call(self, i: int, partition_size: int | None = None) -> Callable[[], object]:
        """Decode attention on copy i; `partition_size` None lets the launcher choose."""
        return lambda: cuda_ops.paged_decode_attention(
            self.query,
            self.key_caches[i],
            self.value_caches[i],
            self.block_tables,
            self.context_lens,
            self.context,
            self.head_dim**-0.5,
            out=self.outs[i],
            partition_size=partition_size,
        )


def make_problem(batch: int, context: int, head_dim: int, group: int) -> PagedProblem:
    num_kv_heads = NUM_HEADS // group
    blocks_per_seq = math.ceil(context / BLOCK_SIZE)
    num_blocks = batch * blocks_per_seq
    shape = (num_blocks, BLOCK_SIZE, num_kv_heads, head_dim)
    element = torch.tensor([], dtype=DTYPE).element_size()
    copies = copies_for(2 * batch * context * num_kv_heads * head_dim * element)
    query = torch.randn(batch, NUM_HEADS, head_dim, device="cuda", dtype=DTYPE)
    return PagedProblem(
        batch=batch,
        context=context,
        head_dim=head_dim,
        group=group,
        query=query,
        key_caches=[torch.randn(shape, device="cuda", dtype=DTYPE) for _ in range(copies)],
        value_caches=[torch.randn(shape, device="cuda", dtype=DTYPE) for _ in range(copies)],
        # Scattered blocks, as a long-running cache ends up.
        block_tables=torch.randperm(num_blocks, device="cuda", dtype=torch.int32).view(batch, blocks_per_seq),
        context_lens=torch.full((batch,), context, device="cuda", dtype=torch.int32),
        outs=[torch.empty_like(query) for _ in range(copies)],
    )


def same_bytes_copy_us(nbytes: int, copies: int) -> float:
    """An elementwise kernel reading nbytes / 2 and writing nbytes / 2, timed like the attention calls."""
    # int32 elements: a byte-wise copy of several GB does not reach full bandwidth.
    sources = [torch.empty(nbytes // 8, device="cuda", dtype=torch.int32) for _ in range(copies)]
    targets = [torch.empty_like(source) for source in sources]
    # An elementwise kernel, not `copy_`: captured in a graph, a copy_ runs on the copy engine
    # (benchmarks/graph_timing.py), which holds some rows to 65% of copy speed.
    return graph_time_us(cycle(lambda i: lambda: torch.mul(sources[i], 1, out=targets[i]), copies))


def run_shape(batch: int, context: int, head_dim: int, group: int) -> dict:
    problem = make_problem(batch, context, head_dim, group)
    paged_us = graph_time_us(cycle(problem.call, problem.copies))
    problem.call(0)()
    paged_out = problem.outs[0].clone()
    blocks_per_seq = problem.block_tables.shape[1]

    def contiguous(cache: torch.Tensor) -> torch.Tensor:  # [batch, kv_heads, context, head_dim]
        rows = cache[problem.block_tables.long()].view(batch, blocks_per_seq * BLOCK_SIZE, -1, head_dim)
        return rows[:, :context].transpose(1, 2).contiguous()

    keys = [contiguous(cache) for cache in problem.key_caches]
    problem.key_caches.clear()  # the paged copies are no longer needed: make room
    values = [contiguous(cache) for cache in problem.value_caches]
    problem.value_caches.clear()
    sdpa_query = problem.query.unsqueeze(2)  # [batch, heads, 1, head_dim]

    def sdpa(i: int) -> Callable[[], object]:
        def call():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(
                    sdpa_query, keys[i], values[i], scale=head_dim**-0.5, enable_gqa=group > 1
                )

        return call

    try:
        max_diff = (sdpa(0)().squeeze(2).float() - paged_out.float()).abs().max().item()
        sdpa_us = graph_time_us(cycle(sdpa, problem.copies))
    except RuntimeError as error:  # flash not available for this shape/build
        sdpa_us, max_diff = float("nan"), float("nan")
        print(f"  sdpa flash unavailable for {batch}x{context} d{head_dim} g{group}: {error}")
    keys.clear()
    values.clear()
    total = problem.bytes
    return {
        "batch": batch,
        "context": context,
        "head_dim": head_dim,
        "group": group,
        "num_heads": NUM_HEADS,
        "num_kv_heads": problem.num_kv_heads,
        "bytes": total,
        "copies": problem.copies,
        "paged_us": paged_us,
        "paged_gbs": total / (paged_us * 1e-6) / 1e9,
        "sdpa_us": sdpa_us,
        "sdpa_gbs": total / (sdpa_us * 1e-6) / 1e9,
        "same_bytes_copy_us": same_bytes_copy_us(total, problem.copies),
        "max_abs_diff_vs_sdpa": max_diff,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results here as JSON")
    args = parser.parse_args()

    copy_gbs = copy_bandwidth(torch.device("cuda")) / 1e9
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
        f" {'sdpa us':>9} {'GB/s':>6} {'of copy':>7} | {'copy us':>8} | {'max diff':>8}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['head_dim']:>4} {r['group']:>2} {r['batch']:>5} {r['context']:>6} |"
            f" {r['paged_us']:>9.1f} {r['paged_gbs']:>6.0f} {r['paged_fraction_of_copy']:>7.0%} |"
            f" {r['sdpa_us']:>9.1f} {r['sdpa_gbs']:>6.0f} {r['sdpa_fraction_of_copy']:>7.0%} |"
            f" {r['same_bytes_copy_us']:>8.1f} | {r['max_abs_diff_vs_sdpa']:>8.4f}"
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
