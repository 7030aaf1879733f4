"""The guest's network through the host stack: addressing, DHCP, DNS, ICMP, refusals,
mapped TCP rules. One VM for the module; loopback servers run in a child process."""

from __future__ import annotations

import hashlib
import re
import socket

import anyio
import pytest

from gondolin import VM

from .netservers import pattern_sha256, start_servers

pytestmark = [pytest.mark.anyio, pytest.mark.vm]

MiB = 1024 * 1024
BIG = 64 * MiB
PARALLEL = 20
ECHO_PORT = 7000
DEAD_PORT = 7001

# Opens PARALLEL connections, keeps all of them open, pushes a distinct payload through each
# in turn and reads it back; prints one sha256 per connection of what came back.
PARALLEL_SCRIPT = r"""
import hashlib, socket, sys, threading
n, size, host, port = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
socks = [socket.create_connection((host, port), timeout=60) for _ in range(n)]
print("open", len(socks), flush=True)
digests = [None] * n
def run(i):
    s = socks[i]
    payload = bytes([i]) * size
    def send():
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
    t = threading.Thread(target=send)
    t.start()
    h, got = hashlib.sha256(), 0
    while True:
        data = s.recv(65536)
        if not data:
            break
        h.update(data)
        got += len(data)
    t.join()
    digests[i] = "%s %d" % (h.hexdigest(), got)
threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
for t in threads: t.start()
for t in threads: t.join()
print("\n".join(digests))
"""

# Connects, sends argv[3] (escapes decoded), and says how the connection ended.
PROBE_SCRIPT = r"""
import socket, sys
host, port, payload = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode().decode("unicode_escape").encode("latin-1")
try:
    s = socket.create_connection((host, port), timeout=30)
except ConnectionRefusedError:
    print("refused"); sys.exit()
try:
    s.sendall(payload)
    print("data" if s.recv(100) else "eof")
except ConnectionResetError:
    print("reset")
except socket.timeout:
    print("timeout")
"""


@pytest.fixture(scope="module")
def servers():
    with start_servers({"echo": True, "source": True, "sink": True, "udp": True, "http": {}}) as s:
        yield s


@pytest.fixture(scope="module")
def dead_port():
    """A loopback port with nothing listening (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
async def net_vm(servers, dead_port):
    p = servers.ports
    tcp_hosts = {
        f"echo.test:{ECHO_PORT}": f"127.0.0.1:{p['echo']}",
        "source.test:7002": f"127.0.0.1:{p['source']}",
        "sink.test:7003": f"127.0.0.1:{p['sink']}",
        f"dead.test:{DEAD_PORT}": f"127.0.0.1:{dead_port}",
        f"udp.test:{p['udp']}": f"127.0.0.1:{p['udp']}",  # a TCP rule: UDP must still not pass
        "10.9.8.7:7000": f"127.0.0.1:{p['echo']}",  # IP-literal key
    }
    async with await VM.create(memory="512M", tcp_hosts=tcp_hosts) as machine:
        yield machine


async def sh(vm, command: str, **kw):
    return await vm.exec(["/bin/sh", "-c", command], **kw)


async def test_guest_has_its_static_address_and_gateway(net_vm):
    r = await sh(net_vm, "ip -4 -o addr show dev eth0; ip route; cat /etc/resolv.conf")
    assert "inet 192.168.127.3/24" in r.stdout
    assert "default via 192.168.127.1 dev eth0" in r.stdout
    assert "nameserver 192.168.127.1" in r.stdout


async def test_dhcp_server_offers_the_guest_address(net_vm):
    before = net_vm.network.stats.dhcp_replies
    # -s /bin/true: take the lease but leave eth0 as it is; -n: fail if no lease.
    r = await sh(net_vm, "busybox udhcpc -i eth0 -f -n -q -t 3 -T 2 -s /bin/true 2>&1")
    assert r.exit_code == 0, r.stdout
    assert re.search(r"lease of 192\.168\.127\.3 obtained from 192\.168\.127\.1", r.stdout), r.stdout
    assert net_vm.network.stats.dhcp_replies >= before + 2  # offer + ack


async def test_synthetic_dns_gives_stable_private_addresses(net_vm):
    r = await sh(net_vm, "getent hosts example.com; getent hosts example.com; getent hosts other.example; "
                         "getent hosts localhost")
    lines = [line.split() for line in r.stdout.splitlines()]
    assert lines[0][0] == lines[1][0], "a name keeps its address"
    assert lines[0][0].startswith("198.19.") and lines[2][0].startswith("198.19.")
    assert lines[0][0] != lines[2][0], "each name gets its own address"
    assert lines[0][1] == "example.com"
    assert lines[3][0] in ("127.0.0.1", "::1")


async def test_ping_is_answered_by_the_host(net_vm):
    before = net_vm.network.stats.icmp_echo_replies
    r = await sh(net_vm, "ping -c1 -W5 1.2.3.4")
    assert r.exit_code == 0, r.stdout + r.stderr
    assert "1 received" in r.stdout or "1 packets received" in r.stdout
    assert net_vm.network.stats.icmp_echo_replies > before


@pytest.mark.parametrize(("host", "port", "payload", "outcome"), [
    ("192.168.127.1", 22, "", "refused"),  # the gateway itself: refused at SYN
    ("198.19.200.200", 80, "", "refused"),  # a synthetic address DNS never handed out
    ("1.2.3.4", 5555, "hello\\r\\n\\r\\n", "reset"),  # not HTTP/TLS: reset once bytes arrive
    ("example.com", 5432, "\\x00\\x00\\x00\\x08\\x04\\xd2\\x16\\x2f", "reset"),  # postgres
    ("example.com", 22, "SSH-2.0-OpenSSH_9.2\\r\\n", "reset"),  # SSH egress is off
    ("echo.test", 7999, "hi", "reset"),  # a mapped name, but not this port
])
async def test_unmapped_tcp_is_refused_or_reset(net_vm, host, port, payload, outcome):
    r = await net_vm.exec(["python3", "-c", PROBE_SCRIPT, host, str(port), payload])
    assert r.stdout.strip() == outcome, r.stdout + r.stderr


async def test_mapped_rule_to_a_dead_target_is_refused(net_vm):
    r = await sh(net_vm, f"nc -v -z -w 10 dead.test {DEAD_PORT} 2>&1")
    assert r.exit_code == 1 and "refused" in r.stdout, r.stdout


async def test_udp_other_than_dns_goes_nowhere(net_vm, servers):
    port = servers.ports["udp"]
    before = net_vm.network.stats.drops["udp-port"]
    r = await sh(net_vm, f"for h in 1.2.3.4 192.168.127.1 udp.test; do "
                         f"  for p in 9999 {port}; do echo hi | nc -u -w1 $h $p; done; done; echo done")
    assert r.stdout.strip().endswith("done")
    assert net_vm.network.stats.drops["udp-port"] >= before + 6
    r = await sh(net_vm, "getent hosts example.net")  # DNS still works
    assert r.stdout.startswith("198.19.")
    assert await anyio.to_thread.run_sync(servers.get, "/udp-count") == b"0"


async def test_mapped_rule_carries_64_mib_both_ways_intact(net_vm):
    r = await sh(net_vm, f"head -c {BIG} /dev/urandom > /tmp/big && sha256sum < /tmp/big && "
                         f"nc -N echo.test {ECHO_PORT} < /tmp/big | sha256sum; rm -f /tmp/big", timeout=240)
    sent, back = (line.split()[0] for line in r.stdout.splitlines())
    assert r.exit_code == 0, r.stderr
    assert sent == back


async def test_mapped_rule_one_way_each_direction(net_vm):
    r = await sh(net_vm, f"echo {BIG} | nc -N source.test 7002 | sha256sum", timeout=240)
    assert r.stdout.split()[0] == pattern_sha256(BIG)
    r = await sh(net_vm, f"head -c {16 * MiB} /dev/zero | nc -N sink.test 7003", timeout=240)
    assert r.stdout.split() == [hashlib.sha256(bytes(16 * MiB)).hexdigest(), str(16 * MiB)]


async def test_ip_literal_rule(net_vm):
    r = await sh(net_vm, "echo hello-literal | nc -N 10.9.8.7 7000")
    assert r.stdout == "hello-literal\n"


async def test_twenty_parallel_connections(net_vm):
    size = 256 * 1024
    before = net_vm.network.stats.flows_opened
    await net_vm.fs.write("/tmp/parallel.py", PARALLEL_SCRIPT)
    r = await net_vm.exec(["python3", "/tmp/parallel.py", str(PARALLEL), str(size), "echo.test", str(ECHO_PORT)],
                          timeout=180)
    assert r.exit_code == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == f"open {PARALLEL}"
    expected = [f"{hashlib.sha256(bytes([i]) * size).hexdigest()} {size}" for i in range(PARALLEL)]
    assert lines[1:] == expected
    assert net_vm.network.stats.flows_opened - before == PARALLEL


async def test_http_without_policy_is_refused_with_a_reason(net_vm):
    r = await sh(net_vm, "curl -s -m 20 -w '\\n%{http_code}' http://example.com/")
    body, _, code = r.stdout.rpartition("\n")
    assert code == "403"
    assert "allowed_hosts" in body
    events = net_vm.network.events()
    assert any(e.host == "example.com" and e.decision.value == "blocked" for e in events)


async def test_network_off_means_no_nic():
    async with await VM.create(memory="256M", network=False, rootfs="readonly") as vm:
        assert vm.network is None
        r = await sh(vm, "ls /sys/class/net")
        assert r.stdout.split() == ["lo"]
