"""engine.model_loader: build on the right device/dtype, stream every tensor in, name what does not fit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import FalconConfig, GPT2Config, GPTBigCodeConfig, LlamaConfig

from engine.config import attention_shape, portable_class_reference, resolve_dtype, resolve_max_model_len
from engine.model_loader import default_dtype, load_model, load_tokenizer
from engine.models.registry import register_model, resolve_model_class
from tests.tiny_model import TinyTestForCausalLM, write_tiny_model


class _RecordingTinyModel(TinyTestForCausalLM):
    """Records what load_model hands to load_weights, to check it streams rather than materialises."""

    received_iterator = False
    loaded_names: set[str] = set()

    def load_weights(self, weights):
        type(self).received_iterator = iter(weights) is weights
        type(self).loaded_names = super().load_weights(weights)
        return type(self).loaded_names


def _copy_with_checkpoint(source: Path, destination: Path, edit) -> Path:
    """A copy of the model directory whose tensors `edit(dict)` changed in place."""
    shutil.copytree(source, destination)
    tensors = load_file(destination / "model.safetensors")
    edit(tensors)
    save_file(tensors, destination / "model.safetensors")
    return destination


def test_streams_every_checkpoint_tensor_into_the_fused_parameters(tiny_model_dir):
    model, hf_config = load_model(tiny_model_dir, torch.float32, "cpu", model_class=_RecordingTinyModel)
    checkpoint = load_file(tiny_model_dir / "model.safetensors")

    assert _RecordingTinyModel.received_iterator
    assert _RecordingTinyModel.loaded_names == set(checkpoint)
    attention = model.model.layers[1].self_attn
    expected_qkv = torch.cat([checkpoint[f"model.layers.1.self_attn.{p}_proj.weight"] for p in "qkv"])
    torch.testing.assert_close(attention.qkv_proj.weight, expected_qkv, rtol=0, atol=0)
    expected_gate_up = torch.cat([checkpoint[f"model.layers.0.mlp.{p}_proj.weight"] for p in ("gate", "up")])
    torch.testing.assert_close(
        model.model.layers[0].mlp.gate_up_proj.weight, expected_gate_up, rtol=0, atol=0
    )
    torch.testing.assert_close(model.lm_head.weight[: hf_config.vocab_size], checkpoint["lm_head.weight"])
    assert not model.training


def test_builds_in_the_requested_dtype_and_restores_the_default(tiny_model_dir):
    model, _ = load_model(
        tiny_model_dir, torch.bfloat16, torch.device("cpu"), model_class=TinyTestForCausalLM
    )
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert torch.get_default_dtype() == torch.float32


def test_default_dtype_is_restored_when_the_block_raises():
    with pytest.raises(RuntimeError), default_dtype(torch.float16):
        assert torch.get_default_dtype() == torch.float16
        raise RuntimeError("boom")
    assert torch.get_default_dtype() == torch.float32


def test_resolves_the_class_from_the_registry(tiny_model_dir):
    model, _ = load_model(tiny_model_dir, torch.float32, "cpu")  # the fixture registered the architecture
    assert type(model) is TinyTestForCausalLM


def test_unknown_checkpoint_tensor_is_named(tiny_model_dir, tmp_path):
    def add_stray(tensors):
        tensors["model.layers.0.self_attn.rotary_scale.weight"] = torch.ones(4)

    broken = _copy_with_checkpoint(tiny_model_dir, tmp_path / "stray", add_stray)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.rotary_scale\.weight"):
        load_model(broken, torch.float32, "cpu", model_class=TinyTestForCausalLM)


def test_missing_checkpoint_tensor_is_named(tiny_model_dir, tmp_path):
    def drop(tensors):
        del tensors["model.norm.weight"]
        del tensors["model.layers.1.self_attn.k_proj.weight"]

    broken = _copy_with_checkpoint(tiny_model_dir, tmp_path / "missing", drop)
    with pytest.raises(ValueError) as error:
        load_model(broken, torch.float32, "cpu", model_class=TinyTestForCausalLM)
    assert "model.norm.weight" in str(error.value)
    assert "model.layers.1.self_attn.qkv_proj.weight" in str(error.value)  # its 'k' shard is missing
    assert str(broken) in str(error.value)


def test_tokenizer_is_loaded_only_when_the_directory_has_one(tiny_model_dir, tmp_path):
    tokenizer = load_tokenizer(tiny_model_dir)
    assert tokenizer is not None
    assert tokenizer.encode("w5 w7") == [5, 7]
    assert load_tokenizer(write_tiny_model(tmp_path / "bare", with_tokenizer=False)) is None


def test_auto_dtype_prefers_the_checkpoint_then_the_device_default():
    saved = LlamaConfig(dtype="bfloat16")
    unsaved = LlamaConfig()
    assert resolve_dtype("auto", saved, "cpu") == torch.bfloat16
    assert resolve_dtype("auto", unsaved, "cpu") == torch.float32
    assert resolve_dtype("auto", unsaved, "cuda") == torch.bfloat16
    assert resolve_dtype("float16", saved, "cpu") == torch.float16
    assert resolve_dtype(torch.float32, saved, "cuda") == torch.float32
    with pytest.raises(ValueError, match="float8"):
        resolve_dtype("float8", saved, "cpu")


def test_attention_shape_reads_the_names_each_config_uses():
    llama = attention_shape(LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2))
    assert (llama.num_heads, llama.num_kv_heads, llama.head_dim) == (4, 2, 16)
    gpt2 = attention_shape(GPT2Config(n_embd=96, n_head=6, n_layer=3))
    assert (gpt2.num_layers, gpt2.num_heads, gpt2.num_kv_heads, gpt2.head_dim) == (3, 6, 6, 16)
    assert llama.num_kv_heads_per_rank(4) == 1  # replicated past the KV head count
    assert gpt2.num_kv_heads_per_rank(2) == 3
    assert attention_shape(GPTBigCodeConfig(n_head=8, multi_query=True)).num_kv_heads == 1
    assert attention_shape(FalconConfig(num_attention_heads=8, multi_query=True)).num_kv_heads == 1
    falcon_grouped = FalconConfig(num_attention_heads=8, num_kv_heads=2, new_decoder_architecture=True)
    assert attention_shape(falcon_grouped).num_kv_heads == 2


def test_max_model_len_defaults_to_the_model_limit_and_refuses_more():
    config = LlamaConfig(max_position_embeddings=256)
    assert resolve_max_model_len(None, config) == 256
    assert resolve_max_model_len(100, config) == 100
    with pytest.raises(ValueError, match="300.*256"):
        resolve_max_model_len(300, config)


def test_a_class_registered_from_a_file_reaches_other_processes_as_its_path(tiny_model_dir, tmp_path):
    source = tmp_path / "my_port.py"
    source.write_text(
        "from tests.tiny_model import TinyTestForCausalLM\n\nclass MyPort(TinyTestForCausalLM):\n    pass\n"
    )
    register_model("MyPortForCausalLM", f"{source}:MyPort")
    model_class = resolve_model_class(["MyPortForCausalLM"])
    assert portable_class_reference(TinyTestForCausalLM) is TinyTestForCausalLM  # importable by name
    reference = portable_class_reference(model_class)
    assert reference == f"{source}:MyPort"
    model, _ = load_model(tiny_model_dir, torch.float32, "cpu", model_class=reference)
    assert type(model).__name__ == "MyPort"


class _WithBuffers(torch.nn.Module):
    """A learned activation's layout: parameters, a persistent constant, a non-persistent cache."""

    def __init__(self) -> None:
        super().__init__()
        self.alpha = torch.nn.Parameter(torch.zeros(1))
        self.register_buffer("beta", torch.tensor([0.5]))
        self.register_buffer("cache", torch.zeros(3), persistent=False)


def test_persistent_buffers_load_from_the_checkpoint_and_others_are_unknown():
    from engine.weights import load_named_weights

    model = torch.nn.Sequential(_WithBuffers())
    loaded = load_named_weights(model, [("0.alpha", torch.tensor([2.0])), ("0.beta", torch.tensor([0.25]))])
    assert loaded == {"0.alpha", "0.beta"}
    assert model[0].beta.item() == 0.25
    # a buffer the checkpoint lacks keeps its value; one the state dict never holds is not a target
    load_named_weights(model, [("0.alpha", torch.tensor([1.0]))])
    assert model[0].beta.item() == 0.25
    with pytest.raises(ValueError, match=r"no parameter or buffer: 0\.cache"):
        load_named_weights(model, [("0.alpha", torch.tensor([1.0])), ("0.cache", torch.ones(3))])
    with pytest.raises(ValueError, match="shape mismatch"):
        load_named_weights(model, [("0.alpha", torch.tensor([1.0])), ("0.beta", torch.ones(2))])


class _BuildsInConfigDtype(TinyTestForCausalLM):
    """Builds one tensor in `config.dtype`, as Apertus' xIELU activation does."""

    def __init__(self, config):
        super().__init__(config)
        self.register_buffer("config_dtype_tensor", torch.ones(2, dtype=config.dtype), persistent=False)


def test_the_config_says_the_dtype_the_model_runs_in(tiny_model_dir):
    """A checkpoint saved in float32 loaded in bfloat16: what the model builds in `config.dtype` is
    bfloat16 too (it was float32 and fed float32 into the bf16 projections), and the caller's config
    is left as it was."""
    from engine.model_loader import load_hf_config

    hf_config = load_hf_config(tiny_model_dir)
    saved = hf_config.dtype
    model, used = load_model(
        tiny_model_dir, torch.bfloat16, "cpu", model_class=_BuildsInConfigDtype, hf_config=hf_config
    )
    assert model.config_dtype_tensor.dtype == torch.bfloat16
    assert used.dtype == torch.bfloat16 and hf_config.dtype == saved


def test_a_setting_the_installed_config_class_moved_stays_readable_by_its_written_name(tmp_path):
    # transformers 4.36's GPT-NeoX config.json names `rotary_pct`; the installed class moves it
    # into `rope_parameters`, and a port of the 4.36 modeling file reads `config.rotary_pct`.
    from transformers import GPTNeoXConfig

    from engine.model_loader import load_hf_config

    GPTNeoXConfig().save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    written.update(rotary_pct=0.25, rotary_emb_base=500)
    (tmp_path / "config.json").write_text(json.dumps(written))

    config = load_hf_config(tmp_path)

    assert (config.rotary_pct, config.rotary_emb_base) == (0.25, 500)
    assert config.rope_parameters["partial_rotary_factor"] == 0.25  # the installed name holds it too


class _Declared(torch.nn.Module):
    """Loading described by tables on the class, as a port declares it."""

    packed_modules_mapping = {"gate_up": [("gate", 0), ("up", 1)]}
    tied_weights = {"head.weight": "embed.weight"}
    ignored_weights = [r"\.inv_freq$"]

    def __init__(self) -> None:
        from engine.layers import MergedColumnParallelLinear

        super().__init__()
        self.gate_up = MergedColumnParallelLinear(2, [3, 3], bias=False)
        self.embed = torch.nn.Embedding(4, 2)


def test_a_class_declaring_its_tables_loads_through_the_shared_loader():
    from engine.weights import load_declared_weights

    model = _Declared()
    gate, up, embed = torch.randn(3, 2), torch.randn(3, 2), torch.randn(4, 2)
    checkpoint = [
        ("gate.weight", gate),
        ("up.weight", up),
        ("embed.weight", embed),
        ("head.weight", embed),
        ("rope.inv_freq", torch.ones(1)),
    ]
    loaded = load_declared_weights(model, checkpoint)
    assert loaded == {"gate.weight", "up.weight", "embed.weight", "head.weight"}
    assert torch.equal(model.gate_up.weight, torch.cat([gate, up]))
    with pytest.raises(ValueError, match="up"):
        load_declared_weights(_Declared(), checkpoint[:1] + checkpoint[2:])
