"""A small stdlib HTTP + WebSocket echo server for the ingress tests (host loopback and guest).

``SERVER_SCRIPT`` runs with ``python3 SCRIPT PORT [ADDRESS]``, binds ADDRESS (default
127.0.0.1) and PORT, prints ``ready`` and serves until killed:

- ``GET /bytes/N``: N bytes (``bytes(range(256))`` repeated), Content-Length, sent in 1 MiB writes
- ``GET /chunked/N``: N pieces ``piece-i\\n`` with chunked transfer encoding
- ``HEAD`` anything: 200 with ``Content-Length: 123`` and no body
- ``POST /upload``: reads a Content-Length or chunked body; answers its length and sha256 (JSON)
- ``GET /ws``: WebSocket echo (text and binary, ping -> pong, close)
- anything else: JSON with the server's port, method, path and request headers
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator

SERVER_SCRIPT = r'''
import base64, hashlib, json, socket, struct, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PORT = int(sys.argv[1])
GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
PATTERN = bytes(range(256)) * 4096


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _json(self, obj, status=200):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _read_body(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return
                left = size
                while left:
                    piece = self.rfile.read(min(left, 1 << 20))
                    if not piece:
                        return
                    left -= len(piece)
                    yield piece
                self.rfile.readline()
        left = int(self.headers.get("Content-Length") or 0)
        while left:
            piece = self.rfile.read(min(left, 1 << 20))
            if not piece:
                return
            left -= len(piece)
            yield piece

    def do_GET(self):
        if self.path.startswith("/bytes/"):
            n = int(self.path.split("/")[2])
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(n))
            self.end_headers()
            while n:
                piece = PATTERN[: min(n, len(PATTERN))]
                self.wfile.write(piece)
                n -= len(piece)
            return
        if self.path.startswith("/chunked/"):
            n = int(self.path.split("/")[2])
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(n):
                piece = b"piece-%d\n" % i
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")
            return
        if self.path == "/ws" and self.headers.get("Upgrade", "").lower() == "websocket":
            return self._websocket()
        self._echo()

    def do_HEAD(self):
        self.send_response(200)
        self.send_header("Content-Length", "123")
        self.end_headers()

    def do_POST(self):
        if self.path == "/upload":
            h = hashlib.sha256()
            total = 0
            for piece in self._read_body():
                h.update(piece)
                total += len(piece)
            return self._json({"length": total, "sha256": h.hexdigest()})
        for _ in self._read_body():
            pass
        self._echo()

    def _echo(self):
        self._json({"port": PORT, "method": self.command, "path": self.path,
                    "headers": [[k.lower(), v] for k, v in self.headers.items()]})

    def _websocket(self):
        key = self.headers["Sec-WebSocket-Key"]
        accept = base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()
        self.send_response(101, "Switching Protocols")
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.end_headers()
        self.wfile.flush()
        self.close_connection = True
        while True:
            head = self.rfile.read(2)
            if len(head) < 2:
                return
            opcode, length = head[0] & 0x0F, head[1] & 0x7F
            if length == 126:
                length = struct.unpack("!H", self.rfile.read(2))[0]
            elif length == 127:
                length = struct.unpack("!Q", self.rfile.read(8))[0]
            mask = self.rfile.read(4) if head[1] & 0x80 else b""
            payload = self.rfile.read(length)
            if mask:
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            if opcode == 8:
                self._frame(8, payload[:2])
                return
            if opcode == 9:
                self._frame(10, payload)
            elif opcode in (0, 1, 2):
                self._frame(opcode, payload)

    def _frame(self, opcode, payload):
        n = len(payload)
        if n < 126:
            head = struct.pack("!BB", 0x80 | opcode, n)
        elif n < 65536:
            head = struct.pack("!BBH", 0x80 | opcode, 126, n)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 127, n)
        self.wfile.write(head + payload)
        self.wfile.flush()


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


server = Server((sys.argv[2] if len(sys.argv) > 2 else "127.0.0.1", PORT), Handler)
print("ready", flush=True)
server.serve_forever()
'''


def pattern_bytes(n: int) -> bytes:
    """What ``GET /bytes/N`` answers."""
    block = bytes(range(256))
    return (block * (n // 256 + 1))[:n]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def host_server(port: int | None = None) -> Iterator[int]:
    """Run :data:`SERVER_SCRIPT` on host loopback; yields its port; killed afterwards."""
    port = port or free_port()
    proc = subprocess.Popen([sys.executable, "-c", SERVER_SCRIPT, str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 30
        line = proc.stdout.readline()
        if line.strip() != b"ready" or time.monotonic() > deadline:
            raise RuntimeError("test server did not start")
        yield port
    finally:
        proc.kill()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
