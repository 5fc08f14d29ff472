"""Runs the OpenAI-compatible server in a background thread on 127.0.0.1 for tests.

The server shares the test's process, so a test can look inside its engine (the block pool, the
scheduler) while real HTTP clients talk to it over loopback.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn

from engine.server import AsyncEngine, build_app
from engine.server.run import build_engine
from tests.conftest import find_free_port

MODEL_NAME = "tiny"
# Joins the words of every message; tokens are words "w<i>", so a chat prompt is plain token text.
CHAT_TEMPLATE = "{% for message in messages %}{{ message['content'] }} {% endfor %}"
_START_TIMEOUT_S = 60.0


def add_chat_template(model_dir: Path) -> Path:
    """Gives the tiny model's word tokenizer a chat template (saved next to it)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(str(model_dir))
    return model_dir


@dataclass
class RunningServer:
    base_url: str  # http://127.0.0.1:<port>
    engine: AsyncEngine
    thread: threading.Thread

    @property
    def api_url(self) -> str:
        return self.base_url + "/v1"

    def wait_until_idle(self, timeout_s: float = 10.0) -> None:
        """Waits until the engine holds no request (aborts reach it between steps)."""
        deadline = time.monotonic() + timeout_s
        while self.engine.num_requests or self.engine.engine.has_unfinished_requests():
            if time.monotonic() > deadline:
                raise TimeoutError(f"the engine still holds {self.engine.num_requests} requests")
            time.sleep(0.02)


@contextlib.contextmanager
def running_server(model_dir: Path, **engine_options: Any) -> Iterator[RunningServer]:
    """A server for `model_dir` on a free loopback port, stopped (engine shut down) on exit."""
    engine_options.setdefault("device", "cpu")
    engine = build_engine(str(model_dir), **engine_options)
    port = find_free_port()
    config = uvicorn.Config(
        build_app(engine, MODEL_NAME), host="127.0.0.1", port=port, log_level="warning", timeout_keep_alive=30
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="porter-test-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + _START_TIMEOUT_S
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            engine.engine.shutdown()
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield RunningServer(f"http://127.0.0.1:{port}", engine, thread)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
