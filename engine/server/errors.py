"""Errors as OpenAI's API reports them: `{"error": {"message", "type", "param", "code"}}` with the
matching HTTP status, so OpenAI clients raise their usual exception classes (BadRequestError, ...)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.server.requests import EngineDeadError


class APIError(Exception):
    """An error answered as OpenAI's error JSON with HTTP `status`."""

    def __init__(
        self,
        status: int,
        message: str,
        error_type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def engine_failed(error: EngineDeadError) -> APIError:
    return APIError(500, str(error), error_type="server_error", code="engine_dead")


def _validation_message(error: RequestValidationError) -> tuple[str, str | None]:
    """The first field pydantic refused, as `field: what is wrong`; a union's alternatives are joined."""
    problems = error.errors()
    if not problems:
        return "invalid request", None
    if problems[0].get("type") == "json_invalid":
        return "the request body is not valid JSON", None

    def field_of(problem: dict[str, Any]) -> str:
        location = [str(part) for part in problem.get("loc", ()) if part != "body"]
        return location[0] if location else "body"

    param = field_of(problems[0])
    same_field = [problem for problem in problems if field_of(problem) == param]
    reasons = list(dict.fromkeys(problem.get("msg", "invalid value") for problem in same_field))
    given = repr(same_field[0].get("input"))
    given = given if len(given) <= 60 else given[:57] + "..."
    shown = "" if problems[0].get("type") == "missing" else f" (got {given})"
    others = len({field_of(problem) for problem in problems}) - 1
    more = f"; {others} more field(s) invalid" if others else ""
    return f"{param}: {' or '.join(reasons)}{shown}{more}", None if param == "body" else param


def install_error_handlers(app: FastAPI) -> None:
    """Every error the app raises leaves as OpenAI's error JSON."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, error: APIError) -> JSONResponse:
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(error)
        return bad_request(message, param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, error: StarletteHTTPException) -> JSONResponse:
        error_type = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return APIError(error.status_code, str(error.detail), error_type).response()

    @app.exception_handler(EngineDeadError)
    async def _dead(_: Request, error: EngineDeadError) -> JSONResponse:
        return engine_failed(error).response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, error: Exception) -> JSONResponse:
        # Still OpenAI's JSON, so a client reports the cause instead of failing to parse the body.
        message = f"internal error: {type(error).__name__}: {error}"
        return APIError(500, message, "server_error").response()
