"""Server-sent events for streaming requests: each step's new text as a chunk of OpenAI's stream
format, then `data: [DONE]`. A stream left early (the client hung up) aborts its requests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from engine.llm_engine import RequestOutput
from engine.server.errors import engine_failed
from engine.server.requests import EngineDeadError, RequestHandle, RequestUpdate
from engine.server.responses import (
    ResponseMeta,
    chat_chunk,
    chat_logprobs,
    completion_chunk,
    completion_logprobs,
    server_sent_event,
    usage_of,
)


async def _updates(handles: list[RequestHandle]) -> AsyncIterator[tuple[int, RequestUpdate]]:
    """(prompt index, update) from every handle, as they come; aborts them all when left early."""
    try:
        if len(handles) == 1:
            async for update in handles[0]:
                yield 0, update
            return
        queue: asyncio.Queue[tuple[int, RequestUpdate | BaseException | None]] = asyncio.Queue()

        async def pump(index: int, handle: RequestHandle) -> None:
            try:
                async for update in handle:
                    queue.put_nowait((index, update))
                queue.put_nowait((index, None))
            except BaseException as error:  # noqa: B036 -- handed to the consumer, which re-raises it
                queue.put_nowait((index, error))

        pumps = [asyncio.ensure_future(pump(index, handle)) for index, handle in enumerate(handles)]
        try:
            remaining = len(handles)
            while remaining:
                index, item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield index, item
        finally:
            for task in pumps:
                task.cancel()
    finally:
        for handle in handles:
            handle.abort()


async def stream_completions(
    meta: ResponseMeta, handles: list[RequestHandle], n: int, include_usage: bool
) -> AsyncIterator[str]:
    outputs: list[RequestOutput] = []
    text_offsets: dict[int, int] = {}
    try:
        async for prompt_index, update in _updates(handles):
            choices = []
            for delta in update.deltas:
                if not delta.text and delta.logprobs is None and delta.finish_reason is None:
                    continue
                index = prompt_index * n + delta.index
                offset = text_offsets.get(index, 0)
                text_offsets[index] = offset + len(delta.text)
                choices.append(
                    {
                        "index": index,
                        "text": delta.text,
                        "logprobs": completion_logprobs(meta, delta.logprobs, offset),
                        "finish_reason": delta.finish_reason,
                    }
                )
            if choices:
                yield server_sent_event(completion_chunk(meta, choices))
            if update.output is not None:
                outputs.append(update.output)
        if include_usage:
            yield server_sent_event({**completion_chunk(meta, []), "usage": usage_of(outputs)})
    except EngineDeadError as error:
        yield server_sent_event(engine_failed(error).body())
    yield server_sent_event("[DONE]")


async def stream_chat(
    meta: ResponseMeta, handle: RequestHandle, n: int, include_usage: bool
) -> AsyncIterator[str]:
    roles = [
        {
            "index": index,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
        for index in range(n)
    ]
    yield server_sent_event(chat_chunk(meta, roles))
    output: RequestOutput | None = None
    try:
        async for _, update in _updates([handle]):
            choices = []
            for delta in update.deltas:
                if not delta.text and delta.logprobs is None and delta.finish_reason is None:
                    continue
                content = {"content": delta.text} if delta.text else {}
                choices.append(
                    {
                        "index": delta.index,
                        "delta": content,
                        "logprobs": chat_logprobs(meta, delta.logprobs),
                        "finish_reason": delta.finish_reason,
                    }
                )
            if choices:
                yield server_sent_event(chat_chunk(meta, choices))
            output = update.output or output
        if include_usage and output is not None:
            yield server_sent_event({**chat_chunk(meta, []), "usage": usage_of([output])})
    except EngineDeadError as error:
        yield server_sent_event(engine_failed(error).body())
    yield server_sent_event("[DONE]")
