"""Continuous batching: which sequences run in the next step, and with how many tokens each.

Every step: running sequences that only need their last sampled token run first (one token each),
then running sequences still in prefill get the next chunk of their prompt, then waiting sequences
are admitted first come, first served, while the token budget, `max_num_seqs` and free blocks allow.
A prompt longer than the budget is prefilled in chunks over several steps (chunked prefill), and one
step may mix decode tokens and prefill chunks.

When a running sequence needs a block and none is free, the most recently admitted running sequence
is preempted by recompute: its blocks are freed and it goes back to the front of the waiting queue
with its output tokens kept, to be recomputed with the prompt when it is admitted again (usually
mostly from the prefix cache). The oldest sequence is never preempted for a newer one, so it always
progresses, and `add` refuses a request that could not finish even alone in the cache.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass, field

import numpy as np

from engine.block_manager import BlockManager
from engine.sequence import PENDING_TOKEN, FinishReason, SampleLogprobs, Sequence, SequenceStatus


@dataclass(slots=True)
class ScheduledSequence:
    """One sequence's part of a step: `num_new_tokens` tokens starting at KV index `start`."""

    seq: Sequence
    num_new_tokens: int
    start: int  # tokens already in the cache before this step (= position of the first new token)
    block_table: list[int]  # a copy taken at schedule time; covers start + num_new_tokens tokens
    samples_token: bool  # the chunk reaches the sequence's last token, so this step yields its next one

    @property
    def query_len(self) -> int:
        return self.num_new_tokens

    @property
    def context_len(self) -> int:
        """Tokens in the cache once this step has written its K/V."""
        return self.start + self.num_new_tokens

    @property
    def positions(self) -> range:
        """KV indices (0-based positions) of the new tokens."""
        return range(self.start, self.start + self.num_new_tokens)

    @property
    def token_ids(self) -> list[int]:
        return self.seq.token_ids[self.start : self.start + self.num_new_tokens]


@dataclass(slots=True)
class SchedulerOutput:
    """One step: decode sequences first, then prefill chunks, in the order the model runs them.

    The per-sequence lists below are what `InputMetadata.build(query_lens, context_lens, block_tables,
    block_size)` takes; `input_token_ids` and `positions` are the flattened `input_ids`/`positions`.
    """

    scheduled: list[ScheduledSequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)  # sent back to waiting by this step
    num_decodes: int = 0  # the first `num_decodes` rows are decodes: one token of a running sequence
    # `block_tables()` as an int32 array [num_scheduled, longest] padded with 0, taken at schedule time
    # (what `InputMetadata.from_arrays` takes); None when the output was not made by `Scheduler`.
    block_table_array: np.ndarray | None = None

    @property
    def is_empty(self) -> bool:
        return not self.scheduled

    @property
    def num_batched_tokens(self) -> int:
        return sum(item.num_new_tokens for item in self.scheduled)

    @property
    def sequences(self) -> list[Sequence]:
        return [item.seq for item in self.scheduled]

    def query_lens(self) -> list[int]:
        return [item.query_len for item in self.scheduled]

    def context_lens(self) -> list[int]:
        return [item.context_len for item in self.scheduled]

    def block_tables(self) -> list[list[int]]:
        return [item.block_table for item in self.scheduled]

    def input_token_ids(self) -> list[int]:
        """Every row's new tokens, end to end; a token still being sampled reads as PENDING_TOKEN (see
        `pending_input_rows`)."""
        # Decode rows (one token, at index `start`) skip the slice and its list.
        decodes = [item.seq.token_ids[item.start] for item in self.scheduled[: self.num_decodes]]
        return decodes + [token for item in self.scheduled[self.num_decodes :] for token in item.token_ids]

    def pending_input_rows(self) -> list[int]:
        """Decode rows whose one input token a step still in flight is sampling. Only decode rows can
        be such: a prefill chunk's tokens are all known (a preempted sequence is admitted again only
        once its last step's token was read)."""
        return [
            row
            for row, item in enumerate(self.scheduled[: self.num_decodes])
            if item.seq.num_pending_tokens
            and item.start >= len(item.seq.token_ids) - item.seq.num_pending_tokens
        ]

    def positions(self) -> list[int]:
        decodes = [item.start for item in self.scheduled[: self.num_decodes]]
        return decodes + [
            position for item in self.scheduled[self.num_decodes :] for position in item.positions
        ]

    def sample_indices(self) -> list[int]:
        """Rows whose logits are sampled: the others are prefill chunks that stop short of the end."""
        return [index for index, item in enumerate(self.scheduled) if item.samples_token]


class Scheduler:
    """FCFS continuous-batching scheduler with chunked prefill and preemption by recompute.

    The engine loop: `add(seq)` per request; then each step `output = schedule()`, run the model on
    `output`, sample, `finished = postprocess(output, token_ids, logprobs)`; `finish`/`abort` at any
    time between steps (a stop string found by the LLM layer finishes with reason "stop").

    Asynchronously (the host schedules step n+1 while step n runs): `record_launch(output)` once a
    step is sent to the device, then `record_tokens(output, token_ids, logprobs)` once its sampled
    tokens are read back, which may be after the next step's `schedule()` and `record_launch`. In
    between, each sampling row's token is pending (`Sequence.num_pending_tokens`): it counts in the
    sequence's length, so the next step runs it as a decode row whose input the device supplies.
    A sequence that a token ends (EOS, a stop) may thus run one step too many; that step's result
    for it is dropped.
    """

    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 2048,
        eos_token_id: int | Iterable[int] | None = None,
    ):
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError(
                f"need max_num_seqs >= 1 and max_num_batched_tokens >= 1, "
                f"got {max_num_seqs} and {max_num_batched_tokens}"
            )
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        if eos_token_id is None:
            self.eos_token_ids: frozenset[int] = frozenset()
        elif isinstance(eos_token_id, int):
            self.eos_token_ids = frozenset([eos_token_id])
        else:
            self.eos_token_ids = frozenset(eos_token_id)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order; the last one is preempted first
        self._unfinished: dict[int, Sequence] = {}

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self._unfinished)

    def get(self, seq_id: int) -> Sequence | None:
        """The unfinished sequence with this id, if any."""
        return self._unfinished.get(seq_id)

    def add(self, seq: Sequence) -> None:
        """Queues a new request; raises if it could never finish, even alone in the whole cache."""
        if seq.seq_id in self._unfinished:
            raise ValueError(f"sequence id {seq.seq_id} is already queued or running")
        if seq.status is not SequenceStatus.WAITING or seq.block_table:
            raise ValueError(f"sequence {seq.seq_id} is not a fresh waiting sequence: {seq!r}")
        # The last sampled token is never run, so the cache must hold prompt + max_tokens - 1 tokens.
        longest = seq.num_prompt_tokens + seq.sampling_params.max_tokens - 1
        blocks_needed = self.block_manager.num_blocks_for(longest)
        if blocks_needed > self.block_manager.num_blocks:
            raise ValueError(
                f"sequence {seq.seq_id}: {seq.num_prompt_tokens} prompt tokens + max_tokens "
                f"{seq.sampling_params.max_tokens} need {blocks_needed} KV blocks, the cache has "
                f"{self.block_manager.num_blocks}"
            )
        self._unfinished[seq.seq_id] = seq
        self.waiting.append(seq)

    def schedule(self) -> SchedulerOutput:
        """Picks the next step's sequences and token counts, and reserves their blocks."""
        output = SchedulerOutput()
        decodes: list[ScheduledSequence] = []
        prefills: list[ScheduledSequence] = []
        budget = self.max_num_batched_tokens
        # Sequences with something to run (not those whose last allowed token a step in flight is
        # sampling), oldest first: it gets blocks first, and is preempted last. And the budget held
        # back for decode tokens of sequences not reached yet, so a chunk never starves them.
        candidates: list[Sequence] = []
        pending_decodes = 0
        for seq in self.running:
            num_tokens = len(seq.token_ids)
            if (
                seq.num_pending_tokens
                and num_tokens - seq.num_prompt_tokens >= seq.sampling_params.max_tokens
            ):
                continue
            candidates.append(seq)
            if num_tokens - seq.num_computed_tokens == 1:
                pending_decodes += 1
        block_size = self.block_manager.block_size
        running = SequenceStatus.RUNNING
        for seq in candidates:
            if seq.status is not running:  # preempted for an older one in this loop
                continue
            computed = seq.num_computed_tokens
            is_decode = len(seq.token_ids) - computed == 1
            if is_decode:
                pending_decodes -= 1
                if budget <= 0:
                    continue
                if computed < len(seq.block_table) * block_size:
                    # Fast path: its last block has room for the token, so no block is needed.
                    budget -= 1
                    decodes.append(
                        ScheduledSequence(seq, 1, computed, list(seq.block_table), samples_token=True)
                    )
                    continue
                wanted = 1
            else:
                # (A decode preempted later in this loop keeps its reservation: only this step is affected.)
                wanted = min(seq.num_uncomputed_tokens, budget - pending_decodes)
            if wanted <= 0:
                continue
            granted = self._reserve_slots(seq, wanted, is_decode, output)
            if granted == 0:  # it was preempted itself
                continue
            budget -= granted
            (decodes if is_decode else prefills).append(self._scheduled(seq, granted))

        # Admitting while preempting would only hand the freed blocks straight back.
        while not output.preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.num_pending_tokens:  # preempted with a token still being sampled: admit it once read
                break
            cached = self.block_manager.num_cached_prefix_tokens(seq)
            wanted = min(seq.num_tokens - cached, budget)
            if not self.block_manager.can_allocate(seq, wanted):
                break  # FCFS: nobody overtakes the head of the queue
            self.waiting.popleft()
            self.block_manager.allocate(seq, wanted)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            budget -= wanted
            prefills.append(self._scheduled(seq, wanted))

        output.scheduled = decodes + prefills
        output.num_decodes = len(decodes)
        output.block_table_array = self.block_manager.block_table_array(
            [item.seq for item in output.scheduled]
        )
        return output

    def postprocess(
        self,
        output: SchedulerOutput,
        token_ids: SequenceOf[int],
        logprobs: SequenceOf[SampleLogprobs | None] | None = None,
    ) -> list[Sequence]:
        """Records a step that ran: K/V written, and the sampled tokens appended where a sample was due.

        `token_ids` (and `logprobs`, if given) hold one entry per `output.scheduled` row; entries of rows
        that do not sample (see `sample_indices`) are ignored. Returns the sequences that finished.
        The same as `record_launch(output)` then `record_tokens(output, token_ids, logprobs)`.
        """
        self.record_launch(output)
        return self.record_tokens(output, token_ids, logprobs)

    def record_launch(self, output: SchedulerOutput) -> None:
        """Records a step sent to the device: its K/V count as written, and each row that samples gets a
        pending token, so the next `schedule()` can run before the sampled values are read back."""
        mark_computed = self.block_manager.mark_computed
        running = SequenceStatus.RUNNING
        for item in output.scheduled:
            seq = item.seq
            if seq.status is not running:  # aborted since it was scheduled
                continue
            if seq.num_computed_tokens != item.start:
                raise RuntimeError(f"sequence {seq.seq_id} changed between schedule() and the step's launch")
            mark_computed(seq, item.num_new_tokens)
            if item.samples_token:  # its next token counts from now; the value comes with record_tokens
                seq.token_ids.append(PENDING_TOKEN)
                seq.num_pending_tokens += 1

    def record_tokens(
        self,
        output: SchedulerOutput,
        token_ids: SequenceOf[int],
        logprobs: SequenceOf[SampleLogprobs | None] | None = None,
    ) -> list[Sequence]:
        """Gives a launched step's pending tokens their sampled values, oldest step first, and finishes
        the sequences they end. Rows of sequences that ended meanwhile (a stop found in an earlier
        step's token, an abort) are ignored. Returns the sequences that finished."""
        if len(token_ids) != len(output.scheduled):
            raise ValueError(
                f"got {len(token_ids)} token ids for {len(output.scheduled)} scheduled sequences"
            )
        if logprobs is not None and len(logprobs) != len(output.scheduled):
            raise ValueError(f"got {len(logprobs)} logprobs for {len(output.scheduled)} scheduled sequences")
        finished: list[Sequence] = []
        block_size = self.block_manager.block_size
        finished_status = SequenceStatus.FINISHED
        eos_token_ids = self.eos_token_ids
        for index, item in enumerate(output.scheduled):
            seq = item.seq
            # A preempted sequence (waiting again) still gets its token: it is part of its output.
            if not item.samples_token or seq.status is finished_status:
                continue
            token_id = int(token_ids[index])
            if logprobs is None and seq.num_pending_tokens:  # = fill_pending_token, minus a call
                position = len(seq.token_ids) - seq.num_pending_tokens
                seq.token_ids[position] = token_id
                seq.num_pending_tokens -= 1
            else:
                position = seq.fill_pending_token(token_id, None if logprobs is None else logprobs[index])
            if (position + 1) % block_size == 0:  # it completed a block the step may have computed
                self.block_manager.register_block_of(seq, position)
            params = seq.sampling_params
            if (
                (token_id in eos_token_ids and not params.ignore_eos)
                or params.stop_token_ids
                or position + 1 - seq.num_prompt_tokens >= params.max_tokens
            ):
                reason = self._finish_reason(seq, token_id)
                if reason is not None:
                    self._finish(seq, reason)
                    finished.append(seq)
        return finished

    def finish(self, seq_id: int, reason: FinishReason) -> Sequence | None:
        """Ends an unfinished sequence now (e.g. "stop" for a stop string) and frees its blocks."""
        seq = self._unfinished.get(seq_id)
        if seq is not None:
            self._finish(seq, reason)
        return seq

    def abort(self, seq_id: int) -> Sequence | None:
        """Drops a request, waiting or running; returns it, or None if it is unknown or done."""
        return self.finish(seq_id, "abort")

    def _finish_reason(self, seq: Sequence, token_id: int) -> FinishReason | None:
        params = seq.sampling_params
        if (not params.ignore_eos and token_id in self.eos_token_ids) or token_id in params.stop_token_ids:
            return "stop"
        if seq.num_known_tokens - seq.num_prompt_tokens >= params.max_tokens:
            return "length"
        return None

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        seq.drop_pending_tokens()  # sampled by a step still in flight, after the end: not output
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self.block_manager.free(seq)
        else:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        del self._unfinished[seq.seq_id]

    def _reserve_slots(self, seq: Sequence, wanted: int, is_decode: bool, output: SchedulerOutput) -> int:
        """Gives `seq` blocks for up to `wanted` tokens, preempting newer sequences if none are free.

        A prefill chunk shrinks to what the free blocks hold before anyone is preempted for it.
        Returns the tokens granted: 0 if `seq` itself had to be preempted.
        """
        manager = self.block_manager
        while not manager.can_append(seq, wanted):
            room = manager.num_appendable_tokens(seq)
            if not is_decode and room >= 1:
                wanted = min(wanted, room)
                break
            # Newest first; the loop in `schedule` has not reached it yet, unless it is `seq` itself.
            victim = self.running[-1]
            self._preempt(victim)
            output.preempted.append(victim)
            if victim is seq:
                return 0
        manager.append_slots(seq, wanted)
        return wanted

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.num_cached_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _scheduled(self, seq: Sequence, num_new_tokens: int) -> ScheduledSequence:
        start = seq.num_computed_tokens
        return ScheduledSequence(
            seq=seq,
            num_new_tokens=num_new_tokens,
            start=start,
            block_table=list(seq.block_table),
            samples_token=start + num_new_tokens == seq.num_tokens,
        )
