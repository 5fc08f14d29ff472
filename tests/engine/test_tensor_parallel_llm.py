"""LLM at tensor_parallel_size=2 on CPU (gloo): same tokens as tp=1 and HF, and failures that surface.

One tp=2 engine is spawned for the module (a small KV budget and token budget, so its steps chunk,
mix and preempt); its last test makes a worker fail mid-step, so it must stay last.
"""

from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys
import textwrap

import pytest
import torch

from engine import LLM, SamplingParams
from engine.worker import WorkerError
from tests.conftest import REPO_ROOT, find_free_port
from tests.tiny_model import (
    FAILURE_TRIGGER_TOKEN,
    FailsInForwardOnRankOne,
    FailsToBuildOnRankOne,
    reference_greedy,
)

MAX_TOKENS = 8
EOS = 2
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
SEEDED = SamplingParams(temperature=0.8, seed=99, n=2, max_tokens=MAX_TOKENS, ignore_eos=True)
ENGINE_ARGS = dict(device="cpu", num_kv_blocks=8, max_num_batched_tokens=16)


def _prompts() -> list[list[int]]:
    generator = torch.Generator().manual_seed(2)
    return [torch.randint(3, 290, (n,), generator=generator).tolist() for n in (2, 9, 17, 30, 38)]


@pytest.fixture(scope="module")
def tp1_greedy(tiny_model_dir) -> list[list[int]]:
    with LLM(str(tiny_model_dir), model_class=FailsInForwardOnRankOne, **ENGINE_ARGS) as llm:
        return _token_ids(llm.generate(_prompts(), GREEDY))


@pytest.fixture(scope="module")
def tp2(tiny_model_dir, tp1_greedy):
    # After the tp=1 run: a process holds one tensor-parallel group, so the two engines cannot overlap.
    llm = LLM(str(tiny_model_dir), tensor_parallel_size=2, model_class=FailsInForwardOnRankOne, **ENGINE_ARGS)
    yield llm
    llm.shutdown()


def _token_ids(outputs) -> list[list[int]]:
    return [completion.token_ids for output in outputs for completion in output.outputs]


def test_greedy_tp2_matches_tp1_and_the_reference_through_chunking_and_preemption(
    tp2, tp1_greedy, tiny_reference
):
    expected = [reference_greedy(tiny_reference, p, MAX_TOKENS, eos_token_id=EOS) for p in _prompts()]
    assert _token_ids(tp2.generate(_prompts(), GREEDY)) == expected
    assert tp1_greedy == expected
    assert tp2.num_preemptions > 0


def test_a_second_engine_cannot_join_a_live_group(tp2, tiny_model_dir):
    with pytest.raises(RuntimeError, match="already in a torch.distributed group of 2 ranks"):
        LLM(str(tiny_model_dir), device="cpu")


def test_seeded_sampling_and_prefix_cache_at_tp2(tp2):
    prompts = _prompts()[2:4]
    first = tp2.generate(prompts, SEEDED)
    second = tp2.generate(prompts, SEEDED)
    assert _token_ids(first) == _token_ids(second)
    assert first[0].outputs[0].token_ids != first[0].outputs[1].token_ids
    assert second[1].num_cached_tokens > 0  # the 30-token prompt's first block stayed cached


def test_worker_failure_mid_step_surfaces_with_its_message(tp2):
    with pytest.raises(WorkerError, match=r"(?s)rank 1 failed.*rank 1 was told to fail in this forward"):
        tp2.generate([_prompts()[0], [FAILURE_TRIGGER_TOKEN, 5, 6]], GREEDY)
    for child in multiprocessing.active_children():
        child.join(timeout=5)
    assert multiprocessing.active_children() == []
    with pytest.raises(RuntimeError, match="shut down"):
        tp2.generate(_prompts()[:1], GREEDY)


def test_worker_failure_while_loading_surfaces_from_the_constructor(tiny_model_dir):
    with pytest.raises(WorkerError, match="rank 1 was told to fail while building the model"):
        LLM(str(tiny_model_dir), tensor_parallel_size=2, model_class=FailsToBuildOnRankOne, device="cpu")
    assert multiprocessing.active_children() == []


_TORCHRUN_SCRIPT = """
import json, os, sys
sys.path.insert(0, {repo!r})
from engine import LLM, SamplingParams
from engine.models.registry import register_model

register_model("TinyTestForCausalLM", "tests.tiny_model:TinyTestForCausalLM")
with LLM({model!r}, device="cpu") as llm:
    outputs = llm.generate({prompts!r}, SamplingParams(temperature=0, max_tokens={max_tokens}))
with open(os.path.join({out!r}, "rank" + os.environ["RANK"] + ".json"), "w") as handle:
    json.dump([o.outputs[0].token_ids for o in outputs], handle)
"""


def test_torchrun_ranks_share_one_generate(tiny_model_dir, tiny_reference, tmp_path):
    prompts = _prompts()[:3]
    script = tmp_path / "run_tp.py"
    script.write_text(
        textwrap.dedent(
            _TORCHRUN_SCRIPT.format(
                repo=str(REPO_ROOT),
                model=str(tiny_model_dir),
                prompts=prompts,
                max_tokens=MAX_TOKENS,
                out=str(tmp_path),
            )
        )
    )
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--master-addr", "127.0.0.1", "--master-port", str(find_free_port()), str(script),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = [reference_greedy(tiny_reference, p, MAX_TOKENS, eos_token_id=EOS) for p in prompts]
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == expected
