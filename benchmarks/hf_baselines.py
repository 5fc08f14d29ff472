"""The HF transformers baselines of `bench_throughput.py`, on the same in-memory model and prompts.

- `run_generate_batch`: transformers' continuous batching (paged KV cache), driven exactly as
  `model.generate_batch` drives it (its context manager, `add_requests`, `get_result`), so that the
  manager's warm-up (its CUDA graph capture) can be left out of the timed part, as the engine's
  start-up is.
- `run_generate`: `model.generate` over static batches, left-padded to the batch's longest prompt,
  greedy, EOS off.
Both return the tokens generated and the seconds taken.
"""

from __future__ import annotations

import time

import torch
from transformers import ContinuousBatchingConfig, GenerationConfig, PreTrainedModel
from transformers.generation.continuous_batching.utils import WorkloadHints

# A result that does not come within this long means the manager's thread died or hung.
_RESULT_TIMEOUT_S = 600.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_generate_batch(
    model: PreTrainedModel, prompts: list[list[int]], output_len: int
) -> tuple[int, float]:
    """(output tokens, seconds) of transformers' continuous batching over all `prompts`; EOS disabled
    (eos_token_id -1, which the continuous-batching requests read as none)."""
    config = GenerationConfig(max_new_tokens=output_len, do_sample=False, eos_token_id=-1, pad_token_id=0)
    # On a GPU the manager sizes its cache from free memory; on CPU (the smoke run) it cannot, so say.
    cb_config = None
    if model.device.type == "cpu":
        longest = max(len(p) for p in prompts) + output_len
        cb_config = ContinuousBatchingConfig(
            block_size=16, num_blocks=len(prompts) * -(-longest // 16), max_batch_tokens=256
        )
    hints = WorkloadHints(
        max_prompt_length=max(len(p) for p in prompts),
        max_generated_length=output_len,
        num_requests=len(prompts),
    )
    manager_context = model.continuous_batching_context_manager(
        generation_config=config,
        continuous_batching_config=cb_config,
        block=True,
        timeout=5,
        workload_hints=hints,
    )
    original_attention = model.config._attn_implementation
    try:
        tokens, seconds = _drive(manager_context, prompts, output_len, model.device)
    finally:
        # The manager switches the model to a paged attention; a failed start leaves it switched.
        model.set_attn_implementation(original_attention)
    return tokens, seconds


def _drive(
    manager_context, prompts: list[list[int]], output_len: int, device: torch.device
) -> tuple[int, float]:
    with manager_context as manager:  # warm-up happens on entry, outside the clock
        _sync(device)
        start = time.perf_counter()
        request_ids = manager.add_requests(inputs=prompts, max_new_tokens=output_len)
        tokens = 0
        finished = 0
        deadline = start + _RESULT_TIMEOUT_S
        while finished < len(request_ids):
            result = manager.get_result(timeout=1)
            if result is not None and result.is_finished():
                finished += 1
                tokens += len(result.generated_tokens)
            elif result is None and (not manager.is_running() or time.perf_counter() > deadline):
                raise RuntimeError(f"generate_batch stopped after {finished} of {len(request_ids)} requests")
        _sync(device)
        seconds = time.perf_counter() - start
    return tokens, seconds


@torch.inference_mode()
def run_generate(
    model: PreTrainedModel, prompts: list[list[int]], output_len: int, batch_size: int
) -> tuple[int, float]:
    """(output tokens, seconds) of `model.generate` over `prompts` in static batches of `batch_size`,
    greedy, exactly `output_len` new tokens each (no EOS). One short warm-up call runs first."""
    config = GenerationConfig(
        max_new_tokens=output_len,
        min_new_tokens=output_len,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    device = model.device

    def left_padded(batch: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(p) for p in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, prompt in enumerate(batch):
            ids[row, width - len(prompt) :] = torch.tensor(prompt)
            mask[row, width - len(prompt) :] = 1
        return ids.to(device), mask.to(device)

    warm_ids, warm_mask = left_padded(prompts[:batch_size])
    model.generate(
        warm_ids, attention_mask=warm_mask, generation_config=config, max_new_tokens=2, min_new_tokens=2
    )
    _sync(device)
    start = time.perf_counter()
    tokens = 0
    for first in range(0, len(prompts), batch_size):
        input_ids, attention_mask = left_padded(prompts[first : first + batch_size])
        output = model.generate(input_ids, attention_mask=attention_mask, generation_config=config)
        tokens += (output.shape[1] - input_ids.shape[1]) * output.shape[0]
    _sync(device)
    return tokens, time.perf_counter() - start
