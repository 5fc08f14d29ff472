"""One request as the server's handlers see it: a handle to iterate for updates or await for the
result, and, for a streaming client, how much of each completion it has been sent."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from engine.llm_engine import CompletionOutput, IncrementalDetokenizer, RequestOutput
from engine.sampling_params import SamplingParams
from engine.sequence import SampleLogprobs, Sequence


class EngineDeadError(RuntimeError):
    """The engine failed and cannot run requests any more; the message says why."""


@dataclass(slots=True)
class CompletionDelta:
    """What one completion gained since the last update: tokens, their text and logprobs, and its
    finish reason once the request is done."""

    index: int
    token_ids: list[int]
    text: str
    logprobs: list[SampleLogprobs] | None
    finish_reason: str | None = None


@dataclass(slots=True)
class RequestUpdate:
    """One update of a request; the last has `output` (the whole finished request) set."""

    deltas: list[CompletionDelta]
    output: RequestOutput | None = None

    @property
    def finished(self) -> bool:
        return self.output is not None


class StreamedCompletion:
    """How much of one completion a streaming client has been sent.

    With stop strings, the last `holdback` characters of the text are held back: they may be the
    start of a stop string that the next token completes, and a stop string is never sent.
    """

    def __init__(self, tokenizer: object | None, holdback: int) -> None:
        self.detokenizer = IncrementalDetokenizer(tokenizer) if tokenizer is not None else None
        self.holdback = holdback
        self.num_tokens = 0  # output tokens sent
        self.num_chars = 0  # characters of text sent

    def advance(self, index: int, seq: Sequence, with_logprobs: bool) -> CompletionDelta | None:
        """What `seq` gained since the last call (None if nothing); reads only the new tokens."""
        start = seq.num_prompt_tokens + self.num_tokens
        end = seq.num_known_tokens
        if end <= start:
            return None
        new_tokens = seq.token_ids[start:end]
        logprobs = seq.logprobs[self.num_tokens : end - seq.num_prompt_tokens] if with_logprobs else None
        self.num_tokens = end - seq.num_prompt_tokens
        if self.detokenizer is None:
            return CompletionDelta(index, new_tokens, "", logprobs)
        for token_id in new_tokens:
            self.detokenizer.add(token_id)
        ready = len(self.detokenizer.text) - self.holdback
        new_text = self.detokenizer.text[self.num_chars : ready] if ready > self.num_chars else ""
        self.num_chars += len(new_text)
        return CompletionDelta(index, new_tokens, new_text, logprobs)

    def finish(self, completion: CompletionOutput) -> CompletionDelta:
        """The rest of a finished completion: its text past what was sent (a stop string cut off)."""
        text = completion.text or ""
        sent = self.detokenizer.text[: self.num_chars] if self.detokenizer is not None else ""
        new_text = text[self.num_chars :] if text.startswith(sent) else ""
        logprobs = completion.logprobs[self.num_tokens :] if completion.logprobs is not None else None
        delta = CompletionDelta(
            completion.index,
            completion.token_ids[self.num_tokens :],
            new_text,
            logprobs,
            completion.finish_reason,
        )
        self.num_tokens, self.num_chars = len(completion.token_ids), len(text)
        return delta


class RequestHandle:
    """A request inside the engine: iterate it for updates (streaming) or await `result()`.

    Call `abort()` when the client is gone: an unfinished request is dropped and its blocks freed.
    """

    def __init__(self, request_id: str, stream: bool, on_abort: Callable[[str], None]) -> None:
        self.request_id = request_id
        self.stream = stream
        self.finished = False
        self._on_abort = on_abort
        self._queue: asyncio.Queue[RequestUpdate | BaseException] = asyncio.Queue()
        self._completions: list[StreamedCompletion] = []

    async def result(self) -> RequestOutput:
        """Waits for the request to finish; returns its output."""
        async for update in self:
            if update.output is not None:
                return update.output
        raise EngineDeadError(f"request {self.request_id} ended without an output")

    def __aiter__(self) -> RequestHandle:
        return self

    async def __anext__(self) -> RequestUpdate:
        if self.finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        self.finished = item.finished
        return item

    def abort(self) -> None:
        """Drops the request if it has not finished (a no-op once it has)."""
        if not self.finished:
            self.finished = True
            self._on_abort(self.request_id)

    # The engine loop's side.

    def start_streaming(self, params: SamplingParams, tokenizer: Any | None) -> None:
        """Tracks what the client has been sent of each of the `params.n` completions."""
        holdback = max((len(stop) for stop in params.stop), default=1) - 1
        self._completions = [StreamedCompletion(tokenizer, holdback) for _ in range(params.n)]

    def progress(self, seqs: list[Sequence]) -> None:
        """Sends what the request's running sequences gained since the last call, if anything."""
        deltas = []
        for index, (streamed, seq) in enumerate(zip(self._completions, seqs)):
            delta = streamed.advance(index, seq, seq.sampling_params.logprobs is not None)
            if delta is not None:
                deltas.append(delta)
        if deltas:
            self._queue.put_nowait(RequestUpdate(deltas))

    def complete(self, output: RequestOutput) -> None:
        """Sends the last update: the rest of each completion (when streaming) and the whole output."""
        deltas = [
            streamed.finish(completion) for streamed, completion in zip(self._completions, output.outputs)
        ]
        self._queue.put_nowait(RequestUpdate(deltas, output))

    def fail(self, error: BaseException) -> None:
        """Ends the request with `error`, raised to whoever iterates it."""
        self._queue.put_nowait(error)
