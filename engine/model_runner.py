"""One tensor-parallel rank's share of the work: the model, its KV cache, and one forward per step.

Every rank builds a `ModelRunner`; each step they all run `execute_model` on the same `StepInputs`
(the collectives live inside the layers), and rank 0 alone samples the next tokens.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from engine import distributed
from engine.config import (
    DEFAULT_CPU_NUM_KV_BLOCKS,
    EngineConfig,
    resolve_dtype,
    resolve_max_model_len,
)
from engine.cuda_graphs import DecodeGraphs, capture_sizes, graph_unsafe_reason
from engine.host_copy import values_to_device
from engine.input_metadata import InputMetadata
from engine.kv_cache import allocate_kv_caches, kv_cache_bytes_per_block
from engine.layers.attention import cache_shape_of
from engine.layers.sampler import Sampler, SamplerOutput, make_generator
from engine.model_loader import load_hf_config, load_model
from engine.sequence import Sequence as EngineSequence

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class StepInputs:
    """One step's batch as plain host lists: what the driver sends to every rank, cheap to pickle.

    Sequence i runs `query_lens[i]` tokens; `input_ids` and `positions` hold all of them end to end.
    `block_table_array`, when given, is `block_tables` as an int32 array padded with 0 (the scheduler
    keeps one); the step's metadata is then built from it without a pass over every block id.
    """

    input_ids: list[int]
    positions: list[int]
    query_lens: list[int]
    context_lens: list[int]
    block_tables: list[list[int]]
    block_table_array: np.ndarray | None = None
    # Asynchronous scheduling: tokens the previous step sampled on the device and the host has not
    # read. Row `pending_rows[k]` of `input_ids` (a placeholder there) takes sampled token
    # `pending_sources[k]` of that step, which sampled `num_previous_samples` tokens on rank 0.
    pending_rows: list[int] = field(default_factory=list)
    pending_sources: list[int] = field(default_factory=list)
    num_previous_samples: int = 0


class ModelRunner:
    """Loads the model onto this rank's device and runs forward steps over its paged KV cache.

    Construction loads the weights only; `initialize_kv_cache` (a collective under tensor parallelism,
    every rank calls it) then sizes and allocates the cache, so a rank that fails to load can be
    reported before any rank waits on another.
    """

    def __init__(self, config: EngineConfig, rank: int = 0, device_index: int | None = None) -> None:
        """`device_index`: which GPU this rank uses when it is not `rank` (torchrun's LOCAL_RANK)."""
        self.config = config
        self.rank = rank
        self.tp_size = config.tensor_parallel_size
        self.device = config.device_for_rank(rank if device_index is None else device_index)
        self._previous_num_threads = torch.get_num_threads()
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        elif self.tp_size > 1:
            # CPU ranks share the cores; each spinning up a thread per core oversubscribes them, and
            # a rank that waits for CPU time stalls every collective.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.tp_size))
        torch.manual_seed(config.seed)
        hf_config = load_hf_config(config.model, config.trust_remote_code)
        self.dtype = resolve_dtype(config.dtype, hf_config, self.device.type)
        self.model, self.hf_config = load_model(
            config.model, self.dtype, self.device, config.model_class, hf_config=hf_config
        )
        # The cache is shaped by the model's own attention layers, whatever names its config uses.
        self.num_cache_layers, self.kv_heads_per_rank, self.head_dim, self.value_head_dim = cache_shape_of(
            self.model
        )
        self.block_size = config.block_size
        self.num_kv_blocks = 0
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.decode_graphs: DecodeGraphs | None = None  # set by initialize_kv_cache unless eager
        # Only rank 0 samples; a seeded sequence keeps one generator for its whole life.
        self.sampler = Sampler() if rank == 0 else None
        self._generators: dict[int, torch.Generator] = {}
        # The latest step's sampled tokens, on the device: the next step's pending inputs (rank 0).
        self._last_sampled: torch.Tensor | None = None

    # ----------------------------------------------------------------------------------- KV cache

    def initialize_kv_cache(self) -> int:
        """Sizes the KV cache (the same block count on every rank) and allocates it; returns the count."""
        num_blocks = self.config.num_kv_blocks
        if num_blocks is None:
            num_blocks = self._blocks_that_fit() if self.device.type == "cuda" else DEFAULT_CPU_NUM_KV_BLOCKS
        # The scheduler on rank 0 hands out block ids for every rank, so all must hold as many.
        num_blocks = self._min_over_ranks(num_blocks)
        if num_blocks < 1:
            raise RuntimeError(
                f"no room for a KV cache on {self.device}: raise gpu_memory_utilization "
                f"({self.config.gpu_memory_utilization}) or lower max_num_batched_tokens"
            )
        self.num_kv_blocks = num_blocks
        self.kv_caches = allocate_kv_caches(
            self.num_cache_layers,
            num_blocks,
            self.block_size,
            self.kv_heads_per_rank,
            self.head_dim,
            self.dtype,
            self.device,
            self.value_head_dim,
        )
        self._capture_decode_graphs()
        return num_blocks

    def _capture_decode_graphs(self) -> None:
        """Captures the decode forward at each batch size (CUDA, unless `enforce_eager`).

        Every rank captures the same sizes in the same order, so the collectives inside line up.
        """
        self.decode_graphs = None
        if self.device.type != "cuda" or self.config.enforce_eager:
            return
        reason = graph_unsafe_reason(self.model)
        if reason is not None:
            logger.warning("decode steps run eagerly: %s", reason)
            return
        max_model_len = self.config.max_model_len or resolve_max_model_len(None, self.hf_config)
        graphs = DecodeGraphs(
            self.model,
            self.kv_caches,
            capture_sizes(self.config.max_num_seqs),
            max_context_len=max_model_len,
            block_size=self.block_size,
            device=self.device,
        )
        graphs.capture()
        self.decode_graphs = graphs

    def bytes_per_block(self) -> int:
        return kv_cache_bytes_per_block(
            self.num_cache_layers,
            self.block_size,
            self.kv_heads_per_rank,
            self.head_dim,
            self.dtype,
            self.value_head_dim,
        )

    def _blocks_that_fit(self) -> int:
        """Blocks that fit in `gpu_memory_utilization` of the GPU next to the weights and a step's peak."""
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        used_before = total - free  # weights, the CUDA context and anything other processes hold
        allocated_before = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        # The two extremes of a step: few long prefills (attention-heavy) and many short sequences
        # (logits- and sampling-heavy), each as many tokens as a step may hold.
        num_tokens = self.config.max_num_batched_tokens
        max_len = min(self.config.max_model_len or num_tokens, num_tokens)
        self._profile_run(_split_evenly(num_tokens, -(-num_tokens // max_len)))
        self._profile_run(_split_evenly(num_tokens, min(self.config.max_num_seqs, num_tokens)))
        torch.cuda.synchronize(self.device)
        activation_peak = torch.cuda.max_memory_allocated(self.device) - allocated_before
        torch.cuda.empty_cache()
        budget = total * self.config.gpu_memory_utilization - used_before - activation_peak
        num_blocks = int(budget // self.bytes_per_block())
        logger.info(
            "rank %d: %.2f GiB used before the cache, %.2f GiB step peak, %d KV blocks of %d tokens",
            self.rank,
            used_before / 2**30,
            activation_peak / 2**30,
            num_blocks,
            self.block_size,
        )
        return num_blocks

    def _profile_run(self, lengths: list[int]) -> None:
        """One prefill step of sequences of `lengths` tokens into a throwaway cache, then sampling-sized work."""
        blocks_per_seq = -(-max(lengths) // self.block_size)
        self.kv_caches = allocate_kv_caches(
            self.num_cache_layers,
            blocks_per_seq * len(lengths),
            self.block_size,
            self.kv_heads_per_rank,
            self.head_dim,
            self.dtype,
            self.device,
            self.value_head_dim,
        )
        step = StepInputs(
            input_ids=[0] * sum(lengths),
            positions=[p for length in lengths for p in range(length)],
            query_lens=lengths,
            context_lens=lengths,
            block_tables=[
                list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)) for i in range(len(lengths))
            ],
        )
        logits = self.execute_model(step)
        # The sampler works on a few float32 copies of the logits; count them in the peak too.
        torch.softmax(logits, dim=-1).cumsum(dim=-1)
        del logits
        self.kv_caches = []

    def _min_over_ranks(self, value: int) -> int:
        if distributed.get_tp_size() == 1:
            return value
        device = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
        tensor = torch.tensor([value], dtype=torch.int64, device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
        return int(tensor.item())

    # ------------------------------------------------------------------------------------ forward

    def prepare_inputs(
        self, step: StepInputs
    ) -> tuple[torch.Tensor, torch.Tensor, InputMetadata, torch.Tensor | None]:
        """Device tensors for one step: input ids, positions, the attention metadata, and the pending
        rows and their sources (`[2, n]`, None when no input is pending)."""
        return prepare_step_tensors(step, self.block_size, self.device)

    @torch.inference_mode()
    def execute_model(self, step: StepInputs) -> torch.Tensor:
        """Runs one step on this rank; returns float32 logits `[num_seqs, vocab]` (the same on every rank)."""
        if not self.kv_caches:
            raise RuntimeError("the KV cache is not allocated: call initialize_kv_cache() first")
        input_ids, positions, metadata, pending = self.prepare_inputs(step)
        if pending is not None:
            self._fill_pending_inputs(input_ids, pending, step.num_previous_samples)
        hidden_states = self.run_forward(input_ids, positions, metadata)
        return self.model.compute_logits(hidden_states, metadata)

    def _fill_pending_inputs(self, input_ids: torch.Tensor, pending: torch.Tensor, num_samples: int) -> None:
        """Writes the previous step's sampled tokens into the rows that wait for them, on the device:
        the host never reads them first. Rank 0 holds them; under tensor parallelism it broadcasts
        them (a device collective on NCCL, so still no host sync)."""
        rows, sources = pending
        if self.rank == 0:
            tokens = self._last_sampled
            if tokens is None or tokens.numel() != num_samples:
                raise RuntimeError(
                    f"the step expects {num_samples} tokens from the previous step, rank 0 sampled "
                    f"{0 if tokens is None else tokens.numel()}"
                )
        else:
            tokens = torch.empty(num_samples, dtype=torch.long, device=self.device)
        if self.tp_size > 1:
            dist.broadcast(tokens, src=0)
        input_ids[rows] = tokens[sources]

    def run_forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: InputMetadata
    ) -> torch.Tensor:
        """The model's forward for one step: hidden states `[num_tokens, hidden]`.

        A decode-only step that a captured CUDA graph covers (see `engine.cuda_graphs`) replays the
        graph, padded to the next captured batch size; every other step runs eagerly.
        """
        if self.decode_graphs is not None and self.decode_graphs.can_run(metadata):
            return self.decode_graphs.replay(input_ids, positions, metadata)
        return self.model(input_ids, positions, self.kv_caches, metadata)

    def close(self) -> None:
        """Frees the KV cache and restores the thread count this runner changed (CPU tensor parallelism)."""
        self.decode_graphs = None  # the graphs hold the cache's tensors
        self.kv_caches = []
        self._generators.clear()
        torch.set_num_threads(self._previous_num_threads)

    # ----------------------------------------------------------------------------------- sampling

    def sample(self, logits: torch.Tensor, seqs: Sequence[EngineSequence]) -> SamplerOutput:
        """Next token (and logprobs where asked) for each sequence, one row of `logits` each (rank 0)."""
        if self.sampler is None:
            raise RuntimeError(f"rank {self.rank} does not sample; rank 0 does")
        params = [seq.sampling_params for seq in seqs]
        generators = [self._generator(seq) for seq in seqs]
        with_penalties = any(p.has_penalties for p in params)
        if with_penalties and any(seq.num_pending_tokens for seq in seqs):
            raise RuntimeError("penalties need every earlier token read back before the next step samples")
        output = self.sampler(
            logits,
            params,
            prompt_token_ids=[seq.prompt_token_ids for seq in seqs] if with_penalties else None,
            output_token_ids=[seq.output_token_ids for seq in seqs] if with_penalties else None,
            generators=generators,
        )
        self._last_sampled = output.token_ids
        return output

    def read_back(self, token_ids: torch.Tensor) -> TokenReadback:
        """Starts copying sampled tokens to the host without waiting for them (see TokenReadback)."""
        return TokenReadback(token_ids)

    def release(self, seq_id: int) -> None:
        """Forgets a finished sequence's generator."""
        self._generators.pop(seq_id, None)

    def _generator(self, seq: EngineSequence) -> torch.Generator | None:
        seed = seq.sampling_params.seed
        if seed is None:
            return None
        if seq.seq_id not in self._generators:
            self._generators[seq.seq_id] = make_generator(seed, self.device)
        return self._generators[seq.seq_id]


class TokenReadback:
    """Sampled tokens on their way to the host: the copy is queued behind the step, `wait` ends it.

    On a GPU the copy goes to pinned memory without blocking, so the host can prepare and launch the
    next step first; torch's pinned-memory cache keeps the buffer until the copy has run.
    """

    def __init__(self, token_ids: torch.Tensor) -> None:
        self._event: torch.cuda.Event | None = None
        if token_ids.is_cuda:
            self._host = torch.empty(token_ids.shape, dtype=token_ids.dtype, pin_memory=True)
            self._host.copy_(token_ids, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = token_ids

    def wait(self) -> list[int]:
        if self._event is not None:
            self._event.synchronize()
        return self._host.tolist()


def prepare_step_tensors(
    step: StepInputs, block_size: int, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor, InputMetadata, torch.Tensor | None]:
    """Input ids, positions, attention metadata and the pending rows with their sources (`[2, n]`,
    None when none) of `step` on `device`, in three host-to-device copies."""
    num_tokens = len(step.input_ids)
    # One copy for the int64 inputs; each is a contiguous view of it, the positions starting 16-byte
    # aligned whatever the token count (see `pack_aligned`), the pending rows and sources last.
    padding = [0] * (num_tokens % 2)
    ids_and_positions = values_to_device(
        step.input_ids + padding + step.positions + step.pending_rows + step.pending_sources,
        torch.long,
        device,
    )
    positions_start = num_tokens + len(padding)
    pending_start = positions_start + num_tokens
    num_pending = len(step.pending_rows)
    pending = (
        ids_and_positions[pending_start : pending_start + 2 * num_pending].view(2, num_pending)
        if num_pending
        else None
    )
    if step.block_table_array is not None:
        metadata = InputMetadata.from_arrays(
            np.asarray(step.query_lens, dtype=np.int64),
            np.asarray(step.context_lens, dtype=np.int64),
            step.block_table_array,
            block_size,
            device,
        )
    else:
        metadata = InputMetadata.build(
            step.query_lens, step.context_lens, step.block_tables, block_size, device=device
        )
    return (
        ids_and_positions[:num_tokens],
        ids_and_positions[positions_start:pending_start],
        metadata,
        pending,
    )


def select_rows(logits: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
    """The logits of the sequences that sample this step (a prefill chunk short of its end does not)."""
    if len(rows) == logits.shape[0]:
        return logits
    return logits[values_to_device(list(rows), torch.long, logits.device)]


def _split_evenly(total: int, parts: int) -> list[int]:
    """`total` as `parts` lengths differing by at most one."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]
