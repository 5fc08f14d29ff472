"""The FusedMoE layer's Triton grouped GEMM against its PyTorch reference, with achieved bandwidth.

Shape: one mixture-of-experts layer like Qwen3-30B-A3B's (128 experts, 8 per token, hidden 2048,
expert intermediate 768), bf16, at decode batches (T = 1, 16, 64, 256) and a prefill chunk
(T = 2048), routing from random router logits. Achieved GB/s counts the bytes the layer must move:
the weights of every expert some token chose (gate|up and down, read once), the tokens in and out,
next to a device-to-device copy measured in the same run. Each variant is timed eagerly with CUDA
events (median of the calls after warm-up; the reference path reads the experts it must run back
to the host, so it cannot be captured in a graph).

    PYTHONPATH=. python benchmarks/bench_moe.py --json moe_bench.json
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from benchmarks.roofline import _median_seconds, copy_bandwidth
from engine.layers.moe import FusedMoE, softmax_top_k

DTYPE = torch.bfloat16
EXPERTS, TOP_K, HIDDEN, INTERMEDIATE = 128, 8, 2048, 768
TOKENS = (1, 16, 64, 256, 2048)


def moved_bytes(layer: FusedMoE, ids: torch.Tensor, tokens: int) -> int:
    """Weights of the experts in use plus the activations in and out."""
    element = torch.tensor([], dtype=DTYPE).element_size()
    used = int(torch.unique(ids).numel())
    per_expert = 3 * layer.local_intermediate * layer.hidden_size * element
    return used * per_expert + 2 * tokens * layer.hidden_size * element


def time_us(
    layer: FusedMoE, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, reference: bool
) -> float:
    before = os.environ.get("PORTER_FORCE_REFERENCE")
    os.environ["PORTER_FORCE_REFERENCE"] = "1" if reference else "0"
    try:
        return _median_seconds(lambda: layer(x, ids, weights), x.device, repeats=20) * 1e6
    finally:
        if before is None:
            del os.environ["PORTER_FORCE_REFERENCE"]
        else:
            os.environ["PORTER_FORCE_REFERENCE"] = before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    device = torch.device("cuda")
    torch.manual_seed(0)
    with torch.device(device):
        layer = FusedMoE(EXPERTS, TOP_K, HIDDEN, INTERMEDIATE).to(DTYPE)
    for param in layer.parameters():
        param.data.normal_(0, 0.02)
    copy_gbs = copy_bandwidth(device) / 1e9
    rows = []
    print(f"FusedMoE E={EXPERTS} top-{TOP_K} H={HIDDEN} I={INTERMEDIATE} {DTYPE}; copy {copy_gbs:.0f} GB/s")
    print(
        f"{'tokens':>7} {'experts':>8} {'triton µs':>10} {'GB/s':>7} {'% copy':>7} {'reference µs':>13} {'speedup':>8}"
    )
    for tokens in TOKENS:
        x = torch.randn(tokens, HIDDEN, device=device, dtype=DTYPE)
        weights, ids = softmax_top_k(torch.randn(tokens, EXPERTS, device=device), TOP_K, renormalize=True)
        fused = time_us(layer, x, ids, weights, reference=False)
        plain = time_us(layer, x, ids, weights, reference=True)
        moved = moved_bytes(layer, ids, tokens)
        gbs = moved / fused / 1e3
        row = {
            "tokens": tokens,
            "experts_used": int(torch.unique(ids).numel()),
            "triton_us": fused,
            "achieved_gbs": gbs,
            "copy_gbs": copy_gbs,
            "reference_us": plain,
        }
        rows.append(row)
        print(
            f"{tokens:>7} {row['experts_used']:>8} {fused:>10.1f} {gbs:>7.0f} {100 * gbs / copy_gbs:>6.1f}% "
            f"{plain:>13.1f} {plain / fused:>7.1f}x"
        )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
