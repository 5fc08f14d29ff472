"""hf-leftovers: logger calls, maintainers' notes, whole-list slices, passed-on temporaries and
batch-shape spellings go from a port."""

from __future__ import annotations

import textwrap

import libcst as cst

from porter.rewrites.engine_types import EngineTypes
from porter.rewrites.hf_leftovers import DropHFLeftovers
from tests.porter.rewrite_helpers import MINI_MODEL, assert_code, make_context


def _run(code: str, rewrite=None, signatures=None) -> str:
    _, context = make_context(MINI_MODEL)
    context.plan.signatures = signatures or {}
    return (rewrite or DropHFLeftovers()).apply(cst.parse_module(textwrap.dedent(code)), context).code


def test_logger_calls_and_the_branch_left_empty_go():
    after = _run(
        """
        logger = logging.get_logger(__name__)
        class A(nn.Module):
            def __init__(self, config, layer_idx=None):
                self.layer_idx = layer_idx
                if layer_idx is None:
                    logger.warning_once("pass a layer_idx")
                if config.flag:
                    logger.info("flag")
                    self.size = 2
        """
    )
    assert "logger.warning_once" not in after and "logger.info" not in after
    assert "if layer_idx is None" not in after
    assert "if config.flag:\n            self.size = 2" in after


def test_maintainers_notes_go_and_other_comments_stay():
    after = _run(
        """
        # Copied from transformers.models.bloom.modeling_bloom.dropout_add
        def add(x, y):
            # TODO: fuse
            return x + y  # the residual
        """
    )
    assert "Copied from" not in after and "TODO" not in after and "# the residual" in after


def test_a_slice_holding_every_layer_is_the_list():
    after = _run(
        """
        class M(nn.Module):
            def __init__(self, config):
                self.layers = nn.ModuleList([L(config) for _ in range(config.num_hidden_layers)])
            def forward(self, h):
                for layer in self.layers[: self.config.num_hidden_layers]:
                    h = layer(h)
                for layer in self.layers[: self.config.other]:
                    h = layer(h)
                return h
        """
    )
    assert "for layer in self.layers:" in after and "self.layers[: self.config.other]" in after


def test_a_temporary_passed_straight_on_is_one_assignment():
    after = _run(
        """
        class M(nn.Module):
            def forward(self, x):
                outputs = self.model(x)
                hidden_states = outputs
                kept = self.model(x)
                other = kept
                return hidden_states + other + kept
        """
    )
    assert "hidden_states = self.model(x)\n" in after and "outputs" not in after
    assert "other = kept" in after


def test_batch_shapes_used_only_for_heads_become_unflatten_and_flatten():
    after = _run(
        """
        class A(nn.Module):
            def forward(self, hidden_states):
                input_shape = hidden_states.shape[:-1]
                hidden_shape = (*input_shape, -1, self.head_dim)
                q = self.q(hidden_states).view(hidden_shape)
                k = self.k(hidden_states).view(*hidden_shape)
                out = self.attn(q, k)
                return out.reshape(*input_shape, -1).contiguous()
        """
    )
    assert_code(
        after,
        """
        class A(nn.Module):
            def forward(self, hidden_states):
                q = self.q(hidden_states).unflatten(-1, (-1, self.head_dim))
                k = self.k(hidden_states).unflatten(-1, (-1, self.head_dim))
                out = self.attn(q, k)
                return out.flatten(1).contiguous()
        """,
    )


def test_a_batch_shape_read_otherwise_is_left_whole():
    code = """
        class A(nn.Module):
            def forward(self, hidden_states):
                input_shape = hidden_states.shape[:-1]
                q = self.q(hidden_states).reshape(*input_shape, -1)
                return q.new_zeros(input_shape)
        """
    assert "reshape(*input_shape, -1)" in _run(code)


def test_forward_inputs_take_the_engine_types():
    after = _run(
        """
        import torch
        class A(nn.Module):
            def forward(self, hidden_states: tuple[torch.FloatTensor] | None, positions: torch.LongTensor | None, kv_cache, input_metadata):
                return hidden_states
        class B(nn.Module):
            def forward(self, kv_caches, x: Optional[torch.FloatTensor] = None):
                return x
        class C(nn.Module):
            def forward(self, h: tuple[torch.FloatTensor] | None) -> torch.FloatTensor:
                return h
        """,
        EngineTypes(),
        {"A": ["hidden_states", "positions", "kv_cache", "input_metadata"]},
    )
    assert (
        "def forward(self, hidden_states: torch.Tensor, positions: torch.Tensor, kv_cache: KVCache, "
        "input_metadata: InputMetadata):" in after
    )
    # B's forward is not one the engine-interface rewrite wrote: an input with a default keeps its type.
    assert "def forward(self, kv_caches: list[KVCache], x: Optional[torch.FloatTensor] = None):" in after
    assert "def forward(self, h: torch.Tensor) -> torch.Tensor:" in after


def test_no_blank_line_opens_a_method_body():
    after = _run(
        """
        class M(nn.Module):
            def forward(self, x):

                outputs = self.model(x)

                hidden_states = outputs
                return hidden_states
        """
    )
    assert (
        "def forward(self, x):\n        hidden_states = self.model(x)\n        return hidden_states" in after
    )
