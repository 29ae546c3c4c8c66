"""OpenAI-compatible HTTP server (FastAPI + uvicorn) over any ``EngineClient``.

Every request is validated completely before it reaches the engine (model name, types, context
length, sampling values), so a bad request is answered with an OpenAI-format error and never
touches the requests already running. A client that disconnects has its request aborted.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections import Counter
from typing import AsyncIterator, Awaitable, TypeVar

import anyio
import attrs
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kunserve.outputs import RequestOutput
from kunserve.sampling_params import SamplingParams
from kunserve.serving.metrics import CONTENT_TYPE, render_metrics
from kunserve.serving.protocol import (
    ChatCompletionRequest, CompletionRequest, EngineClient, EngineUnavailableError, Kind,
    TextDeltas, check_context_length, error_body, full_response, new_request_id, now,
    stream_chunk, usage_chunk, validation_message,
)

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20
T = TypeVar("T")


class ApiError(Exception):
    """An error answered as ``{"error": {message, type, param, code}}`` with ``status``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


class _ClientGone(Exception):
    """The HTTP client disconnected before its answer was ready."""


@attrs.define
class _State:
    """What the routes share. Invariant: ``errors`` counts every error response by status."""

    client: EngineClient
    model_name: str
    errors: Counter = attrs.field(factory=Counter)

    def error(self, status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
        self.errors[str(status)] += 1
        err_type = "invalid_request_error" if status < 500 else "server_error"
        return JSONResponse(error_body(message, err_type, param, code), status_code=status)


@attrs.frozen
class _Job:
    """One validated generation request, ready for ``EngineClient.generate``."""

    kind: Kind
    request_id: str
    prompt: list[int]
    params: SamplingParams
    stream: bool
    include_usage: bool
    created: int = attrs.field(factory=now)


# -- body size --------------------------------------------------------------------------------
class BodyLimitMiddleware:
    """Pure ASGI: answers 413 when the declared or the actual body exceeds ``max_bytes``.

    Invariant: the app sees a body only after it was fully read and found small enough (it is
    then replayed as one message). An oversized body is drained (up to 16x the limit) before
    answering, so the client reads the 413 instead of a connection reset.
    """

    def __init__(self, app, max_bytes: int, state: _State):
        self.app, self.max_bytes, self.state = app, max_bytes, state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            if not declared.isdigit():
                return await self.state.error(400, "invalid Content-Length header")(scope, receive, send)
            return await self._reject(scope, receive, send, 0)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._reject(scope, receive, send, size, message.get("more_body", False))
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # later calls wait for http.disconnect
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)

    async def _reject(self, scope, receive, send, seen: int, more: bool = True) -> None:
        while more and seen <= 16 * self.max_bytes:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            seen += len(message.get("body", b""))
            more = message.get("more_body", False)
        msg = f"request body exceeds the limit of {self.max_bytes} bytes"
        await self.state.error(413, msg, code="request_too_large")(scope, receive, send)


# -- disconnect-aware waiting ------------------------------------------------------------------
async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _until_disconnect(request: Request, awaitable: Awaitable[T]) -> T:
    """Await ``awaitable``; if the client disconnects first, cancel it and raise _ClientGone."""
    task = asyncio.ensure_future(awaitable)
    watch = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
    if task.done() and not task.cancelled():
        return task.result()
    raise _ClientGone


async def _next(gen: AsyncIterator[RequestOutput]) -> RequestOutput:
    return await anext(gen)


async def _last(first: RequestOutput, gen: AsyncIterator[RequestOutput]) -> RequestOutput:
    last = first
    while not last.finished:
        last = await anext(gen)
    return last


async def _abort(client: EngineClient, request_id: str) -> None:
    with anyio.CancelScope(shield=True):  # runs in finally blocks of cancelled tasks
        await client.abort(request_id)


class _SSEResponse(StreamingResponse):
    """Streams while listening for disconnect on every ASGI spec version, and closes the body
    iterator right away afterwards (so its abort runs now, not at garbage collection)."""

    media_type = "text/event-stream"

    async def __call__(self, scope, receive, send) -> None:
        async with anyio.create_task_group() as group:

            async def stream() -> None:
                try:
                    await self.stream_response(send)
                except OSError:
                    pass  # the client went away mid-write
                group.cancel_scope.cancel()

            group.start_soon(stream)
            await self.listen_for_disconnect(receive)
            group.cancel_scope.cancel()
        with anyio.CancelScope(shield=True):
            await self.body_iterator.aclose()


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"


# -- request preparation -------------------------------------------------------------------------
def _prompt_ids(client: EngineClient, body: CompletionRequest | ChatCompletionRequest) -> list[int]:
    tokenizer = client.tokenizer
    if isinstance(body, ChatCompletionRequest):
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ApiError(400, "this model has no chat template; use /v1/completions", "messages")
        try:
            messages = [m.as_template_dict() for m in body.messages]
        except ValueError as e:
            raise ApiError(400, str(e), "messages") from None
        try:
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        except Exception as e:  # template errors (e.g. raise_exception in Jinja) are the user's input
            raise ApiError(400, f"cannot apply the chat template: {e}", "messages") from None
        return list(ids)
    prompt = body.single_prompt()
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ApiError(400, "this model has no tokenizer; send the prompt as token ids", "prompt")
        return tokenizer.encode(prompt)
    return list(prompt)


def _prepare(state: _State, body: CompletionRequest | ChatCompletionRequest, kind: Kind) -> _Job:
    if body.model is not None and body.model != state.model_name:
        raise ApiError(404, f"The model `{body.model}` does not exist.", "model", "model_not_found")
    if (unsupported := body.unsupported()) is not None:
        raise ApiError(400, unsupported[1], unsupported[0])
    prompt = _prompt_ids(state.client, body)
    what = "messages" if kind == "chat" else "prompt"
    max_model_len = state.client.max_model_len
    requested = body.requested_max_tokens()
    try:
        check_context_length(len(prompt), requested, max_model_len, what)
    except ValueError as e:
        raise ApiError(400, str(e), what, "context_length_exceeded") from None
    try:  # omitted max_tokens: whatever fits in the context
        params = body.sampling_params(requested if requested is not None else max_model_len - len(prompt))
    except ValueError as e:
        raise ApiError(400, str(e)) from None
    return _Job(kind, new_request_id(kind), prompt, params, body.stream, body.include_usage)


# -- generation ------------------------------------------------------------------------------------
async def _serve(state: _State, request: Request, job: _Job) -> Response:
    client = state.client
    gen = client.generate(job.prompt, job.params, job.request_id)
    try:
        first = await _until_disconnect(request, _next(gen))
        if job.stream:
            return _SSEResponse(_events(state, job, first, gen))
        final = await _until_disconnect(request, _last(first, gen))
    except ValueError as e:
        raise ApiError(400, str(e)) from None
    except EngineUnavailableError as e:
        raise ApiError(503, str(e), code="unavailable") from None
    except _ClientGone:
        await _abort(client, job.request_id)
        return Response(status_code=499)  # nobody reads it; mirrors nginx's "client closed"
    if final.outputs[0].finish_reason == "abort":
        raise ApiError(503, "the request was aborted before it finished (server shutting down)", code="aborted")
    return JSONResponse(full_response(job.kind, job.request_id, state.model_name, job.created, final))


async def _events(state: _State, job: _Job, first: RequestOutput, gen: AsyncIterator[RequestOutput]):
    """SSE chunks for one request; ends with ``data: [DONE]`` even after an error."""
    header = (job.kind, job.request_id, state.model_name, job.created)
    deltas = TextDeltas(job.params.stop)
    ended = False
    try:
        if job.kind == "chat":
            yield _sse(stream_chunk(*header, "", role=True))
        output = first
        while True:
            ended, out = output.finished, output.outputs[0]
            if ended and out.finish_reason == "abort":
                state.errors["503"] += 1
                yield _sse(error_body("the request was aborted before it finished", "server_error", code="aborted"))
                break
            delta = deltas.next(out.text, ended)
            if delta or ended:
                text = delta if delta or job.kind == "completion" else None
                yield _sse(stream_chunk(*header, text, out.finish_reason if ended else None))
            if ended:
                if job.include_usage:
                    yield _sse(usage_chunk(*header, output))
                break
            output = await anext(gen)
    except Exception as e:  # the engine failed mid-stream: tell the client instead of hanging up
        ended = True
        log.warning("stream %s failed: %s", job.request_id, e)
        state.errors["500"] += 1
        yield _sse(error_body(f"generation failed: {e}", "server_error"))
    finally:
        if not ended:
            await _abort(state.client, job.request_id)
        with anyio.CancelScope(shield=True):
            await gen.aclose()
    yield _sse("[DONE]")


# -- app ---------------------------------------------------------------------------------------------
def build_app(client: EngineClient, served_model_name: str, max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The OpenAI-compatible app serving ``client`` as model ``served_model_name``."""
    state = _State(client, served_model_name)
    app = FastAPI(title="kunserve", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes, state=state)
    app.state.kunserve = state

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(exc.errors())  # 400, not FastAPI's 422: OpenAI's contract
        return state.error(400, message, param)

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return state.error(exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return state.error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _crash(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return state.error(500, f"internal error: {type(exc).__name__}: {exc}")

    @app.get("/health")
    async def health() -> Response:
        if client.is_healthy():
            return JSONResponse({"status": "ok"})
        return state.error(503, "the engine is not healthy", code="unhealthy")

    @app.get("/v1/models")
    async def models() -> dict:
        card = {"id": served_model_name, "object": "model", "created": now(), "owned_by": "kunserve",
                "root": served_model_name, "max_model_len": client.max_model_len}
        return {"object": "list", "data": [card]}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        snapshot = {**client.metrics_snapshot(), "http_responses_total": dict(state.errors)}
        return PlainTextResponse(render_metrics(snapshot), media_type=CONTENT_TYPE)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await _serve(state, request, _prepare(state, body, "completion"))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await _serve(state, request, _prepare(state, body, "chat"))

    return app


# -- server --------------------------------------------------------------------------------------------
class KunServer(uvicorn.Server):
    """uvicorn server that, on exit, stops accepting connections and shuts the engine client
    down *before* waiting for connections, so in-flight requests end with a result or an error."""

    def __init__(self, config: uvicorn.Config, client: EngineClient):
        super().__init__(config)
        self.client = client

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()
        try:
            await self.client.shutdown()
        except Exception:
            log.exception("engine client shutdown failed")
        await super().shutdown(sockets)


def make_server(
    client: EngineClient, host: str = "127.0.0.1", port: int = 8000, served_model_name: str = "kunserve",
    *, max_body_bytes: int = MAX_BODY_BYTES, log_level: str = "info", graceful_timeout_s: float = 5.0,
) -> KunServer:
    app = build_app(client, served_model_name, max_body_bytes)
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=graceful_timeout_s,
        lifespan="off",
    )
    return KunServer(config, client)


def run_server(
    client: EngineClient, host: str = "127.0.0.1", port: int = 8000, served_model_name: str = "kunserve",
    *, sockets: list[socket.socket] | None = None, **kwargs,
) -> None:
    """Serve until SIGINT/SIGTERM (main thread) or ``should_exit``; then shut the client down."""
    make_server(client, host, port, served_model_name, **kwargs).run(sockets=sockets)
