"""Rules for rotary code built on angle tables, per-position tables cut at the query's window, and a
score scale under an `if`, each on the snippet of the corpus file that shows it: Qwen-7B-Chat's
remote code (tests/fixtures/remote_code/qwen), before (the file's own code) and after."""

from __future__ import annotations

import functools
from pathlib import Path

import libcst as cst
import pytest

from porter.analysis.attention import analyse_attention
from porter.analysis.model_index import build_index
from porter.analysis.rotary_tables import angle_table_param, base_param, rescaling_params
from porter.rewrites.tensor_parallel import TensorParallelLayers
from tests.porter.rewrite_helpers import method_code, run_through

CORPUS = Path(__file__).resolve().parent.parent / "fixtures" / "remote_code"
QWEN = CORPUS / "qwen" / "modeling_qwen.py"


@functools.lru_cache(maxsize=4)
def _index(path: Path):
    return build_index(cst.parse_module(path.read_text()))


def _chain(index, name: str) -> list[dict]:
    chain, current = [], index.classes.get(name)
    while current is not None:
        chain.append(current.methods)
        current = next((index.classes[b] for b in current.bases if b in index.classes), None)
    return chain


def test_a_helper_taking_cos_and_sin_of_its_second_argument_rotates_by_an_angle_table():
    # `def apply_rotary_pos_emb(t, freqs): ... t_ * freqs.cos() + _rotate_half(t_) * freqs.sin()`
    index = _index(QWEN)
    assert angle_table_param(index.functions["apply_rotary_pos_emb"]) == "freqs"
    assert angle_table_param(index.functions["_rotate_half"]) is None


def test_a_sinusoid_table_built_from_a_length_and_a_width_is_no_rotation():
    # MOSS's `create_sinusoidal_positions(num_pos, dim)` takes sin and cos of `arange(num_pos) x inv_freq`:
    # both of its arguments feed the angles, so neither is a tensor rotated by them.
    index = _index(CORPUS / "moss" / "modeling_moss.py")
    assert angle_table_param(index.functions["create_sinusoidal_positions"]) is None


def test_a_rope_base_factor_forward_passes_rescales_the_frequencies_but_the_length_does_not():
    # `forward(self, max_seq_len, offset=0, ntk_alpha=1.0)`: `base = self.base * ntk_alpha ** ...;
    # self.inv_freq = 1.0 / (base ** ...)`, while max_seq_len and offset count the table's positions.
    assert rescaling_params(_chain(_index(QWEN), "RotaryEmbedding")) == ["ntk_alpha"]


def test_the_rope_base_is_the_parameter_raised_to_the_feature_exponents():
    # `self.inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))`
    assert base_param(_index(QWEN).classes["RotaryEmbedding"].methods["__init__"]) == "base"


def test_positions_that_also_rescale_the_frequencies_are_positions():
    # InternLM2's dynamic NTK subclass recomputes inv_freq from max(position_ids), then runs its base's
    # `forward`, which multiplies inv_freq by the same position_ids: the config's "dynamic" rope.
    index = _index(CORPUS / "internlm2" / "modeling_internlm2.py")
    assert rescaling_params(_chain(index, "InternLM2DynamicNTKScalingRotaryEmbedding")) == []


def test_a_score_scale_under_an_if_keeps_its_condition_and_is_read_in_the_constructors_terms():
    # `if self.scale_attn_weights: attn_weights = attn_weights / torch.full([], value.size(-1) ** 0.5,
    # dtype=..., device=...)` in `_attn(query, key, value, ...)`
    info = analyse_attention(_index(QWEN), "QWenAttention")
    assert info.callee_scale == "(1 / (self.head_dim ** 0.5) if self.scale_attn_weights else 1.0)"


@pytest.fixture(scope="module")
def qwen_parallel():
    return run_through(QWEN.read_text(), TensorParallelLayers.name, module=None)


def test_q_and_k_rotated_one_call_each_by_the_angle_table_become_one_rotary_call(qwen_parallel):
    # Before: `rotary_pos_emb = self.rotary_emb(kv_seq_len, ntk_alpha=ntk_alpha).to(...)`, an `if
    # rotary_pos_emb is not None:` making it a pair, and one that slices the table and calls
    # `apply_rotary_pos_emb(query, q_pos_emb)`, `apply_rotary_pos_emb(key, k_pos_emb)`.
    forward = method_code(qwen_parallel.code, "QWenAttention", "forward")
    assert "query, key = self.rotary_emb(positions, query, key)" in forward
    assert "rotary_pos_emb" not in forward and "apply_rotary_pos_emb" not in forward
    # `self.rotary_emb = RotaryEmbedding(dim, base=config.rotary_emb_base)`: the base, a config field
    # get_rope would not read, goes with it
    init = method_code(qwen_parallel.code, "QWenAttention", "__init__")
    assert (
        'self.rotary_emb = get_rope(config, self.head_dim, is_neox_style=True, rope_theta=getattr(config, "rotary_emb_base", None))'
        in init
    )


def test_a_rope_base_forward_computes_is_a_review_item(qwen_parallel):
    # The prompt-length NTK factor has no counterpart in the engine's rope: long prompts would turn
    # by other angles, so the port says so instead of dropping it.
    messages = [item.message for item in qwen_parallel.context.review]
    assert any("rescales its frequencies by `ntk_alpha=ntk_alpha`" in m for m in messages), messages


def test_the_query_window_of_a_per_position_table_is_gathered_by_positions(qwen_parallel):
    # Before: `seq_start = key.size(1) - query.size(1); seq_end = key.size(1);
    # logn_tensor = self.logn_tensor[:, seq_start:seq_end, :, :]` with `self.logn_tensor =
    # torch.Tensor(logn_list)[None, :, None, None]`; `query = query * logn_tensor.expand_as(query)`.
    forward = method_code(qwen_parallel.code, "QWenAttention", "forward")
    assert "logn_tensor = self.logn_tensor[0, positions, :, :]" in forward
    assert "seq_start" not in forward and "seq_end" not in forward
    # the table broadcast to this rank's query heads is no whole tensor meeting a split one
    messages = [item.message for item in qwen_parallel.context.review]
    assert not any("a split tensor meets a whole one" in m for m in messages), messages
