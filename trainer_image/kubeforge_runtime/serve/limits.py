"""Limits checked before the work they protect: request body size, and prompt length in characters.

``BodySizeLimit`` is ASGI middleware around the HTTP app (``app.py``). It refuses a body over
``engine.maxRequestBodyBytes`` with 413: at once when ``Content-Length`` says so (nothing is
read; a client that sent ``Expect: 100-continue`` never sends the body), else as soon as the
bytes received pass the limit (chunked uploads), so at most the limit is ever held in
memory. Unlike FastAPI's own body reading it keeps no unbounded buffer, and it reads on the
event loop without blocking it, so probes keep answering during uploads. The rest of a
refused body is discarded by uvicorn as it arrives.

``prompt_char_limit`` bounds a text prompt before it is tokenized: no text longer than
``maxModelLength`` times the longest token of the vocabulary (in characters) can fit, so a
longer one is refused without paying for tokenizing it.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from .protocol import error_body

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class BodySizeLimit:
    """Refuse HTTP request bodies over ``max_bytes`` with 413 before reading them (see the module docstring)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._refuse(send, f"the request body is {declared} bytes")
            return
        # Read the body here, counting, then hand it to the app in one piece.
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                await self._refuse(send, f"the request body is more than {self.max_bytes} bytes")
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(b"".join(chunks), receive), send)

    async def _refuse(self, send: Send, what: str) -> None:
        message = (
            f"{what}; this server accepts at most {self.max_bytes} bytes (engine.maxRequestBodyBytes): "
            "send a shorter prompt or fewer prompts per request, or raise engine.maxRequestBodyBytes"
        )
        body = json.dumps(error_body(message, "invalid_request_error", None, 413)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the HTTP parser refuses these before we are called
    return None


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive() that yields the already-read body once, then the connection's own messages
    (the app polls them to notice a client that disconnects)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def longest_token_chars(tokenizer: Any) -> int:
    """Characters in the longest vocabulary entry: an upper bound on the text one token covers.

    Entries are counted as the tokenizer stores them (byte-level BPE keeps one character per
    byte, SentencePiece marks spaces with one character), which is never shorter than the text
    they decode to. A normalizer that deletes characters could still fit more text per token;
    the bound is meant as a cheap first check, the exact token count follows it.
    """
    return max((len(t) for t in tokenizer.get_vocab()), default=1) or 1


def prompt_char_limit(max_model_length: int, chars_per_token: int) -> int:
    """Characters beyond which a text prompt cannot fit in ``max_model_length`` tokens."""
    return max_model_length * chars_per_token
