"""The verify config's experts: shrunk to a real choice, and a routing that picks the same experts
for every token is refused."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig

from porter.errors import PorterError
from porter.verify.small_experts import check_routing_varies, shrink_experts
from porter.verify.small_model import small_config


def test_experts_shrink_to_eight_with_two_per_token_and_one_dense_layer():
    config = AutoConfig.for_model("deepseek_v3")
    shrink_experts(config)
    assert (config.n_routed_experts, config.num_experts_per_tok) == (8, 2)
    assert (config.n_group, config.topk_group, config.first_k_dense_replace) == (2, 1, 1)
    assert config.moe_intermediate_size == 96


def test_a_dense_config_is_left_alone():
    config = AutoConfig.for_model("llama")
    before = config.to_dict()
    shrink_experts(config)
    assert config.to_dict() == before


def _tiny_mixtral(seed: int) -> torch.nn.Module:
    import transformers

    config = small_config("mixtral", "MixtralForCausalLM")
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.MixtralForCausalLM(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.08)
    return model


def test_routing_that_varies_across_tokens_passes():
    check_routing_varies(_tiny_mixtral(0), 997, seed=0)


def test_a_router_that_sends_every_token_to_the_same_experts_is_refused():
    model = _tiny_mixtral(0)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.zero_()  # equal logits: top-k picks the same experts for all tokens
    with pytest.raises(PorterError, match="routes every token to the same experts"):
        check_routing_varies(model, 997, seed=0)
