"""lm-head: forward stops at the hidden states, compute_logits gets the (parallel, maybe tied) head."""

from __future__ import annotations

from tests.porter.rewrite_helpers import (
    MINI_MODEL,
    assert_code,
    method_code,
    replace_method,
    run_rewrites,
    vary,
)

HEAD = "nn.Linear(config.hidden_size, config.vocab_size, bias=False)"


def test_head_becomes_parallel_lm_head_with_a_logits_processor():
    after = run_rewrites(MINI_MODEL, "lm-head")
    assert_code(
        method_code(after.code, "MiniForCausalLM", "__init__"),
        """
        def __init__(self, config):
            super().__init__(config)
            self.model = MiniModel(config)
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, bias=False)
            self.post_init()
            self.logits_processor = LogitsProcessor(config.vocab_size)
        """,
    )
    assert {("engine.layers", "ParallelLMHead"), ("engine.layers", "LogitsProcessor")} <= (
        after.context.plan.engine_imports
    )


def test_head_without_a_bias_argument_keeps_nn_linear_default_bias():
    before = vary(MINI_MODEL, HEAD, "nn.Linear(config.hidden_size, config.vocab_size)")
    after = run_rewrites(before, "lm-head")
    assert (
        "self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, bias=True)" in after.formatted
    )


def test_positional_bias_argument_is_kept():
    before = vary(MINI_MODEL, HEAD, "nn.Linear(config.hidden_size, config.vocab_size, False)")
    after = run_rewrites(before, "lm-head")
    assert (
        "self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, bias=False)" in after.formatted
    )


def test_tied_head_is_tied_to_the_input_embedding_when_the_config_says_so():
    after = run_rewrites(MINI_MODEL, "hf-plumbing", "lm-head")
    assert_code(
        method_code(after.code, "MiniForCausalLM", "__init__"),
        """
        def __init__(self, config):
            super().__init__()
            self.config = config
            self.model = MiniModel(config)
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, bias=False)
            if getattr(config, "tie_word_embeddings", True):
                self.lm_head.tie_to(self.model.embed_tokens)
            self.logits_processor = LogitsProcessor(config.vocab_size)
        """,
    )
    assert after.context.plan.tied == {"lm_head.weight": "model.embed_tokens.weight"}


def test_tied_key_list_finds_the_embedding_it_ties_to():
    before = vary(
        MINI_MODEL,
        '_tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}',
        '_tied_weights_keys = ["lm_head.weight"]',
    )
    after = run_rewrites(before, "hf-plumbing", "lm-head")
    assert "self.lm_head.tie_to(self.model.embed_tokens)" in after.formatted
    assert after.context.plan.tied == {"lm_head.weight": "model.embed_tokens.weight"}


def test_untied_head_is_not_tied():
    before = vary(
        MINI_MODEL, '    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}\n\n', ""
    )
    after = run_rewrites(before, "hf-plumbing", "lm-head")
    assert "tie_to" not in after.formatted
    assert after.context.plan.tied == {}


def test_forward_returns_the_hidden_states_the_head_was_given():
    after = run_rewrites(MINI_MODEL, "lm-head")
    assert_code(
        method_code(after.code, "MiniForCausalLM", "forward"),
        """
        @auto_docstring
        def forward(self, input_ids=None, attention_mask=None, past_key_values=None, labels=None, **kwargs):
            outputs = self.model(
                input_ids=input_ids, attention_mask=attention_mask, past_key_values=past_key_values, **kwargs
            )
            hidden_states = outputs.last_hidden_state
            return hidden_states
        """,
    )


def test_compute_logits_runs_the_head_through_the_logits_processor_without_the_loss():
    after = run_rewrites(MINI_MODEL, "lm-head")
    assert_code(
        method_code(after.code, "MiniForCausalLM", "compute_logits"),
        """
        def compute_logits(self, hidden_states, input_metadata):
            logits = self.logits_processor(self.lm_head, hidden_states, input_metadata)
            return logits
        """,
    )


def test_logits_to_keep_slice_is_dropped():
    before = vary(
        MINI_MODEL,
        "        logits = self.lm_head(hidden_states)",
        "        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep\n"
        "        logits = self.lm_head(hidden_states[:, slice_indices, :])",
    )
    after = run_rewrites(before, "lm-head")
    assert_code(
        method_code(after.code, "MiniForCausalLM", "compute_logits"),
        """
        def compute_logits(self, hidden_states, input_metadata):
            logits = self.logits_processor(self.lm_head, hidden_states, input_metadata)
            return logits
        """,
    )


def test_logit_soft_capping_after_the_head_moves_into_compute_logits():
    before = replace_method(
        MINI_MODEL,
        "MiniForCausalLM",
        "forward",
        """
        def forward(self, input_ids=None, labels=None, **kwargs):
            outputs = self.model(input_ids=input_ids, **kwargs)
            hidden_states = outputs.last_hidden_state
            logits = self.lm_head(hidden_states)
            if self.config.final_logit_softcapping is not None:
                logits = logits / self.config.final_logit_softcapping
                logits = torch.tanh(logits)
                logits = logits * self.config.final_logit_softcapping
            loss = None
            if labels is not None:
                loss = self.loss_function(logits, labels)
            return CausalLMOutputWithPast(loss=loss, logits=logits)
        """,
    )
    after = run_rewrites(before, "lm-head")
    assert_code(
        method_code(after.code, "MiniForCausalLM", "compute_logits"),
        """
        def compute_logits(self, hidden_states, input_metadata):
            logits = self.logits_processor(self.lm_head, hidden_states, input_metadata)
            if self.config.final_logit_softcapping is not None:
                logits = logits / self.config.final_logit_softcapping
                logits = torch.tanh(logits)
                logits = logits * self.config.final_logit_softcapping
            return logits
        """,
    )


def test_forward_that_never_calls_the_head_is_a_review_item():
    before = vary(
        MINI_MODEL, "        logits = self.lm_head(hidden_states)\n", "        logits = hidden_states\n"
    )
    after = run_rewrites(before, "lm-head")
    assert after.review_messages() == ["lm-head @ MiniForCausalLM.forward: forward never calls self.lm_head"]


def test_head_applied_to_an_attribute_expression():
    before = vary(
        MINI_MODEL,
        "        hidden_states = outputs.last_hidden_state\n        logits = self.lm_head(hidden_states)",
        "        logits = self.lm_head(outputs.last_hidden_state)",
    )
    after = run_rewrites(before, "lm-head")
    compute_logits = method_code(after.code, "MiniForCausalLM", "compute_logits")
    assert "self.logits_processor(self.lm_head," in compute_logits
    assert "self.lm_head" not in method_code(after.code, "MiniForCausalLM", "forward")


def test_a_prediction_head_before_the_vocab_projection_runs_on_the_last_tokens_only():
    # ModernBERT-decoder: `logits = self.decoder(self.lm_head(hidden_states[:, slice_indices, :]))`,
    # where lm_head is a dense + norm head and decoder projects to the vocabulary.
    before = vary(
        MINI_MODEL,
        "        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)\n",
        "        self.transform = nn.Sequential(nn.Linear(config.hidden_size, config.hidden_size), nn.GELU())\n"
        "        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)\n",
    )
    before = vary(
        before,
        "        logits = self.lm_head(hidden_states)\n",
        "        logits = self.lm_head(self.transform(hidden_states[:, -1:, :]))\n",
    )
    after = run_rewrites(before, "lm-head")
    assert_code(
        method_code(after.code, "MiniForCausalLM", "compute_logits"),
        """
        def compute_logits(self, hidden_states, input_metadata):
            logits = self.logits_processor(
                self.lm_head, self.transform(hidden_states[input_metadata.logits_indices]), None
            )
            return logits
        """,
    )
    assert "return hidden_states" in method_code(after.code, "MiniForCausalLM", "forward")
