"""CUDA graphs for decode steps: the model forward captured once per batch size, replayed per step.

A decode-only step (one new token per sequence) launches the same few hundred kernels every time; on
a small model the GPU finishes each before the host has issued the next, so the step time is launch
overhead. Capturing the forward at a fixed batch size and replaying it costs one launch instead.

A graph replays with the tensors it was captured on, so every input lives in a static buffer sized for
the largest captured batch, and a step is copied into the front of those buffers. A step of `n`
sequences runs the smallest captured size `>= n`; the rows past `n` are padding, made harmless:
slot -1 (nothing is written to the KV cache), context length 1 over a block id some earlier step
wrote (always a valid block), and their outputs are dropped. Every op of the forward works row by
row, so padding never changes a real sequence's result.

Each graph is captured with `max_context_len` = the bound below (the decode kernel sizes its split-K
grid from it on the host); partitions past a sequence's real context exit at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch
from torch import nn

from engine.input_metadata import InputMetadata
from engine.kernels.dispatch import reference_forced
from engine.kv_cache import KVCache
from engine.layers.mla import MultiLatentAttention
from engine.layers.rotary import LengthDependentRotaryEmbedding

logger = logging.getLogger(__name__)

DEFAULT_CAPTURE_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def capture_sizes(max_num_seqs: int, candidates: Sequence[int] = DEFAULT_CAPTURE_SIZES) -> list[int]:
    """The batch sizes to capture: the candidates up to `max_num_seqs`, plus `max_num_seqs` itself when it
    falls between two of them (so every decode batch the scheduler can form finds a graph)."""
    sizes = sorted({size for size in candidates if size <= max_num_seqs})
    if max_num_seqs < max(candidates) and max_num_seqs not in sizes:
        sizes.append(max_num_seqs)
    return sizes


def graph_unsafe_reason(model: nn.Module) -> str | None:
    """Why this model's forward cannot be captured, or None. A length-dependent rope reads the largest
    position back to the host every step (a device sync, which capture forbids); multi-latent
    attention forced onto its PyTorch path loops over the step's sequence lengths on the host (a
    graph would replay the captured lengths)."""
    for name, module in model.named_modules():
        if isinstance(module, LengthDependentRotaryEmbedding):
            return f"{name} ({module.rope_type} rope) reads positions on the host"
        if isinstance(module, MultiLatentAttention) and reference_forced():
            return f"{name} (multi-latent attention) loops over sequence lengths on the host"
    return None


class DecodeGraphs:
    """Captured decode forwards of `model` over `kv_caches`, one per batch size, sharing a memory pool."""

    def __init__(
        self,
        model: nn.Module,
        kv_caches: list[KVCache],
        sizes: Sequence[int],
        max_context_len: int,
        block_size: int,
        device: torch.device,
    ) -> None:
        if not sizes:
            raise ValueError("no batch sizes to capture")
        self.model = model
        self.kv_caches = kv_caches
        self.sizes = sorted(sizes)
        self.max_batch = self.sizes[-1]
        self.max_context_len = max_context_len
        self.block_size = block_size
        self.max_blocks = -(-max_context_len // block_size)
        self.device = device
        batch = self.max_batch
        self.input_ids = torch.zeros(batch, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((batch,), -1, dtype=torch.long, device=device)
        self.context_lens = torch.ones(batch, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(batch, self.max_blocks, dtype=torch.int32, device=device)
        # One token per sequence, padding included: the starts never change.
        self.query_start_loc = torch.arange(batch + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    def _metadata(self, batch: int) -> InputMetadata:
        """The metadata the graph of `batch` is captured with: views of the static buffers."""
        return InputMetadata(
            query_start_loc=self.query_start_loc[: batch + 1],
            context_lens=self.context_lens[:batch],
            block_tables=self.block_tables[:batch],
            slot_mapping=self.slot_mapping[:batch],
            max_query_len=1,
            max_context_len=self.max_context_len,
            block_size=self.block_size,
            query_lens_host=(1,) * batch,
            # The real lengths change every replay; the fast path never reads this host copy.
            context_lens_host=(self.max_context_len,) * batch,
        )

    def _forward(self, batch: int) -> torch.Tensor:
        return self.model(
            self.input_ids[:batch], self.positions[:batch], self.kv_caches, self._metadata(batch)
        )

    @torch.inference_mode()
    def capture(self) -> None:
        """Captures every size, largest first so the smaller graphs fit in the pool the largest made."""
        start = time.perf_counter()
        pool = None
        for batch in reversed(self.sizes):
            # One eager run first: lazy work (kernel builds, cuBLAS handles, NCCL setup) must not
            # happen inside the capture.
            self._forward(batch)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[batch] = self._forward(batch)
            if pool is None:
                pool = graph.pool()
            self.graphs[batch] = graph
        torch.cuda.synchronize(self.device)
        logger.info(
            "captured decode CUDA graphs for batch sizes %s in %.1f s",
            self.sizes,
            time.perf_counter() - start,
        )

    def can_run(self, metadata: InputMetadata) -> bool:
        """Whether a captured graph covers this step: decode only, few enough sequences, short enough."""
        return (
            metadata.is_decode_only
            and 0 < metadata.num_seqs <= self.max_batch
            and metadata.num_tokens == metadata.num_seqs
            and metadata.max_context_len <= self.max_context_len
            and metadata.block_tables.shape[1] <= self.max_blocks
        )

    def replay(
        self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: InputMetadata
    ) -> torch.Tensor:
        """Copies the step into the static buffers, replays the smallest graph that holds it, and
        returns the hidden states of its `num_seqs` real rows (a view into the graph's output)."""
        num_seqs = metadata.num_seqs
        batch = next(size for size in self.sizes if size >= num_seqs)
        width = metadata.block_tables.shape[1]
        self.input_ids[:num_seqs].copy_(input_ids, non_blocking=True)
        self.positions[:num_seqs].copy_(positions, non_blocking=True)
        self.slot_mapping[:num_seqs].copy_(metadata.slot_mapping, non_blocking=True)
        self.context_lens[:num_seqs].copy_(metadata.context_lens, non_blocking=True)
        # Columns past `width` keep older block ids: the kernel reads only up to each context length.
        self.block_tables[:num_seqs, :width].copy_(metadata.block_tables, non_blocking=True)
        if batch > num_seqs:
            # Padding rows: write nothing, attend to one token of a block an earlier row held.
            self.slot_mapping[num_seqs:batch].fill_(-1)
            self.context_lens[num_seqs:batch].fill_(1)
        self.graphs[batch].replay()
        return self.outputs[batch][:num_seqs]
