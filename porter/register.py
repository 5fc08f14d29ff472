"""Adding a port to the engine's registry (`engine/models/registry.py`), atomically."""

from __future__ import annotations

from pathlib import Path

import libcst as cst

from porter.emit import write_atomically
from porter.errors import PorterError

REGISTRY_PATH = Path(__file__).resolve().parent.parent / "engine" / "models" / "registry.py"


def register(architecture: str, module: str, class_name: str, registry: Path = REGISTRY_PATH) -> bool:
    """Adds or updates `architecture -> (module, class_name)`; returns whether the file changed."""
    tree = cst.parse_module(registry.read_text())
    updater = _UpdateModels(architecture, module, class_name)
    new = tree.visit(updater)
    if not updater.found:
        raise PorterError(f"{registry} has no `_MODELS` dict to register into")
    if new.code == tree.code:
        return False
    write_atomically(registry, new.code)
    return True


class _UpdateModels(cst.CSTTransformer):
    def __init__(self, architecture: str, module: str, class_name: str) -> None:
        self.entry = (architecture, module, class_name)
        self.found = False

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
        architecture, module, class_name = self.entry
        entries[architecture] = (module, class_name)
        body = "".join(f'    "{k}": ("{m}", "{c}"),\n' for k, (m, c) in sorted(entries.items()))
        value = cst.parse_expression("{\n" + body + "}") if entries else cst.Dict([])
        return updated.with_changes(value=value)
