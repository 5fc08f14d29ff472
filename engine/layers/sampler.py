"""Turns each sequence's logits into its next token, following that request's `SamplingParams`.

Order of operations, per row: repetition penalty (HF), presence/frequency penalties (OpenAI),
temperature, then top-k, top-p and min-p truncation, then a draw. Greedy rows (temperature 0) take the
argmax of the penalized logits. Logprobs are those of the distribution after penalties and
temperature and before truncation (greedy rows: after penalties, at temperature 1), so every top-N
entry is finite and they describe the model's preference rather than the sampler's cut.

The draw is an exponential race: the token is `argmax(p / q)` with `q ~ Exp(1)` i.i.d., which picks
token i with probability p_i. A seeded row draws its `q` from its own `torch.Generator`, so its
tokens depend only on its logits and its seed, never on the rows sampled beside it.
"""

from __future__ import annotations

from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass

import torch
from torch import nn

from engine.host_copy import values_to_device
from engine.sampling_params import SamplingParams
from engine.sequence import SampleLogprobs


@dataclass(slots=True)
class SamplerOutput:
    token_ids: torch.Tensor  # int64 [num_seqs]
    logprobs: list[SampleLogprobs | None] | None  # per row, None where not asked; None if no row asked


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """The per-request generator a seeded sequence keeps for its whole life (on the logits' device)."""
    return torch.Generator(device=device).manual_seed(seed)


class Sampler(nn.Module):
    """Samples one token per row of `logits`; see the module docstring for the order of operations."""

    def forward(
        self,
        logits: torch.Tensor,
        params: SequenceOf[SamplingParams],
        prompt_token_ids: SequenceOf[SequenceOf[int]] | None = None,
        output_token_ids: SequenceOf[SequenceOf[int]] | None = None,
        generators: SequenceOf[torch.Generator | None] | None = None,
    ) -> SamplerOutput:
        """`logits` [num_seqs, vocab]; one `params` entry per row.

        `prompt_token_ids`/`output_token_ids` are needed when a row has a penalty (the repetition
        penalty looks at both, presence/frequency at the output only). `generators[i]` must be given
        for every row with a seed, and is advanced only by rows that actually draw.
        """
        if logits.dim() != 2 or logits.shape[0] != len(params):
            raise ValueError(f"logits {tuple(logits.shape)} do not match {len(params)} sampling params")
        with_penalties = any(p.has_penalties for p in params)
        # Penalties write in place, so they get a copy (the caller keeps its own); nothing else
        # writes, and at a decode batch the copy is a pass over [batch, vocab] floats per step.
        logits = logits.to(torch.float32, copy=with_penalties)
        if with_penalties:
            if prompt_token_ids is None or output_token_ids is None:
                raise ValueError("penalties need prompt_token_ids and output_token_ids")
            apply_penalties(logits, params, prompt_token_ids, output_token_ids)
        greedy = [p.is_greedy for p in params]
        if not all(greedy):
            temperatures = [1.0 if p.is_greedy else p.temperature for p in params]
            logits = logits / values_to_device(temperatures, torch.float32, logits.device).unsqueeze(1)

        if all(greedy):
            token_ids = logits.argmax(dim=-1)
        else:
            truncated = apply_top_k_top_p(logits, params)
            truncated = apply_min_p(truncated, params)
            token_ids = _exponential_race(truncated.softmax(dim=-1), params, generators)
            if any(greedy):
                greedy_rows = values_to_device(greedy, torch.bool, logits.device)
                token_ids = torch.where(greedy_rows, logits.argmax(dim=-1), token_ids)

        logprobs = None
        if any(p.logprobs is not None for p in params):
            logprobs = _gather_logprobs(logits, token_ids, params)
        return SamplerOutput(token_ids=token_ids, logprobs=logprobs)


def apply_penalties(
    logits: torch.Tensor,
    params: SequenceOf[SamplingParams],
    prompt_token_ids: SequenceOf[SequenceOf[int]],
    output_token_ids: SequenceOf[SequenceOf[int]],
) -> None:
    """In place. Repetition (HF): a logit of a token seen in prompt or output is divided by the
    penalty if positive, multiplied if not. Presence/frequency (OpenAI): subtract
    `frequency * count + presence * (count > 0)` over the output's token counts."""
    vocab = logits.shape[1]
    repeat_rows = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
    if repeat_rows:
        seen_ids = [list(prompt_token_ids[i]) + list(output_token_ids[i]) for i in repeat_rows]
        seen = _token_counts(seen_ids, vocab, logits.device) > 0
        penalty = _row_values([params[i].repetition_penalty for i in repeat_rows], logits)
        rows = logits[repeat_rows]
        penalized = torch.where(rows > 0, rows / penalty, rows * penalty)
        logits[repeat_rows] = torch.where(seen, penalized, rows)
    count_rows = [i for i, p in enumerate(params) if p.presence_penalty != 0.0 or p.frequency_penalty != 0.0]
    if count_rows:
        counts = _token_counts([output_token_ids[i] for i in count_rows], vocab, logits.device)
        frequency = _row_values([params[i].frequency_penalty for i in count_rows], logits)
        presence = _row_values([params[i].presence_penalty for i in count_rows], logits)
        logits[count_rows] -= frequency * counts + presence * (counts > 0).float()


def apply_top_k_top_p(logits: torch.Tensor, params: SequenceOf[SamplingParams]) -> torch.Tensor:
    """Sets to -inf what top-k then top-p (on the top-k-renormalized distribution) drop.

    Ties with the k-th largest logit are all kept. Top-p keeps the smallest set of most likely tokens
    whose probability reaches top_p (the most likely token is always kept).
    """
    use_top_k = any(p.top_k != -1 for p in params)
    use_top_p = any(p.top_p < 1.0 for p in params)
    if not (use_top_k or use_top_p):
        return logits
    vocab = logits.shape[1]
    ascending, order = logits.sort(dim=-1)
    if use_top_k:
        top_k = [vocab if p.top_k == -1 else min(p.top_k, vocab) for p in params]
        kth_index = vocab - values_to_device(top_k, torch.long, logits.device).unsqueeze(1)
        kth_largest = ascending.gather(1, kth_index)
        ascending = ascending.masked_fill(ascending < kth_largest, float("-inf"))
    if use_top_p:
        # Dropping the least likely tokens while their total stays <= 1 - top_p leaves mass >= top_p.
        cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
        drop_mass = 1.0 - _row_values([p.top_p for p in params], logits)
        drop = cumulative <= drop_mass
        drop[:, -1] = False
        ascending = ascending.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, ascending)


def apply_min_p(logits: torch.Tensor, params: SequenceOf[SamplingParams]) -> torch.Tensor:
    """Sets to -inf tokens whose probability is below `min_p` times the most likely token's."""
    if not any(p.min_p > 0.0 for p in params):
        return logits
    probs = logits.softmax(dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * _row_values([p.min_p for p in params], logits)
    return logits.masked_fill(probs < threshold, float("-inf"))


def _exponential_race(
    probs: torch.Tensor,
    params: SequenceOf[SamplingParams],
    generators: SequenceOf[torch.Generator | None] | None,
) -> torch.Tensor:
    noise = torch.empty_like(probs)
    seeded = [i for i, p in enumerate(params) if p.seed is not None and not p.is_greedy]
    if len(seeded) < len(params):
        noise.exponential_()  # the shared RNG, in one call, for every unseeded row
    for row in seeded:
        generator = None if generators is None else generators[row]
        if generator is None:
            raise ValueError(f"row {row} has seed {params[row].seed} but no generator")
        noise[row].exponential_(generator=generator)
    # Exp(1) can return exactly 0; a masked token (p = 0) must not win through 0 / 0 = nan.
    noise.clamp_min_(torch.finfo(noise.dtype).tiny)
    return (probs / noise).argmax(dim=-1)


def _gather_logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, params: SequenceOf[SamplingParams]
) -> list[SampleLogprobs | None]:
    logprobs = logits.log_softmax(dim=-1)
    sampled = logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1).tolist()
    max_top = min(max(p.logprobs or 0 for p in params), logits.shape[1])
    top_values, top_ids = logprobs.topk(max_top, dim=-1)
    top_values, top_ids = top_values.tolist(), top_ids.tolist()
    token_list = token_ids.tolist()
    result: list[SampleLogprobs | None] = []
    for row, p in enumerate(params):
        if p.logprobs is None:
            result.append(None)
            continue
        top = list(zip(top_ids[row][: p.logprobs], top_values[row][: p.logprobs]))
        result.append(SampleLogprobs(token_list[row], sampled[row], top))
    return result


def _token_counts(token_ids: SequenceOf[SequenceOf[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[rows, vocab] float counts of each token id per row; ids outside the vocab are ignored."""
    width = max((len(ids) for ids in token_ids), default=0)
    # Pad with `vocab`, an extra column that is cut off afterwards; out-of-vocab ids land there too.
    padded = [
        [t if 0 <= t < vocab else vocab for t in ids] + [vocab] * (width - len(ids)) for ids in token_ids
    ]
    index = torch.tensor(padded, dtype=torch.int64, device=device).reshape(len(token_ids), width)
    counts = torch.zeros(len(token_ids), vocab + 1, device=device)
    counts.scatter_add_(1, index, torch.ones(index.shape, device=device))
    return counts[:, :vocab]


def _row_values(values: list[float], like: torch.Tensor) -> torch.Tensor:
    return values_to_device(values, torch.float32, like.device).unsqueeze(1)
