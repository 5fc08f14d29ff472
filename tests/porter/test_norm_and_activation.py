"""rms-norm, fuse-residual-norm, gated-activation: the engine's fused layers in place of HF's own."""

from __future__ import annotations

import pytest

from porter.analysis.norms import find_rms_norms
from tests.porter.rewrite_helpers import (
    MINI_MODEL,
    init_value,
    method_code,
    run_rewrites,
    vary,
)

LLAMA_NORM = """

class MiniRMSNorm(nn.Module):
    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)
"""

# Gemma's: the weight is an offset from one and multiplies in float32, before the cast back
GEMMA_NORM = """

class MiniRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def _norm(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x):
        output = self._norm(x.float())
        output = output * (1.0 + self.weight.float())
        return output.type_as(x)
"""

# Looks like an RMSNorm but centres the input: a LayerNorm without bias, which must not be swapped.
CENTRED_NORM = """

class MiniRMSNorm(nn.Module):
    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x):
        x = x - x.mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))
"""


def _with_norm(norm_class: str) -> str:
    source = MINI_MODEL.replace("\n\nclass MiniMLP(", norm_class + "\n\nclass MiniMLP(", 1)
    return vary(
        source, "nn.LayerNorm(config.hidden_size)", "MiniRMSNorm(config.hidden_size, eps=config.eps)", 3
    )


def _engine_has_norm_variants() -> bool:
    from engine.layers.norm import RMSNorm

    try:
        RMSNorm(4, weight_offset=1.0, multiply_in_float32=True)
    except TypeError:
        return False
    return True


def test_llama_rms_norm_is_recognised_by_running_it():
    import libcst as cst

    matches = find_rms_norms(cst.parse_module(_with_norm(LLAMA_NORM)))
    assert set(matches) == {"MiniRMSNorm"}
    match = matches["MiniRMSNorm"]
    assert (match.size_param, match.eps_param, match.eps_default) == ("hidden_size", "eps", 1e-6)
    assert (match.weight_offset, match.multiply_in_float32) == (0.0, False)


@pytest.mark.skipif(not _engine_has_norm_variants(), reason="engine RMSNorm without weight_offset")
def test_gemma_rms_norm_maps_to_the_offset_float32_variant():
    import libcst as cst

    match = find_rms_norms(cst.parse_module(_with_norm(GEMMA_NORM)))["MiniRMSNorm"]
    assert (match.size_param, match.weight_offset, match.multiply_in_float32) == ("dim", 1.0, True)


def test_a_norm_with_different_arithmetic_is_left_alone():
    after = run_rewrites(_with_norm(CENTRED_NORM), "rms-norm")
    assert after.changes("rms-norm") == []
    assert init_value(after.code, "MiniDecoderLayer", "input_layernorm") == (
        "MiniRMSNorm(config.hidden_size, eps=config.eps)"
    )


def test_constructions_become_the_engine_rms_norm():
    after = run_rewrites(_with_norm(LLAMA_NORM), "rms-norm")
    assert init_value(after.code, "MiniDecoderLayer", "input_layernorm") == (
        "RMSNorm(config.hidden_size, eps=config.eps)"
    )
    assert init_value(after.code, "MiniModel", "norm") == "RMSNorm(config.hidden_size, eps=config.eps)"
    assert ("engine.layers", "RMSNorm") in after.context.plan.engine_imports


def test_a_construction_without_eps_gets_the_source_default():
    source = vary(
        _with_norm(LLAMA_NORM),
        "self.norm = MiniRMSNorm(config.hidden_size, eps=config.eps)",
        "self.norm = MiniRMSNorm(config.hidden_size)",
    )
    after = run_rewrites(source, "rms-norm")
    assert init_value(after.code, "MiniModel", "norm") == "RMSNorm(config.hidden_size, eps=1e-06)"


def test_residual_add_copy_and_norm_fuse_into_one_call():
    after = run_rewrites(_with_norm(LLAMA_NORM), "rms-norm", "fuse-residual-norm")
    forward = method_code(after.code, "MiniDecoderLayer", "forward")
    assert "hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)" in forward
    # the first norm has no add before it in the layer, and the last add has no norm after it
    assert "hidden_states = self.input_layernorm(hidden_states)" in forward
    assert forward.rstrip().endswith("hidden_states = residual + hidden_states\n    return hidden_states")
    assert len(after.changes("fuse-residual-norm")) == 1


def test_no_fusion_when_the_residual_is_read_between_add_and_norm():
    source = vary(
        _with_norm(LLAMA_NORM),
        "        residual = hidden_states\n        hidden_states = self.post_attention_layernorm(hidden_states)\n",
        "        residual = hidden_states\n        print(residual)\n"
        "        hidden_states = self.post_attention_layernorm(hidden_states)\n",
    )
    after = run_rewrites(source, "rms-norm", "fuse-residual-norm")
    assert after.changes("fuse-residual-norm") == []


def test_no_fusion_for_a_norm_that_is_not_the_engine_rms_norm():
    after = run_rewrites(MINI_MODEL, "fuse-residual-norm")  # nn.LayerNorm
    assert after.changes("fuse-residual-norm") == []


def test_gated_mlp_runs_one_activation_layer_on_gate_up():
    after = run_rewrites(MINI_MODEL, "fuse-gate-up", "gated-activation")
    assert init_value(after.code, "MiniMLP", "act_fn") == "get_gated_activation(config.hidden_act)"
    forward = method_code(after.code, "MiniMLP", "forward")
    assert "gate_up = self.gate_up_proj(x)" in forward
    assert "self.down_proj(self.act_fn(gate_up))" in forward
    assert "chunk" not in forward
    assert ("engine.layers", "get_gated_activation") in after.context.plan.engine_imports


def test_activation_used_elsewhere_keeps_the_split():
    source = vary(
        MINI_MODEL,
        "        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))",
        "        h = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))\n"
        "        return self.act_fn(h)",
    )
    after = run_rewrites(source, "fuse-gate-up", "gated-activation")
    assert after.changes("gated-activation") == []
    assert "chunk(2, dim=-1)" in method_code(after.code, "MiniMLP", "forward")


# Baichuan-7B's norm class carries the engine layer's own name.
BAICHUAN_NORM = """

class RMSNorm(nn.Module):
    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        variance = hidden_states.to(torch.float32).pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        if self.weight.dtype in [torch.float16, torch.bfloat16]:
            hidden_states = hidden_states.to(self.weight.dtype)
        return self.weight * hidden_states
"""


def test_a_source_norm_named_like_the_engine_layer_goes_once_every_construction_is_swapped():
    source = vary(_with_norm(BAICHUAN_NORM), "MiniRMSNorm(", "RMSNorm(", 3)
    assert "class RMSNorm(nn.Module)" in source
    after = run_rewrites(source, "rms-norm")
    assert "class RMSNorm" not in after.code  # left in place it would shadow the engine's import
    assert init_value(after.code, "MiniModel", "norm") == "RMSNorm(config.hidden_size, eps=config.eps)"
    assert ("engine.layers", "RMSNorm") in after.context.plan.engine_imports


def test_a_source_norm_named_like_the_engine_layer_stays_while_a_construction_is_not_swapped():
    source = vary(_with_norm(BAICHUAN_NORM), "MiniRMSNorm(", "RMSNorm(", 3)
    source = vary(
        source,
        "self.norm = RMSNorm(config.hidden_size, eps=config.eps)",
        "self.norm = RMSNorm(*[config.hidden_size])",
    )
    after = run_rewrites(source, "rms-norm")
    assert "class RMSNorm(nn.Module)" in after.code
