"""Reading checkpoints and loading them into an engine model, one tensor at a time.

`iterate_checkpoint` streams tensors out of a model directory's safetensors files (single or
sharded), so loading never holds a second copy of the weights. `load_named_weights` knows nothing
about any architecture; it is told the few facts that differ (which checkpoint names were fused into
one parameter, which are tied, which checkpoint tensors are buffers the engine recomputes). A ported
model declares them as tables on its class, and its `load_weights` is `load_declared_weights`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

# (packed parameter's module name, checkpoint module name, shard id), e.g. ("qkv_proj", "q_proj", "q").
FusedName = tuple[str, str, "str | int"]
# (stacked experts parameter, per-expert checkpoint module, part), e.g. ("gate_up_proj", "w1", 0).
ExpertName = tuple[str, str, "int | None"]


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of a model directory, in index order when the checkpoint is sharded."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
    return files


def iterate_checkpoint(model_dir: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (name, tensor) for every tensor of the checkpoint, reading one at a time."""
    for path in checkpoint_files(model_dir):
        try:
            with safe_open(str(path), framework="pt") as handle:
                for name in handle.keys():
                    yield name, handle.get_tensor(name)
        except (SafetensorError, OSError) as error:  # truncated, corrupt, or unreadable
            raise ValueError(f"cannot read checkpoint file {path}: {error}") from None


def default_weight_loader(param: torch.Tensor, loaded_weight: torch.Tensor) -> None:
    """Copies a whole checkpoint tensor into a replicated parameter."""
    if param.shape != loaded_weight.shape:
        raise ValueError(
            f"shape mismatch: parameter {tuple(param.shape)}, checkpoint {tuple(loaded_weight.shape)}"
        )
    param.data.copy_(loaded_weight)


def load_named_weights(
    model: nn.Module,
    weights: Iterable[tuple[str, torch.Tensor]],
    fused: Sequence[FusedName] = (),
    tied: dict[str, str] | None = None,
    ignored: Sequence[str] = (),
    renamed: Sequence[tuple[str, str]] = (),
    experts: Sequence[ExpertName] = (),
) -> set[str]:
    """Loads checkpoint tensors by their HF names; returns the names loaded.

    renamed: (regular expression, replacement) pairs applied to each checkpoint name first, for
    checkpoints whose names differ from the module tree (transformers' own conversion renames).
    fused: checkpoint module names that feed a shard of a packed parameter.
    tied: parameter name -> the name it shares storage with (a checkpoint copy of it is redundant).
    ignored: regular expressions for checkpoint tensors the engine recomputes (rotary caches, masks).
    experts: (stacked parameter, checkpoint module, part) for experts saved one by one:
    `X.{e}.{checkpoint module}.weight` loads as part `part` of expert e of `X.{stacked parameter}`
    (a `FusedMoE`'s `gate_up_proj`/`down_proj`), through its loader with shard id `(e, part)`.
    A checkpoint tensor named like a persistent buffer (one a module keeps in its state dict, such
    as the constants of a learned activation) loads into it; buffers keep their own values when the
    checkpoint has none.
    Raises ValueError naming every checkpoint tensor that matches no parameter or persistent
    buffer, and every parameter (or shard of a packed one) that no tensor loaded.
    """
    tied = tied or {}
    params = dict(model.named_parameters())
    buffers = _persistent_buffers(model)
    ignored_patterns = [re.compile(pattern) for pattern in ignored]
    expected_shards: dict[str, set[str | int]] = {}
    for packed, _, shard_id in fused:
        for name in params:
            if f".{packed}." in f".{name}":
                expected_shards.setdefault(name, set()).add(shard_id)
    loaded_shards: dict[str, set[str | int]] = {name: set() for name in expected_shards}
    loaded_params: set[str] = set()
    loaded_names: set[str] = set()
    unknown: list[str] = []

    renames = [(re.compile(pattern), replacement) for pattern, replacement in renamed]
    for checkpoint_name, tensor in weights:
        name = checkpoint_name
        for pattern, replacement in renames:
            name = pattern.sub(replacement, name)
        if any(pattern.search(name) for pattern in ignored_patterns):
            continue
        if name in tied and name not in params:
            loaded_names.add(checkpoint_name)  # the parameter it is tied to carries it
            continue
        target, shard_id = _packed_target(name, fused, params)
        if target is None and experts:
            target, shard_id = _expert_target(name, experts, params)
            if target is not None:
                params[target].weight_loader(params[target], tensor, shard_id)
                expected_shards.setdefault(target, _expert_shards(params[target], experts, target))
                loaded_shards.setdefault(target, set()).add(shard_id)
                loaded_params.add(target)
                loaded_names.add(checkpoint_name)
                continue
        if target is None and name not in params and name in buffers:
            default_weight_loader(buffers[name], tensor)
            loaded_names.add(checkpoint_name)
            continue
        if target is None:
            if name not in params:
                unknown.append(checkpoint_name)
                continue
            target = name
        param = params[target]
        loader = getattr(param, "weight_loader", None)
        try:
            if shard_id is not None:
                if loader is None:
                    raise ValueError(f"{target} is packed but has no weight_loader for shard {shard_id!r}")
                loader(param, tensor, shard_id)
                loaded_shards[target].add(shard_id)
            elif loader is not None:
                loader(param, tensor)
            else:
                default_weight_loader(param, tensor)
        except ValueError as error:  # a shape mismatch: say which checkpoint tensor it was
            raise ValueError(f"checkpoint tensor {checkpoint_name}: {error}") from None
        if target in expected_shards and shard_id is None:
            loaded_shards[target] |= expected_shards[target]  # one fused checkpoint tensor fills every shard
        loaded_params.add(target)
        loaded_names.add(checkpoint_name)

    # A tied parameter really shared with its partner is not listed by named_parameters() at all;
    # one that is listed is its own tensor and must be loaded like any other.
    missing = [name for name in params if name not in loaded_params]
    missing += [
        f"{name} (shards {sorted(map(str, expected_shards[name] - got))})"
        for name, got in loaded_shards.items()
        if name in loaded_params and got != expected_shards[name]
    ]
    problems = []
    if unknown:
        problems.append(f"checkpoint tensors with no parameter or buffer: {', '.join(sorted(unknown))}")
    if missing:
        problems.append(f"parameters left unloaded: {', '.join(sorted(missing))}")
    if problems:
        raise ValueError("; ".join(problems))
    return loaded_names


def load_declared_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
    """`load_named_weights` with the facts the model's class declares as data (what a port's
    `load_weights` calls):

    - `packed_modules_mapping`: packed parameter module -> [(checkpoint module, shard id)], e.g.
      `{"qkv_proj": [("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v")]}`;
    - `tied_weights`: parameter -> the parameter it shares storage with;
    - `ignored_weights`, `renamed_weights`, `expert_weights`: as `load_named_weights`' `ignored`,
      `renamed` and `experts`.
    A table the class does not declare is empty.
    """
    declared = type(model)
    packed = getattr(declared, "packed_modules_mapping", {})
    return load_named_weights(
        model,
        weights,
        fused=[(target, source, shard) for target, sources in packed.items() for source, shard in sources],
        tied=dict(getattr(declared, "tied_weights", {})),
        ignored=getattr(declared, "ignored_weights", ()),
        renamed=getattr(declared, "renamed_weights", ()),
        experts=getattr(declared, "expert_weights", ()),
    )


def _persistent_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Fully qualified name -> buffer, for the buffers `model.state_dict()` would save."""
    found = {}
    for prefix, module in model.named_modules():
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None and name not in module._non_persistent_buffers_set:
                found[f"{prefix}.{name}" if prefix else name] = buffer
    return found


def _packed_target(
    name: str, fused: Sequence[FusedName], params: dict[str, torch.Tensor]
) -> tuple[str | None, str | int | None]:
    """The packed parameter a fused checkpoint name loads into, and its shard id."""
    for packed, checkpoint_module, shard_id in fused:
        needle = f".{checkpoint_module}."
        if needle in f".{name}":
            candidate = f".{name}".replace(needle, f".{packed}.", 1)[1:]
            if candidate in params:
                return candidate, shard_id
    return None, None


_EXPERT_NAME = re.compile(r"^(?P<owner>.+)\.(?P<expert>\d+)\.(?P<module>[^.]+)\.weight$")


def _expert_target(
    name: str, experts: Sequence[ExpertName], params: dict[str, torch.Tensor]
) -> tuple[str | None, tuple[int, int | None] | None]:
    """The stacked parameter a per-expert checkpoint name loads into, and its (expert, part)."""
    match = _EXPERT_NAME.match(name)
    if match is None:
        return None, None
    for stacked, checkpoint_module, part in experts:
        candidate = f"{match['owner']}.{stacked}"
        if checkpoint_module == match["module"] and candidate in params:
            return candidate, (int(match["expert"]), part)
    return None, None


def _expert_shards(param: torch.Tensor, experts: Sequence[ExpertName], target: str) -> set:
    """Every (expert, part) a stacked parameter needs from a per-expert checkpoint."""
    parts = {part for stacked, _, part in experts if target.endswith(f".{stacked}")}
    return {(expert, part) for expert in range(param.expert_count) for part in parts}
