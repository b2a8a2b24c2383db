"""OpenAI-style errors: every refused request gets a 4xx status and the body
{"error": {"message", "type", "param", "code"}}, as the OpenAI API answers (its clients raise
openai.BadRequestError and friends from it); the server stays up."""
from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

TYPES = {400: "invalid_request_error", 404: "not_found_error", 405: "invalid_request_error",
         409: "conflict_error", 429: "rate_limit_error", 500: "server_error"}
FIELDS = {"/v1/completions": "the fields are those of OpenAI's /v1/completions (model, prompt, max_tokens, "
                             "temperature, top_p, stop, seed, stream, logprobs, n, user) and retrieval",
          "/v1/documents": 'the body is {"documents": [...]}, each document a string or {"text", "source"}'}


class ApiError(Exception):
    """A request refused with `status`; message: one line naming the field, its value and what was expected."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": code}}


def error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse(error_body(exc.status, exc.message, exc.param, exc.code), status_code=exc.status)


def validation_error(exc: RequestValidationError, route: str = "/v1/completions") -> ApiError:
    """FastAPI's validation error (malformed JSON, an unknown or mistyped field, a value out of
    range) in a request to `route` as one ApiError (400) about its first problem."""
    first = exc.errors()[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    kind = first.get("type", "")
    if kind == "json_invalid":
        reason = first.get("ctx", {}).get("error", first.get("msg"))
        at = f" at character {loc[-1]}" if loc else ""
        return ApiError(400, f"the request body is not valid JSON: {reason}{at}", code="json_invalid")
    param = loc[0] if loc else None
    if kind == "extra_forbidden":
        name = loc[-1] if loc else param
        return ApiError(400, f"unknown field {name!r}: {FIELDS.get(route, 'not a field of this body')}", param=param,
                        code="unknown_field")
    where = ".".join(loc) or "the body"
    return ApiError(400, f"{where}: {first.get('msg')}, got {first.get('input')!r}", param=param, code=kind or None)


def install_error_handlers(app: FastAPI) -> None:
    """Every error the app raises answers with an OpenAI-style body."""

    @app.exception_handler(ApiError)
    async def _api(request: Request, exc: ApiError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return error_response(validation_error(exc, request.url.path))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException):
        return error_response(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}"))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):
        return error_response(ApiError(500, f"internal error (a bug in retro serve; the server stays up): {exc!r}"))
