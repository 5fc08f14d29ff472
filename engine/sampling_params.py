"""How one request wants its tokens chosen and when it should stop.

Plain data, no torch: the scheduler reads the stop conditions, the sampler reads the rest, and the LLM
layer matches `stop` strings on the detokenized text with `find_stop_string`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# OpenAI's documented range for presence and frequency penalties.
_MAX_ABS_OPENAI_PENALTY = 2.0
_NUMBER_FIELDS = (
    "temperature",
    "top_p",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
)


@dataclass(slots=True)
class SamplingParams:
    """Sampling knobs of one request, validated on construction (a bad value raises `ValueError`).

    temperature: 0 means greedy (argmax); otherwise logits are divided by it before sampling.
    top_k: keep the k most likely tokens; -1 turns it off.
    top_p: keep the smallest set of most likely tokens whose probability reaches top_p; 1.0 is off.
    min_p: drop tokens whose probability is below min_p times the most likely token's; 0.0 is off.
    repetition_penalty: HF semantics over prompt and output tokens; 1.0 is off.
    presence_penalty, frequency_penalty: OpenAI semantics over output tokens; 0.0 is off.
    seed: a per-request seed; the same seed gives the same tokens whatever else is in the batch.
    max_tokens: the most tokens to generate.
    stop_token_ids: tokens that end the request (kept in the output, like eos).
    stop: strings that end the request; the LLM layer finds them with `find_stop_string`.
    ignore_eos: keep generating past the model's eos token.
    n: completions per prompt; the LLM layer forks the request with `Sequence.fork`.
    logprobs: also return this many top logprobs per generated token (besides the sampled token's).
    """

    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int = 16
    stop_token_ids: list[int] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    n: int = 1
    logprobs: int | None = None

    def __post_init__(self) -> None:
        # A lone string is the common mistake for `stop`; taking it as one stop string is what it means.
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, list | tuple):
            raise ValueError(f"stop must be a string or a list of strings, got {self.stop!r}")
        if not isinstance(self.stop_token_ids, list | tuple):
            raise ValueError(f"stop_token_ids must be a list of token ids, got {self.stop_token_ids!r}")
        self.stop_token_ids = list(self.stop_token_ids)
        self.stop = list(self.stop)
        self._validate()

    def _validate(self) -> None:
        for name in _NUMBER_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or not _is_finite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be true or false, got {self.ignore_eos!r}")
        if not self.temperature >= 0.0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not _is_int(self.top_k) or not (self.top_k == -1 or self.top_k >= 1):
            raise ValueError(f"top_k must be -1 (off) or an integer >= 1, got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not self.repetition_penalty > 0.0:
            raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -_MAX_ABS_OPENAI_PENALTY <= value <= _MAX_ABS_OPENAI_PENALTY:
                raise ValueError(f"{name} must be in [-2, 2], got {value}")
        # torch's generators take 64-bit seeds; a larger one would fail inside a running step.
        if self.seed is not None and (not _is_int(self.seed) or not -(2**63) <= self.seed < 2**64):
            raise ValueError(f"seed must be None or an integer of at most 64 bits, got {self.seed!r}")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        bad_ids = [t for t in self.stop_token_ids if not _is_int(t) or t < 0]
        if bad_ids:
            raise ValueError(f"stop_token_ids must be non-negative integers, got {bad_ids}")
        bad_stops = [s for s in self.stop if not isinstance(s, str) or not s]
        if bad_stops:
            raise ValueError(f"stop strings must be non-empty strings, got {bad_stops!r}")
        if not _is_int(self.n) or self.n < 1:
            raise ValueError(f"n must be an integer >= 1, got {self.n!r}")
        if self.logprobs is not None and (not _is_int(self.logprobs) or self.logprobs < 0):
            raise ValueError(f"logprobs must be None or an integer >= 0, got {self.logprobs!r}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def find_stop_string(self, text: str, new_text_start: int = 0) -> int | None:
        """Where the earliest stop string in `text` begins, or None if none matched.

        The caller keeps `text[:index]` (the stop string itself is not part of the output, as in
        OpenAI's API). Pass `new_text_start` = the length of the text already checked, so only matches
        that reach into the new text are looked for (a stop string may straddle the boundary).
        """
        earliest: int | None = None
        for stop in self.stop:
            # A match that ends at or after new_text_start starts no earlier than this.
            search_from = max(0, new_text_start - len(stop) + 1)
            index = text.find(stop, search_from)
            if index != -1 and (earliest is None or index < earliest):
                earliest = index
        return earliest


def _is_finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        return False


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
