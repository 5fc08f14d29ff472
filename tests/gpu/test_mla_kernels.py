"""Triton multi-latent attention on CUDA against the PyTorch reference (tests/engine/kernels/mla_cases.py),
and the MultiLatentAttention layer on CUDA (Triton) against itself on the CPU (reference), both at
DeepSeek-V3's sizes (kv_lora_rank 512, rope 64). Skipped without a CUDA device."""

from __future__ import annotations

import copy

import pytest
import torch

from engine.input_metadata import InputMetadata
from engine.kv_cache import allocate_kv_caches
from engine.layers import ReplicatedLinear
from engine.layers.mla import MultiLatentAttention
from tests.engine.kernels.mla_cases import TOLERANCE, check_latent_attention

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

STEPS = [
    ([1] * 8, [1, 16, 17, 100, 257, 1000, 33, 2]),  # decode only
    ([300, 1, 37, 1], [300, 700, 90, 5]),  # prompt, decode, chunk after cached rows
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("num_heads", [16, 128, 20])
@pytest.mark.parametrize("step", range(len(STEPS)))
def test_latent_attention_kernel_matches_the_reference(dtype, num_heads, step):
    check_latent_attention(*STEPS[step], num_heads, 512, 64, dtype, "cuda", seed=step)


def test_small_and_padded_sizes():
    check_latent_attention([5, 1], [5, 40], 4, 32, 8, torch.float32, "cuda", block_size=8)
    check_latent_attention([3, 1], [3, 19], 6, 48, 16, torch.float16, "cuda", block_size=12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_layer_on_cuda_matches_the_layer_on_cpu(dtype):
    heads, nope, rope, value, rank, block_size = 16, 128, 64, 128, 512, 16
    torch.manual_seed(0)
    up = ReplicatedLinear(rank, heads * (nope + value), bias=False)
    up.weight.data.normal_(0, 0.05)
    layers = {
        device: MultiLatentAttention(
            heads, nope, rope, value, rank, (nope + rope) ** -0.5, copy.deepcopy(up).to(device, dt)
        )
        for device, dt in (("cpu", torch.float32), ("cuda", dtype))
    }
    tables = [[3, 0, 5], [1, 4, 2]]
    caches = {
        device: allocate_kv_caches(1, 6, block_size, 1, rank + rope, dt, device, value_head_dim=0)[0]
        for device, dt in (("cpu", torch.float32), ("cuda", dtype))
    }
    generator = torch.Generator().manual_seed(1)
    for query_lens, context_lens in (([20, 9], [20, 9]), ([1, 30], [21, 39]), ([1, 1], [22, 40])):
        inputs = [
            torch.randn(sum(query_lens), *shape, generator=generator)
            for shape in ((heads, nope), (heads, rope), (rank,), (rope,))
        ]
        outputs = {}
        for device, dt in (("cpu", torch.float32), ("cuda", dtype)):
            metadata = InputMetadata.build(query_lens, context_lens, tables, block_size, device)
            outputs[device] = (
                layers[device](*(x.to(device, dt) for x in inputs), caches[device], metadata).float().cpu()
            )
        error = ((outputs["cuda"] - outputs["cpu"]).abs().max() / outputs["cpu"].abs().max()).item()
        assert error < TOLERANCE[dtype], f"{dtype} {query_lens}: {error:.2e}"
