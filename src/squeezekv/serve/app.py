"""OpenAI-compatible HTTP API over an :class:`~squeezekv.serve.engine.Engine` (FastAPI).

``POST /v1/chat/completions`` and ``POST /v1/completions`` (streaming as server-sent events, or not), ``GET
/v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text). Every client error is a 4xx with OpenAI's error body
``{"error": {"message", "type", "param", "code"}}``; the server stays up.
"""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Literal, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import Engine, GenRequest, QueueFull

#: largest request body accepted (bytes)
MAX_BODY = 4 << 20


class APIError(Exception):
    """An error answered in OpenAI's format."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_


def _error(status: int, message: str, param: str | None = None, code: str | None = None,
           type_: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(status_code=status,
                        content={"error": {"message": message, "type": type_, "param": param, "code": code}})


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[ContentPart], None] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        bad = [p.type for p in self.content if p.type != "text"]
        if bad:
            raise APIError(400, f"content part type {bad[0]!r} is not supported: only 'text'", "messages")
        return "".join(p.text or "" for p in self.content)


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=1)
    stream: bool = False
    stop: Union[str, list[str], None] = None
    seed: int | None = None
    user: str | None = None


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(_Sampling):
    prompt: Union[str, list[int]]
    max_tokens: int | None = Field(default=16, ge=1)


def create_app(engine: Engine) -> FastAPI:
    """The FastAPI application serving ``engine`` (started and stopped with the app)."""
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        engine.shutdown()  # when uvicorn stops: finish pending saves, stop the engine thread

    app = FastAPI(title="squeezekv serve", version="0.1.0", lifespan=lifespan)
    name = engine.config.model_name
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        engine.metrics.inc("request_errors_total")
        return _error(exc.status, exc.message, exc.param, exc.code, exc.type)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        engine.metrics.inc("request_errors_total")
        errs = exc.errors()
        first = errs[0] if errs else {}
        if first.get("type") == "json_invalid":
            return _error(400, f"request body is not valid JSON: {first.get('msg', '')}", None, "invalid_json")
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        got = repr(first.get("input"))
        got = got if len(got) <= 200 else got[:200] + "..."
        return _error(400, f"invalid parameter {param}: {first.get('msg', 'invalid')} (got {got})", param,
                      "invalid_parameter")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), None, None,
                      "invalid_request_error" if exc.status_code < 500 else "server_error")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:  # pragma: no cover - defensive
        return _error(500, f"internal error: {type(exc).__name__}: {exc}", None, None, "server_error")

    @app.middleware("http")
    async def _limit_body(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY:
            engine.metrics.inc("request_errors_total")
            return _error(413, f"request body of {length} bytes is larger than {MAX_BODY}", None, "body_too_large")
        return await call_next(request)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "queue": engine.queue_length, "active": len(engine.active)}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        body = engine.metrics.render(engine.store.usage(), dict(engine.store.stats), engine.queue_length,
                                     len(engine.active))
        return PlainTextResponse(body, media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created,
                                            "owned_by": "squeezekv"}]}

    def _check(body: _Sampling, prompt: list[int]) -> tuple[int, list[str]]:
        if body.model != name:
            raise APIError(404, f"The model {body.model!r} does not exist; this server serves {name!r}", "model",
                           "model_not_found")
        requested = body.max_completion_tokens or body.max_tokens
        # not given: as many as the context leaves, up to the server's limit (OpenAI's default)
        max_tokens = requested or max(1, min(engine.config.max_new_tokens, engine.context - len(prompt)))
        if max_tokens > engine.config.max_new_tokens:
            raise APIError(400, f"max_tokens={max_tokens} is larger than this server's limit of "
                                f"{engine.config.max_new_tokens}", "max_tokens", "invalid_parameter")
        if max_tokens >= engine.context:
            raise APIError(400, f"max_tokens={max_tokens} leaves no room in the context of {engine.context}",
                           "max_tokens", "context_length_exceeded")
        if not prompt:
            raise APIError(400, "the prompt is empty", "messages", "invalid_parameter")
        limit = engine.max_prompt_tokens(max_tokens)
        if len(prompt) > limit and engine.config.truncation == "error":
            raise APIError(400, f"This model's maximum context length is {engine.context} tokens; the prompt has "
                                f"{len(prompt)} tokens and max_tokens is {max_tokens}", "messages",
                           "context_length_exceeded")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > 4 or any(not s for s in stop):
            raise APIError(400, f"stop={body.stop!r}: give up to 4 non-empty strings", "stop", "invalid_parameter")
        return max_tokens, stop

    async def _run(body: _Sampling, prompt: list[int], kind: str) -> Any:
        max_tokens, stop = _check(body, prompt)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        req = GenRequest(prompt=prompt, max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                         seed=body.seed, stop=stop, user=body.user,
                         emit=lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        try:
            await asyncio.to_thread(engine.submit, req)  # prefetch may read the disk: not on the event loop
        except QueueFull as err:
            raise APIError(429, f"server busy: {err}", None, "rate_limit_exceeded", "rate_limit_error") from None
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + req.id
        if body.stream:
            return StreamingResponse(_sse(req, events, rid, kind), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        parts: list[str] = []
        while True:
            ev = await events.get()
            if ev["type"] == "delta":
                parts.append(ev["text"])
            elif ev["type"] == "error":
                raise APIError(500, ev["message"], None, None, "server_error")
            else:
                break
        text, usage = "".join(parts), _usage(ev["usage"])
        if kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "finish_reason": ev["finish_reason"], "logprobs": None}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "finish_reason": ev["finish_reason"], "logprobs": None}
            obj = "text_completion"
        return {"id": rid, "object": obj, "created": int(time.time()), "model": name, "choices": [choice],
                "usage": usage}

    def _usage(u: dict[str, int]) -> dict[str, Any]:
        return {"prompt_tokens": u["prompt_tokens"], "completion_tokens": u["completion_tokens"],
                "total_tokens": u["total_tokens"], "prompt_tokens_details": {"cached_tokens": u["cached_tokens"]}}

    async def _sse(req: GenRequest, events: "asyncio.Queue[dict[str, Any]]", rid: str,
                   kind: str) -> AsyncIterator[str]:
        created_at = int(time.time())
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        def chunk(delta: dict[str, Any] | str, finish: str | None, usage: dict[str, Any] | None = None) -> str:
            choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
            if kind == "chat":
                choice["delta"] = delta
            else:
                choice["text"] = delta
            out = {"id": rid, "object": obj, "created": created_at, "model": name, "choices": [choice]}
            if usage is not None:
                out["usage"] = usage
            return f"data: {json.dumps(out)}\n\n"

        try:
            if kind == "chat":
                yield chunk({"role": "assistant", "content": ""}, None)
            while True:
                ev = await events.get()
                if ev["type"] == "delta":
                    yield chunk({"content": ev["text"]} if kind == "chat" else ev["text"], None)
                elif ev["type"] == "error":
                    err = {"error": {"message": ev["message"], "type": "server_error", "param": None, "code": None}}
                    yield f"data: {json.dumps(err)}\n\n"
                    break
                else:
                    yield chunk({} if kind == "chat" else "", ev["finish_reason"], _usage(ev["usage"]))
                    break
            yield "data: [DONE]\n\n"
        finally:
            req.cancelled.set()  # a client that went away stops its generation (no effect once finished)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest) -> Any:
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            prompt = engine.chat_prompt(messages)
        except (ValueError, TypeError) as err:
            raise APIError(400, f"cannot apply the chat template: {err}", "messages", "invalid_parameter") from None
        return await _run(body, prompt, "chat")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> Any:
        if isinstance(body.prompt, str):
            prompt = engine.encode(body.prompt)
        else:
            vocab = int(engine.model.config.vocab_size)
            bad = [t for t in body.prompt if not 0 <= t < vocab]
            if bad:
                raise APIError(400, f"prompt token {bad[0]} is out of range: 0..{vocab - 1}", "prompt",
                               "invalid_parameter")
            prompt = list(body.prompt)
        return await _run(body, prompt, "completion")

    return app


__all__ = ["create_app", "APIError", "MAX_BODY"]
