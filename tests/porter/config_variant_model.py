"""A mini model whose configuration picks its variant at run time, in the style of HF's Falcon file.

Against `rewrite_helpers.MINI_MODEL` it changes what the config-variant tests need:
- the decoder layer builds its attention from a table of backend classes;
- projections are an `nn.Linear` subclass that only spells out `x @ W.T + b`;
- one fused q|k|v projection sized per configuration (grouped, multi-query or per-head), split into
  heads by a helper with one branch per layout;
- the backbone builds an ALiBi bias only when `config.alibi`; attention has one eager core for each
  case (`@` products, an in-place scale, batch-era head transposes) and an SDPA backend choice.
"""

from __future__ import annotations

from tests.porter.rewrite_helpers import MINI_MODEL, replace_class, vary

LINEAR = """
class MiniLinear(nn.Linear):
    def forward(self, input):
        hidden_states = input @ self.weight.T
        if self.bias is None:
            return hidden_states
        return hidden_states + self.bias
"""

ATTENTION = """
class MiniAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // self.num_heads
        self.inv_norm_factor = 1.0 / math.sqrt(self.head_dim)
        if config.grouped:
            qkv_out_dim = (config.num_kv_heads * 2 + config.num_attention_heads) * self.head_dim
        elif config.multi_query:
            qkv_out_dim = config.hidden_size + 2 * self.head_dim
        else:
            qkv_out_dim = 3 * config.hidden_size
        self.query_key_value = MiniLinear(config.hidden_size, qkv_out_dim, bias=config.bias)
        self.dense = MiniLinear(config.hidden_size, config.hidden_size, bias=config.bias)
        self.grouped = config.grouped
        self.multi_query = config.multi_query
        self.num_kv_heads = config.num_kv_heads if self.grouped else 1

    def _split_heads(self, fused_qkv):
        if self.grouped:
            batch, seq_len, _ = fused_qkv.shape
            qkv = fused_qkv.view(batch, seq_len, -1, self.num_heads // self.num_kv_heads + 2, self.head_dim)
            return qkv[:, :, :, :-2].flatten(2, 3), qkv[:, :, :, [-2]].flatten(2, 3), qkv[:, :, :, [-1]].flatten(2, 3)
        elif not self.multi_query:
            batch_size, seq_length, _ = fused_qkv.shape
            fused_qkv = fused_qkv.view(batch_size, seq_length, self.num_heads, 3, self.head_dim)
            return fused_qkv[..., 0, :], fused_qkv[..., 1, :], fused_qkv[..., 2, :]
        else:
            batch_size, seq_length, _ = fused_qkv.shape
            fused_qkv = fused_qkv.view(batch_size, seq_length, self.num_heads + 2, self.head_dim)
            return fused_qkv[..., :-2, :], fused_qkv[..., [-2], :], fused_qkv[..., [-1], :]

    def forward(self, hidden_states, alibi, attention_mask=None, past_key_values=None, **kwargs):
        fused_qkv = self.query_key_value(hidden_states)
        query_layer, key_layer, value_layer = self._split_heads(fused_qkv)
        batch_size, query_length, _, _ = query_layer.shape
        query_layer = query_layer.transpose(1, 2).reshape(batch_size, self.num_heads, query_length, self.head_dim)
        key_layer = key_layer.transpose(1, 2)
        value_layer = value_layer.transpose(1, 2)
        if alibi is None:
            if self.config._attn_implementation == "sdpa":
                attn_output = torch.nn.functional.scaled_dot_product_attention(
                    query_layer, key_layer, value_layer, attn_mask=attention_mask
                )
            else:
                scores = query_layer @ key_layer.transpose(-1, -2)
                scores /= math.sqrt(self.head_dim)
                probs = F.softmax(scores + attention_mask, dim=-1)
                attn_output = probs @ value_layer
            attn_output = attn_output.transpose(1, 2).reshape(batch_size, query_length, -1)
        else:
            scores = query_layer @ key_layer.transpose(-1, -2)
            logits = scores + alibi
            logits *= self.inv_norm_factor
            probs = F.softmax(logits + attention_mask, dim=-1)
            attn_output = probs @ value_layer
            attn_output = attn_output.transpose(1, 2).reshape(batch_size, query_length, -1)
        return self.dense(attn_output), None
"""

FLASH_ATTENTION = """
class MiniFlashAttention2(MiniAttention):
    def forward(self, hidden_states, alibi, attention_mask=None, past_key_values=None, **kwargs):
        raise NotImplementedError
"""

TABLE = """
MINI_ATTENTION_CLASSES = {"eager": MiniAttention, "sdpa": MiniAttention, "flash_attention_2": MiniFlashAttention2}
"""

DECODER_LAYER = """
class MiniDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.self_attn = MINI_ATTENTION_CLASSES[config._attn_implementation](config, layer_idx)
        self.mlp = MiniMLP(config)
        self.input_layernorm = nn.LayerNorm(config.hidden_size)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size)

    def forward(self, hidden_states, alibi, attention_mask=None, past_key_values=None, **kwargs):
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(
            hidden_states, alibi=alibi, attention_mask=attention_mask, past_key_values=past_key_values
        )
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = self.mlp(hidden_states)
        hidden_states = residual + hidden_states
        return hidden_states
"""

MODEL_FORWARD_BEFORE = """        causal_mask = build_causal_mask(attention_mask, inputs_embeds)
        hidden_states = inputs_embeds
        for decoder_layer in self.layers:
            hidden_states = decoder_layer(
                hidden_states, attention_mask=causal_mask, past_key_values=past_key_values, **kwargs
            )
"""
MODEL_FORWARD_AFTER = """        alibi = None
        if self.use_alibi:
            alibi = build_alibi(attention_mask, self.num_heads)
        causal_mask = build_causal_mask(attention_mask, inputs_embeds)
        hidden_states = inputs_embeds
        for decoder_layer in self.layers:
            hidden_states = decoder_layer(
                hidden_states, alibi=alibi, attention_mask=causal_mask, past_key_values=past_key_values, **kwargs
            )
"""


def _variant_model() -> str:
    source = replace_class(MINI_MODEL, "MiniAttention", ATTENTION)
    source = replace_class(source, "MiniDecoderLayer", DECODER_LAYER)
    source = vary(source, "class MiniAttention(", LINEAR + "\n\nclass MiniAttention(")
    source = vary(source, "class MiniDecoderLayer(", FLASH_ATTENTION + TABLE + "\n\nclass MiniDecoderLayer(")
    source = vary(source, MODEL_FORWARD_BEFORE, MODEL_FORWARD_AFTER)
    source = vary(
        source,
        "        self.norm = nn.LayerNorm(config.hidden_size)\n",
        "        self.norm = nn.LayerNorm(config.hidden_size)\n"
        "        self.use_alibi = config.alibi\n"
        "        self.num_heads = config.num_attention_heads\n",
    )
    source = vary(
        source, "import torch\n", "import math\n\nimport torch\nfrom torch.nn import functional as F\n"
    )
    return source + BUILD_ALIBI


# An ALiBi builder with slopes of its own (not BLOOM's): the port must carry these.
BUILD_ALIBI = """

def build_alibi(attention_mask, num_heads):
    slopes = 0.5 ** torch.arange(1, num_heads + 1, device=attention_mask.device)
    positions = attention_mask.cumsum(-1) - 1
    return slopes[None, :, None] * positions[:, None, :]
"""


VARIANT_MODEL = _variant_model()
