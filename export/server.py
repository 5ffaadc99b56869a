"""`vertical serve BUNDLE`: an OpenAI-compatible HTTP API over a bundle, without torch.

    GET  /health                 liveness and what is loaded (no key needed: for load balancers)
    GET  /v1/models              the one model this replica serves
    POST /v1/chat/completions    answer the last user message from the bundle's documents;
                                 `stream: true` sends Server-Sent Events like OpenAI's API

Every answer carries `sources` (the retrieved chunks, numbered as cited) next to OpenAI's fields.
The pack's system prompt always governs: client `system` messages are ignored, so a client
cannot talk the model out of its instructions. Errors are JSON in OpenAI's shape with the right
status. Generation runs in worker threads, at most `max_concurrent` at a time, each request with
its own generator, so clients never see each other's tokens; a client that disconnects stops
its generation at the next token.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

log = logging.getLogger(__name__)


@dataclass
class Limits:
    max_body_bytes: int = 256 * 1024
    max_messages: int = 64
    max_message_chars: int = 8000
    max_tokens: int = 512  # largest max_tokens a request may ask for
    default_max_tokens: int = 200
    max_concurrent: int = 4  # generations running at once (each uses the CPU cores)
    max_waiting: int = 64  # requests queued behind them before the server answers 503


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use (temperature, ...)
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stream: bool = False


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _check_key(request, api_key: str | None) -> None:
    if not api_key:
        return
    header = request.headers.get("authorization", "")
    given = header[7:] if header.lower().startswith("bearer ") else ""
    # constant time: the comparison must not reveal how much of a guess was right
    if not hmac.compare_digest(given.encode(), api_key.encode()):
        raise ApiError(401, "missing or wrong API key: send `Authorization: Bearer <key>`", "authentication_error",
                       code="invalid_api_key")


def _parse(raw: bytes, limits: Limits, model_name: str) -> tuple[ChatRequest, int]:
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        request = ChatRequest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise ApiError(400, f"{where}: {first['msg']}", param=where) from None
    if len(request.messages) > limits.max_messages:
        raise ApiError(400, f"messages: at most {limits.max_messages} messages per request", param="messages")
    for i, message in enumerate(request.messages):
        if len(message.content) > limits.max_message_chars:
            raise ApiError(400, f"messages.{i}.content: longer than {limits.max_message_chars} characters",
                           param=f"messages.{i}.content")
    if request.messages[-1].role != "user" or not request.messages[-1].content.strip():
        raise ApiError(400, "messages: the last message must be a non-empty user message", param="messages")
    if request.model not in (None, "", model_name):
        raise ApiError(404, f"model '{request.model}' is not served here; GET /v1/models lists '{model_name}'",
                       code="model_not_found")
    max_tokens = request.max_completion_tokens or request.max_tokens
    if max_tokens is None:
        max_tokens = limits.default_max_tokens
    if not 1 <= max_tokens <= limits.max_tokens:
        raise ApiError(400, f"max_tokens must be between 1 and {limits.max_tokens}, got {max_tokens}",
                       param="max_tokens")
    return request, max_tokens


def _source_json(source) -> dict[str, Any]:
    return {"number": source.number, "title": source.title, "source": source.source, "doc_id": source.doc_id,
            "start": source.start, "end": source.end, "score": source.score, "text": source.text}


def create_app(assistant, api_key: str | None = None, limits: Limits | None = None):
    """The FastAPI application serving `assistant` (a bundle's, from vertical.export.runtime)."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException
    from starlette.concurrency import run_in_threadpool

    from vertical.export.runtime import PromptTooLong

    limits = limits or Limits()
    app = FastAPI(title=f"vertical: {assistant.name}", docs_url=None, redoc_url=None, openapi_url=None)
    slots = asyncio.Semaphore(limits.max_concurrent)
    state = {"waiting": 0, "served": 0}
    started = int(time.time())

    @contextlib.asynccontextmanager
    async def generation_slot(stop: threading.Event):
        """One of `max_concurrent` generation slots; on leaving (done, error or disconnect) the
        request's generation is told to stop and the slot is freed."""
        state["waiting"] += 1
        try:
            await slots.acquire()
        finally:
            state["waiting"] -= 1
        try:
            yield
        finally:
            stop.set()
            slots.release()

    @app.exception_handler(ApiError)
    async def api_error(_request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def http_error(_request, exc: HTTPException):
        return JSONResponse(ApiError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())) or "request"
        return JSONResponse(ApiError(400, f"{where}: {first.get('msg', 'invalid request')}").body(), status_code=400)

    @app.exception_handler(Exception)
    async def unexpected(_request, exc: Exception):
        log.exception("internal error")
        return JSONResponse(ApiError(500, "internal error; see the server log", "server_error").body(), status_code=500)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": assistant.name, "chunks": len(assistant.index.chunks),
                "running": limits.max_concurrent - slots._value, "waiting": state["waiting"], "served": state["served"]}

    @app.get("/v1/models")
    async def models(request: Request):
        _check_key(request, api_key)
        return {"object": "list", "data": [{"id": assistant.name, "object": "model", "created": started,
                                            "owned_by": "vertical"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        _check_key(request, api_key)
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limits.max_body_bytes:
            raise ApiError(413, f"request body over {limits.max_body_bytes} bytes", code="request_too_large")
        raw = bytearray()
        async for part in request.stream():
            raw += part
            if len(raw) > limits.max_body_bytes:
                raise ApiError(413, f"request body over {limits.max_body_bytes} bytes", code="request_too_large")
        body, max_tokens = _parse(bytes(raw), limits, assistant.name)
        question = body.messages[-1].content
        history = [m.model_dump() for m in body.messages[:-1]]
        if state["waiting"] >= limits.max_waiting:  # checked before any status line is sent
            raise ApiError(503, "the server is busy; retry shortly", "server_error", code="overloaded")

        answer, messages = await run_in_threadpool(assistant.prepare, question, None, history)
        ids = []
        if messages is not None:
            ids = await run_in_threadpool(assistant.model.prompt_ids, messages)
            if len(ids) + 1 > assistant.model.context_length:
                raise ApiError(400, f"the conversation and its sources take {len(ids)} tokens; the model's context is "
                               f"{assistant.model.context_length}: send fewer or shorter messages",
                               param="messages", code="context_length_exceeded")
        reply_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        sources = [_source_json(s) for s in answer.sources] if not answer.refused else []

        def envelope(kind: str, choice: dict[str, Any], **extra) -> dict[str, Any]:
            return {"id": reply_id, "object": kind, "created": created, "model": assistant.name,
                    "choices": [choice], **extra}

        stop = threading.Event()
        pieces = assistant.model.stream_ids(ids, max_tokens, stop) if messages is not None else iter([answer.text])

        def next_piece():
            try:
                return next(pieces)
            except StopIteration:
                return None
            except PromptTooLong as exc:
                raise ApiError(400, str(exc), code="context_length_exceeded") from None

        if not body.stream:
            produced = []
            async with generation_slot(stop):
                while (piece := await run_in_threadpool(next_piece)) is not None:
                    produced.append(piece)
            state["served"] += 1
            answer.text = "".join(produced) if messages is not None else answer.text
            assistant.finish(answer)
            finish = "length" if messages is not None and len(produced) >= max_tokens else "stop"
            usage = {"prompt_tokens": len(ids), "completion_tokens": len(produced) if messages is not None else 0}
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
            return envelope("chat.completion", {"index": 0, "message": {"role": "assistant", "content": answer.text},
                                                "finish_reason": finish},
                            usage=usage, sources=sources, cited=answer.cited, refused=answer.refused)

        async def events():
            count = 0
            async with generation_slot(stop):  # left on a client disconnect too (the task is cancelled)
                first = envelope("chat.completion.chunk", {"index": 0, "delta": {"role": "assistant", "content": ""},
                                                           "finish_reason": None}, sources=sources, refused=answer.refused)
                yield f"data: {json.dumps(first)}\n\n"
                try:
                    while (piece := await run_in_threadpool(next_piece)) is not None:
                        count += 1
                        answer.text += piece
                        chunk = envelope("chat.completion.chunk", {"index": 0, "delta": {"content": piece},
                                                                   "finish_reason": None})
                        yield f"data: {json.dumps(chunk)}\n\n"
                except ApiError as exc:  # the status line is already sent: report in the stream
                    yield f"data: {json.dumps(exc.body())}\n\ndata: [DONE]\n\n"
                    return
                assistant.finish(answer)
                finish = "length" if messages is not None and count >= max_tokens else "stop"
                last = envelope("chat.completion.chunk", {"index": 0, "delta": {}, "finish_reason": finish},
                                cited=answer.cited)
                yield f"data: {json.dumps(last)}\n\ndata: [DONE]\n\n"
                state["served"] += 1

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app


def serve(bundle, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          limits: Limits | None = None) -> None:
    """Verify and load the bundle, then serve it until interrupted."""
    import uvicorn

    from vertical.export.runtime import open_bundle

    assistant = open_bundle(bundle)
    log.info("serving %s on http://%s:%d (API key %s)", assistant.name, host, port, "required" if api_key else "off")
    uvicorn.run(create_app(assistant, api_key, limits), host=host, port=port, log_level="info",
                timeout_graceful_shutdown=10)
