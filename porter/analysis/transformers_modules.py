"""Where a relative import of a transformers-style file points once the file is outside transformers.

A modeling file copied out of transformers (or taken from an older release) still imports its
surroundings relatively: `from ...activations import ACT2FN`, `from .configuration_x import XConfig`.
Only a file inside transformers' package tree reaches two packages up, so such an import marks the
file as transformers' own `transformers/models/<x>/modeling_<x>.py`, and each relative import names a
module of the installed transformers. Whether that module still defines the name is asked of the
installed transformers itself (importing the module), since its packages re-export names lazily.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
from functools import cache

from porter.analysis.source import SourceFile

TRANSFORMERS = "transformers"


def reaches_outside_folder(source: SourceFile) -> bool:
    """Whether the file imports relatively from above its own folder (`from ...utils import x`).
    Read from the source as given: the rewrites drop imports whose names they removed."""
    try:
        tree = ast.parse(source.text)
    except SyntaxError:
        return False
    return any(isinstance(node, ast.ImportFrom) and node.level >= 2 for node in tree.body)


def presumed_module(source: SourceFile) -> str | None:
    """The dotted path the file has inside transformers: its own when it is part of the installed
    transformers, else `transformers.models.<x>.modeling_<x>` read from its `modeling_<x>.py` name."""
    if source.module is not None:
        return source.module
    stem = source.path.stem
    if not stem.startswith("modeling_"):
        return None
    return f"{TRANSFORMERS}.models.{stem.removeprefix('modeling_')}.{stem}"


def absolute_module(base: str, level: int, module_name: str) -> str:
    """`from <level dots><module_name> import ...` written in the module `base`, made absolute."""
    parts = base.split(".")[:-level]
    return ".".join([*parts, module_name] if module_name else parts)


@cache
def installed_has(module: str, name: str) -> bool:
    """Whether the installed `module` (a transformers module) defines or re-exports `name`."""
    try:
        if importlib.util.find_spec(module) is None:
            return False
        return hasattr(importlib.import_module(module), name)
    except Exception:  # a module that fails to import (a missing optional backend) offers nothing
        return False
