"""latent-attention: multi-latent attention (DeepSeek-V2/V3's, as transformers 5.17 writes it) ->
MultiLatentAttention, its projections sharded by heads; conditional-modules: a submodule chosen by
a conditional expression -> an if/else."""

from __future__ import annotations

import re

from tests.porter.rewrite_helpers import (
    MINI_MODEL,
    assert_code,
    init_value,
    method_code,
    replace_class,
    run_through,
    vary,
)

# DeepSeek-V3's rotary helpers and attention (transformers 5.17, modeling_deepseek_v3.py), the
# attention renamed to take MiniAttention's place.
ROPE_FUNCTIONS = """
def rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    q_embed = (q * cos) + (rotate_half(q) * sin)
    k_embed = (k * cos) + (rotate_half(k) * sin)
    return q_embed, k_embed


def apply_rotary_pos_emb_interleave(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
    cos = cos[..., : cos.shape[-1] // 2].unsqueeze(unsqueeze_dim)
    sin = sin[..., : sin.shape[-1] // 2].unsqueeze(unsqueeze_dim)
    q1, q2 = q[..., 0::2], q[..., 1::2]
    k1, k2 = k[..., 0::2], k[..., 1::2]
    q_embed = torch.cat([q1 * cos - q2 * sin, q2 * cos + q1 * sin], dim=-1)
    k_embed = torch.cat([k1 * cos - k2 * sin, k2 * cos + k1 * sin], dim=-1)
    return q_embed, k_embed


def apply_rotary_emb(xq, xk, freqs_cis):
    xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))
    xk_ = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
    freqs_cis = freqs_cis.unsqueeze(1).to(xq_.device)
    xq_out = torch.view_as_real(xq_ * freqs_cis).flatten(3).type_as(xq)
    xk_out = torch.view_as_real(xk_ * freqs_cis).flatten(3).type_as(xk)
    return xq_out, xk_out


class MiniMLP(nn.Module):"""

ATTENTION = """
class MiniAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.attention_dropout = config.attention_dropout
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.q_lora_rank = config.q_lora_rank
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.kv_lora_rank = config.kv_lora_rank
        self.v_head_dim = config.v_head_dim
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.qk_head_dim = config.qk_nope_head_dim + config.qk_rope_head_dim
        self.q_proj = (
            nn.Linear(self.hidden_size, self.num_heads * self.qk_head_dim, bias=False)
            if self.q_lora_rank is None
            else None
        )
        self.q_a_proj = (
            nn.Linear(self.hidden_size, config.q_lora_rank, bias=config.attention_bias)
            if self.q_lora_rank is not None
            else None
        )
        self.q_a_layernorm = MiniRMSNorm(config.q_lora_rank) if self.q_lora_rank is not None else None
        self.q_b_proj = (
            nn.Linear(config.q_lora_rank, self.num_heads * self.qk_head_dim, bias=False)
            if self.q_lora_rank is not None
            else None
        )
        self.kv_a_proj_with_mqa = nn.Linear(
            self.hidden_size, config.kv_lora_rank + config.qk_rope_head_dim, bias=config.attention_bias
        )
        self.kv_a_layernorm = MiniRMSNorm(config.kv_lora_rank)
        self.kv_b_proj = nn.Linear(
            config.kv_lora_rank, self.num_heads * (self.qk_nope_head_dim + self.v_head_dim), bias=False
        )
        self.o_proj = nn.Linear(self.num_heads * self.v_head_dim, self.hidden_size, bias=config.attention_bias)
        self.scaling = self.qk_head_dim ** (-0.5)

    def expand_kv(self, kv_nope, k_rot):
        batch_size, _, seq_length, _ = kv_nope.shape
        key_shape = (batch_size, seq_length, -1, self.qk_nope_head_dim + self.v_head_dim)
        kv_nope = self.kv_b_proj(kv_nope).view(key_shape).transpose(1, 2)
        k_nope, value_states = torch.split(kv_nope, [self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        k_rot = k_rot.expand(-1, k_nope.shape[1], -1, -1)
        key_states = kv_nope.new_empty(*kv_nope.shape[:-1], self.qk_nope_head_dim + self.qk_rope_head_dim)
        key_states[..., : self.qk_nope_head_dim].copy_(k_nope)
        key_states[..., self.qk_nope_head_dim :].copy_(k_rot)
        return key_states, value_states

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
        batch_size, seq_length = hidden_states.shape[:-1]
        query_shape = (batch_size, seq_length, -1, self.qk_head_dim)

        if self.q_lora_rank is None:
            q_states = self.q_proj(hidden_states)
        else:
            q_states = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden_states)))
        q_states = q_states.view(query_shape).transpose(1, 2)
        q_pass, q_rot = torch.split(q_states, [self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)

        compressed_kv = self.kv_a_proj_with_mqa(hidden_states)
        kv_nope, k_rot = torch.split(compressed_kv, [self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        kv_nope = self.kv_a_layernorm(kv_nope)
        kv_nope = kv_nope.view(batch_size, 1, seq_length, self.kv_lora_rank)
        k_rot = k_rot.view(batch_size, 1, seq_length, self.qk_rope_head_dim)

        cos, sin = position_embeddings
        if self.config.rope_interleave:
            q_rot, k_rot = apply_rotary_pos_emb_interleave(q_rot, k_rot, cos, sin)
        else:
            q_rot, k_rot = apply_rotary_pos_emb(q_rot, k_rot, cos, sin)

        if past_key_values is not None:
            kv_nope, k_rot = past_key_values.update(kv_nope, k_rot, self.layer_idx)

        query_states = torch.cat((q_pass, q_rot), dim=-1)
        key_states, value_states = self.expand_kv(kv_nope, k_rot)

        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(batch_size, seq_length, -1).contiguous()
        attn_output = self.o_proj(attn_output)
        return attn_output, attn_weights
"""

NORM = """
class MiniRMSNorm(nn.Module):
    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight * hidden_states * torch.rsqrt(variance + self.variance_epsilon)


class MiniMLP(nn.Module):"""


def _with(attention: str = ATTENTION) -> str:
    source = vary(MINI_MODEL, "\nclass MiniMLP(nn.Module):", ROPE_FUNCTIONS)
    source = vary(source, "\nclass MiniMLP(nn.Module):", NORM)
    return replace_class(source, "MiniAttention", attention)


MLA = _with()


def test_core_and_expansion_become_one_call_on_the_latent():
    result = run_through(MLA, "latent-attention")
    assert_code(
        method_code(result.code, "MiniAttention", "forward"),
        """
        def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
            if self.q_lora_rank is None:
                q_states = self.q_proj(hidden_states)
            else:
                q_states = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden_states)))
            q_states = q_states.view(q_states.shape[0], -1, self.qk_head_dim)
            q_pass, q_rot = torch.split(q_states, [self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)

            compressed_kv = self.kv_a_proj_with_mqa(hidden_states)
            kv_nope, k_rot = torch.split(compressed_kv, [self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
            kv_nope = self.kv_a_layernorm(kv_nope)
            q_rot, k_rot = self.rotary_emb(positions, q_rot, k_rot)
            attn_output = self.attn(q_pass, q_rot, kv_nope, k_rot, kv_cache, input_metadata)
            attn_output = self.o_proj(attn_output)
            return attn_output, attn_weights
        """,
    )
    assert "def expand_kv" not in result.code
    assert not result.review_messages()


def test_rope_style_chosen_by_a_setting_and_the_latent_layer_are_built_in_init():
    code = run_through(MLA, "latent-attention").code
    assert init_value(code, "MiniAttention", "rotary_emb") == (
        "get_rope(config, self.qk_rope_head_dim, is_neox_style=not self.config.rope_interleave)"
    )
    assert init_value(code, "MiniAttention", "attn") == (
        "MultiLatentAttention(self.num_heads, self.qk_nope_head_dim, self.qk_rope_head_dim, "
        "self.v_head_dim, self.kv_lora_rank, self.scaling, self.kv_b_proj)"
    )


def test_projections_are_sharded_by_heads_and_the_latent_replicated():
    code = run_through(MLA, "latent-attention").code
    kinds = {
        attr: re.search(r"(\w+Linear)\(", init_value(code, "MiniAttention", attr)).group(1)
        for attr in ("q_b_proj", "kv_b_proj", "o_proj", "kv_a_proj_with_mqa", "q_a_proj")
    }
    assert kinds == {
        "q_b_proj": "ColumnParallelLinear",
        "kv_b_proj": "ColumnParallelLinear",
        "o_proj": "RowParallelLinear",
        "kv_a_proj_with_mqa": "ReplicatedLinear",
        "q_a_proj": "ReplicatedLinear",
    }
    assert "ColumnParallelLinear(self.hidden_size, self.num_heads * self.qk_head_dim" in code  # q_proj


def test_complex_pair_rotation_is_interleaved():
    """DeepSeek-V2 rotates adjacent feature pairs as complex numbers: GPT-J style."""
    attention = vary(
        ATTENTION,
        """        cos, sin = position_embeddings
        if self.config.rope_interleave:
            q_rot, k_rot = apply_rotary_pos_emb_interleave(q_rot, k_rot, cos, sin)
        else:
            q_rot, k_rot = apply_rotary_pos_emb(q_rot, k_rot, cos, sin)
""",
        "        q_rot, k_rot = apply_rotary_emb(q_rot, k_rot, position_embeddings)\n",
    )
    code = run_through(_with(attention), "latent-attention").code
    assert init_value(code, "MiniAttention", "rotary_emb") == (
        "get_rope(config, self.qk_rope_head_dim, is_neox_style=False)"
    )


def test_half_split_rotation_is_neox_style():
    attention = vary(
        ATTENTION,
        """        if self.config.rope_interleave:
            q_rot, k_rot = apply_rotary_pos_emb_interleave(q_rot, k_rot, cos, sin)
        else:
            q_rot, k_rot = apply_rotary_pos_emb(q_rot, k_rot, cos, sin)
""",
        "        q_rot, k_rot = apply_rotary_pos_emb(q_rot, k_rot, cos, sin)\n",
    )
    code = run_through(_with(attention), "latent-attention").code
    assert init_value(code, "MiniAttention", "rotary_emb") == (
        "get_rope(config, self.qk_rope_head_dim, is_neox_style=True)"
    )


def test_a_linear_with_no_role_is_a_review_item():
    attention = vary(
        ATTENTION,
        "        self.scaling = self.qk_head_dim ** (-0.5)\n",
        "        self.scaling = self.qk_head_dim ** (-0.5)\n"
        "        self.gate_proj = nn.Linear(self.hidden_size, self.num_heads, bias=False)\n",
    )
    messages = run_through(_with(attention), "latent-attention").review_messages()
    assert messages == [
        "latent-attention @ MiniAttention.__init__: `self.gate_proj` has no role in the latent attention to shard it by"
    ]


def test_a_core_without_its_scale_is_a_review_item():
    attention = vary(ATTENTION, "            scaling=self.scaling,\n", "")
    messages = run_through(_with(attention), "latent-attention").review_messages()
    assert messages == [
        "latent-attention @ MiniAttention: cannot decide the latent attention of MiniAttention: "
        "the softmax scale (the core is passed no `scaling=`)"
    ]


def test_ordinary_attention_is_left_to_paged_attention():
    result = run_through(MINI_MODEL, "latent-attention")
    assert not result.changes("latent-attention")
    assert "MultiLatentAttention" not in result.code


def test_a_module_chosen_by_a_conditional_expression_becomes_an_if():
    source = vary(
        MINI_MODEL,
        "        self.mlp = MiniMLP(config)\n",
        "        self.mlp = MiniMLP(config) if layer_idx % 2 else MiniMLP(config, 2)\n"
        "        self.extra = nn.Linear(2, 2) if layer_idx else None\n",
    )
    code = run_through(source, "conditional-modules").code
    assert_code(
        method_code(code, "MiniDecoderLayer", "__init__"),
        """
        def __init__(self, config, layer_idx):
            super().__init__()
            self.self_attn = MiniAttention(config, layer_idx)
            if layer_idx % 2:
                self.mlp = MiniMLP(config)
            else:
                self.mlp = MiniMLP(config, 2)
            self.extra = nn.Linear(2, 2) if layer_idx else None
            self.input_layernorm = nn.LayerNorm(config.hidden_size)
            self.post_attention_layernorm = nn.LayerNorm(config.hidden_size)
        """,
    )
