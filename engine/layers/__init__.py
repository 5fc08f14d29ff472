"""Engine layers: tensor-parallel linear/embedding layers, paged attention, rotary, norm, activations."""

from engine.layers.activation import GatedActivation, GeluAndMul, SiluAndMul, get_gated_activation
from engine.layers.attention import PagedAttention, alibi_slopes
from engine.layers.head_sharding import local_heads, shard_heads
from engine.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
    kv_heads_for_rank,
)
from engine.layers.mla import MultiLatentAttention
from engine.layers.norm import FeatureShardedRMSNorm, HeadShardedRMSNorm, RMSNorm
from engine.layers.rotary import LengthDependentRotaryEmbedding, RotaryEmbedding, get_rope
from engine.layers.vocab_embedding import (
    LogitsProcessor,
    ParallelLMHead,
    VocabParallelEmbedding,
    pad_vocab_size,
)

__all__ = [
    "ColumnParallelLinear",
    "GatedActivation",
    "GeluAndMul",
    "FeatureShardedRMSNorm",
    "HeadShardedRMSNorm",
    "LengthDependentRotaryEmbedding",
    "LogitsProcessor",
    "MergedColumnParallelLinear",
    "MultiLatentAttention",
    "PagedAttention",
    "ParallelLMHead",
    "QKVParallelLinear",
    "RMSNorm",
    "ReplicatedLinear",
    "RotaryEmbedding",
    "RowParallelLinear",
    "SiluAndMul",
    "VocabParallelEmbedding",
    "alibi_slopes",
    "local_heads",
    "shard_heads",
    "get_gated_activation",
    "get_rope",
    "kv_heads_for_rank",
    "pad_vocab_size",
]
