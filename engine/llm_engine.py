"""The engine loop on rank 0: requests in, scheduled steps through the model, finished outputs out.

Each `step()`: the scheduler picks a batch (decode tokens and prefill chunks), every rank runs it,
rank 0 samples, the scheduler records the tokens, and new text is checked for stop strings.

Asynchronous scheduling (the default): a step is launched before the previous one's tokens are read
back. The scheduler counts each token being sampled as pending, the device feeds it to the next
step itself, and the host reads it while that next step runs; so scheduling, input preparation and
bookkeeping (about a millisecond per step at batch 256) do not leave the GPU idle. The price is
one wasted row for a sequence that a token ends by EOS or a stop: it ran in the next step already.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass, field
from typing import Any

from engine.block_manager import BlockManager
from engine.config import EngineConfig, prepare_config
from engine.model_loader import eos_token_ids, load_hf_config, load_tokenizer
from engine.model_runner import StepInputs, TokenReadback, select_rows
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerOutput
from engine.sequence import SampleLogprobs, Sequence
from engine.worker import Driver, start_driver


@dataclass(slots=True)
class CompletionOutput:
    """One completion of a request. `text` is None when the model directory has no tokenizer."""

    index: int
    text: str | None
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[SampleLogprobs] | None = None


@dataclass(slots=True)
class RequestOutput:
    """A finished request: its prompt and its `n` completions.

    num_cached_tokens: prompt tokens of the first completion served from the prefix cache when it
    was first admitted.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return all(output.finish_reason is not None for output in self.outputs)


class IncrementalDetokenizer:
    """Text of a growing token list, one token at a time, without re-decoding the whole list.

    Decodes a short window of recent tokens and keeps what the newest token adds; a window that ends
    in an incomplete UTF-8 character (U+FFFD) waits for the next token.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.token_ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""

    def add(self, token_id: int) -> str:
        """Appends one token; returns the text it completes (possibly empty)."""
        self.token_ids.append(token_id)
        window = self.token_ids[self.prefix_offset :]
        prefix_text = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        full_text = self._decode(window)
        if len(full_text) <= len(prefix_text) or full_text.endswith("\ufffd"):
            return ""
        new_text = full_text[len(prefix_text) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        self.text += new_text
        return new_text

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True) if token_ids else ""


@dataclass(slots=True)
class _StepInFlight:
    """A launched step: what it ran, which rows sample (in the order of its sampled tokens), and
    those tokens on their way to the host (None when no row samples)."""

    scheduled: SchedulerOutput
    rows: list[int]
    tokens: TokenReadback | None = None
    logprobs: list[SampleLogprobs | None] | None = None


@dataclass(slots=True)
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    seqs: list[Sequence]
    cached_tokens: int | None = None


class LLMEngine:
    """Owns the tokenizer, scheduler and ranks; `add_request` then `step()` until nothing is unfinished."""

    def __init__(self, config: EngineConfig) -> None:
        hf_config = load_hf_config(config.model, config.trust_remote_code)
        self.config = prepare_config(config, hf_config)
        self.tokenizer = load_tokenizer(config.model, config.trust_remote_code)
        self.driver: Driver = start_driver(self.config)
        self.runner = self.driver.runner
        self.num_kv_blocks = self.runner.num_kv_blocks
        block_manager = BlockManager(
            self.num_kv_blocks, self.config.block_size, self.config.enable_prefix_caching
        )
        self.scheduler = Scheduler(
            block_manager,
            max_num_seqs=self.config.max_num_seqs,
            max_num_batched_tokens=self.config.max_num_batched_tokens,
            eos_token_id=eos_token_ids(config.model, hf_config, self.tokenizer),
        )
        self.num_preemptions = 0  # sequences sent back to recompute, over the engine's life
        self.num_generated_tokens = 0  # output tokens recorded, over the engine's life
        self.vocab_size = _vocab_size(hf_config)
        self._requests: dict[str, _Request] = {}
        self._request_of_seq: dict[int, _Request] = {}
        self._detokenizers: dict[int, IncrementalDetokenizer] = {}
        self._seq_ids = itertools.count()
        self._in_flight: _StepInFlight | None = None  # launched, tokens not read yet
        self._penalized: set[int] = set()  # unfinished sequences whose sampler reads earlier tokens

    def add_request(
        self, request_id: str, prompt: str | SequenceOf[int], sampling_params: SamplingParams
    ) -> None:
        """Queues a prompt (text, or token ids) for `sampling_params.n` completions."""
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"{self.config.model} has no tokenizer: pass prompts as token ids")
            text, token_ids = prompt, list(self.tokenizer.encode(prompt))
        else:
            text, token_ids = None, [int(t) for t in prompt]
        if self.vocab_size is not None:
            outside = [t for t in token_ids if not 0 <= t < self.vocab_size]
            if outside:
                raise ValueError(
                    f"prompt token ids {outside[:5]} are outside the vocabulary [0, {self.vocab_size})"
                )
        max_len = self.config.max_model_len
        if len(token_ids) >= max_len:
            raise ValueError(
                f"prompt of {len(token_ids)} tokens leaves no room under max_model_len {max_len}"
            )
        params = dataclasses.replace(
            sampling_params, max_tokens=min(sampling_params.max_tokens, max_len - len(token_ids))
        )
        template = Sequence(-1, token_ids, params)
        seqs = [template.fork(next(self._seq_ids), index) for index in range(params.n)]
        for seq in seqs:
            # The completions are alike, so if the cache cannot hold one, the first add raises.
            self.scheduler.add(seq)
        request = _Request(request_id, text, token_ids, seqs)
        self._requests[request_id] = request
        for seq in seqs:
            self._request_of_seq[seq.seq_id] = request
            if params.stop and self.tokenizer is not None:
                self._detokenizers[seq.seq_id] = IncrementalDetokenizer(self.tokenizer)
            if params.has_penalties:
                self._penalized.add(seq.seq_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    def sequences(self, request_id: str) -> list[Sequence]:
        """The completions of an unfinished request, as the scheduler holds them (read-only: their
        `output_token_ids` grow as steps are read; trailing PENDING_TOKEN entries are not known yet)."""
        request = self._requests.get(request_id)
        return [] if request is None else request.seqs

    def step(self) -> list[RequestOutput]:
        """Runs one batch on every rank; returns the requests that finished.

        With `async_scheduling` a step's sampled tokens are read (and its requests finish) in the
        next call, after that call has launched the following step, so the host's scheduling and
        bookkeeping overlap the device's work; a call with nothing new to launch just reads the
        last step. Otherwise each call launches a step and reads it.
        """
        finished: list[RequestOutput] = []
        if self._in_flight is not None and not self._overlap_allowed():
            finished += self._read_step(self._in_flight)
        scheduled = self.scheduler.schedule()
        self.num_preemptions += len(scheduled.preempted)
        if scheduled.is_empty:
            if self._in_flight is not None:  # its tokens decide what runs next
                return finished + self._read_step(self._in_flight)
            if self.scheduler.has_unfinished():
                raise RuntimeError("the scheduler has unfinished requests but scheduled nothing")
            return finished
        # A request's first completion is first scheduled when admitted, always as a prefill row:
        # decode rows (the first `num_decodes`) belong to sequences recorded at their admission.
        for item in scheduled.scheduled[scheduled.num_decodes :]:
            request = self._request_of_seq[item.seq.seq_id]
            if request.cached_tokens is None and item.seq is request.seqs[0]:
                request.cached_tokens = item.seq.num_cached_tokens
        launched = self._launch(scheduled)
        if self._in_flight is not None:
            finished += self._read_step(self._in_flight)
        self._in_flight = launched
        if not self._overlap_allowed() or not self._requests:
            # (No request left unfinished: the step ran only rows that an earlier token ended.)
            finished += self._read_step(launched)
        return finished

    def _overlap_allowed(self) -> bool:
        """Whether the next step may launch before the last one's tokens are read."""
        return self.config.async_scheduling and not self._penalized

    def _launch(self, scheduled: SchedulerOutput) -> _StepInFlight:
        """Sends `scheduled` to every rank and queues its sampling and the tokens' copy to the host."""
        pending_rows = scheduled.pending_input_rows()
        pending_sources: list[int] = []
        num_previous_samples = 0
        if pending_rows:
            previous = self._in_flight
            if previous is None:
                raise RuntimeError("a step waits for sampled tokens but no step is in flight")
            sample_index = {
                previous.scheduled.scheduled[row].seq.seq_id: k for k, row in enumerate(previous.rows)
            }
            pending_sources = [sample_index[scheduled.scheduled[row].seq.seq_id] for row in pending_rows]
            num_previous_samples = len(previous.rows)
        logits = self.driver.execute(
            StepInputs(
                input_ids=scheduled.input_token_ids(),
                positions=scheduled.positions(),
                query_lens=scheduled.query_lens(),
                context_lens=scheduled.context_lens(),
                block_tables=scheduled.block_tables(),
                block_table_array=scheduled.block_table_array,
                pending_rows=pending_rows,
                pending_sources=pending_sources,
                num_previous_samples=num_previous_samples,
            )
        )
        rows = scheduled.sample_indices()
        launched = _StepInFlight(scheduled, rows)
        if rows:
            sampled = self.runner.sample(
                select_rows(logits, rows), [scheduled.scheduled[r].seq for r in rows]
            )
            launched.tokens = self.runner.read_back(sampled.token_ids)
            launched.logprobs = sampled.logprobs
        self.scheduler.record_launch(scheduled)
        return launched

    def _read_step(self, step: _StepInFlight) -> list[RequestOutput]:
        """Waits for a launched step's tokens, records them, and returns the requests they finish."""
        self._in_flight = None if self._in_flight is step else self._in_flight
        scheduled, rows = step.scheduled, step.rows
        num_rows = len(scheduled.scheduled)
        logprobs: list[SampleLogprobs | None] | None = None
        if step.tokens is None:
            token_ids = [0] * num_rows
        else:
            sampled_ids = step.tokens.wait()
            if len(rows) == num_rows:  # every row samples (any decode-only step): rows = 0..n-1
                token_ids = sampled_ids
            else:
                token_ids = [0] * num_rows
                for row, token_id in zip(rows, sampled_ids):
                    token_ids[row] = token_id
            if step.logprobs is not None:
                logprobs = [None] * num_rows
                for row, entry in zip(rows, step.logprobs):
                    logprobs[row] = entry
        self.num_generated_tokens += sum(
            1 for row in rows if not scheduled.scheduled[row].seq.is_finished
        )
        self.scheduler.record_tokens(scheduled, token_ids, logprobs)
        if self._detokenizers:
            for row in rows:
                self._check_stop_strings(scheduled.scheduled[row].seq)
        # Only a sequence that finished in this step can complete its request now.
        return self._collect_finished(
            {seq.seq_id for seq in (scheduled.scheduled[row].seq for row in rows) if seq.is_finished}
        )

    def abort_request(self, request_id: str) -> None:
        """Drops a request and all its completions."""
        request = self._requests.pop(request_id, None)
        for seq in request.seqs if request else []:
            self.scheduler.abort(seq.seq_id)
            self._forget(seq.seq_id)

    def shutdown(self) -> None:
        self.driver.shutdown()

    def _check_stop_strings(self, seq: Sequence) -> None:
        detokenizer = self._detokenizers.get(seq.seq_id)
        known = seq.num_known_tokens  # a later step may already be sampling the next token
        if detokenizer is None or known - seq.num_prompt_tokens == len(detokenizer.token_ids):
            return
        checked = len(detokenizer.text)
        detokenizer.add(seq.token_ids[known - 1])
        stop_at = seq.sampling_params.find_stop_string(detokenizer.text, checked)
        if stop_at is None:
            return
        detokenizer.text = detokenizer.text[:stop_at]
        # A stop string outranks the length limit the same token may have reached.
        if seq.is_finished:
            seq.finish_reason = "stop"
        else:
            self.scheduler.finish(seq.seq_id, "stop")

    def _collect_finished(self, stepped: set[int]) -> list[RequestOutput]:
        touched: dict[str, _Request] = {}
        for seq_id in stepped:
            request = self._request_of_seq.get(seq_id)
            if request is not None:
                touched[request.request_id] = request
        finished: list[RequestOutput] = []
        for request in touched.values():
            if all(seq.is_finished for seq in request.seqs):
                finished.append(self._output(request))
                del self._requests[request.request_id]
                for seq in request.seqs:
                    self._forget(seq.seq_id)
        return finished

    def _output(self, request: _Request) -> RequestOutput:
        completions = []
        for index, seq in enumerate(request.seqs):
            detokenizer = self._detokenizers.get(seq.seq_id)
            if detokenizer is not None:
                text = detokenizer.text
            elif self.tokenizer is not None:
                text = self.tokenizer.decode(seq.output_token_ids, skip_special_tokens=True)
            else:
                text = None
            wants_logprobs = seq.sampling_params.logprobs is not None
            completions.append(
                CompletionOutput(
                    index,
                    text,
                    seq.output_token_ids,
                    seq.finish_reason,
                    list(seq.logprobs) if wants_logprobs else None,
                )
            )
        return RequestOutput(
            request.request_id,
            request.prompt,
            request.prompt_token_ids,
            completions,
            request.cached_tokens or 0,
        )

    def _forget(self, seq_id: int) -> None:
        self._penalized.discard(seq_id)
        self._request_of_seq.pop(seq_id, None)
        self._detokenizers.pop(seq_id, None)
        self.runner.release(seq_id)


def _vocab_size(hf_config: Any) -> int | None:
    """The vocabulary size the config declares (the text model's, for a composite config)."""
    config = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    size = getattr(config, "vocab_size", None)
    return size if isinstance(size, int) and size > 0 else None
