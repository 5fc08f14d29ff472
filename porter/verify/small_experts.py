"""Mixture-of-experts settings of the small verify config, and a check that its routing is exercised.

Expert counts shrink to a few experts with two chosen per token, so the experts stay small and the
choice is still a real one (a top-k of all experts would pass with any routing). Grouped routing
keeps two groups of which one is chosen; a model whose first layers are dense keeps one dense layer,
so the other is a mixture-of-experts layer. The names are the config settings transformers uses for
these sizes.

`check_routing_varies` runs the HF model once and fails when every token picks the same experts:
parity would then say nothing about routing.
"""

from __future__ import annotations

import torch
from transformers import PretrainedConfig

from porter.errors import PorterError

EXPERTS, EXPERTS_PER_TOKEN, GROUPS, EXPERT_INTERMEDIATE = 8, 2, 2, 96
EXPERT_COUNT_NAMES = ("num_local_experts", "num_experts", "n_routed_experts")
EXPERTS_PER_TOKEN_NAMES = ("num_experts_per_tok",)
GROUP_NAMES = ("n_group",)
GROUPS_CHOSEN_NAMES = ("topk_group",)
DENSE_PREFIX_NAMES = ("first_k_dense_replace",)
EXPERT_INTERMEDIATE_NAMES = ("moe_intermediate_size",)


def _int_setting(config: PretrainedConfig, name: str) -> int | None:
    value = getattr(config, name, None)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def shrink_experts(config: PretrainedConfig) -> None:
    """Sets the small config's experts: 8 experts, 2 per token, 2 groups choosing 1, one dense layer."""
    counts = [name for name in EXPERT_COUNT_NAMES if (_int_setting(config, name) or 0) > 0]
    if not counts:
        return
    for name in counts:
        setattr(config, name, min(EXPERTS, _int_setting(config, name)))
    for name in EXPERTS_PER_TOKEN_NAMES:
        if hasattr(config, name):
            setattr(config, name, EXPERTS_PER_TOKEN)
    for name in GROUP_NAMES:
        if (_int_setting(config, name) or 0) > 1:
            setattr(config, name, GROUPS)
            for chosen in GROUPS_CHOSEN_NAMES:
                if hasattr(config, chosen):
                    setattr(config, chosen, 1)
    for name in DENSE_PREFIX_NAMES:
        if (_int_setting(config, name) or 0) > 1:
            setattr(config, name, 1)
    for name in EXPERT_INTERMEDIATE_NAMES:
        if _int_setting(config, name):
            setattr(config, name, EXPERT_INTERMEDIATE)


def _stacked_experts(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Modules holding experts' weights stacked: two 3-D parameters of their own."""
    return [
        module
        for module in model.modules()
        if sum(p.dim() == 3 for p in module.parameters(recurse=False)) == 2
    ]


def check_routing_varies(model: torch.nn.Module, vocab_size: int, seed: int) -> None:
    """Runs one prompt through `model`; raises unless its experts modules saw tokens choose different
    experts (more than one distinct set of experts, and more than `top-k` experts in use)."""
    experts = _stacked_experts(model)
    if not experts:
        return
    chosen: list[torch.Tensor] = []

    def record(module, args, kwargs):
        for value in [*args, *kwargs.values()]:
            if isinstance(value, torch.Tensor) and value.dim() == 2 and not value.is_floating_point():
                chosen.append(value.detach().reshape(-1, value.shape[-1]))

    handles = [module.register_forward_pre_hook(record, with_kwargs=True) for module in experts]
    try:
        generator = torch.Generator().manual_seed(seed)
        prompt = torch.randint(0, vocab_size, (1, 24), generator=generator)
        with torch.no_grad():
            model(input_ids=prompt)
    finally:
        for handle in handles:
            handle.remove()
    if not chosen:
        raise PorterError("the experts modules of the small model were never given a routing to check")
    for index in chosen:
        distinct_sets = {tuple(sorted(row)) for row in index.tolist()}
        if len(distinct_sets) < 2 or len(torch.unique(index)) <= index.shape[-1]:
            raise PorterError(
                f"the small model routes every token to the same experts ({sorted(distinct_sets)[0]}): "
                "verify would not test routing"
            )
