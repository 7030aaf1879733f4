import ssl

import pytest

from gondolin.net.classify import (
    CLASSIFY_LIMIT,
    NEED_MORE,
    Classified,
    Rejected,
    classify,
)
from gondolin.net.flow import FlowProtocol


def real_client_hello(server_hostname: str | None) -> bytes:
    """The first flight of Python's own TLS client: a real-world ClientHello."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = server_hostname is not None
    if server_hostname is None:
        ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


HTTP = FlowProtocol.HTTP


@pytest.mark.parametrize(("data", "expected"), [
    (b"", NEED_MORE),
    (b"G", NEED_MORE),
    (b"GET", NEED_MORE),
    (b"GET /", NEED_MORE),  # request line not complete yet
    (b"GET / HTTP/1.1\r\n", Classified(HTTP)),
    (b"POST /x?y=1 HTTP/1.0\r\nHost: a\r\n\r\n", Classified(HTTP)),
    (b"DELETE http://a/b HTTP/1.1\n", Classified(HTTP)),
    (b"OPTIONS * HTTP/1.1\r\n", Classified(HTTP)),
    (b"P", NEED_MORE),  # POST, PUT or PATCH
    (b"C", NEED_MORE),  # could still be CONNECT (refused when it is)
    (b"CONNECT example.com:443 HTTP/1.1\r\n\r\n", Rejected("connect-refused")),
    (b"CONNECT ", Rejected("connect-refused")),
    (b"GET / HTTP/2.0\r\n", Rejected("http-bad-request-line")),
    (b"GET  / HTTP/1.1\r\n", Rejected("http-bad-request-line")),
    (b"GET /\x00 HTTP/1.1\r\n", Rejected("http-bad-request-line")),
    (b"GET / HTTP/1.1 extra\r\n", Rejected("http-bad-request-line")),
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", Rejected("unknown-protocol")),
    (b"get / HTTP/1.1\r\n", Rejected("unknown-protocol")),
    (b"SSH-2.0-OpenSSH_9.6\r\n", Rejected("unknown-protocol")),  # SSH not enabled
    (b"220 smtp ready", Rejected("unknown-protocol")),
    (b"\x00\x00\x00\x00", Rejected("unknown-protocol")),
    (b"GET " + b"a" * 9000, Rejected("http-request-line-too-long")),
])
def test_classify(data: bytes, expected: object) -> None:
    assert classify(data) == expected


@pytest.mark.parametrize(("data", "expected"), [
    (b"SSH-2.0-OpenSSH_9.6\r\n", Classified(FlowProtocol.SSH)),
    (b"SSH-", Classified(FlowProtocol.SSH)),
    (b"SS", NEED_MORE),
    (b"GET / HTTP/1.1\r\n", Classified(HTTP)),
])
def test_ssh_when_allowed(data: bytes, expected: object) -> None:
    assert classify(data, ssh_allowed=True) == expected


def test_eof_before_classification_rejects() -> None:
    assert classify(b"GE", eof=True) == Rejected("eof-before-classified")
    assert classify(b"GET / HTTP/1.1\r\n", eof=True) == Classified(HTTP)


def test_byte_limit() -> None:
    # A TLS record header announcing a record longer than the limit allows: must not wait
    # forever for it.
    data = b"\x16\x03\x01\x40\x00" + b"\x01" + b"\x00" * (CLASSIFY_LIMIT - 6)
    assert classify(data) == Rejected("classify-limit")


def test_tls_client_hello_with_sni() -> None:
    hello = real_client_hello("Example.COM")
    assert classify(hello) == Classified(FlowProtocol.TLS, "example.com")


def test_tls_client_hello_without_sni() -> None:
    assert classify(real_client_hello(None)) == Classified(FlowProtocol.TLS, None)


def test_tls_waits_for_the_whole_record() -> None:
    hello = real_client_hello("example.com")
    for cut in (1, 2, 5, len(hello) // 2, len(hello) - 1):
        assert classify(hello[:cut]) == NEED_MORE


def test_tls_hello_split_across_records_is_tls_without_sni() -> None:
    hello = real_client_hello("example.com")
    body = hello[5:]
    first = body[:100]
    record = b"\x16\x03\x01" + len(first).to_bytes(2, "big") + first
    assert classify(record) == Classified(FlowProtocol.TLS, None)


@pytest.mark.parametrize(("data", "reason"), [
    (b"\x16\x02", "tls-bad-record"),
    (b"\x16\x03\x09", "tls-bad-record"),
    (b"\x16\x03\x01\x00\x00", "tls-bad-record"),
    (b"\x16\x03\x01\x00\x04\x02\x00\x00\x00", "tls-not-client-hello"),  # a ServerHello
    (b"\x16\x03\x01\x00\x03\x01\x00\x00", "tls-malformed"),
    # ClientHello whose session id length runs past the end.
    (b"\x16\x03\x01\x00\x27\x01\x00\x00\x23" + b"\x03\x03" + b"\x00" * 32 + b"\x20",
     "tls-malformed"),
])
def test_tls_malformed(data: bytes, reason: str) -> None:
    assert classify(data) == Rejected(reason)


def test_tls_bad_sni_characters_are_dropped_not_trusted() -> None:
    hello = bytearray(real_client_hello("example.com"))
    at = hello.find(b"example.com")
    hello[at + 7] = 0  # "example\x00com"
    assert classify(bytes(hello)) == Classified(FlowProtocol.TLS, None)
