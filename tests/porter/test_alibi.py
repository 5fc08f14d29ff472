"""ALiBi read from the source: the bias followed under whatever name each forward gives it, and the
head slopes taken from the builder's own statements, never from a formula of porter's."""

from __future__ import annotations

import math

import libcst as cst
import pytest
import torch

from porter.analysis.alibi import Slopes, bias_inputs, derive_slopes
from porter.analysis.bias_scale import UNKNOWN, factor
from porter.analysis.model_index import build_index
from porter.analysis.source import locate
from tests.porter.config_variant_model import BUILD_ALIBI, VARIANT_MODEL
from tests.porter.rewrite_helpers import init_value, run_rewrites, vary

UP_TO_PAGED = ("class-table", "plain-linear", "conditional-inputs", "decide-conditions", "paged-attention")


def _index(model_type: str):
    return build_index(cst.parse_module(locate(model_type).text))


def _derived(model_type: str) -> Slopes:
    slopes = derive_slopes(_index(model_type))
    assert isinstance(slopes, Slopes), slopes
    return slopes


def _run(slopes: Slopes, heads: int) -> torch.Tensor:
    namespace = {"math": math, "torch": torch}
    exec(slopes.code, namespace)
    return namespace[slopes.name](heads)


@pytest.mark.parametrize("heads", [1, 2, 3, 4, 5, 6, 8, 12, 16, 20, 32, 40])
def test_derived_slopes_are_the_builders_own(heads):
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor
    from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

    # Each bias grows by one slope per key position: the difference of two neighbours is the slope.
    bloom = build_alibi_tensor(torch.ones(1, 2), heads, torch.float32)  # [heads, 1, 2]
    torch.testing.assert_close(_run(_derived("bloom"), heads), bloom[:, 0, 1] - bloom[:, 0, 0])
    mpt = build_mpt_alibi_tensor(heads, 2)  # [heads, 1, 2]
    torch.testing.assert_close(_run(_derived("mpt"), heads), (mpt[:, 0, 1] - mpt[:, 0, 0]).float())


def test_a_default_of_the_builder_stays_a_parameter_of_the_slopes():
    slopes = _derived("mpt")
    assert slopes.code.startswith("def build_mpt_alibi_tensor_slopes(num_heads, alibi_bias_max=8):")
    assert slopes.call("self.n_heads") == "build_mpt_alibi_tensor_slopes(self.n_heads)"
    assert "device" not in slopes.code  # the port builds them under the engine's device


def test_the_bias_is_followed_under_each_name_a_forward_gives_it():
    assert bias_inputs(_index("mpt")) == {"MptBlock": {"position_bias"}, "MptAttention": {"position_bias"}}
    assert bias_inputs(_index("bloom")) == {"BloomBlock": {"alibi"}, "BloomAttention": {"alibi"}}


def test_the_paged_attention_takes_the_slopes_of_the_files_builder():
    after = run_rewrites(VARIANT_MODEL, *UP_TO_PAGED)
    assert "build_alibi_slopes(" in init_value(after.code, "MiniAttention", "attn")
    assert "def build_alibi_slopes(num_heads):" in after.code
    assert "0.5 ** torch.arange(1, num_heads + 1)" in after.code


def test_a_builder_whose_slopes_cannot_be_read_is_a_review_item():
    opaque = vary(
        VARIANT_MODEL,
        BUILD_ALIBI,
        "\n\ndef build_alibi(attention_mask, num_heads):\n    return attention_mask\n",
    )
    after = run_rewrites(opaque, *UP_TO_PAGED)
    assert (
        "paged-attention @ MiniAttention: ALiBi slopes unknown: `build_alibi` has no `slopes` local "
        "to read the head slopes from" in after.review_messages()
    )
    assert "alibi_slopes=" not in init_value(after.code, "MiniAttention", "attn")


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("bias", []),
        ("mask + bias.unsqueeze(0)", []),
        ("torch.masked_fill(bias / math.sqrt(d), mask < -1, low)", ["1 / (math.sqrt(d))"]),
        ("torch.where(mask, bias * 2, low)", ["2"]),
        ("torch.where(mask, bias, bias / 2)", UNKNOWN),  # two factors under one name
        ("bias.exp()", UNKNOWN),
        ("torch.exp(bias)", UNKNOWN),
        ("mask - bias", UNKNOWN),  # negated
        ("x.to(bias.dtype)", None),  # its dtype only
        ("bias < 0", None),  # a mask of its positions
    ],
)
def test_the_factor_a_mask_expression_scales_a_bias_by(expression, expected):
    assert factor(cst.parse_expression(expression), "bias") == expected
