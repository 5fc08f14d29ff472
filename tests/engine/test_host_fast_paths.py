"""The host fast paths of a step give exactly what the plain per-token / per-block code gives.

`InputMetadata.from_arrays` against `InputMetadata.build` and a per-token reference; the block
manager's int32 block-table rows against the lists; the scheduler's decode fast path, its
`block_table_array` snapshot and flattened inputs against the generic forms, over random workloads
with chunked prefill, prefix hits and preemption.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from engine.block_manager import BlockManager
from engine.input_metadata import InputMetadata, pad_block_tables
from engine.model_runner import StepInputs, prepare_step_tensors
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence


def reference_slots(query_lens, context_lens, block_tables, block_size) -> list[int]:
    return [
        table[index // block_size] * block_size + index % block_size
        for q, c, table in zip(query_lens, context_lens, block_tables)
        for index in range(c - q, c)
    ]


def random_batch(rng: random.Random, block_size: int, decode_only: bool):
    num_seqs = rng.randint(1, 12)
    query_lens, context_lens, tables = [], [], []
    next_block = 0
    for _ in range(num_seqs):
        context = rng.randint(1, 90)
        query = 1 if decode_only else rng.randint(1, context)
        blocks = -(-context // block_size) + rng.randint(0, 2)  # tables may be longer than needed
        tables.append(rng.sample(range(next_block, next_block + 4 * blocks), blocks))
        next_block += 4 * blocks
        query_lens.append(query)
        context_lens.append(context)
    return query_lens, context_lens, tables


def assert_same_metadata(a: InputMetadata, b: InputMetadata) -> None:
    for name in ("query_start_loc", "context_lens", "block_tables", "slot_mapping"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y), name
    for name in ("max_query_len", "max_context_len", "block_size", "query_lens_host", "context_lens_host"):
        assert getattr(a, name) == getattr(b, name), name


@pytest.mark.parametrize("decode_only", [False, True])
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_from_arrays_equals_build_and_reference(decode_only: bool, block_size: int) -> None:
    rng = random.Random(block_size * 2 + decode_only)
    for _ in range(30):
        query_lens, context_lens, tables = random_batch(rng, block_size, decode_only)
        built = InputMetadata.build(query_lens, context_lens, tables, block_size)
        fast = InputMetadata.from_arrays(
            np.array(query_lens), np.array(context_lens), pad_block_tables(tables), block_size
        )
        assert_same_metadata(built, fast)
        assert built.slot_mapping.tolist() == reference_slots(query_lens, context_lens, tables, block_size)
        starts = np.concatenate([[0], np.cumsum(query_lens)]).tolist()
        assert built.query_start_loc.tolist() == starts
        width = max(len(t) for t in tables)
        assert built.block_tables.tolist() == [t + [0] * (width - len(t)) for t in tables]
        assert built.query_start_loc.dtype == torch.int32 and built.slot_mapping.dtype == torch.int64


def test_build_empty_and_invalid() -> None:
    empty = InputMetadata.build([], [], [], 16)
    assert empty.num_seqs == 0 and empty.num_tokens == 0 and tuple(empty.block_tables.shape) == (0, 0)
    with pytest.raises(ValueError, match="query_len"):
        InputMetadata.build([3], [2], [[0]], 16)
    with pytest.raises(ValueError, match="cannot hold"):
        InputMetadata.build([1, 1], [3, 40], [[3], [0, 1]], 16)  # first row is fine, second is not
    with pytest.raises(ValueError, match="cannot hold"):
        InputMetadata.from_arrays(np.array([1]), np.array([33]), np.zeros((1, 2), np.int32), 16)
    with pytest.raises(ValueError, match="same sequences"):
        InputMetadata.from_arrays(np.array([1, 1]), np.array([3]), np.zeros((2, 1), np.int32), 16)


def test_prepare_step_tensors_same_with_or_without_array() -> None:
    rng = random.Random(7)
    for _ in range(10):
        query_lens, context_lens, tables = random_batch(rng, 4, decode_only=False)
        num_tokens = sum(query_lens)
        step = StepInputs(
            input_ids=[rng.randint(0, 999) for _ in range(num_tokens)],
            positions=[p for q, c in zip(query_lens, context_lens) for p in range(c - q, c)],
            query_lens=query_lens,
            context_lens=context_lens,
            block_tables=tables,
        )
        plain = prepare_step_tensors(step, 4, "cpu")
        step.block_table_array = pad_block_tables(tables)
        fast = prepare_step_tensors(step, 4, "cpu")
        assert plain[0].tolist() == fast[0].tolist() == step.input_ids
        assert plain[1].tolist() == fast[1].tolist() == step.positions
        assert_same_metadata(plain[2], fast[2])


def test_block_table_rows_follow_the_lists_through_growth_and_free() -> None:
    rng = random.Random(3)
    manager = BlockManager(num_blocks=40000, block_size=2, enable_prefix_caching=False)
    live: list[Sequence] = []
    for seq_id in range(400):  # more sequences than the initial 64 rows, tables wider than 64 blocks
        if live and rng.random() < 0.3:
            manager.free(live.pop(rng.randrange(len(live))))
        seq = Sequence(seq_id, [1] * rng.randint(1, 40), SamplingParams(max_tokens=300))
        manager.allocate(seq, seq.num_tokens)
        live.append(seq)
        for grower in rng.sample(live, min(5, len(live))):
            if grower.num_tokens > 200:
                continue
            grower.token_ids.extend([2] * rng.randint(1, 30))
            manager.append_slots(grower, grower.num_uncomputed_tokens)
        chosen = rng.sample(live, min(20, len(live)))
        array = manager.block_table_array(chosen)
        assert array.dtype == np.int32
        assert np.array_equal(array, pad_block_tables([s.block_table for s in chosen]))
    assert max(len(s.block_table) for s in live) > 64
    for seq in live:
        manager.free(seq)
    assert manager.table_rows.array.sum() == 0  # freed rows are zeroed for their next owner


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scheduler_fast_paths_match_generic_forms(seed: int) -> None:
    """A tight cache (preemptions), shared prefixes (prefix hits) and long prompts (chunks)."""
    rng = random.Random(seed)
    block_size = 4
    manager = BlockManager(num_blocks=20, block_size=block_size)
    scheduler = Scheduler(manager, max_num_seqs=6, max_num_batched_tokens=24, eos_token_id=0)
    shared = [rng.randint(1, 9) for _ in range(9)]
    for seq_id in range(14):
        prompt = (shared if seq_id % 2 else []) + [rng.randint(1, 9) for _ in range(rng.randint(1, 30))]
        scheduler.add(Sequence(seq_id, prompt, SamplingParams(max_tokens=rng.randint(1, 25))))
    preemptions = steps = 0
    while scheduler.has_unfinished():
        output = scheduler.schedule()
        preemptions += len(output.preempted)
        steps += 1
        scheduled = output.scheduled
        assert all(item.num_new_tokens == 1 for item in scheduled[: output.num_decodes])
        assert np.array_equal(output.block_table_array, pad_block_tables(output.block_tables()))
        assert output.input_token_ids() == [t for item in scheduled for t in item.token_ids]
        assert output.positions() == [p for item in scheduled for p in item.positions]
        for item in scheduled:  # the block table the fast path hands over covers the new tokens
            assert len(item.block_table) * block_size >= item.context_len
            assert item.block_table == item.seq.block_table
            assert item.samples_token == (item.context_len == item.seq.num_tokens)
        built = InputMetadata.build(output.query_lens(), output.context_lens(), output.block_tables(), 4)
        fast = InputMetadata.from_arrays(
            np.array(output.query_lens()), np.array(output.context_lens()), output.block_table_array, 4
        )
        assert_same_metadata(built, fast)
        scheduler.postprocess(output, [rng.randint(0, 9) for _ in scheduled])
    assert preemptions > 0 and steps > 10
    assert manager.num_free_blocks == manager.num_blocks


@pytest.mark.parametrize("num_seqs", [1, 2, 3, 5, 8])
def test_step_tensors_start_16_byte_aligned_whatever_the_batch(num_seqs: int) -> None:
    # Triton compiles a kernel variant per pointer alignment: a field whose alignment followed the
    # batch size made a run stall mid-way on a new compile.
    rng = random.Random(num_seqs)
    query_lens = [rng.randint(1, 5) for _ in range(num_seqs)]
    context_lens = [q + rng.randint(0, 9) for q in query_lens]
    tables = [list(range(i * 4, i * 4 + (c + 3) // 4)) for i, c in enumerate(context_lens)]
    num_tokens = sum(query_lens)
    step = StepInputs(
        input_ids=list(range(num_tokens)),
        positions=list(range(100, 100 + num_tokens)),
        query_lens=query_lens,
        context_lens=context_lens,
        block_tables=tables,
        block_table_array=pad_block_tables(tables),
    )
    input_ids, positions, metadata, pending = prepare_step_tensors(step, 4, "cpu")
    assert pending is None
    assert input_ids.tolist() == step.input_ids and positions.tolist() == step.positions
    fields = [positions, metadata.query_start_loc, metadata.context_lens, metadata.block_tables]
    for field in fields:
        base = field.untyped_storage().data_ptr()
        assert (field.data_ptr() - base) % 16 == 0
    assert metadata.query_start_loc.tolist() == np.cumsum([0, *query_lens]).tolist()
    assert metadata.context_lens.tolist() == context_lens
