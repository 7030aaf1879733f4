import json

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gondolin.qemu.qmp import (
    MAX_LINE,
    ErrorReply,
    Event,
    Greeting,
    QmpClient,
    QmpError,
    QmpParser,
    Reply,
    encode_command,
)
from tests.support import byte_stream_pair

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    "line, expected",
    [
        (b'{"QMP": {"version": {"qemu": {"major": 7}}, "capabilities": []}}', Greeting({"qemu": {"major": 7}})),
        (b'{"return": {}, "id": 3}', Reply(3, {})),
        (b'{"return": {"status": "running", "running": true}}', Reply(None, {"status": "running", "running": True})),
        (b'{"error": {"class": "GenericError", "desc": "no"}, "id": 2}', ErrorReply(2, "GenericError", "no")),
        (b'{"event": "STOP", "data": {}, "timestamp": {"seconds": 1}}', Event("STOP", {})),
        (b'{"event": "MIGRATION", "data": {"status": "completed"}}', Event("MIGRATION", {"status": "completed"})),
        (b'{"return": 1, "id": true}', Reply(None, 1)),  # a bool is not an id
    ],
)
def test_parser_turns_lines_into_typed_messages(line, expected):
    p = QmpParser()
    assert p.feed(line + b"\r\n") == [expected]
    assert p.dropped == 0


@pytest.mark.parametrize("line", [b"not json", b"[1, 2]", b'"text"', b'{"unknown": 1}', b"{\xff}"])
def test_parser_counts_and_drops_junk(line):
    p = QmpParser()
    assert p.feed(line + b"\n" + b'{"return": {}}\n') == [Reply(None, {})]
    assert p.dropped == 1


def test_parser_handles_split_and_joined_lines():
    p = QmpParser()
    data = b'{"return": 1, "id": 1}\n{"event": "RESUME"}\n{"return": 2, "id": 2}\n'
    out = []
    for i in range(len(data)):
        out += p.feed(data[i:i + 1])
    assert out == [Reply(1, 1), Event("RESUME"), Reply(2, 2)]


def test_parser_drops_oversize_lines_without_growing():
    p = QmpParser(max_line=100)
    assert p.feed(b"x" * 150) == []
    assert p.feed(b"y" * 150) == []
    assert len(p._buf) <= 100
    assert p.feed(b'\n{"return": 5}\n') == [Reply(None, 5)]
    assert p.dropped == 1


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=20))
def test_parser_never_raises_on_arbitrary_bytes(chunks):
    p = QmpParser(max_line=256)
    for c in chunks:
        for msg in p.feed(c):
            assert isinstance(msg, (Greeting, Reply, ErrorReply, Event))
        assert len(p._buf) <= 256 + 300


def test_encode_command():
    assert json.loads(encode_command("stop", None, 4)) == {"execute": "stop", "id": 4}
    assert json.loads(encode_command("migrate", {"uri": "exec:cat"}, 5)) == {
        "execute": "migrate", "arguments": {"uri": "exec:cat"}, "id": 5}
    assert encode_command("x", None, 1).endswith(b"\n")


class FakeQemu:
    """A scripted QMP server: answers commands from a table, interleaving events."""

    def __init__(self, answers):
        self.answers = answers  # command -> list of return values (popped in order) or an error dict
        self.seen = []

    async def serve(self, stream):
        async with stream:
            await stream.send(b'{"QMP": {"version": {"qemu": {"major": 7, "minor": 2}}, "capabilities": []}}\r\n')
            buf = b""
            while True:
                try:
                    buf += await stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    return
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    cmd = json.loads(line)
                    self.seen.append((cmd["execute"], cmd.get("arguments")))
                    await stream.send(b'{"event": "NOISE", "data": {}}\r\n')
                    answer = self.answers.get(cmd["execute"], [{}])
                    value = answer.pop(0) if len(answer) > 1 else answer[0]
                    if isinstance(value, dict) and "error" in value:
                        reply = {"error": value["error"], "id": cmd["id"]}
                    else:
                        reply = {"return": value, "id": cmd["id"]}
                    await stream.send(json.dumps(reply).encode() + b"\r\n")


async def with_fake(answers, body):
    host, qemu = byte_stream_pair()
    fake = FakeQemu(answers)
    async with anyio.create_task_group() as tg:
        tg.start_soon(fake.serve, qemu)
        client = await QmpClient.over(host, timeout=5)
        try:
            await body(client)
        finally:
            await client.aclose()
        tg.cancel_scope.cancel()
    return fake


async def test_client_negotiates_and_runs_commands():
    async def body(client):
        assert client.greeting.version["qemu"]["major"] == 7
        assert await client.status() == "paused"
        with pytest.raises(QmpError) as err:
            await client.execute("cont")
        assert err.value.error_class == "GenericError" and "nope" in str(err.value)
        assert [e.name for e in client.take_events("NOISE")] and not client.take_events("NOISE")

    fake = await with_fake({
        "query-status": [{"status": "paused", "running": False}],
        "cont": [{"error": {"class": "GenericError", "desc": "nope"}}],
    }, body)
    assert [s[0] for s in fake.seen] == ["qmp_capabilities", "query-status", "cont"]


async def test_migrate_polls_until_completed():
    async def body(client):
        info = await client.migrate_to("exec:cat > /dev/null", poll=0.001)
        assert info["status"] == "completed"

    fake = await with_fake({
        "query-migrate": [{"status": "setup"}, {"status": "active"}, {"status": "completed", "downtime": 3}],
    }, body)
    names = [s[0] for s in fake.seen]
    assert names[:3] == ["qmp_capabilities", "migrate-set-parameters", "migrate"]
    assert names.count("query-migrate") == 3
    assert fake.seen[2][1] == {"uri": "exec:cat > /dev/null"}


async def test_failed_migration_is_an_error():
    async def body(client):
        with pytest.raises(QmpError) as err:
            await client.migrate_to("exec:false", poll=0.001)
        assert "disk full" in str(err.value)

    await with_fake({"query-migrate": [{"status": "failed", "error-desc": "disk full"}]}, body)


async def test_connect_to_a_missing_socket_times_out_clearly(tmp_path):
    with pytest.raises(QmpError) as err:
        await QmpClient.connect(str(tmp_path / "none.sock"), timeout=0.05)
    assert "did not accept" in str(err.value)


async def test_a_peer_that_never_greets_is_a_clear_error():
    host, _qemu = byte_stream_pair()
    with pytest.raises(QmpError) as err:
        await QmpClient.over(host, timeout=0.05)
    assert "handshake" in str(err.value)


def test_max_line_is_bounded():
    assert MAX_LINE <= 1 << 20
