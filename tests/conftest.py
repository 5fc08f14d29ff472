"""Shared fixtures: a free TCP port for process groups, verify results kept out of the user's cache,
and the tiny test model written to disk; one CPU thread per test process."""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path

import pytest

# Tests and the worker processes they spawn import `engine` and `tests.tiny_model` from the checkout;
# spawned children inherit this sys.path, so model classes pickled by reference resolve there too.
REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# One CPU thread per process, this one and every process it starts (a `porter` run, an engine rank,
# a server): the suite runs one pytest-xdist worker per core, and a worker whose OpenMP threads wait
# for a core the other worker holds spins; the tests' tiny models run no faster on two threads.
# A thread count the caller set is kept.
if "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = "1"  # read by processes started from here, and by torch's first import
    import torch

    torch.set_num_threads(1)  # in case a plugin imported torch before this file

from engine.distributed import find_free_port  # noqa: E402  (after the path is set)


def pytest_collection_finish(session: pytest.Session) -> None:
    """The modules imported and the tests collected live all session: frozen, a full collection no
    longer walks them; and young collections come less often. Porting builds and drops many small
    syntax-tree objects, and the collector took about a tenth of a port's time with the defaults."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(20000, 20, 10)


@pytest.fixture(scope="session", autouse=True)
def porter_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`porter verify` records results in a cache directory: this run's own, not the user's."""
    path = tmp_path_factory.mktemp("porter_cache")
    os.environ["PORTER_CACHE_DIR"] = str(path)
    return path


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
