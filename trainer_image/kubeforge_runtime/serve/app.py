"""The OpenAI-compatible HTTP API (FastAPI), plus probes and metrics.

Routes:

* ``POST /v1/completions``, ``POST /v1/chat/completions`` - with ``stream: true`` the body is
  server-sent events (``data: {chunk}`` lines, then ``data: [DONE]``), as the ``openai``
  client expects; ``usage`` is in every non-streaming answer and, with
  ``stream_options.include_usage``, in a last chunk.
* ``GET /v1/models`` - the base model and each adapter (``parent`` names the base;
  ``lineage_digest`` is the ``digest`` of the model directory's ``kubeforge.json``, null
  without one; OpenAI clients ignore the extra fields). Completions of a model with a lineage
  record carry it in the ``X-KubeForge-Lineage-Digest`` response header too.
* ``GET /health`` - liveness: 200 while the process serves HTTP, also while loading;
  503 once loading has failed (the process then exits) or a generation loop has died.
* ``GET /ready`` - readiness: 200 only when every model is loaded and warmed up.
* ``GET /metrics`` - Prometheus, vLLM names.

Errors use OpenAI's envelope ``{"error": {"message", "type", "param", "code"}}``: 400 for a
malformed request (the message names the field), 401 for a missing or wrong API key, 404 for
an unknown model, 413 for a body over ``engine.maxRequestBodyBytes`` (refused before it is
read, see ``limits.py``), 429 with ``Retry-After`` when the waiting room is full, 503 while loading,
504 past the request deadline; a 500 (and a failed load, on ``/health`` and ``/ready``)
answers a generic message only, the detail goes to the server log (exception text may name
paths, hosts or request data, and the probes need no key). When ``KUBEFORGE_API_KEY`` is set, ``/v1/*`` requires
``Authorization: Bearer <key>``; the probes and ``/metrics`` never do (kubelet and Prometheus
do not carry it).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from . import protocol as p
from .limits import BodySizeLimit
from .metrics import CONTENT_TYPE_LATEST
from .service import Delta, Overloaded, SamplingParams, ServeError, ServingRuntime, Ticket

log = logging.getLogger(__name__)

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error",
                429: "rate_limit_error", 503: "service_unavailable", 504: "timeout_error", 500: "server_error"}


def _error(status: int, message: str, headers: dict[str, str] | None = None, param: str | None = None) -> JSONResponse:
    return JSONResponse(p.error_body(message, _ERROR_TYPES.get(status, "server_error"), param, status), status, headers=headers)


LOAD_FAILED_MESSAGE = "model failed to load; the reason is in the server log and the pod's termination message"
INTERNAL_ERROR_MESSAGE = "internal error; the reason is in the server log"
LINEAGE_HEADER = "X-KubeForge-Lineage-Digest"
"""Response header naming the served model's lineage digest (``kubeforge audit`` shows it)."""


def _public_message(exc: BaseException, status: int) -> str:
    """What a client may see of ``exc``: its text, except for internal errors (500), whose
    detail is logged here instead."""
    if status != 500:
        return str(exc)
    log.error("request failed with 500: %s: %s", type(exc).__name__, exc)
    return INTERNAL_ERROR_MESSAGE


def _serve_error(exc: ServeError) -> JSONResponse:
    headers = None
    if isinstance(exc, Overloaded):
        headers = {"Retry-After": str(exc.retry_after)}
    elif exc.http_status == 503:
        headers = {"Retry-After": "5"}
    return _error(exc.http_status, _public_message(exc, exc.http_status), headers)


def create_app(runtime: ServingRuntime, api_key: str | None = None, lifespan: Any = None) -> FastAPI:
    """Build the FastAPI app around a runtime (loaded or still loading)."""
    app = FastAPI(title="KubeForge serving", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.runtime = runtime
    app.add_middleware(BodySizeLimit, max_bytes=runtime.config.engine.max_request_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = p.describe_errors(list(exc.errors()))
        return _error(400, message, param=param)

    @app.exception_handler(ServeError)
    async def _serve(_: Request, exc: ServeError) -> JSONResponse:
        return _serve_error(exc)

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        # Starlette logs the traceback after this response: the client gets no exception text.
        return _error(500, INTERNAL_ERROR_MESSAGE)

    async def authorize(request: Request) -> None:
        if not api_key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise _Unauthorized()

    @app.exception_handler(_Unauthorized)
    async def _unauth(_: Request, __: Exception) -> JSONResponse:
        return _error(401, "missing or invalid API key: send 'Authorization: Bearer <key>'", {"WWW-Authenticate": "Bearer"})

    # -- probes and metrics ----------------------------------------------------------------
    @app.get("/health")
    async def health() -> Response:
        if runtime.load_error:  # logged by the loader; never echoed to unauthenticated probes
            return _error(503, LOAD_FAILED_MESSAGE)
        dead = runtime.dead_engines()
        if dead:  # a crashed generation loop never recovers in-process: let kubelet restart us
            return _error(503, f"generation loop stopped for: {', '.join(dead)}")
        return JSONResponse({"status": "ok"})

    @app.get("/ready")
    async def ready() -> Response:
        dead = runtime.dead_engines()
        if dead:
            return _error(503, f"generation loop stopped for: {', '.join(dead)}")
        if runtime.ready.is_set():
            return JSONResponse(
                {
                    "status": "ready",
                    "engine": runtime.backend,
                    "engineReason": runtime.backend_reason,
                    "models": list(runtime.models),
                    "maxModelLength": runtime.max_model_length,
                    "kvCache": {name: m.engine.kv_cache_info() for name, m in runtime.models.items()},
                    # Weight bytes each model adds: the base its own, an adapter only its LoRA matrices.
                    "weightBytes": runtime.weight_bytes,
                }
            )
        reason = LOAD_FAILED_MESSAGE if runtime.load_error else "loading"
        return _error(503, reason, {"Retry-After": "5"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(runtime.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    # -- OpenAI API ------------------------------------------------------------------------
    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def list_models() -> dict[str, Any]:
        if not runtime.ready.is_set():
            runtime.model("")  # raises NotReady
        data = [
            {
                "id": name,
                "object": "model",
                "created": int(runtime.started_at),
                "owned_by": "kubeforge",
                "root": name,
                "parent": served.parent,
                "max_model_len": runtime.max_model_length,
                "engine": served.engine.name,
                "lineage_digest": served.lineage_digest,
            }
            for name, served in runtime.models.items()
        ]
        return {"object": "list", "data": data}

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(body: p.CompletionRequest, request: Request) -> Response:
        runtime.model(body.model)
        runtime.check_choices(body.n * len(body.prompts()))  # before any tokenizing
        for x in body.prompts():  # every cheap check before the first tokenizing
            if isinstance(x, str):
                runtime.check_prompt_chars(len(x))
        prompts = [await runtime.tokenize(x) if isinstance(x, str) else list(x) for x in body.prompts()]
        jobs = [ids for ids in prompts for _ in range(body.n)]
        rid, created = p.new_id("cmpl"), p.now()

        def chunk(index: int, d: Delta) -> dict[str, Any]:
            choice = {"index": index, "text": d.text, "logprobs": None, "finish_reason": d.finish_reason}
            return p.completion_body(rid, body.model, created, [choice], None)

        def final(results: list[Delta]) -> dict[str, Any]:
            choices = [{"index": i, "text": d.text, "logprobs": None, "finish_reason": d.finish_reason} for i, d in enumerate(results)]
            return p.completion_body(rid, body.model, created, choices, _usage(results, prompts, body.n))

        def usage_chunk(use: dict[str, int]) -> dict[str, Any]:
            return p.completion_body(rid, body.model, created, [], use)

        return await _run(runtime, request, body, jobs, chunk, final, usage_chunk, lambda: None)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat(body: p.ChatCompletionRequest, request: Request) -> Response:
        runtime.model(body.model)
        runtime.check_choices(body.n)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        ids = await runtime.tokenize_chat(messages)
        jobs = [ids for _ in range(body.n)]
        rid, created = p.new_id("chatcmpl"), p.now()

        def chunk(index: int, d: Delta) -> dict[str, Any]:
            delta = {"content": d.text} if d.text else {}
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": d.finish_reason}
            return p.chat_body(rid, body.model, created, [choice], None, chunk=True)

        def first() -> list[dict[str, Any]]:
            # OpenAI sends the role alone in the first chunk of every choice.
            return [
                p.chat_body(rid, body.model, created,
                            [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}],
                            None, chunk=True)
                for i in range(len(jobs))
            ]

        def final(results: list[Delta]) -> dict[str, Any]:
            choices = [
                {"index": i, "message": {"role": "assistant", "content": d.text}, "logprobs": None, "finish_reason": d.finish_reason}
                for i, d in enumerate(results)
            ]
            return p.chat_body(rid, body.model, created, choices, _usage(results, [ids], body.n))

        def usage_chunk(use: dict[str, int]) -> dict[str, Any]:
            return p.chat_body(rid, body.model, created, [], use, chunk=True)

        return await _run(runtime, request, body, jobs, chunk, final, usage_chunk, first)

    return app


class _Unauthorized(Exception):
    pass


def _usage(results: list[Delta], prompts: list[list[int]], n: int) -> dict[str, int]:
    # Each distinct prompt counts once, as OpenAI does for n > 1.
    return p.usage(sum(len(x) for x in prompts), sum(d.completion_tokens for d in results))


def _params(body: p.SamplingFields, max_tokens: int | None) -> SamplingParams:
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k or 0,
        stop=body.stop_list(),
        seed=body.seed,
        ignore_eos=body.ignore_eos,
    )


async def _run(
    runtime: ServingRuntime,
    request: Request,
    body: p.CompletionRequest | p.ChatCompletionRequest,
    jobs: list[list[int]],
    chunk: Callable[[int, Delta], dict[str, Any]],
    final: Callable[[list[Delta]], dict[str, Any]],
    usage_chunk: Callable[[dict[str, int]], dict[str, Any]],
    first: Callable[[], Any],
) -> Response:
    """Admit every choice, then stream or collect them; one code path for both endpoints."""
    limit = body.limit() if isinstance(body, p.ChatCompletionRequest) else body.max_tokens
    for ids in jobs:  # validate lengths before taking any slot, so a bad request costs nothing
        runtime.clamp(ids, limit)
    tickets = await runtime.admit(body.model, len(jobs))  # every choice's slot together, or none
    params = _params(body, limit)
    digest = runtime.models[body.model].lineage_digest
    lineage_header = {LINEAGE_HEADER: digest} if digest else {}
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = _sse(runtime, request, tickets, jobs, params, chunk, usage_chunk, first, include_usage)
        # If the client is gone before the body is ever iterated, the generator never runs
        # its cleanup; releasing on garbage collection keeps those slots from leaking.
        weakref.finalize(events, _release_all, runtime, tickets)
        return StreamingResponse(
            events,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **lineage_header},
        )
    collected = [_collect(runtime, t, ids, params) for t, ids in zip(tickets, jobs)]
    results = await _until_disconnect(request, asyncio.gather(*collected))
    if results is None:  # the client left; the generations were cancelled
        return Response(status_code=499)
    return JSONResponse(final(results), headers=lineage_header)


def _release_all(runtime: ServingRuntime, tickets: list[Ticket]) -> None:
    for t in tickets:
        runtime.release(t)


async def _collect(runtime: ServingRuntime, ticket: Ticket, ids: list[int], params: SamplingParams) -> Delta:
    text: list[str] = []
    last = Delta("")
    try:
        async for d in runtime.generate(ticket, ids, params):
            text.append(d.text)
            last = d
    finally:
        runtime.release(ticket)  # in case we were cancelled before generate() started
    return Delta("".join(text), last.finish_reason, last.prompt_tokens, last.completion_tokens)


async def _until_disconnect(request: Request, work: Awaitable[Any]) -> Any:
    """Await ``work``, cancelling it (and returning None) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                return task.result()
            if await request.is_disconnected():
                log.info("client disconnected; cancelling its request")
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                return None
    except BaseException:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise


async def _sse(
    runtime: ServingRuntime,
    request: Request,
    tickets: list[Ticket],
    jobs: list[list[int]],
    params: SamplingParams,
    chunk: Callable[[int, Delta], dict[str, Any]],
    usage_chunk: Callable[[dict[str, int]], dict[str, Any]],
    first: Callable[[], Any],
    include_usage: bool,
) -> AsyncIterator[str]:
    """Server-sent events for all choices, merged; cancels everything if the client leaves."""
    out: asyncio.Queue[tuple[int, Delta | BaseException | None]] = asyncio.Queue()

    async def produce(index: int, ticket: Ticket, ids: list[int]) -> None:
        try:
            async for d in runtime.generate(ticket, ids, params):
                out.put_nowait((index, d))
            out.put_nowait((index, None))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # reported in-band: the 200 header is already sent
            out.put_nowait((index, exc))
        finally:
            runtime.release(ticket)  # in case we were cancelled before generate() started

    tasks = [asyncio.create_task(produce(i, t, ids)) for i, (t, ids) in enumerate(zip(tickets, jobs))]
    open_choices = len(tasks)
    prompt_tokens = sum(len(ids) for ids in {tuple(j) for j in jobs})
    completion_tokens = 0
    try:
        for c in first() or []:
            yield _event(c)
        while open_choices:
            try:
                index, item = await asyncio.wait_for(out.get(), 0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    log.info("streaming client disconnected; cancelling its request")
                    return
                continue
            if item is None:
                open_choices -= 1
            elif isinstance(item, BaseException):
                status = item.http_status if isinstance(item, ServeError) else 500
                yield _event(p.error_body(_public_message(item, status), _ERROR_TYPES.get(status, "server_error"), None, status))
                return
            else:
                if item.finish_reason:
                    completion_tokens += item.completion_tokens
                yield _event(chunk(index, item))
        if include_usage:
            yield _event(usage_chunk(p.usage(prompt_tokens, completion_tokens)))
        yield "data: [DONE]\n\n"
    finally:
        for t in tasks:
            t.cancel()  # runs generate()'s cleanup: engine cancel + slot release
        await asyncio.gather(*tasks, return_exceptions=True)


def _event(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"
