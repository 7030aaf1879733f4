"""LangChain, OpenAI and Anthropic adapters against a real VM.

LangChain: the ``langchain-tests`` standard ``ToolsUnitTests`` and ``ToolsIntegrationTests`` for
every tool, plus a scripted chat model running a tool loop. OpenAI / Anthropic: the official SDK
clients talk to a mock HTTP transport that scripts the model's tool calls; the calls are
dispatched into the VM and the next request must carry the tool results.

The manager runs in its own thread (``start_in_thread``) so the standard tests' synchronous
``invoke`` and asynchronous ``ainvoke`` both reach it.
"""

import json

import anthropic
import httpx2
import openai
import pytest
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_tests.integration_tests import ToolsIntegrationTests
from langchain_tests.unit_tests import ToolsUnitTests

from integrations import TOOLS, OperatorConfig, start_in_thread
from integrations.anthropic_tools import AnthropicDispatcher
from integrations.config import Limits
from integrations.langchain_tools import GondolinTool, GondolinToolkit
from integrations.openai_tools import OpenAIDispatcher

from .conftest import qemu_pids

pytestmark = pytest.mark.vm
STATE: dict = {}


@pytest.fixture(scope="module", autouse=True)
def registry():
    cfg = OperatorConfig(limits=Limits(max_sandboxes=12, default_ttl_s=600))
    before = qemu_pids()
    with start_in_thread(cfg) as reg:
        def ok(name, args):
            outcome = reg.call_sync(name, args)
            assert not outcome.is_error, outcome.text
            return outcome.data()

        sid = ok("sandbox_create", {"name": "adapters"})["sandbox_id"]
        ok("write_file", {"sandbox_id": sid, "path": "/workspace/notes.txt", "content": "alpha\n"})
        cat = ok("exec", {"sandbox_id": sid, "command": "cat", "stdin_open": True, "yield_s": 0})
        done = ok("exec", {"sandbox_id": sid, "command": "echo finished"})
        checkpoint = ok("checkpoint_create", {"sandbox_id": sid})  # full: resumes in well under 1 s
        STATE.update(registry=reg, sid=sid, cat=cat["exec_id"], done=done["exec_id"],
                     checkpoint=checkpoint["checkpoint_id"])
        yield reg
        STATE.clear()
    assert qemu_pids() <= before, "the manager left QEMU processes behind"


def example(name):
    sid = STATE.get("sid", "sb_unset")
    return {
        "sandbox_create": {"name": "lc", "ttl_s": 60},
        "sandbox_list": {},
        "sandbox_destroy": {"sandbox_id": "sb_gone"},
        "exec": {"sandbox_id": sid, "command": "echo hello"},
        "exec_poll": {"sandbox_id": sid, "exec_id": STATE.get("cat"), "wait_s": 0},
        "exec_write": {"sandbox_id": sid, "exec_id": STATE.get("cat"), "stdin": "line\n"},
        "exec_kill": {"sandbox_id": sid, "exec_id": STATE.get("done")},
        "read_file": {"sandbox_id": sid, "path": "/workspace/notes.txt"},
        "write_file": {"sandbox_id": sid, "path": "/workspace/w.txt", "content": "x"},
        "edit_file": {"sandbox_id": sid, "path": "/workspace/notes.txt", "old_string": "alpha", "new_string": "alpha!"},
        "list_files": {"sandbox_id": sid},
        "checkpoint_create": {"sandbox_id": sid},
        "checkpoint_restore": {"checkpoint_id": STATE.get("checkpoint")},
        "checkpoint_list": {},
        "network_events": {"sandbox_id": sid},
        "expose_port": {"sandbox_id": sid, "port": 8000},
    }[name]


def _tool(name):
    return GondolinTool.from_spec(STATE["registry"], STATE["registry"].spec(name))


class _Standard:
    tool_name = ""

    @property
    def tool_constructor(self):
        return _tool(self.tool_name)

    @property
    def tool_invoke_params_example(self):
        return example(self.tool_name)

    @pytest.fixture(autouse=True)
    def _around(self):
        yield
        reg = STATE.get("registry")
        if reg is None:
            return
        for s in reg.call_sync("sandbox_list", {}).data()["sandboxes"]:
            if s["sandbox_id"] != STATE["sid"]:
                reg.call_sync("sandbox_destroy", {"sandbox_id": s["sandbox_id"]})


for _spec in TOOLS:
    _camel = "".join(part.title() for part in _spec.name.split("_"))
    globals()[f"Test{_camel}Unit"] = type(f"Test{_camel}Unit", (_Standard, ToolsUnitTests), {"tool_name": _spec.name})
    globals()[f"Test{_camel}Integration"] = type(
        f"Test{_camel}Integration", (_Standard, ToolsIntegrationTests),
        {"tool_name": _spec.name, "pytestmark": [pytest.mark.anyio]})


# -- LangChain beyond the standard tests -----------------------------------------------------------
@pytest.mark.anyio
async def test_bound_toolkit_hides_the_sandbox_id():
    tools = {t.name: t for t in GondolinToolkit(registry=STATE["registry"], sandbox_id=STATE["sid"]).get_tools()}
    assert "sandbox_create" not in tools and "exec" in tools
    assert "sandbox_id" not in tools["exec"].tool_call_schema.model_json_schema()["properties"]
    msg = await tools["exec"].ainvoke({"type": "tool_call", "id": "c1", "name": "exec",
                                       "args": {"command": "echo bound; exit 4"}})
    assert isinstance(msg, ToolMessage) and msg.status == "success"  # a non-zero exit is a result
    assert msg.artifact["exit_code"] == 4 and msg.artifact["stdout"] == "bound\n" and "exit_code: 4" in msg.content
    bad = await tools["read_file"].ainvoke({"type": "tool_call", "id": "c2", "name": "read_file",
                                            "args": {"path": "/workspace/none"}})
    assert bad.status == "error" and "path_not_found" in bad.content
    invalid = await tools["exec"].ainvoke({"type": "tool_call", "id": "c3", "name": "exec", "args": {"cmd": "ls"}})
    assert invalid.status == "error"


class ScriptedChatModel(GenericFakeChatModel):
    """A chat model that replays scripted messages and accepts tools (for agent loops offline)."""

    def bind_tools(self, tools, **kwargs):
        return self


@pytest.mark.anyio
async def test_scripted_agent_writes_and_runs_a_script():
    sid = STATE["sid"]
    script = "print(sum(range(101)))\n"
    model = ScriptedChatModel(messages=iter([
        AIMessage(content="", tool_calls=[{"id": "t1", "name": "write_file",
                                           "args": {"sandbox_id": sid, "path": "/workspace/sum.py", "content": script}}]),
        AIMessage(content="", tool_calls=[{"id": "t2", "name": "exec",
                                           "args": {"sandbox_id": sid, "command": "python3 /workspace/sum.py"}}]),
        AIMessage(content="The sum is 5050."),
    ]))
    tools = {t.name: t for t in GondolinToolkit(registry=STATE["registry"]).get_tools()}
    bound = model.bind_tools(list(tools.values()))
    messages = [HumanMessage("Sum 0..100 with Python in the sandbox.")]
    for _ in range(5):
        reply = await bound.ainvoke(messages)
        messages.append(reply)
        if not reply.tool_calls:
            break
        for call in reply.tool_calls:
            messages.append(await tools[call["name"]].ainvoke({**call, "type": "tool_call"}))
    tool_messages = [m for m in messages if isinstance(m, ToolMessage)]
    assert [m.status for m in tool_messages] == ["success", "success"]
    assert tool_messages[1].artifact["stdout"] == "5050\n"
    assert messages[-1].content == "The sum is 5050."


# -- OpenAI ----------------------------------------------------------------------------------------
def _chat_completion(message, finish):
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "gpt-test",
            "choices": [{"index": 0, "message": message, "finish_reason": finish}]}


@pytest.mark.anyio
async def test_openai_chat_completions_tool_loop():
    dispatcher = OpenAIDispatcher(STATE["registry"])
    sid = STATE["sid"]
    requests = []

    def handler(request):
        body = json.loads(request.content)
        requests.append(body)
        if len(requests) == 1:
            calls = [{"id": "call_1", "type": "function",
                      "function": {"name": "exec", "arguments": json.dumps(
                          {"sandbox_id": sid, "command": "uname -s", "cwd": None, "env": None, "stdin": None,
                           "stdin_open": None, "user": None, "timeout_s": None, "yield_s": None,
                           "max_output_bytes": None})}},
                     {"id": "call_2", "type": "function",
                      "function": {"name": "read_file", "arguments": json.dumps({"sandbox_id": sid, "path": "rel"})}}]
            return httpx2.Response(200, json=_chat_completion(
                {"role": "assistant", "content": None, "tool_calls": calls}, "tool_calls"))
        return httpx2.Response(200, json=_chat_completion({"role": "assistant", "content": "Linux."}, "stop"))

    client = openai.AsyncOpenAI(api_key="test", base_url="http://mock.local/v1",
                                http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(handler)))
    messages = [{"role": "user", "content": "Which OS runs in the sandbox?"}]
    for _ in range(3):
        response = await client.chat.completions.create(model="gpt-test", messages=messages,
                                                        tools=dispatcher.chat_tools())
        message = response.choices[0].message
        messages.append(message.model_dump(exclude_none=True))
        if not message.tool_calls:
            break
        messages.extend(await dispatcher.chat_tool_messages(message))
    assert requests[0]["tools"] == dispatcher.chat_tools()
    answers = [m for m in requests[1]["messages"] if m["role"] == "tool"]
    assert [a["tool_call_id"] for a in answers] == ["call_1", "call_2"]
    assert "Linux" in answers[0]["content"] and "exit_code: 0" in answers[0]["content"]
    assert answers[1]["content"].startswith("error [invalid_argument]")
    assert messages[-1]["content"] == "Linux."


def test_openai_responses_tool_loop_sync_client():
    dispatcher = OpenAIDispatcher(STATE["registry"])
    sid = STATE["sid"]
    requests = []

    def handler(request):
        body = json.loads(request.content)
        requests.append(body)
        base = {"id": f"resp_{len(requests)}", "object": "response", "created_at": 0, "model": "gpt-test",
                "status": "completed", "parallel_tool_calls": True, "tool_choice": "auto", "tools": []}
        if len(requests) == 1:
            return httpx2.Response(200, json={**base, "output": [{
                "type": "function_call", "id": "fc_1", "call_id": "call_9", "name": "write_file", "status": "completed",
                "arguments": json.dumps({"sandbox_id": sid, "path": "/workspace/r.txt", "content": "from responses",
                                         "encoding": None, "append": None, "mode": None})}]})
        return httpx2.Response(200, json={**base, "output": [{
            "type": "message", "id": "m_1", "role": "assistant", "status": "completed",
            "content": [{"type": "output_text", "text": "Written.", "annotations": []}]}]})

    client = openai.OpenAI(api_key="test", base_url="http://mock.local/v1",
                           http_client=httpx2.Client(transport=httpx2.MockTransport(handler)))
    tools = dispatcher.responses_tools()
    response = client.responses.create(model="gpt-test", input="write a file", tools=tools)
    outputs = []
    for item in response.output:
        if item.type == "function_call":
            call = item.model_dump()
            outcome = STATE["registry"].call_sync(call["name"], call["arguments"])
            outputs.append({"type": "function_call_output", "call_id": call["call_id"], "output": outcome.text})
    final = client.responses.create(model="gpt-test", input=[*[i.model_dump() for i in response.output], *outputs],
                                    tools=tools)
    assert requests[0]["tools"] == tools
    sent = [i for i in requests[1]["input"] if i.get("type") == "function_call_output"]
    assert sent[0]["call_id"] == "call_9" and '"created":true' in sent[0]["output"]
    assert final.output_text == "Written."
    read = STATE["registry"].call_sync("read_file", {"sandbox_id": sid, "path": "/workspace/r.txt"})
    assert read.data()["content"] == "from responses"


# -- Anthropic -------------------------------------------------------------------------------------
@pytest.mark.anyio
async def test_anthropic_tool_use_loop():
    dispatcher = AnthropicDispatcher(STATE["registry"])
    sid = STATE["sid"]
    requests = []

    def message(content, stop):
        return {"id": f"msg_{len(requests)}", "type": "message", "role": "assistant", "model": "claude-test",
                "content": content, "stop_reason": stop, "stop_sequence": None,
                "usage": {"input_tokens": 1, "output_tokens": 1}}

    def handler(request):
        requests.append(json.loads(request.content))
        if len(requests) == 1:
            return httpx2.Response(200, json=message([
                {"type": "text", "text": "Let me check."},
                {"type": "tool_use", "id": "toolu_1", "name": "exec",
                 "input": {"sandbox_id": sid, "command": "python3 -c 'print(6*7)'"}},
                {"type": "tool_use", "id": "toolu_2", "name": "exec", "input": {"sandbox_id": "sb_nope", "command": "ls"}},
            ], "tool_use"))
        return httpx2.Response(200, json=message([{"type": "text", "text": "42"}], "end_turn"))

    client = anthropic.AsyncAnthropic(api_key="test", base_url="http://mock.local",
                                      http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(handler)))
    messages = [{"role": "user", "content": "Compute 6*7 in the sandbox."}]
    while True:
        reply = await client.messages.create(model="claude-test", max_tokens=256, tools=dispatcher.tools(),
                                             messages=messages)
        messages.append({"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in reply.content]})
        if reply.stop_reason != "tool_use":
            break
        messages.append({"role": "user", "content": await dispatcher.tool_results(reply.content)})
    assert requests[0]["tools"] == dispatcher.tools()
    results = requests[1]["messages"][-1]["content"]
    assert [(r["tool_use_id"], r["is_error"]) for r in results] == [("toolu_1", False), ("toolu_2", True)]
    assert "42" in results[0]["content"][0]["text"]
    assert "sandbox_not_found" in results[1]["content"][0]["text"]
    assert messages[-1]["content"][0]["text"] == "42"
