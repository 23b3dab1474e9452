"""Errors in OpenAI's body ``{"error": {"message", "type", "param", "code"}}``: the
exception the routes raise (APIError), how any exception maps to a status, and the app's
exception handlers."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import ParallaxError, WorkerError
from . import protocol as P
from .health import EngineMonitor

logger = logging.getLogger(__name__)


class APIError(Exception):
    """An error answered with OpenAI's body."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (status, message, type_,
                                                                       param, code)
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse(P.error_body(self.message, self.type, self.param, self.code),
                            status_code=self.status, headers=self.headers)


def error_for(e: Exception, monitor: EngineMonitor | None = None) -> tuple[int, APIError]:
    """The status and error body for an exception: 400 for a request parallax refuses
    (ParallaxError), 503 when the engine failed (``monitor`` is told, so /health turns 503),
    500 otherwise."""
    if isinstance(e, APIError):
        return e.status, e
    if isinstance(e, WorkerError):      # EngineDeadError included
        if monitor is not None:
            monitor.mark_dead(str(e))
        return 503, APIError(503, f"the engine failed: {e}", "service_unavailable",
                             code="engine_failed")
    if isinstance(e, ParallaxError):
        return 400, APIError(400, str(e))
    return 500, APIError(500, f"internal error: {type(e).__name__}: {e}", "internal_error")


def install_error_handlers(app: FastAPI, monitor: EngineMonitor) -> None:
    """Every error, whatever raised it, leaves in OpenAI's body."""
    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError):
        return e.response()

    @app.exception_handler(P.UnsupportedField)
    async def unsupported(_: Request, e: P.UnsupportedField):
        return APIError(400, str(e), param=e.field, code="unsupported_parameter").response()

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError):
        errors = e.errors()
        parts, param = [], None
        for err in errors:
            loc = [str(x) for x in err.get("loc", ()) if x != "body"]
            param = param or (".".join(loc) or None)
            parts.append(f"{'.'.join(loc) or 'body'}: {err.get('msg')}")
        return APIError(400, "; ".join(parts) or "invalid request", param=param,
                        code="invalid_value").response()

    @app.exception_handler(ParallaxError)
    async def parallax_error(_: Request, e: ParallaxError):
        return error_for(e, monitor)[1].response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException):
        type_ = "invalid_request_error" if e.status_code < 500 else "internal_error"
        return JSONResponse(P.error_body(str(e.detail), type_, code=e.status_code),
                            status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def internal(_: Request, e: Exception):
        logger.exception("unhandled error")
        return error_for(e)[1].response()
