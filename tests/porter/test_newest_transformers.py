"""Rules for the plumbing as the newest transformers spells it, on that release's own files
(tests/fixtures/transformers_5_25, copied from the transformers 5.25.0 wheel; see SOURCES.md there).

The pinned transformers stays installed: only the source text comes from the newer release.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from tests.porter.rewrite_helpers import (
    assert_code,
    class_code,
    init_value,
    method_code,
    normalize,
    run_through,
    signature,
    vary,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "transformers_5_25"
CODEGEN = (FIXTURES / "codegen" / "modeling_codegen.py").read_text()
CODEGEN_MODULE = "transformers.models.codegen.modeling_codegen"
LLAMA = (FIXTURES / "llama" / "modeling_llama.py").read_text()
LLAMA_MODULE = "transformers.models.llama.modeling_llama"
FALCON = (FIXTURES / "falcon" / "modeling_falcon.py").read_text()
FALCON_MODULE = "transformers.models.falcon.modeling_falcon"


def test_a_cache_renamed_by_a_deprecation_decorator_leaves_every_signature():
    after = run_through(LLAMA, "engine-interface", module=LLAMA_MODULE)
    assert_code(
        signature(after.code, "LlamaAttention", "forward"),
        """
        def forward(
            self, hidden_states: torch.Tensor, positions, kv_cache, input_metadata
        ): ...
        """,
    )
    assert_code(
        signature(after.code, "LlamaDecoderLayer", "forward"),
        "def forward(self, hidden_states: torch.Tensor, positions: torch.LongTensor | None, kv_cache, input_metadata): ...",
    )
    assert after.context.plan.cache_inputs == {
        name: {"cache"} for name in ("LlamaAttention", "LlamaDecoderLayer", "LlamaModel", "LlamaForCausalLM")
    }


def test_slicing_by_a_helper_before_the_head_goes_when_it_slices_the_head_input_itself():
    # LlamaForCausalLM.forward: `hidden_states = slice_logits_to_keep(hidden_states, logits_to_keep)`
    after = run_through(LLAMA, "lm-head", module=LLAMA_MODULE)
    forward = method_code(after.code, "LlamaForCausalLM", "forward")
    assert "slice_logits_to_keep" not in forward
    assert (
        normalize(forward)
        .rstrip()
        .endswith("hidden_states = outputs.last_hidden_state\n    return hidden_states")
    )
    assert after.changes("lm-head", "LlamaForCausalLM.forward")


def test_slicing_by_a_helper_of_another_tensor_hands_the_head_that_tensor():
    # CodeGenForCausalLM.forward: `hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)`
    after = run_through(CODEGEN, "lm-head", module=CODEGEN_MODULE)
    forward = normalize(method_code(after.code, "CodeGenForCausalLM", "forward"))
    assert forward.rstrip().endswith("hidden_states = outputs.last_hidden_state\n    return hidden_states"), (
        forward
    )


def test_a_rotary_module_reading_a_sinusoidal_table_is_replaced_by_the_engines_rope():
    after = run_through(CODEGEN, "rotary", module=CODEGEN_MODULE)
    forward = method_code(after.code, "CodeGenAttention", "forward")
    assert "query, key = self.rotary_emb(positions, query, key)" in forward, forward
    assert "sin, cos = position_embeddings" not in forward  # it only fed the rotation
    assert "rotary_emb" not in class_code(after.code, "CodeGenModel")
    assert_code(
        init_value(after.code, "CodeGenAttention", "rotary_emb"),
        "get_rope(config, self.head_dim, rotary_dim=self.rotary_dim, is_neox_style=False)",
    )


def test_blocks_cut_from_the_projection_call_by_their_width_become_one_split():
    after = run_through(CODEGEN, "blocked-qkv", module=CODEGEN_MODULE)
    forward = normalize(method_code(after.code, "CodeGenAttention", "forward"))
    body = forward[forward.index("    local_dim = ") : forward.index("    sin, cos = ")]
    assert normalize(textwrap.dedent(body)) == normalize(
        """
        local_dim = self.embed_dim // self.mp_num
        qkv = self.qkv_proj(hidden_states)
        query, key, value = qkv.split([self.qkv_proj.q_size, self.qkv_proj.kv_size, self.qkv_proj.kv_size], dim=-1)
        query = query.reshape(hidden_shape)
        key = key.reshape(hidden_shape)
        value = value.reshape(hidden_shape).transpose(1, 2)
        """
    ), body
    assert after.context.plan.qkv_blocks == {("CodeGenAttention", "qkv_proj"): ("4", "qvk")}


def test_a_fused_qkv_picked_apart_in_one_branch_per_layout_becomes_one_split_by_this_ranks_sizes():
    # FalconAttention.forward: grouped (new decoder architecture), multi-query (`split([heads, 1, 1],
    # dim=-2)`) and per-head (`unflatten(-2, (heads, 3)).unbind(-2)`) branches of one if/elif/else.
    after = run_through(FALCON, "fuse-qkv", module=FALCON_MODULE)
    forward = "".join(method_code(after.code, "FalconAttention", "forward").split())
    assert "ifself.new_decoder_architecture" not in forward and "unbind" not in forward
    sizes = "[self.query_key_value.q_size,self.query_key_value.kv_size,self.query_key_value.kv_size]"
    assert (
        "query_states,key_states,value_states=(part.unflatten(-1,(-1,self.head_dim))"
        f"forpartinfused_qkv.flatten(-2).split({sizes},dim=-1))"
    ) in forward, forward
    assert 'checkpoint_layout="grouped"' in normalize(class_code(after.code, "FalconAttention"))
    assert after.context.plan.qkv_layouts == {("FalconAttention", "query_key_value"): [("grouped", None)]}


def test_a_branch_picking_q_k_and_v_apart_in_a_layout_not_read_stops_the_port():
    # The multi-query branch taking two key and two value heads: q|k|v end to end, not grouped.
    source = FALCON.replace(
        "fused_qkv.split([self.num_heads, 1, 1], dim=-2)", "fused_qkv.split([self.num_heads, 2, 2], dim=-2)"
    )
    after = run_through(source, "qkv-split-branches", module=FALCON_MODULE)
    assert [m for m in after.review_messages() if "branches whose layout porter cannot read" in m]
    assert "fused_qkv.split([self.num_heads, 2, 2], dim=-2)" in method_code(
        after.code, "FalconAttention", "forward"
    )


FALCON_FOLD = """            causal_mask = torch.masked_fill(
                alibi / math.sqrt(self.config.hidden_size // self.num_heads),
                causal_mask < -1,
                min_dtype,
            )"""


def test_an_alibi_bias_folded_into_the_mask_gives_the_paged_attention_slopes_scaled_alike():
    # FalconModel.forward adds `alibi / sqrt(head_dim)` to the mask every layer's attention adds to its
    # scaled scores: the engine adds slope * distance after its scale, so the slopes carry the factor.
    after = run_through(FALCON, "paged-attention", module=FALCON_MODULE)
    attn = "".join(init_value(after.code, "FalconAttention", "attn").split())
    assert (
        "alibi_slopes=build_alibi_tensor_slopes((config.num_attention_headsifconfig.new_decoder_architectureelseself.num_heads))"
        "*(1/(math.sqrt(config.hidden_size//config.num_attention_heads)))ifconfig.alibielseNone"
    ) in attn, attn
    assert not after.review_messages()

    # Unscaled, the same mask gives the builder's slopes as they are.
    unscaled = vary(
        FALCON,
        FALCON_FOLD,
        FALCON_FOLD.replace("alibi / math.sqrt(self.config.hidden_size // self.num_heads)", "alibi"),
    )
    attn = "".join(
        init_value(
            run_through(unscaled, "paged-attention", module=FALCON_MODULE).code, "FalconAttention", "attn"
        ).split()
    )
    assert "elseself.num_heads))ifconfig.alibielseNone" in attn, attn


def test_a_factor_on_the_folded_bias_porter_cannot_read_stops_the_port():
    # `alibi.exp()` is no multiple of the bias: no slopes reproduce it.
    source = vary(
        FALCON,
        FALCON_FOLD,
        FALCON_FOLD.replace("alibi / math.sqrt(self.config.hidden_size // self.num_heads)", "alibi.exp()"),
    )
    after = run_through(source, "paged-attention", module=FALCON_MODULE)
    assert "alibi_slopes" not in init_value(after.code, "FalconAttention", "attn")
    messages = [m for m in after.review_messages() if "ALiBi bias in the attention mask" in m]
    assert messages == [
        "paged-attention @ FalconAttention: ALiBi bias in the attention mask: porter cannot read the factor "
        "`causal_mask = torch.masked_fill( alibi.exp(), causal_mask < -1, min_dtype, )` applies to the ALiBi bias"
    ], after.review_messages()
