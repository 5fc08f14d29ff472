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

from collections.abc import Sequence
from dataclasses import dataclass

import torch


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
        slots: list[int] = []
        for query_len, context_len, table in zip(query_lens, context_lens, block_tables):
            if not 0 < query_len <= context_len:
                raise ValueError(f"need 0 < query_len <= context_len, got {query_len} and {context_len}")
            if len(table) * block_size < context_len:
                raise ValueError(
                    f"a block table of {len(table)} blocks of {block_size} cannot hold {context_len} tokens"
                )
            for index in range(context_len - query_len, context_len):
                slots.append(table[index // block_size] * block_size + index % block_size)
        starts = [0]
        for query_len in query_lens:
            starts.append(starts[-1] + query_len)
        max_blocks = max((len(t) for t in block_tables), default=0)
        padded = [list(t) + [0] * (max_blocks - len(t)) for t in block_tables]
        return cls(
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
            context_lens=torch.tensor(list(context_lens), dtype=torch.int32, device=device),
            block_tables=torch.tensor(padded, dtype=torch.int32, device=device).reshape(len(padded), max_blocks),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            max_query_len=max(query_lens, default=0),
            max_context_len=max(context_lens, default=0),
            block_size=block_size,
            query_lens_host=tuple(query_lens),
            context_lens_host=tuple(context_lens),
        )
