"""Everything the engine needs to know to start: which model, how it is split, and how much it may hold.

One `EngineConfig` is built by `LLM(...)` and handed, pickled, to every tensor-parallel rank, so it
holds plain values only (strings, numbers, a class or a dotted path) and never a live object.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# Without a GPU there is no free memory to size the cache from; this many blocks (8192 tokens at the
# default block size) keeps a CPU test run small and still fits several long prompts at once.
DEFAULT_CPU_NUM_KV_BLOCKS = 512

_DTYPE_NAMES = {
    "float32": torch.float32,
    "float": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


@dataclass(slots=True)
class EngineConfig:
    """How one engine instance runs: model location, parallelism, dtype/device and memory budget.

    num_kv_blocks: a fixed number of KV-cache blocks; `None` sizes it from free GPU memory times
    `gpu_memory_utilization` on CUDA, and uses `DEFAULT_CPU_NUM_KV_BLOCKS` on CPU.
    max_model_len: the longest prompt + completion; `None` takes the model's max_position_embeddings.
    enforce_eager: run every step eagerly (the seam where decode CUDA graphs will plug in).
    model_class: an engine model class (or "pkg.module:Class") overriding the registry lookup.
    """

    model: str
    tensor_parallel_size: int = 1
    dtype: str | torch.dtype = "auto"
    device: str = "auto"
    block_size: int = 16
    num_kv_blocks: int | None = None
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    seed: int = 0
    enforce_eager: bool = False
    enable_prefix_caching: bool = True
    model_class: type[nn.Module] | str | None = None

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_seqs ({self.max_num_seqs}) and max_num_batched_tokens "
                f"({self.max_num_batched_tokens}) must be >= 1"
            )
        self.device = resolve_device_type(self.device)

    def device_for_rank(self, rank: int) -> torch.device:
        """Rank r runs on cuda:r (one process per GPU); every rank shares the CPU."""
        return torch.device("cuda", rank) if self.device == "cuda" else torch.device("cpu")


def resolve_device_type(device: str) -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'; 'cuda:0' -> 'cuda' (ranks pick their own index)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    device_type = torch.device(device).type
    if device_type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    return device_type


def resolve_dtype(dtype: str | torch.dtype, hf_config: Any, device_type: str) -> torch.dtype:
    """The dtype to run in: an explicit one, else the checkpoint's own, else float32 on CPU / bfloat16 on CUDA."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto":
        return _dtype_from_name(dtype)
    # Read the stored values, not the attributes: `config.torch_dtype` logs a deprecation warning on
    # transformers 5, which stores `dtype`; transformers 4 stored `torch_dtype`.
    stored = vars(hf_config)
    for attribute in ("dtype", "torch_dtype"):
        saved = stored.get(attribute)
        if saved is not None:
            return saved if isinstance(saved, torch.dtype) else _dtype_from_name(str(saved))
    return torch.bfloat16 if device_type == "cuda" else torch.float32


def _dtype_from_name(name: str) -> torch.dtype:
    key = name.removeprefix("torch.")
    if key not in _DTYPE_NAMES:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(sorted(_DTYPE_NAMES))} or 'auto'")
    return _DTYPE_NAMES[key]


def resolve_max_model_len(requested: int | None, hf_config: Any) -> int:
    """The longest sequence to allow: the request, capped by what the model's positions reach."""
    config = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    model_limit = None
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            model_limit = value
            break
    if requested is None:
        if model_limit is None:
            raise ValueError("the config names no maximum position; pass max_model_len")
        return model_limit
    if model_limit is not None and requested > model_limit:
        raise ValueError(f"max_model_len ({requested}) exceeds the model's maximum positions ({model_limit})")
    return requested
