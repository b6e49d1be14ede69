"""The OpenAI-compatible HTTP app (FastAPI) on a model's engine.

Routes: ``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /v1/completions``, ``POST /v1/chat/completions``,
``POST /tokenize``, ``POST /detokenize``, ``GET /health`` (503 while the model loads), ``GET /metrics``
(Prometheus), ``GET /`` (the chat page). Every error is OpenAI's ``{"error": {...}}`` with a 4xx status (FastAPI's
422 becomes 400), but for the engine's own failures (the model could not run: 500 ``server_error``); a failure after a stream started is sent as an SSE ``data: {"error": ...}`` event. Requests run
as engine requests; the HTTP side only waits on their events (``asyncio`` queue fed by the engine thread), and a
client that goes away cancels its request.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response
from sse_starlette.sse import AppStatus, EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine import Event
from . import metrics as prom
from .convert import Plan, chat_plan, completion_plan
from .format import Choices, new_id, now
from .protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, ServeError, TokenizeRequest,
                       error_body)

log = logging.getLogger("prosa.serve")
STATIC = Path(__file__).parent / "static"
PUBLIC = ("/health", "/metrics", "/", "/favicon.ico")


@dataclass
class ServerState:
    """What the app serves. ``lm`` is None while the model loads (``/health`` says 503).

    Attributes:
        model_id: the id clients use (``/v1/models``); requests naming another model get a 404.
        api_key: required as ``Authorization: Bearer <key>`` on every route but PUBLIC; None: open.
        max_body: request bodies over this many bytes get a 413.
        max_waiting: with this many requests already waiting in the engine, new ones get a 429 + Retry-After.
    """

    model_id: str
    lm: Any = None
    api_key: str | None = None
    max_body: int = 4 << 20
    max_waiting: int = 256
    cors_origins: list[str] = field(default_factory=list)
    load_error: str | None = None


def create_app(state: ServerState) -> FastAPI:
    """The FastAPI app serving ``state``."""
    # On SIGTERM, running streams finish (within uvicorn's timeout_graceful_shutdown) instead of being cut, which
    # is what sse-starlette would otherwise do.
    AppStatus.disable_automatic_graceful_drain()
    app = FastAPI(title="prosa", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.prosa = state
    reg = prom.registry(lambda: state.lm.engine.metrics.snapshot() if state.lm is not None else None)
    if state.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=state.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(_Guard, state=state)
    _handlers(app)

    @app.get("/health")
    async def health():
        if state.lm is None:
            status = {"status": "error", "error": state.load_error} if state.load_error else {"status": "loading"}
            return JSONResponse(status, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(prom.render(reg), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(state)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != state.model_id:
            raise ServeError(404, f"the model {model_id!r} does not exist; this server serves {state.model_id!r}",
                             param="model", code="model_not_found")
        return _model_card(state)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        lm = _ready(state, body.model)
        plan = completion_plan(lm, body)
        return await _respond(state, lm, plan, body.stream, body.stream_options, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        lm = _ready(state, body.model)
        plan = await asyncio.to_thread(chat_plan, lm, body)     # a grammar may take a moment to compile
        return await _respond(state, lm, plan, body.stream, body.stream_options, request, chat=True)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        lm = _ready(state, body.model)
        if body.messages is not None:
            from ..chat import conversation_prompt

            try:
                ids, _ = conversation_prompt(lm, [{"role": "system" if m.role == "developer" else m.role,
                                                   "content": m.text()} for m in body.messages])
            except ValueError as e:
                raise ServeError(400, str(e), param="messages") from None
        else:
            ids = lm.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": lm.context_length}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        lm = _ready(state, body.model)
        bad = next((t for t in body.tokens if not 0 <= t < lm.vocab_size), None)
        if bad is not None:
            raise ServeError(400, f"token id {bad} is outside the vocabulary (0..{lm.vocab_size - 1})",
                             param="tokens")
        return {"prompt": lm.tokenizer.decode(body.tokens)}

    return app


def _model_card(state: ServerState) -> dict[str, Any]:
    card = {"id": state.model_id, "object": "model", "created": 0, "owned_by": "prosa"}
    if state.lm is not None:
        card["max_model_len"] = state.lm.context_length
    return card


def _ready(state: ServerState, model: str | None):
    """The model, once loaded and if ``model`` names it (None: any)."""
    if state.lm is None:
        raise ServeError(503, "the model is still loading; retry in a moment", kind="server_error",
                         code="model_loading", headers={"Retry-After": "5"})
    if model is not None and model != state.model_id:
        raise ServeError(404, f"the model {model!r} does not exist; this server serves {state.model_id!r}",
                         param="model", code="model_not_found")
    waiting = state.lm.engine.metrics.snapshot()["waiting"]
    if waiting >= state.max_waiting:
        raise ServeError(429, f"the server is busy ({waiting} requests waiting); retry shortly",
                         kind="rate_limit_error", code="server_busy", headers={"Retry-After": "2"})
    return state.lm


# ---------------------------------------------------------------------------------------------- running a request
class _Bridge:
    """The engine's events of one HTTP request on the event loop (the engine thread calls ``put``)."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()

    def put(self, ev: Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, ev)
        except RuntimeError:            # the loop has closed (server shutting down): nobody is listening
            pass


async def _events(lm, plan: Plan, request: Request | None) -> AsyncIterator[Event]:
    """Submit the plan's requests and yield their events; the requests are cancelled when this stops early
    (client gone, error). With ``request``, the client's connection is checked while waiting."""
    bridge = _Bridge()
    left = sum(r.n for r in plan.requests)
    handles = []
    try:
        for tag, r in enumerate(plan.requests):
            try:
                handles.append(lm.engine.submit(r, tag=tag, events=bridge))
            except ValueError as e:
                raise ServeError(400, str(e), param="max_tokens") from None
        while left:
            if request is None:
                ev = await bridge.queue.get()
            else:
                try:
                    ev = await asyncio.wait_for(bridge.queue.get(), 0.2)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
            left -= ev.finish_reason is not None
            yield ev
    finally:
        if left:
            for h in handles:
                h.cancel()


async def _respond(state: ServerState, lm, plan: Plan, stream: bool, options, request: Request, chat: bool):
    rid, created = new_id("chatcmpl" if chat else "cmpl"), now()
    choices = Choices(lm, plan)
    if not stream:
        async for ev in _events(lm, plan, request):
            choices.add(ev)
        failed = next((c for c in choices.choices if c.finish_reason == "error"), None)
        if failed is not None:
            raise _generation_failed(failed.error, failed.internal)
        return JSONResponse(choices.chat(state.model_id, rid, created) if chat
                            else choices.completion(state.model_id, rid, created))
    usage = bool(options and options.include_usage)
    gen = _chat_chunks if chat else _completion_chunks
    return EventSourceResponse(_sse(gen(state, lm, plan, choices, rid, created, usage)), sep="\n", ping=15)


def _generation_failed(error: str | None, internal: bool) -> ServeError:
    """A request the engine ended with an error: a 500 ``server_error`` when the model could not run (the engine's
    own failure), else a 400 (a setting of the request that failed once running, e.g. a constraint dead end)."""
    if internal:
        return ServeError(500, f"generation failed: {error}", kind="server_error")
    return ServeError(400, f"generation failed: {error}")


async def _sse(chunks: AsyncIterator[dict]) -> AsyncIterator[dict]:
    """Chunks as SSE ``data:`` events, then ``[DONE]``; an error becomes a ``data: {"error": ...}`` event."""
    try:
        async for chunk in chunks:
            yield {"data": json.dumps(chunk, ensure_ascii=False)}
    except ServeError as e:
        yield {"data": json.dumps(e.body())}
        return
    except Exception as e:      # a bug: still the error event, never a broken stream
        log.exception("prosa serve: stream failed")
        yield {"data": json.dumps(error_body(f"internal error: {e}", "server_error"))}
        return
    yield {"data": "[DONE]"}


def _chunk(obj: str, state: ServerState, rid: str, created: int, choices: list, usage: bool, lm) -> dict:
    from .format import fingerprint

    out = {"id": rid, "object": obj, "created": created, "model": state.model_id,
           "system_fingerprint": fingerprint(lm), "choices": choices}
    if usage:
        out["usage"] = None
    return out


async def _chat_chunks(state, lm, plan, choices: Choices, rid, created, usage) -> AsyncIterator[dict]:
    for i in range(len(choices.choices)):
        yield _chunk("chat.completion.chunk", state, rid, created,
                     [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                       "finish_reason": None}], usage, lm)
    async for ev in _events(lm, plan, None):
        i = choices.index(ev)
        choices.add(ev)
        if ev.finish_reason == "error":
            raise _generation_failed(ev.error, ev.internal)
        logprobs = None
        if plan.logprobs is not None and ev.token >= 0:
            logprobs = choices.chat_logprobs([ev.token], [(ev.logprob, ev.top_logprobs or [])])
        if ev.text or logprobs or ev.finish_reason:
            delta = {"content": ev.text} if ev.text else {}
            yield _chunk("chat.completion.chunk", state, rid, created,
                         [{"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": ev.finish_reason}],
                         usage, lm)
    if usage:
        yield {**_chunk("chat.completion.chunk", state, rid, created, [], False, lm), "usage": choices.usage()}


async def _completion_chunks(state, lm, plan, choices: Choices, rid, created, usage) -> AsyncIterator[dict]:
    offsets = [0] * len(choices.choices)
    started = [False] * len(choices.choices)
    async for ev in _events(lm, plan, None):
        i = choices.index(ev)
        c = choices.add(ev)
        if ev.finish_reason == "error":
            raise _generation_failed(ev.error, ev.internal)
        text, logprobs = ev.text, None
        if plan.logprobs is not None:
            logprobs = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        if plan.echo and not started[i]:          # the prompt first, with its log-probabilities
            prompt_text = plan.prompt_texts[i // choices.n]
            text = prompt_text + text
            if logprobs is not None:
                logprobs = choices.completion_logprobs(i, plan.requests[i // choices.n].prompt,
                                                       c.prompt_logprobs or [], 0, prompt=True)
            offsets[i] = len(prompt_text)
        started[i] = True
        if logprobs is not None and ev.token >= 0:
            more = choices.completion_logprobs(i, [ev.token], [(ev.logprob, ev.top_logprobs or [])], offsets[i])
            for k in logprobs:
                logprobs[k] += more[k]
            offsets[i] += len(choices.token_str(ev.token))
        if text or ev.finish_reason or (logprobs and logprobs["tokens"]):
            yield _chunk("text_completion", state, rid, created,
                         [{"index": i, "text": text, "logprobs": logprobs, "finish_reason": ev.finish_reason}],
                         usage, lm)
    if usage:
        yield {**_chunk("text_completion", state, rid, created, [], False, lm), "usage": choices.usage()}


# ------------------------------------------------------------------------------------------------ errors, guards
def _json_error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                code: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, kind, param, code), status_code=status, headers=headers)


def _handlers(app: FastAPI) -> None:
    @app.exception_handler(ServeError)
    async def serve_error(request: Request, e: ServeError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        err = (e.errors() or [{}])[0]
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        kind = err.get("type", "")
        if kind == "json_invalid":
            return _json_error(400, f"the body is not valid JSON: {err.get('msg', '')}", code="invalid_json")
        if kind == "model_attributes_type" or (not loc and kind in ("dict_type", "missing")):
            return _json_error(400, "the body must be a JSON object (Content-Type: application/json)")
        tags = [x for x in loc if _is_type_tag(x)]
        loc = [x for x in loc if not _is_type_tag(x)]       # "prompt.str" -> "prompt" (a union's branch)
        param = ".".join(loc) or None
        msg = err.get("msg", "invalid value").removeprefix("Value error, ")
        if tags and loc and loc[0] in _UNION_HELP:
            msg = _UNION_HELP[loc[0]]
        return _json_error(400, f"{param}: {msg}" if param else msg, param=loc[0] if loc else None,
                           code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        if e.status_code == 404:
            return _json_error(404, f"no route {request.method} {request.url.path}", code="not_found")
        if e.status_code == 405:
            return _json_error(405, f"{request.method} is not allowed on {request.url.path}",
                               code="method_not_allowed")
        return _json_error(e.status_code, str(e.detail))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception):     # a bug in prosa: say so, keep the shape
        log.exception("prosa serve: request failed")
        return _json_error(500, f"internal error: {e}", kind="server_error")


_UNION_HELP = {"prompt": "must be a string, a list of strings, a list of token ids or a list of token-id lists",
               "stop": "must be a string or a list of up to 4 strings",
               "messages": "each message needs a role (system, developer, user or assistant) and a content that is "
                           "a string or a list of text parts"}


def _is_type_tag(x: str) -> bool:
    """pydantic names the branch of a union it tried in an error's location (``str``, ``list[int]``, ...)."""
    return "[" in x or x in ("str", "int", "float", "bool", "list", "dict", "none", "literal")


class _Guard:
    """Pure ASGI middleware in front of every route: the API key and the body size (checked on the declared
    length and while the body streams in)."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = self.state
        path = scope.get("path", "")
        if scope.get("method") == "OPTIONS":            # CORS preflight (answered by the CORS middleware)
            return await self.app(scope, receive, send)
        if state.api_key and path not in PUBLIC:
            auth = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
            token = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), state.api_key.encode()):
                response = _json_error(401, "missing or wrong API key: send it as 'Authorization: Bearer <key>'",
                                       kind="authentication_error", code="invalid_api_key")
                return await response(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_big = _json_error(413, f"the request body is over {state.max_body} bytes", code="body_too_large")
        if declared is not None and declared.isdigit() and int(declared) > state.max_body:
            return await too_big(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > state.max_body:
                    raise _TooBig
            return message

        try:
            await self.app(scope, limited, send)
        except _TooBig:
            await too_big(scope, receive, send)


class _TooBig(Exception):
    pass
