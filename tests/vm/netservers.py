"""Loopback servers for the VM network tests and benchmarks, run in a child process.

A child process keeps the servers off the event loop and the GIL of the VM under test, so a
64 MiB transfer measures the network stack and not a server competing with it. Start them
with :func:`start_servers` (a context manager yielding :class:`Servers`) or run
``python tests/vm/netservers.py CONFIG.json``: it prints one JSON line ``{"name": port, ...}``
once every listener is bound and serves until its stdin closes.

Servers (each on 127.0.0.1, an ephemeral port):

* ``echo``   — TCP: sends back every byte it receives; half-closes after the client's EOF.
* ``source`` — TCP: reads one line ``N\\n``, sends N bytes of :func:`pattern`, closes.
* ``sink``   — TCP: reads to EOF, answers ``<sha256 hex> <byte count>\\n``.
* ``udp``    — UDP: counts datagrams (``/udp-count`` on the HTTP server reports them).
* ``http`` / ``https`` / ``untrusted`` — HTTP/1.1 with keep-alive; the TLS ones use the
  certificate and key files named in the config. Routes:
  ``/small`` (``ok``), ``/bytes/N`` (N bytes of :func:`pattern`), ``/headers...`` (logs the
  request to the config's ``log`` file, answers with header *names* only, so an upstream never
  shows a secret value back to the guest), ``/redirect?to=URL``, ``/git/...`` (git smart HTTP
  through ``git http-backend`` over ``git_root``), and any other path is served from
  ``static_root`` (a PEP 503 index, for instance).

Stdlib only, plus ``cryptography`` in :func:`make_pki` (called by the parent, not the child).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import socket
import socketserver
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

CHUNK = 256 * 1024
PATTERN_BLOCK = bytes(range(256)) * 4096  # 1 MiB
MAX_LINE = 64
GIT_BACKEND = "/usr/lib/git-core/git-http-backend"


def pattern(n: int) -> Iterator[bytes]:
    """Deterministic payload of ``n`` bytes, in blocks (byte i is ``i % 256``)."""
    while n > 0:
        block = PATTERN_BLOCK[: min(n, len(PATTERN_BLOCK))]
        n -= len(block)
        yield block


def pattern_sha256(n: int) -> str:
    h = hashlib.sha256()
    for block in pattern(n):
        h.update(block)
    return h.hexdigest()


# -- raw TCP/UDP servers -------------------------------------------------------------------


class _TCP(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128


class EchoHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        while True:
            data = sock.recv(CHUNK)
            if not data:
                break
            sock.sendall(data)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)


class SourceHandler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        line = self.rfile.readline(MAX_LINE).strip()
        if not line.isdigit():
            return
        for block in pattern(int(line)):
            self.wfile.write(block)


class SinkHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        h, total = hashlib.sha256(), 0
        while True:
            data = sock.recv(CHUNK)
            if not data:
                break
            h.update(data)
            total += len(data)
        sock.sendall(f"{h.hexdigest()} {total}\n".encode())


class _UDP(socketserver.ThreadingUDPServer):
    daemon_threads = True
    datagrams = 0


class UdpHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        assert isinstance(self.server, _UDP)
        self.server.datagrams += 1


# -- HTTP ------------------------------------------------------------------------------------


class _HTTP(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, config: dict[str, Any], tls: ssl.SSLContext | None, udp: _UDP | None) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.config = config
        self.tls = tls
        self.udp = udp
        self.log_lock = threading.Lock()

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = super().get_request()
        if self.tls is not None:
            # The handshake runs on first read, in the handler's thread.
            sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, addr


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _HTTP

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._route()

    def do_POST(self) -> None:
        self._route()

    def do_HEAD(self) -> None:
        self._route()

    def _body(self) -> bytes:
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline(MAX_LINE).split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(1024).strip():
                        pass  # trailers
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline(MAX_LINE)
        length = int(self.headers.get("content-length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes, content_type: str = "text/plain",
              headers: Sequence[tuple[str, str]] = ()) -> None:
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(body)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _log(self, body: bytes) -> None:
        path = self.server.config.get("log")
        if not path:
            return
        entry = {"server": self.server.config.get("name", ""), "method": self.command, "path": self.path,
                 "headers": [[n, v] for n, v in self.headers.items()], "body": body.decode("latin-1")}
        with self.server.log_lock, open(path, "a") as f:
            f.write(json.dumps(entry) + "\n")

    def _route(self) -> None:
        url = urlsplit(self.path)
        path = url.path
        body = self._body()
        if path == "/small":
            self._send(200, b"ok\n")
        elif path.startswith("/bytes/") and path[7:].isdigit():
            n = int(path[7:])
            self.send_response(200)
            self.send_header("content-type", "application/octet-stream")
            self.send_header("content-length", str(n))
            self.end_headers()
            if self.command != "HEAD":
                for block in pattern(n):
                    self.wfile.write(block)
        elif path.startswith("/headers"):
            self._log(body)
            names = sorted({n.lower() for n in self.headers})
            self._send(200, json.dumps({"names": names, "body_bytes": len(body)}).encode(), "application/json")
        elif path == "/redirect":
            to = parse_qs(url.query).get("to", ["/small"])[0]
            self._send(302, b"moved\n", headers=[("location", to)])
        elif path == "/udp-count":
            count = self.server.udp.datagrams if self.server.udp else 0
            self._send(200, str(count).encode())
        elif path.startswith("/git/") and self.server.config.get("git_root"):
            self._git(url.path[len("/git"):], url.query, body)
        else:
            self._static(path)

    def _static(self, path: str) -> None:
        root = self.server.config.get("static_root")
        if not root:
            self._send(404, b"no such route\n")
            return
        base = Path(root).resolve()
        target = (base / path.lstrip("/")).resolve()
        if target.is_dir():
            target = target / "index.html"
        if base not in target.parents or not target.is_file():
            self._send(404, b"not found\n")
            return
        kind = "text/html" if target.suffix == ".html" else "application/octet-stream"
        self._send(200, target.read_bytes(), kind)

    def _git(self, path_info: str, query: str, body: bytes) -> None:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "GIT_PROJECT_ROOT": str(self.server.config["git_root"]),
            "GIT_HTTP_EXPORT_ALL": "1",
            "GATEWAY_INTERFACE": "CGI/1.1",
            "REQUEST_METHOD": self.command,
            "PATH_INFO": path_info,
            "QUERY_STRING": query,
            "CONTENT_TYPE": self.headers.get("content-type", ""),
            "CONTENT_LENGTH": str(len(body)),
            "REMOTE_ADDR": "127.0.0.1",
        }
        for name, value in self.headers.items():
            if name.lower() not in ("content-type", "content-length"):
                env["HTTP_" + name.upper().replace("-", "_")] = value
        proc = subprocess.run([GIT_BACKEND], input=body, env=env, capture_output=True, timeout=60)
        head, _, payload = proc.stdout.partition(b"\r\n\r\n")
        if not _:
            head, _, payload = proc.stdout.partition(b"\n\n")
        status, headers = 200, []
        for line in head.decode("latin-1").splitlines():
            name, _, value = line.partition(":")
            if name.lower() == "status":
                status = int(value.split()[0])
            elif name:
                headers.append((name.strip(), value.strip()))
        content_type = next((v for n, v in headers if n.lower() == "content-type"), "text/plain")
        rest = [(n, v) for n, v in headers if n.lower() not in ("content-type", "content-length")]
        self._send(status, payload, content_type, rest)


# -- process entry point -----------------------------------------------------------------------


def _tls_context(spec: dict[str, str]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(spec["cert"], spec["key"])
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def serve(config: dict[str, Any]) -> None:
    servers: list[socketserver.BaseServer] = []
    ports: dict[str, int] = {}
    udp: _UDP | None = None
    if config.get("udp"):
        udp = _UDP(("127.0.0.1", 0), UdpHandler)
        servers.append(udp)
        ports["udp"] = udp.server_address[1]
    for name, handler in (("echo", EchoHandler), ("source", SourceHandler), ("sink", SinkHandler)):
        if config.get(name):
            tcp = _TCP(("127.0.0.1", 0), handler)
            servers.append(tcp)
            ports[name] = tcp.server_address[1]
    for name in ("http", "https", "untrusted"):
        if name not in config:
            continue
        spec = config[name] or {}
        tls = _tls_context(spec) if name != "http" else None
        http = _HTTP({**config, "name": name}, tls, udp)
        servers.append(http)
        ports[name] = http.server_address[1]
    for server in servers:
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True).start()
    print(json.dumps(ports), flush=True)
    sys.stdin.read()  # serve until the parent closes our stdin (or dies)
    for server in servers:
        server.shutdown()


@dataclass
class Servers:
    ports: dict[str, int]
    config: dict[str, Any]
    process: subprocess.Popen[bytes]

    def get(self, path: str) -> bytes:
        """GET ``path`` from the plain ``http`` server (blocking: call it from a thread)."""
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.ports['http']}{path}", timeout=10) as resp:
            return bytes(resp.read())

    def log_entries(self) -> list[dict[str, Any]]:
        path = self.config.get("log")
        if not path or not os.path.exists(path):
            return []
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]


@contextlib.contextmanager
def start_servers(config: dict[str, Any]) -> Iterator[Servers]:
    """Run :func:`serve` in a child process; yields once every port is bound."""
    proc = subprocess.Popen([sys.executable, __file__, json.dumps(config)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"test servers did not start (exit code {proc.wait(5)})")
        yield Servers(json.loads(line), config, proc)
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- test PKI --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca_pem: bytes
    cert_file: str
    key_file: str

    def server_spec(self) -> dict[str, str]:
        return {"cert": self.cert_file, "key": self.key_file}


def make_pki(directory: str | os.PathLike[str], names: Sequence[str], ca_name: str = "Gondolin test upstream CA") -> Pki:
    """A throwaway CA and one server certificate for ``names``, written under ``directory``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ca_name)])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (
        x509.CertificateBuilder().subject_name(ca_subject).issuer_name(ca_subject)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    cert_file, key_file = out / "server.pem", out / "server.key"
    cert_file.write_bytes(leaf.public_bytes(serialization.Encoding.PEM) + ca.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    os.chmod(key_file, 0o600)
    return Pki(ca.public_bytes(serialization.Encoding.PEM), str(cert_file), str(key_file))


def loopback_resolver(suffix: str = ".test") -> Any:
    """An upstream resolver for ``create_http_hooks(resolver=...)``: every ``*<suffix>`` name is
    127.0.0.1, anything else does not exist (tests never leave the machine)."""

    async def resolve(host: str, port: int) -> list[str]:
        if host.endswith(suffix):
            return ["127.0.0.1"]
        raise OSError(f"{host}: no such test host")

    return resolve


if __name__ == "__main__":
    serve(json.loads(sys.argv[1]))
