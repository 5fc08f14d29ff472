"""What `porter verify TARGET` checks: a model type, an architecture name or a ported file."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from porter.errors import PorterError
from porter.port import ENGINE_MODELS, bundled_file

SOURCE_LINE = re.compile(r"^# source: (\S+)$", re.MULTILINE)


@dataclass(frozen=True, slots=True)
class VerifyTarget:
    # The reference: a transformers model type (its config class and HF model), or the path of a
    # remote-code model directory or modeling file.
    model_type: str
    port_path: Path  # the ported file
    module: str | None  # its import path when it lives in engine/models

    @property
    def remote(self) -> bool:
        """Whether the reference is remote code (a path) rather than a transformers model type."""
        return Path(self.model_type).exists()


def resolve_target(target: str, reference: str | None = None) -> VerifyTarget:
    """The port to check and what it is compared with (`reference` wins): a transformers model type,
    or a remote-code model directory or modeling file."""
    if reference is not None:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

        path = Path(reference)
        if path.exists():
            if path.is_dir() and not (path / "config.json").is_file():
                raise PorterError(f"--reference {reference}: a model directory needs a config.json")
            if path.is_file() and path.suffix != ".py":
                raise PorterError(f"--reference {reference}: not a modeling file (.py) or a model directory")
            reference = str(path.resolve())
        elif reference not in CONFIG_MAPPING_NAMES:
            raise PorterError(
                f"--reference {reference!r} is not a model type of the installed transformers, "
                "nor a model directory or modeling file"
            )
    return _resolve(target, reference)


def reference_architecture(model_type: str, port_class: str) -> str:
    """The transformers causal-LM class to compare with: the port's own class name when transformers
    has it, else the class transformers maps the model type to (a remote-code port's class)."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if hasattr(transformers, port_class):
        return port_class
    mapped = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    if mapped is None:
        raise PorterError(
            f"transformers has no causal-LM class for model type '{model_type}'; pass --reference"
        )
    return mapped


def _resolve(target: str, reference: str | None) -> VerifyTarget:
    """The port `target` names; its model type is `reference` when given, else read from its header
    (a port of a file that is no transformers model names none)."""

    def model_type(port_path: Path) -> str:
        return reference if reference is not None else _model_type_of(port_path)

    path = Path(target)
    if path.suffix == ".py":
        if not path.is_file():
            raise PorterError(f"no such ported file: {target}")
        return VerifyTarget(model_type(path), path.resolve(), None)
    from engine.models.registry import registered_architectures

    architectures = registered_architectures()
    if target in architectures:
        module = architectures[target][0]
        port_path = bundled_file(module)
        return VerifyTarget(model_type(port_path), port_path, module)
    port_path = ENGINE_MODELS / f"{target.replace('-', '_')}.py"
    if port_path.is_file():
        return VerifyTarget(model_type(port_path), port_path, f"engine.models.{port_path.stem}")
    raise PorterError(
        f"'{target}' is not a ported file, a registered architecture or a ported model type "
        f"(port it first: porter port {target})"
    )


def _model_type_of(port_path: Path) -> str:
    header = port_path.read_text()[:2000]
    match = SOURCE_LINE.search(header)
    if match is None:
        raise PorterError(f"{port_path} has no porter header naming its source")
    source = match.group(1)
    parts = source.split(".")
    if source.startswith("transformers.models.") and len(parts) >= 4:
        return parts[2]
    stem = Path(source).stem
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if stem.startswith("modeling_") and stem.removeprefix("modeling_") in CONFIG_MAPPING_NAMES:
        return stem.removeprefix("modeling_")
    raise PorterError(f"cannot tell which transformers model {source} corresponds to; pass --reference")
