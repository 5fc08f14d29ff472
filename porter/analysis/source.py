"""Finding the modeling file to port: a path, or a model type of the installed transformers."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from porter.errors import PorterError


@dataclass(frozen=True, slots=True)
class SourceFile:
    path: Path
    text: str
    # Dotted module path when the file is part of the installed transformers
    # (e.g. "transformers.models.x.modeling_x"), so relative imports can be made absolute.
    module: str | None
    # What the generated header names: the module path, or the file's name (never an absolute path).
    display_name: str
    model_type: str | None


def locate(source: str) -> SourceFile:
    """Resolves SOURCE (a file path or a transformers model type) to its text."""
    path = Path(source)
    if path.suffix == ".py" or path.exists():
        if not path.is_file():
            raise PorterError(f"no such modeling file: {source}")
        module = _transformers_module_of(path.resolve())
        model_type = path.parent.name if module else _model_type_from_name(path)
        return SourceFile(path, path.read_text(), module, module or path.name, model_type)
    return _from_model_type(source)


def _from_model_type(model_type: str) -> SourceFile:
    folder = model_type.replace("-", "_")
    module = f"transformers.models.{folder}.modeling_{folder}"
    spec = importlib.util.find_spec("transformers")
    if spec is None or spec.origin is None:
        raise PorterError("transformers is not installed")
    path = Path(spec.origin).parent / "models" / folder / f"modeling_{folder}.py"
    if not path.is_file():
        raise PorterError(f"'{model_type}' is neither a file nor a model type of the installed transformers")
    return SourceFile(path, path.read_text(), module, module, folder)


def _transformers_module_of(path: Path) -> str | None:
    spec = importlib.util.find_spec("transformers")
    if spec is None or spec.origin is None:
        return None
    root = Path(spec.origin).parent.resolve()
    try:
        relative = path.relative_to(root)
    except ValueError:
        return None
    return ".".join(("transformers", *relative.with_suffix("").parts))


def _model_type_from_name(path: Path) -> str | None:
    stem = path.stem
    return stem.removeprefix("modeling_") if stem.startswith("modeling_") else None
