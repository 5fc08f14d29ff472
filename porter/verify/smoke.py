"""A port is built and run once before it is written: a failure is a review item naming the line.

The port is imported from a scratch folder (with the remote-code modules it imports beside it), built
from its source's default configuration shrunk (porter verify's small config, so a few thousand
parameters on the CPU) with random weights, and runs one prefill of a short prompt and one decode
step through the engine's paged attention, KV cache and `compute_logits`. This catches what a
rewrite left inconsistent (a name read but gone, a shape the flattened batch no longer has, a helper
reading a removed attribute) without a checkpoint or a reference model.

A configuration porter cannot build (remote code whose config class does not import here, a file of
no known model type), or one the port reads a setting from that the installed config class no
longer has (a 4.3x name a checkpoint of that era writes into its config.json), leaves the check
inconclusive rather than failing a port that may well be right.
"""

from __future__ import annotations

import importlib
import sys
import tempfile
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path

from porter.analysis.source import SourceFile

PROMPT_LENGTH, BLOCK_SIZE, NUM_BLOCKS = 5, 16, 4


@dataclass(frozen=True, slots=True)
class SmokeFailure:
    line: int | None  # line of the checked text where it broke (None: outside the port's own code)
    message: str


def smoke_check(text: str, source: SourceFile, architecture: str) -> SmokeFailure | None:
    """Builds the port `text` (its architecture class) on a small config and runs a prefill and a
    decode step; the first failure, or None when it ran (or the check could not be set up)."""
    with tempfile.TemporaryDirectory(prefix="porter-check-") as scratch:
        package = f"porter_check_{uuid.uuid4().hex[:12]}"
        folder = Path(scratch) / package
        folder.mkdir()
        (folder / "__init__.py").write_text("")
        port_path = folder / "port.py"
        port_path.write_text(text)
        if source.siblings:
            from porter.siblings import copy_siblings

            copy_siblings(source, text, port_path)
        sys.path.insert(0, scratch)
        try:
            config = _small_config(source, architecture, Path(scratch))
            if config is None:
                return None
            try:
                module = importlib.import_module(f"{package}.port")
                _run(getattr(module, architecture), config)
            except Exception as error:  # anything the port raises is what the check reports
                if _missing_setting(error):
                    return None
                return _failure(error, port_path)
        finally:
            sys.path.remove(scratch)
            for name in [n for n in sys.modules if n == package or n.startswith(package + ".")]:
                del sys.modules[name]


def _small_config(source: SourceFile, architecture: str, scratch: Path):
    """The shrunk default config of the source's model type (its own class for remote code)."""
    from porter.analysis.transformers_modules import reaches_outside_folder

    try:
        # A file of transformers' own tree (an older release's, with its configuration beside it) is
        # built from the installed config class of its model type, as its imports now are.
        if source.siblings and not reaches_outside_folder(source):
            from porter.verify.reference import remote_config

            work = scratch / "remote"
            work.mkdir()
            config, _ = remote_config(source.path, architecture, work)
            return config
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

        from porter.verify.small_model import small_config

        if source.model_type not in CONFIG_MAPPING_NAMES:
            return None
        return small_config(source.model_type, architecture)
    except Exception:  # no config to build the port from: nothing to check it with
        return None


def _run(model_class: type, config) -> None:
    import torch

    from engine.input_metadata import InputMetadata
    from engine.kv_cache import allocate_kv_caches
    from engine.layers.attention import cache_shape_of

    generator = torch.Generator().manual_seed(0)
    with torch.device("cpu"):
        model = model_class(config).float().eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(0.05 * torch.randn(parameter.shape, generator=generator))
    num_layers, kv_heads, head_dim, value_head_dim = cache_shape_of(model)
    caches = allocate_kv_caches(
        num_layers, NUM_BLOCKS, BLOCK_SIZE, kv_heads, head_dim, torch.float32, "cpu", value_head_dim
    )
    tokens = torch.randint(0, config.vocab_size, (PROMPT_LENGTH + 1,), generator=generator)
    with torch.inference_mode():
        for start, end in ((0, PROMPT_LENGTH), (PROMPT_LENGTH, PROMPT_LENGTH + 1)):  # prefill, decode
            metadata = InputMetadata.build([end - start], [end], [[0]], BLOCK_SIZE, "cpu")
            hidden = model(tokens[start:end], torch.arange(start, end), caches, metadata)
            logits = model.compute_logits(hidden, metadata)
            if logits.shape[0] != 1 or logits.shape[-1] < config.vocab_size:
                raise ValueError(
                    f"compute_logits gave shape {tuple(logits.shape)} for one sequence of a "
                    f"{config.vocab_size}-token vocabulary"
                )
            if not torch.isfinite(logits).all():
                raise ValueError("the logits are not finite")


def _missing_setting(error: BaseException) -> bool:
    """An AttributeError for a setting the config object lacks (see the module docstring)."""
    from transformers import PretrainedConfig

    return isinstance(error, AttributeError) and isinstance(getattr(error, "obj", None), PretrainedConfig)


def _failure(error: BaseException, port_path: Path) -> SmokeFailure:
    message = " ".join(f"{type(error).__name__}: {error}".split())
    line = None
    frames = traceback.extract_tb(error.__traceback__)
    if isinstance(error, SyntaxError) and error.filename == str(port_path):
        line = error.lineno
    for frame in reversed(frames):
        if frame.filename == str(port_path):
            line = frame.lineno
            break
    return SmokeFailure(line, message[:300])


def place_of(text: str, line: int | None) -> tuple[str, str]:
    """(`Class.method` or "module", the code on `line`) of the checked text."""
    import ast

    if line is None:
        return "module", ""
    where = "module"
    for node in ast.parse(text).body:
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.lineno <= line <= (item.end_lineno or 0):
                    where = f"{node.name}.{item.name}"
        elif isinstance(node, ast.FunctionDef) and node.lineno <= line <= (node.end_lineno or 0):
            where = node.name
    return where, text.splitlines()[line - 1].strip()
