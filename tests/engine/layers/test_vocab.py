"""Vocab-parallel embedding, LM head and logits against dense torch (tp simulated; gloo in test_tensor_parallel)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.input_metadata import InputMetadata
from engine.layers import LogitsProcessor, ParallelLMHead, VocabParallelEmbedding, pad_vocab_size
from tests.engine.layers._tp import simulated_rank


@pytest.mark.parametrize(
    "vocab,tp,padded", [(49953, 2, 50048), (64, 1, 64), (65, 1, 128), (1000, 4, 1024), (256, 2, 256)]
)
def test_pad_vocab_size_rounds_up_to_multiple_of_64_tp(vocab, tp, padded):
    assert pad_vocab_size(vocab, tp) == padded


def test_embedding_single_rank_matches_dense_and_padding_rows_are_zero():
    vocab, dim = 300, 8
    weight = torch.randn(vocab, dim)
    layer = VocabParallelEmbedding(vocab, dim, padding_idx=0)
    layer.weight.data.fill_(7.0)  # garbage that the loader must clear in the padding rows
    layer.weight.weight_loader(layer.weight, weight)
    assert layer.weight.shape == (320, dim)
    assert torch.count_nonzero(layer.weight[vocab:]) == 0
    ids = torch.tensor([0, 5, 299, 5, 123])
    torch.testing.assert_close(layer(ids), F.embedding(ids, weight))


def test_embedding_49953_at_tp2_partials_sum_to_dense():
    vocab, dim, tp = 49953, 4, 2
    weight = torch.randn(vocab, dim)
    per_rank = pad_vocab_size(vocab, tp) // tp  # 25024
    ids = torch.tensor([0, per_rank - 1, per_rank, vocab - 1, 17, 30000])
    total = torch.zeros(len(ids), dim)
    rows = []
    for rank in range(tp):
        with simulated_rank(rank, tp):
            layer = VocabParallelEmbedding(vocab, dim)
        layer.weight.weight_loader(layer.weight, weight)
        rows.append(layer.weight.detach())
        total += layer(ids)
    torch.testing.assert_close(total, F.embedding(ids, weight))
    stacked = torch.cat(rows)
    torch.testing.assert_close(stacked[:vocab], weight)
    assert torch.count_nonzero(stacked[vocab:]) == 0


def test_lm_head_tie_to_shares_the_parameter_object():
    embedding = VocabParallelEmbedding(100, 8)
    head = ParallelLMHead(100, 8)
    head.tie_to(embedding)
    assert head.weight is embedding.weight
    with pytest.raises(ValueError, match="cannot tie"):
        ParallelLMHead(100, 16).tie_to(embedding)
    with pytest.raises(RuntimeError, match="LogitsProcessor"):
        head(torch.randn(2, 8))


@pytest.mark.parametrize("scale,soft_cap,bias", [(1.0, None, False), (0.5, 30.0, True)])
def test_logits_processor_last_tokens_fp32_cut_scaled_capped(scale, soft_cap, bias):
    vocab, dim = 200, 8
    weight, bias_values = torch.randn(vocab, dim), torch.randn(vocab) * 10
    head = ParallelLMHead(vocab, dim, bias=bias)
    head.weight.weight_loader(head.weight, weight)
    if bias:
        head.bias.weight_loader(head.bias, bias_values)
    metadata = InputMetadata.build([3, 1, 2], [3, 9, 5], [[0], [1], [2]], block_size=16)
    hidden = torch.randn(6, dim, dtype=torch.float64).float()
    logits = LogitsProcessor(vocab, scale=scale, soft_cap=soft_cap)(head, hidden, metadata)

    expected = F.linear(hidden[[2, 3, 5]], weight, bias_values if bias else None) * scale
    if soft_cap is not None:
        expected = soft_cap * torch.tanh(expected / soft_cap)
    assert logits.dtype == torch.float32 and logits.shape == (3, vocab)
    torch.testing.assert_close(logits, expected)


def test_logits_processor_bf16_head_returns_fp32_and_without_metadata_every_row():
    head = ParallelLMHead(70, 8).to(torch.bfloat16)
    head.weight.weight_loader(head.weight, torch.randn(70, 8))
    logits = LogitsProcessor(70)(head, torch.randn(4, 8, dtype=torch.bfloat16), None)
    assert logits.dtype == torch.float32 and logits.shape == (4, 70)
