"""LangChain tools generated from the registry (needs ``langchain-core``).

    async with SandboxManager() as manager:
        tools = GondolinToolkit(registry=ToolRegistry(manager)).get_tools()

Each tool is a :class:`~langchain_core.tools.BaseTool` with a native async ``_arun``, the
registry's pydantic ``args_schema`` and ``response_format="content_and_artifact"``: the model
reads the rendered text, application code gets the structured result as the artifact. Tool
errors are raised as :class:`~langchain_core.tools.ToolException` and, with the default
``handle_tool_error=True``, become a ``ToolMessage`` with ``status="error"``.

Bind a sandbox (``GondolinToolkit(registry=..., sandbox_id=...)``) to hide ``sandbox_id``
from the model: the tools then act on that sandbox only.
"""

from __future__ import annotations

from typing import Any, Literal

from langchain_core.callbacks import AsyncCallbackManagerForToolRun, CallbackManagerForToolRun
from langchain_core.tools import BaseTool, BaseToolkit, ToolException
from pydantic import BaseModel, ConfigDict, Field, create_model

from .tools import ToolOutcome, ToolRegistry, ToolSpec

# Tools that make sense for a bound sandbox: they act on one sandbox_id.
_LIFECYCLE = frozenset({"sandbox_create", "sandbox_list", "sandbox_destroy", "checkpoint_restore", "checkpoint_list"})


def _without_sandbox_id(model: type[BaseModel]) -> type[BaseModel]:
    fields: dict[str, Any] = {
        name: (info.annotation, info) for name, info in model.model_fields.items() if name != "sandbox_id"
    }
    return create_model(model.__name__, __config__=ConfigDict(extra="forbid"),  # type: ignore[call-overload,no-any-return]
                        __doc__=model.__doc__, **fields)


class GondolinTool(BaseTool):
    """One registry tool as a LangChain tool."""

    registry: ToolRegistry = Field(exclude=True)
    tool_name: str
    sandbox_id: str | None = None
    response_format: Literal["content", "content_and_artifact"] = "content_and_artifact"
    handle_tool_error: bool = True
    handle_validation_error: bool = True

    model_config = ConfigDict(arbitrary_types_allowed=True)

    @classmethod
    def from_spec(cls, registry: ToolRegistry, spec: ToolSpec, sandbox_id: str | None = None) -> GondolinTool:
        schema = spec.input_model
        if sandbox_id is not None and "sandbox_id" in schema.model_fields:
            schema = _without_sandbox_id(schema)
        return cls(name=spec.name, description=spec.description, args_schema=schema, registry=registry,
                   tool_name=spec.name, sandbox_id=sandbox_id)

    def _arguments(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        args = {k: v.model_dump() if isinstance(v, BaseModel) else v for k, v in kwargs.items()}
        if self.sandbox_id is not None and "sandbox_id" in self.registry.spec(self.tool_name).input_model.model_fields:
            args["sandbox_id"] = self.sandbox_id
        return args

    @staticmethod
    def _result(outcome: ToolOutcome) -> tuple[str, dict[str, Any]]:
        if outcome.is_error:
            raise ToolException(outcome.text)
        return outcome.text, outcome.data()

    def _run(self, run_manager: CallbackManagerForToolRun | None = None, **kwargs: Any) -> tuple[str, dict[str, Any]]:
        return self._result(self.registry.call_sync(self.tool_name, self._arguments(kwargs)))

    async def _arun(self, run_manager: AsyncCallbackManagerForToolRun | None = None,
                    **kwargs: Any) -> tuple[str, dict[str, Any]]:
        return self._result(await self.registry.call(self.tool_name, self._arguments(kwargs)))


class GondolinToolkit(BaseToolkit):
    """All (or some) registry tools as LangChain tools."""

    registry: ToolRegistry = Field(exclude=True)
    sandbox_id: str | None = None
    tools: list[str] | None = None

    model_config = ConfigDict(arbitrary_types_allowed=True)

    def get_tools(self) -> list[BaseTool]:
        chosen = []
        for spec in self.registry.specs:
            if self.tools is not None:
                if spec.name not in self.tools:
                    continue
            elif self.sandbox_id is not None and spec.name in _LIFECYCLE:
                continue
            chosen.append(GondolinTool.from_spec(self.registry, spec, self.sandbox_id))
        return chosen  # type: ignore[return-value]
