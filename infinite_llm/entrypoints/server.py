"""The OpenAI-compatible HTTP server: a FastAPI app over an `AsyncLLMEngine`, run by uvicorn.

    infinite-llm serve [--model PATH] [--port 8000] [--api-key KEY] [--max-waiting N] ...

Every error leaves in OpenAI's body, `{"error": {"message", "type", "param", "code"}}`,
including FastAPI's own validation errors (400, not 422: OpenAI clients expect 400) and the
framework's 404/405. The API key and the body limit are plain ASGI middleware, so they answer
before any body is parsed and never wrap a streaming response. `/health` and `/metrics` stay open
without the key, for probes and scrapers (as vLLM does).
"""

from __future__ import annotations

import asyncio
import copy
import hmac
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from infinite_llm.config import ConfigError, EngineConfig
from infinite_llm.engine.async_engine import AsyncLLMEngine
from infinite_llm.engine.metrics import CONTENT_TYPE, EngineMetrics
from infinite_llm.entrypoints.protocol import APIError, ChatCompletionRequest, CompletionRequest
from infinite_llm.entrypoints.serving import OpenAIServing
from infinite_llm.models.loader import DEFAULT_MODEL_FILE
from infinite_llm.version import __version__

logger = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 8 * 2**20
_CODES = {401: "invalid_api_key", 404: "not_found", 405: "method_not_allowed",
          413: "request_too_large"}


@dataclass(frozen=True, slots=True)
class ServerConfig:
    engine: EngineConfig = field(default_factory=EngineConfig)
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_waiting: int | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    served_model_name: str | None = None
    log_level: str = "info"

    def __post_init__(self) -> None:
        """Checked before the model loads: a bad flag fails at once with one line, rather than
        after loading with a traceback (port) or as a server that refuses every request."""
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in [0, 65535], got {self.port}")
        if self.max_waiting is not None and self.max_waiting < 1:
            raise ConfigError(f"max_waiting must be >= 1 (unset: no limit), got {self.max_waiting}")
        if self.max_body_bytes < 1:
            raise ConfigError(f"max_body_bytes must be >= 1, got {self.max_body_bytes}")

    @property
    def model_name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        if self.engine.load.model is None:
            return DEFAULT_MODEL_FILE.split(".")[0]  # SmolLM2-135M-Instruct
        path = Path(self.engine.load.model)
        return path.stem if path.suffix == ".gguf" else path.name


def build_app(
    engine: AsyncLLMEngine,
    tokenizer: Any,
    model_name: str,
    api_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> FastAPI:
    """The app; the engine thread starts with the app (lifespan) and stops with it."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        await asyncio.to_thread(engine.shutdown)

    app = FastAPI(title="infinite-llm", version=__version__, lifespan=lifespan)
    serving = OpenAIServing(engine, tokenizer, model_name)
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)
    if api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)
    _add_error_handlers(app)
    app.openapi = lambda: _openapi(app, model_name)  # type: ignore[method-assign]

    @app.get("/health")
    async def health() -> Response:
        if not engine.is_alive:
            return _error(APIError(503, f"the engine is not running: {engine.error}"))
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(engine.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    created = int(time.time())

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {"id": model_name, "object": "model", "created": created, "owned_by": "infinite-llm",
                "max_model_len": engine.max_model_len,
                "vocab_size": engine.model_config.vocab_size}
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await serving.completion(body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await serving.chat(body, request)

    return app


def run_server(config: ServerConfig) -> None:
    """Load the engine (before listening, so /health answers only once it can serve), then
    serve until interrupted."""
    import uvicorn

    from infinite_llm.engine.engine import LLMEngine

    engine = LLMEngine(config.engine)
    async_engine = AsyncLLMEngine(engine, EngineMetrics(), config.max_waiting)
    app = build_app(async_engine, copy.deepcopy(engine.tokenizer), config.model_name,
                    config.api_key, config.max_body_bytes)
    logger.info("serving %s on http://%s:%d", config.model_name, config.host, config.port)
    uvicorn.run(app, host=config.host, port=config.port, log_level=config.log_level,
                timeout_graceful_shutdown=5)


def _openapi(app: FastAPI, model_name: str) -> dict[str, Any]:
    """The generated schema, with `model` narrowed to the one name served (a request naming
    another model is a 404, so the schema says so)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        for name in ("CompletionRequest", "ChatCompletionRequest"):
            schema["components"]["schemas"][name]["properties"]["model"] = {
                "anyOf": [{"type": "string", "enum": [model_name]}, {"type": "null"}],
                "title": "Model",
            }
        app.openapi_schema = schema
    return app.openapi_schema


# ---- errors ------------------------------------------------------------------------------


def _error(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), error.status, headers=error.headers)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> Response:
        return _error(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        messages, params = [], []
        for err in exc.errors()[:5]:
            if err.get("type") == "json_invalid":
                message = f"the body is not valid JSON: {err.get('ctx', {}).get('error', '')}"
                return _error(APIError(400, message))
            loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
            params.append(loc or None)
            messages.append(f"{loc}: {err.get('msg', 'invalid')}" if loc else err.get("msg"))
        message = "; ".join(str(m) for m in messages) or "invalid request"
        return _error(APIError(400, message, params[0] if params else None))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        return _error(APIError(exc.status_code, str(exc.detail), code=_CODES.get(exc.status_code),
                               headers=dict(exc.headers or {})))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> Response:
        logger.exception("unhandled error on %s", request.url.path)
        return _error(APIError(500, f"internal error: {exc!r}"))


# ---- middleware --------------------------------------------------------------------------


class ApiKeyMiddleware:
    """`Authorization: Bearer <key>` on /v1 routes; compared in constant time."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                error = APIError(401, "a valid API key is required (Authorization: Bearer KEY)",
                                 code="invalid_api_key")
                await _error(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """413 for a body over `max_bytes`: at once when Content-Length says so, else as soon as
    the received bytes pass the limit (chunked uploads), before anything is parsed."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    def _too_large(self) -> APIError:
        return APIError(413, f"the request body is larger than {self.max_bytes} bytes",
                        code="request_too_large")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            await _error(self._too_large())(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:  # FastAPI re-raises HTTPException as is
                    raise HTTPException(413, self._too_large().message)
            return message

        await self.app(scope, limited_receive, send)
