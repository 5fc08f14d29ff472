"""Mixture-of-experts: the stacked-experts layer, its routing functions and shared experts."""

from engine.layers.moe.fused_moe import FusedMoE
from engine.layers.moe.routing import (
    scale_routing_weights,
    sigmoid_grouped_top_k,
    softmax_grouped_top_k,
    softmax_top_k,
    top_k_softmax,
)
from engine.layers.moe.shared_experts import SharedExperts

__all__ = [
    "FusedMoE",
    "SharedExperts",
    "scale_routing_weights",
    "sigmoid_grouped_top_k",
    "softmax_grouped_top_k",
    "softmax_top_k",
    "top_k_softmax",
]
