"""Lets the reference side load remote code that imports, unguarded, a package this interpreter lacks,
as long as the verify run never calls into it.

transformers refuses to load a remote file that imports a missing package outside `try` blocks and
availability checks (such as a fused-attention library imported at module level for a training branch). The
reference side gives each such package a placeholder module: importing it and reading names from it
succeed, and any call (or other use) of what it hands out raises ImportError naming the package and
the name reached. So a reference run that needs the package fails loudly instead of computing
something else; one that never reaches it runs the code it would run with the package installed.
Packages guarded by `try: import ...` are not in transformers' list, so their fallbacks still run.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import types
from pathlib import Path


def missing_packages(model_dir: Path) -> list[str]:
    """Top-level packages that the directory's .py files import where transformers checks them (not
    inside `try` or an availability test) and that this interpreter cannot find."""
    from transformers.dynamic_module_utils import get_imports

    wanted = {name for code in sorted(model_dir.glob("*.py")) for name in get_imports(str(code))}
    local = {code.stem for code in model_dir.glob("*.py")}
    return sorted(
        name for name in wanted - local if name not in sys.modules and importlib.util.find_spec(name) is None
    )


def install_placeholders(names: list[str]) -> None:
    """Placeholders for `names` and their submodules (`from name.sub import x` too)."""
    for name in names:
        sys.modules[name] = _Placeholder(name)
    sys.meta_path.insert(0, _PlaceholderFinder(set(names)))


class _PlaceholderFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, roots: set[str]) -> None:
        self.roots = roots

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] not in self.roots:
            return None
        return importlib.util.spec_from_loader(fullname, self, is_package=True)

    def create_module(self, spec):
        return _Placeholder(spec.name)

    def exec_module(self, module) -> None:
        return None


class _Missing:
    """A name read from a missing package: reading attributes from it gives further names, anything
    else raises ImportError."""

    def __init__(self, path: str) -> None:
        self._path = path

    def __getattr__(self, attribute: str) -> _Missing:
        if attribute.startswith("__"):
            raise AttributeError(attribute)
        return _Missing(f"{self._path}.{attribute}")

    def __call__(self, *args, **kwargs):
        raise ImportError(f"the reference run reached {self._path}, and {self._root} is not installed")

    def __mro_entries__(self, bases):
        raise ImportError(f"a class subclasses {self._path}, and {self._root} is not installed")

    @property
    def _root(self) -> str:
        return self._path.split(".")[0]


class _Placeholder(types.ModuleType):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.__path__ = []  # a package: `from name.sub import x` resolves through __getattr__
        self.__spec__ = importlib.util.spec_from_loader(name, loader=None)

    def __getattr__(self, attribute: str):
        if attribute.startswith("__"):
            raise AttributeError(attribute)
        return _Missing(f"{self.__name__}.{attribute}")
