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
import weakref
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from vertical.evidence import LoopGuard

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
    content: str = ""

    @field_validator("content", mode="before")
    @classmethod
    def _text(cls, value):
        """OpenAI's content forms: a string, a list of parts (text parts only here), or null."""
        if value is None:
            return ""
        if isinstance(value, list):
            texts = []
            for part in value:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError("only text content parts ({\"type\": \"text\", \"text\": ...}) are supported")
                texts.append(part["text"])
            return "\n".join(texts)
        return value


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
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply") from None
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
    max_tokens = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
    if max_tokens is None:
        max_tokens = limits.default_max_tokens
    if not 1 <= max_tokens <= limits.max_tokens:
        raise ApiError(400, f"max_tokens must be between 1 and {limits.max_tokens}, got {max_tokens}",
                       param="max_tokens")
    return request, max_tokens


def guarded(pieces):
    """The model's pieces until it starts repeating itself or has said two sentences (LoopGuard)."""
    guard = LoopGuard()
    for piece in pieces:
        yield piece
        if guard.feed(piece):
            return


def _source_json(source) -> dict[str, Any]:
    return {"number": source.number, "title": source.title, "source": source.source, "doc_id": source.doc_id,
            "start": source.start, "end": source.end, "score": source.score, "text": source.text}


def create_app(assistant, api_key: str | None = None, limits: Limits | None = None):
    """The FastAPI application serving `assistant` (a bundle's, from vertical.export.runtime)."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.requests import ClientDisconnect
    from starlette.exceptions import HTTPException
    from starlette.concurrency import run_in_threadpool

    from vertical.export.runtime import PromptTooLong

    limits = limits or Limits()
    app = FastAPI(title=f"vertical: {assistant.name}", docs_url=None, redoc_url=None, openapi_url=None)
    slots = asyncio.Semaphore(limits.max_concurrent)
    # waiting: admitted requests not yet generating (retrieving, tokenising, or queued for a slot)
    state = {"waiting": 0, "served": 0}
    started = int(time.time())

    @contextlib.contextmanager
    def admitted():
        """Count the request as waiting from admission until it holds a slot or gives up, so a
        burst is turned away (503) before any of it is retrieved or tokenised."""
        if state["waiting"] >= limits.max_waiting:
            raise ApiError(503, "the server is busy; retry shortly", "server_error", code="overloaded")
        state["waiting"] += 1
        ticket = {"open": True}

        def leave() -> None:
            if ticket["open"]:
                ticket["open"] = False
                state["waiting"] -= 1
        try:
            yield leave
        except BaseException:
            leave()
            raise

    @contextlib.asynccontextmanager
    async def generation_slot(stop: threading.Event, leave_queue):
        """One of `max_concurrent` generation slots; on leaving (done, error or disconnect) the
        request's generation is told to stop and the slot is freed."""
        try:
            await slots.acquire()
        finally:
            leave_queue()
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
        try:
            async for part in request.stream():
                raw += part
                if len(raw) > limits.max_body_bytes:
                    raise ApiError(413, f"request body over {limits.max_body_bytes} bytes", code="request_too_large")
        except ClientDisconnect:  # gone while sending the body: nobody to answer
            return Response(status_code=400)
        body, max_tokens = _parse(bytes(raw), limits, assistant.name)
        question = body.messages[-1].content
        history = [m.model_dump() for m in body.messages[:-1]]
        with admitted() as leave_queue:  # 503 when too many are queued, before any status line is sent
            answer, messages = await run_in_threadpool(assistant.prepare, question, None, history)
            ids = []
            if messages is not None:
                ids = await run_in_threadpool(assistant.model.prompt_ids, messages)
                if len(ids) + 1 > assistant.model.context_length:
                    raise ApiError(400, f"the conversation and its sources take {len(ids)} tokens; the model's context "
                                   f"is {assistant.model.context_length}: send fewer or shorter messages",
                                   param="messages", code="context_length_exceeded")
            if body.stream:
                return _streaming(answer, messages, ids, max_tokens, leave_queue)
            return await _complete(request, answer, messages, ids, max_tokens, leave_queue)

    def _finish_reason(messages, ids: list[int], count: int, max_tokens: int) -> str:
        """"length" when the answer was cut (max_tokens or the context window), else "stop"."""
        if messages is None:
            return "stop"
        return "length" if count >= max_tokens or len(ids) + count >= assistant.model.context_length else "stop"

    def _pieces(answer, messages, ids: list[int], max_tokens: int, stop: threading.Event):
        pieces = assistant.model.stream_ids(ids, max_tokens, stop, answer.numbers()) if messages is not None \
            else iter([answer.text])
        if messages is not None:
            pieces = guarded(pieces)

        def next_piece():
            try:
                return next(pieces)
            except StopIteration:
                return None
            except PromptTooLong as exc:
                raise ApiError(400, str(exc), code="context_length_exceeded") from None
        return next_piece

    def _envelope(reply_id: str, created: int, kind: str, choice: dict[str, Any], **extra) -> dict[str, Any]:
        return {"id": reply_id, "object": kind, "created": created, "model": assistant.name, "choices": [choice], **extra}

    async def _complete(request: Request, answer, messages, ids: list[int], max_tokens: int, leave_queue):
        reply_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        sources = [_source_json(s) for s in answer.sources] if not answer.refused else []
        stop = threading.Event()
        next_piece = _pieces(answer, messages, ids, max_tokens, stop)
        produced = []
        async with generation_slot(stop, leave_queue):
            # a client that gave up (timed out) while queued or while its answer is generated frees
            # its slot: ordinary endpoints are not cancelled on a disconnect as streams are
            while not await request.is_disconnected() and (piece := await run_in_threadpool(next_piece)) is not None:
                produced.append(piece)
        if await request.is_disconnected():
            return Response(status_code=400)
        state["served"] += 1
        answer.text = "".join(produced) if messages is not None else answer.text
        assistant.finish(answer)
        usage = {"prompt_tokens": len(ids), "completion_tokens": len(produced) if messages is not None else 0}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        finish = _finish_reason(messages, ids, len(produced), max_tokens)
        return _envelope(reply_id, created, "chat.completion",
                         {"index": 0, "message": {"role": "assistant", "content": answer.text}, "finish_reason": finish},
                         usage=usage, sources=sources, cited=answer.cited, refused=answer.refused,
                         evidence=answer.evidence(), faithful=answer.faithful, fallback=answer.fallback)

    def _streaming(answer, messages, ids: list[int], max_tokens: int, leave_queue):
        reply_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        sources = [_source_json(s) for s in answer.sources] if not answer.refused else []
        stop = threading.Event()
        next_piece = _pieces(answer, messages, ids, max_tokens, stop)

        async def events():
            count = 0
            try:
                async with generation_slot(stop, leave_queue):  # left on a client disconnect too (the task is cancelled)
                    first = _envelope(reply_id, created, "chat.completion.chunk",
                                      {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None},
                                      sources=sources, refused=answer.refused)
                    yield f"data: {json.dumps(first)}\n\n"
                    while (piece := await run_in_threadpool(next_piece)) is not None:
                        count += 1
                        answer.text += piece
                        chunk = _envelope(reply_id, created, "chat.completion.chunk",
                                          {"index": 0, "delta": {"content": piece}, "finish_reason": None})
                        yield f"data: {json.dumps(chunk)}\n\n"
                    streamed = answer.text
                    assistant.finish(answer)
                    if answer.fallback:  # what was streamed is not what the evidence says: say so
                        note = _envelope(reply_id, created, "chat.completion.chunk",
                                         {"index": 0, "delta": {"content": f"\n(Withdrawn: not what the sources say. "
                                                                           f"{answer.text})"},
                                          "finish_reason": None})
                        yield f"data: {json.dumps(note)}\n\n"
                    last = _envelope(reply_id, created, "chat.completion.chunk",
                                     {"index": 0, "delta": {}, "finish_reason": _finish_reason(messages, ids, count, max_tokens)},
                                     cited=answer.cited, evidence=answer.evidence(), faithful=answer.faithful,
                                     fallback=answer.fallback, answer=answer.text if answer.text != streamed else None)
                    yield f"data: {json.dumps(last)}\n\ndata: [DONE]\n\n"
                    state["served"] += 1
            except ApiError as exc:  # the status line is already sent: report in the stream
                yield f"data: {json.dumps(exc.body())}\n\ndata: [DONE]\n\n"
            except Exception:  # noqa: BLE001 - the same, for a failure of the model itself
                log.exception("generation failed mid-stream")
                error = ApiError(500, "internal error while generating; see the server log", "server_error")
                yield f"data: {json.dumps(error.body())}\n\ndata: [DONE]\n\n"
            finally:
                leave_queue()

        stream = events()
        weakref.finalize(stream, leave_queue)  # a stream whose client left before it started never runs its finally
        return StreamingResponse(stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


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
