"""ExecProcess through a real Channel over in-memory streams, against a scripted guest."""

import time

import anyio
import pytest

from gondolin.errors import ExecTimeout, GondolinError, ProtocolError
from gondolin.exec import ExecProcess, OutputChunk
from gondolin.options import Timeouts
from gondolin.protocol import DEFAULT_WINDOW, T
from tests.support import BOTH_BACKENDS, fake_machine

pytestmark = [pytest.mark.anyio, BOTH_BACKENDS]


def process(machine, command="work", *, stdin=None, stdout="buffer", stderr="buffer", window=DEFAULT_WINDOW,
            timeout=None):
    return ExecProcess(machine, {"shell": command}, stdin=stdin, stdout=stdout, stderr=stderr, window=window,
                       timeout=timeout)


async def test_the_result_collects_output_and_exit():
    async with fake_machine() as machine, anyio.create_task_group() as tg:
        proc = process(machine, "echo hi")
        results = []

        async def run():
            results.append(await proc)

        tg.start_soon(run)
        req = await machine.guest.expect(T.EXEC)
        assert req.p == {"shell": "echo hi", "window": DEFAULT_WINDOW, "stdin": False}
        await machine.guest.send(T.EXEC_STARTED, req.id, pid=7)
        await machine.guest.send(T.STDOUT, req.id, b"hi\n")
        await machine.guest.send(T.STDERR, req.id, b"warn")
        await machine.guest.send(T.STDOUT, req.id, b"more")
        await machine.guest.send(T.EXIT, req.id, exit_code=3, signal=None, timed_out=True)
    [r] = results
    assert (r.exit_code, r.signal, r.timed_out, r.ok) == (3, None, True, False)
    assert (r.stdout_bytes, r.stderr_bytes) == (b"hi\nmore", b"warn")
    assert proc.pid == 7


async def test_a_refused_command_is_a_protocol_error_with_the_guest_code():
    async with fake_machine() as machine, anyio.create_task_group() as tg:
        proc = process(machine)
        tg.start_soon(proc.start)
        req = await machine.guest.expect(T.EXEC)
        await machine.guest.send(T.ERROR, req.id, code="no_user", message="no such user: bob")
        with pytest.raises(ProtocolError, match="no such user") as err:
            await proc.wait()
        assert err.value.code == "no_user"


async def test_piped_output_returns_credit_as_it_is_read():
    window = 400
    async with fake_machine() as machine:
        proc = await process(machine, stdout="pipe", window=window).start()
        req = await machine.guest.expect(T.EXEC)
        assert req.p["window"] == window
        for _ in range(4):
            await machine.guest.send(T.STDOUT, req.id, b"x" * (window // 4))
        # the whole window is out: more comes only as the host reads (credit is returned for a
        # chunk when the next one is asked for)
        chunks = aiter(proc)
        for _ in range(4):
            assert await anext(chunks) == OutputChunk("stdout", b"x" * (window // 4))
        for _ in range(3):
            msg = await machine.guest.expect(T.CREDIT)
            assert (msg.id, msg.p) == (req.id, {"stdout": window // 4})
        await machine.guest.send(T.STDOUT, req.id, b"y" * (3 * window // 4))  # the credit returned, in full
        assert (await anext(chunks)).data == b"y" * (3 * window // 4)
        assert (await machine.guest.expect(T.CREDIT)).p == {"stdout": window // 4}
        await machine.guest.send(T.EXIT, req.id, exit_code=0)
        assert [c async for c in chunks] == []
        assert (await proc.wait()).exit_code == 0


async def test_output_beyond_the_window_is_a_protocol_error():
    async with fake_machine() as machine:
        proc = await process(machine, stdout="pipe", window=100).start()
        req = await machine.guest.expect(T.EXEC)
        await machine.guest.send(T.STDOUT, req.id, b"x" * 100)
        await machine.guest.send(T.STDOUT, req.id, b"!")
        with anyio.fail_after(5), pytest.raises(ProtocolError, match="beyond the granted credit"):
            async for _ in proc:
                pass


async def test_stdin_is_sent_within_the_guest_credit_then_closed():
    async with fake_machine() as machine, anyio.create_task_group() as tg:
        proc = await process(machine, "cat", stdin=True).start()
        req = await machine.guest.expect(T.EXEC)
        assert req.p["stdin"] is True
        tg.start_soon(proc.write, b"0123456789")
        await anyio.wait_all_tasks_blocked()  # no credit yet: nothing may be sent
        await machine.guest.send(T.EXEC_STARTED, req.id, pid=9, stdin_window=4)
        first = await machine.guest.expect(T.STDIN)
        assert first.data == b"0123"
        await machine.guest.send(T.CREDIT, req.id, stdin=100)
        assert (await machine.guest.expect(T.STDIN)).data == b"456789"
        await proc.close_stdin()
        assert (await machine.guest.expect(T.STDIN_EOF)).id == req.id
        with pytest.raises(GondolinError, match="already closed"):
            await proc.write(b"late")
        await machine.guest.send(T.EXIT, req.id, exit_code=0)
        assert (await proc.wait()).exit_code == 0


async def test_a_stdin_source_is_fed_and_closed_by_a_background_task():
    async with fake_machine() as machine:
        proc = await process(machine, "cat", stdin=[b"ab", b"cd"]).start()
        req = await machine.guest.expect(T.EXEC)
        await machine.guest.send(T.EXEC_STARTED, req.id, stdin_window=1024)
        got = b""
        while (msg := await machine.guest.receive()).t == T.STDIN:
            got += msg.data
        assert (got, msg.t) == (b"abcd", T.STDIN_EOF)
        await machine.guest.send(T.EXIT, req.id, exit_code=0)
        await proc.wait()


async def test_a_process_without_stdin_refuses_writes():
    async with fake_machine() as machine:
        proc = await process(machine).start()
        with pytest.raises(GondolinError, match="without stdin"):
            await proc.write(b"x")


async def test_a_guest_that_never_reports_the_end_fails_at_timeout_plus_grace():
    timeouts = Timeouts(grace=0.3)
    async with fake_machine(timeouts=timeouts) as machine:
        proc = process(machine, "sleep 100", timeout=0.2)
        t0 = time.monotonic()
        await proc.start()
        req = await machine.guest.expect(T.EXEC)
        await machine.guest.send(T.EXEC_STARTED, req.id, pid=5)
        with anyio.fail_after(5), pytest.raises(ExecTimeout, match="plus 0.3s"):
            await proc.wait()
        elapsed = time.monotonic() - t0
        assert 0.2 + 0.3 - 0.05 <= elapsed < 2.0, elapsed


async def test_a_guest_that_reports_the_kill_within_the_grace_gives_a_result():
    async with fake_machine(timeouts=Timeouts(grace=2.0)) as machine, anyio.create_task_group() as tg:
        proc = process(machine, "sleep 100", timeout=0.1)
        results = []

        async def run():
            results.append(await proc)

        tg.start_soon(run)
        req = await machine.guest.expect(T.EXEC)
        await anyio.sleep(0.3)  # past the command's timeout, within the grace
        await machine.guest.send(T.EXIT, req.id, exit_code=137, signal=9, timed_out=True)
    assert results[0].timed_out and results[0].exit_code == 137


async def test_a_wait_timeout_leaves_the_process_running():
    async with fake_machine() as machine:
        proc = await process(machine).start()
        req = await machine.guest.expect(T.EXEC)
        with pytest.raises(ExecTimeout, match="still running"):
            await proc.wait(timeout=0.1)
        await machine.guest.send(T.EXIT, req.id, exit_code=0)
        assert (await proc.wait(timeout=5)).exit_code == 0


async def test_signal_and_resize_reach_the_guest():
    async with fake_machine() as machine:
        proc = await process(machine).start()
        req = await machine.guest.expect(T.EXEC)
        await proc.resize(50, 132)
        assert (await machine.guest.expect(T.RESIZE)).p == {"rows": 50, "cols": 132}
        await proc.kill()
        sig = await machine.guest.expect(T.SIGNAL)
        assert (sig.id, sig.p) == (req.id, {"signal": 9})


async def test_a_dead_channel_fails_the_waiting_process():
    async with fake_machine() as machine:
        proc = await process(machine).start()
        await machine.guest.expect(T.EXEC)
        await machine.guest.stream.send_eof()
        with anyio.fail_after(5), pytest.raises(GondolinError, match="stopped unexpectedly") as err:
            await proc.wait()
        assert "fake console line" in str(err.value)
