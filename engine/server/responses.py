"""The JSON the server answers with: OpenAI's completion and chat completion objects, whole or as
server-sent-event chunks, with logprobs in each API's own layout."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from engine.llm_engine import RequestOutput
from engine.sequence import SampleLogprobs


@dataclass(slots=True)
class ResponseMeta:
    """What every object of one response repeats."""

    response_id: str
    created: int
    model: str
    tokenizer: Any | None

    def token_text(self, token_id: int) -> str:
        if self.tokenizer is None:
            return f"token_id:{token_id}"
        return self.tokenizer.decode([token_id])


def server_sent_event(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def usage_of(outputs: list[RequestOutput]) -> dict[str, int]:
    """Prompt tokens count once per prompt, completion tokens once per completion."""
    prompt = sum(len(output.prompt_token_ids) for output in outputs)
    completion = sum(len(c.token_ids) for output in outputs for c in output.outputs)
    return usage(prompt, completion)


def completion_logprobs(
    meta: ResponseMeta, entries: list[SampleLogprobs] | None, text_offset: int = 0
) -> dict[str, Any] | None:
    """The completions API's logprobs: parallel lists of tokens, their logprobs, the top
    alternatives (token text -> logprob) and each token's offset in the text."""
    if entries is None:
        return None
    tokens, token_logprobs, top, offsets = [], [], [], []
    offset = text_offset
    for entry in entries:
        text = meta.token_text(entry.token_id)
        tokens.append(text)
        token_logprobs.append(entry.logprob)
        top.append({meta.token_text(token): logprob for token, logprob in entry.top_logprobs})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


def chat_logprobs(meta: ResponseMeta, entries: list[SampleLogprobs] | None) -> dict[str, Any] | None:
    """The chat API's logprobs: one object per token with its bytes and top alternatives."""
    if entries is None:
        return None

    def token_entry(token_id: int, logprob: float) -> dict[str, Any]:
        text = meta.token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {
        "content": [
            {
                **token_entry(entry.token_id, entry.logprob),
                "top_logprobs": [token_entry(token, logprob) for token, logprob in entry.top_logprobs],
            }
            for entry in entries
        ]
    }


def completion_response(meta: ResponseMeta, outputs: list[RequestOutput], n: int) -> dict[str, Any]:
    """A whole text_completion object for every prompt's `n` completions."""
    choices = []
    for prompt_index, output in enumerate(outputs):
        for completion in output.outputs:
            choices.append(
                {
                    "index": prompt_index * n + completion.index,
                    "text": completion.text or "",
                    "logprobs": completion_logprobs(meta, completion.logprobs),
                    "finish_reason": completion.finish_reason,
                }
            )
    return {
        "id": meta.response_id,
        "object": "text_completion",
        "created": meta.created,
        "model": meta.model,
        "choices": choices,
        "usage": usage_of(outputs),
    }


def chat_response(meta: ResponseMeta, output: RequestOutput) -> dict[str, Any]:
    """A whole chat.completion object."""
    return {
        "id": meta.response_id,
        "object": "chat.completion",
        "created": meta.created,
        "model": meta.model,
        "choices": [
            {
                "index": completion.index,
                "message": {"role": "assistant", "content": completion.text or ""},
                "logprobs": chat_logprobs(meta, completion.logprobs),
                "finish_reason": completion.finish_reason,
            }
            for completion in output.outputs
        ],
        "usage": usage_of([output]),
    }


def completion_chunk(meta: ResponseMeta, choices: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "id": meta.response_id,
        "object": "text_completion",
        "created": meta.created,
        "model": meta.model,
        "choices": choices,
    }


def chat_chunk(meta: ResponseMeta, choices: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "id": meta.response_id,
        "object": "chat.completion.chunk",
        "created": meta.created,
        "model": meta.model,
        "choices": choices,
    }
