"""Optional forward inputs that no call in the file passes are dropped like plumbing."""

from __future__ import annotations

import libcst as cst

from porter.analysis.model_index import build_index
from porter.analysis.optional_inputs import never_passed
from tests.porter.rewrite_helpers import MINI_MODEL, method_code, run_rewrites, run_through, signature, vary

ATTENTION_FORWARD = (
    "    def forward(self, hidden_states, attention_mask=None, past_key_values=None, **kwargs):\n"
    "        input_shape = hidden_states.shape[:-1]\n"
)
# A cross-attention input, as encoder-decoder attention classes take it; the decoder layer never
# passes it (it forwards only its own **kwargs, which the engine drops).
WITH_CROSS_INPUT = (
    "    def forward(self, hidden_states, key_value_states=None, attention_mask=None, past_key_values=None,"
    " **kwargs):\n"
    "        input_shape = hidden_states.shape[:-1]\n"
)


def _source(**replacements: str) -> str:
    source = vary(MINI_MODEL, ATTENTION_FORWARD, WITH_CROSS_INPUT)
    for old, new in replacements.items():
        source = vary(source, old, new)
    return source


def test_an_input_no_caller_passes_is_found_and_dropped():
    assert never_passed(build_index(cst.parse_module(_source())))["MiniAttention"] == {"key_value_states"}
    after = run_rewrites(_source(), "engine-interface")
    assert "key_value_states" not in signature(after.code, "MiniAttention", "forward")


def test_an_input_some_caller_passes_stays():
    passed = _source(
        **{
            "hidden_states, attention_mask=attention_mask, past_key_values": "hidden_states, "
            "key_value_states=hidden_states, attention_mask=attention_mask, past_key_values"
        }
    )
    assert "MiniAttention" not in never_passed(build_index(cst.parse_module(passed)))


def test_a_call_that_unpacks_another_mapping_counts_as_passing_everything():
    unpacked = _source(
        **{
            "hidden_states, attention_mask=attention_mask, past_key_values=past_key_values, **kwargs": (
                "hidden_states, attention_mask=attention_mask, past_key_values=past_key_values, **extra"
            )
        }
    )
    assert "MiniAttention" not in never_passed(build_index(cst.parse_module(unpacked)))


def test_a_flag_derived_from_the_dropped_input_picks_the_data_path():
    source = _source(
        **{
            WITH_CROSS_INPUT: WITH_CROSS_INPUT.replace(
                "        input_shape",
                "        is_cross_attention = key_value_states is not None\n"
                "        current_states = key_value_states if is_cross_attention else hidden_states\n"
                "        input_shape",
            ),
            "self.k_proj(hidden_states)": "self.k_proj(current_states)",
            "self.v_proj(hidden_states)": "self.v_proj(current_states)",
        }
    )
    after = run_through(source, "dead-code")
    forward = method_code(after.code, "MiniAttention", "forward")
    assert after.review_messages() == []
    assert "current_states = hidden_states" in forward
    assert "key_value_states" not in forward and "is_cross_attention" not in forward
