"""MultiLatentAttention: attention whose KV cache holds a compressed latent per token (DeepSeek-V2's MLA).

The model computes, per token, a latent `c` (`kv_lora_rank` wide, after its norm) and one rotated rope
key `k_pe` shared by all heads; the source expands `c` by the up-projection `W = kv_b_proj.weight`
(`[H * (nope + v), kv_lora_rank]`) into per-head `k_nope` and `v`. This layer caches `[c | k_pe]`
only (one row per token, no value cache) and never expands it: with `W_UK`, `W_UV` the key and value
rows of `W` for head h,

    q_nope . k_nope = q_nope . (W_UK c) = (W_UK^T q_nope) . c        (the query absorbs W_UK)
    sum_s p_s v_s  = W_UV (sum_s p_s c_s)                             (W_UV applied after attention)

so each head attends over the cached rows with the query `[W_UK^T q_nope | q_pe]`, and the weighted sum
of latents is projected by `W_UV`. The absorbed weights are views of `kv_b_proj.weight` taken at each
call (no copy to keep in step with the loaded weight).

On CUDA the cache write and the attention are Triton kernels (`engine/kernels/triton_mla.py`),
capturable in a CUDA graph; elsewhere, or with `PORTER_FORCE_REFERENCE=1`, the PyTorch reference
(`engine/kernels/mla_reference.py`).

Tensor parallelism: heads are sharded (the caller's q projection and `kv_b_proj` column-parallel by
heads, the output projection row-parallel); the latent and rope key come from replicated projections,
so every rank caches the same rows.
"""

from __future__ import annotations

import torch
from torch import nn

from engine import distributed
from engine.input_metadata import InputMetadata
from engine.kernels import dispatch
from engine.kernels.mla_reference import latent_attention_reference, write_latent_cache
from engine.kv_cache import KVCache


class MultiLatentAttention(nn.Module):
    """Attention over a paged latent cache; built with the model's total head count."""

    def __init__(
        self,
        num_heads: int,
        qk_nope_head_dim: int,
        qk_rope_head_dim: int,
        v_head_dim: int,
        kv_lora_rank: int,
        scale: float,
        kv_b_proj: nn.Module,
    ) -> None:
        """`kv_b_proj`: the up-projection module of the attention (its `weight` is this rank's
        heads' rows, `[heads * (nope + v), kv_lora_rank]`). It stays the attention's own submodule,
        so the checkpoint loads it under its name; this layer only reads its weight."""
        super().__init__()
        self.total_num_heads = num_heads
        self.num_heads = distributed.divide(num_heads, distributed.get_tp_size(), "number of attention heads")
        self.qk_nope_head_dim = qk_nope_head_dim
        self.qk_rope_head_dim = qk_rope_head_dim
        self.v_head_dim = v_head_dim
        self.kv_lora_rank = kv_lora_rank
        self.scale = float(scale)
        # Held outside the module tree: registered here it would be a second path to the same
        # parameters, which the loader would count as a second tensor to fill.
        self._up_projection = (kv_b_proj,)
        expected = (self.num_heads * (qk_nope_head_dim + v_head_dim), kv_lora_rank)
        if tuple(kv_b_proj.weight.shape) != expected:
            raise ValueError(
                f"kv_b_proj weight is {tuple(kv_b_proj.weight.shape)} on this rank; MLA with "
                f"{self.num_heads} heads of nope {qk_nope_head_dim} + v {v_head_dim} over a "
                f"{kv_lora_rank}-wide latent needs {expected}"
            )

    @property
    def cache_head_dim(self) -> int:
        """Width of one cached row: the latent and the rope key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`W_UK` `[H, nope, kv_lora_rank]` and `W_UV` `[H, v, kv_lora_rank]`, views of kv_b_proj's weight."""
        weight = self._up_projection[0].weight.view(
            self.num_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank
        )
        return weight[:, : self.qk_nope_head_dim], weight[:, self.qk_nope_head_dim :]

    def forward(
        self,
        q_nope: torch.Tensor,
        q_pe: torch.Tensor,
        latent: torch.Tensor,
        k_pe: torch.Tensor,
        kv_cache: KVCache,
        input_metadata: InputMetadata,
    ) -> torch.Tensor:
        """q_nope `[T, H, nope]`, q_pe `[T, H, rope]` (rotated; `[T, H * D]` also taken), latent
        `[T, kv_lora_rank]` (normed), k_pe `[T, rope]` (rotated; a single-head `[T, 1, rope]` too)
        -> `[T, H * v]`, this rank's heads."""
        num_tokens = q_nope.shape[0]
        q_nope = q_nope.reshape(num_tokens, self.num_heads, self.qk_nope_head_dim)
        q_pe = q_pe.reshape(num_tokens, self.num_heads, self.qk_rope_head_dim)
        rows = torch.cat(
            [
                latent.reshape(num_tokens, 1, self.kv_lora_rank),
                k_pe.reshape(num_tokens, 1, self.qk_rope_head_dim),
            ],
            dim=-1,
        )
        latent_cache = kv_cache[0]
        w_uk, w_uv = self.absorbed_weights()
        q_latent = torch.einsum("thn,hnr->thr", q_nope, w_uk)
        query = torch.cat([q_latent, q_pe.to(q_latent.dtype)], dim=-1)
        if latent_cache.is_cuda and not dispatch.reference_forced():
            from engine.kernels import triton_mla  # Triton only where there is a GPU to run it

            triton_mla.write_latent_rows(rows, latent_cache, input_metadata.slot_mapping)
            attended = triton_mla.latent_attention(
                query.to(latent_cache.dtype),
                latent_cache,
                input_metadata.block_tables,
                input_metadata.context_lens,
                input_metadata.query_start_loc,
                self.scale,
                self.kv_lora_rank,
            ).to(query.dtype)
        else:
            write_latent_cache(rows, latent_cache, input_metadata.slot_mapping)
            attended = latent_attention_reference(
                query, latent_cache, input_metadata, self.scale, self.kv_lora_rank
            )
        output = torch.einsum("thr,hvr->thv", attended, w_uv)
        return output.reshape(num_tokens, self.num_heads * self.v_head_dim)

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, qk_nope_head_dim={self.qk_nope_head_dim}, "
            f"qk_rope_head_dim={self.qk_rope_head_dim}, v_head_dim={self.v_head_dim}, "
            f"kv_lora_rank={self.kv_lora_rank}, scale={self.scale}"
        )
