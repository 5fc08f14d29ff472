"""What one forward step needs to know about the sequences its flattened tokens belong to.

A step runs `num_tokens` tokens drawn from `num_seqs` sequences, laid end to end (no batch or padding
dimension). Sequence `i` contributes `query_lens[i]` new tokens, which occupy
`query_start_loc[i] : query_start_loc[i + 1]` of the flattened batch, and after the step its KV cache
holds `context_lens[i]` tokens: the `context_lens[i] - query_lens[i]` it had before plus the new ones.
A prefill chunk, a whole prompt, a prefix-cache hit and a decode token are all the same thing seen
this way, so one step may mix them.

New token `j` of sequence `i` sits at KV index `context_lens[i] - query_lens[i] + j` and attends,
causally, to KV indices `0 ..= that index`. Its key and value are written to
`slot_mapping[query_start_loc[i] + j]`, a flat slot `block * block_size + offset` into the cache;
a slot of -1 is not written (padding tokens of a captured CUDA graph).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from engine.host_copy import to_device


@dataclass(slots=True)
class InputMetadata:
    query_start_loc: torch.Tensor  # int32 [num_seqs + 1], cumulative starts of each sequence's new tokens
    context_lens: torch.Tensor  # int32 [num_seqs], KV tokens of each sequence once this step is written
    block_tables: torch.Tensor  # int32 [num_seqs, max_blocks], padded with 0 past a sequence's last block
    slot_mapping: torch.Tensor  # int64 [num_tokens], where each new token's K/V go; -1 = skip
    max_query_len: int
    max_context_len: int
    block_size: int
    # Host copies: the reference path and the schedulers read these without a device sync.
    query_lens_host: tuple[int, ...]
    context_lens_host: tuple[int, ...]

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens_host)

    @property
    def num_tokens(self) -> int:
        return int(self.slot_mapping.shape[0])

    @property
    def is_decode_only(self) -> bool:
        """Every sequence adds exactly one token: the decode kernel applies."""
        return self.max_query_len == 1

    @property
    def logits_indices(self) -> torch.Tensor:
        """Index of each sequence's last new token in the flattened batch: where its logits come from."""
        return (self.query_start_loc[1:] - 1).long()

    @classmethod
    def build(
        cls,
        query_lens: Sequence[int],
        context_lens: Sequence[int],
        block_tables: Sequence[Sequence[int]],
        block_size: int,
        device: torch.device | str = "cpu",
    ) -> InputMetadata:
        """Builds the metadata from per-sequence host lists (what the scheduler and `porter verify` have)."""
        if not (len(query_lens) == len(context_lens) == len(block_tables)):
            raise ValueError(
                f"query_lens, context_lens and block_tables differ in length: "
                f"{len(query_lens)}, {len(context_lens)}, {len(block_tables)}"
            )
        for query_len, context_len, table in zip(query_lens, context_lens, block_tables):
            if not 0 < query_len <= context_len:
                raise ValueError(f"need 0 < query_len <= context_len, got {query_len} and {context_len}")
            if len(table) * block_size < context_len:
                raise ValueError(
                    f"a block table of {len(table)} blocks of {block_size} cannot hold {context_len} tokens"
                )
        return cls.from_arrays(
            np.asarray(query_lens, dtype=np.int64).reshape(-1),
            np.asarray(context_lens, dtype=np.int64).reshape(-1),
            pad_block_tables(block_tables),
            block_size,
            device,
        )

    @classmethod
    def from_arrays(
        cls,
        query_lens: np.ndarray,
        context_lens: np.ndarray,
        block_tables: np.ndarray,
        block_size: int,
        device: torch.device | str = "cpu",
    ) -> InputMetadata:
        """`build` from numpy arrays, with no per-token or per-block Python loop.

        `query_lens`, `context_lens`: integers `[num_seqs]`; `block_tables`: `[num_seqs, max_blocks]`,
        rows padded with 0 (a width that holds the longest context is all that is checked here).
        The int32 fields travel to `device` in one copy, the slot mapping in a second.
        """
        query = np.asarray(query_lens, dtype=np.int64)
        context = np.asarray(context_lens, dtype=np.int64)
        tables = np.asarray(block_tables, dtype=np.int32)
        num_seqs = len(query)
        if len(context) != num_seqs or tables.ndim != 2 or tables.shape[0] != num_seqs:
            raise ValueError(
                f"query_lens {query.shape}, context_lens {context.shape} and block_tables "
                f"{tables.shape} do not describe the same sequences"
            )
        if num_seqs and ((query <= 0).any() or (query > context).any()):
            bad = int(np.flatnonzero((query <= 0) | (query > context))[0])
            raise ValueError(f"need 0 < query_len <= context_len, got {query[bad]} and {context[bad]}")
        if num_seqs and int(context.max()) > tables.shape[1] * block_size:
            raise ValueError(
                f"a block table of {tables.shape[1]} blocks of {block_size} cannot hold "
                f"{int(context.max())} tokens"
            )
        starts = np.zeros(num_seqs + 1, dtype=np.int64)
        np.cumsum(query, out=starts[1:])
        num_tokens = int(starts[-1])
        if num_tokens == num_seqs:  # decode only: each sequence's one new token is its last
            rows = np.arange(num_seqs)
            kv_index = context - 1
        else:
            # Token t of sequence i sits at KV index (context_i - query_i) + (t - start_i).
            rows = np.repeat(np.arange(num_seqs), query)
            kv_index = np.arange(num_tokens) + np.repeat(context - query - starts[:-1], query)
        slots = tables[rows, kv_index // block_size].astype(np.int64) * block_size + kv_index % block_size
        packed, offsets = pack_aligned(
            [starts.astype(np.int32), context.astype(np.int32), tables.reshape(-1)]
        )
        on_device = to_device(torch.from_numpy(packed), device)
        return cls(
            query_start_loc=on_device[offsets[0] : offsets[0] + num_seqs + 1],
            context_lens=on_device[offsets[1] : offsets[1] + num_seqs],
            block_tables=on_device[offsets[2] : offsets[2] + tables.size].view(tables.shape),
            slot_mapping=to_device(torch.from_numpy(slots), device),
            max_query_len=int(query.max()) if num_seqs else 0,
            max_context_len=int(context.max()) if num_seqs else 0,
            block_size=block_size,
            query_lens_host=tuple(query.tolist()),
            context_lens_host=tuple(context.tolist()),
        )


# Each field of a packed copy starts on this many bytes: Triton specialises a kernel on whether a
# pointer is 16-byte aligned, so a field whose alignment followed the batch size would recompile
# kernels mid-run (and misaligned rows cannot be read as vectors).
PACK_ALIGNMENT_BYTES = 16


def pack_aligned(arrays: Sequence[np.ndarray]) -> tuple[np.ndarray, list[int]]:
    """One flat array holding `arrays` (one dtype) back to back, each starting 16-byte aligned;
    returns it and each array's element offset into it."""
    step = max(1, PACK_ALIGNMENT_BYTES // arrays[0].dtype.itemsize)
    offsets, total = [], 0
    for array in arrays:
        offsets.append(total)
        total += -(-array.size // step) * step
    packed = np.zeros(total, dtype=arrays[0].dtype)
    for offset, array in zip(offsets, arrays):
        packed[offset : offset + array.size] = array.reshape(-1)
    return packed, offsets


def pad_block_tables(block_tables: Sequence[Sequence[int]]) -> np.ndarray:
    """Per-sequence block lists as one int32 array `[num_seqs, longest]`, padded with 0."""
    lengths = np.fromiter(map(len, block_tables), dtype=np.int64, count=len(block_tables))
    width = int(lengths.max()) if len(lengths) else 0
    padded = np.zeros((len(block_tables), width), dtype=np.int32)
    flat = np.fromiter(itertools.chain.from_iterable(block_tables), dtype=np.int32, count=int(lengths.sum()))
    padded[np.arange(width) < lengths[:, None]] = flat
    return padded
