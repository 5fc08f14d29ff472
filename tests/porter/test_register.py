"""register: a port is added to (a temp copy of) engine/models/registry.py, sorted, idempotently, atomically."""

from __future__ import annotations

import ast
import os
import shutil
from pathlib import Path

import pytest

import porter.emit
from porter.errors import PorterError
from porter.register import REGISTRY_PATH, register


@pytest.fixture
def registry(tmp_path: Path) -> Path:
    """A copy of the engine's real registry, so the tests see its real layout."""
    copy = tmp_path / "registry.py"
    shutil.copyfile(REGISTRY_PATH, copy)
    return copy


def _models(path: Path) -> list[tuple[str, tuple[str, str]]]:
    """`_MODELS` of a registry file, as (architecture, (module, class)) pairs in file order."""
    for statement in ast.parse(path.read_text()).body:
        if isinstance(statement, ast.AnnAssign) and getattr(statement.target, "id", None) == "_MODELS":
            return list(ast.literal_eval(statement.value).items())
    raise AssertionError(f"{path} has no _MODELS")


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != "registry.py")


def test_register_adds_the_entry_and_keeps_the_rest_of_the_file(registry: Path):
    original = registry.read_text()
    before = dict(_models(registry))

    assert register("MiniForCausalLM", "engine.models.mini", "MiniForCausalLM", registry) is True

    assert dict(_models(registry)) == {**before, "MiniForCausalLM": ("engine.models.mini", "MiniForCausalLM")}
    # Everything outside the dict literal is untouched.
    head, tail = original.split("_MODELS", 1)[0], original.split("\n}\n", 1)[1]
    new = registry.read_text()
    assert new.startswith(head)
    assert new.endswith(tail)


def test_entries_are_kept_sorted(registry: Path):
    register("ZzzForCausalLM", "engine.models.zzz", "ZzzForCausalLM", registry)
    register("AaaForCausalLM", "engine.models.aaa", "AaaForCausalLM", registry)
    names = [name for name, _ in _models(registry)]
    assert names == sorted(names)
    assert {"AaaForCausalLM", "ZzzForCausalLM"} <= set(names)


def test_an_unsorted_registry_comes_out_sorted(tmp_path: Path):
    path = tmp_path / "registry.py"
    path.write_text(
        "_MODELS: dict[str, tuple[str, str]] = {\n"
        '    "BForCausalLM": ("engine.models.b", "BForCausalLM"),\n'
        '    "AForCausalLM": ("engine.models.a", "AForCausalLM"),\n'
        "}\n"
    )
    register("CForCausalLM", "engine.models.c", "CForCausalLM", path)
    assert path.read_text() == (
        "_MODELS: dict[str, tuple[str, str]] = {\n"
        '    "AForCausalLM": ("engine.models.a", "AForCausalLM"),\n'
        '    "BForCausalLM": ("engine.models.b", "BForCausalLM"),\n'
        '    "CForCausalLM": ("engine.models.c", "CForCausalLM"),\n'
        "}\n"
    )


def test_registering_again_changes_nothing(registry: Path):
    register("MiniForCausalLM", "engine.models.mini", "MiniForCausalLM", registry)
    first = registry.read_bytes()
    modified = registry.stat().st_mtime_ns

    assert register("MiniForCausalLM", "engine.models.mini", "MiniForCausalLM", registry) is False
    assert registry.read_bytes() == first
    assert registry.stat().st_mtime_ns == modified  # not even rewritten with the same bytes


def test_registering_a_new_module_for_an_architecture_updates_it(registry: Path):
    register("MiniForCausalLM", "engine.models.mini", "MiniForCausalLM", registry)
    assert register("MiniForCausalLM", "engine.models.mini_v2", "MiniForCausalLM", registry) is True
    assert dict(_models(registry))["MiniForCausalLM"] == ("engine.models.mini_v2", "MiniForCausalLM")
    assert [name for name, _ in _models(registry)].count("MiniForCausalLM") == 1


def test_a_failure_while_writing_leaves_the_old_file_and_no_temporary(registry: Path, monkeypatch):
    original = registry.read_bytes()
    real_fdopen = os.fdopen

    class _FailsHalfway:
        """A file handle that writes half of what it is given, then the disk is full."""

        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()
            return False

        def write(self, text: str) -> int:
            self.handle.write(text[: len(text) // 2])
            self.handle.flush()
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(porter.emit.os, "fdopen", lambda fd, mode: _FailsHalfway(real_fdopen(fd, mode)))
    with pytest.raises(OSError, match="No space left"):
        register("MiniForCausalLM", "engine.models.mini", "MiniForCausalLM", registry)

    assert registry.read_bytes() == original
    assert _leftovers(registry.parent) == []


def test_a_failure_at_the_rename_leaves_the_old_file_and_no_temporary(registry: Path, monkeypatch):
    original = registry.read_bytes()

    def _rename_fails(source, destination):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(porter.emit.os, "replace", _rename_fails)
    with pytest.raises(OSError, match="Input/output error"):
        register("MiniForCausalLM", "engine.models.mini", "MiniForCausalLM", registry)

    assert registry.read_bytes() == original
    assert _leftovers(registry.parent) == []


def test_a_registry_without_a_models_dict_is_a_clear_error_and_is_left_alone(tmp_path: Path):
    path = tmp_path / "registry.py"
    path.write_text("MODELS = {}\n")
    with pytest.raises(PorterError, match="no `_MODELS` dict"):
        register("MiniForCausalLM", "engine.models.mini", "MiniForCausalLM", path)
    assert path.read_text() == "MODELS = {}\n"
