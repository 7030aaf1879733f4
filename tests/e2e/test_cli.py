"""The CLI as a user runs it: a real process, a real VM, exit codes and streams."""

import os
import subprocess
import sys
from pathlib import Path

GONDOLIN = [str(Path(sys.executable).parent / "gondolin")]


def run(*args, input=None, timeout=240):
    return subprocess.run(GONDOLIN + list(args), input=input, capture_output=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_exec_propagates_exit_code_and_streams():
    p = run("exec", "--", "sh", "-c", "echo to-out; echo to-err >&2; exit 7")
    assert p.returncode == 7
    assert p.stdout == b"to-out\n"
    # The first VM after a code change may rebuild the image; its progress lines go to stderr too.
    own = [line for line in p.stderr.splitlines(keepends=True) if not line.startswith(b"[gondolin image]")]
    assert own == [b"to-err\n"]


def test_exec_string_form_env_cwd_user_and_stdin():
    p = run("exec", "-e", "GREETING=hi", "--cwd", "/tmp", "--user", "agent",
            "echo $GREETING $(pwd) $(id -un); tr a-z A-Z", input=b"from stdin\n")
    assert p.returncode == 0, p.stderr
    assert p.stdout == b"hi /tmp agent\nFROM STDIN\n"


def test_exec_timeout_and_signal_exit_codes():
    p = run("exec", "--timeout", "1", "--", "sleep", "30")
    assert p.returncode == 137
    assert b"timeout" in p.stderr


def test_usage_errors():
    p = run("exec")
    assert p.returncode != 0 and b"give a command" in p.stderr
    p = run("exec", "--image", "no-such-image", "--", "true")
    assert p.returncode == 125 and b"no image named" in p.stderr


def test_image_list_and_verify():
    p = run("image", "list")
    assert p.returncode == 0 and b"default" in p.stdout
    p = run("image", "verify", timeout=120)
    assert p.returncode == 0 and p.stdout.strip().endswith(b"ok")


def test_doctor_reports_accelerator_and_image():
    p = run("doctor")
    assert p.returncode == 0, p.stdout + p.stderr
    assert b"accelerator" in p.stdout and b"image" in p.stdout


def test_bash_runs_on_a_pty_and_exits_with_the_shell(tmp_path):
    # Without a terminal on our side, bash still gets a PTY in the guest; its exit code comes back.
    p = run("bash", "--", "/bin/bash", "-c", "tty; exit 4")
    assert p.returncode == 4
    assert b"/dev/pts/" in p.stdout


def _tmux(*args):
    return subprocess.run(["tmux", *args], capture_output=True, text=True, timeout=30)


def _wait_screen(session, needle, timeout=120):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        screen = _tmux("capture-pane", "-p", "-t", session).stdout
        if needle in screen:
            return screen
        time.sleep(0.3)
    raise AssertionError(f"{needle!r} never appeared; screen:\n{screen}")


def test_interactive_bash_in_a_real_terminal(tmp_path):
    """Drive `gondolin bash` in tmux like a person: type, resize the window, Ctrl-D out."""
    session = f"gondolin-test-{os.getpid()}"
    status = tmp_path / "status"
    cmd = f"{GONDOLIN[0]} bash; echo EXIT=$? > {status}"
    assert _tmux("new-session", "-d", "-s", session, "-x", "100", "-y", "30", cmd).returncode == 0
    try:
        _wait_screen(session, "#")  # root prompt of bash -l
        _tmux("send-keys", "-t", session, "echo answer=$((6*7)); stty size", "Enter")
        screen = _wait_screen(session, "answer=42")
        assert "30 100" in screen
        _tmux("resize-window", "-t", session, "-x", "120", "-y", "40")
        _tmux("send-keys", "-t", session, "clear; stty size", "Enter")
        _wait_screen(session, "40 120")
        _tmux("send-keys", "-t", session, "C-d")
        import time

        deadline = time.monotonic() + 60
        while not status.exists() and time.monotonic() < deadline:
            time.sleep(0.3)
        assert status.read_text().strip() == "EXIT=0"
    finally:
        _tmux("kill-session", "-t", session)
