"""The OpenAI-compatible HTTP API over an `AsyncEngine`: completions, chat completions, models,
health and metrics.

    app = build_app(AsyncEngine(LLMEngine(config)), served_model_name="my-model")
    uvicorn.run(app, host="127.0.0.1", port=8000)

Every request is validated before it reaches the engine (HTTP 400 with OpenAI's error JSON); a
client that disconnects, streaming or not, has its request aborted and its KV blocks freed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from engine.llm_engine import RequestOutput
from engine.sampling_params import SamplingParams
from engine.server.async_engine import AsyncEngine
from engine.server.errors import APIError, bad_request, engine_failed, install_error_handlers
from engine.server.metrics import CONTENT_TYPE, TokenRate, render_metrics
from engine.server.protocol import ChatCompletionRequest, CompletionRequest
from engine.server.requests import EngineDeadError, RequestHandle
from engine.server.responses import (
    ResponseMeta,
    chat_response,
    completion_response,
)
from engine.server.streaming import stream_chat, stream_completions


def build_app(engine: AsyncEngine, served_model_name: str) -> FastAPI:
    """The FastAPI app; it starts the engine loop on startup and shuts the engine down on exit."""

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await engine.start()
        try:
            yield
        finally:
            await engine.shutdown()

    app = FastAPI(title="porter engine", lifespan=lifespan)
    install_error_handlers(app)
    token_rate = TokenRate()
    max_model_len = engine.engine.config.max_model_len
    tokenizer = engine.engine.tokenizer

    def check_model(name: str | None) -> str:
        if name is not None and name != served_model_name:
            raise APIError(
                404, f"The model `{name}` does not exist.", "not_found_error", "model", "model_not_found"
            )
        return served_model_name

    def meta(prefix: str) -> ResponseMeta:
        return ResponseMeta(f"{prefix}-{uuid.uuid4().hex}", int(time.time()), served_model_name, tokenizer)

    @app.get("/health")
    async def health() -> JSONResponse:
        try:
            engine.check_health()
        except EngineDeadError as error:
            return APIError(503, str(error), "server_error", code="engine_dead").response()
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(render_metrics(engine, token_rate), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": served_model_name,
                    "object": "model",
                    "created": int(engine.started_at),
                    "owned_by": "porter",
                    "max_model_len": max_model_len,
                }
            ],
        }

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        check_model(body.model)
        params = _sampling_params(body, max_model_len)
        try:
            prompts = body.prompts()
        except ValueError as error:
            raise bad_request(str(error), "prompt") from None
        response = meta("cmpl")
        handles = await _add_all(engine, response.response_id, prompts, params, body.stream)
        if body.stream:
            events = stream_completions(response, handles, params.n, body.include_usage)
            return StreamingResponse(events, media_type="text/event-stream")
        outputs = await _results_unless_disconnected(request, handles)
        return completion_response(response, outputs, params.n)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        check_model(body.model)
        params = _sampling_params(body, max_model_len)
        prompt = _render_chat(tokenizer, body)
        response = meta("chatcmpl")
        handles = await _add_all(engine, response.response_id, [prompt], params, body.stream)
        if body.stream:
            events = stream_chat(response, handles[0], params.n, body.include_usage)
            return StreamingResponse(events, media_type="text/event-stream")
        outputs = await _results_unless_disconnected(request, handles)
        return chat_response(response, outputs[0])

    return app


def _sampling_params(
    body: CompletionRequest | ChatCompletionRequest, default_max_tokens: int
) -> SamplingParams:
    try:
        return body.sampling_params(default_max_tokens)
    except ValueError as error:
        raise bad_request(str(error)) from None


def _render_chat(tokenizer: Any, body: ChatCompletionRequest) -> list[int]:
    """The conversation through the tokenizer's chat template, as token ids (the template writes any
    special tokens itself, so none are added on top)."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise bad_request("this model has no chat template: use /v1/completions")
    try:
        messages = [message.as_template_input() for message in body.messages]
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=body.add_generation_prompt
        )
    except ValueError as error:
        raise bad_request(str(error), "messages") from None
    except Exception as error:  # a template error (jinja) names the problem with the messages
        raise bad_request(f"the chat template failed on these messages: {error}", "messages") from None
    return list(tokenizer.encode(text, add_special_tokens=False))


async def _add_all(
    engine: AsyncEngine,
    response_id: str,
    prompts: Sequence[str | list[int]],
    params: SamplingParams,
    stream: bool,
) -> list[RequestHandle]:
    """Adds one engine request per prompt; if any is refused, the others are dropped and the error raised."""
    results = await asyncio.gather(
        *(
            engine.add(f"{response_id}-{index}", prompt, params, stream)
            for index, prompt in enumerate(prompts)
        ),
        return_exceptions=True,
    )
    handles = [result for result in results if isinstance(result, RequestHandle)]
    failures = [result for result in results if not isinstance(result, RequestHandle)]
    if not failures:
        return handles
    for handle in handles:
        handle.abort()
    error = failures[0]
    if isinstance(error, ValueError):
        where = f"prompt {results.index(error)}: " if len(prompts) > 1 else ""
        raise bad_request(where + str(error), "prompt") from None
    raise error


async def _results_unless_disconnected(request: Request, handles: list[RequestHandle]) -> list[RequestOutput]:
    """Every handle's output; if the client disconnects first, the requests are aborted."""
    results = asyncio.ensure_future(asyncio.gather(*(handle.result() for handle in handles)))
    disconnected = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait([results, disconnected], return_when=asyncio.FIRST_COMPLETED)
    finally:
        disconnected.cancel()
        if not results.done():
            results.cancel()
        for handle in handles:
            handle.abort()
    if not results.done() or results.cancelled():
        raise APIError(499, "the client closed the request", code="client_closed_request")
    try:
        return results.result()
    except EngineDeadError as error:
        raise engine_failed(error) from None


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
