"""One request as the scheduler sees it: its tokens, how far its KV cache reaches, and its blocks.

No torch here: the scheduler and block manager run on the host and are tested without a device.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass
from typing import Literal

from engine.sampling_params import SamplingParams

FinishReason = Literal["stop", "length", "abort"]

# Stands in `token_ids` for a token that a step still on the device has sampled but the host has not
# read yet (asynchronous scheduling, see `engine.llm_engine`). Never a real vocabulary id.
PENDING_TOKEN = -1


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued, holds no blocks (new, or preempted)
    RUNNING = "running"  # admitted: holds blocks, is being prefilled (maybe in chunks) or decoded
    FINISHED = "finished"


@dataclass(slots=True)
class SampleLogprobs:
    """Logprobs of one generated token: the sampled token's and the `top_logprobs` most likely ones.

    `top_logprobs` is `[(token_id, logprob), ...]`, most likely first, `SamplingParams.logprobs` long.
    """

    token_id: int
    logprob: float
    top_logprobs: list[tuple[int, float]]


class Sequence:
    """A request's tokens (prompt then output, one list) and its place in the KV cache.

    `num_computed_tokens` counts the leading tokens whose K/V are in the cache; the tokens after it are
    what the next steps must run. A sequence finishing its prefill has every token but the last
    sampled one computed, so decode is simply "one uncomputed token". Preemption by recompute frees
    the blocks and sets it back to 0; the output tokens are kept and recomputed with the prompt.
    """

    __slots__ = (
        "seq_id",
        "sampling_params",
        "token_ids",
        "num_prompt_tokens",
        "status",
        "finish_reason",
        "block_table",
        "block_table_row",
        "block_hashes",
        "num_computed_tokens",
        "num_cached_tokens",
        "num_preemptions",
        "logprobs",
        "num_pending_tokens",
    )

    def __init__(self, seq_id: int, prompt_token_ids: SequenceOf[int], sampling_params: SamplingParams):
        if not prompt_token_ids:
            raise ValueError(f"sequence {seq_id}: the prompt must hold at least one token")
        self.seq_id = seq_id
        self.sampling_params = sampling_params
        self.token_ids: list[int] = list(prompt_token_ids)  # prompt, then output; append-only
        self.num_prompt_tokens = len(self.token_ids)
        self.status = SequenceStatus.WAITING
        self.finish_reason: FinishReason | None = None
        self.block_table: list[int] = []  # block ids, in token order
        # This sequence's row in its block manager's int32 mirror of the block tables (-1: none yet).
        self.block_table_row = -1
        # Chained content hashes of this sequence's full blocks, filled in lazily by the block manager.
        # Tokens never change once appended, so a hash stays valid for the sequence's whole life.
        self.block_hashes: list[int] = []
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # the prefix-cache hit at the latest admission
        self.num_preemptions = 0
        self.logprobs: list[SampleLogprobs] = []  # one per output token when sampling_params.logprobs is set
        # Trailing entries of `token_ids` that are PENDING_TOKEN: sampled on the device, not yet read.
        self.num_pending_tokens = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def last_token_id(self) -> int:
        return self.token_ids[-1]

    @property
    def num_known_tokens(self) -> int:
        """Tokens whose values the host has: all but the trailing pending ones."""
        return len(self.token_ids) - self.num_pending_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens whose K/V are not in the cache yet: what is left to run before the next sample."""
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int, logprobs: SampleLogprobs | None = None) -> None:
        """Adds one sampled token (its K/V are computed by the next step that runs it)."""
        self.token_ids.append(token_id)
        if logprobs is not None:
            self.logprobs.append(logprobs)

    def fill_pending_token(self, token_id: int, logprobs: SampleLogprobs | None = None) -> int:
        """Gives the oldest pending token its value; returns its index in `token_ids`."""
        if self.num_pending_tokens == 0:
            raise RuntimeError(f"sequence {self.seq_id} has no pending token to fill")
        index = len(self.token_ids) - self.num_pending_tokens
        self.token_ids[index] = token_id
        self.num_pending_tokens -= 1
        if logprobs is not None:
            self.logprobs.append(logprobs)
        return index

    def drop_pending_tokens(self) -> None:
        """Forgets tokens still being sampled (the sequence ended before they were read)."""
        if self.num_pending_tokens:
            del self.token_ids[-self.num_pending_tokens :]
            self.num_pending_tokens = 0

    def fork(self, seq_id: int, sample_index: int) -> Sequence:
        """A fresh, waiting copy of this request's prompt: completion number `sample_index` of `n`.

        This is how the LLM layer serves `n > 1`: one sequence per completion, each with `n=1`. A
        seeded request gives each child `seed + sample_index`, so the completions differ yet the
        whole set is reproducible. The children share the prompt's KV through the prefix cache once
        one of them has computed it.
        """
        params = self.sampling_params
        # Modulo 2**64: the seed stays a valid 64-bit seed, and torch reads a negative one the same way.
        seed = None if params.seed is None else (params.seed + sample_index) % 2**64
        return Sequence(seq_id, self.prompt_token_ids, dataclasses.replace(params, n=1, seed=seed))

    def __len__(self) -> int:
        return len(self.token_ids)

    def __repr__(self) -> str:
        return (
            f"Sequence(id={self.seq_id}, status={self.status.name}, tokens={self.num_prompt_tokens}"
            f"+{self.num_output_tokens}, computed={self.num_computed_tokens}, blocks={self.block_table})"
        )
