"""Starting the server: load the model, build the app, run uvicorn until interrupted."""

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


def serve(
    model: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    served_model_name: str | None = None,
    log_level: str = "info",
    **engine_options: Any,
) -> None:
    """Serves `model` over the OpenAI API at http://host:port until interrupted."""
    import uvicorn

    engine = build_engine(model, **engine_options)
    app = build_app(engine, served_model_name or model)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
