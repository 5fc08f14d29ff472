"""residual-stream: a pre-norm layer with the engine's RMSNorm on both sides takes and returns the
residual, so the add before each norm runs inside it; any other layer shape is left alone."""

from __future__ import annotations

from porter.analysis.source import locate
from tests.porter.rewrite_helpers import MINI_MODEL, method_code, normalize, run_through, signature


def test_the_residual_passes_between_layers_and_into_the_final_norm():
    llama = locate("llama")
    after = run_through(llama.text, "residual-stream", module=llama.module)
    layer = method_code(after.code, "LlamaDecoderLayer", "forward")
    params = signature(after.code, "LlamaDecoderLayer", "forward")
    assert "hidden_states: torch.Tensor, residual: torch.Tensor | None, positions" in " ".join(params.split())
    assert (
        "    if residual is None:\n        residual = hidden_states\n"
        "        hidden_states = self.input_layernorm(hidden_states)\n    else:\n"
        "        hidden_states, residual = self.input_layernorm(hidden_states, residual)\n"
    ) in layer
    assert layer.rstrip().endswith("return hidden_states, residual")
    backbone = normalize(method_code(after.code, "LlamaModel", "forward"))
    assert "residual = None\n" in backbone
    assert "hidden_states, residual = decoder_layer(" in backbone
    assert "hidden_states, _ = self.norm(hidden_states, residual)" in backbone


def test_a_layer_without_the_engine_norm_keeps_its_own_add():
    after = run_through(MINI_MODEL, "residual-stream")
    assert "residual" not in signature(after.code, "MiniDecoderLayer", "forward")
    assert not after.changes("residual-stream")
