"""Attention written the 4.3x / remote-code way: what paged-attention, rotary and the rewrites before
them make of it (tests/fixtures/ holds whole files in these styles; these pin one pattern each)."""

from __future__ import annotations

import libcst as cst

from porter.rewrites.rotary import _layer_type_expression
from tests.porter.rewrite_helpers import (
    MINI_MODEL,
    assert_code,
    method_code,
    normalize,
    replace_class,
    replace_method,
    run_rewrites,
    run_through,
    vary,
)

# A 4.3x-style rotary module (cos/sin caches, `seq_len`) and its apply function, put before the MLP.
ROTARY = """
class MiniRotaryEmbedding(nn.Module):
    def __init__(self, dim, max_position_embeddings=2048, base=10000):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x, seq_len=None):
        t = torch.arange(seq_len, dtype=self.inv_freq.dtype)
        emb = torch.cat((torch.outer(t, self.inv_freq),) * 2, dim=-1)
        return emb.cos(), emb.sin()


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin, position_ids):
    cos, sin = cos[position_ids].unsqueeze(1), sin[position_ids].unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def repeat_kv(hidden_states, n_rep):
    batch, heads, slen, head_dim = hidden_states.shape
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, heads, n_rep, slen, head_dim)
    return hidden_states.reshape(batch, heads * n_rep, slen, head_dim)


class MiniMLP(nn.Module):"""

# Llama 4.3x attention: a rotary module per layer built by `_init_rope`, views with the batch and the
# global head counts, KV heads repeated before an eager core method, a head-merging helper after it.
LEGACY_ATTENTION = """
class MiniAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // self.num_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.rope_theta = config.rope_theta
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        self._init_rope()

    def _init_rope(self):
        self.rotary_emb = MiniRotaryEmbedding(self.head_dim, base=self.rope_theta)

    def _eager(self, query, key, value):
        weights = nn.functional.softmax(torch.matmul(query, key.transpose(2, 3)) * self.head_dim**-0.5, dim=-1)
        return torch.matmul(weights, value)

    def _merge_heads(self, tensor):
        return tensor.transpose(1, 2).reshape(tensor.size(0), tensor.size(2), -1)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_value=None):
        bsz, q_len, _ = hidden_states.size()
        query_states = self.q_proj(hidden_states)
        key_states = self.k_proj(hidden_states)
        value_states = self.v_proj(hidden_states)
        query_states = query_states.view(bsz, q_len, self.num_heads, self.head_dim).transpose(1, 2)
        key_states = key_states.view(bsz, q_len, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        value_states = value_states.view(bsz, q_len, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        kv_seq_len = key_states.shape[-2]
        cos, sin = self.rotary_emb(value_states, seq_len=kv_seq_len)
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin, position_ids)
        key_states = repeat_kv(key_states, self.num_key_value_groups)
        value_states = repeat_kv(value_states, self.num_key_value_groups)
        attn_output = self._eager(query_states, key_states, value_states)
        attn_output = self._merge_heads(attn_output)
        return self.o_proj(attn_output), None, past_key_value

"""

LEGACY = replace_class(
    vary(MINI_MODEL, "\nclass MiniMLP(nn.Module):", ROTARY), "MiniAttention", LEGACY_ATTENTION
)


def test_rotary_cos_sin_read_from_the_values_do_not_send_q_and_k_to_v_proj():
    # `cos, sin = self.rotary_emb(value_states, ...)` and `q, k = apply_rotary_pos_emb(q, k, cos, sin)`:
    # a statement that reads what it assigns transforms it, so q and k trace to their own projections
    info = run_through(LEGACY, "paged-attention").context.plan.attention["MiniAttention"]
    assert (info.query, info.key, info.value) == ("q_proj", "k_proj", "v_proj")
    assert (info.num_heads, info.num_kv_heads) == ("self.num_heads", "self.num_key_value_heads")


def test_kv_head_repetition_and_a_merging_helper_around_a_called_core_go_into_the_paged_call():
    after = run_through(LEGACY, "paged-attention")
    forward = method_code(after.code, "MiniAttention", "forward")
    assert "repeat_kv" not in forward and "_merge_heads" not in forward
    assert (
        "attn_output = self.attn(query_states, key_states, value_states, kv_cache, input_metadata).flatten(1)"
        in (forward)
    )
    assert "def _merge_heads" not in after.code  # the helper nothing calls goes with its call


def test_rotary_built_by_an_init_helper_goes_with_the_helper_and_what_only_it_read():
    after = run_through(LEGACY, "rotary")
    assert_code(
        method_code(after.code, "MiniAttention", "__init__")
        .split("self.num_key_value_groups", 1)[1]
        .split("\n", 1)[1],
        """
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        self.attn = PagedAttention(
            self.num_heads, self.head_dim, scale=self.head_dim**-0.5, num_kv_heads=self.num_key_value_heads
        )
        self.rotary_emb = get_rope(config, self.head_dim, is_neox_style=True)
        """,
    )
    assert "def _init_rope" not in after.code
    forward = method_code(after.code, "MiniAttention", "forward")
    assert "cos, sin" not in forward
    assert "query_states, key_states = self.rotary_emb(positions, query_states, key_states)" in forward


def test_the_index_sees_submodules_an_init_helper_builds():
    context = run_rewrites(LEGACY, "hf-plumbing").context
    assert context.index.classes["MiniAttention"].submodules["rotary_emb"] == "MiniRotaryEmbedding"


def test_a_port_of_legacy_attention_runs_per_token_with_this_ranks_heads():
    after = run_through(LEGACY, "flatten-batch")
    assert_code(
        method_code(after.code, "MiniAttention", "forward"),
        """
        def forward(self, hidden_states, positions, kv_cache, input_metadata):
            q_len = hidden_states.shape[0]
            query_states = self.q_proj(hidden_states)
            key_states = self.k_proj(hidden_states)
            value_states = self.v_proj(hidden_states)
            query_states = query_states.unflatten(-1, (-1, self.head_dim))
            key_states = key_states.unflatten(-1, (-1, self.head_dim))
            value_states = value_states.unflatten(-1, (-1, self.head_dim))
            query_states, key_states = self.rotary_emb(positions, query_states, key_states)
            attn_output = self.attn(query_states, key_states, value_states, kv_cache, input_metadata).flatten(1)
            return self.o_proj(attn_output)
        """,
    )


FLASH_OR_EAGER = """
def forward(self, hidden_states, attention_mask=None, **kwargs):
    bsz, q_len, _ = hidden_states.size()
    query_states = self.q_proj(hidden_states)
    key_states = self.k_proj(hidden_states)
    value_states = self.v_proj(hidden_states)
    if self._use_flash_attention_2:
        attn_output = self._flash_attention_forward(query_states, key_states, value_states, attention_mask)
    else:
        attn_output, attn_weights = self._eager(query_states, key_states, value_states, attention_mask)
        attn_output = attn_output.transpose(1, 2).contiguous()
    attn_output = attn_output.reshape(bsz, q_len, self.hidden_size)
    return self.o_proj(attn_output), None
"""


def _flash_or_eager() -> str:
    source = replace_method(MINI_MODEL, "MiniAttention", "forward", FLASH_OR_EAGER)
    source = vary(
        source,
        "        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=False)\n",
        "        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=False)\n"
        "        self.hidden_size = config.hidden_size\n"
        "        self._use_flash_attention_2 = (\n"
        '            is_flash_attn_2_available() and config._attn_implementation == "flash_attention_2"\n'
        "        )\n\n"
        "    def _eager(self, query, key, value, attention_mask):\n"
        "        weights = nn.functional.softmax(torch.matmul(query, key.transpose(2, 3)), dim=-1)\n"
        "        return torch.matmul(weights, value), weights\n\n"
        "    def _flash_attention_forward(self, query, key, value, attention_mask):\n"
        "        return flash_attn_func(query, key, value, causal=True)\n",
    )
    return source


def test_an_attribute_asking_for_an_optional_library_is_false_so_the_eager_branch_stays():
    after = run_through(_flash_or_eager(), "decide-conditions")
    forward = method_code(after.code, "MiniAttention", "forward")
    assert "_flash_attention_forward" not in forward and "if self._use_flash_attention_2" not in forward
    assert (
        "attn_output, attn_weights = self._eager(query_states, key_states, value_states, attention_mask)"
        in forward
    )


def test_a_head_merge_to_the_global_width_infers_this_ranks_width():
    forward = method_code(run_through(_flash_or_eager(), "flatten-batch").code, "MiniAttention", "forward")
    # `reshape(bsz, q_len, self.hidden_size)` would need every head; a rank holds its share
    assert "attn_output = attn_output.reshape(q_len, -1)" in forward
    assert "transpose" not in forward


def test_a_permute_of_heads_and_tokens_goes_in_attention():
    source = vary(
        LEGACY,
        "        query_states = query_states.view(bsz, q_len, self.num_heads, self.head_dim).transpose(1, 2)\n",
        "        query_states = query_states.view(bsz, q_len, self.num_heads, self.head_dim).permute(0, 2, 1, 3)\n",
    )
    forward = method_code(run_through(source, "flatten-batch").code, "MiniAttention", "forward")
    assert "query_states = query_states.unflatten(-1, (-1, self.head_dim))\n" in forward
    assert "permute" not in forward


def test_an_optional_library_import_and_the_flag_asking_for_it_go_once_nothing_reads_them():
    source = vary(
        _flash_or_eager(),
        "from ...utils import auto_docstring\n",
        "from ...utils import auto_docstring, is_flash_attn_2_available\n\n"
        "if is_flash_attn_2_available():\n"
        "    from flash_attn import flash_attn_func\n",
    )
    after = run_through(source, "optional-libraries")
    assert "if is_flash_attn_2_available():" not in after.code
    assert "from flash_attn import" not in after.code
    assert "_use_flash_attention_2" not in after.code


# GPT-J's rotation: sin/cos gathered from a sinusoid table, then `apply(x, sin, cos)` once for q and
# once for k, on their first `rotary_dim` features when the config names a width.
ONE_TENSOR_APPLY = """
def rotate_every_two(x):
    x1 = x[:, :, :, ::2]
    x2 = x[:, :, :, 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def apply_rotary_pos_emb(tensor, sin, cos):
    sin = torch.repeat_interleave(sin[:, :, None, :], 2, 3)
    cos = torch.repeat_interleave(cos[:, :, None, :], 2, 3)
    return (tensor * cos) + (rotate_every_two(tensor) * sin)


"""
ONE_TENSOR_ROTARY = """
class MiniAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // self.num_heads
        self.rotary_dim = config.rotary_dim
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def _get_embed_positions(self, position_ids):
        return self.embed_positions.repeat(position_ids.shape[0], 1, 1)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, **kwargs):
        query = self.q_proj(hidden_states).view(hidden_states.shape[:-1] + (-1, self.head_dim))
        key = self.k_proj(hidden_states).view(hidden_states.shape[:-1] + (-1, self.head_dim))
        value = self.v_proj(hidden_states).view(hidden_states.shape[:-1] + (-1, self.head_dim))
        embed_positions = self._get_embed_positions(position_ids)
        sincos = torch.gather(embed_positions, 1, position_ids.unsqueeze(-1))
        sin, cos = torch.split(sincos, sincos.shape[-1] // 2, dim=-1)
        if self.rotary_dim is not None:
            k_rot = key[:, :, :, : self.rotary_dim]
            k_pass = key[:, :, :, self.rotary_dim :]
            q_rot = query[:, :, :, : self.rotary_dim]
            q_pass = query[:, :, :, self.rotary_dim :]
            k_rot = apply_rotary_pos_emb(k_rot, sin, cos)
            q_rot = apply_rotary_pos_emb(q_rot, sin, cos)
            key = torch.cat([k_rot, k_pass], dim=-1)
            query = torch.cat([q_rot, q_pass], dim=-1)
        else:
            key = apply_rotary_pos_emb(key, sin, cos)
            query = apply_rotary_pos_emb(query, sin, cos)
        attn_output, attn_weights = attention_interface(self, query, key, value, attention_mask)
        return self.o_proj(attn_output.flatten(-2)), attn_weights
"""


def _with_one_tensor_apply(source: str) -> str:
    return vary(
        source, "class MiniAttention(nn.Module):", ONE_TENSOR_APPLY + "class MiniAttention(nn.Module):"
    )


def test_rotation_one_tensor_per_call_becomes_one_rotary_call_on_q_and_k():
    before = _with_one_tensor_apply(replace_class(MINI_MODEL, "MiniAttention", ONE_TENSOR_ROTARY))
    after = run_rewrites(before, "paged-attention", "rotary")
    forward = method_code(after.code, "MiniAttention", "forward")
    assert "query, key = self.rotary_emb(positions, query, key)" in forward
    # what only fed cos/sin goes with the calls (the table lookup is a method, not a submodule)
    for gone in ("apply_rotary_pos_emb", "k_rot", "sincos", "_get_embed_positions"):
        assert gone not in forward
    assert (
        "self.rotary_emb = get_rope(config, self.head_dim, rotary_dim=self.rotary_dim, is_neox_style=False)"
        in normalize(after.code)
    )
    assert after.review_messages() == []


def test_rotation_one_tensor_per_call_on_something_else_than_q_and_k_is_a_review_item():
    before = replace_class(
        _with_one_tensor_apply(MINI_MODEL),
        "MiniAttention",
        ONE_TENSOR_ROTARY.replace(
            "            query = apply_rotary_pos_emb(query, sin, cos)\n",
            "            value = apply_rotary_pos_emb(value, sin, cos)\n",
        ).replace(
            "            query = torch.cat([q_rot, q_pass], dim=-1)\n",
            "            value = torch.cat([q_rot, q_pass], dim=-1)\n",
        ),
    )
    after = run_rewrites(before, "paged-attention", "rotary")
    assert after.review_messages() == [
        "rotary @ MiniAttention.forward: `apply_rotary_pos_emb` rotates one tensor per call, and porter "
        "could not pair its calls on q and k"
    ]


# A BART-family self-attention (XGLM's, the 4.3x style): q pre-scaled, heads folded into the batch
# for `torch.bmm`, and the softmax written twice, once upcast for float16, once plain.
BMM_ATTENTION = """
def forward(self, hidden_states, attention_mask=None, **kwargs):
    bsz, tgt_len, _ = hidden_states.size()
    query_states = self.q_proj(hidden_states) * self.scaling
    key_states = self.k_proj(hidden_states).view(bsz, tgt_len, -1, self.head_dim).transpose(1, 2)
    value_states = self.v_proj(hidden_states).view(bsz, tgt_len, -1, self.head_dim).transpose(1, 2)
    proj_shape = (bsz * self.num_heads, -1, self.head_dim)
    query_states = query_states.view(bsz, tgt_len, self.num_heads, self.head_dim).transpose(1, 2)
    query_states = query_states.reshape(*proj_shape)
    key_states = key_states.reshape(*proj_shape)
    value_states = value_states.reshape(*proj_shape)
    attn_weights = torch.bmm(query_states, key_states.transpose(1, 2))
    if attn_weights.dtype == torch.float16:
        attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(torch.float16)
    else:
        attn_weights = nn.functional.softmax(attn_weights, dim=-1)
    attn_output = torch.bmm(attn_weights, value_states)
    attn_output = attn_output.view(bsz, self.num_heads, tgt_len, self.head_dim).transpose(1, 2)
    attn_output = attn_output.reshape(bsz, tgt_len, -1)
    return self.o_proj(attn_output), attn_weights
"""


def _bmm_attention() -> str:
    source = replace_method(MINI_MODEL, "MiniAttention", "forward", BMM_ATTENTION)
    return vary(
        source,
        "        self.scaling = self.head_dim**-0.5\n",
        "        self.scaling = self.head_dim**-0.5\n        self.num_heads = config.num_attention_heads\n",
    )


def test_a_softmax_with_a_float16_upcast_branch_is_one_core_for_the_paged_call():
    after = run_through(_bmm_attention(), "flatten-batch")
    assert after.review_messages() == []
    assert_code(
        method_code(after.code, "MiniAttention", "forward"),
        """
        def forward(self, hidden_states, kv_cache, input_metadata):
            query_states = self.q_proj(hidden_states) * self.scaling
            key_states = self.k_proj(hidden_states)
            value_states = self.v_proj(hidden_states)
            attn_output = self.attn(query_states, key_states, value_states, kv_cache, input_metadata).flatten(1)
            return self.o_proj(attn_output)
        """,
    )
    # (the heads `self._shape` split off k and v go with the core: the paged call takes [T, H * D])
    # q was scaled before the core, so the scores are not scaled again
    assert "self.head_dim, scale=1.0," in method_code(after.code, "MiniAttention", "__init__")


def test_a_softmax_that_only_one_branch_computes_is_not_taken_for_the_core():
    source = vary(
        _bmm_attention(),
        "        else:\n            attn_weights = nn.functional.softmax(attn_weights, dim=-1)\n",
        "",
    )
    after = run_rewrites(source, "paged-attention")
    assert (
        "paged-attention @ MiniAttention: could not trace q/k/v projections and head size into the attention core"
        in (after.review_messages())
    )


def test_a_rotate_half_that_turns_pairs_the_other_way_asks_for_a_reversed_rope():
    # NanoChat: `cat((x2, -x1))` where HF's rotate_half has `cat((-x2, x1))`.
    flipped = vary(
        LEGACY, "    return torch.cat((-x2, x1), dim=-1)\n", "    return torch.cat((x2, -x1), dim=-1)\n"
    )
    init = method_code(run_through(flipped, "rotary").code, "MiniAttention", "__init__")
    assert "self.rotary_emb = get_rope(config, self.head_dim, is_neox_style=True, reverse=True)" in init
    init = method_code(run_through(LEGACY, "rotary").code, "MiniAttention", "__init__")
    assert "reverse" not in init


def test_the_layer_type_a_per_type_rope_takes_is_the_lookup_not_a_comparison_of_it():
    def init(body: str) -> cst.FunctionDef:
        return cst.parse_module(f"def __init__(self, config, layer_idx):\n{body}").body[0]

    kept = init(
        "    self.is_sliding = config.layer_types[layer_idx] == 'sliding_attention'\n"
        "    self.attention_type = config.layer_types[layer_idx]\n"
    )
    assert _layer_type_expression(kept) == "self.attention_type"
    guarded = init(
        "    self.layer_type = config.layer_types[layer_idx] if hasattr(config, 'layer_types') else None\n"
        "    self.is_sliding = self.layer_type == 'sliding_attention'\n"
    )
    assert _layer_type_expression(guarded) == "self.layer_type"  # Gemma3
    # ModernBERT-decoder keeps only the comparison: the lookup itself is the layer's type.
    compared = init("    self.is_sliding = config.layer_types[layer_idx] == 'sliding_attention'\n")
    assert _layer_type_expression(compared) == "config.layer_types[layer_idx]"
    assert _layer_type_expression(init("    self.x = 1\n")) is None


def test_an_init_helper_choosing_the_rotary_module_by_scaling_type_goes_with_its_raise():
    # MiniCPM's `_init_rope`: one rotary class per `rope_scaling` type, else a ValueError. The
    # engine's config names every scaling type, "default" too, so a helper left behind would raise.
    choosing = LEGACY.replace(
        "    def _init_rope(self):\n"
        "        self.rotary_emb = MiniRotaryEmbedding(self.head_dim, base=self.rope_theta)\n",
        "    def _init_rope(self):\n"
        "        if self.config.rope_scaling is None:\n"
        "            self.rotary_emb = MiniRotaryEmbedding(self.head_dim, base=self.rope_theta)\n"
        "        else:\n"
        "            scaling_type = self.config.rope_scaling['rope_type']\n"
        "            if scaling_type == 'linear':\n"
        "                self.rotary_emb = MiniRotaryEmbedding(self.head_dim, base=self.rope_theta)\n"
        "            else:\n"
        "                raise ValueError(f'Unknown RoPE scaling type {scaling_type}')\n",
    )
    assert choosing != LEGACY
    after = run_through(choosing, "rotary")
    assert "_init_rope" not in after.code and "Unknown RoPE" not in after.code
    assert "self.rotary_emb = get_rope(config, self.head_dim, is_neox_style=True)" in normalize(
        method_code(after.code, "MiniAttention", "__init__")
    )
