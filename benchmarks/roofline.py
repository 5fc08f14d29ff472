"""The throughput ceiling of an offline decode workload, from the copy bandwidth and matmul rate measured
on the machine itself.

One decode step moves at least the weights plus the KV cache it reads, and does `2 * params * batch`
FLOPs; it takes at least the larger of the two times. Prefill does `2 * params * tokens` FLOPs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch


def _median_seconds(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median of `repeats` timed calls after two warm-ups; CUDA events on a GPU, the host clock on CPU."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e-3)
        else:
            begin = time.perf_counter()
            fn()
            times.append(time.perf_counter() - begin)
    return sorted(times)[len(times) // 2]


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of a device-to-device copy (bytes read plus bytes written): 2 GiB on a GPU, 64 MiB on CPU."""
    numel = 2**29 if device.type == "cuda" else 2**24
    source = torch.randn(numel, device=device)
    target = torch.empty_like(source)
    seconds = _median_seconds(lambda: target.copy_(source), device, repeats=20)
    return 2 * numel * source.element_size() / seconds


def matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a square matrix product on random data: 8192 on a GPU, 512 on CPU."""
    n = 8192 if device.type == "cuda" else 512
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    seconds = _median_seconds(lambda: a @ b, device, repeats=10)
    return 2 * n**3 / seconds


@dataclass(frozen=True)
class ModelCost:
    """What one token costs the hardware: parameters (tied weights once), their bytes, KV bytes per token.

    A mixture-of-experts model also gives its routed experts' bytes (all layers), its expert count and
    how many experts each token takes: a token's FLOPs count only its experts, and a decode step
    reads only the experts its batch chose (with routing uniform at random, a batch of B tokens
    leaves an expert unchosen with probability (1 - k/E)^B).
    """

    params: int
    weight_bytes: int
    kv_bytes_per_token: int
    expert_bytes: int = 0
    experts: int = 0
    experts_per_token: int = 0

    @property
    def active_params(self) -> float:
        """Parameters one token's forward pass multiplies by."""
        if not self.experts:
            return self.params
        expert_params = self.params * self.expert_bytes / self.weight_bytes
        return self.params - expert_params * (1 - self.experts_per_token / self.experts)

    def step_weight_bytes(self, batch: int) -> float:
        """Weight bytes a decode step over `batch` tokens reads: the experts some token chose."""
        if not self.experts:
            return self.weight_bytes
        chosen = 1 - (1 - self.experts_per_token / self.experts) ** batch
        return self.weight_bytes - self.expert_bytes * (1 - chosen)


@dataclass(frozen=True)
class Roofline:
    bandwidth: float  # bytes/s, measured copy
    flops: float  # FLOP/s, measured bf16 (or the run's dtype) matmul
    seconds: float  # lower bound on the whole workload
    output_tokens_per_s: float
    total_tokens_per_s: float
    decode_steps: int
    memory_bound_steps: int  # steps where bytes, not FLOPs, set the floor

    def as_dict(self) -> dict:
        return asdict(self)


def workload_roofline(
    cost: ModelCost,
    num_prompts: int,
    input_len: int,
    output_len: int,
    max_batch: int,
    bandwidth: float,
    flops: float,
) -> Roofline:
    """Floor for `num_prompts` prompts of `input_len` tokens, `output_len` out, run `max_batch` at a time.

    Prompts run in waves of `max_batch` (all the same length, so a wave starts and ends together).
    The first output token comes from the prefill; each later one is one decode step over the wave,
    whose sequences hold `input_len + t` tokens at step t.
    """
    seconds = 2 * cost.active_params * num_prompts * input_len / flops  # prefill
    steps = memory_bound = 0
    remaining = num_prompts
    while remaining > 0:
        batch = min(max_batch, remaining)
        remaining -= batch
        for t in range(1, output_len):
            read = cost.step_weight_bytes(batch) + batch * (input_len + t) * cost.kv_bytes_per_token
            memory_time, compute_time = read / bandwidth, 2 * cost.active_params * batch / flops
            seconds += max(memory_time, compute_time)
            steps += 1
            memory_bound += memory_time >= compute_time
    output_tokens = num_prompts * output_len
    return Roofline(
        bandwidth=bandwidth,
        flops=flops,
        seconds=seconds,
        output_tokens_per_s=output_tokens / seconds,
        total_tokens_per_s=num_prompts * (input_len + output_len) / seconds,
        decode_steps=steps,
        memory_bound_steps=memory_bound,
    )
