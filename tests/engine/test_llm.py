"""LLM end to end on CPU at tp=1, against HF's dense no-cache forward of the same checkpoint.

Every scheduling path (whole prompts, chunked prefill mixed with decodes, preemption by recompute,
prefix-cache hits) must give exactly the reference's greedy tokens.
"""

from __future__ import annotations

import multiprocessing

import pytest
import torch

from engine import LLM, SamplingParams
from engine.llm_engine import IncrementalDetokenizer
from tests.tiny_model import reference_greedy

MAX_TOKENS = 10
EOS = 2


def _prompts() -> list[list[int]]:
    generator = torch.Generator().manual_seed(1)
    # 1 token, under one block, exactly one block, several blocks, and one long enough to chunk.
    lengths = [1, 5, 16, 23, 41]
    return [torch.randint(3, 290, (n,), generator=generator).tolist() for n in lengths]


GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)


@pytest.fixture(autouse=True)
def _one_thread():
    # A tiny model runs fastest single-threaded, and a loaded CI box makes spinning OpenMP threads crawl.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def expected(tiny_reference) -> list[list[int]]:
    torch.set_num_threads(1)
    return [reference_greedy(tiny_reference, prompt, MAX_TOKENS, eos_token_id=EOS) for prompt in _prompts()]


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    with LLM(str(tiny_model_dir), device="cpu") as engine:
        yield engine


def _token_ids(outputs) -> list[list[int]]:
    return [output.outputs[0].token_ids for output in outputs]


def test_greedy_matches_the_dense_reference(llm, expected):
    outputs = llm.generate(_prompts(), GREEDY)
    assert _token_ids(outputs) == expected
    assert [o.prompt_token_ids for o in outputs] == _prompts()
    for output, tokens in zip(outputs, expected):
        completion = output.outputs[0]
        assert completion.finish_reason == ("stop" if tokens[-1] == EOS else "length")
        assert completion.text == llm.tokenizer.decode(tokens, skip_special_tokens=True)


def test_preemption_under_a_tiny_kv_budget_keeps_the_outputs(tiny_model_dir, expected):
    # 8 blocks of 16 hold 128 tokens; the five requests need about 130, so some must be recomputed.
    with LLM(str(tiny_model_dir), device="cpu", num_kv_blocks=8) as small:
        outputs = small.generate(_prompts(), GREEDY)
        assert small.num_preemptions > 0
    assert _token_ids(outputs) == expected


def test_chunked_prefill_keeps_the_outputs(tiny_model_dir, expected):
    with LLM(str(tiny_model_dir), device="cpu", max_num_batched_tokens=7) as chunked:
        steps = []
        original_execute = chunked.engine.driver.execute
        chunked.engine.driver.execute = lambda step: steps.append(step) or original_execute(step)
        outputs = chunked.generate(_prompts(), GREEDY)
    assert _token_ids(outputs) == expected
    assert max(sum(step.query_lens) for step in steps) <= 7
    # Some step must mix a decode token with a prefill chunk of another sequence.
    assert any(1 in step.query_lens and max(step.query_lens) > 1 for step in steps)


def test_prefix_cache_hit_gives_the_same_tokens(llm, tiny_reference):
    shared = _prompts()[4][:32]  # two full blocks
    first, second = shared + [7, 8, 9], shared + [250, 251]
    llm.generate([first], GREEDY)
    output = llm.generate([second], GREEDY)[0]
    assert output.num_cached_tokens == 32
    assert output.outputs[0].token_ids == reference_greedy(tiny_reference, second, MAX_TOKENS, EOS)


def test_text_prompt_goes_through_the_tokenizer(llm, expected):
    prompt = _prompts()[3]
    output = llm.generate(" ".join(f"w{t}" for t in prompt), GREEDY)[0]
    assert output.prompt_token_ids == prompt
    assert output.prompt == " ".join(f"w{t}" for t in prompt)
    assert output.outputs[0].token_ids == expected[3]


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(llm):
    seeded = SamplingParams(temperature=0.9, seed=1234, max_tokens=MAX_TOKENS, ignore_eos=True)
    prompt = _prompts()[2]
    alone = llm.generate([prompt], seeded)[0].outputs[0].token_ids
    unseeded = SamplingParams(temperature=0.9, max_tokens=MAX_TOKENS)
    in_batch = llm.generate([_prompts()[0], prompt, _prompts()[3]], [unseeded, seeded, unseeded])
    assert in_batch[1].outputs[0].token_ids == alone
    other_seed = SamplingParams(temperature=0.9, seed=4321, max_tokens=MAX_TOKENS, ignore_eos=True)
    assert llm.generate([prompt], other_seed)[0].outputs[0].token_ids != alone


def test_n_completions_are_separate_sequences(llm, expected):
    greedy_pair = llm.generate([_prompts()[1]], SamplingParams(temperature=0, n=2, max_tokens=MAX_TOKENS))[0]
    assert [c.index for c in greedy_pair.outputs] == [0, 1]
    assert [c.token_ids for c in greedy_pair.outputs] == [expected[1], expected[1]]

    sampled = SamplingParams(temperature=1.0, n=2, seed=7, max_tokens=MAX_TOKENS, ignore_eos=True)
    first = llm.generate([_prompts()[1]], sampled)[0].outputs
    again = llm.generate([_prompts()[1]], sampled)[0].outputs
    assert [c.token_ids for c in first] == [c.token_ids for c in again]
    assert first[0].token_ids != first[1].token_ids  # seeds seed+0 and seed+1


def test_stop_token_ids_max_tokens_and_stop_strings(llm, expected):
    prompt, reference = _prompts()[3], expected[3]
    stop_token = reference[3]
    stop_index = reference.index(stop_token)
    stopped = llm.generate(
        [prompt], SamplingParams(temperature=0, max_tokens=MAX_TOKENS, stop_token_ids=[stop_token])
    )
    assert stopped[0].outputs[0].token_ids == reference[: stop_index + 1]
    assert stopped[0].outputs[0].finish_reason == "stop"

    short = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=3))[0].outputs[0]
    assert (short.token_ids, short.finish_reason) == (reference[:3], "length")

    full_text = llm.tokenizer.decode(reference, skip_special_tokens=True)
    stop_word = f"w{reference[4]}"
    text_stopped = llm.generate(
        [prompt], SamplingParams(temperature=0, max_tokens=MAX_TOKENS, stop=[stop_word])
    )
    completion = text_stopped[0].outputs[0]
    assert completion.finish_reason == "stop"
    assert completion.text == full_text[: full_text.index(stop_word)]
    assert completion.token_ids == reference[: len(completion.token_ids)]
    assert len(completion.token_ids) <= 5


def test_incremental_detokenizer_adds_up_to_the_whole_decode(llm):
    token_ids = [5, 1, 17, 250, 2, 3, 0, 99]  # specials (0, 1, 2) among words
    detokenizer = IncrementalDetokenizer(llm.tokenizer)
    pieces = [detokenizer.add(token_id) for token_id in token_ids]
    assert "".join(pieces) == detokenizer.text == llm.tokenizer.decode(token_ids, skip_special_tokens=True)
    assert pieces[1] == ""  # a special token adds no text


def test_logprobs_match_the_reference_distribution(llm, tiny_reference):
    prompt = _prompts()[2]
    completion = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=4, logprobs=3))[0].outputs[0]
    assert len(completion.logprobs) == len(completion.token_ids)
    tokens = list(prompt)
    for token_id, entry in zip(completion.token_ids, completion.logprobs):
        with torch.inference_mode():
            reference = tiny_reference(torch.tensor([tokens])).logits[0, -1].log_softmax(-1)
        assert entry.token_id == token_id
        assert entry.logprob == pytest.approx(reference[token_id].item(), abs=1e-4)
        assert [t for t, _ in entry.top_logprobs] == reference.topk(3).indices.tolist()
        tokens.append(token_id)


def test_generate_keeps_request_order_and_accepts_every_prompt_form(llm, expected):
    prompts = _prompts()
    assert _token_ids(llm.generate(prompts[::-1], GREEDY)) == expected[::-1]
    assert _token_ids(llm.generate(prompts[2], GREEDY)) == [expected[2]]  # one prompt as a token list
    assert llm.generate([], GREEDY) == []
    with pytest.raises(ValueError, match="2 sampling params for 5 prompts"):
        llm.generate(prompts, [GREEDY, GREEDY])


def test_prompt_too_long_for_the_model_is_refused(llm):
    with pytest.raises(ValueError, match="max_model_len 256"):
        llm.generate([[5] * 256], GREEDY)


def test_tp_that_does_not_divide_the_heads_fails_before_anything_starts(tiny_model_dir):
    with pytest.raises(ValueError, match=r"number of attention heads \(4\).*tensor-parallel size \(3\)"):
        LLM(str(tiny_model_dir), device="cpu", tensor_parallel_size=3)
    assert multiprocessing.active_children() == []
