"""Routing functions: router logits `[T, E]` -> (weights `[T, k]` float32, expert ids `[T, k]` int64).

Each is the statements a router writes, named once, so a port calls the one its source computes:
- `softmax_top_k`: softmax over all experts, the k largest, optionally renormalised to sum to 1
  (Mixtral, Qwen-MoE, OLMoE);
- `top_k_softmax`: the k largest logits, then a softmax over those k (GPT-OSS, Granite-MoE);
- `sigmoid_grouped_top_k`: sigmoid scores; a correction bias that only steers the choice; experts
  in groups, the best `top_k_groups` groups by the sum of their two best biased scores kept
  (DeepSeek-V3, GLM-4.5);
- `softmax_grouped_top_k`: softmax scores, groups ranked by their best score (DeepSeek-V2).
`scale_routing_weights` multiplies the chosen weights by a routed scaling factor.
"""

from __future__ import annotations

import torch


def softmax_top_k(
    router_logits: torch.Tensor, top_k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax (float32) over the experts, the `top_k` most probable; renormalised to sum 1 if asked."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def top_k_softmax(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `top_k` largest logits, then a softmax (float32) over just those."""
    logits, ids = torch.topk(router_logits, top_k, dim=-1)
    return torch.softmax(logits.float(), dim=-1), ids


def _top_groups_mask(group_scores: torch.Tensor, top_k_groups: int, experts_per_group: int) -> torch.Tensor:
    """`[T, groups]` group scores -> a `[T, E]` mask of the experts inside the best `top_k_groups`."""
    chosen = torch.topk(group_scores, top_k_groups, dim=-1, sorted=False).indices
    group_mask = torch.zeros_like(group_scores).scatter_(1, chosen, 1.0)
    return group_mask.repeat_interleave(experts_per_group, dim=-1).bool()


def sigmoid_grouped_top_k(
    router_logits: torch.Tensor,
    top_k: int,
    correction_bias: torch.Tensor | None = None,
    num_groups: int = 1,
    top_k_groups: int = 1,
    renormalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 routing: sigmoid scores; the bias only picks (weights are the unbiased scores);
    each group ranked by the sum of its two best biased scores; renormalised if asked."""
    scores = torch.sigmoid(router_logits.float())
    choice = scores if correction_bias is None else scores + correction_bias.float()
    if num_groups > 1:
        num_tokens, num_experts = choice.shape
        per_group = num_experts // num_groups
        group_scores = choice.view(num_tokens, num_groups, per_group).topk(2, dim=-1).values.sum(dim=-1)
        keep = _top_groups_mask(group_scores, top_k_groups, per_group)
        # -inf, as the source fills: a negative correction bias can push every kept score below 0.
        choice = choice.masked_fill(~keep, float("-inf"))
    ids = torch.topk(choice, top_k, dim=-1, sorted=False).indices
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights, ids


def softmax_grouped_top_k(
    router_logits: torch.Tensor,
    top_k: int,
    num_groups: int = 1,
    top_k_groups: int = 1,
    renormalize: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V2 routing: softmax scores, groups ranked by their best score, top-k inside them."""
    scores = torch.softmax(router_logits.float(), dim=-1)
    choice = scores
    if num_groups > 1:
        num_tokens, num_experts = scores.shape
        per_group = num_experts // num_groups
        group_scores = scores.view(num_tokens, num_groups, per_group).max(dim=-1).values
        choice = scores.masked_fill(~_top_groups_mask(group_scores, top_k_groups, per_group), 0.0)
    weights, ids = torch.topk(choice, top_k, dim=-1, sorted=False)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights, ids


def scale_routing_weights(weights: torch.Tensor, routed_scaling_factor: float) -> torch.Tensor:
    """The routed experts' weights times the model's routed scaling factor."""
    return weights * routed_scaling_factor
