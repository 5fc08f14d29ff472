"""Sampler: greedy, truncation masks, penalties, seeded draws, the sampled distribution, logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from engine.layers.sampler import Sampler, apply_min_p, apply_penalties, apply_top_k_top_p, make_generator
from engine.sampling_params import SamplingParams

sampler = Sampler()


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


# Upper 1e-4 tail of the chi-square distribution, by degrees of freedom.
CHI_SQUARE_CRITICAL = {2: 18.42, 4: 23.51}


def reference_top_k_top_p(row: torch.Tensor, top_k: int, top_p: float) -> set[int]:
    """Kept token ids, by the textbook definition, one row at a time."""
    order = sorted(range(len(row)), key=lambda i: -float(row[i]))
    if top_k != -1:
        order = order[:top_k]
    probs = torch.softmax(row[order], dim=0).tolist()
    kept, mass = [], 0.0
    for token, prob in zip(order, probs):
        kept.append(token)
        mass += prob
        if mass >= top_p:
            break
    return set(kept)


def test_greedy_is_argmax_even_beside_random_rows():
    torch.manual_seed(0)
    logits = torch.randn(8, 100)
    params = [SamplingParams(temperature=0.0 if i % 2 == 0 else 1.0) for i in range(8)]
    tokens = sampler(logits, params).token_ids
    assert tokens.dtype == torch.int64 and tokens.shape == (8,)
    assert torch.equal(tokens[::2], logits.argmax(dim=-1)[::2])
    assert torch.equal(sampler(logits, [SamplingParams(temperature=0.0)] * 8).token_ids, logits.argmax(-1))


@pytest.mark.parametrize("temperature", [1.0, 0.7, 3.0])
def test_top_k_one_is_greedy(temperature):
    torch.manual_seed(1)
    logits = torch.randn(64, 50)
    tokens = sampler(logits, [SamplingParams(temperature=temperature, top_k=1)] * 64).token_ids
    assert torch.equal(tokens, logits.argmax(dim=-1))


def test_sampler_does_not_modify_the_callers_logits():
    logits = torch.randn(3, 10)
    before = logits.clone()
    params = [SamplingParams(repetition_penalty=1.5, top_p=0.5, temperature=0.5)] * 3
    sampler(logits, params, [[1, 2]] * 3, [[3]] * 3)
    assert torch.equal(logits, before)
    # Without penalties the sampler works on the caller's tensor itself (no copy): still read-only.
    unpenalized = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=0.7, top_k=3, top_p=0.8, min_p=0.1, seed=1, logprobs=2),
        SamplingParams(temperature=1.3),
    ]
    generators = [None, make_generator(1, "cpu"), None]
    sampler(logits, unpenalized, generators=generators)
    assert torch.equal(logits, before)


def test_top_k_top_p_masks_match_the_textbook_definition():
    torch.manual_seed(2)
    settings = [(-1, 1.0), (5, 1.0), (-1, 0.5), (7, 0.8), (1, 0.3), (-1, 0.95), (30, 0.05), (100, 0.99)]
    logits = torch.randn(len(settings), 30) * 2
    params = [SamplingParams(top_k=k, top_p=p) for k, p in settings]
    masked = apply_top_k_top_p(logits, params)
    for row, (k, p) in enumerate(settings):
        kept = set(torch.isfinite(masked[row]).nonzero().flatten().tolist())
        assert kept == reference_top_k_top_p(logits[row], k, p), (k, p)
        assert torch.equal(masked[row][list(kept)], logits[row][list(kept)])


def test_top_p_on_hand_picked_probabilities():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    for top_p, expected in [
        (0.4, {0}),
        (0.7, {0, 1}),
        (0.85, {0, 1, 2}),
        (0.9, {0, 1, 2}),
        (1.0, {0, 1, 2, 3}),
    ]:
        masked = apply_top_k_top_p(logits, [SamplingParams(top_p=top_p)])
        assert set(torch.isfinite(masked[0]).nonzero().flatten().tolist()) == expected, top_p


def test_min_p_drops_tokens_below_the_scaled_maximum():
    torch.manual_seed(3)
    logits = torch.randn(4, 40) * 2
    min_ps = [0.0, 0.05, 0.3, 1.0]
    masked = apply_min_p(logits, [SamplingParams(min_p=m) for m in min_ps])
    probs = logits.softmax(dim=-1)
    for row, min_p in enumerate(min_ps):
        expected = probs[row] >= min_p * probs[row].max()
        assert torch.equal(torch.isfinite(masked[row]), expected)
    assert torch.isfinite(masked[3]).sum() == 1  # min_p = 1 keeps only the most likely token


def test_penalties_match_hand_computed_values():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0], [2.0, -1.0, 0.5, 3.0, -2.0]])
    params = [
        SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25),
        SamplingParams(),  # untouched beside a penalized row
    ]
    prompts, outputs = [[0, 1], [0, 1]], [[1, 3, 3, 99], [1, 3]]  # 99 lies outside the vocab: ignored
    apply_penalties(logits, params, prompts, outputs)
    # Repetition over {0, 1, 3}: 2 -> 1, -1 -> -2, 3 -> 1.5. Then output counts {1: 1, 3: 2}:
    # token 1: -2 - 0.25 - 0.5; token 3: 1.5 - 0.5 - 0.5.
    expected = torch.tensor([[1.0, -2.75, 0.5, 0.5, -2.0], [2.0, -1.0, 0.5, 3.0, -2.0]])
    torch.testing.assert_close(logits, expected)


def test_penalties_change_the_greedy_choice():
    logits = torch.tensor([[3.0, 2.9, 0.0]])
    greedy = SamplingParams(temperature=0.0, frequency_penalty=0.2)
    assert sampler(logits, [greedy], [[2]], [[0]]).token_ids.item() == 1
    assert sampler(logits, [SamplingParams(temperature=0.0)], [[2]], [[0]]).token_ids.item() == 0
    repeated = SamplingParams(temperature=0.0, repetition_penalty=1.1)
    assert sampler(logits, [repeated], [[0]], [[]]).token_ids.item() == 1  # prompt tokens count too


def draw_seeded(rows: list[tuple[torch.Tensor, SamplingParams]], steps: int) -> list[list[int]]:
    """Samples `steps` tokens for every row, each seeded row keeping its own generator across steps."""
    generators = [None if p.seed is None else make_generator(p.seed, "cpu") for _, p in rows]
    logits = torch.stack([row for row, _ in rows])
    params = [p for _, p in rows]
    drawn = []
    for _ in range(steps):
        drawn.append(sampler(logits, params, generators=generators).token_ids.tolist())
    return [list(column) for column in zip(*drawn)]


def test_a_seeded_row_is_reproducible_and_independent_of_its_batch():
    torch.manual_seed(4)
    target = torch.randn(1000) * 0.1  # near uniform: different seeds almost surely disagree
    seeded = SamplingParams(seed=1234, top_p=0.9)
    others = [(torch.randn(1000), SamplingParams(seed=s)) for s in range(3)]
    alone = draw_seeded([(target, seeded)], steps=8)[0]
    torch.manual_seed(99)  # the shared RNG state must not matter either
    first_batch = draw_seeded([others[0], (target, seeded), (torch.randn(1000), SamplingParams())], steps=8)
    second_batch = draw_seeded([*others, (torch.randn(1000), SamplingParams()), (target, seeded)], steps=8)
    assert first_batch[1] == second_batch[-1] == alone
    different_seed = draw_seeded([(target, SamplingParams(seed=1235, top_p=0.9))], steps=8)[0]
    assert different_seed != alone


def test_temperature_sampling_follows_the_softmax():
    torch.manual_seed(5)
    logits = torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0])
    temperature = 0.8
    samples = sampler(logits.expand(20_000, 5), [SamplingParams(temperature=temperature)] * 20_000).token_ids
    counts = torch.bincount(samples, minlength=5).float()
    assert chi_square(counts, torch.softmax(logits / temperature, dim=0)) < CHI_SQUARE_CRITICAL[4]


def test_seeded_draws_follow_the_truncated_softmax():
    logits = torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0])
    params = [SamplingParams(temperature=1.5, top_k=3, seed=seed) for seed in range(6000)]
    generators = [make_generator(p.seed, "cpu") for p in params]
    samples = sampler(logits.expand(6000, 5), params, generators=generators).token_ids
    counts = torch.bincount(samples, minlength=5).float()
    assert counts[[2, 4]].sum() == 0  # outside the top 3
    kept = torch.tensor([0, 1, 3])
    probs = torch.softmax(logits[kept] / 1.5, dim=0)
    assert chi_square(counts[kept], probs) < CHI_SQUARE_CRITICAL[2]


def test_logprobs_of_the_sampled_token_and_the_top_n():
    torch.manual_seed(6)
    logits = torch.randn(4, 20)
    params = [
        SamplingParams(temperature=0.7, logprobs=3, top_k=5),
        SamplingParams(logprobs=None),
        SamplingParams(temperature=0.0, logprobs=0, repetition_penalty=1.3),
        SamplingParams(temperature=1.2, logprobs=25),  # more than the vocab: capped
    ]
    prompts, outputs = [[1]] * 4, [[2]] * 4
    result = sampler(logits, params, prompts, outputs)
    assert result.logprobs is not None and result.logprobs[1] is None
    penalized = logits.clone()
    apply_penalties(penalized, params, prompts, outputs)
    for row, temperature in [(0, 0.7), (2, 1.0), (3, 1.2)]:
        reference = torch.log_softmax(penalized[row] / temperature, dim=0)
        entry = result.logprobs[row]
        token = int(result.token_ids[row])
        assert entry.token_id == token
        assert math.isclose(entry.logprob, float(reference[token]), rel_tol=1e-5, abs_tol=1e-6)
        count = min(params[row].logprobs, 20)
        values, ids = reference.topk(count)
        assert [t for t, _ in entry.top_logprobs] == ids.tolist()
        torch.testing.assert_close(torch.tensor([v for _, v in entry.top_logprobs]), values)
    assert result.logprobs[2].top_logprobs == [] and len(result.logprobs[3].top_logprobs) == 20
    assert sampler(logits, [SamplingParams()] * 4).logprobs is None


def test_missing_inputs_are_reported():
    logits = torch.randn(2, 5)
    with pytest.raises(ValueError, match="generator"):
        sampler(logits, [SamplingParams(), SamplingParams(seed=3)], generators=[None, None])
    with pytest.raises(ValueError, match="penalties"):
        sampler(logits, [SamplingParams(presence_penalty=1.0), SamplingParams()])
    with pytest.raises(ValueError, match="do not match"):
        sampler(logits, [SamplingParams()])
