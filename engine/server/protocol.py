"""The request bodies of OpenAI's completions and chat completions APIs, as the server accepts them.

Fields follow OpenAI's names and defaults; `top_k`, `min_p`, `repetition_penalty`, `stop_token_ids`
and `ignore_eos` are the usual extensions of OpenAI-compatible servers. A field OpenAI defines that the
engine cannot honour is refused (HTTP 400) rather than ignored, so no request is served other than
as asked.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from engine.sampling_params import SamplingParams

# OpenAI's upper bound on logprobs (completions) and top_logprobs (chat).
MAX_TOP_LOGPROBS = 20
# OpenAI's upper bound on completions per prompt; a client cannot make the server fork without end.
MAX_N = 128


class UnsupportedField(ValueError):
    """A request field the server knows but cannot serve; the message names it."""


class StreamOptions(BaseModel):
    include_usage: bool = False


class _SamplingFields(BaseModel):
    """What both APIs share: how to sample and when to stop."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None

    def _sampling_params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        if self.logit_bias:
            raise UnsupportedField("logit_bias is not supported")
        if self.n > MAX_N:
            raise ValueError(f"n must be at most {MAX_N}, got {self.n}")
        if logprobs is not None and logprobs > MAX_TOP_LOGPROBS:
            raise ValueError(f"at most {MAX_TOP_LOGPROBS} top logprobs per token, got {logprobs}")
        stop = [] if self.stop is None else self.stop
        return SamplingParams(
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            seed=self.seed,
            max_tokens=max_tokens,
            stop_token_ids=self.stop_token_ids,
            stop=stop,
            ignore_eos=self.ignore_eos,
            n=self.n,
            logprobs=logprobs,
        )

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_SamplingFields):
    """POST /v1/completions."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list: one string, several strings, one token-id list, or several."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if prompt and all(isinstance(token, int) for token in prompt):
            return [list(prompt)]  # type: ignore[arg-type]
        if not prompt:
            raise ValueError("prompt must not be empty")
        return list(prompt)  # type: ignore[arg-type]

    def sampling_params(self, default_max_tokens: int) -> SamplingParams:
        if self.echo:
            raise UnsupportedField("echo is not supported")
        if self.suffix:
            raise UnsupportedField("suffix is not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise UnsupportedField("best_of other than n is not supported")
        max_tokens = default_max_tokens if self.max_tokens is None else self.max_tokens
        return self._sampling_params(max_tokens, self.logprobs)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None

    def as_template_input(self) -> dict[str, Any]:
        """The message as chat templates read it: text parts joined into one string."""
        content = self.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise UnsupportedField(f"only text content parts are supported, got {part.get('type')!r}")
                texts.append(part["text"])
            content = "".join(texts)
        return {**(self.model_extra or {}), "role": self.role, "content": content or ""}


class ChatCompletionRequest(_SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None
    add_generation_prompt: bool = True

    def sampling_params(self, default_max_tokens: int) -> SamplingParams:
        if self.tools:
            raise UnsupportedField("tools are not supported")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            raise UnsupportedField(f"response_format {self.response_format.get('type')!r} is not supported")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs set to true")
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling_params(default_max_tokens if max_tokens is None else max_tokens, logprobs)
