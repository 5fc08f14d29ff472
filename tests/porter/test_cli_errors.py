"""`porter` CLI errors: one line on stderr, a non-zero exit, no traceback, nothing written or registered.

The engine's model folder and registry are redirected to a temp copy, so a test that goes wrong
cannot touch the checkout; the real registry is also checked to be byte-for-byte unchanged.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

import porter.port
from porter.cli import app
from porter.emit import GENERATED_MARK
from porter.register import REGISTRY_PATH
from tests.porter.rewrite_helpers import MINI_MODEL


@pytest.fixture
def engine_models(tmp_path: Path, monkeypatch):
    """A temp engine/models folder holding a copy of the registry; porter.port writes there instead.

    On teardown the checkout's real registry must be byte-for-byte what it was.
    """
    real_registry = REGISTRY_PATH.read_bytes()
    models = tmp_path / "engine" / "models"
    models.mkdir(parents=True)
    shutil.copyfile(REGISTRY_PATH, models / "registry.py")
    monkeypatch.setattr(porter.port, "ENGINE_MODELS", models)
    monkeypatch.setattr(porter.port, "REGISTRY_PATH", models / "registry.py")
    yield models
    assert REGISTRY_PATH.read_bytes() == real_registry


@pytest.fixture
def mini_source(tmp_path: Path) -> Path:
    path = tmp_path / "src" / "modeling_mini.py"
    path.parent.mkdir()
    # Outside transformers, the snippet's relative imports would be review items: make them absolute.
    path.write_text(MINI_MODEL.replace("from ...", "from transformers."))
    return path


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _assert_clean_failure(result, *phrases: str) -> None:
    """A one-line `error: ...` naming `phrases`, exit status != 0, and no traceback."""
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: ")
    for phrase in phrases:
        assert phrase in lines[0]
    assert "Traceback" not in result.output


def test_missing_modeling_file(engine_models: Path, tmp_path: Path):
    before = _files(tmp_path)
    missing = tmp_path / "nowhere" / "modeling_missing.py"
    result = CliRunner().invoke(app, ["port", str(missing)])
    _assert_clean_failure(result, "no such modeling file", str(missing))
    assert _files(tmp_path) == before


def test_unknown_model_type(engine_models: Path, tmp_path: Path):
    before = _files(tmp_path)
    result = CliRunner().invoke(app, ["port", "no_such_model_type"])
    _assert_clean_failure(result, "'no_such_model_type'", "neither a file nor a model type")
    assert _files(tmp_path) == before


def test_refuses_to_overwrite_a_file_porter_did_not_write(
    engine_models: Path, mini_source: Path, tmp_path: Path
):
    out = tmp_path / "hand_written.py"
    out.write_text("# written by hand\n")
    before = _files(tmp_path)
    result = CliRunner().invoke(app, ["port", str(mini_source), "--out", str(out), "--no-register"])
    _assert_clean_failure(result, str(out), "--force")
    assert _files(tmp_path) == before


def test_force_overwrites_the_file_it_refused(engine_models: Path, mini_source: Path, tmp_path: Path):
    # The control for the test above: with --force the same port goes through.
    out = tmp_path / "hand_written.py"
    out.write_text("# written by hand\n")
    registry = (engine_models / "registry.py").read_bytes()
    result = CliRunner().invoke(
        app, ["port", str(mini_source), "--out", str(out), "--no-register", "--force", "--allow-review"]
    )
    assert result.exit_code == 0, result.output
    assert GENERATED_MARK in out.read_text().splitlines()[0]
    assert (engine_models / "registry.py").read_bytes() == registry


def test_bad_dtype(engine_models: Path):
    before = _files(engine_models)
    result = CliRunner().invoke(app, ["verify", "mini", "--dtype", "int8"])
    _assert_clean_failure(result, "--dtype", "int8", "float32")
    assert _files(engine_models) == before


def test_source_that_does_not_parse(engine_models: Path, tmp_path: Path):
    broken = tmp_path / "modeling_broken.py"
    broken.write_text("class Broken(:\n    pass\n")
    before = _files(tmp_path)
    result = CliRunner().invoke(app, ["port", str(broken)])
    _assert_clean_failure(result, "modeling_broken.py", "does not parse")
    assert _files(tmp_path) == before


def test_source_without_a_causal_lm(engine_models: Path, tmp_path: Path):
    source = tmp_path / "modeling_encoder.py"
    source.write_text(
        "from torch import nn\n\n\nclass Encoder(nn.Module):\n    def forward(self, x):\n        return x\n"
    )
    before = _files(tmp_path)
    result = CliRunner().invoke(app, ["port", str(source)])
    _assert_clean_failure(result, "no causal-LM class")
    assert _files(tmp_path) == before


def test_out_path_it_cannot_register_writes_nothing(engine_models: Path, mini_source: Path, tmp_path: Path):
    out = tmp_path / "elsewhere" / "mini.py"
    result = CliRunner().invoke(app, ["port", str(mini_source), "--out", str(out)])
    _assert_clean_failure(result, "outside engine/models", "--no-register")
    assert not out.exists()
