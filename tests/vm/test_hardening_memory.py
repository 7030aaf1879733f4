"""A hostile guest runs into its VM's host memory budget, gets errors, and a
second VM in the same process keeps answering. Host memory is measured as RSS growth of this
process (not absolute numbers).
"""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import pytest

from gondolin import VM
from gondolin.http import create_http_hooks
from gondolin.http.exchange import DEFAULT_MAX_BODY
from gondolin.net.stack import MAX_FLOWS
from gondolin.vfs import CopyOnWriteProvider, RealFSProvider
from gondolin.vfs.rpc import DEFAULT_MAX_DIR_BYTES

from .netservers import loopback_resolver

pytestmark = [pytest.mark.anyio, pytest.mark.vm]

MiB = 1 << 20
COW_BYTES = 32 * MiB  # smaller than the default (cow.COW_MAX_BYTES) to keep the test short

# Opens the 2,000-entry directory again and again without reading or closing it.
OPENDIR_FLOOD = """
import os, sys
fds, errors = [], {}
for _ in range(int(sys.argv[1])):
    try:
        fds.append(os.open("/big", os.O_RDONLY | os.O_DIRECTORY))
    except OSError as exc:
        errors[exc.strerror] = errors.get(exc.strerror, 0) + 1
print(len(fds), errors)
"""

# Writes 1 MiB files into the copy-on-write mount until a write fails.
COW_FLOOD = """
import os
n = 0
try:
    for i in range(1000):
        with open(f"/cow/f{i}", "wb") as f:
            f.write(os.urandom(1 << 20))
        n += 1
except OSError as exc:
    print(n, exc.strerror)
"""


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("memory")
    big = root / "big"
    big.mkdir()
    for i in range(2000):
        (big / f"entry-with-a-longish-name-{i:05d}").touch()
    (root / "cow").mkdir()
    return {"big": big, "cow": root / "cow"}


async def test_hostile_guest_hits_its_budget_and_a_second_vm_keeps_answering(dirs):
    mounts = {"/big": RealFSProvider(dirs["big"]), "/cow": CopyOnWriteProvider(dirs["cow"], max_bytes=COW_BYTES)}
    async with await VM.create(memory="512M") as bystander, \
            await VM.create(memory="512M", mounts=mounts) as hostile:
        await hostile.fs.write("/tmp/flood.py", OPENDIR_FLOOD)
        await hostile.fs.write("/tmp/cow.py", COW_FLOOD)
        base = rss()
        r = await hostile.exec(["python3", "/tmp/flood.py", "300"], timeout=300)
        opened, errors = r.stdout.split(" ", 1)
        assert 10 < int(opened) < 300 and "Cannot allocate memory" in errors, r.stdout + r.stderr
        r = await bystander.exec("echo still here")
        assert r.stdout == "still here\n"
        r = await hostile.exec(["python3", "/tmp/cow.py"], timeout=300)
        written, error = r.stdout.split(" ", 1)
        assert int(written) <= COW_BYTES // MiB and "No space left" in error, r.stdout + r.stderr
        grown = rss() - base
        r = await bystander.exec("echo still here")
        assert r.stdout == "still here\n"
        await bystander.fs.write("/tmp/x", "ok")
        assert await bystander.fs.read_text("/tmp/x") == "ok"
        # Bounded by the two budgets (plus the interpreter's slack), not by what the guest asked for:
        # 300 snapshots of this directory would be ~330 MiB.
        assert grown < DEFAULT_MAX_DIR_BYTES + COW_BYTES + 96 * MiB, f"host RSS grew by {grown / MiB:.0f} MiB"
        print(f"host RSS growth: {grown / MiB:.0f} MiB")
        # The guest recovers once it lets go.
        r = await hostile.exec("rm -f /cow/f*; ls /big | wc -l")
        assert r.stdout.strip() == "2000"


# Opens TCP connections to a mapped host service that accepts and never reads, each sending
# 64 KiB, until the host stack refuses new ones.
TCP_FLOOD = """
import socket, sys
held, errors = [], {}
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.settimeout(10)
    try:
        s.connect(("hold.test", 7000))
        s.setblocking(False)
        try:
            s.send(b"x" * 65536)
        except BlockingIOError:
            pass
        held.append(s)
    except OSError as exc:
        errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
        s.close()
print(len(held), errors)
"""


class HoldingServer:
    """A loopback TCP service that accepts every connection and never reads from it."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=512)
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


async def test_hostile_guest_hits_its_network_budgets_and_a_second_vm_keeps_answering():
    server = HoldingServer()
    hooks, _ = create_http_hooks(allowed_internal_hosts=["up.test"], resolver=loopback_resolver())
    try:
        async with await VM.create(memory="512M") as bystander, \
                await VM.create(memory="512M", tcp_hosts={"hold.test:7000": f"127.0.0.1:{server.port}"},
                                http_hooks=hooks) as hostile:
            base = rss()
            # A request body beyond the limit is refused before anything is buffered or sent.
            r = await hostile.exec(
                f"head -c {DEFAULT_MAX_BODY + MiB} /dev/zero > /tmp/body && curl -s -o /dev/null "
                f"-w '%{{http_code}}' --data-binary @/tmp/body http://up.test:{server.port}/upload", timeout=300)
            assert r.stdout == "413", r.stdout + r.stderr
            assert not server.held, "the upstream was contacted"
            # Then connections the host service holds open until the stack has no flows left (they
            # stay held, so this comes last).
            await hostile.fs.write("/tmp/tcp.py", TCP_FLOOD)
            r = await hostile.exec(["python3", "/tmp/tcp.py", str(MAX_FLOWS + 64)], timeout=300)
            held, errors = r.stdout.split(" ", 1)
            assert int(held) <= MAX_FLOWS and "ConnectionRefusedError" in errors, r.stdout + r.stderr
            assert (await bystander.exec("echo still here")).stdout == "still here\n"
            grown = rss() - base
            assert (await bystander.exec("echo still here")).stdout == "still here\n"
            # Bounded by the flow buffers (MAX_FLOWS x (receive + send)), not by what was sent.
            assert grown < 80 * MiB + 96 * MiB, f"host RSS grew by {grown / MiB:.0f} MiB"
            print(f"host RSS growth: {grown / MiB:.0f} MiB")
            events = [e for e in hostile.network.events() if e.host == "up.test"]
            assert events and all(e.status == 413 for e in events), events
    finally:
        server.close()
