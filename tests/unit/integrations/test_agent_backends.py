"""The agent-framework backends' host-side parts, without a VM.

Deep Agents: the host-side paging and editing of :mod:`integrations.deepagents_backend` must
give what ``BaseSandbox``'s own guest scripts give; here those scripts run on this host against
the same files (a differential test). OpenAI Agents SDK: options and session state survive a
JSON round trip through the SDK's registries, and a snapshot's checkpoint reference can only
name a checkpoint of this client's own naming in its own directory.
"""

import io
import json
import subprocess
import uuid
from pathlib import Path

import pytest

pytest.importorskip("deepagents")
pytest.importorskip("agents")

from agents.sandbox import Manifest  # noqa: E402
from agents.sandbox.errors import WorkspaceArchiveWriteError  # noqa: E402
from agents.sandbox.session import BaseSandboxClientOptions, SandboxSessionState  # noqa: E402
from deepagents.backends.protocol import ExecuteResponse, FileDownloadResponse, FileUploadResponse  # noqa: E402
from deepagents.backends.sandbox import MAX_OUTPUT_BYTES, TRUNCATION_MSG, BaseSandbox  # noqa: E402

from integrations.deepagents_backend import page_text, replace_text  # noqa: E402
from integrations.openai_agents_sandbox import (  # noqa: E402
    MAX_UNREAD_OUTPUT,
    REF_MAGIC,
    GondolinSandboxClient,
    GondolinSandboxClientOptions,
    GondolinSandboxSessionState,
)


class HostSandbox(BaseSandbox):
    """BaseSandbox with its guest scripts run by this host's shell (the reference behaviour)."""

    id = "host"

    def execute(self, command, *, timeout=None):
        p = subprocess.run(["sh", "-c", command], capture_output=True, timeout=60)
        return ExecuteResponse(output=(p.stdout + p.stderr).decode(errors="replace"), exit_code=p.returncode)

    def upload_files(self, files):
        for path, data in files:
            Path(path).write_bytes(data)
        return [FileUploadResponse(path=p) for p, _ in files]

    def download_files(self, paths):
        return [FileDownloadResponse(path=p, content=Path(p).read_bytes()) for p in paths]


WINDOWS = [(0, 2000), (1, 2), (0, 0), (-3, 2), (9, 1)]  # (offset, limit), degenerate ones included
CASES = [
    (b"one\ntwo\nthree\n", WINDOWS),
    (b"no trailing newline\nlast", WINDOWS),
    (b"crlf\r\nlines\r\nhere\r\n\n\nblank\n", WINDOWS),
    ("unicode: \u00e9\u4e2d\U0001f600\n".encode() * 5, WINDOWS[:2]),
    (b"\xff\xfe binary \x00\x01", WINDOWS[:1]),
    (b"x" * (MAX_OUTPUT_BYTES + 100) + b"\nsecond\n", [(0, 10), (1, 1)]),  # one line over the page cap
    (b"".join(b"line %d\n" % i for i in range(3000)), [(0, 2000), (2999, 10), (5000, 10)]),
]


@pytest.mark.parametrize(("content", "windows"), CASES, ids=range(len(CASES)))
def test_page_text_matches_the_base_class_read(tmp_path, content, windows):
    path = tmp_path / "f.txt"
    path.write_bytes(content)
    reference = HostSandbox()
    for offset, limit in windows:
        want = reference.read(str(path), offset, limit)
        got = page_text(content, offset, limit)
        if want.error is not None:
            assert got.error is not None and got.error == want.error.removeprefix(f"File '{path}': "), (offset, limit)
            continue
        assert got.error is None, (offset, limit, got.error)
        assert got.file_data == want.file_data, (offset, limit)
        assert (got.start_line, got.end_line, got.next_offset, got.no_lines_requested) == \
               (want.start_line, want.end_line, want.next_offset, want.no_lines_requested), (offset, limit)
        if want.total_lines is not None:
            assert got.total_lines == want.total_lines


def test_page_text_marks_a_truncated_page():
    page = page_text(b"y" * (MAX_OUTPUT_BYTES * 2), 0, 10)
    assert page.file_data["content"].endswith(TRUNCATION_MSG)
    assert len(page.file_data["content"].encode()) <= MAX_OUTPUT_BYTES


EDITS = [
    (b"a b a\n", "a", "c", False),
    (b"a b a\n", "a", "c", True),
    (b"a b\n", "zzz", "c", False),
    (b"one\r\ntwo\r\nthree\r\n", "one\ntwo", "1\n2", False),  # the model saw LF; the file has CRLF
    (b"one\ntwo\n", "one\r\ntwo", "x\r\ny", False),
    (b"tab\tand {braces} and 'quotes'\n", "{braces} and 'quotes'", "{ok}", False),
]


@pytest.mark.parametrize(("content", "old", "new", "replace_all"), EDITS)
def test_replace_text_matches_the_base_class_edit(tmp_path, content, old, new, replace_all):
    path = tmp_path / "e.txt"
    path.write_bytes(content)
    want = HostSandbox().edit(str(path), old, new, replace_all)
    got = replace_text(content.decode(), old, new, replace_all=replace_all)
    if want.error is not None:
        assert isinstance(got, str) and got.format(path=str(path), old=old) == want.error
        return
    text, count = got
    assert count == want.occurrences
    assert text.encode() == path.read_bytes()


def test_client_options_and_session_state_round_trip_as_json(tmp_path):
    opts = BaseSandboxClientOptions.parse(json.loads(json.dumps(
        GondolinSandboxClientOptions(memory="1G", cpus=2, workspace_persistence="tar").model_dump(mode="json"))))
    assert isinstance(opts, GondolinSandboxClientOptions) and (opts.memory, opts.cpus) == ("1G", 2)
    client = GondolinSandboxClient(checkpoint_dir=tmp_path)
    state = GondolinSandboxSessionState(manifest=Manifest(), snapshot={"type": "noop", "id": "s"}, vm_id="abc",
                                        memory=1024, workspace_persistence="tar")
    payload = json.loads(json.dumps(client.serialize_session_state(state)))
    back = client.deserialize_session_state(payload)
    assert isinstance(back, GondolinSandboxSessionState)
    assert (back.vm_id, back.memory, back.workspace_persistence) == ("abc", 1024, "tar")
    assert isinstance(SandboxSessionState.parse(payload), GondolinSandboxSessionState)


@pytest.mark.anyio
async def test_checkpoint_reference_names_only_own_files(tmp_path):
    client = GondolinSandboxClient(checkpoint_dir=tmp_path)
    session = await client.create(manifest=Manifest())  # never started: no VM
    bad = ["../../etc/passwd", "/tmp/x.ckpt", f"openai-agents-{uuid.uuid4().hex}.ckpt/../x", "other.ckpt", 7]
    for name in bad:
        ref = io.BytesIO(REF_MAGIC + json.dumps({"checkpoint": name}).encode())
        with pytest.raises(WorkspaceArchiveWriteError):
            await session.hydrate_workspace(ref)
    with pytest.raises(WorkspaceArchiveWriteError):
        await session.hydrate_workspace(io.BytesIO(REF_MAGIC + b"not json"))
    await client.delete(session)


def test_unread_output_of_an_interactive_command_is_capped():
    from integrations.openai_agents_sandbox import _OutputQueue

    queue = _OutputQueue()
    for i in range(100):
        queue.append(bytes([i % 256]) * (256 * 1024))  # 25 MiB in all
    assert queue.size == sum(map(len, queue)) <= MAX_UNREAD_OUTPUT
    assert queue[-1][0] == 99  # the newest output is kept
    first = queue.popleft()
    queue.appendleft(first[:10])
    assert queue.size == sum(map(len, queue))
