"""head-sharded-norm: an RMSNorm over all heads of q or k splits by heads under tensor parallelism."""

from __future__ import annotations

from tests.porter.rewrite_helpers import MINI_MODEL, init_value, run_through, vary
from tests.porter.test_norm_and_activation import LLAMA_NORM


def _with_norms(q_size: str, k_size: str) -> str:
    before = vary(
        MINI_MODEL,
        "        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=False)\n",
        "        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=False)\n"
        f"        self.q_norm = MiniRMSNorm({q_size}, eps=config.rms_norm_eps)\n"
        f"        self.k_norm = MiniRMSNorm({k_size}, eps=config.rms_norm_eps)\n",
    )
    before = vary(
        before,
        "        query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)\n"
        "        key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)\n",
        "        query_states = self.q_norm(self.q_proj(hidden_states)).view(hidden_shape).transpose(1, 2)\n"
        "        key_states = self.k_norm(self.k_proj(hidden_states)).view(hidden_shape).transpose(1, 2)\n",
    )
    return before + LLAMA_NORM


def test_norms_over_all_query_and_key_heads_split_by_heads():
    before = _with_norms(
        "config.num_attention_heads * self.head_dim", "config.num_key_value_heads * self.head_dim"
    )
    after = run_through(before, "head-sharded-norm")
    assert init_value(after.code, "MiniAttention", "q_norm") == (
        "HeadShardedRMSNorm(config.num_attention_heads, self.head_dim, eps=config.rms_norm_eps)"
    )
    assert init_value(after.code, "MiniAttention", "k_norm") == (
        "HeadShardedRMSNorm(config.num_key_value_heads, self.head_dim, eps=config.rms_norm_eps, kv=True)"
    )


def test_a_per_head_norm_stays_a_plain_norm():
    after = run_through(_with_norms("self.head_dim", "self.head_dim"), "head-sharded-norm")
    assert (
        init_value(after.code, "MiniAttention", "q_norm") == "RMSNorm(self.head_dim, eps=config.rms_norm_eps)"
    )


def _with_sub_norms() -> str:
    """BitNet's sub-norms: one on the attention output before o_proj, one on the MLP activation
    before down_proj; tensor parallelism splits both tensors."""
    before = vary(
        MINI_MODEL,
        "        self.act_fn = ACT2FN[config.hidden_act]\n",
        "        self.act_fn = ACT2FN[config.hidden_act]\n"
        "        self.ffn_sub_norm = MiniRMSNorm(config.intermediate_size, eps=config.rms_norm_eps)\n",
    )
    before = vary(
        before,
        "        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))\n",
        "        return self.down_proj(self.ffn_sub_norm(self.act_fn(self.gate_proj(x)) * self.up_proj(x)))\n",
    )
    before = vary(
        before,
        "        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=False)\n",
        "        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=False)\n"
        "        self.attn_sub_norm = MiniRMSNorm(config.hidden_size, eps=config.rms_norm_eps)\n",
    )
    before = vary(
        before,
        "        attn_output = self.o_proj(attn_output)\n",
        "        attn_output = self.o_proj(self.attn_sub_norm(attn_output))\n",
    )
    return before + LLAMA_NORM


def test_norms_on_tensors_tensor_parallelism_splits_become_sharded_norms_and_the_next_linear_row_parallel():
    after = run_through(_with_sub_norms(), "tensor-parallel")
    assert init_value(after.code, "MiniAttention", "attn_sub_norm") == (
        "HeadShardedRMSNorm(config.num_attention_heads, self.head_dim, eps=config.rms_norm_eps)"
    )
    assert init_value(after.code, "MiniMLP", "ffn_sub_norm") == (
        "FeatureShardedRMSNorm(config.intermediate_size, eps=config.rms_norm_eps)"
    )
    # the projections after them read split tensors: row-parallel, not replicated
    assert init_value(after.code, "MiniAttention", "o_proj").startswith("RowParallelLinear(")
    assert init_value(after.code, "MiniMLP", "down_proj").startswith("RowParallelLinear(")


def _with_per_head_weights(norm_class: str) -> str:
    """Cohere's q/k LayerNorms: a weight per head, sized by a (heads, head_dim) tuple."""
    before = vary(
        MINI_MODEL,
        "        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=False)\n",
        "        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=False)\n"
        f"        self.q_norm = {norm_class}(hidden_size=(config.num_attention_heads, self.head_dim), eps=1e-5)\n"
        f"        self.k_norm = {norm_class}(hidden_size=(config.num_key_value_heads, self.head_dim), eps=1e-5)\n",
    )
    before = vary(
        before,
        "        query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)\n"
        "        key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)\n",
        "        query_states = self.q_norm(self.q_proj(hidden_states).view(hidden_shape)).transpose(1, 2)\n"
        "        key_states = self.k_norm(self.k_proj(hidden_states).view(hidden_shape)).transpose(1, 2)\n",
    )
    return (
        before
        + f"""

class {norm_class}(nn.Module):
    def __init__(self, hidden_size=None, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        mean = hidden_states.mean(-1, keepdim=True)
        variance = (hidden_states - mean).pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden_states - mean) * torch.rsqrt(variance + self.variance_epsilon)
"""
    )


def test_a_module_with_a_weight_per_head_is_built_for_this_ranks_heads():
    after = run_through(_with_per_head_weights("MiniHeadNorm"), "tensor-parallel")
    assert init_value(after.code, "MiniAttention", "q_norm") == (
        "shard_heads(MiniHeadNorm(hidden_size=(local_heads(config.num_attention_heads), self.head_dim), "
        "eps=1e-5), config.num_attention_heads)"
    )
    assert init_value(after.code, "MiniAttention", "k_norm") == (
        "shard_heads(MiniHeadNorm(hidden_size=(local_heads(config.num_key_value_heads, kv=True), "
        "self.head_dim), eps=1e-5), config.num_key_value_heads, kv=True)"
    )
    assert {
        ("engine.layers", "shard_heads"),
        ("engine.layers", "local_heads"),
    } <= after.context.plan.engine_imports
    # the tensor-parallel data flow sees them keep the heads split: nothing to review
    assert not after.context.review


def test_with_as_many_kv_heads_as_query_heads_a_per_head_module_splits_as_queries():
    # MHA written with one expression for both counts: the module splits like the query heads.
    before = _with_per_head_weights("MiniHeadNorm").replace(
        "config.num_key_value_heads", "config.num_attention_heads"
    )
    after = run_through(before, "tensor-parallel")
    assert init_value(after.code, "MiniAttention", "k_norm") == (
        "shard_heads(MiniHeadNorm(hidden_size=(local_heads(config.num_attention_heads), self.head_dim), "
        "eps=1e-5), config.num_attention_heads)"
    )


def test_a_norm_of_the_whole_fused_q_or_k_splits_by_heads_however_its_size_is_spelled():
    """OLMoE sizes them `hidden_size` and `(hidden_size // heads) * kv_heads`: applied to all of q
    (or k) out of the fused projection, they are as wide as all its heads."""
    before = _with_norms("config.hidden_size", "(config.hidden_size // config.num_attention_heads) * 2")
    after = run_through(before, "head-sharded-norm")
    assert init_value(after.code, "MiniAttention", "q_norm") == (
        "HeadShardedRMSNorm(config.num_attention_heads, self.head_dim, eps=config.rms_norm_eps)"
    )
    assert init_value(after.code, "MiniAttention", "k_norm") == (
        "HeadShardedRMSNorm(config.num_key_value_heads, self.head_dim, eps=config.rms_norm_eps, kv=True)"
    )
