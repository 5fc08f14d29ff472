"""porter's CUDA C++ kernels (`engine/csrc/`): paged decode attention and the KV cache write.

Decode attention runs on tensor cores for fp16/bf16 with grouped KV heads (GQA/MQA) and on CUDA
cores otherwise (MHA, fp32); both split long contexts over thread blocks (split-K) and read each
K/V byte once per KV head.

The extension is compiled on first use on a CUDA device, for that device's architecture, with
torch's extension builder, and cached under `$PORTER_KERNEL_CACHE` (default
`~/.cache/porter/kernels`) in a folder named by a hash of the sources, the architecture and the
torch/CUDA versions, so an edit or an upgrade rebuilds and nothing stale is ever loaded. Importing
this module builds nothing; a machine without CUDA never builds at all.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
from pathlib import Path
from types import ModuleType

import torch

CSRC_DIR = Path(__file__).resolve().parent.parent / "csrc"
SOURCES = ("bindings.cpp", "paged_decode_attention.cu", "paged_decode_attention_mma.cu", "cache_write.cu")
HEADERS = ("decode_common.h", "vector_io.h")
SUPPORTED_HEAD_DIMS = (64, 128, 256)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_extension: ModuleType | None = None
_lock = threading.Lock()


def _cache_root() -> Path:
    configured = os.environ.get("PORTER_KERNEL_CACHE")
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "porter" / "kernels"


def _cuda_flags(arch: str) -> list[str]:
    # Naming the architecture keeps torch from adding every arch it knows (slow builds, and code
    # that would be JIT-compiled from PTX at start).
    return ["-O3", f"-gencode=arch=compute_{arch},code=sm_{arch}", "-lineinfo"]


def _build_key(arch: str) -> str:
    """Hash of everything that changes the binary: sources, flags, architecture, torch and CUDA versions."""
    digest = hashlib.sha256()
    for name in (*SOURCES, *HEADERS):
        digest.update(name.encode())
        digest.update((CSRC_DIR / name).read_bytes())
    digest.update(f"{_cuda_flags(arch)}|{torch.__version__}|{torch.version.cuda}".encode())
    return digest.hexdigest()[:16]


def _check_toolchain() -> None:
    from torch.utils.cpp_extension import CUDA_HOME

    nvcc = Path(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None
    if nvcc is None or not nvcc.exists():
        raise RuntimeError(
            "porter's CUDA kernels are built on first use and need nvcc: no CUDA toolkit found "
            "(install it or set CUDA_HOME), or set PORTER_FORCE_REFERENCE=1 to run the PyTorch path"
        )
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise RuntimeError(
            f"porter's CUDA kernels are built on first use and need a C++ compiler: '{compiler}' not found "
            "(install one or set CXX), or set PORTER_FORCE_REFERENCE=1 to run the PyTorch path"
        )


def load_extension() -> ModuleType:
    """Builds (once per source hash and architecture) and imports the extension; thread-safe."""
    global _extension
    if _extension is not None:
        return _extension
    with _lock:
        if _extension is not None:
            return _extension
        if not torch.cuda.is_available():
            raise RuntimeError("porter's CUDA kernels need a CUDA device; none is available")
        _check_toolchain()
        from torch.utils.cpp_extension import load

        major, minor = torch.cuda.get_device_capability()
        arch = f"{major}{minor}"
        name = f"porter_kernels_{_build_key(arch)}"
        build_dir = _cache_root() / name
        build_dir.mkdir(parents=True, exist_ok=True)
        _extension = load(
            name=name,
            sources=[str(CSRC_DIR / source) for source in SOURCES],
            build_directory=str(build_dir),
            extra_cflags=["-O3"],
            extra_cuda_cflags=_cuda_flags(arch),
            verbose=os.environ.get("PORTER_KERNEL_VERBOSE", "0") == "1",
        )
        return _extension


def _check_cuda(name: str, tensor: torch.Tensor, device: torch.device) -> None:
    if tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device}, expected {device}")


def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Writes key/value `[T, KV, D]` into the caches `[blocks, block_size, KV, D]` at `slot_mapping` (-1 = skip).

    key/value may be strided views (e.g. of a fused qkv output) as long as their last dim is contiguous;
    caches must be contiguous and share the key's dtype; slot_mapping is int64 `[T]`.
    """
    device = key.device
    for name, tensor in (("value", value), ("key_cache", key_cache), ("value_cache", value_cache)):
        _check_cuda(name, tensor, device)
    _check_cuda("slot_mapping", slot_mapping, device)
    if key_cache.dim() != 4 or key_cache.shape != value_cache.shape:
        raise ValueError(f"caches must be [blocks, block_size, KV, D], got {tuple(key_cache.shape)}")
    expected = (slot_mapping.shape[0], key_cache.shape[2], key_cache.shape[3])
    if tuple(key.shape) != expected or tuple(value.shape) != expected:
        raise ValueError(f"key/value must be {expected}, got {tuple(key.shape)} and {tuple(value.shape)}")
    if slot_mapping.dtype != torch.int64:
        raise ValueError(f"slot_mapping must be int64, got {slot_mapping.dtype}")
    if not (key.dtype == value.dtype == key_cache.dtype == value_cache.dtype):
        raise ValueError("key, value and both caches must share one dtype")
    load_extension().write_kv_cache(key, value, key_cache, value_cache, slot_mapping.contiguous())


def supports_decode(query: torch.Tensor, key_cache: torch.Tensor) -> bool:
    """Whether `paged_decode_attention` handles this head_dim, dtype and block size."""
    block_size = key_cache.shape[1]
    return (
        query.is_cuda
        and query.shape[-1] in SUPPORTED_HEAD_DIMS
        and query.dtype in SUPPORTED_DTYPES
        and key_cache.dtype == query.dtype
        and block_size > 0
        and block_size & (block_size - 1) == 0
    )


def paged_decode_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    max_context_len: int,
    scale: float,
    alibi_slopes: torch.Tensor | None = None,
    sliding_window: int | None = None,
    logits_soft_cap: float | None = None,
    out: torch.Tensor | None = None,
    partition_size: int | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of one new token per sequence, query `[S, H, D]`, over its paged cache -> `[S, H, D]`.

    Token i sits at KV index `context_lens[i] - 1` and sees KV indices `0 ..= context_lens[i] - 1`
    (within `sliding_window` when given). `max_context_len` must bound `context_lens` (it sizes the
    split-K grid without a device sync). block_tables int32 `[S, max_blocks]`, context_lens int32 `[S]`,
    alibi_slopes float32 `[H]`. `sinks` `[H]`: per-head attention-sink logits, each a term exp(sink)
    with no value in its head's softmax denominator. A sequence with context length 0 gets zeros. `out`, when given, must
    be contiguous and shaped like the query. `partition_size` (a multiple of 16) fixes the split-K
    partition length; by default the launcher picks it from the batch, the context and the kernel's
    occupancy on this device.
    """
    if query.dim() != 3:
        raise ValueError(f"query must be [num_seqs, num_heads, head_dim], got {tuple(query.shape)}")
    device = query.device
    for name, tensor in (
        ("key_cache", key_cache),
        ("value_cache", value_cache),
        ("block_tables", block_tables),
        ("context_lens", context_lens),
    ):
        _check_cuda(name, tensor, device)
    if not supports_decode(query, key_cache):
        raise ValueError(
            f"paged_decode_attention needs head_dim in {SUPPORTED_HEAD_DIMS}, a dtype in {SUPPORTED_DTYPES} "
            f"shared by query and cache and a power-of-two block size; got head_dim {query.shape[-1]}, "
            f"{query.dtype}/{key_cache.dtype}, block size {key_cache.shape[1]}"
        )
    num_seqs = query.shape[0]
    if block_tables.dtype != torch.int32 or context_lens.dtype != torch.int32:
        raise ValueError("block_tables and context_lens must be int32")
    if block_tables.shape[0] != num_seqs or tuple(context_lens.shape) != (num_seqs,):
        raise ValueError(
            f"{num_seqs} query tokens but block_tables {tuple(block_tables.shape)} and "
            f"context_lens {tuple(context_lens.shape)}"
        )
    if query.stride(-1) != 1:
        query = query.contiguous()
    if out is None:
        out = torch.empty(query.shape, dtype=query.dtype, device=device)
    if alibi_slopes is not None:
        _check_cuda("alibi_slopes", alibi_slopes, device)
        alibi_slopes = alibi_slopes.float().contiguous()
    if sinks is not None:
        _check_cuda("sinks", sinks, device)
        sinks = sinks.float().contiguous()
    window = 0 if sliding_window is None else int(sliding_window)
    load_extension().paged_decode_attention(
        out,
        query,
        key_cache,
        value_cache,
        block_tables.contiguous(),
        context_lens.contiguous(),
        alibi_slopes,
        sinks,
        float(scale),
        window,
        0.0 if logits_soft_cap is None else float(logits_soft_cap),
        0 if partition_size is None else int(partition_size),
        int(max_context_len),
    )
    return out
