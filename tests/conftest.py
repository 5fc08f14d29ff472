"""Shared fixtures: a free TCP port for process groups, and the tiny test model written to disk."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

# Tests and the worker processes they spawn import `engine` and `tests.tiny_model` from the checkout;
# spawned children inherit this sys.path, so model classes pickled by reference resolve there too.
REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def find_free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (bind to port 0, read it back)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def free_port() -> int:
    """A free port for a `tcp://127.0.0.1:<port>` init_method."""
    return find_free_port()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama-shaped checkpoint (safetensors, HF names) with config.json and a word tokenizer.

    Its config names the architecture "TinyTestForCausalLM", registered here to tests.tiny_model.
    """
    from engine.models.registry import register_model
    from tests.tiny_model import ARCHITECTURE, write_tiny_model

    register_model(ARCHITECTURE, "tests.tiny_model:TinyTestForCausalLM")
    return write_tiny_model(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="session")
def tiny_reference(tiny_model_dir: Path):
    """HF's LlamaForCausalLM on the same checkpoint: the dense, no-cache oracle."""
    from tests.tiny_model import load_reference

    return load_reference(tiny_model_dir)
