"""Agent integrations: one framework-free tool registry over a sandbox manager.

    from integrations import SandboxManager, ToolRegistry

    async with SandboxManager() as manager:
        registry = ToolRegistry(manager)
        created = await registry.call("sandbox_create", {})
        result = await registry.call("exec", {"sandbox_id": created.data()["sandbox_id"], "command": "echo hi"})
        print(result.text)

Adapters generated from the same registry: :mod:`integrations.openai_tools`,
:mod:`integrations.anthropic_tools`, :mod:`integrations.langchain_tools` and the MCP server in
:mod:`mcp_server`. Sandbox backends for agent frameworks (optional extras, imported only by
name): :mod:`integrations.deepagents_backend` and :mod:`integrations.openai_agents_sandbox`.
"""

from .config import ConfigError, MountRoot, NetworkProfile, OperatorConfig, SecretSpec, load_config
from .errors import ErrorInfo, ToolError
from .manager import Sandbox, SandboxManager
from .threaded import start_in_thread
from .tools import TOOL_NAMES, TOOLS, ToolOutcome, ToolRegistry, ToolSpec

__all__ = [
    "TOOLS",
    "TOOL_NAMES",
    "ConfigError",
    "ErrorInfo",
    "MountRoot",
    "NetworkProfile",
    "OperatorConfig",
    "Sandbox",
    "SandboxManager",
    "SecretSpec",
    "ToolError",
    "ToolOutcome",
    "ToolRegistry",
    "ToolSpec",
    "load_config",
    "start_in_thread",
]
