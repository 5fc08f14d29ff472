"""`porter verify --set KEY=VALUE`: overrides of the small verify config, for variants of an architecture."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from porter.cli import app
from porter.errors import PorterError
from porter.verify.small_model import apply_overrides, parse_overrides, small_config


def test_values_are_json_literals_or_else_strings():
    assert parse_overrides(
        ["alibi=true", "num_kv_heads=2", "rope=null", "act=gelu", 'name="x=y"', "ratio=0.5"]
    ) == {
        "alibi": True,
        "num_kv_heads": 2,
        "rope": None,
        "act": "gelu",
        "name": "x=y",
        "ratio": 0.5,
    }


def test_an_item_without_a_key_and_value_is_an_error():
    with pytest.raises(PorterError, match="KEY=VALUE"):
        parse_overrides(["alibi"])


def test_overrides_change_the_small_config():
    config = small_config("falcon", "FalconForCausalLM")
    assert config.new_decoder_architecture is False
    apply_overrides(config, {"new_decoder_architecture": True, "num_kv_heads": 2})
    assert (config.new_decoder_architecture, config.num_kv_heads) == (True, 2)


def test_a_key_the_config_does_not_have_is_an_error_naming_it():
    config = small_config("falcon", "FalconForCausalLM")
    with pytest.raises(PorterError, match="FalconConfig has no attribute 'new_decoder_arch'"):
        apply_overrides(config, {"new_decoder_arch": True})


@pytest.mark.parametrize(
    ("setting", "phrase"), [("new_decoder_arch=true", "new_decoder_arch"), ("alibi", "KEY=VALUE")]
)
def test_the_cli_fails_in_one_line(setting, phrase):
    result = CliRunner().invoke(app, ["verify", "falcon", "--set", setting])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and phrase in lines[0], result.output


def test_small_config_sets_a_head_dim_the_config_class_leaves_to_the_checkpoint():
    # MinistralConfig's head_dim defaults to None and its attention cannot run without one.
    config = small_config("ministral", "MinistralForCausalLM")
    assert config.head_dim == config.hidden_size // config.num_attention_heads


def test_small_config_shrinks_every_per_layer_list_to_the_small_layer_count():
    # GPT-Neo's attention_layers (one entry per layer, checked against num_layers) and layer_types.
    config = small_config("gpt_neo", "GPTNeoForCausalLM")
    assert len(config.attention_layers) == config.num_layers
    assert set(config.attention_layers) == {"global", "local"}
    gemma2 = small_config("gemma2", "Gemma2ForCausalLM")
    assert len(gemma2.layer_types) == gemma2.num_hidden_layers


def test_small_config_shrinks_windows_and_rotated_widths_to_where_they_show():
    # A window longer than the prompts masks nothing, and GPT-J's default rotary_dim (64) is wider
    # than the small model's heads (HF's own model then fails).
    neo = small_config("gpt_neo", "GPTNeoForCausalLM")
    assert neo.window_size == 8
    gptj = small_config("gptj", "GPTJForCausalLM")
    head = gptj.hidden_size // gptj.num_attention_heads
    assert gptj.rotary_dim == head // 2


def test_the_small_config_is_of_the_class_the_causal_lm_takes():
    """Gemma3ForCausalLM takes the text config (`gemma3_text`); the model type `gemma3` names the
    multimodal one, which its causal LM cannot be built from."""
    from transformers import Gemma3TextConfig

    config = small_config("gemma3", "Gemma3ForCausalLM")
    assert type(config) is Gemma3TextConfig
    assert (config.hidden_size, config.num_attention_heads, config.architectures) == (
        64,
        4,
        ["Gemma3ForCausalLM"],
    )
