"""GuestFS through a real Channel over in-memory streams, against a scripted guest."""

import errno
import time

import anyio
import pytest

from gondolin.errors import GuestFileError, GuestTimeoutError, ProtocolError
from gondolin.fs import DirEntry, FileStat, GuestFS
from gondolin.options import Timeouts
from gondolin.protocol import DATA_CHUNK, DEFAULT_WINDOW, T
from tests.support import BOTH_BACKENDS, fake_machine

pytestmark = [pytest.mark.anyio, BOTH_BACKENDS]
STAT = {"mode": 0o100644, "size": 5, "uid": 0, "gid": 0, "mtime_ns": 1, "ino": 2, "nlink": 1}


async def answered(call, machine, t, answer):
    """Run ``call`` while the guest answers its one request of type ``t`` with ``answer(msg)``."""
    out = []

    async def run():
        try:
            out.append(await call)
        except Exception as exc:  # raised below, outside the task group
            out.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        msg = await machine.guest.expect(t)
        await answer(msg)
    if isinstance(out[0], Exception):
        raise out[0]
    return msg, out[0]


async def test_metadata_calls_send_one_request_and_read_the_answer():
    async with fake_machine() as machine:
        fs = GuestFS(machine)
        fields = {k: STAT.get(k, 0) for k in FileStat.__dataclass_fields__}

        async def stat_answer(msg):
            await machine.guest.send(T.FILE_DONE, msg.id, **fields)

        msg, st = await answered(fs.stat("/etc//hostname", follow_symlinks=False), machine, T.STAT, stat_answer)
        assert msg.p == {"path": "/etc/hostname", "follow": False}
        assert st.size == 5 and st.is_file

        async def listing(msg):
            await machine.guest.send(T.FILE_DONE, msg.id, entries=[["a", "file"], ["d", "dir"]])

        msg, entries = await answered(fs.scandir("/tmp"), machine, T.LISTDIR, listing)
        assert entries == [DirEntry("a", "file"), DirEntry("d", "dir")]

        async def enoent(msg):
            await machine.guest.send(T.ERROR, msg.id, code="ENOENT", errno=errno.ENOENT, message="no such file")

        with pytest.raises(GuestFileError) as err:
            await answered(fs.remove("/tmp/x"), machine, T.REMOVE, enoent)
        assert (err.value.errno, err.value.path) == (errno.ENOENT, "/tmp/x")


async def test_a_call_without_an_answer_fails_at_timeouts_call():
    async with fake_machine(timeouts=Timeouts(call=0.3)) as machine:
        fs = GuestFS(machine)
        for call, t in ((fs.stat("/x"), T.STAT), (fs.mkdir("/x"), T.MKDIR),
                        (fs.rename("/x", "/y"), T.RENAME), (fs.read_bytes("/x"), T.FILE_READ)):
            t0 = time.monotonic()
            with anyio.fail_after(5), pytest.raises(GuestTimeoutError, match="within 0.3s"):
                await call
            assert 0.25 <= time.monotonic() - t0 < 2
            assert (await machine.guest.expect(t)).t == t  # the request did go out


async def test_a_read_streams_within_the_window_and_returns_credit():
    async with fake_machine() as machine:
        fs = GuestFS(machine)
        got = []

        async def read():
            async for chunk in await fs.open_read("/big"):
                got.append(chunk)

        async with anyio.create_task_group() as tg:
            tg.start_soon(read)
            req = await machine.guest.expect(T.FILE_READ)
            assert (req.p["path"], req.p["window"], req.p["chunk"]) == ("/big", DEFAULT_WINDOW, DATA_CHUNK)
            await machine.guest.send(T.FILE_DONE, req.id)
            quarter = DEFAULT_WINDOW // 4
            for _ in range(4):
                await machine.guest.send(T.FILE_DATA, req.id, b"a" * quarter)
            credit = 0
            while credit < DEFAULT_WINDOW:
                credit += (await machine.guest.expect(T.CREDIT)).p["file"]
            assert credit == DEFAULT_WINDOW
            await machine.guest.send(T.FILE_DATA, req.id, b"b" * 10)
            await machine.guest.send(T.FILE_EOF, req.id)
        assert b"".join(got) == b"a" * DEFAULT_WINDOW + b"b" * 10


async def opened(fs, machine, path, *data):
    """``fs.open_read(path)`` after the guest accepted it and sent ``data`` messages."""
    async with anyio.create_task_group() as tg:
        out = []

        async def open_():
            out.append(await fs.open_read(path))

        tg.start_soon(open_)
        req = await machine.guest.expect(T.FILE_READ)
        await machine.guest.send(T.FILE_DONE, req.id)
        for chunk in data:
            await machine.guest.send(T.FILE_DATA, req.id, chunk)
    return out[0]


async def test_read_data_beyond_the_window_is_a_protocol_error():
    async with fake_machine() as machine:
        stream = await opened(GuestFS(machine), machine, "/flood", b"x" * DEFAULT_WINDOW, b"!")
        with pytest.raises(ProtocolError, match="beyond the granted credit"):
            async for _ in stream:
                pass


async def test_a_stalled_read_fails_at_timeouts_call():
    async with fake_machine(timeouts=Timeouts(call=0.3)) as machine:
        chunks = aiter(await opened(GuestFS(machine), machine, "/slow", b"first"))
        assert await anext(chunks) == b"first"
        with anyio.fail_after(5), pytest.raises(GuestTimeoutError, match="data of /slow"):
            await anext(chunks)


async def test_a_write_streams_within_the_credit():
    async with fake_machine() as machine:
        fs = GuestFS(machine)
        data = bytes(range(256)) * (DEFAULT_WINDOW // 256 + 100)  # more than one window

        async def guest():
            req = await machine.guest.expect(T.FILE_WRITE)
            assert req.p == {"path": "/out", "append": True, "parents": False, "mode": 0o600}
            got = b""
            while len(got) < DEFAULT_WINDOW:
                msg = await machine.guest.expect(T.FILE_DATA)
                assert len(msg.data) <= DATA_CHUNK
                got += msg.data
            assert len(got) == DEFAULT_WINDOW  # the host stops at the initial credit
            with anyio.move_on_after(0.2):
                extra = await machine.guest.receive()
                pytest.fail(f"host sent {extra.type_name} without credit")
            await machine.guest.send(T.CREDIT, req.id, file=len(data))
            while (msg := await machine.guest.receive()).t == T.FILE_DATA:
                got += msg.data
            assert msg.t == T.FILE_EOF and got == data
            await machine.guest.send(T.FILE_DONE, req.id, size=len(got))

        async with anyio.create_task_group() as tg:
            tg.start_soon(guest)
            assert await fs.write("/out", data, mode=0o600, append=True) == len(data)


async def test_a_write_without_credit_fails_at_timeouts_call_and_an_early_error_is_raised():
    async with fake_machine(timeouts=Timeouts(call=0.3)) as machine:
        fs = GuestFS(machine)
        with anyio.fail_after(5), pytest.raises(GuestTimeoutError, match="credit"):
            await fs.write("/out", b"x" * (DEFAULT_WINDOW + 1))

        async def refuse(msg):
            await machine.guest.send(T.ERROR, msg.id, code="EACCES", errno=errno.EACCES, message="permission denied")

        await machine.guest.expect(T.FILE_WRITE)
        sent = 0
        while sent < DEFAULT_WINDOW:  # the initial credit, and no more
            sent += len((await machine.guest.expect(T.FILE_DATA)).data)
        assert sent == DEFAULT_WINDOW
        with pytest.raises(GuestFileError) as err:
            await answered(fs.write("/ro", b"x" * (DEFAULT_WINDOW + 1)), machine, T.FILE_WRITE, refuse)
        assert err.value.errno == errno.EACCES


async def test_walk_is_breadth_first_sorted_and_bounded():
    async with fake_machine() as machine:
        fs = GuestFS(machine)
        tree = {"/r": [["b", "dir"], ["a", "file"], [".h", "file"]], "/r/b": [["c", "file"]]}

        async def guest():
            while True:
                msg = await machine.guest.expect(T.LISTDIR)
                await machine.guest.send(T.FILE_DONE, msg.id, entries=tree[msg.p["path"]])

        async with anyio.create_task_group() as tg:
            tg.start_soon(guest)
            walked = [(d, [e.name for e in es]) async for d, es in fs.walk("/r", include_hidden=False)]
            assert walked == [("/r", ["a", "b"]), ("/r/b", ["c"])]
            walked = [(d, [e.name for e in es]) async for d, es in fs.walk("/r", max_entries=2)]
            assert walked == [("/r", [".h", "a"])]
            tg.cancel_scope.cancel()
