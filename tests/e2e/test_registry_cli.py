"""`gondolin list / attach / checkpoint save|list|rm / bash --resume` from a second process, against a
VM owned by a first one."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.vm
GONDOLIN = [str(Path(sys.executable).parent / "gondolin")]
OWNER = textwrap.dedent("""
    import json, sys, anyio
    from gondolin import VM

    async def main():
        async with await VM.create(label=sys.argv[1], network=False) as vm:
            await vm.exec("echo from-owner > /tmp/owner-marker")
            print(json.dumps({"id": vm.id}), flush=True)
            await anyio.to_thread.run_sync(sys.stdin.read)  # until the test closes our stdin

    anyio.run(main)
""")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("registry-cli")
    return {**os.environ, "PYTHONUNBUFFERED": "1", "GONDOLIN_REGISTRY_DIR": str(d / "vms"),
            "GONDOLIN_CHECKPOINT_DIR": str(d / "checkpoints")}


@pytest.fixture(scope="module")
def owner(env, tmp_path_factory):
    script = tmp_path_factory.mktemp("owner") / "owner.py"
    script.write_text(OWNER)
    label = f"e2e-{os.getpid()}"
    proc = subprocess.Popen([sys.executable, str(script), label], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    line = proc.stdout.readline()
    if not line:
        proc.kill()
        pytest.fail(f"the owner process did not start its VM: {proc.stderr.read().decode()[-2000:]}")
    yield {"id": json.loads(line)["id"], "label": label, "proc": proc}
    proc.stdin.close()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def run(env, *args, input=None, timeout=120):
    return subprocess.run(GONDOLIN + list(args), input=input, capture_output=True, timeout=timeout, env=env)


def test_list_shows_the_other_process_vm(env, owner):
    p = run(env, "list")
    assert p.returncode == 0, p.stderr
    assert owner["id"] in p.stdout.decode() and owner["label"] in p.stdout.decode()
    [entry] = [json.loads(line) for line in run(env, "list", "--json").stdout.splitlines()]
    assert entry["id"] == owner["id"] and entry["pid"] == owner["proc"].pid and os.path.exists(entry["socket"])


def test_attach_runs_a_command_with_streams_stdin_and_exit_code(env, owner):
    p = run(env, "attach", owner["label"], "--", "sh", "-c", "cat /tmp/owner-marker; echo err >&2; exit 3")
    assert (p.returncode, p.stdout, p.stderr) == (3, b"from-owner\n", b"err\n")
    p = run(env, "attach", owner["id"][:6], "--", "tr", "a-z", "A-Z", input=b"shout\n")
    assert (p.returncode, p.stdout) == (0, b"SHOUT\n")


def test_attach_without_a_command_is_a_shell_on_a_pty(env, owner):
    p = run(env, "attach", owner["id"], input=b"tty; echo $((6*7)) > /tmp/attached; exit 5\n")
    assert p.returncode == 5, p.stderr
    assert b"/dev/pts/" in p.stdout
    assert run(env, "attach", owner["id"], "--", "cat", "/tmp/attached").stdout == b"42\n"


def test_attach_to_an_unknown_vm_is_a_clear_error(env, owner):
    p = run(env, "attach", "no-such-vm", "--", "true")
    assert p.returncode == 125 and b"no running VM" in p.stderr


def test_checkpoint_save_then_resume_it_in_a_shell(env, owner, tmp_path):
    out = tmp_path / "snap.ckpt"
    p = run(env, "checkpoint", "save", owner["id"], "--output", str(out), timeout=180)
    assert p.returncode == 0, p.stderr
    assert out.exists() and b"full" in p.stdout
    p = run(env, "bash", "--resume", str(out), "--", "/bin/sh", "-c", "cat /tmp/owner-marker /tmp/attached; exit 6",
            timeout=180)
    assert p.returncode == 6, p.stderr
    assert b"from-owner" in p.stdout and b"42" in p.stdout
    assert run(env, "attach", owner["id"], "--", "echo", "still-running").stdout == b"still-running\n"


def test_checkpoint_save_default_location_and_list_rm(env, owner):
    p = run(env, "checkpoint", "save", owner["label"], "--disk-only", timeout=180)
    assert p.returncode == 0, p.stderr
    listing = run(env, "checkpoint", "list").stdout.decode()
    [line] = [x for x in listing.splitlines() if owner["label"] in x]
    name = line.split()[0]
    assert " disk " in line
    (Path(env["GONDOLIN_CHECKPOINT_DIR"]) / "not-a-checkpoint.ckpt").write_bytes(b"hello")
    p = run(env, "checkpoint", "rm", "not-a-checkpoint.ckpt")
    assert p.returncode == 1 and (Path(env["GONDOLIN_CHECKPOINT_DIR"]) / "not-a-checkpoint.ckpt").exists()
    p = run(env, "checkpoint", "rm", name)
    assert p.returncode == 0 and not (Path(env["GONDOLIN_CHECKPOINT_DIR"]) / name).exists()


def test_entries_of_a_dead_owner_are_collected(env, tmp_path):
    script = tmp_path / "doomed.py"
    script.write_text(OWNER)
    proc = subprocess.Popen([sys.executable, str(script), "doomed"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    ident = json.loads(proc.stdout.readline())["id"]
    entry = Path(env["GONDOLIN_REGISTRY_DIR"]) / f"{ident}.json"
    assert entry.exists() and ident in run(env, "list").stdout.decode()
    os.kill(proc.pid, signal.SIGKILL)  # no chance to clean up
    proc.wait()
    deadline = time.monotonic() + 10
    while ident in run(env, "list").stdout.decode() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ident not in run(env, "list").stdout.decode()
    assert not entry.exists()
