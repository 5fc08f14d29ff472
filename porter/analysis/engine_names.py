"""Names the ports give the engine's layers: the rewrite that builds one writes it under this name,
and the rewrites after it find it by the same name."""

from __future__ import annotations

FUSED_QKV = "qkv_proj"  # the QKVParallelLinear that separate q, k and v projections become
FUSED_GATE_UP = "gate_up_proj"  # the MergedColumnParallelLinear that gate and up projections become
ENGINE_NORM = "RMSNorm"  # the engine's RMSNorm, swapped in for a file's own where they compute alike
