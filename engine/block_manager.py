"""Hands out fixed-size KV-cache blocks to sequences, shares computed prefixes, and takes them back.

Prefix caching: a block that is full of computed tokens is registered under a content hash chained
with the previous block's hash, so a hash names a whole prefix, not just one block's tokens. A new
sequence whose leading full blocks hash the same reuses those blocks (reference count + 1) instead of
recomputing them. A freed block keeps its hash while it sits in the free list, so a later request can
still hit it; the hash is dropped only when the block is handed out again. Only full, computed blocks
are ever shared, and a sequence only writes K/V past its computed tokens, so a shared block is never
written and needs no copy-on-write.

Free-list order decides what is evicted first: blocks that hold no cached prefix, then cached blocks
least recently freed first, each sequence's blocks queued tail first (its tail is the least likely to
be someone's prefix, and a chain is useless once its head is gone).
"""

from __future__ import annotations

import hashlib
import itertools
import struct
from collections import OrderedDict
from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass

import numpy as np

from engine.sequence import Sequence


def hash_block_tokens(previous_hash: int | None, token_ids: SequenceOf[int]) -> int:
    """A stable 128-bit hash of one block's tokens chained with the previous block's hash.

    blake2b over fixed-width bytes: the same on every run and machine (Python's `hash` of a str is
    salted per process, and a collision here would silently serve another prompt's K/V).
    """
    digest = hashlib.blake2b(digest_size=16)
    digest.update(b"\x00" if previous_hash is None else b"\x01" + previous_hash.to_bytes(16, "little"))
    digest.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    return int.from_bytes(digest.digest(), "little")


class BlockTableRows:
    """An int32 mirror of the running sequences' block tables, one row per sequence, padded with 0.

    A step needs every scheduled sequence's table as one padded array; rebuilding that from the lists
    costs a Python pass over every block id each step. Here a table is written once, block by block as
    it grows, and a step's array is one gather of rows. The lists stay the source of truth: a row
    whose recorded length differs from its list's is rewritten from the list before it is read.
    """

    def __init__(self, num_rows: int = 64, width: int = 64) -> None:
        self.array = np.zeros((num_rows, width), dtype=np.int32)
        self.lengths: list[int] = [0] * num_rows  # blocks written into each row
        self._free_rows = list(range(num_rows - 1, -1, -1))  # popped from the end: row 0 first

    def sync(self, seq: Sequence) -> int:
        """Brings `seq`'s row up to date with `seq.block_table` (taking a row if it has none); returns it."""
        row = seq.block_table_row
        if row < 0:
            if not self._free_rows:
                self._grow(rows=2 * self.array.shape[0])
            row = seq.block_table_row = self._free_rows.pop()
        table, written = seq.block_table, self.lengths[row]
        if len(table) > self.array.shape[1]:
            self._grow(width=max(2 * self.array.shape[1], len(table)))
        if len(table) < written:  # shrunk outside the manager: rewrite the row
            self.array[row, :written] = 0
            written = 0
        if len(table) > written:
            self.array[row, written : len(table)] = table[written:]
        self.lengths[row] = len(table)
        return row

    def release(self, seq: Sequence) -> None:
        """Zeroes `seq`'s row and gives it back."""
        row = seq.block_table_row
        if row < 0:
            return
        self.array[row, : self.lengths[row]] = 0
        self.lengths[row] = 0
        self._free_rows.append(row)
        seq.block_table_row = -1

    def gather(self, seqs: SequenceOf[Sequence]) -> np.ndarray:
        """The tables of `seqs` as a new int32 array `[len(seqs), longest table]`, padded with 0."""
        rows: list[int] = []
        width = 0
        lengths = self.lengths
        for seq in seqs:
            row, length = seq.block_table_row, len(seq.block_table)
            if row < 0 or lengths[row] != length:
                row = self.sync(seq)
            rows.append(row)
            if length > width:
                width = length
        return self.array[rows, :width]

    def _grow(self, rows: int | None = None, width: int | None = None) -> None:
        old_rows, old_width = self.array.shape
        rows, width = rows or old_rows, width or old_width
        grown = np.zeros((rows, width), dtype=np.int32)
        grown[:old_rows, :old_width] = self.array
        self.array = grown
        if rows > old_rows:
            self.lengths.extend([0] * (rows - old_rows))
            self._free_rows[:0] = range(rows - 1, old_rows - 1, -1)


@dataclass(slots=True, eq=False)
class Block:
    block_id: int
    ref_count: int = 0
    content_hash: int | None = None  # set while the block is registered in the prefix cache


class BlockManager:
    """Fixed-size blocks with reference counts, a free list and a prefix cache of full blocks.

    The calls a scheduler makes, per sequence: `can_allocate`/`allocate` on admission (takes the cached
    prefix plus blocks for the first chunk), `can_append`/`append_slots` before each later step,
    `mark_computed` after a step wrote the K/V, and `free` on finish or preemption.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks} and {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(block_id) for block_id in range(num_blocks)]
        # Front = handed out next. An OrderedDict gives O(1) removal of a cache hit from the middle.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[int, int] = {}  # content hash -> block id
        self.table_rows = BlockTableRows()

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks registered in the prefix cache, in use or free."""
        return len(self._cached)

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_cached_prefix_tokens(self, seq: Sequence) -> int:
        """How many leading tokens of a waiting `seq` a prefix-cache hit would cover (no side effects)."""
        return len(self._prefix_hits(seq)) * self.block_size

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Whether `allocate(seq, num_new_tokens)` would find enough free blocks."""
        hits = self._prefix_hits(seq)
        needed = self.num_blocks_for(len(hits) * self.block_size + num_new_tokens) - len(hits)
        # A hit on a free block takes it out of the free list, so it is not there for the new ones.
        free_hits = sum(1 for block_id in hits if self.blocks[block_id].ref_count == 0)
        return needed <= len(self._free) - free_hits

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Admits `seq`: reuses its cached full prefix blocks, then adds blocks for `num_new_tokens` more.

        Sets `seq.num_cached_tokens` and `seq.num_computed_tokens` to the hit's length. The hit never
        covers the whole sequence: at least its last token is computed, so the step yields logits.
        """
        if seq.block_table:
            raise ValueError(f"sequence {seq.seq_id} already holds blocks {seq.block_table}")
        if not self.can_allocate(seq, num_new_tokens):
            raise RuntimeError(f"not enough free blocks to admit sequence {seq.seq_id}")
        hits = self._prefix_hits(seq)
        for block_id in hits:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self._free[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
        seq.num_cached_tokens = seq.num_computed_tokens = len(hits) * self.block_size
        self.append_slots(seq, num_new_tokens)

    def num_appendable_tokens(self, seq: Sequence) -> int:
        """How many tokens past its computed ones `seq` could be given slots for right now."""
        slots_in_table = len(seq.block_table) * self.block_size - seq.num_computed_tokens
        return slots_in_table + len(self._free) * self.block_size

    def can_append(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Whether `append_slots(seq, num_new_tokens)` would find enough free blocks."""
        return self._num_missing_blocks(seq, num_new_tokens) <= len(self._free)

    def append_slots(self, seq: Sequence, num_new_tokens: int) -> None:
        """Grows `seq`'s block table to hold its computed tokens plus `num_new_tokens` more."""
        missing = self._num_missing_blocks(seq, num_new_tokens)
        if missing > len(self._free):
            raise RuntimeError(
                f"sequence {seq.seq_id} needs {missing} more blocks, only {len(self._free)} are free"
            )
        for _ in range(missing):
            seq.block_table.append(self._take_free_block())
        self.table_rows.sync(seq)

    def block_table_array(self, seqs: SequenceOf[Sequence]) -> np.ndarray:
        """The block tables of `seqs` as one int32 array `[len(seqs), longest]` padded with 0 (a copy)."""
        return self.table_rows.gather(seqs)

    def mark_computed(self, seq: Sequence, num_new_tokens: int) -> None:
        """A step wrote K/V for `num_new_tokens` more tokens of `seq`: count them and cache full blocks."""
        before = seq.num_computed_tokens
        after = before + num_new_tokens
        if after > len(seq.block_table) * self.block_size or after > len(seq.token_ids):
            raise ValueError(
                f"sequence {seq.seq_id}: {after} computed tokens exceed its "
                f"{len(seq.block_table)} blocks or its {seq.num_tokens} tokens"
            )
        seq.num_computed_tokens = after
        if not self.enable_prefix_caching:
            return
        # A block whose tokens are not all known yet (one is still being sampled) is registered by
        # `register_block_of` when its last token arrives.
        first_new_full = before // self.block_size
        num_full = min(after, len(seq.token_ids) - seq.num_pending_tokens) // self.block_size
        if first_new_full < num_full:  # else no block filled up (most decode steps): nothing to register
            self._register_blocks(seq, first_new_full, num_full)

    def register_block_of(self, seq: Sequence, index: int) -> None:
        """Token `index` of `seq` has just become known: register its block if it is full and computed."""
        block = index // self.block_size
        if self.enable_prefix_caching and (block + 1) * self.block_size <= min(
            seq.num_computed_tokens, seq.num_known_tokens
        ):
            self._register_blocks(seq, block, block + 1)

    def _register_blocks(self, seq: Sequence, first_new_full: int, num_full: int) -> None:
        """Enters `seq`'s full, computed blocks `first_new_full .. num_full - 1` in the prefix cache."""
        hashes = self._block_hashes(seq, num_full)
        for index in range(first_new_full, num_full):
            block = self.blocks[seq.block_table[index]]
            if block.content_hash is not None:  # a prefix hit: already registered
                continue
            # Another sequence may have computed the same content meanwhile; keep the first one.
            if hashes[index] not in self._cached:
                block.content_hash = hashes[index]
                self._cached[hashes[index]] = block.block_id

    def free(self, seq: Sequence) -> None:
        """Releases `seq`'s blocks; unreferenced ones go to the free list, keeping any cached hash."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count < 0:
                raise RuntimeError(f"block {block_id} freed more often than it was taken")
            if block.ref_count == 0:
                self._free[block_id] = None
                if block.content_hash is None:
                    # Holds nothing worth keeping: hand it out before any cached block.
                    self._free.move_to_end(block_id, last=False)
        seq.block_table.clear()
        self.table_rows.release(seq)

    def _num_missing_blocks(self, seq: Sequence, num_new_tokens: int) -> int:
        needed = self.num_blocks_for(seq.num_computed_tokens + num_new_tokens)
        return max(0, needed - len(seq.block_table))

    def _take_free_block(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks[block_id]
        if block.ref_count != 0:
            raise RuntimeError(f"block {block_id} is in the free list with {block.ref_count} references")
        if block.content_hash is not None:  # evict: its old content is about to be overwritten
            if self._cached.get(block.content_hash) == block_id:
                del self._cached[block.content_hash]
            block.content_hash = None
        block.ref_count = 1
        return block_id

    def _prefix_hits(self, seq: Sequence) -> list[int]:
        """Block ids of the longest cached chain of `seq`'s leading full blocks, last token excluded."""
        if not self.enable_prefix_caching:
            return []
        max_blocks = (seq.num_tokens - 1) // self.block_size
        hits: list[int] = []
        for content_hash in itertools.islice(self._block_hashes(seq, max_blocks), max_blocks):
            block_id = self._cached.get(content_hash)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def _block_hashes(self, seq: Sequence, num_blocks: int) -> list[int]:
        """The chained hashes of `seq`'s full blocks, at least its first `num_blocks` (cached on `seq`)."""
        hashes = seq.block_hashes
        size = self.block_size
        while len(hashes) < num_blocks:
            index = len(hashes)
            previous = hashes[-1] if hashes else None
            hashes.append(hash_block_tokens(previous, seq.token_ids[index * size : (index + 1) * size]))
        return hashes
