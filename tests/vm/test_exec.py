import hashlib
import signal

import anyio
import pytest

from gondolin import ExecTimeout, GondolinError, ProtocolError

from .conftest import both_backends as anyio_backend  # noqa: F401 - these tests run under asyncio and trio
from .conftest import max_rss_mb

pytestmark = [pytest.mark.anyio, pytest.mark.vm]


async def test_exit_codes_are_results(vm):
    for code in (0, 1, 3, 42, 255):
        r = await vm.exec(f"exit {code}")
        assert r.exit_code == code and r.signal is None
        assert r.ok == (code == 0)


async def test_death_by_signal_reports_128_plus_n(vm):
    r = await vm.exec("kill -TERM $$")
    assert (r.exit_code, r.signal) == (128 + signal.SIGTERM, signal.SIGTERM)


async def test_stdout_and_stderr_are_separate(vm):
    r = await vm.exec("echo out1; echo err1 >&2; echo out2; printf 'err2' >&2")
    assert r.stdout == "out1\nout2\n"
    assert r.stderr == "err1\nerr2"
    assert r.stdout_bytes == b"out1\nout2\n"
    assert r.duration > 0


async def test_argv_form_runs_without_a_shell(vm):
    r = await vm.exec(["printf", "%s|", "a b", "$HOME", "*"])
    assert r.stdout == "a b|$HOME|*|"


async def test_missing_binary_exits_127_with_a_message(vm):
    r = await vm.exec(["/no/such/binary", "arg"])
    assert r.exit_code == 127
    assert "/no/such/binary" in r.stderr and "No such file" in r.stderr
    r = await vm.exec("no-such-command-here")
    assert r.exit_code == 127 and "not found" in r.stderr


async def test_env_cwd_and_user(vm):
    r = await vm.exec("echo $FOO:$PWD:$(id -un):$HOME", env={"FOO": "bar baz"}, cwd="/tmp")
    assert r.stdout.strip() == "bar baz:/tmp:root:/root"
    r = await vm.exec(["sh", "-c", "id -u; id -g; echo $HOME; echo $USER"], user="agent")
    assert r.stdout.split() == ["1000", "1000", "/home/agent", "agent"]
    r = await vm.exec("id -un", user=1000)
    assert r.stdout.strip() == "agent"
    r = await vm.exec("touch /etc/forbidden", user="agent")
    assert r.exit_code != 0 and "Permission denied" in r.stderr


async def test_login_environment_is_prepared(vm):
    r = await vm.exec("echo $PATH; echo $LANG")
    path, lang = r.stdout.split()
    assert "/usr/bin" in path and "/usr/local/bin" in path
    assert lang


async def test_bad_cwd_and_unknown_user_are_clear(vm):
    r = await vm.exec("true", cwd="/does/not/exist")
    assert r.exit_code == 127 and "working directory" in r.stderr
    with pytest.raises(ProtocolError, match="no such user"):
        await vm.exec("true", user="nobody-here")
    with pytest.raises(ValueError):
        await vm.exec("true", cwd="relative/path")


async def test_stdin_bytes_and_stream(vm):
    r = await vm.exec("tr a-z A-Z", stdin=b"hello stdin\n")
    assert r.stdout == "HELLO STDIN\n"

    async def chunks():
        for i in range(200):
            yield f"line {i}\n".encode() * 50

    r = await vm.exec("sha256sum", stdin=chunks())
    expected = hashlib.sha256(b"".join(f"line {i}\n".encode() * 50 for i in range(200))).hexdigest()
    assert r.stdout.split()[0] == expected


async def test_interactive_stdin_with_write_and_close(vm):
    proc = await vm.start("while read -r l; do echo got:$l; done; echo bye", stdin=True)
    await proc.write("one\n")
    lines = proc.lines()
    assert await lines.__anext__() == "got:one"
    await proc.write(b"two\n")
    assert await lines.__anext__() == "got:two"
    await proc.close_stdin()
    assert await lines.__anext__() == "bye"
    result = await proc.wait()
    assert result.exit_code == 0


async def test_large_output_streams_with_bounded_memory(vm):
    before = max_rss_mb()
    proc = await vm.start("head -c 100000000 /dev/zero; echo done >&2", stderr="buffer")
    total = 0
    async for chunk in proc:
        assert chunk.stream == "stdout"
        total += len(chunk.data)
    result = await proc.wait()
    assert total == 100_000_000
    assert result.stderr == "done\n"
    assert max_rss_mb() - before < 60, "100 MB of output must not be held in memory"


async def test_buffered_large_output_is_complete(vm):
    r = await vm.exec("head -c 5000000 /dev/urandom | tee /tmp/big | sha256sum >&2; cat /tmp/big")
    assert len(r.stdout_bytes) == 5_000_000
    assert hashlib.sha256(r.stdout_bytes).hexdigest() == r.stderr.split()[0]


async def test_pty_is_a_terminal_and_resize_is_seen(vm):
    r = await vm.exec("tty; stty size", pty=True, rows=33, cols=101)
    out = r.stdout.replace("\r", "").split("\n")
    assert out[0].startswith("/dev/pts/")
    assert out[1] == "33 101"
    proc = await vm.start(["sh", "-c", "read x; stty size"], pty=True, stdin=True, rows=10, cols=20)
    await proc.resize(50, 132)
    await anyio.sleep(0.2)
    await proc.write("go\r")
    seen = b""
    async for chunk in proc:
        seen += chunk.data
    assert b"50 132" in seen
    assert (await proc.wait()).exit_code == 0


async def test_timeout_kills_the_process_group(vm):
    r = await vm.exec("sleep 30.25 & sleep 30.25; echo never", timeout=1)
    assert r.timed_out and r.signal == signal.SIGKILL and r.exit_code == 137
    assert "never" not in r.stdout
    # this test's own sleeps (other tests share the VM): the background one died with the group
    assert (await vm.exec("pgrep -f 'slee[p] 30.25' || true")).stdout.strip() == ""


async def test_host_side_wait_timeout_leaves_process_running(vm):
    proc = await vm.start("sleep 2; echo finished", stdout="buffer")
    with pytest.raises(ExecTimeout):
        await proc.wait(timeout=0.3)
    result = await proc.wait(timeout=30)
    assert result.stdout == "finished\n"


async def test_kill_and_signal(vm):
    proc = await vm.start("trap 'echo got-usr1; exit 5' USR1; echo ready; while :; do sleep 0.05; done")
    lines = proc.lines()
    assert await lines.__anext__() == "ready"
    await proc.signal(signal.SIGUSR1)
    assert await lines.__anext__() == "got-usr1"
    assert (await proc.wait()).exit_code == 5
    proc = await vm.start("sleep 60")
    await anyio.sleep(0.2)
    await proc.kill()
    r = await proc.wait(timeout=20)
    assert r.signal == signal.SIGKILL


async def test_background_child_does_not_hold_exec_open(vm):
    r = await vm.exec("sleep 20 & echo started", timeout=15)
    assert r.stdout == "started\n" and not r.timed_out
    await vm.exec("pkill -x sleep || true")


async def test_twenty_concurrent_execs_keep_their_output_apart(vm):
    results = {}

    async def one(i):
        results[i] = await vm.exec(f"for j in 1 2 3; do echo {i}-$j; sleep 0.0$((RANDOM % 5)); done; echo e{i} >&2")

    async with anyio.create_task_group() as tg:
        for i in range(20):
            tg.start_soon(one, i)
    for i in range(20):
        assert results[i].stdout == f"{i}-1\n{i}-2\n{i}-3\n"
        assert results[i].stderr == f"e{i}\n"


async def test_invalid_arguments_are_refused_on_the_host(vm):
    with pytest.raises(ValueError):
        await vm.exec("")
    with pytest.raises(ValueError):
        await vm.exec([])
    with pytest.raises(ValueError):
        await vm.start("true", stdout="file")
    with pytest.raises(ValueError, match="vm.start"):
        await vm.exec("true", stdout="pipe")
    with pytest.raises(ValueError, match="vm.start"):
        await vm.exec("cat", stdin=True)
    with pytest.raises(ValueError):
        await vm.exec("true", timeout=0)


async def test_write_to_process_without_stdin_is_an_error(vm):
    proc = await vm.start("sleep 0.2")
    with pytest.raises(GondolinError, match="without stdin"):
        await proc.write(b"x")
    await proc.wait()
