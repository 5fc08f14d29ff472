"""Bad input to the engine is one clear exception that names the problem, never a traceback from deep
inside torch, transformers or the hub client; and properties that hold for any input: sampling
parameters either validate or raise ValueError, and a small random checkpoint either loads and
generates what HF generates or is refused with a ValueError naming the tensor at fault."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from engine import LLM, SamplingParams
from engine.sampling_params import SamplingParams as Params
from tests.conftest import REPO_ROOT
from tests.tiny_model import reference_greedy


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _copy(model_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(model_dir, tmp_path / "model"))


# ---------------------------------------------------------------------------------------- LLM(...)


def test_a_missing_model_directory_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="model directory missing/dir does not exist"):
        LLM("missing/dir", device="cpu")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        LLM(str(tmp_path), device="cpu")


def test_a_file_is_not_a_model_directory(tiny_model_dir):
    with pytest.raises(NotADirectoryError, match="is not a directory"):
        LLM(str(tiny_model_dir / "config.json"), device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error is for machines without a GPU")
def test_cuda_without_a_gpu_is_a_clear_error(tiny_model_dir):
    with pytest.raises(ValueError, match="device 'cuda' asked for, but torch .* sees no CUDA device"):
        LLM(str(tiny_model_dir), device="cuda")


def test_a_truncated_checkpoint_names_its_file(tiny_model_dir, tmp_path):
    model_dir = _copy(tiny_model_dir, tmp_path)
    checkpoint = model_dir / "model.safetensors"
    checkpoint.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    with pytest.raises(ValueError, match=f"cannot read checkpoint file {checkpoint}"):
        LLM(str(model_dir), device="cpu", num_kv_blocks=4)


def test_a_quantized_checkpoint_is_refused_naming_its_method(tiny_model_dir, tmp_path):
    model_dir = _copy(tiny_model_dir, tmp_path)
    config = json.loads((model_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": 128}
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"is a quantized checkpoint \(awq\); the engine runs unquantized"):
        LLM(str(model_dir), device="cpu")


def test_token_ids_outside_the_vocabulary_are_refused(tiny_model_dir):
    with LLM(str(tiny_model_dir), device="cpu", num_kv_blocks=8) as llm:
        for prompt, outside in (([5, 300], "300"), ([-1, 5], "-1")):
            message = rf"prompt token ids \[{outside}\] are outside the vocabulary \[0, 300\)"
            with pytest.raises(ValueError, match=message):
                llm.generate([prompt], SamplingParams(max_tokens=2))
        assert not llm.engine.has_unfinished_requests()
        assert len(llm.generate([[5]], SamplingParams(max_tokens=2))[0].outputs[0].token_ids) == 2


# ------------------------------------------------------- tensor parallelism from a plain script

_SCRIPT_HEAD = f"""
    import sys
    sys.path.insert(0, {str(REPO_ROOT)!r})
    from engine import LLM, SamplingParams
    from engine.models.registry import register_model
"""


def _run_script(tmp_path: Path, body: str) -> subprocess.CompletedProcess:
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(_SCRIPT_HEAD) + textwrap.dedent(body))
    return subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=240, check=False
    )


@pytest.mark.slow
def test_tensor_parallelism_from_a_script_without_a_main_guard(tiny_model_dir, tmp_path):
    # The README's snippet, saved as a script as a new user would: no `if __name__ == "__main__":`.
    result = _run_script(
        tmp_path,
        f"""
        register_model("TinyTestForCausalLM", "tests.tiny_model:TinyTestForCausalLM")
        llm = LLM({str(tiny_model_dir)!r}, tensor_parallel_size=2, device="cpu", num_kv_blocks=8)
        print("tokens", llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=3))[0].outputs[0].token_ids)
        try:
            llm.generate([[5, 300]], SamplingParams(max_tokens=2))
        except ValueError as error:
            print("refused:", error)
        """,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "tokens [" in result.stdout
    assert "refused: prompt token ids [300] are outside the vocabulary [0, 300)" in result.stdout


@pytest.mark.slow
def test_a_model_class_in_a_script_without_a_main_guard_says_to_add_one(tiny_model_dir, tmp_path):
    # The workers must run this script to find the class, and the script builds an LLM as they do.
    result = _run_script(
        tmp_path,
        f"""
        from tests.tiny_model import TinyTestForCausalLM

        class ScriptModel(TinyTestForCausalLM):
            pass

        LLM({str(tiny_model_dir)!r}, tensor_parallel_size=2, device="cpu", model_class=ScriptModel)
        """,
    )
    assert result.returncode != 0
    guard = 'put that call under `if __name__ == "__main__":`'
    assert guard in result.stderr  # the worker's own message
    assert 'put that under `if __name__ == "__main__":`' in result.stderr.splitlines()[-1]  # the script's


# ----------------------------------------------------------------------------------- properties

_ANY_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=5),
    st.lists(st.one_of(st.integers(-5, 5), st.text(max_size=3), st.none()), max_size=3),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
)
_FIELDS = list(Params.__dataclass_fields__)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.sampled_from(_FIELDS), _ANY_VALUE, max_size=4))
def test_sampling_params_validate_or_raise_value_error(fields):
    try:
        params = Params(**fields)
    except ValueError as error:
        assert str(error)  # a message, naming the field
        assert any(name in str(error) for name in fields)
        return
    # What validated is usable: the limits the scheduler and sampler rely on hold.
    assert params.max_tokens >= 1 and params.n >= 1 and params.temperature >= 0
    assert 0 < params.top_p <= 1 and (params.top_k == -1 or params.top_k >= 1)
    assert all(isinstance(stop, str) and stop for stop in params.stop)
    assert params.find_stop_string("some text", 0) is None or params.stop


@pytest.fixture(scope="module")
def small_llm(tiny_model_dir):
    with LLM(str(tiny_model_dir), device="cpu", num_kv_blocks=16) as llm:
        yield llm


_EXTREME_PARAMS = st.fixed_dictionaries(
    {},
    optional={
        "temperature": st.sampled_from([0.0, 1e-300, 1e-6, 0.7, 1e300]),
        "top_k": st.sampled_from([-1, 1, 2, 10**12]),
        "top_p": st.sampled_from([1e-300, 0.5, 1.0]),
        "min_p": st.sampled_from([0.0, 0.5, 1.0]),
        "repetition_penalty": st.sampled_from([1e-300, 0.5, 1.0, 1e300]),
        "presence_penalty": st.floats(-2, 2),
        "frequency_penalty": st.floats(-2, 2),
        "seed": st.sampled_from([None, 0, -(2**63), 2**64 - 1]),
        "max_tokens": st.integers(1, 4),
        "stop": st.lists(st.sampled_from(["w5", "w100", " ", "w2"]), max_size=2),
        "stop_token_ids": st.lists(st.integers(0, 10**6), max_size=2),
        "ignore_eos": st.booleans(),
        "n": st.integers(1, 3),
        "logprobs": st.sampled_from([None, 0, 3, 10**6]),
    },
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fields=_EXTREME_PARAMS)
def test_sampling_params_that_validate_run(small_llm, fields):
    # Extreme but valid values must never fail inside a step, where they would stop a server for all.
    params = Params(**fields)
    output = small_llm.generate([[5, 6, 7]], params, show_progress=False)[0]
    assert len(output.outputs) == params.n
    assert all(1 <= len(completion.token_ids) <= params.max_tokens for completion in output.outputs)
    blocks = small_llm.engine.scheduler.block_manager
    assert blocks.num_free_blocks == blocks.num_blocks


_DAMAGE = ["none", "drop_tensor", "extra_tensor", "wrong_vocab"]


@st.composite
def _small_llama(draw):
    num_kv_heads = draw(st.sampled_from([1, 2, 4]))
    num_heads = num_kv_heads * draw(st.sampled_from([1, 2]))
    head_dim = draw(st.sampled_from([4, 8, 16]))
    return dict(
        vocab_size=draw(st.integers(16, 200)),
        hidden_size=num_heads * head_dim,
        intermediate_size=draw(st.sampled_from([8, 24, 64])),
        num_hidden_layers=draw(st.integers(1, 2)),
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=64,
        tie_word_embeddings=draw(st.booleans()),
        rms_norm_eps=1e-6,
        bos_token_id=0,
        eos_token_id=1,
    )


@pytest.mark.slow
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(config=_small_llama(), damage=st.sampled_from(_DAMAGE), seed=st.integers(0, 100))
def test_a_random_small_checkpoint_loads_right_or_is_refused_by_name(tmp_path_factory, config, damage, seed):
    model_dir = tmp_path_factory.mktemp("llama")
    torch.manual_seed(seed)
    hf_config = LlamaConfig(**config)
    hf_model = LlamaForCausalLM(hf_config).eval()
    with torch.no_grad():
        for param in hf_model.parameters():
            param.normal_(0.0, 0.3)
    hf_model.save_pretrained(model_dir)
    checkpoint = model_dir / "model.safetensors"
    tensors = load_file(checkpoint)
    expected_error = None
    if damage == "drop_tensor":
        name = sorted(name for name in tensors if "layers.0." in name)[seed % 4]
        del tensors[name]
        expected_error = name.rsplit(".", 2)[0]  # a fused parameter is named by its packed module
    elif damage == "extra_tensor":
        tensors["model.layers.0.mystery.weight"] = torch.zeros(2)
        expected_error = "model.layers.0.mystery.weight"
    elif damage == "wrong_vocab":
        stored = json.loads((model_dir / "config.json").read_text())
        stored["vocab_size"] += 64
        (model_dir / "config.json").write_text(json.dumps(stored))
        expected_error = "checkpoint tensor lm_head.weight|checkpoint tensor model.embed_tokens.weight"
    save_file(tensors, checkpoint, metadata={"format": "pt"})
    prompt = [2 + (seed % (config["vocab_size"] - 2)), 3, 2]
    if expected_error is not None:
        with pytest.raises(ValueError) as refused:
            LLM(str(model_dir), device="cpu", num_kv_blocks=8)
        message = str(refused.value)
        assert str(model_dir) in message
        assert any(part in message for part in expected_error.split("|")), message
        return
    with LLM(str(model_dir), device="cpu", num_kv_blocks=8) as llm:
        tokens = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert tokens[0].outputs[0].token_ids == reference_greedy(hf_model, prompt, 4)
