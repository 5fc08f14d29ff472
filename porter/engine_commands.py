"""`porter serve` and `porter generate`: a ported model run by the engine, behind the OpenAI API or
for one prompt. Bad input (a missing directory, a port in use, a bad sampling value) becomes a
PorterError with one line; the CLI prints it and exits non-zero."""

from __future__ import annotations

import errno
import socket
from pathlib import Path
from typing import Any

from porter.errors import PorterError


def one_line(error: BaseException) -> str:
    """An error as one line: a multi-line message (a worker's traceback) keeps its first and last lines."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    return lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1]}"


def check_can_listen(host: str, port: int) -> None:
    """Raises PorterError when nothing could listen on host:port (in use, not an address here), before
    any model is loaded."""
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        raise PorterError(f"cannot listen on {host}:{port}: {error.strerror}") from None
    family, kind, protocol, _, address = addresses[0]
    with socket.socket(family, kind, protocol) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as error:
            reason = "the port is in use" if error.errno == errno.EADDRINUSE else error.strerror
            raise PorterError(f"cannot listen on {host}:{port}: {reason}") from None


def _engine_error(model_dir: Path, error: BaseException) -> PorterError:
    return PorterError(f"cannot run {model_dir}: {one_line(error)}")


def serve_model(
    model_dir: Path, host: str, port: int, served_model_name: str | None, **engine_options: Any
) -> None:
    """Loads the model on every rank and serves it until interrupted."""
    from engine.server.run import build_engine, run_server

    check_can_listen(host, port)
    try:
        engine = build_engine(str(model_dir), **engine_options)
    except (ValueError, OSError, RuntimeError, KeyError) as error:
        raise _engine_error(model_dir, error) from None
    run_server(engine, served_model_name or str(model_dir), host, port)


def generate_text(model_dir: Path, prompt: str, sampling: dict[str, Any], **engine_options: Any) -> str:
    """The completion of one prompt."""
    from engine import LLM, SamplingParams

    try:
        params = SamplingParams(**sampling)
    except ValueError as error:
        raise PorterError(str(error)) from None
    try:
        with LLM(str(model_dir), **engine_options) as llm:
            if llm.tokenizer is None:
                raise PorterError(f"{model_dir} has no tokenizer, so a text prompt cannot be encoded")
            output = llm.generate([prompt], params, show_progress=False)[0]
    except (ValueError, OSError, RuntimeError, KeyError) as error:
        raise _engine_error(model_dir, error) from None
    return output.outputs[0].text or ""
