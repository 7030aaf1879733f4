"""The MCP server over fake VMs: tool listing, annotations, schemas, errors, transports, CLI flags."""

import httpx2
import jsonschema
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from integrations import OperatorConfig, SandboxManager
from integrations.tools import TOOLS
from mcp_server import build_server
from mcp_server.__main__ import build_parser, config_from_args

from .fakes import FakeBackend

pytestmark = pytest.mark.anyio


@pytest.fixture
async def manager():
    async with SandboxManager(backend=FakeBackend(), reap=False) as mgr:
        yield mgr


@pytest.fixture(params=["auto", "legacy"])
async def client(request, manager):
    async with Client(build_server(manager=manager), mode=request.param) as c:
        yield c


async def test_every_tool_is_listed_with_annotations_and_schemas(client):
    tools = {t.name: t for t in (await client.list_tools()).tools}
    assert list(tools) == [spec.name for spec in TOOLS]
    for spec in TOOLS:
        tool = tools[spec.name]
        a = tool.annotations
        assert (a.read_only_hint, a.destructive_hint, a.idempotent_hint, a.open_world_hint) == (
            spec.read_only, spec.destructive, spec.idempotent, False)
        assert a.title == spec.title and tool.description == tool.description.strip()
        assert tool.output_schema and tool.output_schema["type"] == "object"
        assert tool.input_schema["properties"].keys() == spec.input_model.model_fields.keys()


async def test_structured_content_matches_the_output_schema(client):
    tools = {t.name: t for t in (await client.list_tools()).tools}
    created = await client.call_tool("sandbox_create", {"name": "t1"})
    assert created.is_error is False
    jsonschema.validate(created.structured_content, tools["sandbox_create"].output_schema)
    listed = await client.call_tool("sandbox_list", {})
    jsonschema.validate(listed.structured_content, tools["sandbox_list"].output_schema)
    assert listed.structured_content["sandboxes"][0]["name"] == "t1"
    gone = await client.call_tool("sandbox_destroy", {"sandbox_id": created.structured_content["sandbox_id"]})
    assert gone.structured_content == {"sandbox_id": created.structured_content["sandbox_id"], "destroyed": True}


@pytest.mark.parametrize(
    ("name", "arguments", "needle"),
    [
        ("exec", {"sandbox_id": "sb_nope", "command": "ls"}, "error [sandbox_not_found]"),
        ("exec", {"sandbox_id": "sb_nope"}, "command"),
        ("read_file", {"sandbox_id": "sb_nope", "path": "relative"}, "must be absolute"),
        ("sandbox_create", {"network": "internet"}, "error [not_allowed]"),
        ("checkpoint_restore", {"checkpoint_id": "cp_x"}, "error [checkpoint_not_found]"),
    ],
)
async def test_bad_inputs_are_tool_errors(client, name, arguments, needle):
    result = await client.call_tool(name, arguments)
    assert result.is_error is True
    assert needle in result.content[0].text


async def test_resource_templates(client):
    templates = {t.uri_template for t in (await client.list_resource_templates()).resource_templates}
    assert templates == {"sandbox://{sandbox_id}/files/{+path}", "sandbox://{sandbox_id}/info"}


async def test_streamable_http_in_process(manager):
    server = build_server(manager=manager)
    app = server.streamable_http_app(stateless_http=True, json_response=True, host="127.0.0.1")
    async with server.session_manager.run():
        async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://127.0.0.1:8000") as hc:
            async with Client(streamable_http_client("http://127.0.0.1:8000/mcp", http_client=hc)) as c:
                assert len((await c.list_tools()).tools) == len(TOOLS)
                listed = await c.call_tool("sandbox_list", {})
                assert listed.structured_content["max_sandboxes"] == 4


async def test_server_owns_its_manager_when_none_is_given():
    server = build_server(OperatorConfig(limits={"pool_size": 0}), tools=["sandbox_list", "exec"])  # no spare VM
    async with Client(server) as c:
        assert [t.name for t in (await c.list_tools()).tools] == ["sandbox_list", "exec"]
        assert (await c.call_tool("sandbox_list", {})).is_error is False


def test_cli_flags_build_the_operator_config(tmp_path):
    (tmp_path / "data").mkdir()
    args = build_parser().parse_args([
        "--max-sandboxes", "2", "--ttl", "120", "--network-profile", "pypi=pypi.org,files.pythonhosted.org",
        "--default-network", "pypi", "--secret", "GH=api.github.com", "--mount-root", f"{tmp_path / 'data'}:cow",
        "--mount-root", str(tmp_path)])
    cfg = config_from_args(args)
    assert cfg.limits.max_sandboxes == 2 and cfg.limits.default_ttl_s == 120
    assert cfg.default_network == "pypi"
    assert cfg.profiles()["pypi"].allowed_hosts == ("pypi.org", "files.pythonhosted.org")
    assert cfg.secrets["GH"].hosts == ("api.github.com",)
    assert [(m.host_path, m.mode) for m in cfg.mounts] == [(str(tmp_path / "data"), "cow"), (str(tmp_path), "ro")]


def test_cli_reads_the_config_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[network.profiles.x]\nallowed_hosts = ["a.com"]\n')
    cfg = config_from_args(build_parser().parse_args(["--config", str(path), "--default-network", "x"]))
    assert cfg.default_network == "x"
