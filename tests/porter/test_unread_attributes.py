"""unread-attributes: `self.x = value` that nothing reads goes from `__init__`, then the locals and
parameters only it read, with the argument every construction passed for them."""

from __future__ import annotations

import textwrap

import libcst as cst

from porter.analysis.attribute_reads import unread_attributes
from porter.rewrites.unused_init_params import drop_unused_init_params
from tests.porter.rewrite_helpers import (
    MINI_MODEL,
    make_context,
    method_code,
    normalize,
    run_through,
    signature,
)


def _unread(code: str) -> dict[str, set[str]]:
    return unread_attributes(cst.parse_module(textwrap.dedent(code)))


def test_cache_and_eager_attention_attributes_go_with_the_parameter_only_they_read():
    after = run_through(MINI_MODEL, "unread-attributes")
    init = method_code(after.code, "MiniAttention", "__init__")
    for gone in ("self.config", "self.layer_idx", "self.attention_dropout"):
        assert gone not in init, init
    assert "self.head_dim = config.hidden_size // config.num_attention_heads" in init
    assert normalize(signature(after.code, "MiniAttention", "__init__")) == normalize(
        "def __init__(self, config): ..."
    )
    assert "self.self_attn = MiniAttention(config)" in method_code(after.code, "MiniDecoderLayer", "__init__")
    assert "[MiniDecoderLayer(config) for _ in range(config.num_hidden_layers)]" in method_code(
        after.code, "MiniModel", "__init__"
    )
    assert "self.layer_idx = layer_idx -> " in after.changes("unread-attributes", "MiniAttention.__init__")


def test_an_attribute_read_off_another_instance_stays():
    code = """
        class A(nn.Module):
            def __init__(self, config):
                self.head_dim = config.head_dim
                self.unused = config.head_dim
        class B(nn.Module):
            def __init__(self, config):
                self.attn = A(config)
            def forward(self, x):
                return x.view(-1, self.attn.head_dim)
    """
    assert _unread(code) == {"A": {"unused"}}


def test_a_read_of_the_config_is_not_a_read_of_the_attribute():
    code = """
        class A(nn.Module):
            def __init__(self, config):
                self.hidden_size = config.hidden_size
                self.proj = Linear(config.hidden_size, 2)
    """
    assert _unread(code) == {"A": {"hidden_size"}}


def test_what_may_build_a_module_or_what_a_torch_base_reads_stays():
    code = """
        class A(nn.Module):
            def __init__(self, config):
                self.rope = build_rope(config)
                self.size = getattr(config, "size", 4)
                self.named = config.named
            def forward(self, x):
                return getattr(x, "named")
        class P(nn.Embedding):
            def __init__(self, n):
                self.padding_idx = n
    """
    assert _unread(code) == {"A": {"size"}}


def test_an_attribute_a_related_class_reads_off_self_stays():
    code = """
        class Base(nn.Module):
            def forward(self, x):
                return x * self.scale
        class Child(Base):
            def __init__(self, config):
                self.scale = config.scale
    """
    assert _unread(code) == {}


def test_a_class_used_other_than_by_plain_calls_keeps_its_parameters():
    _, context = make_context(MINI_MODEL)
    code = textwrap.dedent(
        """
        class A(nn.Module):
            def __init__(self, config, layer_idx=None, **kwargs):
                self.size = config.size
        class B(nn.Module):
            def __init__(self, config, layer_idx, **kwargs):
                self.size = config.size
        TABLE = {"b": B}
        class C(nn.Module):
            def __init__(self, config):
                self.a = A(config, layer_idx=3)
                self.b = B(config, 3)
        """
    )
    after = drop_unused_init_params(cst.parse_module(code), context).code
    assert "def __init__(self, config):\n        self.size" in after
    assert "A(config)" in after
    assert "def __init__(self, config, layer_idx, **kwargs)" in after and "B(config, 3)" in after
