"""plain-linear: an nn.Linear subclass whose forward is only x W^T + b is built as nn.Linear."""

from __future__ import annotations

from tests.porter.config_variant_model import VARIANT_MODEL
from tests.porter.rewrite_helpers import init_value, run_rewrites, run_through, vary


def test_constructions_of_an_affine_subclass_become_its_linear_base():
    after = run_rewrites(VARIANT_MODEL, "plain-linear")
    assert init_value(after.code, "MiniAttention", "dense") == (
        "nn.Linear(config.hidden_size, config.hidden_size, bias=config.bias)"
    )
    assert init_value(after.code, "MiniAttention", "query_key_value").startswith("nn.Linear(")
    assert after.review_messages() == []


def test_it_is_then_sharded_like_any_linear():
    after = run_through(VARIANT_MODEL, "tensor-parallel")
    assert init_value(after.code, "MiniAttention", "dense").startswith("RowParallelLinear(")


def test_a_subclass_doing_more_than_the_product_is_a_review_item():
    scaled = vary(
        VARIANT_MODEL,
        "        return hidden_states + self.bias\n",
        "        return (hidden_states + self.bias) * 2\n",
    )
    scaled = vary(
        scaled,
        "        hidden_states = input @ self.weight.T\n",
        "        hidden_states = input @ self.weight.T * self.gain\n",
    )
    after = run_rewrites(scaled, "plain-linear")
    assert init_value(after.code, "MiniAttention", "dense").startswith("MiniLinear(")
    assert (
        after.review_messages()
        == ["plain-linear @ MiniAttention.__init__: MiniLinear subclasses a Linear with its own forward"] * 2
    )
