"""MCP server for Gondolin sandboxes: ``gondolin mcp`` / ``gondolin-mcp`` (stdio or streamable HTTP)."""

from .server import AppState, GondolinMCPServer, build_server

__all__ = ["AppState", "GondolinMCPServer", "build_server"]
