"""BlockManager: allocation, reference counts, prefix-cache hits, eviction and pressure."""

from __future__ import annotations

import random

import pytest

from engine.block_manager import BlockManager, hash_block_tokens
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence

BLOCK = 4


def make_seq(seq_id: int, tokens: list[int]) -> Sequence:
    return Sequence(seq_id, tokens, SamplingParams())


def admit_and_compute(manager: BlockManager, seq: Sequence) -> None:
    """Admits `seq` and marks its whole uncached part computed, as one prefill step would."""
    cached = manager.num_cached_prefix_tokens(seq)
    manager.allocate(seq, seq.num_tokens - cached)
    manager.mark_computed(seq, seq.num_tokens - seq.num_computed_tokens)


def check_invariants(manager: BlockManager, live: list[Sequence]) -> None:
    """Reference counts equal table occurrences; the free list holds exactly the unreferenced blocks."""
    references = [0] * manager.num_blocks
    for seq in live:
        for block_id in seq.block_table:
            references[block_id] += 1
    assert [block.ref_count for block in manager.blocks] == references
    assert sorted(manager._free) == [i for i, count in enumerate(references) if count == 0]
    for content_hash, block_id in manager._cached.items():
        assert manager.blocks[block_id].content_hash == content_hash


def test_hash_is_stable_chained_and_content_sensitive():
    first = hash_block_tokens(None, [1, 2, 3, 4])
    assert first == hash_block_tokens(None, (1, 2, 3, 4))
    assert first != hash_block_tokens(None, [1, 2, 3, 5])
    assert hash_block_tokens(first, [5, 6, 7, 8]) != hash_block_tokens(None, [5, 6, 7, 8])
    # Fixed across processes and machines (not Python's salted hash).
    assert first == 0xCC633E22FB2A78DBC84DE6072A52BF0F


def test_allocate_append_and_free_track_blocks_and_refcounts():
    manager = BlockManager(num_blocks=8, block_size=BLOCK)
    seq = make_seq(0, list(range(10)))
    assert manager.can_allocate(seq, 10)
    manager.allocate(seq, 10)
    assert len(seq.block_table) == 3 and manager.num_free_blocks == 5
    assert seq.num_cached_tokens == 0 and seq.num_computed_tokens == 0
    manager.mark_computed(seq, 10)
    seq.append_token(99)
    manager.append_slots(seq, 1)  # token 10 still fits in block 2
    assert len(seq.block_table) == 3
    manager.mark_computed(seq, 1)
    for _ in range(2):
        seq.append_token(99)
        manager.append_slots(seq, 1)
        manager.mark_computed(seq, 1)
    assert len(seq.block_table) == 4 and seq.num_computed_tokens == 13
    check_invariants(manager, [seq])
    manager.free(seq)
    assert seq.block_table == [] and manager.num_free_blocks == 8
    check_invariants(manager, [])


def test_second_sequence_with_the_same_prefix_shares_its_full_blocks():
    manager = BlockManager(num_blocks=16, block_size=BLOCK)
    first = make_seq(0, list(range(10)))  # blocks [0-3] [4-7] full, [8-9] partial
    admit_and_compute(manager, first)
    second = make_seq(1, list(range(8)) + [50, 51, 52])
    assert manager.num_cached_prefix_tokens(second) == 8
    manager.allocate(second, 3)
    assert second.num_cached_tokens == 8 and second.num_computed_tokens == 8
    assert second.block_table[:2] == first.block_table[:2]
    assert second.block_table[2] != first.block_table[2]
    assert [manager.blocks[b].ref_count for b in second.block_table] == [2, 2, 1]
    check_invariants(manager, [first, second])


def test_a_hit_never_covers_the_last_token():
    manager = BlockManager(num_blocks=16, block_size=BLOCK)
    admit_and_compute(manager, make_seq(0, list(range(8))))
    same = make_seq(1, list(range(8)))  # two full blocks, both cached: only the first may be reused
    assert manager.num_cached_prefix_tokens(same) == 4
    manager.allocate(same, 4)
    assert same.num_computed_tokens == 4 and len(same.block_table) == 2


def test_a_block_with_the_same_tokens_after_a_different_prefix_is_not_a_hit():
    manager = BlockManager(num_blocks=16, block_size=BLOCK)
    admit_and_compute(manager, make_seq(0, [1, 2, 3, 4, 5, 6, 7, 8, 9]))
    other = make_seq(1, [0, 2, 3, 4, 5, 6, 7, 8, 9])  # second block equal, first not
    assert manager.num_cached_prefix_tokens(other) == 0


def test_only_computed_full_blocks_are_cached():
    manager = BlockManager(num_blocks=16, block_size=BLOCK)
    seq = make_seq(0, list(range(12)))
    manager.allocate(seq, 12)
    manager.mark_computed(seq, 6)  # chunk: block 0 full, block 1 half computed
    assert manager.num_cached_blocks == 1
    assert manager.num_cached_prefix_tokens(make_seq(1, list(range(12)))) == 4
    manager.mark_computed(seq, 6)
    assert manager.num_cached_blocks == 3


def test_freed_blocks_stay_hittable_until_handed_out_again():
    manager = BlockManager(num_blocks=4, block_size=BLOCK)
    first = make_seq(0, list(range(9)))
    admit_and_compute(manager, first)
    cached_blocks = first.block_table[:2]
    manager.free(first)
    assert manager.num_free_blocks == 4 and manager.num_cached_blocks == 2
    again = make_seq(1, list(range(9)))
    manager.allocate(again, 1)
    assert again.num_cached_tokens == 8 and again.block_table[:2] == cached_blocks
    assert manager.num_free_blocks == 1
    check_invariants(manager, [again])


def test_uncached_blocks_are_handed_out_before_cached_ones_and_tails_before_heads():
    manager = BlockManager(num_blocks=4, block_size=BLOCK)
    cached = make_seq(0, list(range(9)))  # two full cached blocks + one partial (uncached)
    admit_and_compute(manager, cached)
    head, tail, partial = cached.block_table
    manager.free(cached)
    taker = make_seq(1, [100 + i for i in range(8)])
    manager.allocate(taker, 8)  # needs two blocks: the never-used one, then the partial one
    assert partial in taker.block_table and head not in taker.block_table and tail not in taker.block_table
    assert manager.num_cached_blocks == 2
    more = make_seq(2, [200 + i for i in range(4)])
    manager.allocate(more, 4)  # must now evict a cached block: the tail goes first
    assert more.block_table == [tail]
    assert manager.num_cached_blocks == 1
    # The head alone is still a hit; the evicted tail is not.
    assert manager.num_cached_prefix_tokens(make_seq(3, list(range(9)))) == 4
    check_invariants(manager, [taker, more])


def test_evicted_hash_no_longer_hits_after_the_block_is_reused():
    manager = BlockManager(num_blocks=2, block_size=BLOCK)
    admit_and_compute(manager, first := make_seq(0, list(range(5))))
    manager.free(first)
    filler = make_seq(1, [70 + i for i in range(8)])
    manager.allocate(filler, 8)  # takes both blocks, evicting the cached one
    assert manager.num_cached_blocks == 0
    manager.free(filler)
    assert manager.num_cached_prefix_tokens(make_seq(2, list(range(5)))) == 0


def test_allocation_under_pressure_is_refused_not_overcommitted():
    manager = BlockManager(num_blocks=3, block_size=BLOCK)
    big = make_seq(0, list(range(10)))
    manager.allocate(big, 10)
    assert manager.num_free_blocks == 0
    small = make_seq(1, [1])
    assert not manager.can_allocate(small, 1)
    with pytest.raises(RuntimeError):
        manager.allocate(small, 1)
    manager.mark_computed(big, 10)
    big.append_token(5)
    big.append_token(6)
    assert manager.can_append(big, 2)  # slots 10 and 11 are in block 2
    assert not manager.can_append(big, 3)
    assert manager.num_appendable_tokens(big) == 2
    with pytest.raises(RuntimeError):
        manager.append_slots(big, 3)
    check_invariants(manager, [big])


def test_a_hit_on_a_free_block_counts_against_the_free_blocks():
    manager = BlockManager(num_blocks=3, block_size=BLOCK)
    admit_and_compute(manager, first := make_seq(0, list(range(9))))
    manager.free(first)
    # 2 cached free blocks + 1 other: the hit takes 2 of the 3 free blocks, so 1 more fits, 2 do not.
    again = make_seq(1, list(range(9)))
    assert manager.can_allocate(again, 4)
    assert not manager.can_allocate(again, 5)


def test_two_sequences_computing_the_same_content_register_it_once():
    manager = BlockManager(num_blocks=8, block_size=BLOCK)
    first, second = make_seq(0, list(range(6))), make_seq(1, list(range(6)))
    manager.allocate(first, 6)
    manager.allocate(second, 6)  # admitted before first computed anything: no hit
    assert second.num_cached_tokens == 0
    manager.mark_computed(first, 6)
    manager.mark_computed(second, 6)
    assert manager.num_cached_blocks == 1
    manager.free(first)
    manager.free(second)
    third = make_seq(2, list(range(6)))
    manager.allocate(third, 2)
    first_table = [b for b, block in enumerate(manager.blocks) if block.content_hash is not None]
    assert third.num_cached_tokens == 4 and third.block_table[:1] == first_table
    check_invariants(manager, [third])


def test_prefix_caching_can_be_turned_off():
    manager = BlockManager(num_blocks=8, block_size=BLOCK, enable_prefix_caching=False)
    admit_and_compute(manager, make_seq(0, list(range(9))))
    assert manager.num_cached_blocks == 0
    assert manager.num_cached_prefix_tokens(make_seq(1, list(range(9)))) == 0


def test_random_workload_keeps_invariants_and_hits_serve_the_right_content():
    """Random admits, chunked computes, appends and frees over shared prefixes. A simulated cache
    records which tokens each block holds; every prefix hit must point at exactly those tokens."""
    rng = random.Random(0)
    manager = BlockManager(num_blocks=24, block_size=BLOCK)
    written: dict[int, list[int | None]] = {b: [None] * BLOCK for b in range(24)}
    prefixes = [[rng.randrange(5) for _ in range(rng.randrange(1, 14))] for _ in range(4)]
    live: list[Sequence] = []
    total_hits = 0
    for step in range(600):
        action = rng.random()
        if action < 0.35:
            tokens = rng.choice(prefixes) + [rng.randrange(5) for _ in range(rng.randrange(1, 6))]
            seq = make_seq(step, tokens)
            cached = manager.num_cached_prefix_tokens(seq)
            chunk = rng.randrange(1, seq.num_tokens - cached + 1)
            if manager.can_allocate(seq, chunk):
                manager.allocate(seq, chunk)
                total_hits += seq.num_cached_tokens > 0
                for index in range(seq.num_computed_tokens):  # the hit's content must be ours
                    block, offset = divmod(index, BLOCK)
                    assert written[seq.block_table[block]][offset] == seq.token_ids[index]
                live.append(seq)
        elif action < 0.8 and live:
            seq = rng.choice(live)
            if seq.num_uncomputed_tokens == 0:
                seq.append_token(rng.randrange(5))
            chunk = rng.randrange(1, seq.num_uncomputed_tokens + 1)
            if manager.can_append(seq, chunk):
                manager.append_slots(seq, chunk)
                for index in range(seq.num_computed_tokens, seq.num_computed_tokens + chunk):
                    block, offset = divmod(index, BLOCK)
                    # Never write into a block another sequence still reads.
                    assert manager.blocks[seq.block_table[block]].ref_count == 1
                    written[seq.block_table[block]][offset] = seq.token_ids[index]
                manager.mark_computed(seq, chunk)
        elif live:
            seq = live.pop(rng.randrange(len(live)))
            manager.free(seq)
        check_invariants(manager, live)
    assert total_hits > 20
