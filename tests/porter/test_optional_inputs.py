"""Optional forward inputs that no call in the file passes are dropped like plumbing."""

from __future__ import annotations

import libcst as cst

from porter.analysis.model_index import build_index
from porter.analysis.optional_inputs import never_passed
from tests.porter.rewrite_helpers import MINI_MODEL, run_rewrites, signature, vary

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
