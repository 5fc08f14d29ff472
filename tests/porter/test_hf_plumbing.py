"""hf-plumbing: framework bases become nn.Module, HF init/API helpers and decorators go, tied keys are read."""

from __future__ import annotations

from tests.porter.rewrite_helpers import (
    MINI_MODEL,
    assert_code,
    class_code,
    class_header,
    method_code,
    run_rewrites,
    top_level_names,
    vary,
)


def test_framework_layer_base_becomes_nn_module():
    after = run_rewrites(MINI_MODEL, "hf-plumbing")
    assert_code(class_header(after.code, "MiniDecoderLayer"), "class MiniDecoderLayer(nn.Module): ...")


def test_causal_lm_loses_pretrained_and_generation_bases():
    after = run_rewrites(MINI_MODEL, "hf-plumbing")
    assert_code(class_header(after.code, "MiniForCausalLM"), "class MiniForCausalLM(nn.Module): ...")


def test_existing_nn_module_base_is_not_duplicated():
    before = vary(
        MINI_MODEL,
        "class MiniForCausalLM(MiniPreTrainedModel, GenerationMixin):",
        "class MiniForCausalLM(nn.Module, GenerationMixin):",
    )
    after = run_rewrites(before, "hf-plumbing")
    assert_code(class_header(after.code, "MiniForCausalLM"), "class MiniForCausalLM(nn.Module): ...")


def test_pretrained_model_class_that_computes_nothing_is_removed():
    after = run_rewrites(MINI_MODEL, "hf-plumbing")
    assert "MiniPreTrainedModel" not in top_level_names(after.code)
    assert top_level_names(after.code) == [
        "eager_attention_forward",
        "MiniMLP",
        "MiniAttention",
        "MiniDecoderLayer",
        "MiniModel",
        "MiniForCausalLM",
        "build_causal_mask",
    ]


def test_plain_module_class_passes_through_unchanged():
    after = run_rewrites(MINI_MODEL, "hf-plumbing")
    assert_code(class_code(after.code, "MiniMLP"), class_code(MINI_MODEL, "MiniMLP"))


def test_backbone_init_keeps_config_and_drops_weight_init_and_checkpointing():
    after = run_rewrites(MINI_MODEL, "hf-plumbing")
    assert_code(
        method_code(after.code, "MiniModel", "__init__"),
        """
        def __init__(self, config):
            super().__init__()
            self.config = config
            self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
            self.layers = nn.ModuleList([MiniDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
            self.norm = nn.LayerNorm(config.hidden_size)
        """,
    )
    removed = {
        c.before for c in after.context.changes if c.rule == "hf-plumbing" and c.where == "MiniModel.__init__"
    }
    assert {"self.post_init()", "self.gradient_checkpointing = False"} <= removed


def test_old_style_super_call_loses_config_too():
    before = vary(
        MINI_MODEL,
        "        super().__init__(config)\n        self.embed_tokens",
        "        super(MiniModel, self).__init__(config)\n        self.embed_tokens",
    )
    after = run_rewrites(before, "hf-plumbing")
    init = method_code(after.code, "MiniModel", "__init__")
    assert_code(
        "\n".join(init.splitlines()[:3]),
        """
        def __init__(self, config):
            super(MiniModel, self).__init__()
            self.config = config
        """,
    )


def test_class_level_hf_settings_are_dropped():
    after = run_rewrites(MINI_MODEL, "hf-plumbing")
    causal_lm = class_code(after.code, "MiniForCausalLM")
    assert "_tied_weights_keys" not in causal_lm


def test_tied_weights_dict_is_read_into_the_plan():
    after = run_rewrites(MINI_MODEL, "hf-plumbing")
    assert after.context.plan.tied == {"lm_head.weight": "model.embed_tokens.weight"}


def test_tied_weights_list_leaves_the_partner_to_find():
    before = vary(
        MINI_MODEL,
        '_tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}',
        '_tied_weights_keys = ["lm_head.weight"]',
    )
    after = run_rewrites(before, "hf-plumbing")
    assert after.context.plan.tied == {"lm_head.weight": ""}


def test_untied_model_has_nothing_tied():
    before = vary(
        MINI_MODEL, '    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}\n\n', ""
    )
    after = run_rewrites(before, "hf-plumbing")
    assert after.context.plan.tied == {}


def test_hf_decorators_go_and_computing_decorators_stay():
    before = vary(
        MINI_MODEL,
        "    def forward(self, x):",
        "    @torch.no_grad()\n    @deprecate_kwarg('old', version='5.0')\n    def forward(self, x):",
    )
    after = run_rewrites(before, "hf-plumbing")
    assert_code(
        method_code(after.code, "MiniMLP", "forward"),
        """
        @torch.no_grad()
        def forward(self, x):
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        """,
    )
    assert method_code(after.code, "MiniForCausalLM", "forward").startswith("def forward(")


def test_class_decorator_from_the_kernel_hub_goes():
    before = vary(
        MINI_MODEL,
        "class MiniMLP(nn.Module):",
        '@use_kernel_forward_from_hub("MiniMLP")\nclass MiniMLP(nn.Module):',
    )
    after = run_rewrites(before, "hf-plumbing")
    assert_code(class_header(after.code, "MiniMLP"), "class MiniMLP(nn.Module): ...")


def test_hf_model_api_methods_go_and_other_methods_stay():
    before = vary(
        MINI_MODEL,
        "        self.post_init()\n\n    @auto_docstring",
        "        self.post_init()\n\n"
        "    def get_input_embeddings(self):\n        return self.model.embed_tokens\n\n"
        "    def set_output_embeddings(self, new_embeddings):\n        self.lm_head = new_embeddings\n\n"
        "    def _init_weights(self, module):\n        module.weight.data.normal_()\n\n"
        "    def extra_repr(self):\n        return 'mini'\n\n"
        "    @auto_docstring",
    )
    after = run_rewrites(before, "hf-plumbing")
    causal_lm = class_code(after.code, "MiniForCausalLM")
    for gone in ("get_input_embeddings", "set_output_embeddings", "_init_weights"):
        assert f"def {gone}" not in causal_lm
    assert_code(
        method_code(after.code, "MiniForCausalLM", "extra_repr"),
        """
        def extra_repr(self):
            return "mini"
        """,
    )
