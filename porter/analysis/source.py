"""Finding the modeling file to port: a path, or a model type of the installed transformers."""

from __future__ import annotations

import importlib.util
import json
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
    # Modules next to the file that it imports (`from .configuration_x import XConfig`, or by bare
    # name): remote code's configuration and helpers, by module name.
    siblings: tuple[str, ...] = ()
    # The package, next to the port, that the siblings a port still imports are copied into.
    support_package: str = ""

    @property
    def remote_code(self) -> bool:
        """Whether the file is remote code (it imports modules of its own directory): its checkpoint
        holds its own module names, none of transformers' load-time renames."""
        return bool(self.siblings)

    @property
    def sibling_package(self) -> str:
        return self.support_package or f"{self.model_type or self.path.stem}_code".replace("-", "_")


def locate(source: str) -> SourceFile:
    """Resolves SOURCE (a modeling file, a model directory with remote code, or a transformers model
    type) to its text."""
    path = Path(source)
    if path.is_dir():
        return _from_model_directory(path)
    if path.suffix == ".py" or path.exists():
        if not path.is_file():
            raise PorterError(f"no such modeling file: {source}")
        module = _transformers_module_of(path.resolve())
        if module:
            return SourceFile(path, read_source(path), module, module, path.parent.name)
        text = read_source(path)
        return SourceFile(
            path, text, None, path.name, _model_type_from_name(path), sibling_imports(path, text)
        )
    return _from_model_type(source)


def read_source(path: Path) -> str:
    """The text of a Python source file; PorterError (one line) for a file that is not UTF-8 text."""
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise PorterError(
            f"{path} is not a text file (not UTF-8 at byte {error.start}); porter reads Python source"
        ) from None
    except OSError as error:
        raise PorterError(f"cannot read {path}: {error.strerror}") from None


def _from_model_directory(directory: Path) -> SourceFile:
    """An HF model directory with remote code: the modeling file its config.json's `auto_map` names
    for AutoModelForCausalLM, the model type config.json gives."""
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise PorterError(f"{directory} is a directory without config.json; pass the modeling file")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise PorterError(f"{config_path} is not JSON: {error.msg} (line {error.lineno})") from None
    auto_map = config.get("auto_map") or {}
    reference = auto_map.get("AutoModelForCausalLM") or auto_map.get("AutoModel")
    if not isinstance(reference, str):
        raise PorterError(f"{config_path} names no AutoModelForCausalLM in auto_map (no remote code to port)")
    module = reference.split("--")[-1].rsplit(".", 1)[0]  # "repo--modeling_x.Class" names another repo
    path = directory / f"{module}.py"
    if not path.is_file():
        raise PorterError(f"{config_path} names {module}.py in auto_map, which is not in {directory}")
    text = read_source(path)
    model_type = config.get("model_type") if isinstance(config.get("model_type"), str) else None
    return SourceFile(
        path, text, None, path.name, model_type or _model_type_from_name(path), sibling_imports(path, text)
    )


def sibling_imports(path: Path, text: str) -> tuple[str, ...]:
    """The modules of `path`'s directory that the file imports, relatively (`from .x import y`) or by
    bare name (`from x import y`, which works where the directory is on sys.path)."""
    import ast

    try:
        tree = ast.parse(text)
    except SyntaxError:
        return ()  # the port reports the syntax error itself
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level <= 1:
            name = node.module.split(".")[0]
            if (path.parent / f"{name}.py").is_file() and name not in found:
                found.append(name)
    return tuple(found)


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
