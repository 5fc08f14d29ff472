"""`porter` CLI errors: one line on stderr, a non-zero exit, no traceback, nothing written or registered.

The engine's model folder and registry are redirected to a temp copy, so a test that goes wrong
cannot touch the checkout; the real registry is also checked to be byte-for-byte unchanged.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

import porter.emit
import porter.port
from porter.cli import app
from porter.emit import GENERATED_MARK
from porter.register import REGISTRY_PATH
from tests.conftest import find_free_port
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


# ------------------------------------------------------------------ --out: nothing lost or moved


def _registry(models: Path) -> dict[str, tuple[str, str]]:
    from porter.register import registered

    return registered(models / "registry.py")


def _generated_port(path: Path, source: str) -> None:
    path.write_text(f"# {GENERATED_MARK}\n# source: {source}\n# transformers 0, porter 0\nclass Port: ...\n")


def test_out_onto_another_architectures_port_is_refused(engine_models: Path, mini_source: Path):
    llama = engine_models / "llama.py"
    _generated_port(llama, "transformers.models.llama.modeling_llama")
    before = _files(engine_models)
    result = CliRunner().invoke(app, ["port", str(mini_source), "--out", str(llama), "--allow-review"])
    _assert_clean_failure(result, str(llama), "is the port of LlamaForCausalLM", "--force")
    assert _files(engine_models) == before


def test_force_onto_another_architectures_port_drops_its_registry_entry(
    engine_models: Path, mini_source: Path
):
    # The control: with --force the file is replaced, and the registry never names the class that is gone.
    llama = engine_models / "llama.py"
    _generated_port(llama, "transformers.models.llama.modeling_llama")
    result = CliRunner().invoke(
        app, ["port", str(mini_source), "--out", str(llama), "--allow-review", "--force"]
    )
    assert result.exit_code == 0, result.output
    entries = _registry(engine_models)
    assert "LlamaForCausalLM" not in entries
    assert entries["MiniForCausalLM"] == ("engine.models.llama", "MiniForCausalLM")
    assert "class MiniForCausalLM" in llama.read_text()


def test_out_onto_an_unregistered_port_of_another_source_is_refused(engine_models: Path, mini_source: Path):
    other = engine_models / "other.py"
    _generated_port(other, "modeling_other.py")
    before = _files(engine_models)
    result = CliRunner().invoke(app, ["port", str(mini_source), "--out", str(other), "--no-register"])
    _assert_clean_failure(result, "is the port of modeling_other.py, not modeling_mini.py", "--force")
    assert _files(engine_models) == before


def test_out_that_would_move_a_registry_entry_is_refused(engine_models: Path, mini_source: Path):
    first = CliRunner().invoke(
        app, ["port", str(mini_source), "--out", str(engine_models / "mini.py"), "--allow-review"]
    )
    assert first.exit_code == 0, first.output
    # The control: porting the same source onto its own port again needs no --force.
    again = CliRunner().invoke(
        app, ["port", str(mini_source), "--out", str(engine_models / "mini.py"), "--allow-review"]
    )
    assert again.exit_code == 0, again.output
    before = _files(engine_models)
    copy = engine_models / "mini_copy.py"
    result = CliRunner().invoke(app, ["port", str(mini_source), "--out", str(copy), "--allow-review"])
    _assert_clean_failure(result, "MiniForCausalLM is registered to", "mini.py", "--force moves")
    assert _files(engine_models) == before
    moved = CliRunner().invoke(
        app, ["port", str(mini_source), "--out", str(copy), "--allow-review", "--force"]
    )
    assert moved.exit_code == 0, moved.output
    assert _registry(engine_models)["MiniForCausalLM"][0] == "engine.models.mini_copy"


def test_a_binary_source_is_one_line(engine_models: Path, tmp_path: Path):
    binary = tmp_path / "modeling_binary.py"
    binary.write_bytes(bytes(range(256)) * 4)
    result = CliRunner().invoke(app, ["port", str(binary)])
    _assert_clean_failure(result, "modeling_binary.py is not a text file")


def test_force_onto_a_directory_is_refused(engine_models: Path, mini_source: Path, tmp_path: Path):
    folder = tmp_path / "a_folder.py"
    (folder / "inside").mkdir(parents=True)
    before = _files(tmp_path)
    result = CliRunner().invoke(
        app, ["port", str(mini_source), "--out", str(folder), "--no-register", "--force"]
    )
    _assert_clean_failure(result, str(folder), "is a directory")
    assert _files(tmp_path) == before


def test_out_that_cannot_be_written_is_one_line(
    engine_models: Path, mini_source: Path, tmp_path: Path, monkeypatch
):
    # A path through a regular file, then a read-only filesystem (as the OS reports it).
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    out = blocker / "mini.py"
    result = CliRunner().invoke(
        app, ["port", str(mini_source), "--out", str(out), "--no-register", "--allow-review"]
    )
    _assert_clean_failure(result, f"cannot write {out}")

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(porter.emit.tempfile, "mkstemp", read_only)
    out = tmp_path / "mini.py"
    result = CliRunner().invoke(
        app, ["port", str(mini_source), "--out", str(out), "--no-register", "--allow-review"]
    )
    _assert_clean_failure(result, f"cannot write {out}", "Read-only file system")
    assert not out.exists()


def test_generated_files_are_readable_by_all(engine_models: Path, mini_source: Path, tmp_path: Path):
    previous = os.umask(0o022)
    try:
        out = tmp_path / "mini.py"
        result = CliRunner().invoke(
            app, ["port", str(mini_source), "--out", str(out), "--no-register", "--allow-review"]
        )
        assert result.exit_code == 0, result.output
        assert stat.S_IMODE(out.stat().st_mode) == 0o644
        os.chmod(out, 0o664)  # a file that exists keeps its mode
        CliRunner().invoke(
            app, ["port", str(mini_source), "--out", str(out), "--no-register", "--allow-review"]
        )
        assert stat.S_IMODE(out.stat().st_mode) == 0o664
    finally:
        os.umask(previous)


# ------------------------------------------------------------------------------ verify, list


def test_verify_json_onto_an_unwritable_path_fails_before_the_run(
    engine_models: Path, tmp_path: Path, monkeypatch
):
    import porter.verify.parity

    def must_not_run(*args, **kwargs):
        raise AssertionError("verify ran before its --json path was checked")

    monkeypatch.setattr(porter.verify.parity, "verify_model", must_not_run)
    for path, says in [
        (tmp_path / "no_such_folder" / "result.json", "does not exist"),
        (tmp_path, "is a directory"),
    ]:
        result = CliRunner().invoke(app, ["verify", "opt", "--json", str(path)])
        _assert_clean_failure(result, "--json", str(path), says)


def test_list_is_not_cut_at_80_columns_when_piped():
    result = CliRunner().invoke(app, ["list"])
    assert result.exit_code == 0, result.output
    assert "source: transformers.models.llama.modeling_llama transformers" in result.output
    assert "LlamaForCausalLM " in result.output  # whole, not "LlamaForCausal…"


def test_review_is_not_cut_at_80_columns_when_piped():
    result = CliRunner().invoke(app, ["review", "opt", "--rule", "tensor-parallel"])
    assert result.exit_code == 0, result.output
    # An 86-character line of the port, whole on one line.
    assert (
        "VocabParallelEmbedding(config.vocab_size, config.word_embed_proj_dim, self.padding_idx)"
        in result.output
    )


# ------------------------------------------------------------------------------- generate, serve


def test_generate_and_serve_name_a_missing_model_directory(tmp_path: Path):
    missing = tmp_path / "missing" / "dir"
    result = CliRunner().invoke(app, ["generate", str(missing), "hello"])
    _assert_clean_failure(result, f"model directory {missing} does not exist")
    result = CliRunner().invoke(app, ["serve", str(missing), "--port", str(find_free_port())])
    _assert_clean_failure(result, f"model directory {missing} does not exist")


def test_serve_on_a_port_in_use_fails_before_loading(tmp_path: Path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(app, ["serve", str(tmp_path / "not_loaded"), "--port", str(port)])
    _assert_clean_failure(result, f"cannot listen on 127.0.0.1:{port}", "in use")


def test_generate_prints_the_completion(tmp_path: Path):
    from tests.tiny_model import write_tiny_model

    model_dir = write_tiny_model(tmp_path / "llama")
    config = json.loads((model_dir / "config.json").read_text())
    config["architectures"] = ["LlamaForCausalLM"]  # the bundled Llama port runs the tiny checkpoint
    (model_dir / "config.json").write_text(json.dumps(config))
    result = CliRunner().invoke(
        app, ["generate", str(model_dir), "w5 w6 w7", "--max-tokens", "4", "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    words = result.output.split()
    assert len(words) == 4 and all(word.startswith("w") for word in words)
    bad = CliRunner().invoke(
        app, ["generate", str(model_dir), "w5", "--temperature", "-1", "--device", "cpu"]
    )
    _assert_clean_failure(bad, "temperature must be >= 0")


def test_a_registry_that_cannot_be_written_leaves_the_old_port_in_place(
    engine_models: Path, mini_source: Path, monkeypatch
):
    old_port = engine_models / "mini.py"
    _generated_port(old_port, "modeling_mini.py")
    before = _files(engine_models)

    def read_only_registry(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(porter.port, "register", read_only_registry)
    result = CliRunner().invoke(app, ["port", str(mini_source), "--out", str(old_port), "--allow-review"])
    _assert_clean_failure(
        result, "cannot update the registry", "Read-only file system", f"{old_port} is unchanged"
    )
    assert _files(engine_models) == before
