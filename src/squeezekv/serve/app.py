"""OpenAI-compatible HTTP API over an :class:`~squeezekv.serve.engine.Engine` (FastAPI).

``POST /v1/chat/completions`` and ``POST /v1/completions`` (streaming as server-sent events, or not), ``GET
/v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text). Every client error is a 4xx with OpenAI's error body
``{"error": {"message", "type", "param", "code"}}``; the server stays up.

Hardening: the body limit counts the bytes actually read (chunked bodies too); prompts are bounded by their length
before they are tokenised, and tokenised off the event loop; with ``api_keys`` every endpoint but ``/health`` needs
``Authorization: Bearer <key>``; ``cache_scope="user"`` (default) keeps each API key's (or, without keys, each
``user``'s) cached KV apart, ``"global"`` shares prefixes between everyone; a client that goes away cancels its
generation, streaming or not.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Awaitable, Callable, Literal, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import Engine, GenRequest, QueueFull

#: largest request body accepted (bytes)
MAX_BODY = 4 << 20
#: how often a waiting non-streaming request checks whether its client is still connected (seconds)
DISCONNECT_POLL_S = 0.2
#: cache scopes: "user" keeps every API key's (or user's) KV apart, "global" shares prefixes between all clients
CACHE_SCOPES = ("user", "global")


class APIError(Exception):
    """An error answered in OpenAI's format."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_
        self.headers = headers


def _error(status: int, message: str, param: str | None = None, code: str | None = None,
           type_: str = "invalid_request_error", headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, headers=headers,
                        content={"error": {"message": message, "type": type_, "param": param, "code": code}})


def _error_body(status: int, message: str, code: str, type_: str = "invalid_request_error") -> tuple[int, bytes]:
    return status, json.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}}).encode()


def key_id(key: str) -> str:
    """The identity of an API key in namespaces, queues and logs (a hash prefix: the key itself is never kept)."""
    return "key:" + hashlib.sha256(key.encode()).hexdigest()[:16]


class _Guard:
    """ASGI middleware: API-key check (all paths but ``/health``), then the body limit on the bytes actually read
    (a chunked body has no Content-Length to trust); the body is buffered and replayed to the app, after which the
    app's ``receive`` is the server's (so disconnects are still seen)."""

    def __init__(self, app: Any, engine: Engine, api_keys: Sequence[str]):
        self.app, self.engine = app, engine
        self.keys = [k.encode() for k in api_keys]

    async def _send_error(self, send: Callable[[dict], Awaitable[None]], status: int, body: bytes,
                          headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
        self.engine.metrics.inc("request_errors_total")
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                *headers]})
        await send({"type": "http.response.body", "body": body})

    def _authorised(self, scope: dict) -> bool:
        if not self.keys:
            return True
        auth = dict(scope.get("headers") or ()).get(b"authorization", b"")
        scheme, _, given = auth.partition(b" ")
        if scheme.lower() != b"bearer" or not given:
            return False
        ok = False
        for k in self.keys:  # constant time per key, and every key is tried
            ok |= hmac.compare_digest(k, given.strip())
        if ok:
            scope.setdefault("state", {})["key_id"] = key_id(given.strip().decode("utf-8", "replace"))
        return ok

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]],
                       send: Callable[[dict], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope["path"] != "/health" and not self._authorised(scope):
            status, body = _error_body(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                                       "invalid_api_key", "authentication_error")
            return await self._send_error(send, status, body, [(b"www-authenticate", b"Bearer")])
        length = dict(scope.get("headers") or ()).get(b"content-length", b"")
        if length.isdigit() and int(length) > MAX_BODY:
            status, body = _error_body(413, f"request body of {int(length)} bytes is larger than {MAX_BODY}",
                                       "body_too_large")
            return await self._send_error(send, status, body, [(b"connection", b"close")])
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > MAX_BODY:
                status, body = _error_body(413, f"request body is larger than {MAX_BODY} bytes", "body_too_large")
                return await self._send_error(send, status, body, [(b"connection", b"close")])
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class _ClientGone(Exception):
    """The client of a waiting request disconnected."""


def _no_surrogates(text: str, param: str) -> None:
    """Lone surrogates (``"\\ud800"`` in JSON) are not text: a tokenizer cannot encode them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise APIError(400, f"{param} is not valid Unicode: {err.reason} at position {err.start}", param,
                       "invalid_parameter") from None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

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
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(1 << 63), le=(1 << 64) - 1)
    user: str | None = None
    # accepted by OpenAI, not implemented here: rejected with 400 unless left at their defaults
    logprobs: bool | int | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None
    logit_bias: dict[str, Any] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None

    def unsupported(self) -> str | None:
        """The first parameter set to something this server does not implement, or None."""
        checks = {"logprobs": self.logprobs not in (None, False, 0), "top_logprobs": self.top_logprobs is not None,
                  "tools": bool(self.tools), "tool_choice": self.tool_choice not in (None, "none"),
                  "functions": bool(self.functions), "function_call": self.function_call not in (None, "none"),
                  "response_format": (self.response_format or {"type": "text"}).get("type") != "text",
                  "logit_bias": bool(self.logit_bias), "presence_penalty": bool(self.presence_penalty),
                  "frequency_penalty": bool(self.frequency_penalty), "echo": bool(self.echo),
                  "suffix": bool(self.suffix), "best_of": self.best_of not in (None, 1)}
        return next((name for name, bad in checks.items() if bad), None)


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(_Sampling):
    prompt: str | list[int]
    max_tokens: int | None = Field(default=16, ge=1)


def create_app(engine: Engine, *, api_keys: Sequence[str] = (), cache_scope: str = "user") -> FastAPI:
    """The FastAPI application serving ``engine`` (started and stopped with the app).

    ``api_keys``: if any, every endpoint but ``/health`` needs one of them as a bearer token; queues (fairness) and
    cache scopes then follow the key, not the client's ``user`` field. ``cache_scope``: ``"user"`` keeps the KV of
    each key (without keys: of each ``user`` field; requests without either share one anonymous scope) apart;
    ``"global"`` lets every client reuse every other client's prefixes (and see, through ``cached_tokens`` and
    latency, which prefixes others sent)."""
    if cache_scope not in CACHE_SCOPES:
        raise ValueError(f"cache_scope={cache_scope!r} is not supported: one of {CACHE_SCOPES}")
    api_keys = list(api_keys)
    if any(not isinstance(k, str) or not k.strip() or k != k.strip() for k in api_keys):
        raise ValueError("API keys must be non-empty strings without surrounding whitespace")

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
        return _error(exc.status, exc.message, exc.param, exc.code, exc.type, exc.headers)

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

    app.add_middleware(_Guard, engine=engine, api_keys=api_keys)

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

    def _precheck(body: _Sampling) -> None:
        """What can be checked before the prompt is tokenised."""
        if body.model != name:
            raise APIError(404, f"The model {body.model!r} does not exist; this server serves {name!r}", "model",
                           "model_not_found")
        bad = body.unsupported()
        if bad is not None:
            raise APIError(400, f"{bad}={getattr(body, bad)!r} is not supported by this server", bad,
                           "unsupported_parameter")
        for s in [body.stop] if isinstance(body.stop, str) else list(body.stop or []):
            _no_surrogates(s, "stop")

    def _bound(chars: int, param: str) -> None:
        """Reject, before tokenising, a text too long to fit the context whatever its tokens (each token decodes to
        at most ``engine.max_token_chars`` characters)."""
        per = engine.max_token_chars
        if engine.config.truncation == "error" and per is not None and chars > engine.context * per:
            raise APIError(400, f"This model's maximum context length is {engine.context} tokens; the prompt has "
                                f"{chars} characters, more than {engine.context} tokens of at most {per} characters "
                                f"can hold", param, "context_length_exceeded")

    def _identity(request: Request, body: _Sampling) -> tuple[str | None, str | None]:
        """(fairness queue, cache scope) of a request."""
        key = getattr(request.state, "key_id", None)
        queue = key if key is not None else body.user
        if cache_scope == "global":
            return queue, None
        if key is not None:
            return queue, key + ("/user:" + body.user if body.user else "")
        return queue, None if body.user is None else "user:" + body.user

    def _check(body: _Sampling, prompt: list[int]) -> tuple[int, list[str]]:
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

    async def _next(request: Request, req: GenRequest, events: "asyncio.Queue[dict[str, Any]]") -> dict[str, Any]:
        """The next engine event; cancels the generation (and raises _ClientGone) once the client is gone (checked
        at least every DISCONNECT_POLL_S, however fast the events come)."""
        while True:
            now = time.monotonic()
            if now - req.checked_at >= DISCONNECT_POLL_S:
                req.checked_at = now
                if await request.is_disconnected():
                    req.cancelled.set()
                    raise _ClientGone
            try:
                return await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                continue

    def _raise_event_error(ev: dict[str, Any]) -> None:
        status = int(ev.get("status") or 500)
        raise APIError(status, ev["message"], ev.get("param"), ev.get("code"),
                       "invalid_request_error" if status < 500 else "server_error")

    async def _run(request: Request, body: _Sampling, prompt: list[int], kind: str) -> Any:
        max_tokens, stop = _check(body, prompt)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        queue, scope = _identity(request, body)
        req = GenRequest(prompt=prompt, max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                         seed=body.seed, stop=stop, user=queue, scope=scope,
                         emit=lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        try:
            await asyncio.to_thread(engine.submit, req)  # prefetch may read the disk: not on the event loop
        except QueueFull as err:
            raise APIError(429, f"server busy: {err}", None, "rate_limit_exceeded", "rate_limit_error",
                           {"Retry-After": "1"}) from None
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + req.id
        try:
            return await _answer(request, body, req, events, rid, kind)
        except _ClientGone:
            return _error(499, "client closed the request", None, "client_closed_request")  # nobody reads it
        except asyncio.CancelledError:  # the shutdown deadline passed (uvicorn cancels the handlers): answer 503
            req.cancelled.set()
            return _error(503, "the server is shutting down", None, "server_shutting_down", "server_error")
        except BaseException:  # an error: stop the generation
            req.cancelled.set()
            raise

    async def _answer(request: Request, body: _Sampling, req: GenRequest, events: "asyncio.Queue[dict[str, Any]]",
                      rid: str, kind: str) -> Any:
        # the first event decides the status: a request the engine rejects is a 4xx even when streaming
        first = await _next(request, req, events)
        if first["type"] == "error":
            _raise_event_error(first)
        if body.stream:  # from here on, the stream's own finally cancels on disconnect
            return StreamingResponse(_sse(req, events, rid, kind, first), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        parts: list[str] = []
        ev = first
        while True:
            if ev["type"] == "delta":
                parts.append(ev["text"])
            elif ev["type"] == "error":
                _raise_event_error(ev)
            else:
                break
            ev = await _next(request, req, events)
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

    async def _sse(req: GenRequest, events: "asyncio.Queue[dict[str, Any]]", rid: str, kind: str,
                   first: dict[str, Any]) -> AsyncIterator[str]:
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
            ev: dict[str, Any] | None = first
            while True:
                if ev is None:
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
                ev = None
            yield "data: [DONE]\n\n"
        finally:
            req.cancelled.set()  # a client that went away stops its generation (no effect once finished)

    @app.post("/v1/chat/completions")
    async def chat(request: Request, body: ChatRequest) -> Any:
        _precheck(body)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        for i, m in enumerate(messages):
            _no_surrogates(m["content"], f"messages.{i}.content")
        _bound(sum(len(m["content"]) for m in messages), "messages")
        try:
            prompt = await asyncio.to_thread(engine.chat_prompt, messages)  # not on the event loop
        except (ValueError, TypeError) as err:
            raise APIError(400, f"cannot apply the chat template: {err}", "messages", "invalid_parameter") from None
        return await _run(request, body, prompt, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest) -> Any:
        _precheck(body)
        if isinstance(body.prompt, str):
            _no_surrogates(body.prompt, "prompt")
            _bound(len(body.prompt), "prompt")
            prompt = await asyncio.to_thread(engine.encode, body.prompt)  # not on the event loop
        else:
            vocab = int(engine.model.config.vocab_size)
            bad = [t for t in body.prompt if not 0 <= t < vocab]
            if bad:
                raise APIError(400, f"prompt token {bad[0]} is out of range: 0..{vocab - 1}", "prompt",
                               "invalid_parameter")
            prompt = list(body.prompt)
        return await _run(request, body, prompt, "completion")

    return app


__all__ = ["create_app", "APIError", "MAX_BODY", "CACHE_SCOPES", "key_id"]
