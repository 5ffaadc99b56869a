"""`vertical serve BUNDLE`: an OpenAI-compatible HTTP API over a bundle, without torch.

    GET  /health                 liveness and what is loaded (no key needed: for load balancers)
    GET  /v1/models              the one model this replica serves
    GET  /metrics                Prometheus metrics (requests, errors, latency, time to first
                                 token, tokens, queue depth)
    POST /v1/chat/completions    answer the last user message from the bundle's documents;
                                 `stream: true` sends Server-Sent Events like OpenAI's API
    POST /v1/completions         the bare model continuing a prompt (no retrieval, no system
                                 prompt), for a RAG stack that builds its own prompts
    POST /v1/embeddings          the bundle's sentence embedder, in OpenAI's format (float or base64)
    POST /v1/search              the bundle's index: ranked chunks with ids, spans and scores,
                                 as `vertical search --json` gives them

Every answer carries `sources` (the retrieved chunks, numbered as cited) next to OpenAI's fields.
The pack's system prompt always governs: client `system` messages are ignored, so a client
cannot talk the model out of its instructions. Errors are JSON in OpenAI's shape with the right
status. Generation runs in worker threads, at most `max_concurrent` at a time, each request with
its own generator, so clients never see each other's tokens; a client that disconnects stops
its generation at the next token.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import threading
import time
import uuid
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import anyio
from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from vertical.evidence import LoopGuard
from vertical.reader import is_factoid

log = logging.getLogger(__name__)
access = logging.getLogger("vertical.access")


@dataclass
class Limits:
    max_body_bytes: int = 256 * 1024
    max_messages: int = 64
    max_message_chars: int = 8000
    max_tokens: int = 512  # largest max_tokens a request may ask for
    default_max_tokens: int = 200
    max_concurrent: int = 4  # generations running at once (each uses the CPU cores)
    max_waiting: int = 64  # requests queued behind them before the server answers 503
    body_seconds: float = 10.0  # a request body not received in this time is answered 408
    header_seconds: float = 10.0  # a connection that has not sent a whole request head by then is closed


# Names a browser uses for this machine. A key-less server answers only requests addressed to
# one of them: a web page that rebinds its own name to 127.0.0.1 sends its name as the Host.
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
MIN_KEY_CHARS = 16


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
            value = "\n".join(texts)
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("not valid Unicode text (it holds a lone surrogate such as \\ud800)") from None
        return value


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use (temperature, ...)
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stream: bool = False


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    prompt: str | list[str]
    max_tokens: int | None = 16  # OpenAI's default for completions
    stop: list[str] = Field(default_factory=list)
    stream: bool = False

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value):
        if isinstance(value, list):
            if len(value) != 1:
                raise ValueError("send one prompt per request")
            value = value[0]
        if not value:
            raise ValueError("the prompt is empty")
        return value

    @field_validator("stop", mode="before")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else value or []
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise ValueError("a string or a list of strings")
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("at most 4 non-empty stop sequences")
        return stops


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    input: str | list[str]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _texts(cls, value):
        if isinstance(value, list) and value and not all(isinstance(v, str) for v in value):
            raise ValueError("send text (a string or a list of strings); token arrays are not supported")
        return value


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt "top_k" must not silently become k=5
    query: str = Field(min_length=1)
    k: int = Field(5, ge=1, le=50)
    mode: Literal["dense", "bm25", "hybrid"] | None = None


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def key_digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def _check_key(request, digests: Sequence[bytes]) -> None:
    """Nothing to check without keys; else the bearer key must be one of them. Only the keys'
    sha256 digests are held, and every digest is compared in constant time, so neither memory
    nor timing tells a key or how much of a guess was right."""
    if not digests:
        return
    header = request.headers.get("authorization", "")
    given = key_digest(header[7:]) if header.lower().startswith("bearer ") else b""
    if not any([hmac.compare_digest(given, digest) for digest in digests]):
        raise ApiError(401, "missing or wrong API key: send `Authorization: Bearer <key>`", "authentication_error",
                       code="invalid_api_key")


def host_name(header: str) -> str:
    """The name of a Host header, without its port ("[::1]:8000" -> "::1")."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def validated(raw: bytes, model: type[BaseModel]):
    """The JSON body as `model`, or a 400 naming the field."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise ApiError(400, f"{where}: {first['msg']}", param=where) from None


def _check_model(name: str | None, served: Sequence[str]) -> None:
    if name not in (None, "", *served):
        raise ApiError(404, f"model '{name}' is not served here; GET /v1/models lists {', '.join(served)}",
                       code="model_not_found")


def _check_max_tokens(max_tokens: int, limits: Limits) -> int:
    if not 1 <= max_tokens <= limits.max_tokens:
        raise ApiError(400, f"max_tokens must be between 1 and {limits.max_tokens}, got {max_tokens}",
                       param="max_tokens")
    return max_tokens


def _parse(raw: bytes, limits: Limits, model_name: str) -> tuple[ChatRequest, int]:
    request = validated(raw, ChatRequest)
    if len(request.messages) > limits.max_messages:
        raise ApiError(400, f"messages: at most {limits.max_messages} messages per request", param="messages")
    for i, message in enumerate(request.messages):
        if len(message.content) > limits.max_message_chars:
            raise ApiError(400, f"messages.{i}.content: longer than {limits.max_message_chars} characters",
                           param=f"messages.{i}.content")
    if request.messages[-1].role != "user" or not request.messages[-1].content.strip():
        raise ApiError(400, "messages: the last message must be a non-empty user message", param="messages")
    _check_model(request.model, [model_name])
    max_tokens = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
    if max_tokens is None:
        max_tokens = limits.default_max_tokens
    return request, _check_max_tokens(max_tokens, limits)


class ClosingStreamingResponse(StreamingResponse):
    """A stream that closes its generator when the response ends, however it ends.

    When the client leaves while a chunk is being sent, Starlette cancels the sending task and
    leaves the generator suspended at its `yield`; its `finally`, which frees the generation
    slot, would then run only when the garbage collector finds the generator."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()


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


def create_app(assistant, api_keys: str | Sequence[str] | None = None, limits: Limits | None = None,
               allowed_hosts: Sequence[str] = LOOPBACK_HOSTS, access_log: bool = False):
    """The FastAPI application serving `assistant` (a bundle's, from vertical.export.runtime).

    `api_keys`: the keys a client may send (none: no key needed). `allowed_hosts`: the names a
    request may be addressed to (its Host header), "*" for any. `access_log`: one JSON line per
    request on the `vertical.access` logger."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.requests import ClientDisconnect
    from starlette.exceptions import HTTPException
    from starlette.concurrency import run_in_threadpool

    from vertical.export.runtime import PromptTooLong

    limits = limits or Limits()
    keys = [api_keys] if isinstance(api_keys, str) else list(api_keys or [])
    digests = [key_digest(k) for k in keys if k]
    hosts = {host_name(h) for h in allowed_hosts}
    metrics = _Metrics()
    app = FastAPI(title=f"vertical: {assistant.name}", docs_url=None, redoc_url=None, openapi_url=None)
    slots = asyncio.Semaphore(limits.max_concurrent)
    # waiting: admitted requests not yet generating (retrieving, tokenising, or queued for a slot)
    state = {"waiting": 0, "served": 0}
    started = int(time.time())
    embedding_model = f"{assistant.name}-embeddings"

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

    @app.middleware("http")
    async def addressed_to_us(request: Request, call_next):
        """Refuse a request addressed to another name (DNS rebinding), then count and time it."""
        if "*" not in hosts and host_name(request.headers.get("host", "")) not in hosts:
            error = ApiError(400, "the Host header names a host this server does not answer for; start it with "
                             "--allow-host NAME to add one", code="invalid_host")
            return JSONResponse(error.body(), status_code=400)
        started_at = time.perf_counter()
        response = await call_next(request)
        seconds = time.perf_counter() - started_at  # to the response head: a stream goes on after it
        metrics.observe(request.url.path, response.status_code, seconds)
        if access_log:
            access.info(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "method": request.method,
                                    "path": request.url.path, "status": response.status_code,
                                    "seconds": round(seconds, 4), "client": request.client.host if request.client else None,
                                    "user_agent": request.headers.get("user-agent")}))
        return response

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

    @app.get("/metrics")
    async def prometheus(request: Request):
        _check_key(request, digests)
        metrics.set_load(limits.max_concurrent - slots._value, state["waiting"])
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def models(request: Request):
        _check_key(request, digests)
        return {"object": "list", "data": [{"id": name, "object": "model", "created": started, "owned_by": "vertical"}
                                           for name in (assistant.name, embedding_model)]}

    async def json_body(request: Request, model: type[BaseModel] | None = None):
        """The request's JSON body within the size and time limits, as `model` when given (else the
        bytes); None when the client left."""
        _check_key(request, digests)
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type != "application/json":  # a web page's cross-site form post is not JSON
            raise ApiError(415, "send the request body as JSON with `Content-Type: application/json`",
                           code="unsupported_media_type")
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limits.max_body_bytes:
            raise ApiError(413, f"request body over {limits.max_body_bytes} bytes", code="request_too_large")
        raw = bytearray()

        async def read_body() -> None:
            async for part in request.stream():
                raw.extend(part)
                if len(raw) > limits.max_body_bytes:
                    raise ApiError(413, f"request body over {limits.max_body_bytes} bytes", code="request_too_large")
        try:
            # a client that opens a request and trickles its body must not hold a connection forever
            await asyncio.wait_for(read_body(), limits.body_seconds)
        except asyncio.TimeoutError:
            raise ApiError(408, f"the request body did not arrive within {limits.body_seconds:g} s",
                           code="request_timeout") from None
        except ClientDisconnect:  # gone while sending the body: nobody to answer
            return None
        return validated(bytes(raw), model) if model is not None else bytes(raw)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        body = await json_body(request, EmbeddingRequest)
        if body is None:  # the client left while sending it
            return Response(status_code=400)
        _check_model(body.model, [embedding_model, assistant.name])
        texts = [body.input] if isinstance(body.input, str) else body.input
        if not texts or len(texts) > limits.max_messages:
            raise ApiError(400, f"input: send 1 to {limits.max_messages} texts", param="input")
        for i, text in enumerate(texts):
            if not text or len(text) > limits.max_message_chars:
                raise ApiError(400, f"input.{i}: empty or longer than {limits.max_message_chars} characters",
                               param=f"input.{i}")
        if body.dimensions not in (None, assistant.embedder.dim):
            raise ApiError(400, f"dimensions: this embedder gives {assistant.embedder.dim}", param="dimensions")
        with admitted() as leave_queue:
            leave_queue()  # embedding is short: it waits for no generation slot
            vectors = await run_in_threadpool(assistant.embedder.encode, texts)
        tokens = sum(sum(e.attention_mask) for e in assistant.embedder.tokenizer.encode_batch(texts))
        data = [{"object": "embedding", "index": i,
                 "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode("ascii")
                 if body.encoding_format == "base64" else [float(x) for x in v]} for i, v in enumerate(vectors)]
        return {"object": "list", "data": data, "model": embedding_model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    @app.post("/v1/search")
    async def search(request: Request):
        body = await json_body(request, SearchRequest)
        if body is None:  # the client left while sending it
            return Response(status_code=400)
        if len(body.query) > limits.max_message_chars:
            raise ApiError(400, f"query: longer than {limits.max_message_chars} characters", param="query")
        with admitted() as leave_queue:
            leave_queue()
            hits = await run_in_threadpool(assistant.index.search, body.query, assistant.embedder.encode_query,
                                           body.k, body.mode)
        return {"object": "list", "query": body.query, "mode": body.mode or assistant.index.meta.get("mode"),
                "data": [h.as_json() for h in hits]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await json_body(request, CompletionRequest)
        if body is None:  # the client left while sending it
            return Response(status_code=400)
        _check_model(body.model, [assistant.name])
        max_tokens = _check_max_tokens(body.max_tokens if body.max_tokens is not None else 16, limits)
        if len(body.prompt) > limits.max_message_chars:
            raise ApiError(400, f"prompt: longer than {limits.max_message_chars} characters", param="prompt")
        with admitted() as leave_queue:
            ids = await run_in_threadpool(assistant.model.piece_ids, body.prompt)
            if len(ids) + 1 > assistant.model.context_length:
                raise ApiError(400, f"the prompt takes {len(ids)} tokens; the model's context is "
                               f"{assistant.model.context_length}", param="prompt", code="context_length_exceeded")
            return await _complete_text(request, body, ids, max_tokens, leave_queue)

    async def _complete_text(request: Request, body: CompletionRequest, ids: list[int], max_tokens: int, leave_queue):
        reply_id, created, asked = f"cmpl-{uuid.uuid4().hex}", int(time.time()), time.perf_counter()
        stop = threading.Event()
        pieces = assistant.model.stream_ids(ids, max_tokens, stop)
        text, count, finish = "", 0, "length"

        def next_piece():
            return next(pieces, None)
        async with generation_slot(stop, leave_queue):
            while not await request.is_disconnected() and (piece := await run_in_threadpool(next_piece)) is not None:
                if count == 0:
                    metrics.first_token("/v1/completions", time.perf_counter() - asked)
                count += 1
                text += piece
                cut = min((text.find(s) for s in body.stop if s in text), default=-1)
                if cut >= 0:
                    text, finish = text[:cut], "stop"
                    break
            else:
                finish = "length" if count >= max_tokens or len(ids) + count >= assistant.model.context_length else "stop"
        if await request.is_disconnected():
            return Response(status_code=400)
        state["served"] += 1
        metrics.tokens(len(ids), count)
        usage = {"prompt_tokens": len(ids), "completion_tokens": count, "total_tokens": len(ids) + count}
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        if not body.stream:
            return {"id": reply_id, "object": "text_completion", "created": created, "model": assistant.name,
                    "choices": [choice], "usage": usage}

        async def events():  # the text is complete: sent as one chunk, then [DONE]
            chunk = {"id": reply_id, "object": "text_completion", "created": created, "model": assistant.name,
                     "choices": [choice]}
            yield f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n"
        return ClosingStreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        raw = await json_body(request)
        if raw is None:
            return Response(status_code=400)
        asked = time.perf_counter()
        body, max_tokens = _parse(raw, limits, assistant.name)
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
                return _streaming(answer, messages, ids, max_tokens, leave_queue, asked)
            return await _complete(request, answer, messages, ids, max_tokens, leave_queue, asked)

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

    async def _complete(request: Request, answer, messages, ids: list[int], max_tokens: int, leave_queue, asked: float):
        reply_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        sources = [_source_json(s) for s in answer.sources] if not answer.refused else []
        stop = threading.Event()
        next_piece = _pieces(answer, messages, ids, max_tokens, stop)
        produced = []
        async with generation_slot(stop, leave_queue):
            # a client that gave up (timed out) while queued or while its answer is generated frees
            # its slot: ordinary endpoints are not cancelled on a disconnect as streams are
            while not await request.is_disconnected() and (piece := await run_in_threadpool(next_piece)) is not None:
                if not produced:
                    metrics.first_token("/v1/chat/completions", time.perf_counter() - asked)
                produced.append(piece)
            answer.text = "".join(produced) if messages is not None else answer.text
            assistant.finish(answer)
            if messages is not None and not await request.is_disconnected():
                await run_in_threadpool(assistant.reread, answer, messages)
        if await request.is_disconnected():
            return Response(status_code=400)
        state["served"] += 1
        metrics.tokens(len(ids), len(produced) if messages is not None else 0)
        usage = {"prompt_tokens": len(ids), "completion_tokens": len(produced) if messages is not None else 0}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        finish = _finish_reason(messages, ids, len(produced), max_tokens)
        return _envelope(reply_id, created, "chat.completion",
                         {"index": 0, "message": {"role": "assistant", "content": answer.text}, "finish_reason": finish},
                         usage=usage, sources=sources, cited=answer.cited, refused=answer.refused,
                         evidence=answer.evidence(), faithful=answer.faithful, fallback=answer.fallback)

    def _streaming(answer, messages, ids: list[int], max_tokens: int, leave_queue, asked: float):
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
                    # a factoid answer may be replaced by an evidence span (vertical.reader): it is sent whole
                    whole = messages is not None and is_factoid(answer.question)
                    while (piece := await run_in_threadpool(next_piece)) is not None:
                        if count == 0:
                            metrics.first_token("/v1/chat/completions", time.perf_counter() - asked)
                        count += 1
                        answer.text += piece
                        if not whole:
                            chunk = _envelope(reply_id, created, "chat.completion.chunk",
                                              {"index": 0, "delta": {"content": piece}, "finish_reason": None})
                            yield f"data: {json.dumps(chunk)}\n\n"
                    streamed = answer.text
                    assistant.finish(answer)
                    if whole:
                        await run_in_threadpool(assistant.reread, answer, messages)
                        streamed = answer.text
                        chunk = _envelope(reply_id, created, "chat.completion.chunk",
                                          {"index": 0, "delta": {"content": answer.text}, "finish_reason": None})
                        yield f"data: {json.dumps(chunk)}\n\n"
                    if answer.fallback and not whole:  # what was streamed is not what the evidence says: say so
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
                    metrics.tokens(len(ids), count)
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
        return ClosingStreamingResponse(stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


    return app


PATHS = ("/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/search")


class _Metrics:
    """Prometheus metrics of one app (its own registry, so several apps in a process do not clash)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("vertical_requests", "HTTP requests by path and status", ["path", "status"],
                                registry=self.registry)
        self.latency = Histogram("vertical_request_seconds", "time to answer a request, by path", ["path"],
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64), registry=self.registry)
        self.prompt_tokens = Counter("vertical_prompt_tokens", "prompt tokens of answered requests",
                                     registry=self.registry)
        self.completion_tokens = Counter("vertical_completion_tokens", "tokens generated", registry=self.registry)
        self.errors = Counter("vertical_errors", "requests answered with an error status, by path and status",
                              ["path", "status"], registry=self.registry)
        self.ttft = Histogram("vertical_time_to_first_token_seconds", "from the request's body to the first generated "
                              "token, by path", ["path"], buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16),
                              registry=self.registry)
        self.running = Gauge("vertical_generations_running", "answers being generated", registry=self.registry)
        self.waiting = Gauge("vertical_requests_waiting", "admitted requests waiting for a slot", registry=self.registry)

    def observe(self, path: str, status: int, seconds: float) -> None:
        known = path if path in PATHS else "other"
        self.requests.labels(known, str(status)).inc()
        if status >= 400:
            self.errors.labels(known, str(status)).inc()
        self.latency.labels(known).observe(seconds)

    def first_token(self, path: str, seconds: float) -> None:
        self.ttft.labels(path).observe(seconds)

    def tokens(self, prompt: int, completion: int) -> None:
        self.prompt_tokens.inc(prompt)
        self.completion_tokens.inc(completion)

    def set_load(self, running: int, waiting: int) -> None:
        self.running.set(running)
        self.waiting.set(waiting)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def header_deadline_protocol(seconds: float):
    """uvicorn's h11 protocol with a deadline for the request head: uvicorn itself waits forever
    for headers that never end, so a few hundred trickling sockets ("slowloris") would hold the
    connection cap and the file descriptors. A connection that has not sent a whole request head
    `seconds` after it opened is closed."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderDeadline(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._head_deadline = self.loop.call_later(seconds, self._head_too_slow)

        def _head_too_slow(self) -> None:
            if self.cycle is None and not self.transport.is_closing():  # no request head parsed yet
                self.transport.close()

        def connection_lost(self, exc) -> None:
            self._head_deadline.cancel()
            super().connection_lost(exc)

    return HeaderDeadline


def read_key_file(path) -> list[str]:
    """API keys from a file, one per line (blank lines and # comments skipped)."""
    from pathlib import Path

    from vertical.errors import VerticalError

    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise VerticalError(f"--api-key-file {path}: cannot read it ({exc})") from None
    keys = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not keys:
        raise VerticalError(f"--api-key-file {path}: no key in it; write one key per line")
    return keys


def check_serving(host: str, keys: Sequence[str]) -> None:
    """Refuse what would expose the documents: a non-loopback address without a key, or a short key."""
    from vertical.errors import VerticalError

    for number, key in enumerate(keys, 1):
        if len(key) < MIN_KEY_CHARS:
            raise VerticalError(f"API key {number} is {len(key)} characters; use at least {MIN_KEY_CHARS} "
                                "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)")
    if host_name(host) not in LOOPBACK_HOSTS and not keys:
        raise VerticalError(f"refusing to listen on {host} without an API key: anyone who can reach the port could "
                            "read the documents. Set VERTICAL_API_KEY or --api-key-file, or use --host 127.0.0.1")


def serve(bundle, host: str = "127.0.0.1", port: int = 8000, api_keys: Sequence[str] = (),
          limits: Limits | None = None, allowed_hosts: Sequence[str] = (), ssl_certfile: str | None = None,
          ssl_keyfile: str | None = None, public_key=None, json_logs: bool = False) -> None:
    """Verify and load the bundle, then serve it until interrupted.

    Requests must name this machine's loopback names, the bound address or an `allowed_hosts`
    entry in their Host header; with keys and a non-loopback address, any name is accepted
    unless `allowed_hosts` is given. Connections beyond what the queue admits are refused at
    once (uvicorn's limit_concurrency), idle keep-alive connections close after 5 s, and a
    connection that has not sent its request head within `limits.header_seconds` is closed. With
    `public_key`, a bundle not signed by its private key is refused."""
    import uvicorn

    from vertical.answer import open_bundle

    limits = limits or Limits()
    check_serving(host, api_keys)
    hosts = [*LOOPBACK_HOSTS, *allowed_hosts]
    if host_name(host) not in ("0.0.0.0", "::"):
        hosts.append(host)
    elif api_keys and not allowed_hosts:
        hosts = ["*"]
    assistant = open_bundle(bundle, public_key=public_key)  # with a key: only a bundle its owner signed
    scheme = "https" if ssl_certfile else "http"
    log.info("serving %s on %s://%s:%d (API key %s)", assistant.name, scheme, host, port,
             "required" if api_keys else "off")
    if json_logs:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        access.addHandler(handler)
        access.setLevel(logging.INFO)
        access.propagate = False
    uvicorn.run(create_app(assistant, list(api_keys), limits, hosts, access_log=json_logs), host=host, port=port,
                log_level="info", access_log=not json_logs,
                timeout_graceful_shutdown=10, timeout_keep_alive=5, http=header_deadline_protocol(limits.header_seconds),
                limit_concurrency=limits.max_concurrent + limits.max_waiting + 8,
                ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile)
