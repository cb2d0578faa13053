"""The HTTP layer: OpenAI's routes over the :class:`~lofit.serving.engine.Engine`, with limits and JSON errors.

Routes: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (both
with ``"stream": true`` as server-sent events ending in ``data: [DONE]``), ``POST
/v1/adapters`` and ``DELETE /v1/adapters/{name}``, and ``GET /health`` (no key needed).

Every error is ``{"error": {"message", "type", "param", "code"}}``: 400 a body that is not a
JSON object or a request the server cannot serve as asked, 401 a missing or wrong bearer key,
404 an unknown adapter or route, 409 an adapter name already taken, 413 a body, prompt,
prompt count or ``max_tokens`` over the limits, 422 a field of the wrong type or range, 429
the bounded queue full, 503 shutting down, 504 a request past its timeout, 500 a batch that
failed (the server goes on). The body is read by the server itself, at most
``max_body_bytes`` of it, so no input reaches the model before it is checked.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from lofit.methods.lofit.adapter_io import AdapterError, AdapterMismatchError
from lofit.models.architectures import UnsupportedModelError
from lofit.models.hub import adapter_folder
from lofit.serving.adapters import Adapter, AdapterNameError, AdapterNameTakenError, result_folder
from lofit.serving.engine import Engine, Job, QueueFullError, ShuttingDownError
from lofit.serving.schemas import (
    AdapterLoadRequest,
    ApiError,
    ChatRequest,
    CompletionRequest,
    validation_error,
)

DEFAULT_COMPLETION_TOKENS = 16
"""``max_tokens`` of a completions request that gives none (OpenAI's default)."""


@dataclass
class ServerLimits:
    """What one request may ask for, and how long it may take.

    Attributes:
        max_prompt_tokens: tokens of one prompt (after the chat template).
        max_tokens: ``max_tokens`` of one request (also the chat default).
        max_body_bytes: bytes of one request body.
        max_prompts: prompts in one completions request.
        max_stop: stop strings in one request.
        request_timeout: seconds from arrival to the last token (queue included).
    """

    max_prompt_tokens: int = 2048
    max_tokens: int = 512
    max_body_bytes: int = 1_000_000
    max_prompts: int = 16
    max_stop: int = 4
    request_timeout: float = 120.0


def _error_response(error: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
    if error.status in (429, 503):
        headers = {"Retry-After": "1"}
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def create_app(engine: Engine, limits: ServerLimits, api_key: str | None = None) -> FastAPI:
    """The FastAPI application serving ``engine`` (started and closed with the application)."""
    registry = engine.registry
    context_length = getattr(registry.model.config.get_text_config(), "max_position_embeddings", None)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:  # uvicorn has let every open request finish; the engine finishes its queue
            await asyncio.to_thread(engine.close)

    app = FastAPI(title="lofit serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return _error_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        message = "no such route" if error.status_code == 404 else str(error.detail)
        return _error_response(ApiError(error.status_code, message))

    @app.exception_handler(Exception)
    async def server_error(request: Request, error: Exception) -> JSONResponse:
        return _error_response(ApiError(500, f"internal error: {type(error).__name__}", kind="server_error"))

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "a valid API key is needed: send the header 'Authorization: Bearer <key>'")

    async def read_body(request: Request, schema: type[BaseModel]) -> Any:
        """The body as ``schema``: 413 when too large, 400 when not a JSON object, 422 when its fields are wrong."""
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limits.max_body_bytes):
            if not declared.isdigit():
                raise ApiError(400, "the Content-Length header is not a number")
            raise ApiError(413, f"the body is over {limits.max_body_bytes} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limits.max_body_bytes:
                raise ApiError(413, f"the body is over {limits.max_body_bytes} bytes")
        try:
            value = json.loads(bytes(body))
        except (ValueError, UnicodeDecodeError) as error:
            raise ApiError(400, f"the body is not valid JSON ({error})") from None
        if not isinstance(value, dict):
            raise ApiError(400, f"the body must be a JSON object, not {type(value).__name__}")
        try:
            return schema.model_validate(value)
        except ValidationError as error:
            raise validation_error(error) from None

    def check_tokens(prompt: list[int], max_tokens: int) -> None:
        if not prompt:
            raise ApiError(400, "the prompt is empty: it has no tokens", param="prompt")
        if len(prompt) > limits.max_prompt_tokens:
            raise ApiError(
                413, f"the prompt has {len(prompt)} tokens, over the limit of {limits.max_prompt_tokens}", "prompt"
            )
        if max_tokens > limits.max_tokens:
            raise ApiError(413, f"max_tokens {max_tokens} is over the limit of {limits.max_tokens}", param="max_tokens")
        if context_length and len(prompt) + max_tokens > context_length:
            raise ApiError(
                413,
                f"the prompt's {len(prompt)} tokens plus max_tokens {max_tokens} exceed the model's "
                f"context of {context_length} tokens",
                param="max_tokens",
            )

    def resolve(name: str) -> Adapter:
        try:
            return registry.resolve(name)
        except KeyError:
            raise ApiError(
                404, f"no model or adapter called {name[:100]!r}; GET /v1/models lists them", param="model"
            ) from None

    async def start_jobs(
        prompts: list[list[int]], model: str, max_tokens: int, stop: tuple[str, ...]
    ) -> tuple[list[Job], asyncio.Queue]:
        """Queue one job per prompt, all or none; their events arrive on the returned queue as (index, kind, value)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        deadline = time.monotonic() + limits.request_timeout
        jobs = []
        for index, prompt in enumerate(prompts):

            def on_event(kind: str, value: Any, index: int = index) -> None:
                try:
                    loop.call_soon_threadsafe(events.put_nowait, (index, kind, value))
                except RuntimeError:  # the event loop is closed: nobody is listening any more
                    jobs[index].cancel()

            jobs.append(Job(prompt, resolve(model), max_tokens, stop, deadline, on_event))
        try:
            engine.submit(jobs)
        except (QueueFullError, ShuttingDownError) as error:
            for job in jobs:
                registry.release(job.adapter)
            raise ApiError(429 if isinstance(error, QueueFullError) else 503, str(error), kind="server_busy") from None
        return jobs, events

    async def next_event(request: Request, events: asyncio.Queue, jobs: list[Job]) -> tuple[int, str, Any]:
        """The next event of ``jobs``; the jobs are cancelled when the client goes away or time runs out."""
        while True:
            try:
                return await asyncio.wait_for(events.get(), timeout=0.5)
            except TimeoutError:
                if jobs[0].deadline + 5 < time.monotonic() or await request.is_disconnected():
                    for job in jobs:
                        job.cancel()
                    raise ApiError(504, "the request ran past its timeout") from None

    async def collect(request: Request, jobs: list[Job], events: asyncio.Queue) -> list[tuple[str, str]]:
        """Each job's text and finish reason, once all are done; the first error raised as an ApiError."""
        results: dict[int, tuple[str, str]] = {}
        texts = [""] * len(jobs)
        try:
            while len(results) < len(jobs):
                index, kind, value = await next_event(request, events, jobs)
                if kind == "text":
                    texts[index] += value
                elif kind == "done":
                    results[index] = (texts[index], value)
                else:
                    status, message = value
                    raise ApiError(status, message, kind="server_error" if status == 500 else "timeout")
        finally:
            for job in jobs:
                job.cancel()
        return [results[i] for i in range(len(jobs))]

    def usage(jobs: list[Job]) -> dict:
        prompt_tokens = sum(len(job.prompt) for job in jobs)
        completion_tokens = sum(len(job.tokens) for job in jobs)
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }

    def stream(request: Request, jobs: list[Job], events: asyncio.Queue, chunk) -> StreamingResponse:
        """Server-sent events: ``chunk(index, text, finish_reason)`` per piece, an error event if any, ``[DONE]``."""

        async def lines() -> AsyncIterator[str]:
            done = 0
            try:
                for index in range(len(jobs)):
                    first = chunk(index, None, None)
                    if first is not None:
                        yield f"data: {json.dumps(first)}\n\n"
                while done < len(jobs):
                    try:
                        index, kind, value = await next_event(request, events, jobs)
                    except ApiError as error:
                        yield f"data: {json.dumps(error.body())}\n\n"
                        return
                    if kind == "text":
                        yield f"data: {json.dumps(chunk(index, value, None))}\n\n"
                    elif kind == "done":
                        done += 1
                        yield f"data: {json.dumps(chunk(index, '', value))}\n\n"
                    else:
                        status, message = value
                        yield f"data: {json.dumps(ApiError(status, message, kind='server_error').body())}\n\n"
                        return
                yield "data: [DONE]\n\n"
            finally:  # the client went away, or all is sent
                for job in jobs:
                    job.cancel()

        return StreamingResponse(lines(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "queued": engine.queued, "adapters": len(registry.names()), **asdict(engine.stats)}

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        authorize(request)
        entries = [{"id": registry.base_name, "object": "model", "created": registry.base.created, "owned_by": "lofit"}]
        for adapter in registry.names():
            entries.append(
                {
                    "id": adapter.name,
                    "object": "model",
                    "created": adapter.created,
                    "owned_by": "lofit",
                    "root": registry.base_name,
                    "parent": registry.base_name,
                    "method": adapter.method,
                    "served_as": adapter.kind,
                    "source": adapter.source,
                    **({"exclusive_reason": adapter.exclusive_reason} if adapter.exclusive_reason else {}),
                }
            )
        return {"object": "list", "data": entries}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        authorize(request)
        body: CompletionRequest = await read_body(request, CompletionRequest)
        texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not texts:
            raise ApiError(400, "prompt is an empty list", param="prompt")
        if len(texts) > limits.max_prompts:
            raise ApiError(413, f"{len(texts)} prompts, over the limit of {limits.max_prompts}", param="prompt")
        stop = body.stop_strings(limits.max_stop)
        max_tokens = body.max_tokens or DEFAULT_COMPLETION_TOKENS
        prompts = await asyncio.to_thread(lambda: [engine.encode(text) for text in texts])  # the loop stays free
        for prompt in prompts:
            check_tokens(prompt, max_tokens)
        jobs, events = await start_jobs(prompts, body.model, max_tokens, stop)
        ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(index: int, text: str | None, finish: str | None) -> dict | None:
            if text is None:
                return None
            choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish}
            return {
                "id": ident,
                "object": "text_completion",
                "created": created,
                "model": body.model,
                "choices": [choice],
            }

        if body.stream:
            return stream(request, jobs, events, chunk)
        results = await collect(request, jobs, events)
        choices = [
            {"index": i, "text": text, "logprobs": None, "finish_reason": finish}
            for i, (text, finish) in enumerate(results)
        ]
        return {
            "id": ident,
            "object": "text_completion",
            "created": created,
            "model": body.model,
            "choices": choices,
            "usage": usage(jobs),
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        authorize(request)
        body: ChatRequest = await read_body(request, ChatRequest)
        max_tokens = body.max_tokens or body.max_completion_tokens or limits.max_tokens
        stop = body.stop_strings(limits.max_stop)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            text = await asyncio.to_thread(engine.render_chat, messages)
        except Exception as error:  # no template, or the template refuses these messages (jinja raises)
            raise ApiError(400, f"the chat template cannot render these messages ({error})", param="messages") from None
        prompt = await asyncio.to_thread(engine.encode, text, False)  # the template wrote the special tokens
        check_tokens(prompt, max_tokens)
        jobs, events = await start_jobs([prompt], body.model, max_tokens, stop)
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(index: int, text: str | None, finish: str | None) -> dict:
            delta = {"role": "assistant", "content": ""} if text is None else ({"content": text} if text else {})
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {
                "id": ident,
                "object": "chat.completion.chunk",
                "created": created,
                "model": body.model,
                "choices": [choice],
            }

        if body.stream:
            return stream(request, jobs, events, chunk)
        ((answer, finish),) = await collect(request, jobs, events)
        return {
            "id": ident,
            "object": "chat.completion",
            "created": created,
            "model": body.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": answer},
                    "logprobs": None,
                    "finish_reason": finish,
                }
            ],
            "usage": usage(jobs),
        }

    @app.post("/v1/adapters", status_code=201)
    async def load_adapter(request: Request) -> dict:
        authorize(request)
        body: AdapterLoadRequest = await read_body(request, AdapterLoadRequest)
        if (body.folder is None) == (body.hub_id is None):
            raise ApiError(400, "give exactly one of 'folder' (a subfolder of the adapters folder) and 'hub_id'")
        try:
            registry.check_name(body.name)
        except AdapterNameTakenError as error:
            raise ApiError(409, str(error), param="name") from None
        except AdapterNameError as error:
            raise ApiError(400, str(error), param="name") from None
        if body.folder is not None:
            folder = local_folder(body.folder)
            source = body.folder
        else:
            try:
                folder = await asyncio.to_thread(adapter_folder, body.hub_id, revision=body.revision)
            except FileNotFoundError as error:
                raise ApiError(404, str(error), param="hub_id") from None
            source = body.hub_id
        found = result_folder(folder)
        if found is None:
            raise ApiError(400, f"{source!r} holds no result saved by lofit (nor a run folder's adapter/)")
        try:
            adapter = await asyncio.wrap_future(engine.call(lambda: registry.add(body.name, found, source)))
        except AdapterNameTakenError as error:
            raise ApiError(409, str(error), param="name") from None
        except AdapterMismatchError as error:
            raise ApiError(400, f"refused: the adapter was made for another base model: {error}") from None
        except (AdapterError, UnsupportedModelError, FileNotFoundError, ValueError) as error:
            raise ApiError(400, f"refused: {error}") from None
        except ShuttingDownError as error:
            raise ApiError(503, str(error), kind="server_busy") from None
        reason = {"exclusive_reason": adapter.exclusive_reason} if adapter.exclusive_reason else {}
        return {"id": adapter.name, "object": "model", "method": adapter.method, "served_as": adapter.kind, **reason}

    def local_folder(name: str) -> Path:
        """``name`` inside the adapters folder: 400 when it would lead outside it, 404 when absent."""
        root = registry.adapters_dir
        if root is None:
            raise ApiError(400, "the server was started without --adapters, so it loads no local folders")
        if Path(name).is_absolute():
            raise ApiError(400, "folder must be relative to the adapters folder", param="folder")
        folder = (root / name).resolve()
        if not folder.is_relative_to(root) or folder == root:
            raise ApiError(400, "folder must name a folder inside the adapters folder", param="folder")
        if not folder.is_dir():
            raise ApiError(404, f"no folder {name!r} in the adapters folder", param="folder")
        return folder

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(request: Request, name: str) -> dict:
        authorize(request)
        if registry.is_base(name):
            raise ApiError(400, f"{name!r} is the base model, which cannot be unloaded")
        try:
            registry.remove(name)
        except KeyError:
            raise ApiError(404, f"no adapter called {name[:100]!r} is loaded") from None
        return {"id": name, "object": "model", "deleted": True}

    return app
