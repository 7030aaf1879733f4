"""End of input on a PTY: the ^D reaches programs that set up their terminal after starting."""

import anyio
import pytest

pytestmark = [pytest.mark.anyio, pytest.mark.vm]


@pytest.mark.parametrize("command", ["python3 -i", "bash --norc -i", "cat"])
async def test_close_stdin_right_after_start_ends_an_interactive_program(vm, command):
    proc = await vm.start(command, stdin=True, pty=True, rows=40, cols=120)
    await proc.write("echo $((6*7))\n" if "bash" in command else "print(6 * 7)\n")
    await proc.close_stdin()
    out = b""
    with anyio.fail_after(30):  # before the fix, readline programs waited forever
        async for chunk in proc:
            out += chunk.data
        result = await proc.wait()
    assert result.exit_code == 0, out
    if command != "cat":
        assert b"42" in out


async def test_close_stdin_without_any_input(vm):
    proc = await vm.start("python3 -i", stdin=True, pty=True)
    await proc.close_stdin()
    with anyio.fail_after(30):
        result = await proc.wait()
    assert result.exit_code == 0
