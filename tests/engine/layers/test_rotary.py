"""get_rope / RotaryEmbedding against transformers' own rotary modules and apply functions."""

from __future__ import annotations

import pytest
import torch
from transformers import GPTNeoXConfig, LlamaConfig, NanoChatConfig, Phi3Config
from transformers.models.gpt_neox import modeling_gpt_neox as neox
from transformers.models.gptj import modeling_gptj as gptj
from transformers.models.llama import modeling_llama as llama
from transformers.models.nanochat import modeling_nanochat as nanochat
from transformers.models.phi3 import modeling_phi3 as phi3

from engine.layers import LengthDependentRotaryEmbedding, RotaryEmbedding, get_rope

HEADS, KV_HEADS, HEAD_DIM = 4, 2, 16


def hf_rotate(rotary_module, apply_fn, positions, query, key):
    """HF's path: cos/sin from the rotary module, applied to [1, heads, T, D] tensors."""
    q = query.reshape(len(positions), -1, HEAD_DIM).transpose(0, 1)[None]
    k = key.reshape(len(positions), -1, HEAD_DIM).transpose(0, 1)[None]
    cos, sin = rotary_module(q, positions[None])
    q, k = apply_fn(q, k, cos, sin)
    return q[0].transpose(0, 1).reshape(query.shape), k[0].transpose(0, 1).reshape(key.shape)


def random_qk(num_tokens, dtype=torch.float32):
    return torch.randn(num_tokens, HEADS * HEAD_DIM, dtype=dtype), torch.randn(
        num_tokens, KV_HEADS * HEAD_DIM, dtype=dtype
    )


def llama_config(rope_parameters, max_position=512):
    return LlamaConfig(
        hidden_size=HEADS * HEAD_DIM,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=max_position,
        rope_parameters=rope_parameters,
    )


LLAMA_ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "factor": 4.0, "rope_theta": 50000.0},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
        "rope_theta": 500000.0,
    },
    "yarn": {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 128,
        "rope_theta": 10000.0,
    },
}


@pytest.mark.parametrize("name", sorted(LLAMA_ROPES))
def test_llama_rope_types_match_hf(name):
    config = llama_config(dict(LLAMA_ROPES[name]))
    rope = get_rope(config, HEAD_DIM)
    positions = torch.randperm(500)[:37]
    query, key = random_qk(37)
    ours = rope(positions, query, key)
    theirs = hf_rotate(llama.LlamaRotaryEmbedding(config), llama.apply_rotary_pos_emb, positions, query, key)
    torch.testing.assert_close(ours, theirs)
    if name == "yarn":
        assert rope.attention_scaling != 1.0  # the cos/sin scaling is actually exercised


def test_dynamic_ntk_recomputes_past_max_position_like_hf():
    config = llama_config({"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}, max_position=64)
    rope = get_rope(config, HEAD_DIM)
    assert isinstance(rope, LengthDependentRotaryEmbedding)
    for positions in (torch.arange(40), torch.arange(150)):  # within, then beyond max_position_embeddings
        query, key = random_qk(len(positions))
        theirs = hf_rotate(
            llama.LlamaRotaryEmbedding(config), llama.apply_rotary_pos_emb, positions, query, key
        )
        torch.testing.assert_close(rope(positions, query, key), theirs)
    short_q, short_k = random_qk(5)
    long_result = rope(torch.arange(145, 150), short_q, short_k)[0]
    assert not torch.allclose(
        long_result,
        get_rope(llama_config({"rope_type": "default"}), HEAD_DIM)(torch.arange(145, 150), short_q, short_k)[
            0
        ],
    )


@pytest.mark.parametrize("partial", [1.0, 0.5])
def test_phi3_longrope_short_and_long_match_hf(partial):
    rotary_dim = int(HEAD_DIM * partial)
    generator = torch.Generator().manual_seed(0)
    config = Phi3Config(
        hidden_size=HEADS * HEAD_DIM,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=256,
        original_max_position_embeddings=64,
        partial_rotary_factor=partial,
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "short_factor": (1 + torch.rand(rotary_dim // 2, generator=generator)).tolist(),
            "long_factor": (1 + 4 * torch.rand(rotary_dim // 2, generator=generator)).tolist(),
        },
    )
    rope = get_rope(config, HEAD_DIM)
    assert rope.rotary_dim == rotary_dim
    for positions in (torch.arange(50), torch.arange(200)):  # short factors, then long ones
        query, key = random_qk(len(positions))
        theirs = hf_rotate(phi3.Phi3RotaryEmbedding(config), phi3.apply_rotary_pos_emb, positions, query, key)
        torch.testing.assert_close(rope(positions, query, key), theirs)


@pytest.mark.parametrize(
    "kwargs,factor",
    [
        ({"rotary_pct": 0.25}, 0.25),  # the pre-v5 config name
        ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}}, 0.5),
    ],
)
def test_gpt_neox_partial_rotary_matches_hf(kwargs, factor):
    config = GPTNeoXConfig(hidden_size=HEADS * HEAD_DIM, num_attention_heads=HEADS, **kwargs)
    rope = get_rope(config, HEAD_DIM)
    assert rope.rotary_dim == int(HEAD_DIM * factor)
    positions = torch.tensor([0, 3, 1, 200, 77, 5])
    query, key = torch.randn(6, HEADS, HEAD_DIM), torch.randn(6, HEADS, HEAD_DIM)  # [T, H, D] form
    ours = rope(positions, query, key)
    assert ours[0].shape == query.shape
    theirs = hf_rotate(neox.GPTNeoXRotaryEmbedding(config), neox.apply_rotary_pos_emb, positions, query, key)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(ours[0][..., rope.rotary_dim :], query[..., rope.rotary_dim :], rtol=0, atol=0)


def test_gptj_style_matches_rotate_every_two():
    rotary_dim = 8
    rope = get_rope(llama_config(None), HEAD_DIM, rotary_dim=rotary_dim, is_neox_style=False)
    positions = torch.tensor([4, 0, 9, 63, 2])
    query = torch.randn(5, HEADS * HEAD_DIM)
    ours, _ = rope(positions, query, query.clone())

    # GPT-J's attention: sin|cos table, gathered by position, applied to the first rotary_dim features.
    sincos = gptj.create_sinusoidal_positions(64, rotary_dim)[positions][None]  # [1, T, rotary_dim]
    sin, cos = torch.split(sincos, rotary_dim // 2, dim=-1)
    q = query.reshape(1, 5, HEADS, HEAD_DIM)  # GPT-J keeps [batch, T, heads, D] while rotating
    q_rot = gptj.apply_rotary_pos_emb(q[..., :rotary_dim], sin, cos)
    theirs = torch.cat([q_rot, q[..., rotary_dim:]], dim=-1).reshape(5, -1)
    torch.testing.assert_close(ours, theirs)


def test_bf16_rotation_keeps_dtype_and_matches_hf():
    config = llama_config(dict(LLAMA_ROPES["llama3"]))
    positions = torch.arange(20)
    query, key = random_qk(20, torch.bfloat16)
    ours = get_rope(config, HEAD_DIM)(positions, query, key)
    theirs = hf_rotate(llama.LlamaRotaryEmbedding(config), llama.apply_rotary_pos_emb, positions, query, key)
    assert ours[0].dtype == torch.bfloat16
    torch.testing.assert_close(ours, theirs)


def test_rotary_argument_errors():
    with pytest.raises(ValueError, match="rotary_dim"):
        RotaryEmbedding(8, 10, 16, torch.ones(5))
    with pytest.raises(ValueError, match="inv_freq"):
        RotaryEmbedding(8, 8, 16, torch.ones(3))
    with pytest.raises(ValueError, match="disagrees"):
        get_rope(llama_config(dict(LLAMA_ROPES["linear"])), HEAD_DIM, rotary_dim=8)


def test_empty_step_keeps_shapes():
    rope = get_rope(llama_config(dict(LLAMA_ROPES["default"])), HEAD_DIM)
    query, key = random_qk(0)
    out_query, out_key = rope(torch.zeros(0, dtype=torch.long), query, key)
    assert out_query.shape == query.shape and out_key.shape == key.shape


def test_forward_matches_cos_sin_applied_by_hand():
    # cos_sin stays the public view of the angles the forward (and the CUDA kernel) uses.
    rope = get_rope(llama_config(dict(LLAMA_ROPES["yarn"])), HEAD_DIM)
    positions = torch.tensor([7, 3, 300, 0])
    query, key = random_qk(4)
    cos, sin = rope.cos_sin(positions)
    q = query.view(4, HEADS, HEAD_DIM)
    first, second = q[..., : HEAD_DIM // 2], q[..., HEAD_DIM // 2 :]
    expected = torch.cat(
        [first * cos[:, None] - second * sin[:, None], second * cos[:, None] + first * sin[:, None]], -1
    )
    torch.testing.assert_close(rope(positions, query, key)[0], expected.view(4, -1), rtol=0, atol=0)


def test_one_rope_per_layer_type_matches_hf_for_each_type():
    # OLMo3: `rope_parameters` keyed by layer type; HF's rotary module computes each type's cos/sin.
    from transformers import Olmo3Config
    from transformers.models.olmo3 import modeling_olmo3 as olmo3

    config = Olmo3Config(
        hidden_size=HEADS * HEAD_DIM,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        num_hidden_layers=2,
        layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=512,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "rope_theta": 500000.0, "factor": 4.0},
        },
    )
    hf_module = olmo3.Olmo3RotaryEmbedding(config)
    positions = torch.tensor([0, 3, 17, 200])
    query, key = random_qk(len(positions))
    results = {}
    for layer_type in ("sliding_attention", "full_attention"):
        q = query.reshape(len(positions), -1, HEAD_DIM).transpose(0, 1)[None]
        k = key.reshape(len(positions), -1, HEAD_DIM).transpose(0, 1)[None]
        cos, sin = hf_module(q, positions[None], layer_type)
        hf_q, hf_k = olmo3.apply_rotary_pos_emb(q, k, cos, sin)
        ours_q, ours_k = get_rope(config, HEAD_DIM, layer_type=layer_type)(
            positions, query.clone(), key.clone()
        )
        torch.testing.assert_close(ours_q, hf_q[0].transpose(0, 1).reshape(query.shape))
        torch.testing.assert_close(ours_k, hf_k[0].transpose(0, 1).reshape(key.shape))
        results[layer_type] = ours_q
    assert not torch.allclose(results["sliding_attention"], results["full_attention"])  # the types differ
    assert set(config.rope_parameters) == {"sliding_attention", "full_attention"}  # config left as it was
    with pytest.raises(ValueError, match="one rope per layer type"):
        get_rope(config, HEAD_DIM)


def test_reverse_rotation_matches_a_rotate_half_that_returns_x2_then_minus_x1():
    # NanoChat's rotate_half is `cat((x2, -x1))`: each pair turns by minus its angle.
    config = NanoChatConfig(
        hidden_size=HEADS * HEAD_DIM, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS
    )
    positions = torch.tensor([0, 5, 2, 130, 17])
    query, key = random_qk(5)
    theirs = hf_rotate(
        nanochat.NanoChatRotaryEmbedding(config), nanochat.apply_rotary_pos_emb, positions, query, key
    )
    reverse = get_rope(config, HEAD_DIM, reverse=True)
    torch.testing.assert_close(reverse(positions, query, key), theirs)
    assert "reverse=True" in repr(reverse)
    forward = get_rope(config, HEAD_DIM)(positions, query, key)
    assert not torch.allclose(forward[0], theirs[0])


def test_a_base_given_for_a_config_field_of_its_own_replaces_the_configs_theta():
    # Remote code that keeps its base in a field get_rope does not read (`rotary_emb_base`) passes it.
    config = llama_config(dict(LLAMA_ROPES["default"]))
    rope = get_rope(config, HEAD_DIM, rope_theta=500000.0)
    expected = 1.0 / (500000.0 ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float) / HEAD_DIM))
    torch.testing.assert_close(rope.inv_freq, expected, rtol=0, atol=0)
    assert not torch.equal(get_rope(config, HEAD_DIM).inv_freq, expected)
    with pytest.raises(ValueError, match="disagrees"):
        get_rope(llama_config(dict(LLAMA_ROPES["linear"])), HEAD_DIM, rope_theta=123.0)


def test_tables_rounded_to_a_half_dtype_rotate_as_code_caching_them_in_it():
    # Remote code that caches cos/sin in bfloat16 whatever the model's dtype (falcon_rw's
    # `cos_sin(..., dtype=torch.bfloat16)`), then rotates float32 q and k by them.
    config = LlamaConfig(hidden_size=HEADS * HEAD_DIM, num_attention_heads=HEADS)
    positions = torch.arange(7)
    query, key = random_qk(7)
    exact = get_rope(config, HEAD_DIM)
    rounded = get_rope(config, HEAD_DIM, table_dtype=torch.bfloat16)
    cos, sin = exact.cos_sin(positions)
    by_hand = RotaryEmbedding._rotate(exact, query, cos.bfloat16().float(), sin.bfloat16().float())
    q, k = rounded(positions, query, key)
    torch.testing.assert_close(q, by_hand, rtol=0, atol=0)
    assert q.dtype == torch.float32 and k.shape == key.shape
    assert (exact(positions, query, key)[0] - q).abs().max() > 1e-4  # the rounding shows
    with pytest.raises(ValueError, match="default rope only"):
        get_rope(
            LlamaConfig(rope_scaling={"rope_type": "linear", "factor": 2.0}),
            HEAD_DIM,
            table_dtype=torch.bfloat16,
        )
