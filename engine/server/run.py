"""Starting the server: load the model on every rank, then serve the app with uvicorn until interrupted."""

from __future__ import annotations

from typing import Any

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.server.app import build_app
from engine.server.async_engine import AsyncEngine


def build_engine(model: str, **engine_options: Any) -> AsyncEngine:
    """Loads `model` (a local HF model directory) on every tensor-parallel rank; `engine_options` are
    EngineConfig fields (tensor_parallel_size, max_model_len, device, num_kv_blocks, ...)."""
    return AsyncEngine(LLMEngine(EngineConfig(model=model, **engine_options)))


def run_server(
    engine: AsyncEngine,
    served_model_name: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
) -> None:
    """Serves `engine` over the OpenAI API at http://host:port until interrupted; the engine (and its
    worker processes) shut down on the way out."""
    import uvicorn

    uvicorn.run(build_app(engine, served_model_name), host=host, port=port, log_level=log_level)
