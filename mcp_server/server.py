"""The Gondolin MCP server, built on the same tool registry as every other adapter.

``build_server(config)`` returns an :class:`~mcp.server.mcpserver.MCPServer` whose lifespan owns
a :class:`~integrations.SandboxManager` (so every sandbox is closed when the server stops).
Each registry tool becomes an MCP tool with its input schema, output schema (structured
content), annotations and a text rendering; long execs report progress, and a client's
cancellation kills the guest process.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, cast

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ResourceError
from mcp.server.mcpserver.tools import Tool
from mcp.server.mcpserver.utilities.func_metadata import ArgModelBase, FuncMetadata
from mcp.types import CallToolResult, TextContent, ToolAnnotations
from pydantic import create_model

from integrations import OperatorConfig, SandboxManager, ToolError, ToolRegistry
from integrations.tools import ToolSpec

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


def _annotations(spec: ToolSpec, egress: bool) -> ToolAnnotations:
    return ToolAnnotations(title=spec.title, read_only_hint=spec.read_only, destructive_hint=spec.destructive,
                           idempotent_hint=spec.idempotent, open_world_hint=spec.open_world and egress)


def _make_tool(spec: ToolSpec, egress: bool) -> Tool:
    name = spec.name

    async def call(ctx: Context, **arguments: Any) -> CallToolResult:
        async def progress(done: float, total: float | None, message: str) -> None:
            await ctx.report_progress(done, total, message)

        outcome = await _registry(ctx).call(name, arguments, progress=progress)
        content: list[Any] = [TextContent(type="text", text=outcome.text)]
        if outcome.is_error:
            return CallToolResult(content=content, is_error=True)
        return CallToolResult(content=content, structured_content=outcome.data())

    arg_model = cast(type[ArgModelBase],
                     create_model(f"{name}_arguments", __base__=(spec.input_model, ArgModelBase)))
    return Tool(
        fn=call, name=name, title=spec.title, description=spec.description,
        parameters=spec.input_model.model_json_schema(),
        fn_metadata=FuncMetadata(arg_model=arg_model, output_model=spec.output_model),
        is_async=True, context_kwarg="ctx", annotations=_annotations(spec, egress),
    )


def build_server(config: OperatorConfig | None = None, *, manager: SandboxManager | None = None,
                 tools: Iterable[str] | None = None, name: str = SERVER_NAME) -> MCPServer[AppState]:
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

    server: MCPServer[AppState] = MCPServer(
        name, title="Gondolin sandboxes", instructions=INSTRUCTIONS, version=_version(), lifespan=lifespan,
        tools=[_make_tool(spec, egress) for spec in specs],
    )

    @server.resource("sandbox://{sandbox_id}/info", name="sandbox_info", mime_type="application/json",
                     description="One sandbox's status, limits, network profile and expiry.")
    async def sandbox_info(sandbox_id: str, ctx: Context) -> str:
        registry = _registry(ctx)
        try:
            async with registry.manager.using(sandbox_id) as sandbox:
                return sandbox.info().model_dump_json()
        except ToolError as exc:
            raise ResourceError(str(exc)) from None

    @server.resource("sandbox://{sandbox_id}/files/{+path}", name="sandbox_file",
                     description="A file inside a sandbox: sandbox://<sandbox_id>/files/<path without the "
                                 "leading slash>, e.g. sandbox://sb_1234/files/workspace/main.py.")
    async def sandbox_file(sandbox_id: str, path: str, ctx: Context) -> str | bytes:
        try:
            data = await _registry(ctx).read_resource(sandbox_id, "/" + path.lstrip("/"))
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
