"""A tiny Llama-shaped engine model for the engine's own tests, and the checkpoint it loads.

`TinyTestForCausalLM` is written by hand from the engine layers (GQA fused QKV, rotary, paged
attention, fused gate/up + SiLU, row-parallel down/out projections, vocab-parallel embedding and LM
head). Its checkpoint is a randomly initialised `transformers.LlamaForCausalLM` saved with HF names,
so the oracle for every engine test is HF's own forward over the whole sequence, with no cache.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from engine.distributed import get_tp_rank
from engine.input_metadata import InputMetadata
from engine.kv_cache import KVCache
from engine.layers import (
    LogitsProcessor,
    MergedColumnParallelLinear,
    PagedAttention,
    ParallelLMHead,
    QKVParallelLinear,
    RMSNorm,
    RowParallelLinear,
    SiluAndMul,
    VocabParallelEmbedding,
    get_rope,
)
from engine.weights import load_named_weights

ARCHITECTURE = "TinyTestForCausalLM"

# GQA (4 query heads over 2 KV heads) and a vocab that is no multiple of 64, so tp=2 exercises both
# head sharding and vocab padding; 2 layers keep a full HF forward per decode step cheap.
TINY_CONFIG = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)


class TinyAttention(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        self.qkv_proj = QKVParallelLinear(config.hidden_size, head_dim, heads, kv_heads, bias=False)
        self.o_proj = RowParallelLinear(heads * head_dim, config.hidden_size, bias=False)
        self.rotary_emb = get_rope(config, head_dim)
        self.attn = PagedAttention(heads, head_dim, head_dim**-0.5, num_kv_heads=kv_heads)

    def forward(
        self, positions: torch.Tensor, hidden_states: torch.Tensor, kv_cache: KVCache, metadata: InputMetadata
    ) -> torch.Tensor:
        qkv = self.qkv_proj(hidden_states)
        query, key, value = qkv.split(
            [self.qkv_proj.q_size, self.qkv_proj.kv_size, self.qkv_proj.kv_size], dim=-1
        )
        query, key = self.rotary_emb(positions, query, key)
        return self.o_proj(self.attn(query, key, value, kv_cache, metadata))


class TinyMLP(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        size = config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [size, size], bias=False)
        self.down_proj = RowParallelLinear(size, config.hidden_size, bias=False)
        self.act_fn = SiluAndMul()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(hidden_states)))


class TinyDecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.self_attn = TinyAttention(config)
        self.mlp = TinyMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        residual: torch.Tensor | None,
        kv_cache: KVCache,
        metadata: InputMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states, kv_cache, metadata)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


class TinyModel(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(TinyDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCache],
        metadata: InputMetadata,
    ) -> torch.Tensor:
        hidden_states, residual = self.embed_tokens(input_ids), None
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden_states, residual = layer(positions, hidden_states, residual, kv_cache, metadata)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class TinyTestForCausalLM(nn.Module):
    """The engine contract (forward / compute_logits / load_weights) on a Llama-shaped model."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.model = TinyModel(config)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        if config.tie_word_embeddings:
            self.lm_head.tie_to(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCache],
        input_metadata: InputMetadata,
    ) -> torch.Tensor:
        return self.model(input_ids, positions, kv_caches, input_metadata)

    def compute_logits(self, hidden_states: torch.Tensor, input_metadata: InputMetadata) -> torch.Tensor:
        return self.logits_processor(self.lm_head, hidden_states, input_metadata)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        fused = [
            ("qkv_proj", "q_proj", "q"),
            ("qkv_proj", "k_proj", "k"),
            ("qkv_proj", "v_proj", "v"),
            ("gate_up_proj", "gate_proj", 0),
            ("gate_up_proj", "up_proj", 1),
        ]
        tied = {"lm_head.weight": "model.embed_tokens.weight"} if self.config.tie_word_embeddings else {}
        return load_named_weights(self, weights, fused=fused, tied=tied, ignored=[r"rotary_emb\.inv_freq"])


def tiny_config(**overrides: object) -> LlamaConfig:
    """The test model's config, with any field overridden."""
    config = LlamaConfig(**{**TINY_CONFIG, **overrides})
    config.architectures = [ARCHITECTURE]
    return config


def write_tiny_model(
    directory: str | Path, seed: int = 0, with_tokenizer: bool = True, **overrides: object
) -> Path:
    """Saves a seeded random Llama checkpoint (safetensors, HF names) and config.json under `directory`.

    with_tokenizer: also save a word-level tokenizer whose token i >= 3 is the word "w{i}" (0, 1, 2 are
    unk, bos and eos), so text round-trips exactly and a stop string is just a word.
    """
    directory = Path(directory)
    config = tiny_config(**overrides)
    torch.manual_seed(seed)
    hf_model = LlamaForCausalLM(config)
    # Llama's default init (std 0.02) makes a 2-layer random model nearly uniform over the vocab, so
    # greedy picks would hinge on float noise; larger weights give clear winners.
    with torch.no_grad():
        for param in hf_model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.2)
    hf_model.save_pretrained(directory)
    # save_pretrained stamps the HF class into the (shared) config; the engine must see the test class.
    config.architectures = [ARCHITECTURE]
    config.save_pretrained(directory)
    if with_tokenizer:
        _word_tokenizer(config.vocab_size).save_pretrained(directory)
    return directory


def _word_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # Specials get names no word contains: added tokens are matched inside the raw text first, so an
    # eos spelled "w2" would split "w212" apart.
    specials = ["<unk>", "<s>", "</s>"]
    vocab = {name: i for i, name in enumerate(specials)} | {
        f"w{i}": i for i in range(len(specials), vocab_size)
    }
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def load_reference(directory: str | Path) -> LlamaForCausalLM:
    """The checkpoint loaded into HF's own Llama: the dense, no-cache oracle."""
    model = LlamaForCausalLM.from_pretrained(str(directory), dtype=torch.float32, attn_implementation="eager")
    return model.eval()


@torch.inference_mode()
def reference_greedy(
    model: LlamaForCausalLM, prompt_token_ids: list[int], max_tokens: int, eos_token_id: int | None = None
) -> list[int]:
    """Greedy decoding by a full forward over the whole sequence per token (no KV cache at all)."""
    tokens = list(prompt_token_ids)
    generated: list[int] = []
    for _ in range(max_tokens):
        logits = model(torch.tensor([tokens]), use_cache=False).logits[0, -1]
        next_token = int(logits.argmax())
        generated.append(next_token)
        tokens.append(next_token)
        if next_token == eos_token_id:
            break
    return generated


# A prompt starting with this token makes `FailsInForwardOnRankOne` raise on rank 1 (generated
# tokens never sit at position 0, so only a prompt can trigger it).
FAILURE_TRIGGER_TOKEN = 299


class FailsInForwardOnRankOne(TinyTestForCausalLM):
    """The tiny model, except that tensor-parallel rank 1 raises in the forward of a step that runs the
    start of a prompt beginning with FAILURE_TRIGGER_TOKEN: a worker failing mid-step."""

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCache],
        input_metadata: InputMetadata,
    ) -> torch.Tensor:
        starts_with_trigger = (positions == 0) & (input_ids == FAILURE_TRIGGER_TOKEN)
        if get_tp_rank() == 1 and bool(starts_with_trigger.any()):
            raise RuntimeError("rank 1 was told to fail in this forward")
        return super().forward(input_ids, positions, kv_caches, input_metadata)


class FailsToBuildOnRankOne(TinyTestForCausalLM):
    """The tiny model, except that tensor-parallel rank 1 raises while building it: a worker failing at start."""

    def __init__(self, config: LlamaConfig) -> None:
        if get_tp_rank() == 1:
            raise RuntimeError("rank 1 was told to fail while building the model")
        super().__init__(config)
