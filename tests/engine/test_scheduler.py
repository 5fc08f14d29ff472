"""Scheduler: chunked prefill, budgets, FCFS, preemption by recompute, stop conditions, abort.

The end-to-end tests drive a fake model that keeps a simulated KV cache: each step it writes every new
token into its slot (through the step's block table) and reads the whole context back the same way.
It asserts the context it reads is exactly the sequence's tokens, so a wrong block table, a stale
prefix-cache hit or a lost token fails loudly, and it predicts the next token from that context.
"""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest

from engine.block_manager import BlockManager
from engine.input_metadata import InputMetadata
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerOutput
from engine.sequence import PENDING_TOKEN, Sequence, SequenceStatus

REPO_ROOT = Path(__file__).resolve().parents[2]
VOCAB = 50
EOS = 0


def next_token(context: list[int]) -> int:
    """A deterministic 'model': the next token is a function of the whole context."""
    value = len(context)
    for token in context:
        value = (value * 31 + token) % 1_000_003
    return value % VOCAB


class FakeModel:
    def __init__(self, num_blocks: int, block_size: int):
        self.block_size = block_size
        self.cache: list[tuple[int, int] | None] = [None] * (num_blocks * block_size)

    def _slot(self, block_table: list[int], position: int) -> int:
        return block_table[position // self.block_size] * self.block_size + position % self.block_size

    def step(self, output: SchedulerOutput, previous: dict[int, int] | None = None) -> list[int]:
        """Runs a step; `previous` maps sequence id -> the token the step before sampled for it, which
        a pending input row takes (as the engine does on the device)."""
        metadata = InputMetadata.build(
            output.query_lens(), output.context_lens(), output.block_tables(), self.block_size
        )
        pending_rows = set(output.pending_input_rows())
        expected_slots = []
        sampled = []
        for row, item in enumerate(output.scheduled):
            tokens = item.token_ids
            if row in pending_rows:
                assert tokens == [PENDING_TOKEN]
                tokens = [previous[item.seq.seq_id]]
            assert PENDING_TOKEN not in tokens
            for position, token in zip(item.positions, tokens):
                slot = self._slot(item.block_table, position)
                expected_slots.append(slot)
                self.cache[slot] = (token, position)
            context = [self.cache[self._slot(item.block_table, p)] for p in range(item.context_len)]
            known = item.seq.token_ids[: item.context_len]
            if row in pending_rows:
                known = known[:-1] + tokens
            assert context == [(t, p) for p, t in enumerate(known)]
            sampled.append(next_token([token for token, _ in context]) if item.samples_token else -1)
        assert metadata.slot_mapping.tolist() == expected_slots
        assert metadata.num_tokens == len(output.positions()) == len(output.input_token_ids())
        return sampled


def make_scheduler(num_blocks=64, block_size=4, max_num_seqs=8, budget=32, eos=EOS) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, block_size), max_num_seqs, budget, eos_token_id=eos)


def run_to_completion(
    scheduler: Scheduler,
    requests: list[Sequence],
    arrivals: dict[int, int] | None = None,
    model: FakeModel | None = None,
    overlap: bool = False,
) -> int:
    """Drives schedule -> fake model -> postprocess until every request finishes; checks each step.

    `overlap`: as the engine's asynchronous scheduling does, each step is scheduled and run before
    the previous step's tokens are recorded (`record_launch` now, `record_tokens` one step later)."""
    manager = scheduler.block_manager
    model = model or FakeModel(manager.num_blocks, manager.block_size)
    arrivals = arrivals or {}
    pending = sorted(requests, key=lambda seq: arrivals.get(seq.seq_id, 0))
    in_flight: tuple[SchedulerOutput, list[int]] | None = None
    step = 0
    while pending or scheduler.has_unfinished() or in_flight is not None:
        while pending and arrivals.get(pending[0].seq_id, 0) <= step:
            scheduler.add(pending.pop(0))
        output = scheduler.schedule()
        assert output.num_batched_tokens <= scheduler.max_num_batched_tokens
        assert len(output.scheduled) <= scheduler.max_num_seqs
        assert scheduler.num_running <= scheduler.max_num_seqs
        assert len({id(item.seq) for item in output.scheduled}) == len(output.scheduled)
        if output.is_empty and in_flight is None and scheduler.has_unfinished():
            assert pending, "no progress"
        if output.is_empty and in_flight is not None:
            scheduler.record_tokens(*in_flight)
            in_flight = None
        elif overlap:
            previous = (
                {}
                if in_flight is None
                else {item.seq.seq_id: token for item, token in zip(in_flight[0].scheduled, in_flight[1])}
            )
            sampled = model.step(output, previous)
            scheduler.record_launch(output)
            if in_flight is not None:
                scheduler.record_tokens(*in_flight)
            in_flight = (output, sampled)
        else:
            scheduler.postprocess(output, model.step(output))
        step += 1
        assert step < 10_000
    assert in_flight is None
    return step


def random_requests(rng: random.Random, count: int) -> list[Sequence]:
    shared = [[rng.randrange(1, VOCAB) for _ in range(rng.randrange(4, 20))] for _ in range(3)]
    requests = []
    for seq_id in range(count):
        prompt = rng.choice(shared) + [rng.randrange(1, VOCAB) for _ in range(rng.randrange(1, 30))]
        params = SamplingParams(max_tokens=rng.randrange(1, 30), ignore_eos=rng.random() < 0.3)
        requests.append(Sequence(seq_id, prompt, params))
    return requests


def test_engine_modules_import_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import engine.sampling_params, engine.sequence, engine.block_manager, engine.scheduler\n"
        "print('ok')"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_a_long_prompt_is_prefilled_in_chunks_then_decoded():
    scheduler = make_scheduler(num_blocks=16, block_size=16, budget=32)
    seq = Sequence(0, list(range(1, 101)), SamplingParams(max_tokens=3, ignore_eos=True))
    scheduler.add(seq)
    model = FakeModel(16, 16)
    for step, (query, context) in enumerate([(32, 32), (32, 64), (32, 96), (4, 100)]):
        output = scheduler.schedule()
        assert output.query_lens() == [query] and output.context_lens() == [context]
        assert output.positions() == list(range(context - query, context))
        assert output.input_token_ids() == seq.token_ids[context - query : context]
        assert len(output.block_tables()[0]) == -(-context // 16)
        assert output.sample_indices() == ([0] if step == 3 else [])
        scheduler.postprocess(output, model.step(output))
        assert seq.num_computed_tokens == context
        assert seq.num_output_tokens == (1 if step == 3 else 0)
    output = scheduler.schedule()
    assert output.query_lens() == [1] and output.context_lens() == [101] and output.positions() == [100]
    assert output.input_token_ids() == [seq.token_ids[100]]


def test_decodes_come_first_and_a_prefill_chunk_fills_the_rest_of_the_budget():
    scheduler = make_scheduler(budget=32, block_size=16)
    first = Sequence(0, [1, 2, 3], SamplingParams(max_tokens=10, ignore_eos=True))
    scheduler.add(first)
    scheduler.postprocess(output := scheduler.schedule(), [7] * len(output.scheduled))
    second = Sequence(1, list(range(1, 101)), SamplingParams())
    scheduler.add(second)
    output = scheduler.schedule()
    assert output.sequences == [first, second]
    assert output.query_lens() == [1, 31]
    assert output.sample_indices() == [0]


def test_token_budget_and_max_num_seqs_are_respected():
    scheduler = make_scheduler(num_blocks=200, max_num_seqs=3, budget=10)
    requests = [Sequence(i, [1 + i] * 7, SamplingParams(max_tokens=4, ignore_eos=True)) for i in range(6)]
    for seq in requests:
        scheduler.add(seq)
    output = scheduler.schedule()
    assert output.query_lens() == [7, 3]  # the second prompt is chunked to fit the budget
    for _ in range(30):
        assert output.num_batched_tokens <= 10 and len(output.scheduled) <= 3
        assert scheduler.num_running <= 3
        scheduler.postprocess(output, [5] * len(output.scheduled))
        output = scheduler.schedule()
    assert not scheduler.has_unfinished()
    assert all(seq.output_token_ids == [5, 5, 5, 5] and seq.finish_reason == "length" for seq in requests)


def test_waiting_queue_is_first_come_first_served():
    scheduler = make_scheduler(num_blocks=6, block_size=4, budget=64)
    big = Sequence(0, list(range(1, 21)), SamplingParams(max_tokens=4))  # 5 blocks
    blocked = Sequence(1, list(range(1, 9)), SamplingParams(max_tokens=4))  # 2 blocks: does not fit yet
    small = Sequence(2, [3], SamplingParams(max_tokens=4))  # would fit, but must not overtake
    for seq in (big, blocked, small):
        scheduler.add(seq)
    output = scheduler.schedule()
    assert output.sequences == [big]
    assert list(scheduler.waiting) == [blocked, small]


def test_the_newest_sequence_is_preempted_and_resumes_with_its_output_kept():
    scheduler = make_scheduler(num_blocks=4, block_size=4, budget=64)
    old = Sequence(0, [1, 2, 3, 4, 5, 6, 7], SamplingParams(max_tokens=6, ignore_eos=True))
    new = Sequence(1, [9, 8, 7, 6, 5], SamplingParams(max_tokens=6, ignore_eos=True))
    scheduler.add(old)
    scheduler.add(new)
    model = FakeModel(4, 4)
    output = scheduler.schedule()
    assert output.sequences == [old, new] and scheduler.block_manager.num_free_blocks == 0
    scheduler.postprocess(output, model.step(output))  # old: 8 tokens (2 full blocks), new: 6 tokens
    output = scheduler.schedule()
    scheduler.postprocess(output, model.step(output))  # both decode; new fills its 2 blocks
    new_outputs = new.output_token_ids
    output = scheduler.schedule()  # old needs a third block for token 9: the newest is preempted
    assert output.preempted == [new] and output.sequences == [old]
    assert new.status is SequenceStatus.WAITING and new.num_computed_tokens == 0 and new.block_table == []
    assert new.output_token_ids == new_outputs and new.num_preemptions == 1
    assert scheduler.waiting[0] is new
    scheduler.postprocess(output, model.step(output))
    run_to_completion(scheduler, [], model=model)
    assert old.finish_reason == new.finish_reason == "length"
    for seq in (old, new):
        expected = list(seq.prompt_token_ids)
        for _ in range(6):
            expected.append(next_token(expected))
        assert seq.token_ids == expected


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_generation_under_block_pressure_matches_generation_with_plenty(seed, overlap):
    rng = random.Random(seed)
    requests = random_requests(rng, 24)
    arrivals = {seq.seq_id: rng.randrange(0, 30) for seq in requests}
    plenty = make_scheduler(num_blocks=400, block_size=4, max_num_seqs=16, budget=48)
    run_to_completion(plenty, requests, arrivals)
    expected = {seq.seq_id: (seq.token_ids, seq.finish_reason) for seq in requests}
    assert {reason for _, reason in expected.values()} == {"stop", "length"}

    fresh = [Sequence(s.seq_id, s.prompt_token_ids, s.sampling_params) for s in requests]
    scarce = make_scheduler(num_blocks=20, block_size=4, max_num_seqs=16, budget=48)
    run_to_completion(scarce, fresh, arrivals, overlap=overlap)
    assert {seq.seq_id: (seq.token_ids, seq.finish_reason) for seq in fresh} == expected
    assert sum(seq.num_preemptions for seq in fresh) > 0
    assert any(seq.num_cached_tokens > 0 for seq in fresh)
    assert scarce.block_manager.num_free_blocks == 20


def test_a_resubmitted_prompt_hits_the_prefix_cache():
    scheduler = make_scheduler(num_blocks=32, block_size=4, budget=64)
    prompt = list(range(1, 15))
    first = Sequence(0, prompt, SamplingParams(max_tokens=2, ignore_eos=True))
    run_to_completion(scheduler, [first])
    second = Sequence(1, prompt, SamplingParams(max_tokens=2, ignore_eos=True))
    scheduler.add(second)
    output = scheduler.schedule()
    assert second.num_cached_tokens == 12
    assert output.query_lens() == [2] and output.context_lens() == [14]


def test_stop_conditions():
    scheduler = make_scheduler(eos=[EOS, 49])
    eos_stop = Sequence(0, [1], SamplingParams(max_tokens=5))
    ignores_eos = Sequence(1, [1], SamplingParams(max_tokens=3, ignore_eos=True))
    stop_token = Sequence(2, [1], SamplingParams(max_tokens=5, stop_token_ids=[17]))
    other_eos = Sequence(3, [1], SamplingParams(max_tokens=5))
    for seq in (eos_stop, ignores_eos, stop_token, other_eos):
        scheduler.add(seq)
    output = scheduler.schedule()
    finished = scheduler.postprocess(output, [EOS, EOS, 17, 3])
    assert finished == [eos_stop, stop_token]
    assert eos_stop.finish_reason == stop_token.finish_reason == "stop"
    assert eos_stop.output_token_ids == [EOS] and eos_stop.block_table == []
    finished = scheduler.postprocess(output := scheduler.schedule(), [EOS, 49])
    assert finished == [other_eos] and ignores_eos.output_token_ids == [EOS, EOS]
    finished = scheduler.postprocess(scheduler.schedule(), [EOS])
    assert finished == [ignores_eos] and ignores_eos.finish_reason == "length"
    assert not scheduler.has_unfinished()
    assert scheduler.block_manager.num_free_blocks == scheduler.block_manager.num_blocks


def test_abort_and_finish_free_blocks_and_skip_in_flight_rows():
    scheduler = make_scheduler()
    running = Sequence(0, [1, 2, 3], SamplingParams())
    waiting = Sequence(1, [4, 5], SamplingParams())
    scheduler.add(running)
    output = scheduler.schedule()
    scheduler.add(waiting)
    assert scheduler.abort(running.seq_id) is running  # while its step is in flight
    assert scheduler.postprocess(output, [9]) == [] and running.output_token_ids == []
    assert running.finish_reason == "abort" and running.block_table == []
    assert scheduler.finish(waiting.seq_id, "stop") is waiting and waiting.finish_reason == "stop"
    assert scheduler.abort(12345) is None and scheduler.abort(running.seq_id) is None
    assert not scheduler.has_unfinished() and scheduler.num_waiting == 0
    assert scheduler.block_manager.num_free_blocks == scheduler.block_manager.num_blocks


def test_add_rejects_requests_that_cannot_fit_or_repeat_an_id():
    scheduler = make_scheduler(num_blocks=4, block_size=4)
    with pytest.raises(ValueError, match="need 5 KV blocks"):
        scheduler.add(Sequence(0, list(range(1, 15)), SamplingParams(max_tokens=4)))
    scheduler.add(Sequence(1, list(range(1, 14)), SamplingParams(max_tokens=4)))  # 16 tokens: fits
    with pytest.raises(ValueError, match="already"):
        scheduler.add(Sequence(1, [1], SamplingParams()))


def test_postprocess_rejects_a_wrong_number_of_tokens():
    scheduler = make_scheduler()
    scheduler.add(Sequence(0, [1, 2], SamplingParams()))
    with pytest.raises(ValueError, match="1 scheduled"):
        scheduler.postprocess(scheduler.schedule(), [1, 2])


def test_fork_makes_independent_children_with_distinct_seeds():
    parent = Sequence(0, [1, 2, 3], SamplingParams(n=3, seed=10, max_tokens=5))
    children = [parent.fork(100 + i, i) for i in range(3)]
    assert [c.seq_id for c in children] == [100, 101, 102]
    assert [c.sampling_params.seed for c in children] == [10, 11, 12]
    assert all(c.sampling_params.n == 1 and c.sampling_params.max_tokens == 5 for c in children)
    children[0].append_token(9)
    assert children[1].token_ids == [1, 2, 3] and parent.token_ids == [1, 2, 3]
    unseeded = Sequence(1, [1], SamplingParams(n=2)).fork(5, 1)
    assert unseeded.sampling_params.seed is None
    with pytest.raises(ValueError):
        Sequence(2, [], SamplingParams())


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
@pytest.mark.parametrize("seed", range(40))
def test_random_configurations_finish_with_the_same_tokens_as_an_unconstrained_run(seed, overlap):
    """Tiny budgets (below max_num_seqs too), block sizes from 1 to 16, just enough blocks for the
    longest request, prefix caching on or off: every request still ends exactly as with plenty,
    also when each step is scheduled before the previous one's tokens are recorded."""
    rng = random.Random(1000 + seed)
    requests = random_requests(rng, rng.randrange(1, 20))
    arrivals = {seq.seq_id: rng.randrange(0, 20) for seq in requests}
    run_to_completion(
        make_scheduler(num_blocks=1000, block_size=4, max_num_seqs=16, budget=48), requests, arrivals
    )
    fresh = [Sequence(s.seq_id, s.prompt_token_ids, s.sampling_params) for s in requests]
    block_size = rng.choice([1, 2, 4, 8, 16])
    longest = max(s.num_prompt_tokens + s.sampling_params.max_tokens - 1 for s in requests)
    num_blocks = -(-longest // block_size) + rng.randrange(0, 6)
    manager = BlockManager(num_blocks, block_size, enable_prefix_caching=rng.random() < 0.7)
    scheduler = Scheduler(manager, rng.randrange(1, 10), rng.randrange(1, 40), eos_token_id=EOS)
    run_to_completion(scheduler, fresh, arrivals, overlap=overlap)
    assert [(s.token_ids, s.finish_reason) for s in fresh] == [
        (s.token_ids, s.finish_reason) for s in requests
    ]
    assert manager.num_free_blocks == num_blocks


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
def test_a_block_completed_by_a_token_still_being_sampled_is_cached_under_its_real_tokens(overlap):
    # Block 0 holds the 3 prompt tokens and the first output token. With overlap, the step that
    # computes that token's K/V launches before its value is read: the block must be registered
    # once the value arrives, under the hash of the real tokens.
    scheduler = make_scheduler(num_blocks=32, block_size=4, budget=64)
    first = Sequence(0, [5, 6, 7], SamplingParams(max_tokens=6, ignore_eos=True))
    run_to_completion(scheduler, [first], overlap=overlap)
    second = Sequence(1, first.token_ids[:6], SamplingParams(max_tokens=1, ignore_eos=True))
    scheduler.add(second)
    scheduler.schedule()
    assert second.num_cached_tokens == 4


def test_overlapped_steps_hold_pending_tokens_until_read():
    scheduler = make_scheduler(num_blocks=32, block_size=4, budget=64)
    ends_early = Sequence(0, [1, 2, 3], SamplingParams(max_tokens=5))
    two_tokens = Sequence(1, [4, 5], SamplingParams(max_tokens=2, ignore_eos=True))
    scheduler.add(ends_early)
    scheduler.add(two_tokens)
    prefill = scheduler.schedule()
    scheduler.record_launch(prefill)
    assert ends_early.token_ids == [1, 2, 3, PENDING_TOKEN] and ends_early.num_known_tokens == 3

    # Both run a decode row whose input is the token still being sampled.
    decode = scheduler.schedule()
    assert decode.sequences == [ends_early, two_tokens]
    assert decode.pending_input_rows() == [0, 1]
    scheduler.record_launch(decode)
    assert ends_early.num_pending_tokens == two_tokens.num_pending_tokens == 2

    # two_tokens now awaits its last token: nothing of it is scheduled. ends_early runs again.
    third = scheduler.schedule()
    assert third.sequences == [ends_early]
    # Reading the prefill's tokens: EOS ends ends_early, whose later pending tokens are dropped.
    finished = scheduler.record_tokens(prefill, [EOS, 9])
    assert finished == [ends_early]
    assert ends_early.token_ids == [1, 2, 3, EOS] and ends_early.finish_reason == "stop"
    assert two_tokens.token_ids == [4, 5, 9, PENDING_TOKEN]
    # The rows of the steps in flight for the finished sequence are ignored when they are read.
    assert scheduler.record_tokens(decode, [11, 12]) == [two_tokens]
    assert two_tokens.token_ids == [4, 5, 9, 12] and two_tokens.finish_reason == "length"
    scheduler.record_launch(third)  # a finished sequence is skipped at launch too
    assert scheduler.record_tokens(third, [13]) == []
    assert ends_early.token_ids == [1, 2, 3, EOS]
    assert scheduler.block_manager.num_free_blocks == 32 and not scheduler.has_unfinished()


def test_a_sequence_preempted_with_a_pending_token_keeps_it_and_waits_for_it():
    scheduler = make_scheduler(num_blocks=2, block_size=4, budget=64)
    old = Sequence(0, [1, 2, 3], SamplingParams(max_tokens=5, ignore_eos=True))
    new = Sequence(1, [4, 5, 6], SamplingParams(max_tokens=4, ignore_eos=True))
    scheduler.add(old)
    scheduler.add(new)
    prefill = scheduler.schedule()
    scheduler.record_launch(prefill)
    decode = scheduler.schedule()  # old's and new's decode rows fill the two blocks
    scheduler.record_launch(decode)
    scheduler.record_tokens(prefill, [7, 8])
    # old needs a new block: new, the newest, is preempted while its second token is pending.
    step = scheduler.schedule()
    assert step.preempted == [new] and new.num_pending_tokens == 1
    assert step.sequences == [old]
    scheduler.record_launch(step)
    scheduler.abort(old.seq_id)  # frees every block
    # new could be admitted now, but its recompute needs the token still being sampled.
    assert scheduler.schedule().is_empty
    scheduler.record_tokens(decode, [9, 10])
    assert new.token_ids == [4, 5, 6, 8, 10] and new.status is SequenceStatus.WAITING
    readmitted = scheduler.schedule()
    assert readmitted.sequences == [new]
    assert readmitted.input_token_ids() == [4, 5, 6, 8, 10]
    assert readmitted.pending_input_rows() == []
