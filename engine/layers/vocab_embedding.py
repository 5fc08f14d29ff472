"""Vocab-parallel embedding, LM head and logits: rows of a padded vocab sharded over the ranks.

The vocab is padded up to a multiple of 64*tp so any tp divides it (49953 at tp=2 becomes 50048);
padding rows are zero and their logits are cut off before anyone sees them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine import distributed
from engine.input_metadata import InputMetadata
from engine.layers.linear import check_full_shape, copy_checked

VOCAB_PADDING_MULTIPLE = 64


def pad_vocab_size(vocab_size: int, tp_size: int) -> int:
    """`vocab_size` rounded up to a multiple of 64 * tp_size."""
    multiple = VOCAB_PADDING_MULTIPLE * tp_size
    return (vocab_size + multiple - 1) // multiple * multiple


class VocabParallelEmbedding(nn.Module):
    """Embedding whose rows are split over the ranks; out-of-shard ids contribute zero, then all-reduce."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None) -> None:
        super().__init__()
        # padding_idx only freezes a row's gradient in training; inference has nothing to do with it.
        self.tp_rank = distributed.get_tp_rank()
        self.tp_size = distributed.get_tp_size()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.num_embeddings_padded = pad_vocab_size(num_embeddings, self.tp_size)
        self.num_embeddings_per_rank = self.num_embeddings_padded // self.tp_size
        self.vocab_start = self.tp_rank * self.num_embeddings_per_rank
        self.vocab_end = self.vocab_start + self.num_embeddings_per_rank
        # Zeros, not empty: padding rows are never loaded and must stay zero.
        self.weight = nn.Parameter(
            torch.zeros(self.num_embeddings_per_rank, embedding_dim), requires_grad=False
        )
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        """Copies this rank's rows of the full `[vocab, ...]` checkpoint tensor; padding rows become zero."""
        what = type(self).__name__
        check_full_shape(loaded_weight, (self.num_embeddings, *param.shape[1:]), what)
        real_rows = max(0, min(self.vocab_end, self.num_embeddings) - self.vocab_start)
        param.data.zero_()
        if real_rows:
            copy_checked(
                param.data.narrow(0, 0, real_rows), loaded_weight.narrow(0, self.vocab_start, real_rows), what
            )

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        in_shard = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        local_ids = torch.where(in_shard, input_ids - self.vocab_start, torch.zeros_like(input_ids))
        embedded = F.embedding(local_ids, self.weight)
        embedded = embedded.masked_fill(~in_shard.unsqueeze(-1), 0)
        return distributed.tensor_parallel_all_reduce(embedded)


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection, sharded like the embedding; logits come from `LogitsProcessor`.

    `normalize_rows`: each vocabulary row of the weight is scaled to unit L2 norm as it loads (a head
    that normalises its weight before the product, done once instead of every step; rows are whole
    on every rank, so each rank normalises its own)."""

    def __init__(
        self, num_embeddings: int, embedding_dim: int, bias: bool = False, normalize_rows: bool = False
    ) -> None:
        super().__init__(num_embeddings, embedding_dim)
        self.normalize_rows = normalize_rows
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.num_embeddings_per_rank), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        super().weight_loader(param, loaded_weight, shard_id)
        if self.normalize_rows and param is self.weight:
            param.data.copy_(F.normalize(param.data.float(), dim=-1).to(param.dtype))

    def tie_to(self, embedding: VocabParallelEmbedding) -> None:
        """Makes this head use the embedding's weight Parameter itself (tied word embeddings)."""
        if self.normalize_rows:
            raise ValueError("a head that normalises its rows cannot share the embedding's weight")
        if tuple(embedding.weight.shape) != tuple(self.weight.shape):
            raise ValueError(
                f"cannot tie an LM head of shape {tuple(self.weight.shape)} to an embedding of shape "
                f"{tuple(embedding.weight.shape)}"
            )
        self.weight = embedding.weight

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(
            "ParallelLMHead is not called directly: use LogitsProcessor(lm_head, hidden, metadata)"
        )


class LogitsProcessor(nn.Module):
    """Logits of each sequence's last new token: `[num_seqs, vocab_size]` float32, padding cut off."""

    def __init__(self, vocab_size: int, scale: float = 1.0, soft_cap: float | None = None) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.scale = scale
        self.soft_cap = soft_cap

    def forward(
        self,
        lm_head: VocabParallelEmbedding,
        hidden_states: torch.Tensor,
        input_metadata: InputMetadata | None,
    ) -> torch.Tensor:
        """`input_metadata` None means every row of `hidden_states` gets its logits."""
        if input_metadata is not None:
            hidden_states = hidden_states[input_metadata.logits_indices]
        logits = _float_logits(hidden_states, lm_head.weight, getattr(lm_head, "bias", None))
        logits = distributed.tensor_parallel_all_gather(logits, dim=-1)
        logits = logits[..., : self.vocab_size]
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.soft_cap is not None:
            logits = self.soft_cap * torch.tanh(logits / self.soft_cap)
        return logits


_MM_TO_FLOAT = {"supported": True}


def _float_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`hidden @ weight.T (+ bias)` in float32. On a GPU with half-precision weights the GEMM writes
    float32 itself (`torch.mm(..., out_dtype=)`, its accumulator unrounded): a separate conversion of
    a [batch, vocab] tensor costs a pass over it every step (95 us of llama-1b's 2.7 ms decode step at
    batch 256). Elsewhere, or where this torch lacks it, the product is converted afterwards."""
    half = hidden.dtype in (torch.float16, torch.bfloat16) and weight.dtype == hidden.dtype
    if hidden.is_cuda and half and hidden.dim() == 2 and bias is None and _MM_TO_FLOAT["supported"]:
        try:
            return torch.mm(hidden, weight.t(), out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):
            _MM_TO_FLOAT["supported"] = False
    return F.linear(hidden, weight, bias).float()
