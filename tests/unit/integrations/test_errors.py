import errno

import pytest

from gondolin.errors import (
    ExecTimeout,
    GondolinError,
    GuestFileError,
    GuestTimeoutError,
    ProtocolError,
    VMClosedError,
    VMDiedError,
    VMStartError,
    VMUnresponsiveError,
)
from integrations.errors import ToolError, translate


def gfe(num, name):
    return GuestFileError("guest open: x", errno=num, errno_name=name, path="/w/x")


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (gfe(errno.ENOENT, "ENOENT"), "path_not_found"),
        (gfe(errno.EISDIR, "EISDIR"), "is_a_directory"),
        (gfe(errno.ENOTDIR, "ENOTDIR"), "not_a_directory"),
        (gfe(errno.EACCES, "EACCES"), "permission_denied"),
        (gfe(errno.EROFS, "EROFS"), "permission_denied"),
        (gfe(errno.EFBIG, "EFBIG"), "file_too_large"),
        (gfe(errno.EINVAL, "EINVAL"), "invalid_argument"),
        (VMDiedError("boom\nconsole", ["x"]), "vm_died"),
        (VMUnresponsiveError("the guest stopped answering pings"), "vm_died"),
        (VMClosedError("closed"), "sandbox_not_running"),
        (VMStartError("no boot"), "vm_start_failed"),
        (ExecTimeout("slow"), "timeout"),
        (GuestTimeoutError("no answer to STAT"), "timeout"),
        (ProtocolError("guest refused the command: no such user", code="exec_failed"), "invalid_argument"),
        (GondolinError("odd"), "internal"),
        (ValueError("bad"), "invalid_argument"),
        (RuntimeError("bug"), "internal"),
    ],
)
def test_translate(exc, code):
    err = translate(exc)
    assert isinstance(err, ToolError) and err.code == code
    assert err.message


def test_tool_error_renders_code_message_and_hint():
    err = ToolError("no_match", "not found", "read it again")
    assert str(err) == "error [no_match]: not found\nhint: read it again"
    assert err.info().as_dict() == {"code": "no_match", "message": "not found", "hint": "read it again",
                                    "retryable": False}


def test_unknown_codes_are_refused():
    with pytest.raises(ValueError):
        ToolError("whatever", "x")
