"""Asynchronous scheduling end to end on CPU: the next step launches before the last one's tokens
are read, the device-side hand-over of those tokens, and outputs identical to the synchronous loop.
"""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from engine.model_runner import TokenReadback

MAX_TOKENS = 9


def _prompts() -> list[list[int]]:
    generator = torch.Generator().manual_seed(5)
    return [torch.randint(3, 290, (n,), generator=generator).tolist() for n in (1, 4, 16, 21, 33, 40)]


def _mixed_params(greedy_outputs: list[list[int]]) -> list[SamplingParams]:
    """Greedy with EOS, short and one-token limits, a stop token and a stop string taken from the
    greedy completions (so they do stop), seeded sampling with n=2, and logprobs: every way a
    sequence ends, each a token after the step that follows it was launched."""
    return [
        SamplingParams(temperature=0, max_tokens=MAX_TOKENS),
        SamplingParams(temperature=0, max_tokens=1),
        SamplingParams(temperature=0, max_tokens=MAX_TOKENS, stop=[f"w{greedy_outputs[2][2]}"]),
        SamplingParams(temperature=0.9, seed=3, n=2, max_tokens=MAX_TOKENS, ignore_eos=True),
        SamplingParams(
            temperature=0, max_tokens=MAX_TOKENS, logprobs=2, stop_token_ids=[greedy_outputs[4][3]]
        ),
        SamplingParams(temperature=0, max_tokens=2, ignore_eos=True),
    ]


def _completions(outputs) -> list[list[tuple]]:
    return [
        [
            (
                c.token_ids,
                c.finish_reason,
                c.text,
                None if c.logprobs is None else [(e.token_id, round(e.logprob, 5)) for e in c.logprobs],
            )
            for c in output.outputs
        ]
        for output in outputs
    ]


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize(
    "engine_args",
    [
        dict(),
        # 6 blocks of 16 tokens for ~170 tokens of requests, 24-token steps: chunked prefill mixed with
        # decodes, preemption by recompute while tokens are pending, prefix-cache hits on recompute.
        dict(num_kv_blocks=6, max_num_batched_tokens=24),
    ],
    ids=["roomy", "preempting"],
)
def test_asynchronous_and_synchronous_loops_give_the_same_completions(tiny_model_dir, engine_args):
    prompts = _prompts()
    greedy = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    with LLM(str(tiny_model_dir), device="cpu", async_scheduling=False) as llm:
        params = _mixed_params([o.outputs[0].token_ids for o in llm.generate(prompts, greedy)])
    results = {}
    for overlap in (False, True):
        with LLM(str(tiny_model_dir), device="cpu", async_scheduling=overlap, **engine_args) as llm:
            results[overlap] = (_completions(llm.generate(prompts, params)), llm.num_preemptions)
    assert results[True][0] == results[False][0]
    finish_reasons = {c[1] for output in results[True][0] for c in output}
    assert finish_reasons == {"stop", "length"}
    if engine_args:
        assert results[True][1] > 0


def _record_order(llm: LLM, monkeypatch) -> list[str]:
    """Logs, in order, each step sent to the model ("run") and each wait for sampled tokens ("read")."""
    events: list[str] = []
    driver = llm.engine.driver
    execute = driver.execute
    wait = TokenReadback.wait

    def logged_execute(step):
        events.append("run")
        return execute(step)

    def logged_wait(self):
        events.append("read")
        return wait(self)

    monkeypatch.setattr(driver, "execute", logged_execute)
    monkeypatch.setattr(TokenReadback, "wait", logged_wait)
    return events


def test_each_step_launches_before_the_previous_one_is_read(tiny_model_dir, monkeypatch):
    with LLM(str(tiny_model_dir), device="cpu") as llm:
        events = _record_order(llm, monkeypatch)
        llm.generate(_prompts()[:3], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    # Prefill, then each decode step launches while the step before it is unread: run run read run
    # read ... and the last step is read when nothing is left to launch.
    assert events[:3] == ["run", "run", "read"]
    assert events.count("run") == events.count("read") == 6
    assert all(events[:i].count("run") - events[:i].count("read") <= 2 for i in range(len(events)))


def test_penalties_make_the_loop_synchronous(tiny_model_dir, monkeypatch):
    penalized = SamplingParams(temperature=0, max_tokens=5, repetition_penalty=1.3, ignore_eos=True)
    with LLM(str(tiny_model_dir), device="cpu") as llm:
        events = _record_order(llm, monkeypatch)
        overlapped = llm.generate(_prompts()[:2], penalized)
    assert events == ["run", "read"] * 5
    with LLM(str(tiny_model_dir), device="cpu", async_scheduling=False) as llm:
        synchronous = llm.generate(_prompts()[:2], penalized)
    assert _completions(overlapped) == _completions(synchronous)
