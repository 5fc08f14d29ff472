"""An OpenAI-compatible HTTP server over the engine (`porter serve`): FastAPI app, asynchronous
engine loop, request and response shapes, metrics."""

from engine.server.app import build_app
from engine.server.async_engine import AsyncEngine
from engine.server.requests import EngineDeadError, RequestHandle

__all__ = ["AsyncEngine", "EngineDeadError", "RequestHandle", "build_app"]
