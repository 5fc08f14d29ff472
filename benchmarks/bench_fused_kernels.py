"""Fused elementwise kernels: the layers' Triton path against their PyTorch reference, per op and shape.

Ops: RMSNorm (alone, with the residual add, Gemma's float32 variant), rotary on q/k views of a
fused qkv output, SiLU-and-mul and tanh-GELU-and-mul. Shapes: hidden 2048 (llama-1b: 32 heads of
64, 8 KV heads, intermediate 8192) and 4096 (llama-8b: 32 heads of 128, 8 KV heads, intermediate
14336), at a decode batch (T=256) and a prefill chunk (T=2048), bf16.

Each op is timed as the engine runs it in a decode step: N launches captured in one CUDA graph
(so host launch overhead is not counted, for either side), replayed many times, median over
replays of CUDA-event time / N. The N launches cycle through distinct input buffers totalling
several times the L2 size, so data comes from HBM. Achieved GB/s counts the bytes an op must move
(inputs read once, outputs written once), next to a device-to-device copy measured in the same run.

    PYTHONPATH=. python benchmarks/bench_fused_kernels.py --json fused_bench.json
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable

import torch

from benchmarks.graph_timing import graph_time_us
from benchmarks.roofline import copy_bandwidth
from engine.layers import RMSNorm, get_gated_activation
from engine.layers.rotary import RotaryEmbedding

DTYPE = torch.bfloat16
TOKENS = (256, 2048)
# hidden -> (heads, kv heads, head_dim, intermediate)
MODELS = {2048: (32, 8, 64, 8192), 4096: (32, 8, 128, 14336)}
STREAMED_BYTES = 512 * 2**20  # inputs cycled per graph: well past H100/H200 L2 (50-60 MiB)
MAX_SETS = 64
REPLAYS = 50


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy bandwidth (bytes read + written), measured eagerly as the other
    benchmarks do (see benchmarks/graph_timing.py for why not in a graph)."""
    return copy_bandwidth(torch.device("cuda")) / 1e9


def timed(make_call: Callable[[int], Callable[[], object]], bytes_per_call: int, reference: bool) -> float:
    """µs per call, the layers' reference path forced or not while capturing."""
    sets = max(1, min(MAX_SETS, STREAMED_BYTES // max(bytes_per_call, 1)))
    before = os.environ.get("PORTER_FORCE_REFERENCE")
    os.environ["PORTER_FORCE_REFERENCE"] = "1" if reference else "0"
    try:
        return graph_time_us([make_call(i) for i in range(sets)], REPLAYS)
    finally:
        if before is None:
            del os.environ["PORTER_FORCE_REFERENCE"]
        else:
            os.environ["PORTER_FORCE_REFERENCE"] = before


def randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, device="cuda", dtype=DTYPE)


def cases(hidden: int, tokens: int) -> list[tuple[str, Callable[[int], Callable[[], object]], int]]:
    """(op name, make_call(set index) -> call, bytes moved per call) for one shape."""
    heads, kv_heads, head_dim, intermediate = MODELS[hidden]
    element = torch.tensor([], dtype=DTYPE).element_size()
    row_bytes = tokens * hidden * element
    found = []

    def norm_case(name: str, norm: RMSNorm, with_residual: bool) -> None:
        norm.weight.data.normal_()
        inputs: dict[int, tuple] = {}

        def make(i: int):
            inputs[i] = (randn(tokens, hidden), randn(tokens, hidden) if with_residual else None)
            x, residual = inputs[i]
            return (lambda: norm(x, residual)) if with_residual else (lambda: norm(x))

        moved = (4 if with_residual else 2) * row_bytes + hidden * element
        found.append((name, make, moved))

    norm_case("rms_norm", RMSNorm(hidden).to("cuda", DTYPE), False)
    norm_case("rms_norm+residual", RMSNorm(hidden).to("cuda", DTYPE), True)
    norm_case("gemma_norm+residual", RMSNorm(hidden, 1e-6, 1.0, True).to("cuda", DTYPE), True)

    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    rope = RotaryEmbedding(head_dim, head_dim, 131072, inv_freq).cuda()
    q_size, kv_size = heads * head_dim, kv_heads * head_dim

    def make_rotary(i: int):
        qkv = randn(tokens, q_size + 2 * kv_size)
        positions = torch.randint(0, 8192, (tokens,), device="cuda")
        return lambda: rope(positions, qkv[:, :q_size], qkv[:, q_size : q_size + kv_size])

    found.append(("rotary q+k", make_rotary, 2 * tokens * (q_size + kv_size) * element))

    for name, hf_name in (("silu_and_mul", "silu"), ("gelu_tanh_and_mul", "gelu_pytorch_tanh")):
        layer = get_gated_activation(hf_name)

        def make_act(i: int, layer=layer):
            x = randn(tokens, 2 * intermediate)
            return lambda: layer(x)

        found.append((name, make_act, 3 * tokens * intermediate * element))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results here as JSON")
    args = parser.parse_args()

    copy_gbs = copy_bandwidth_gbs()
    rows = []
    with torch.inference_mode():
        for hidden in MODELS:
            for tokens in TOKENS:
                for op, make_call, moved in cases(hidden, tokens):
                    reference_us = timed(make_call, moved, reference=True)
                    triton_us = timed(make_call, moved, reference=False)
                    rows.append(
                        {
                            "op": op,
                            "hidden": hidden,
                            "tokens": tokens,
                            "bytes": moved,
                            "reference_us": reference_us,
                            "triton_us": triton_us,
                            "speedup": reference_us / triton_us,
                            "reference_gbs": moved / (reference_us * 1e-6) / 1e9,
                            "triton_gbs": moved / (triton_us * 1e-6) / 1e9,
                        }
                    )
                    torch.cuda.empty_cache()

    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  dtype {DTYPE}")
    print(f"device-to-device copy: {copy_gbs:.0f} GB/s (read + write)")
    header = (
        f"{'op':<20} {'hidden':>6} {'T':>5} {'MB':>7} | {'torch us':>9} {'GB/s':>6} |"
        f" {'triton us':>9} {'GB/s':>6} {'of copy':>7} | {'speedup':>7}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['op']:<20} {r['hidden']:>6} {r['tokens']:>5} {r['bytes'] / 1e6:>7.2f} |"
            f" {r['reference_us']:>9.1f} {r['reference_gbs']:>6.0f} |"
            f" {r['triton_us']:>9.1f} {r['triton_gbs']:>6.0f} {r['triton_gbs'] / copy_gbs:>7.0%} |"
            f" {r['speedup']:>6.1f}x"
        )
    if args.json:
        meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "dtype": str(DTYPE)}
        meta["copy_gbs"] = copy_gbs
        with open(args.json, "w") as handle:
            json.dump({"meta": meta, "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
