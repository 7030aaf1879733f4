"""MCP server for Gondolin sandboxes: ``gondolin mcp`` / ``gondolin-mcp`` (stdio or streamable HTTP)."""

from .server import AppState, build_server

__all__ = ["AppState", "build_server"]
