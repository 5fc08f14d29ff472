"""OpenAI clients for the server's load test, run in a process of their own.

In the server's process the clients would take turns with the engine loop for the interpreter lock;
in their own process they use the second core, as real clients would.
"""

from __future__ import annotations

import asyncio
import multiprocessing
from typing import Any

import openai

MODEL_NAME = "tiny"

# (response id, text, finish reason)
Answer = tuple[str, str, str]


async def send(client: openai.AsyncOpenAI, request: dict[str, Any], stream: bool) -> Answer:
    """One request, streaming or not; a chat request when it carries `messages`."""
    if "messages" in request:
        if not stream:
            response = await client.chat.completions.create(model=MODEL_NAME, **request)
            choice = response.choices[0]
            return response.id, choice.message.content, choice.finish_reason
        chunks = [
            chunk
            async for chunk in await client.chat.completions.create(model=MODEL_NAME, stream=True, **request)
        ]
        text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
        return chunks[0].id, text, chunks[-1].choices[0].finish_reason
    if not stream:
        response = await client.completions.create(model=MODEL_NAME, **request)
        return response.id, response.choices[0].text, response.choices[0].finish_reason
    chunks = [
        chunk async for chunk in await client.completions.create(model=MODEL_NAME, stream=True, **request)
    ]
    return (
        chunks[0].id,
        "".join(chunk.choices[0].text for chunk in chunks),
        chunks[-1].choices[0].finish_reason,
    )


async def run_sequentially(base_url: str, requests: list[dict[str, Any]]) -> list[Answer]:
    """Each request alone: the next is sent once the previous has been answered."""
    async with openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=60) as client:
        return [await send(client, request, stream=False) for request in requests]


async def run_concurrently(
    base_url: str,
    requests: list[dict[str, Any]],
    plan: list[tuple[int, bool]],
    num_clients: int,
    time_limit_s: float,
) -> list[tuple[int, Answer]]:
    """Sends `plan` ((index into `requests`, stream?) pairs) from `num_clients` concurrent clients."""
    queue: asyncio.Queue[tuple[int, bool]] = asyncio.Queue()
    for item in plan:
        queue.put_nowait(item)
    answers: list[tuple[int, Answer]] = []
    async with openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=60) as client:

        async def client_loop() -> None:
            while not queue.empty():
                index, stream = queue.get_nowait()
                answers.append((index, await send(client, requests[index], stream)))

        await asyncio.wait_for(asyncio.gather(*(client_loop() for _ in range(num_clients))), time_limit_s)
    return answers


def _client_process(connection: Any, *args: Any) -> None:
    try:
        connection.send(asyncio.run(run_concurrently(*args)))
    except BaseException as error:  # noqa: B036 -- reported to the test, which fails with it
        connection.send(RuntimeError(f"load clients failed: {error!r}"))


def run_concurrently_in_subprocess(
    base_url: str,
    requests: list[dict[str, Any]],
    plan: list[tuple[int, bool]],
    num_clients: int,
    time_limit_s: float,
) -> list[tuple[int, Answer]]:
    """`run_concurrently` in a spawned process; waits at most `time_limit_s` (plus start-up)."""
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(
        target=_client_process,
        args=(sender, base_url, requests, plan, num_clients, time_limit_s),
        daemon=True,
    )
    process.start()
    sender.close()
    try:
        if not receiver.poll(time_limit_s + 30):
            raise TimeoutError(f"the load clients did not finish in {time_limit_s:g} s")
        result = receiver.recv()
    finally:
        process.join(timeout=10)
        if process.is_alive():
            process.kill()
    if isinstance(result, BaseException):
        raise result
    return result
