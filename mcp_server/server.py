"""The Gondolin MCP server, built on the same tool registry as every other adapter.

``build_server(config)`` returns a :class:`GondolinMCPServer` (an
:class:`~mcp.server.mcpserver.MCPServer`) whose lifespan owns a
:class:`~integrations.SandboxManager` (so every sandbox is closed when the server stops).
Each registry tool becomes an MCP tool with its input schema, output schema (structured
content), annotations and a text rendering; the registry validates arguments, so a bad one
reads like every other tool error. Long execs report progress, and a client's cancellation, or
its HTTP connection closing mid-call, kills the guest process. Over stateful streamable HTTP
each call acts for its MCP session (:meth:`SandboxManager.acting_as`), see :mod:`.http`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, cast

import anyio
from mcp.server.context import ServerRequestContext
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ResourceError
from mcp.server.mcpserver.tools import Tool
from mcp.server.mcpserver.utilities.func_metadata import ArgModelBase, FuncMetadata
from mcp.server.stdio import stdio_server
from mcp.shared.exceptions import MCPError
from mcp.shared.message import SessionMessage
from mcp.types import (
    INVALID_PARAMS,
    INVALID_REQUEST,
    PARSE_ERROR,
    CallToolResult,
    EmptyResult,
    ErrorData,
    JSONRPCError,
    LoggingLevel,
    LoggingMessageNotification,
    LoggingMessageNotificationParams,
    SetLevelRequestParams,
    TextContent,
    ToolAnnotations,
)
from pydantic import ConfigDict, ValidationError, model_validator

from integrations import OperatorConfig, SandboxManager, ToolError, ToolRegistry
from integrations.tools import ToolOutcome, ToolSpec

log = logging.getLogger("gondolin.mcp")
DISCONNECT_POLL_S = 0.5  # how often a running HTTP tool call checks that its client is still there
LOG_LEVELS: tuple[LoggingLevel, ...] = ("debug", "info", "notice", "warning", "error", "critical", "alert",
                                        "emergency")

SERVER_NAME = "gondolin"
INSTRUCTIONS = (
    "Gondolin gives you isolated Linux micro-VM sandboxes. Create one with sandbox_create and pass its "
    "sandbox_id to every other tool. Use exec for commands (a non-zero exit code is a normal result), "
    "read_file/write_file/edit_file/list_files for files (absolute paths; work in /workspace), exec_poll for "
    "commands still running, checkpoint_* to save and restore state, and network_events to see why a network "
    "request was blocked. Secrets are referred to by name only. Destroy sandboxes when you are done; idle "
    "ones are destroyed after their ttl_s."
)


@dataclass
class AppState:
    registry: ToolRegistry


def _registry(ctx: Context) -> ToolRegistry:
    state = cast(AppState, ctx.request_context.lifespan_context)
    return state.registry


def session_of(request: Any) -> str | None:
    """The MCP session id an HTTP request carries (None on stdio)."""
    headers = getattr(request, "headers", None)
    return headers.get("mcp-session-id") if headers is not None else None


class _RawArguments(ArgModelBase):
    """Hands the tool's arguments through untouched: the registry validates them, so a bad
    argument reads like every other tool error (``error [invalid_argument]: ...``)."""

    model_config = ConfigDict(extra="forbid")
    arguments: dict[str, Any]

    @model_validator(mode="before")
    @classmethod
    def _wrap(cls, data: Any) -> Any:
        return {"arguments": data}


class GondolinMCPServer(MCPServer[AppState]):
    """:class:`MCPServer` plus what the protocol asks of a well-behaved server: ``logging/setLevel``
    (declared and honoured per session), a JSON-RPC error for an unknown prompt, a parse-error
    reply to malformed JSON on stdio, and tool calls scoped to their MCP session over HTTP."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.session_scoped = False  # set by the HTTP runner of a stateful server
        self._log_levels: dict[str | None, LoggingLevel] = {}
        self._lowlevel_server.add_request_handler("logging/setLevel", SetLevelRequestParams, self._set_level)

    # -- sessions ----------------------------------------------------------------------------
    def owner(self, ctx: Context) -> str | None:
        """The session a call acts for: its ``Mcp-Session-Id`` on a stateful HTTP server (the SDK
        admits only ids it issued), else None (stdio, stateless HTTP: one shared scope)."""
        return session_of(ctx.request_context.request) if self.session_scoped else None

    def forget_session(self, session_id: str) -> None:
        self._log_levels.pop(session_id, None)

    # -- logging -----------------------------------------------------------------------------
    async def _set_level(self, ctx: ServerRequestContext[Any, Any], params: SetLevelRequestParams) -> EmptyResult:
        self._log_levels[session_of(ctx.request) if self.session_scoped else None] = params.level
        return EmptyResult()

    async def log_to_client(self, ctx: Context, level: LoggingLevel, message: str) -> None:
        """A ``notifications/message`` for this call, if the client asked for ``level`` or lower
        with ``logging/setLevel`` (nothing is sent before it does)."""
        wanted = self._log_levels.get(self.owner(ctx))
        if wanted is None or LOG_LEVELS.index(level) < LOG_LEVELS.index(wanted):
            return
        note = LoggingMessageNotification(params=LoggingMessageNotificationParams(level=level, data=message,
                                                                                  logger="gondolin"))
        try:
            await ctx.session.send_notification(note, related_request_id=ctx.request_context.request_id)
        except Exception as exc:  # a client that is gone cannot be told; the call's result matters more
            log.debug("could not send a log message: %s", exc)

    # -- prompts -----------------------------------------------------------------------------
    async def get_prompt(self, name: str, arguments: dict[str, Any] | None = None,
                         context: Context[AppState, Any] | None = None) -> Any:
        if self._prompt_manager.get_prompt(name) is None:
            raise MCPError(code=INVALID_PARAMS, message=f"Unknown prompt: {name!r} (prompts/list shows them)")
        return await super().get_prompt(name, arguments, context)

    async def run_streamable_http_async(self, **_kwargs: Any) -> None:
        """Refused: the SDK's plain HTTP server would serve every sandbox to anyone who can
        connect, without a token or sessions."""
        raise NotImplementedError(
            "serve Gondolin over HTTP with `gondolin mcp --transport streamable-http` (bearer token, "
            "sandboxes per session), or mcp_server.http.http_app(server, manager, token=...) under uvicorn")

    async def run_sse_async(self, *_args: Any, **_kwargs: Any) -> None:
        """Refused, as :meth:`run_streamable_http_async` (the legacy SSE transport)."""
        await self.run_streamable_http_async()

    # -- stdio -------------------------------------------------------------------------------
    async def run_stdio_async(self) -> None:
        """As the SDK's, but a line that is not JSON (or not JSON-RPC) gets an error reply
        instead of silence."""
        async with stdio_server() as (read_stream, write_stream):
            send, receive = anyio.create_memory_object_stream[SessionMessage | Exception](0)

            async def screen() -> None:
                async with send:
                    async for item in read_stream:
                        if isinstance(item, Exception):
                            await write_stream.send(SessionMessage(_parse_error(item)))
                        else:
                            await send.send(item)

            async with anyio.create_task_group() as tg:
                tg.start_soon(screen)
                await self._lowlevel_server.run(receive, write_stream,
                                                self._lowlevel_server.create_initialization_options())
                tg.cancel_scope.cancel()


def _parse_error(exc: Exception) -> JSONRPCError:
    not_json = isinstance(exc, ValidationError) and any(e["type"] == "json_invalid" for e in exc.errors())
    if not_json:
        error = ErrorData(code=PARSE_ERROR, message="Parse error: the line is not valid JSON")
    else:
        error = ErrorData(code=INVALID_REQUEST, message="Invalid Request: not a JSON-RPC 2.0 message")
    return JSONRPCError(jsonrpc="2.0", id=None, error=error)


async def _until_disconnected(request: Any, scope: anyio.CancelScope) -> None:
    """Cancel ``scope`` once the HTTP client of ``request`` has gone (its connection closed)."""
    while not await request.is_disconnected():  # noqa: ASYNC110 - Starlette offers only a poll
        await anyio.sleep(DISCONNECT_POLL_S)
    log.info("the HTTP client went away mid-call; cancelling the call")
    scope.cancel()


def _annotations(spec: ToolSpec, egress: bool) -> ToolAnnotations:
    return ToolAnnotations(title=spec.title, read_only_hint=spec.read_only, destructive_hint=spec.destructive,
                           idempotent_hint=spec.idempotent, open_world_hint=spec.open_world and egress)


def _make_tool(spec: ToolSpec, egress: bool) -> Tool:
    name = spec.name

    async def call(ctx: Context, arguments: dict[str, Any]) -> CallToolResult:
        server = cast(GondolinMCPServer, ctx.mcp_server)

        async def progress(done: float, total: float | None, message: str) -> None:
            await ctx.report_progress(done, total, message)

        started = time.monotonic()
        outcome = await _call_while_connected(ctx, name, arguments, progress, server.owner(ctx))
        took = f"{time.monotonic() - started:.2f}s"
        if outcome.is_error:
            await server.log_to_client(ctx, "warning", f"{name} failed after {took}: {outcome.text.splitlines()[0]}")
        else:
            await server.log_to_client(ctx, "debug", f"{name} done in {took}")
        content: list[Any] = [TextContent(type="text", text=outcome.text)]
        if outcome.is_error:
            return CallToolResult(content=content, is_error=True)
        return CallToolResult(content=content, structured_content=outcome.data())

    return Tool(
        fn=call, name=name, title=spec.title, description=spec.description,
        parameters=spec.input_model.model_json_schema(),
        fn_metadata=FuncMetadata(arg_model=_RawArguments, output_model=spec.output_model),
        is_async=True, context_kwarg="ctx", annotations=_annotations(spec, egress),
    )


async def _call_while_connected(ctx: Context, name: str, arguments: dict[str, Any], progress: Any,
                                owner: str | None) -> ToolOutcome:
    """Run the tool; over HTTP, a client whose connection closes mid-call cancels it (as a
    ``notifications/cancelled`` does), which kills a running guest command."""
    registry = _registry(ctx)
    request = ctx.request_context.request
    if request is None or not hasattr(request, "is_disconnected"):
        return await registry.call(name, arguments, progress=progress, owner=owner)
    outcome: ToolOutcome | None = None
    async with anyio.create_task_group() as tg:
        async def run() -> None:
            nonlocal outcome
            outcome = await registry.call(name, arguments, progress=progress, owner=owner)
            tg.cancel_scope.cancel()

        tg.start_soon(_until_disconnected, request, tg.cancel_scope)
        await run()
    if outcome is None:  # the client went away; nobody reads this
        raise MCPError(code=INVALID_REQUEST, message="the client disconnected; the call was cancelled")
    return outcome


def build_server(config: OperatorConfig | None = None, *, manager: SandboxManager | None = None,
                 tools: Iterable[str] | None = None, name: str = SERVER_NAME) -> GondolinMCPServer:
    """An MCP server exposing the Gondolin tools.

    Without ``manager`` the server's lifespan creates one from ``config`` and closes every sandbox
    when the server stops. With ``manager`` (already entered, e.g. shared by tests) the server uses
    it and leaves its lifetime to the caller.
    """
    if manager is not None:
        config = manager.config
    config = config or OperatorConfig()
    tool_names = list(tools) if tools is not None else None
    specs = ToolRegistry(manager or SandboxManager(config, reap=False), tools=tool_names).specs
    egress = any(p.hosts() or p.allowed_internal_hosts or p.tcp_hosts for p in config.profiles().values())

    @asynccontextmanager
    async def lifespan(_server: MCPServer[AppState]) -> AsyncIterator[AppState]:
        if manager is not None:
            yield AppState(ToolRegistry(manager, tools=tool_names))
            return
        async with SandboxManager(config) as owned:
            yield AppState(ToolRegistry(owned, tools=tool_names))

    server = GondolinMCPServer(name, title="Gondolin sandboxes", instructions=INSTRUCTIONS, version=_version(),
                               lifespan=lifespan, tools=[_make_tool(spec, egress) for spec in specs])

    @server.resource("sandbox://{sandbox_id}/info", name="sandbox_info", mime_type="application/json",
                     description="One sandbox's status, limits, network profile and expiry.")
    async def sandbox_info(sandbox_id: str, ctx: Context) -> str:
        registry = _registry(ctx)
        try:
            with registry.manager.acting_as(server.owner(ctx)):
                async with registry.manager.using(sandbox_id) as sandbox:
                    return sandbox.info().model_dump_json()
        except ToolError as exc:
            raise ResourceError(str(exc)) from None

    @server.resource("sandbox://{sandbox_id}/files/{+path}", name="sandbox_file",
                     description="A file inside a sandbox: sandbox://<sandbox_id>/files/<path without the "
                                 "leading slash>, e.g. sandbox://sb_1234/files/workspace/main.py.")
    async def sandbox_file(sandbox_id: str, path: str, ctx: Context) -> str | bytes:
        try:
            data = await _registry(ctx).read_resource(sandbox_id, "/" + path.lstrip("/"), owner=server.owner(ctx))
        except ToolError as exc:
            raise ResourceError(str(exc)) from None
        try:
            return data.decode()
        except UnicodeDecodeError:
            return data

    return server


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gondolin")
    except PackageNotFoundError:
        return "0"
