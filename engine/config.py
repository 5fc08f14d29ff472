"""Everything the engine needs to know to start: which model, how it is split, and how much it may hold.

One `EngineConfig` is built by `LLM(...)` and handed, pickled, to every tensor-parallel rank, so it
holds plain values only (strings, numbers, a class or a dotted path) and never a live object.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.distributed import divide
from engine.layers.linear import kv_heads_for_rank
from engine.models.registry import resolve_model_class

# Without a GPU there is no free memory to size the cache from; this many blocks (8192 tokens at the
# default block size) keeps a CPU test run small and still fits several long prompts at once.
DEFAULT_CPU_NUM_KV_BLOCKS = 512

# Tokens one step may hold (prefill chunks plus decode tokens). Steps with prefill rows run eagerly,
# and on a GPU their time is mostly the host launching each layer's kernels, once per step whatever
# the step holds, so a larger budget admits prompts in fewer steps: on an H200, llama-1b's
# 512 x (256 in, 256 out) workload ran at 48,028 output tok/s with 2,048, 54,188 with 4,096 and
# 54,220 with 8,192 (benchmarks/bench_throughput.py, docs/performance.md). The cost is the length of
# a step that carries prefill, which an offline engine does not mind, and its activations, which the
# memory profile at start-up measures before sizing the cache.
DEFAULT_MAX_NUM_BATCHED_TOKENS = 8192

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
    trust_remote_code: let transformers run the configuration (and tokenizer) code a model directory
    ships (`auto_map` in its config.json); the model itself is always the engine's port.
    async_scheduling: schedule and launch step n+1 before reading step n's sampled tokens, so the
    host's per-step work overlaps the device's (the next step takes those tokens on the device).
    Requests with penalties run synchronously either way: their sampler reads every earlier token.
    """

    model: str
    tensor_parallel_size: int = 1
    dtype: str | torch.dtype = "auto"
    device: str = "auto"
    block_size: int = 16
    num_kv_blocks: int | None = None
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 256
    max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS
    max_model_len: int | None = None
    seed: int = 0
    enforce_eager: bool = False
    enable_prefix_caching: bool = True
    model_class: type[nn.Module] | str | None = None
    async_scheduling: bool = True
    trust_remote_code: bool = False

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
        check_model_directory(self.model)

    def device_for_rank(self, rank: int) -> torch.device:
        """Rank r runs on cuda:r (one process per GPU); every rank shares the CPU."""
        return torch.device("cuda", rank) if self.device == "cuda" else torch.device("cpu")


def resolve_device_type(device: str) -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'; 'cuda:0' -> 'cuda' (ranks pick their own index)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device_type = torch.device(device).type
    except (RuntimeError, TypeError):
        device_type = None
    if device_type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if device_type == "cuda" and not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise ValueError(
            f"device 'cuda' asked for, but torch ({build}) sees no CUDA device; use 'cpu' or 'auto'"
        )
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


def prepare_config(config: EngineConfig, hf_config: Any) -> EngineConfig:
    """Fills in what every rank must agree on before any starts: max_model_len and the model class.

    Also checks that the tensor-parallel size divides the head counts, so a bad size fails here,
    before any process is spawned or weight is read.
    """
    refuse_quantized(hf_config, config.model)
    check_tensor_parallel_size(hf_config, config.tensor_parallel_size)
    model_class = config.model_class
    if model_class is None:
        model_class = portable_class_reference(resolve_model_class(getattr(hf_config, "architectures", None)))
    return dataclasses.replace(
        config,
        max_model_len=resolve_max_model_len(config.max_model_len, hf_config),
        model_class=model_class,
    )


def refuse_quantized(hf_config: Any, model: str) -> None:
    """ValueError naming the method when the checkpoint is quantized: the engine's layers hold
    unquantized weights, and loading packed integers into them would run a different model."""
    quantization = getattr(hf_config, "quantization_config", None)
    if quantization is None:
        return
    method = quantization.get("quant_method") if isinstance(quantization, dict) else None
    method = method or getattr(quantization, "quant_method", None) or "an unnamed method"
    method = getattr(method, "value", method)  # transformers keeps it as an enum
    raise ValueError(
        f"{model} is a quantized checkpoint ({method}); the engine runs unquantized checkpoints only"
    )


def check_model_directory(model: str) -> None:
    """FileNotFoundError (or NotADirectoryError) unless `model` is a local directory with a config.json.

    The engine reads local files only; without this, a missing path reaches the hub client, which
    answers about repository ids and network access instead.
    """
    path = Path(model)
    if not path.exists():
        raise FileNotFoundError(f"model directory {model} does not exist")
    if not path.is_dir():
        raise NotADirectoryError(
            f"{model} is not a directory: pass the model's directory (config.json, *.safetensors)"
        )
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{model} has no config.json: it is not a Hugging Face model directory")


def check_tensor_parallel_size(hf_config: Any, tp_size: int) -> None:
    """ValueError naming both numbers when tp divides neither the heads nor (by replication) the KV heads."""
    try:
        shape = attention_shape(hf_config)
    except ValueError:
        return  # an unusual config: the layers raise the same error when the model is built
    divide(shape.num_heads, tp_size, "number of attention heads")
    kv_heads_for_rank(shape.num_kv_heads, tp_size, 0)


def portable_class_reference(model_class: type) -> type | str:
    """The class itself when child processes can import it by module name, else "file.py:Class".

    Classes registered from a file live in a module named only in this process's sys.modules.
    """
    module_name = model_class.__module__
    if module_name == "__main__" or _importable_by_name(module_name):
        return model_class
    module_file = getattr(sys.modules.get(module_name), "__file__", None)
    return f"{module_file}:{model_class.__qualname__}" if module_file else model_class


def _importable_by_name(module_name: str) -> bool:
    # Ask the import finders directly: importlib.util.find_spec also answers from sys.modules, where a
    # module loaded from a file path sits under a name no other process can import.
    top_level = module_name.partition(".")[0]
    for finder in sys.meta_path:
        find_spec = getattr(finder, "find_spec", None)
        if find_spec is not None and find_spec(top_level, None) is not None:
            return True
    return False


@dataclass(frozen=True, slots=True)
class AttentionShape:
    """What the KV cache needs to know about the model, read from its HF config."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    def num_kv_heads_per_rank(self, tp_size: int) -> int:
        # With tp > num_kv_heads each rank holds one replicated KV head (engine.layers.linear).
        return max(1, self.num_kv_heads // tp_size)


def attention_shape(hf_config: Any) -> AttentionShape:
    """Layer, head and head-dim counts under whichever names the config uses (HF has several)."""
    config = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    num_heads = _first_int(config, "num_attention_heads", "n_head", "num_heads")
    num_layers = _first_int(config, "num_hidden_layers", "n_layer", "num_layers")
    if num_heads is None or num_layers is None:
        raise ValueError(f"cannot find the number of attention heads and layers in {type(config).__name__}")
    if getattr(config, "multi_query", False) and not getattr(config, "new_decoder_architecture", False):
        num_kv_heads = 1  # MQA flag (GPT-BigCode, Falcon-7B); Falcon's new architecture counts its groups
    else:
        num_kv_heads = _first_int(
            config, "num_key_value_heads", "num_kv_heads", "n_head_kv", "multi_query_group_num"
        )
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    head_dim = _first_int(config, "head_dim")
    if head_dim is None:
        hidden_size = _first_int(config, "hidden_size", "n_embd", "d_model")
        if hidden_size is None:
            raise ValueError(f"cannot find head_dim or hidden_size in {type(config).__name__}")
        head_dim = hidden_size // num_heads
    return AttentionShape(num_layers, num_heads, num_kv_heads, head_dim)


def _first_int(config: Any, *names: str) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None
