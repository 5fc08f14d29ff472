"""Decode attention against its split-K partition length: the data behind the launcher's choice.

For each shape, times the paged CUDA kernel (as `bench_decode_attention.py` does: back to back in
a CUDA graph over L2-cold copies of the cache) with the partition length the launcher picks and
with every power of two from 64 tokens to the whole context, next to an elementwise kernel moving
the same bytes. The default shapes are the small-batch and few-KV-head ones, where the fixed cost
of a block and the split-K merge decide the time. The launcher's cost model (`mma_partition_size`
in `engine/csrc/paged_decode_attention.cu`) is fitted to sweeps like this one.

    PYTHONPATH=. python benchmarks/sweep_decode_partitions.py --json sweep.json
    PYTHONPATH=. python benchmarks/sweep_decode_partitions.py --shape 128,8,1,32768
"""

from __future__ import annotations

import argparse
import json

import torch

from benchmarks.bench_decode_attention import PagedProblem, cycle, make_problem, same_bytes_copy_us
from benchmarks.graph_timing import graph_time_us
from benchmarks.roofline import copy_bandwidth

# (head_dim, group, batch, context)
SHAPES = [
    (64, 1, 1, 4096),
    (64, 4, 1, 4096),
    (64, 4, 1, 32768),
    (64, 4, 4, 4096),
    (64, 8, 1, 4096),
    (64, 8, 1, 32768),
    (64, 8, 4, 4096),
    (64, 8, 16, 4096),
    (128, 1, 1, 4096),
    (128, 4, 1, 4096),
    (128, 4, 4, 4096),
    (128, 8, 1, 4096),
    (128, 8, 1, 32768),
    (128, 8, 4, 4096),
]


def partition_lengths(context: int) -> list[int | None]:
    """None (the launcher's choice), then 64, 128, ... up to the first length covering the context."""
    lengths: list[int | None] = [None]
    size = 64
    while True:
        lengths.append(size)
        if size >= context:
            return lengths
        size *= 2


def sweep(problem: PagedProblem, lengths: list[int | None]) -> list[dict]:
    """Microseconds per call at each partition length (NaN where the launcher refuses the length)."""
    rows = []
    for length in lengths:
        try:
            us = graph_time_us(cycle(lambda i, n=length: problem.call(i, n), problem.copies))
        except RuntimeError as error:
            print(f"  partition {length}: {error}".splitlines()[0])
            us = float("nan")
        rows.append({"partition_size": length, "us": us})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", action="append", help="head_dim,group,batch,context (repeatable)")
    parser.add_argument("--json", help="write the results here as JSON")
    args = parser.parse_args()
    shapes = [tuple(int(x) for x in s.split(",")) for s in args.shape] if args.shape else SHAPES

    copy_gbs = copy_bandwidth(torch.device("cuda")) / 1e9
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  copy {copy_gbs:.0f} GB/s")
    results = []
    for head_dim, group, batch, context in shapes:
        problem = make_problem(batch, context, head_dim, group)
        copy_us = same_bytes_copy_us(problem.bytes, problem.copies)
        rows = sweep(problem, partition_lengths(context))
        mb = problem.bytes / 1e6
        print(
            f"D{head_dim} G{group} batch {batch} context {context}: {mb:.1f} MB, same-bytes copy {copy_us:.1f} us"
        )
        for row in rows:
            label = "auto" if row["partition_size"] is None else str(row["partition_size"])
            fraction = problem.bytes / (row["us"] * 1e-6) / 1e9 / copy_gbs
            print(f"  partition {label:>6}: {row['us']:8.1f} us  {fraction:5.0%} of copy")
        results.append(
            {
                "head_dim": head_dim,
                "group": group,
                "batch": batch,
                "context": context,
                "bytes": problem.bytes,
                "same_bytes_copy_us": copy_us,
                "rows": rows,
            }
        )
        del problem
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(
                {"device": torch.cuda.get_device_name(), "copy_gbs": copy_gbs, "shapes": results}, handle
            )


if __name__ == "__main__":
    main()
