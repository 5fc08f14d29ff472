"""A KV-cache parameter is plumbing by role, whatever it is called (porter.analysis.cache_inputs).

transformers 5.25 renamed `past_key_values` to `cache` and kept the old keyword working with a
decorator; the snippets below are copied from transformers 5.25.0's
`src/transformers/models/llama/modeling_llama.py` (LlamaAttention.forward, LlamaDecoderLayer.forward;
Apache-2.0), cut to the lines that carry the cache.
"""

from __future__ import annotations

from porter.analysis.cache_inputs import cache_inputs
from porter.analysis.signatures import PLUMBING
from tests.porter.rewrite_helpers import (
    MINI_MODEL,
    assert_code,
    make_context,
    method_code,
    replace_method,
    run_rewrites,
    signature,
    vary,
)

# transformers 5.25's spelling of the mini model: the cache is `cache`, annotated `Cache`, updated
# with the step's kwargs, and every forward carries the deprecation decorator for the old name.
NEWEST_MINI = (
    MINI_MODEL.replace("past_key_values", "cache")
    .replace(
        "from ...utils import auto_docstring\n",
        "from ...cache_utils import Cache\nfrom ...utils import auto_docstring\n"
        "from ...utils.deprecation import deprecate_kwarg\n",
    )
    .replace(
        "cache.update(key_states, value_states, self.layer_idx)",
        "cache.update(key_states, value_states, self.layer_idx, kwargs=kwargs)",
    )
    .replace(
        "    def forward(self, hidden_states, attention_mask=None, cache=None, **kwargs):",
        '    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")\n'
        "    def forward(self, hidden_states, attention_mask=None, cache: Cache | None = None, **kwargs):",
    )
)


def _roles(source: str) -> dict[str, set[str]]:
    _, context = make_context(source)
    return cache_inputs(context.index, PLUMBING)


def test_the_newest_spelling_ports_to_the_same_signatures_and_calls():
    before = run_rewrites(MINI_MODEL, "hf-plumbing", "decide-conditions", "engine-interface", "dead-code")
    after = run_rewrites(NEWEST_MINI, "hf-plumbing", "decide-conditions", "engine-interface", "dead-code")
    for owner in ("MiniAttention", "MiniDecoderLayer", "MiniModel", "MiniForCausalLM"):
        assert_code(signature(after.code, owner, "forward"), signature(before.code, owner, "forward"))
    assert_code(
        method_code(after.code, "MiniDecoderLayer", "forward"),
        method_code(before.code, "MiniDecoderLayer", "forward"),
    )
    assert "cache" not in method_code(after.code, "MiniAttention", "forward").replace("kv_cache", "")


def test_every_forward_of_the_chain_knows_its_cache():
    assert _roles(NEWEST_MINI) == {
        "MiniAttention": {"cache"},
        "MiniDecoderLayer": {"cache"},
        "MiniModel": {"cache"},
        "MiniForCausalLM": {"cache"},
    }


def test_an_annotation_resolved_through_an_aliased_import_marks_the_cache():
    source = vary(
        MINI_MODEL,
        "from ...utils import auto_docstring\n",
        "from ...cache_utils import DynamicCache as KV\nfrom ...utils import auto_docstring\n",
    )
    source = replace_method(
        source,
        "MiniMLP",
        "forward",
        """
        def forward(self, x, memory: KV | None = None):
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        """,
    )
    assert _roles(source)["MiniMLP"] == {"memory"}


def test_an_annotation_naming_another_class_called_cache_is_not_a_cache():
    source = vary(
        MINI_MODEL,
        "from ...utils import auto_docstring\n",
        "from ...utils import auto_docstring\n\n\nclass Cache:\n    pass\n",
    )
    source = replace_method(
        source,
        "MiniMLP",
        "forward",
        """
        def forward(self, x, memory: Cache | None = None):
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        """,
    )
    assert "MiniMLP" not in _roles(source)


def test_the_cache_api_called_on_an_unannotated_parameter_marks_it():
    source = vary(MINI_MODEL, "past_key_values", "kv", count=16)
    roles = _roles(source)
    assert roles["MiniAttention"] == {"kv"}  # kv.update(key_states, value_states, self.layer_idx)
    assert roles["MiniForCausalLM"] == {"kv"}  # handed down as the backbone's cache
    after = run_rewrites(source, "hf-plumbing", "decide-conditions", "engine-interface")
    assert_code(
        signature(after.code, "MiniAttention", "forward"),
        "def forward(self, hidden_states, kv_cache, input_metadata): ...",
    )


def test_a_deprecation_decorator_renaming_plumbing_marks_the_new_name():
    source = replace_method(
        MINI_MODEL,
        "MiniMLP",
        "forward",
        """
        @deprecate_kwarg("past_key_values", "5.40.0", new_name="state")
        def forward(self, x, state=None):
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        """,
    )
    assert _roles(source)["MiniMLP"] == {"state"}


def test_a_data_input_that_is_only_named_like_a_cache_stays():
    source = replace_method(
        MINI_MODEL,
        "MiniMLP",
        "forward",
        """
        def forward(self, x, cache):
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x + cache))
        """,
    )
    assert "MiniMLP" not in _roles(source)


def test_the_cache_length_handed_to_a_submodule_makes_its_parameter_plumbing():
    # transformers 5.25's models/xglm/modeling_xglm.py, XGLMModel.forward:
    #   cache_length = cache.get_seq_length() if cache is not None else 0
    #   ... self.embed_positions(position_ids, cache_length)
    source = vary(
        NEWEST_MINI,
        "        hidden_states = inputs_embeds\n",
        "        cache_length = cache.get_seq_length() if cache is not None else 0\n"
        "        hidden_states = self.norm(inputs_embeds, cache_length)\n",
    )
    source = replace_method(
        source,
        "MiniModel",
        "__init__",
        """
        def __init__(self, config):
            super().__init__(config)
            self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
            self.layers = nn.ModuleList([MiniDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
            self.norm = MiniMLP(config)
        """,
    )
    source = replace_method(
        source,
        "MiniMLP",
        "forward",
        """
        def forward(self, x, cache_length: int = 0):
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        """,
    )
    assert _roles(source)["MiniMLP"] == {"cache_length"}
