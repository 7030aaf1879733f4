import anyio
import pytest

from integrations import (
    TOOL_NAMES,
    OperatorConfig,
    SandboxManager,
    SecretSpec,
    ToolRegistry,
    start_in_thread,
)

from .fakes import FakeBackend

pytestmark = pytest.mark.anyio
SECRET = "very-secret-token-value"


@pytest.fixture
async def registry():
    cfg = OperatorConfig(secrets={"API_TOKEN": SecretSpec(hosts=("api.example.com",))})
    async with SandboxManager(cfg, backend=FakeBackend(), environ={"API_TOKEN": SECRET}, reap=False) as mgr:
        yield ToolRegistry(mgr)


SANDBOX_TOOLS = [name for name in TOOL_NAMES if name not in
                 ("sandbox_create", "sandbox_list", "sandbox_destroy", "checkpoint_restore", "checkpoint_list")]

MINIMAL_ARGS = {
    "exec": {"command": "true"}, "exec_poll": {"exec_id": "ex_1"}, "exec_write": {"exec_id": "ex_1", "stdin": "x"},
    "exec_kill": {"exec_id": "ex_1"}, "read_file": {"path": "/x"}, "write_file": {"path": "/x", "content": ""},
    "edit_file": {"path": "/x", "old_string": "a", "new_string": "b"}, "expose_port": {"port": 8000},
}


@pytest.mark.parametrize("name", SANDBOX_TOOLS)
async def test_unknown_sandbox_is_a_clear_error_for_every_tool(registry, name):
    outcome = await registry.call(name, {"sandbox_id": "sb_nope", **MINIMAL_ARGS.get(name, {})})
    assert outcome.is_error and outcome.error.code == "sandbox_not_found"
    assert "sandbox_list" in outcome.error.hint
    assert outcome.data() == {"error": outcome.error.as_dict()}


@pytest.mark.parametrize(
    ("arguments", "needle"),
    [
        ({"sandbox_id": "sb_1"}, "command: Field required"),
        ({"sandbox_id": "sb_1", "command": "x", "timeout_s": -1}, "timeout_s"),
        ({"sandbox_id": "sb_1", "command": "x", "surprise": 1}, "surprise: Extra inputs"),
        ('{"sandbox_id": ', "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ({"sandbox_id": "sb_1", "command": "x", "env": [{"name": "1BAD", "value": "v"}]}, "env.0.name"),
    ],
)
async def test_invalid_arguments_are_reported_not_raised(registry, arguments, needle):
    outcome = await registry.call("exec", arguments)
    assert outcome.is_error and outcome.error.code == "invalid_argument"
    assert needle in outcome.error.message


async def test_unknown_tool(registry):
    outcome = await registry.call("rm_rf", {})
    assert outcome.is_error and "Available tools" in outcome.error.hint


async def test_secret_values_are_redacted_from_errors(registry):
    outcome = await registry.call("exec", {"sandbox_id": SECRET, "command": "true"})
    assert SECRET not in outcome.text and "[REDACTED:API_TOKEN]" in outcome.text


async def test_lifecycle_through_the_registry(registry):
    created = await registry.call("sandbox_create", {"name": "demo", "ttl_s": 60})
    assert not created.is_error, created.text
    sandbox_id = created.data()["sandbox_id"]
    listed = (await registry.call("sandbox_list", {})).data()
    assert [s["sandbox_id"] for s in listed["sandboxes"]] == [sandbox_id]
    assert listed["secrets"] == ["API_TOKEN"] and "offline" in listed["network_profiles"]
    assert (await registry.call("sandbox_destroy", {"sandbox_id": sandbox_id})).data()["destroyed"] is True
    assert (await registry.call("sandbox_destroy", {"sandbox_id": sandbox_id})).data()["destroyed"] is False


def test_descriptions_name_the_operators_choices():
    cfg = OperatorConfig(secrets={"GH": SecretSpec(hosts=("api.github.com",))})
    spec = ToolRegistry(SandboxManager(cfg), tools=["sandbox_create"]).spec("sandbox_create")
    assert "GH (sent only to api.github.com)" in spec.description and "offline" in spec.description


def test_tool_subsets():
    reg = ToolRegistry(SandboxManager(), tools=["exec", "read_file"])
    assert [s.name for s in reg.specs] == ["exec", "read_file"] and "exec" in reg and "write_file" not in reg
    with pytest.raises(ValueError, match="unknown tools"):
        ToolRegistry(SandboxManager(), tools=["exec", "shell"])


async def test_sync_calls_need_a_portal(registry):
    with pytest.raises(RuntimeError, match="start_in_thread"):
        registry.call_sync("sandbox_list", {})


def test_threaded_registry_serves_sync_and_async_callers():
    backend = FakeBackend()
    with start_in_thread(backend=backend, reap=False) as reg:
        sandbox_id = reg.call_sync("sandbox_create", {}).data()["sandbox_id"]

        async def from_another_loop():
            return await reg.call("sandbox_list", {})

        listed = anyio.run(from_another_loop)
        assert [s["sandbox_id"] for s in listed.data()["sandboxes"]] == [sandbox_id]
    assert backend.booted[0].closed == 1
