"""Adding a port to the engine's registry (`engine/models/registry.py`), atomically."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import libcst as cst

from porter.emit import write_atomically
from porter.errors import PorterError

REGISTRY_PATH = Path(__file__).resolve().parent.parent / "engine" / "models" / "registry.py"


def registered(registry: Path = REGISTRY_PATH) -> dict[str, tuple[str, str]]:
    """The registry file's entries as written: architecture -> (module, class name)."""
    reader = _UpdateModels(None, "", "")
    cst.parse_module(registry.read_text()).visit(reader)
    return reader.entries


def register(
    architecture: str,
    module: str,
    class_name: str,
    registry: Path = REGISTRY_PATH,
    drop: Iterable[str] = (),
) -> bool:
    """Adds or updates `architecture -> (module, class_name)` and removes the `drop` architectures
    (entries whose file this port replaced); returns whether the file changed."""
    tree = cst.parse_module(registry.read_text())
    updater = _UpdateModels(architecture, module, class_name, drop)
    new = tree.visit(updater)
    if not updater.found:
        raise PorterError(f"{registry} has no `_MODELS` dict to register into")
    if new.code == tree.code:
        return False
    write_atomically(registry, new.code)
    return True


class _UpdateModels(cst.CSTTransformer):
    """Rewrites `_MODELS` with one entry set (none when `architecture` is None) and some dropped."""

    def __init__(
        self, architecture: str | None, module: str, class_name: str, drop: Iterable[str] = ()
    ) -> None:
        self.entry = (architecture, module, class_name)
        self.drop = set(drop)
        self.found = False
        self.entries: dict[str, tuple[str, str]] = {}

    def leave_AnnAssign(self, original: cst.AnnAssign, updated: cst.AnnAssign) -> cst.AnnAssign:
        if not (isinstance(updated.target, cst.Name) and updated.target.value == "_MODELS"):
            return updated
        if not isinstance(updated.value, cst.Dict):
            raise PorterError("the registry's `_MODELS` is not a dict literal")
        self.found = True
        entries = {}
        for element in updated.value.elements:
            key = element.key.evaluated_value
            values = [e.value.evaluated_value for e in element.value.elements]
            entries[key] = tuple(values)
        self.entries = dict(entries)
        architecture, module, class_name = self.entry
        if architecture is None:
            return updated
        for dropped in self.drop:
            entries.pop(dropped, None)
        entries[architecture] = (module, class_name)
        body = "".join(f'    "{k}": ("{m}", "{c}"),\n' for k, (m, c) in sorted(entries.items()))
        value = cst.parse_expression("{\n" + body + "}") if entries else cst.Dict([])
        return updated.with_changes(value=value)
