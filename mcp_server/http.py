"""The streamable HTTP transport, with what the SDK leaves to the server: who may connect and
when a session ends.

:class:`HttpGate` wraps the SDK's ASGI app:

- **Authentication.** Every HTTP request must carry ``Authorization: Bearer <token>`` (compared in
  constant time) unless the operator turned authentication off; the token is never logged.
- **Sessions.** A stateful server keys sandbox ownership to the ``Mcp-Session-Id`` the SDK
  issued. A session ends when the client deletes it (HTTP DELETE) or when none of its HTTP
  requests (tool calls, the client's standing GET stream) has been open for ``grace_s`` seconds:
  a client that went away, after a window for reconnecting. Its sandboxes are closed then, and
  its id answers 404 from then on, so a returning client starts a new session.
- **Era.** The session-less 2026 protocol era cannot carry ownership, so a stateful server answers
  it with ``unsupported protocol version`` naming the handshake versions; clients fall back to the
  ``initialize`` handshake (and get a session). ``--stateless`` serves both eras, with no sessions.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import os
import secrets
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
from anyio.abc import TaskGroup
from mcp_types import INVALID_REQUEST, UNSUPPORTED_PROTOCOL_VERSION
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from integrations.config import ConfigError, HttpSettings
from integrations.manager import SandboxManager

from .server import GondolinMCPServer

log = logging.getLogger("gondolin.mcp")
TOKEN_ENV = "GONDOLIN_MCP_TOKEN"
MIN_TOKEN_CHARS = 16
ENDED_SESSIONS_KEPT = 10_000  # ids remembered to answer 404 (bounded: clients can open many sessions)
UNAUTHORIZED = -32001  # a JSON-RPC server error code; the HTTP status (401) is what clients act on
SessionEnd = Callable[[str], Awaitable[None]]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def resolve_token(settings: HttpSettings, environ: Mapping[str, str] | None = None) -> tuple[str | None, bool]:
    """The bearer token and whether it was generated here: from ``settings.token_file``, else
    ``$GONDOLIN_MCP_TOKEN``, else a new random one. ``(None, False)`` when auth is off."""
    if not settings.auth:
        return None, False
    environ = os.environ if environ is None else environ
    if settings.token_file:
        try:
            with open(os.path.expanduser(settings.token_file)) as f:
                token = f.read().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read the token file {settings.token_file}: {exc.strerror}") from None
        source = f"the token file {settings.token_file}"
    elif environ.get(TOKEN_ENV):
        token, source = environ[TOKEN_ENV].strip(), f"${TOKEN_ENV}"
    else:
        return secrets.token_urlsafe(32), True
    if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
        raise ConfigError(f"the token in {source} must be at least {MIN_TOKEN_CHARS} characters without spaces "
                          "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)")
    return token, False


def check_binding(host: str, token: str | None) -> None:
    """Refuse to serve a non-loopback address without authentication."""
    if token is None and not is_loopback(host):
        raise ConfigError(f"refusing to listen on {host} without authentication: anyone who can reach it could "
                          "run code in your sandboxes. Keep authentication on (a token is generated if none is "
                          "set), or listen on 127.0.0.1.")


def _json_error(status: int, code: int, message: str, *, data: Any = None,
                headers: Mapping[str, str] | None = None) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    error: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    body = json.dumps({"jsonrpc": "2.0", "id": None, "error": error}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return status, raw, body


async def _respond(send: Send, response: tuple[int, list[tuple[bytes, bytes]], bytes]) -> None:
    status, headers, body = response
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@dataclass
class _Session:
    open_requests: int = 0
    generation: int = 0  # bumped by every request, so a stale grace timer knows it lost


@dataclass
class HttpGate:
    """ASGI middleware in front of the SDK's streamable HTTP app (see the module docstring).
    Use :meth:`running` around serving: it owns the grace timers."""

    app: ASGIApp
    token: str | None
    grace_s: float
    session_scoped: bool
    on_session_end: SessionEnd
    _sessions: dict[str, _Session] = field(default_factory=dict)
    _ended: OrderedDict[str, None] = field(default_factory=OrderedDict)
    _tg: TaskGroup | None = None
    _closing: bool = False
    _receivers: set[anyio.CancelScope] = field(default_factory=set)  # requests waiting for the client

    @asynccontextmanager
    async def running(self) -> AsyncIterator[HttpGate]:
        async with anyio.create_task_group() as tg:
            self._tg = tg
            try:
                yield self
            finally:
                self._tg = None
                tg.cancel_scope.cancel()

    def close_streams(self) -> None:
        """End every open request as if its client had disconnected (at shutdown: the SSE streams
        clients hold open would otherwise keep the server waiting)."""
        self._closing = True
        for scope in list(self._receivers):
            scope.cancel()

    async def _receive_until_closing(self, receive: Receive) -> Message:
        if self._closing:
            return {"type": "http.disconnect"}
        with anyio.CancelScope() as scope:  # cancelled by close_streams only
            self._receivers.add(scope)
            try:
                return await receive()
            finally:
                self._receivers.discard(scope)
        return {"type": "http.disconnect"}

    @property
    def sessions(self) -> list[str]:
        """Ids of the sessions open now."""
        return list(self._sessions)

    def _authorized(self, headers: Mapping[bytes, bytes]) -> bool:
        if self.token is None:
            return True
        scheme, _, presented = headers.get(b"authorization", b"").partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(presented.strip(), self.token.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan
            await self.app(scope, receive, send)
            return
        state = {"started": False, "complete": False}

        async def until_closing() -> Message:
            return await self._receive_until_closing(receive)

        async def tracking(message: Message) -> None:
            if message["type"] == "http.response.start":
                state["started"] = True
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                state["complete"] = True
            await send(message)

        await self._handle(scope, until_closing, tracking)
        if self._closing and state["started"] and not state["complete"]:
            await send({"type": "http.response.body", "body": b"", "more_body": False})  # a stream cut at shutdown

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        if not self._authorized(headers):
            log.warning("refused an HTTP request without a valid bearer token from %s", scope.get("client"))
            await _respond(send, _json_error(401, UNAUTHORIZED, "missing or wrong bearer token (send "
                                             "'Authorization: Bearer <token>'; the server printed its token at "
                                             "start, or the operator set it)",
                                             headers={"WWW-Authenticate": 'Bearer realm="gondolin-mcp"'}))
            return
        if not self.session_scoped:
            await self.app(scope, receive, send)
            return
        version = headers.get(b"mcp-protocol-version", b"").decode("latin-1")
        if version and version not in HANDSHAKE_PROTOCOL_VERSIONS:
            await _respond(send, _json_error(
                400, UNSUPPORTED_PROTOCOL_VERSION, f"protocol version {version} has no sessions; this server keys "
                "sandboxes to sessions, so use the initialize handshake",
                data={"supported": list(HANDSHAKE_PROTOCOL_VERSIONS), "requested": version}))
            return
        session_id = headers.get(b"mcp-session-id", b"").decode("latin-1") or None
        if session_id is not None and session_id in self._ended:
            await _respond(send, _json_error(404, INVALID_REQUEST, "Session not found (it ended; its sandboxes "
                                             "were closed): start a new session"))
            return
        await self._serve(scope, receive, send, session_id, scope.get("method") == "DELETE")

    async def _serve(self, scope: Scope, receive: Receive, send: Send, session_id: str | None,
                     delete: bool) -> None:
        tracked = session_id if session_id in self._sessions else None
        if tracked is not None:
            self._enter(tracked)
        status = 0

        async def watch(message: Message) -> None:
            nonlocal tracked, status
            if message["type"] == "http.response.start":
                status = message["status"]
                issued = dict(message.get("headers", [])).get(b"mcp-session-id")
                if tracked is None and issued and status < 400:
                    tracked = issued.decode("latin-1")
                    self._sessions.setdefault(tracked, _Session())
                    self._enter(tracked)
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            if tracked is not None:
                if delete and 200 <= status < 300:
                    self._end(tracked)
                else:
                    self._leave(tracked)

    def _enter(self, session_id: str) -> None:
        session = self._sessions[session_id]
        session.open_requests += 1
        session.generation += 1

    def _leave(self, session_id: str) -> None:
        session = self._sessions.get(session_id)
        if session is None:
            return
        session.open_requests -= 1
        if session.open_requests == 0 and self._tg is not None:
            self._tg.start_soon(self._expire, session_id, session.generation)

    async def _expire(self, session_id: str, generation: int) -> None:
        await anyio.sleep(self.grace_s)
        session = self._sessions.get(session_id)
        if session is not None and session.open_requests == 0 and session.generation == generation:
            log.info("MCP session %s ended: no open request for %ss", session_id[:8], self.grace_s)
            self._end(session_id)

    def _end(self, session_id: str) -> None:
        if self._sessions.pop(session_id, None) is None:
            return
        self._ended[session_id] = None
        while len(self._ended) > ENDED_SESSIONS_KEPT:
            self._ended.popitem(last=False)
        if self._tg is not None:
            self._tg.start_soon(self._close, session_id)

    async def _close(self, session_id: str) -> None:
        with anyio.CancelScope(shield=True):
            try:
                await self.on_session_end(session_id)
            except Exception:
                log.exception("closing the sandboxes of MCP session %s failed", session_id[:8])


def http_app(server: GondolinMCPServer, manager: SandboxManager, *, token: str | None, stateless: bool = False,
             host: str = "127.0.0.1") -> HttpGate:
    """The ASGI app serving ``server`` over streamable HTTP at ``/mcp``, behind the gate; run it
    inside ``async with gate.running():``. A stateful server scopes each call to its session and
    closes a session's sandboxes when it ends."""
    grace = manager.config.http.session_grace_s
    server.session_scoped = not stateless
    app = server.streamable_http_app(stateless_http=stateless, host=host,
                                     session_idle_timeout=None if stateless else grace)

    async def session_ended(session_id: str) -> None:
        closed = await manager.close_owner(session_id)
        server.forget_session(session_id)
        if closed:
            log.info("closed %d sandbox(es) of MCP session %s", len(closed), session_id[:8])

    return HttpGate(app, token=token, grace_s=grace, session_scoped=not stateless, on_session_end=session_ended)
