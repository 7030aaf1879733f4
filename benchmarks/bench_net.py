"""Network stack pairs: raw TCP through a mapped ``tcp_hosts`` rule vs QEMU's slirp.

| ours (VM.create(tcp_hosts=...))                 | baseline, same run                               |
|-------------------------------------------------|--------------------------------------------------|
| 64 MiB guest -> host through a mapped rule       | the same transfer through ``-netdev user``       |
| 64 MiB host -> guest through a mapped rule       | the same transfer through ``-netdev user``       |
| TCP connections per second (connect, 1 byte echo, close) | the same loop through ``-netdev user``   |
| host CPU per MiB moved (our process + QEMU)      | QEMU's CPU per MiB with slirp                    |

Both guests run side by side and the measurements alternate, so drift in machine load hits
both. The transfers use ``nc`` in the guest and threaded servers in a child process on the host.
"""

from __future__ import annotations

import anyio

from gondolin import VM
from gondolin.images import ImageStore, ensure_image
from gondolin.machine.launch import probe_boot
from gondolin.qemu import accel as _accel

from ._netlab import (
    SLIRP_HOST,
    BenchError,
    MiB,
    Pair,
    Results,
    Shell,
    VmShell,
    process_cpu,
    rows,
    self_cpu,
    slirp_guest,
    split_timed,
    timed,
)
from ._raw import cold_kwargs
from ._runner import Context
from ._table import Goal, Measure, Row

AREA = "network"
SIZE = 64 * MiB
CONNECTIONS = 200
STAGE_TIMEOUT = 900.0
MAPPED = {"sink": ("sink.test", 7003), "source": ("source.test", 7002), "echo": ("echo.test", 7000)}

# In-guest: CONNECTIONS times connect, send one byte, read it back, close; prints seconds.
CONNECT_SCRIPT = """
import socket, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
addr = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)[0][4]
t = time.perf_counter()
for _ in range(n):
    s = socket.create_connection(addr, timeout=30)
    s.sendall(b"x")
    if s.recv(1) != b"x":
        sys.exit("echo mismatch")
    s.close()
print(time.perf_counter() - t)
"""


def pairs(reps: int) -> list[Pair]:
    slirp = "QEMU -netdev user (slirp), same image, same guest command, host loopback at 10.0.2.2"
    return [
        Pair(f"64 MiB guest -> host through a mapped tcp_hosts rule, nc (median of {reps})", "g2h", "slirp_g2h",
             slirp, Goal(min_ratio=0.5)),
        Pair(f"64 MiB host -> guest through a mapped tcp_hosts rule, nc (median of {reps})", "h2g", "slirp_h2g",
             slirp, Goal(min_ratio=0.5)),
        Pair(f"TCP connection setup: connect + 1-byte echo + close, {CONNECTIONS} in a row (median of {reps})",
             "conn", "slirp_conn", slirp),
        Pair("host CPU per MiB moved, both directions: gondolin process + QEMU", "cpu", "slirp_cpu",
             "QEMU's own CPU per MiB with slirp (the guest's work included on both sides)"),
    ]


async def collect(ctx: Context) -> list[Row]:
    from tests.vm.netservers import start_servers

    res = Results()
    reps = ctx.reps(3)
    keys = [k for p in pairs(reps) for k in (p.ours, p.baseline) if k]
    try:
        image = await anyio.to_thread.run_sync(ensure_image, "default", ImageStore())
        accel = (await _accel.decide(image, probe_boot)).accel
        with start_servers({"echo": True, "source": True, "sink": True}) as servers:
            ports = servers.ports
            tcp_hosts = {f"{h}:{p}": f"127.0.0.1:{ports[name]}" for name, (h, p) in MAPPED.items()}
            with anyio.fail_after(STAGE_TIMEOUT):
                vm = await VM.create(image=image.build_id, tcp_hosts=tcp_hosts, **cold_kwargs())
                try:
                    async with slirp_guest(image, accel) as slirp:
                        ctx.log(f"network: VM and slirp guest up ({accel})")
                        await _measure(ctx, res, VmShell(vm), slirp, ports, reps)
                finally:
                    await vm.close()
    except Exception as exc:  # noqa: BLE001 - reported as error rows; cancellation passes
        res.failed(ctx, AREA, "mapped TCP vs slirp", keys, exc)
    return rows(AREA, res, pairs(reps))


async def _measure(ctx: Context, res: Results, ours: VmShell, slirp: Shell, ports: dict[str, int], reps: int) -> None:
    targets = {
        "ours": {name: f"{h} {p}" for name, (h, p) in MAPPED.items()},
        "slirp": {name: f"{SLIRP_HOST} {ports[name]}" for name in MAPPED},
    }
    shells: dict[str, Shell] = {"ours": ours, "slirp": slirp}
    script = "/tmp/bench_connect.py"
    for shell in shells.values():
        await shell.sh(f"cat > {script} <<'EOF'\n{CONNECT_SCRIPT}\nEOF")
    g2h: dict[str, list[float]] = {"ours": [], "slirp": []}
    h2g: dict[str, list[float]] = {"ours": [], "slirp": []}
    conn: dict[str, list[float]] = {"ours": [], "slirp": []}
    cpu: dict[str, list[float]] = {"ours": [], "slirp": []}
    for i in range(reps):
        for side, shell in shells.items():
            t = targets[side]
            c0 = (self_cpu() if side == "ours" else 0.0) + process_cpu(shell.qemu_pid())
            out, secs = split_timed(await shell.sh(timed(f"head -c {SIZE} /dev/zero | nc -N {t['sink']}")))
            if out.split()[-1:] != [str(SIZE)]:
                raise BenchError(f"{side}: the sink got {out.strip()!r}, expected {SIZE} bytes")
            g2h[side].append(SIZE / MiB / secs)
            out, secs = split_timed(await shell.sh(timed(f"echo {SIZE} | nc -N {t['source']} | wc -c")))
            if out.split()[-1:] != [str(SIZE)]:
                raise BenchError(f"{side}: received {out.strip()!r} bytes, expected {SIZE}")
            h2g[side].append(SIZE / MiB / secs)
            c1 = (self_cpu() if side == "ours" else 0.0) + process_cpu(shell.qemu_pid())
            cpu[side].append((c1 - c0) * 1000 / (2 * SIZE / MiB))
            host, port = t["echo"].split()
            out = await shell.sh(f"python3 {script} {host} {port} {CONNECTIONS}")
            conn[side].append(CONNECTIONS / float(out.strip()))
        ctx.log(f"network: rep {i + 1}/{reps}: g2h {g2h['ours'][-1]:.1f} vs {g2h['slirp'][-1]:.1f} MiB/s, "
                f"h2g {h2g['ours'][-1]:.1f} vs {h2g['slirp'][-1]:.1f} MiB/s, "
                f"{conn['ours'][-1]:.0f} vs {conn['slirp'][-1]:.0f} conn/s")
    for key, samples, unit in (("g2h", g2h, "MiB/s"), ("h2g", h2g, "MiB/s"), ("conn", conn, "conn/s"),
                               ("cpu", cpu, "ms/MiB")):
        res.measures[key] = Measure.median_of(samples["ours"], unit)
        res.measures[f"slirp_{key}"] = Measure.median_of(samples["slirp"], unit)
    stats = ours.vm.network.stats if ours.vm.network else None
    if stats is not None:
        res.note("g2h", f"stack counters after the run: {stats.frames_in} frames in, {stats.frames_out} out, "
                        f"drops {dict(stats.drops) or 'none'}")
    res.note("cpu", "ours counts this process (the whole network stack and relay) plus its QEMU; the "
                    "baseline counts QEMU alone, where slirp runs; under TCG both include the guest's own work")

