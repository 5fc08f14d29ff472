"""Building an engine model from a local HF model directory and streaming its checkpoint into it.

Everything is read from disk: config and tokenizer are loaded with `local_files_only=True`, so a
missing file is an error here and never a download. Parameters are created directly on the target
device in the target dtype, and each checkpoint tensor is read once and copied once into its shard.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig

from engine.models.registry import load_target, resolve_model_class
from engine.weights import iterate_checkpoint

# Any one of these next to config.json means the directory carries a tokenizer.
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "spiece.model",
)


def load_hf_config(model_dir: str | Path, trust_remote_code: bool = False) -> PretrainedConfig:
    """The model's config.json through AutoConfig, never touching the network. `trust_remote_code`
    lets a directory whose config.json names its own configuration class (`auto_map`) load it."""
    config = AutoConfig.from_pretrained(
        str(model_dir), local_files_only=True, trust_remote_code=trust_remote_code
    )
    _keep_written_settings(config, Path(model_dir) / "config.json")
    return config


def _keep_written_settings(config: PretrainedConfig, path: Path) -> None:
    """Keeps every setting config.json writes readable under its own name. A checkpoint of an older
    transformers names settings that the installed config class has since moved (`rotary_pct` into
    `rope_parameters`), and a port of a modeling file of that release reads them by those names."""
    if not path.is_file():
        return
    for key, value in json.loads(path.read_text()).items():
        if not hasattr(config, key):
            setattr(config, key, value)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Makes new floating-point tensors `dtype` inside the block; restores the previous default after."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def load_model(
    model_dir: str | Path,
    dtype: torch.dtype,
    device: torch.device | str,
    model_class: type[nn.Module] | str | None = None,
    hf_config: PretrainedConfig | None = None,
    trust_remote_code: bool = False,
) -> tuple[nn.Module, PretrainedConfig]:
    """Builds the engine model for `model_dir` on `device` in `dtype` and loads its checkpoint.

    The class is `model_class` (a class or "pkg.module:Class") when given, else the registry's entry
    for the config's `architectures`. Tensor-parallel rank and size come from engine.distributed, so
    call init_distributed first. Raises ValueError naming any checkpoint tensor the model does not know
    and any parameter the checkpoint leaves unloaded. `trust_remote_code` is load_hf_config's.
    """
    if hf_config is None:
        hf_config = load_hf_config(model_dir, trust_remote_code)
    if model_class is None:
        model_class = resolve_model_class(getattr(hf_config, "architectures", None))
    elif isinstance(model_class, str):
        model_class = load_target(model_class)
    device = torch.device(device)
    # The config names the dtype the model runs in, as transformers' `from_pretrained(dtype=...)`
    # leaves it: a module that builds its tensors in `config.dtype` (Apertus' xIELU activation)
    # would otherwise make them in the checkpoint's dtype and feed float32 into bf16 layers.
    hf_config = copy.deepcopy(hf_config)
    hf_config.dtype = dtype
    # Building under the device and dtype allocates each parameter once, where it will live; a later
    # .to() would hold two copies of the model at its peak.
    with torch.device(device), default_dtype(dtype):
        model = model_class(hf_config)
    model.eval()
    try:
        model.load_weights(_on_device(iterate_checkpoint(model_dir), device))
    except ValueError as error:
        raise ValueError(f"loading {model_dir} into {model_class.__name__}: {error}") from error
    return model, hf_config


def _on_device(
    weights: Iterator[tuple[str, torch.Tensor]], device: torch.device
) -> Iterator[tuple[str, torch.Tensor]]:
    # The weight loaders slice each full tensor down to this rank's shard; moving the full tensor to
    # the GPU first makes that slice-and-copy one device-side copy instead of a strided host gather.
    for name, tensor in weights:
        yield name, tensor.to(device, non_blocking=False) if device.type != "cpu" else tensor


def has_tokenizer(model_dir: str | Path) -> bool:
    """Whether the directory ships tokenizer files."""
    return any((Path(model_dir) / name).exists() for name in _TOKENIZER_FILES)


def load_tokenizer(model_dir: str | Path, trust_remote_code: bool = False) -> Any | None:
    """The directory's tokenizer through AutoTokenizer (local files only), or None when it has none."""
    if not has_tokenizer(model_dir):
        return None
    return AutoTokenizer.from_pretrained(
        str(model_dir), local_files_only=True, trust_remote_code=trust_remote_code
    )


def eos_token_ids(model_dir: str, hf_config: Any, tokenizer: Any | None) -> set[int]:
    """End-of-sequence ids from config.json, generation_config.json and the tokenizer, together."""
    ids: set[int] = set()

    def add(value: Any) -> None:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(v for v in value if isinstance(v, int))

    add(getattr(hf_config, "eos_token_id", None))
    generation_config = Path(model_dir) / "generation_config.json"
    if generation_config.exists():
        add(json.loads(generation_config.read_text()).get("eos_token_id"))
    if tokenizer is not None:
        add(getattr(tokenizer, "eos_token_id", None))
    return ids
