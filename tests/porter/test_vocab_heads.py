"""LM heads found by what they compute: a head module of the file (Baichuan2's NormHead, a
`[vocab, hidden]` weight normalised in forward), a head held by the backbone and called through it
(ChatGLM's `self.transformer.output_layer`, sized by `padded_vocab_size`); and the attention core and
ALiBi of the same files (torch's scaled_dot_product_attention; Baichuan2-13B's bias carried in the
attention mask, its slopes built behind a caching method)."""

from __future__ import annotations

from pathlib import Path

import libcst as cst
import pytest
import torch

from engine.layers.vocab_embedding import ParallelLMHead
from porter.analysis.alibi import bias_inputs, derive_slopes
from porter.analysis.model_index import build_index
from porter.analysis.vocab_heads import head_module
from porter.errors import PorterError
from porter.rewrites.rotary import RotaryToEngine
from tests.porter.rewrite_helpers import (
    MINI_MODEL,
    assert_code,
    init_value,
    make_context,
    method_code,
    replace_method,
    run_rewrites,
    vary,
)

CORPUS = Path(__file__).resolve().parent.parent / "fixtures" / "remote_code"
HEAD = "self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)"

# tests/fixtures/remote_code/baichuan2_7b/modeling_baichuan.py, verbatim.
NORM_HEAD = """
class NormHead(nn.Module):
    def __init__(self, hidden_size, vocab_size, bias=False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty((vocab_size, hidden_size)))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.first_flag = True

    def forward(self, hidden_states):
        if self.training:
            norm_weight = nn.functional.normalize(self.weight)
        elif self.first_flag:
            self.first_flag = False
            self.weight = nn.Parameter(nn.functional.normalize(self.weight))
            norm_weight = self.weight
        else:
            norm_weight = self.weight
        return nn.functional.linear(hidden_states, norm_weight)
"""


def _with_norm_head(norm_head: str = NORM_HEAD) -> str:
    source = vary(
        MINI_MODEL, HEAD, "self.lm_head = NormHead(config.hidden_size, config.vocab_size, bias=False)"
    )
    return vary(source, "\nclass MiniForCausalLM(", norm_head + "\n\nclass MiniForCausalLM(")


def _head_module(code: str):
    cls = cst.parse_module(code).body[0]
    methods = {s.name.value: s for s in cls.body.body if isinstance(s, cst.FunctionDef)}
    return head_module(methods.get("__init__"), methods.get("forward"))


def test_a_module_normalising_its_weight_rows_before_the_product_is_a_head_module():
    found = _head_module(NORM_HEAD)
    assert (found.weight, found.out_param, found.in_param, found.normalize_rows) == (
        "weight",
        "vocab_size",
        "hidden_size",
        True,
    )


def test_baichuan2_13b_normalising_into_weight_data_is_the_same_head():
    thirteen = NORM_HEAD.replace(
        "self.weight = nn.Parameter(nn.functional.normalize(self.weight))",
        "self.weight.data = nn.functional.normalize(self.weight)",
    )
    assert _head_module(thirteen).normalize_rows


def test_a_plain_read_of_a_weight_normalised_only_in_training_is_no_head():
    # Without the store back into the parameter, eval reads the rows unnormalised: not one projection.
    training_only = NORM_HEAD.replace(
        "self.weight = nn.Parameter(nn.functional.normalize(self.weight))", "pass"
    )
    assert _head_module(training_only) is None


def test_a_head_module_becomes_a_parallel_lm_head_normalising_its_rows_at_load_time():
    after = run_rewrites(_with_norm_head(), "lm-head")
    assert build_index(cst.parse_module(_with_norm_head())).causal_lm == "MiniForCausalLM"
    assert (
        init_value(after.code, "MiniForCausalLM", "lm_head")
        == "ParallelLMHead(config.vocab_size, config.hidden_size, normalize_rows=True)"
    )
    assert_code(
        method_code(after.code, "MiniForCausalLM", "compute_logits"),
        """
        def compute_logits(self, hidden_states, input_metadata):
            logits = self.logits_processor(self.lm_head, hidden_states, input_metadata)
            return logits
        """,
    )


def test_a_head_module_built_with_another_output_size_is_no_lm_head():
    source = vary(
        _with_norm_head(), "NormHead(config.hidden_size, config.vocab_size", "NormHead(config.hidden_size, 8"
    )
    with pytest.raises(PorterError, match="found no causal-LM class"):
        build_index(cst.parse_module(source))


# ChatGLM keeps its head in the backbone and calls it from the causal LM (chatglm2/modeling_chatglm.py:
# `self.output_layer = ...(config.hidden_size, config.padded_vocab_size, ...)` in ChatGLMModel,
# `lm_logits = self.transformer.output_layer(hidden_states)` in ChatGLMForConditionalGeneration).
def _head_in_backbone() -> str:
    source = vary(
        MINI_MODEL,
        "        self.norm = nn.LayerNorm(config.hidden_size)\n",
        "        self.norm = nn.LayerNorm(config.hidden_size)\n"
        "        self.output_layer = nn.Linear(config.hidden_size, config.padded_vocab_size, bias=False)\n",
    )
    source = vary(source, f"        {HEAD}\n", "")
    return vary(
        source, "logits = self.lm_head(hidden_states)", "logits = self.model.output_layer(hidden_states)"
    )


def test_a_head_the_backbone_holds_and_the_causal_lm_calls_is_found_by_its_path():
    index = build_index(cst.parse_module(_head_in_backbone()))
    assert (index.causal_lm, index.head_path, index.head_owner()) == (
        "MiniForCausalLM",
        ["model", "output_layer"],
        "MiniModel",
    )


def test_a_head_in_the_backbone_is_replaced_where_it_is_built_and_called_by_its_path():
    after = run_rewrites(_head_in_backbone(), "lm-head")
    assert (
        init_value(after.code, "MiniModel", "output_layer")
        == "ParallelLMHead(config.padded_vocab_size, config.hidden_size, bias=False)"
    )
    assert init_value(after.code, "MiniForCausalLM", "logits_processor") == (
        "LogitsProcessor(config.padded_vocab_size)"
    )
    assert_code(
        method_code(after.code, "MiniForCausalLM", "compute_logits"),
        """
        def compute_logits(self, hidden_states, input_metadata):
            logits = self.logits_processor(self.model.output_layer, hidden_states, input_metadata)
            return logits
        """,
    )


def test_a_head_normalising_its_rows_loads_unit_rows_on_every_rank():
    torch.manual_seed(0)
    weight = torch.randn(10, 4) * 3
    head = ParallelLMHead(10, 4, normalize_rows=True)
    head.weight.weight_loader(head.weight, weight)
    rows = head.weight[:10]
    torch.testing.assert_close(rows, torch.nn.functional.normalize(weight))
    assert torch.count_nonzero(head.weight[10:]) == 0  # vocabulary padding stays zero
    with pytest.raises(ValueError, match="normalises its rows"):
        head.tie_to(head)


# Baichuan2's attention core (baichuan2_7b/modeling_baichuan.py, Attention.forward, the inference branch).
SDPA_FORWARD = """
def forward(self, hidden_states, attention_mask=None, past_key_values=None, **kwargs):
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    with torch.backends.cuda.sdp_kernel(enable_flash=True, enable_math=True, enable_mem_efficient=True):
        attn_output = F.scaled_dot_product_attention(query_states, key_states, value_states, attn_mask = attention_mask)
    attn_output = attn_output.transpose(1, 2)
    attn_output = attn_output.reshape(*input_shape, -1)
    attn_output = self.o_proj(attn_output)
    return attn_output, None
"""


def test_torch_scaled_dot_product_attention_is_an_attention_core():
    source = replace_method(MINI_MODEL, "MiniAttention", "forward", SDPA_FORWARD)
    assert "MiniAttention" in build_index(cst.parse_module(source)).attention
    after = run_rewrites(source, "paged-attention")
    assert (
        "attn_output = self.attn(query_states, key_states, value_states, kv_cache, input_metadata)"
        in after.formatted
    )
    # its default scale: 1/sqrt(head_dim)
    assert "scale=self.head_dim ** -0.5" in init_value(after.code, "MiniAttention", "attn")


def _fixture_index(directory: str):
    path = CORPUS / directory / "modeling_baichuan.py"
    return build_index(cst.parse_module(path.read_text()))


def test_an_alibi_bias_folded_into_the_attention_mask_is_followed_to_the_attention():
    # Baichuan2-13B: `alibi_mask = self.get_alibi_mask(...)`, then `attention_mask = alibi_mask` (or
    # padding + `alibi_mask.unsqueeze(0)`) passed to every layer, added to the scores as the mask.
    # The layers' outputs (`layer_outputs = checkpoint(layer, h, attention_mask)`) carry no bias.
    assert bias_inputs(_fixture_index("baichuan2_13b")) == {
        "BaichuanLayer": {"attention_mask"},
        "BaichuanAttention": {"attention_mask"},
    }


def test_slopes_come_from_the_one_builder_function_a_caching_method_calls():
    # get_alibi_mask caches `_gen_alibi_mask(tensor, self.n_head, self.max_cache_pos)` in a buffer.
    slopes = derive_slopes(_fixture_index("baichuan2_13b"))
    assert_code(
        slopes.code,
        '''
        def _gen_alibi_mask_slopes(n_head):
            """The head slopes `_gen_alibi_mask` computes, [n_head]."""
            slopes = torch.Tensor(_get_interleave(n_head))
            return slopes.flatten()
        ''',
    )
    assert slopes.call("self.num_heads") == "_gen_alibi_mask_slopes(self.num_heads)"


# ChatGLM builds its modules through a factory picked in __init__ (chatglm2/modeling_chatglm.py).
FACTORY_INIT = """
def __init__(self, config, device=None, empty_init=True):
    super().__init__(config)
    if empty_init:
        init_method = skip_init
    else:
        init_method = default_init
    init_kwargs = {}
    if device is not None:
        init_kwargs["device"] = device
    self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)

    def build_layer(layer_number):
        return MiniDecoderLayer(config, layer_number)

    self.layers = nn.ModuleList([build_layer(i + 1) for i in range(config.num_hidden_layers)])
    self.norm = nn.LayerNorm(config.hidden_size)
    self.output_layer = init_method(nn.Linear, config.hidden_size, config.padded_vocab_size, bias=False,
                                    dtype=config.torch_dtype, **init_kwargs)
"""
DEFAULT_INIT = """

def default_init(cls, *args, **kwargs):
    return cls(*args, **kwargs)
"""


def _factory_model() -> str:
    source = replace_method(_head_in_backbone(), "MiniModel", "__init__", FACTORY_INIT)
    source = vary(source, "import torch\n", "import torch\nfrom torch.nn.utils import skip_init\n")
    return vary(source, "\n\nclass MiniMLP(", DEFAULT_INIT + "\n\nclass MiniMLP(")


def test_a_module_built_through_a_factory_local_is_read_as_the_module_it_builds():
    index = build_index(cst.parse_module(_factory_model()))
    assert (index.causal_lm, index.head_path, index.backbone, index.decoder_layer) == (
        "MiniForCausalLM",
        ["model", "output_layer"],
        "MiniModel",  # its ModuleList's elements come from a builder function defined in __init__
        "MiniDecoderLayer",
    )


def test_a_factory_call_becomes_the_constructor_and_the_head_in_it_a_parallel_lm_head():
    factories = run_rewrites(_factory_model(), "module-factories")
    assert " ".join(init_value(factories.code, "MiniModel", "output_layer").split()) == (
        "nn.Linear(config.hidden_size, config.padded_vocab_size, bias=False, dtype=config.torch_dtype, **init_kwargs)"
    )
    after = run_rewrites(_factory_model(), "module-factories", "lm-head")
    assert init_value(after.code, "MiniModel", "output_layer") == (
        "ParallelLMHead(config.padded_vocab_size, config.hidden_size, bias=False)"
    )


def test_beside_an_eager_core_scaled_dot_product_attention_is_one_more_backend():
    # Falcon's attention (transformers' modeling_falcon.py): SDPA in one branch, the eager core in the other.
    both = SDPA_FORWARD.replace(
        """    with torch.backends.cuda.sdp_kernel(enable_flash=True, enable_math=True, enable_mem_efficient=True):
        attn_output = F.scaled_dot_product_attention(query_states, key_states, value_states, attn_mask = attention_mask)
""",
        """    if self.config._attn_implementation == "sdpa":
        attn_output = F.scaled_dot_product_attention(query_states, key_states, value_states, attn_mask=attention_mask)
    else:
        attention_scores = query_states @ key_states.transpose(-1, -2)
        attention_scores /= math.sqrt(self.head_dim)
        attention_scores = F.softmax(attention_scores + attention_mask, dim=-1)
        attn_output = attention_scores @ value_states
""",
    )
    assert both != SDPA_FORWARD
    after = run_rewrites(replace_method(MINI_MODEL, "MiniAttention", "forward", both), "paged-attention")
    info = after.context.plan.attention["MiniAttention"]
    assert info.core is None and info.inline_region is not None  # the eager core, read inline
    assert init_value(after.code, "MiniAttention", "attn") == (
        "PagedAttention(config.num_attention_heads, self.head_dim, scale=1 / (math.sqrt(self.head_dim)), "
        "num_kv_heads=config.num_key_value_heads)"
    )


# ChatGLM's SelfAttention hands q, k, v to a CoreAttention submodule holding no layer of its own
# (chatglm2/modeling_chatglm.py, the torch >= 2 branch of CoreAttention.forward).
CORE_MODULE = """
class CoreAttention(torch.nn.Module):
    def __init__(self, config, layer_number):
        super(CoreAttention, self).__init__()
        self.hidden_size_per_partition = config.hidden_size

    def forward(self, query_layer, key_layer, value_layer, attention_mask):
        query_layer, key_layer, value_layer = [k.permute(1, 2, 0, 3) for k in [query_layer, key_layer, value_layer]]
        context_layer = torch.nn.functional.scaled_dot_product_attention(query_layer, key_layer, value_layer, is_causal=True)
        context_layer = context_layer.permute(2, 0, 1, 3)
        new_context_layer_shape = context_layer.size()[:-2] + (self.hidden_size_per_partition,)
        context_layer = context_layer.reshape(*new_context_layer_shape)
        return context_layer
"""
CORE_CALLER = """
def forward(self, hidden_states, attention_mask=None, past_key_values=None, **kwargs):
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    query_states = self.q_proj(hidden_states).view(hidden_shape)
    key_states = self.k_proj(hidden_states).view(hidden_shape)
    value_states = self.v_proj(hidden_states).view(hidden_shape)
    context_layer = self.core_attention(query_states, key_states, value_states, attention_mask)
    attn_output = self.o_proj(context_layer)
    return attn_output, None
"""


def _core_module_model() -> str:
    source = replace_method(MINI_MODEL, "MiniAttention", "forward", CORE_CALLER)
    source = vary(
        source,
        "        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=False)\n",
        "        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=False)\n"
        "        self.core_attention = CoreAttention(config, layer_idx)\n",
    )
    return vary(source, "\n\nclass MiniAttention(", CORE_MODULE + "\n\nclass MiniAttention(")


def test_a_module_that_is_only_an_attention_core_makes_its_caller_the_attention():
    index = build_index(cst.parse_module(_core_module_model()))
    assert index.attention == {"MiniAttention"}


def test_the_call_of_a_core_module_becomes_the_paged_call_with_the_heads_merged():
    after = run_rewrites(_core_module_model(), "paged-attention")
    assert (
        "context_layer = self.attn(query_states, key_states, value_states, kv_cache, input_metadata).flatten(1)"
        in after.formatted
    )


def test_a_rotary_apply_function_taking_cos_and_sin_under_trailing_underscores_is_rotary():
    # baichuan2_7b: `def apply_rotary_pos_emb(q, k, cos_, sin_, position_ids)` rebinds cos and sin
    # inside; the call in Attention.forward becomes the engine's rotary layer.
    path = CORPUS / "baichuan2_7b" / "modeling_baichuan.py"
    _, context = make_context(path.read_text(), module=None)
    RotaryToEngine().apply(context.index.module, context)
    assert (
        "query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin, position_ids) -> "
        "query_states, key_states = self.rotary_emb(positions, query_states, key_states)"
    ) in [f"{c.before} -> {c.after}" for c in context.changes if c.rule == "rotary"]
