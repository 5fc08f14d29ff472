"""Decode CUDA graphs (`engine/cuda_graphs.py`): replayed steps give the eager steps' and HF's tokens.

A small Llama-shaped checkpoint (head dim 64, GQA 2, so the CUDA decode kernel runs) is served in
float32 by the ported `engine.models.llama`, with graphs and with `enforce_eager=True`; greedy tokens
must equal HF's dense forward. Requests of different lengths finish at different steps, so decode
batches of sizes between the captured ones (padded replays) occur. Skipped without a CUDA device.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from engine import LLM, SamplingParams
from engine.cuda_graphs import capture_sizes
from engine.model_runner import StepInputs
from tests.tiny_model import load_reference, reference_greedy

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

MAX_MODEL_LEN = 256
MAX_NUM_SEQS = 12  # captured sizes 1, 2, 4, 8, 12
NUM_KV_BLOCKS = 128
EOS = 2


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_MODEL_LEN,
        bos_token_id=1,
        eos_token_id=EOS,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.2)  # clear greedy winners, not float-noise ties
    directory = tmp_path_factory.mktemp("llama_small")
    model.save_pretrained(directory)
    return directory


def _requests() -> tuple[list[list[int]], list[int]]:
    generator = torch.Generator().manual_seed(3)
    lengths = [1, 3, 15, 16, 17, 33, 40, 7, 64, 9, 5]
    prompts = [torch.randint(3, 500, (n,), generator=generator).tolist() for n in lengths]
    # Different lengths finish at different steps: decode batches of 11, 10, ..., 1 sequences.
    max_tokens = [12, 3, 9, 5, 11, 2, 7, 10, 4, 8, 6]
    return prompts, max_tokens


@pytest.fixture(scope="module")
def expected(llama_dir: Path) -> list[list[int]]:
    reference = load_reference(llama_dir)
    prompts, max_tokens = _requests()
    return [reference_greedy(reference, p, m, eos_token_id=EOS) for p, m in zip(prompts, max_tokens)]


def _generate(llama_dir: Path, enforce_eager: bool) -> tuple[list[list[int]], list[int]]:
    """Greedy tokens, and the batch sizes of the replayed decode steps."""
    prompts, max_tokens = _requests()
    params = [SamplingParams(temperature=0.0, max_tokens=m) for m in max_tokens]
    replayed: list[int] = []
    with LLM(
        str(llama_dir),
        dtype="float32",
        device="cuda",
        num_kv_blocks=NUM_KV_BLOCKS,
        max_num_seqs=MAX_NUM_SEQS,
        max_model_len=MAX_MODEL_LEN,
        enforce_eager=enforce_eager,
    ) as llm:
        graphs = llm.engine.runner.decode_graphs
        if enforce_eager:
            assert graphs is None
        else:
            assert graphs is not None and graphs.sizes == [1, 2, 4, 8, 12]
            original = graphs.replay
            graphs.replay = lambda ids, pos, md: replayed.append(md.num_seqs) or original(ids, pos, md)
        outputs = llm.generate(prompts, params, show_progress=False)
    return [o.outputs[0].token_ids for o in outputs], replayed


def test_capture_sizes_cover_every_batch_up_to_max_num_seqs():
    assert capture_sizes(256) == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert capture_sizes(12) == [1, 2, 4, 8, 12]
    assert capture_sizes(1000) == [1, 2, 4, 8, 16, 32, 64, 128, 256]


def test_graph_tokens_equal_eager_and_hf(llama_dir, expected):
    with_graphs, replayed = _generate(llama_dir, enforce_eager=False)
    eager, none_replayed = _generate(llama_dir, enforce_eager=True)
    assert with_graphs == expected
    assert eager == expected
    assert none_replayed == []
    # Padded replays happened: decode batches that are no captured size.
    assert set(replayed) - {1, 2, 4, 8, 12}, replayed
    assert max(replayed) == len(expected)


def test_replayed_logits_equal_eager_logits(llama_dir):
    """One decode step of 5 sequences (padded to 8) with scattered blocks: logits match the eager forward."""
    with LLM(
        str(llama_dir),
        dtype="float32",
        device="cuda",
        num_kv_blocks=NUM_KV_BLOCKS,
        max_num_seqs=MAX_NUM_SEQS,
        max_model_len=MAX_MODEL_LEN,
    ) as llm:
        runner = llm.engine.runner
        generator = torch.Generator().manual_seed(7)
        context_lens = [1, 16, 17, 100, 255]
        order = torch.randperm(NUM_KV_BLOCKS, generator=generator).tolist()
        tables, used = [], 0
        for length in context_lens:
            count = -(-length // runner.block_size)
            tables.append(order[used : used + count])
            used += count
        # Fill the cache with random K/V, then decode the last token of each sequence.
        for key_cache, value_cache in runner.kv_caches:
            key_cache.normal_()
            value_cache.normal_()
        step = StepInputs(
            input_ids=torch.randint(3, 500, (5,), generator=generator).tolist(),
            positions=[length - 1 for length in context_lens],
            query_lens=[1] * 5,
            context_lens=context_lens,
            block_tables=tables,
        )
        replayed = runner.execute_model(step).clone()
        graphs, runner.decode_graphs = runner.decode_graphs, None
        eager = runner.execute_model(step)
        runner.decode_graphs = graphs
    assert not replayed.isnan().any()
    torch.testing.assert_close(replayed, eager, atol=1e-4, rtol=1e-4)
