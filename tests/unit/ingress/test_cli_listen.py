"""`gondolin bash --listen [HOST:]PORT`: parsing and the loopback rule (no VM)."""

from __future__ import annotations

import pytest

from gondolin._cli_options import UsageError
from gondolin.cli import _listening, build_parser


def parse(*argv: str):
    return build_parser().parse_args(["bash", *argv])


@pytest.mark.parametrize(("text", "expected"), [
    ("8080", ("127.0.0.1", 8080)),
    (":0", ("127.0.0.1", 0)),
    ("127.0.0.2:9000", ("127.0.0.2", 9000)),
    ("[::1]:8080", ("::1", 8080)),
    ("localhost:80", ("localhost", 80)),
])
def test_listen_addresses(text, expected):
    assert parse("--listen", text).listen == expected


@pytest.mark.parametrize("text", ["", "x", "1:2:3", "host:99999", "::1:80", "host:"])
def test_bad_listen_addresses_are_usage_errors(text):
    with pytest.raises(UsageError, match=r"\[HOST:\]PORT"):
        parse("--listen", text)


def test_a_remote_address_needs_listen_remote():
    async def run(vm):
        return 0

    with pytest.raises(UsageError, match="--listen-remote"):
        _listening(parse("--listen", "0.0.0.0:8080"), run)
    assert _listening(parse("--listen", "0.0.0.0:8080", "--listen-remote"), run) is not run
    assert _listening(parse(), run) is run
