"""The CLI as a user runs it: a real process, a real VM, exit codes and streams."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.vm

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


def test_bash_without_a_terminal_reads_stdin_and_ends_at_its_end(tmp_path):
    # Not a terminal on our side: pipes, like `bash < script`; end of input ends the shell and
    # its exit code comes back (the terminal case is test_interactive_bash_in_a_real_terminal).
    p = run("bash", input=b"echo hi; tty\n")
    assert p.returncode == 1 and p.stdout == b"hi\nnot a tty\n", p.stderr  # `tty` exits 1 off a terminal
    p = run("bash", input=b"echo hi; exit 3\n")
    assert p.returncode == 3 and p.stdout == b"hi\n"
    with open(os.devnull, "rb") as null:
        p = subprocess.run(GONDOLIN + ["bash"], stdin=null, capture_output=True, timeout=240)
    assert p.returncode == 0
    p = run("bash", "--", "/bin/bash", "-c", "exit 4")
    assert p.returncode == 4


def test_usage_and_setup_errors_exit_125_with_one_line(tmp_path):
    for args in (["exec", "--memory", "10X", "true"], ["exec", "--cpus", "0", "true"],
                 ["exec", "--cwd", "relative", "true"], ["exec", "--mount", f"{tmp_path}/missing:/w", "true"],
                 ["exec", "--secret", "T=UNSET_GONDOLIN_TEST_VAR@a.example", "true"]):
        p = run(*args)
        assert p.returncode == 125, (args, p.stderr)
        assert len(p.stderr.strip().splitlines()) == 1 and b"Traceback" not in p.stderr, p.stderr


def test_network_flags_and_the_log(tmp_path):
    log = tmp_path / "net.jsonl"
    p = run("exec", "--network-log", str(log), "--",
            "sh", "-c", "curl -s -o /dev/null -w '%{http_code}' http://example.com/x")
    assert p.stdout == b"403"
    assert b"add --allow-host example.com to the gondolin command" in p.stderr  # the CLI flag, not a parameter
    (event,) = [__import__("json").loads(line) for line in log.read_text().splitlines()]
    assert event["host"] == "example.com" and event["decision"] == "blocked" and event["path"] == "/x"


def test_mounts_start_in_the_first_one_and_cow_changes_can_be_kept(tmp_path):
    (tmp_path / "a.txt").write_text("a\n")
    p = run("exec", "--mount", f"{tmp_path}:/workspace:cow", "--cow-diff", str(tmp_path / "d.diff"), "--",
            "sh", "-c", "pwd; echo b >> a.txt; echo new > 'odd name'")
    assert p.returncode == 0 and p.stdout == b"/workspace\n", p.stderr
    assert b"M\ta.txt" in p.stderr and b"A\todd name" in p.stderr and b"discarded" in p.stderr
    assert "+b" in (tmp_path / "d.diff").read_text() and (tmp_path / "a.txt").read_text() == "a\n"
    p = run("exec", "--mount", f"{tmp_path}:/workspace:cow", "--cow-commit", "--yes", "--", "sh", "-c",
            "echo c >> a.txt")
    assert p.returncode == 0 and b"committed" in p.stderr, p.stderr
    assert (tmp_path / "a.txt").read_text() == "a\nc\n"


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
