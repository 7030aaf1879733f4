"""Ingress pairs: the HTTP gateway (``vm.expose_http``) vs QEMU's own ``hostfwd``.

| ours (vm.expose_http(8080))                        | baseline, same run                                  |
|----------------------------------------------------|-----------------------------------------------------|
| request latency p50 / p99 (small GET, keep-alive)   | the same requests through ``-netdev user,hostfwd``   |
| 64 MiB download through the gateway                 | the same download through ``hostfwd``                |

The same guest server (``tests/unit/ingress/servers.py``, Python's ``http.server``) runs in both
guests on port 8080; the host client is ``httpx`` with keep-alive in this process. The two
sides alternate in blocks so drift in machine load hits both. The gateway keeps idle guest
connections (``vm.open_tcp`` streams) for the next request; ``hostfwd`` relays one guest
connection per client connection.
"""

from __future__ import annotations

import time
from contextlib import AsyncExitStack

import anyio
import httpx

from gondolin import VM
from gondolin.images import ImageStore, ensure_image
from gondolin.machine.launch import probe_boot
from gondolin.qemu import accel as _accel

from ._netlab import (
    SLIRP_SETUP,
    BenchError,
    MiB,
    Pair,
    RawShell,
    Results,
    VmShell,
    percentile,
    rows,
)
from ._raw import raw_guest
from ._runner import Context
from ._table import Measure, Row

AREA = "ingress"
GUEST_PORT = 8080
SIZE = 64 * MiB
STAGE_TIMEOUT = 900.0
SCRIPT = "/tmp/bench_ingress_server.py"


def hostfwd_args(host_port: int) -> tuple[str, ...]:
    return ("-netdev", f"user,id=s0,hostfwd=tcp:127.0.0.1:{host_port}-:{GUEST_PORT}",
            "-device", "virtio-net-pci,netdev=s0,romfile=,mac=52:54:00:12:34:56")


def pairs(requests: int, reps: int) -> list[Pair]:
    baseline = "QEMU -netdev user with hostfwd to the same guest server, same image, same host client"
    return [
        Pair(f"ingress request latency p50: GET of a ~300-byte JSON answer, keep-alive client, {requests} requests",
             "p50", "fwd_p50", baseline),
        Pair(f"ingress request latency p99 (same {requests} requests)", "p99", "fwd_p99", baseline),
        Pair(f"64 MiB download through the ingress gateway (median of {reps})", "dl", "fwd_dl", baseline),
    ]


async def collect(ctx: Context) -> list[Row]:
    from tests.unit.ingress.servers import SERVER_SCRIPT, free_port

    res = Results()
    reps = ctx.reps(3)
    requests = 40 if ctx.quick else 400
    keys = [k for p in pairs(requests, reps) for k in (p.ours, p.baseline) if k]
    try:
        image = await anyio.to_thread.run_sync(ensure_image, "default", ImageStore())
        accel = (await _accel.decide(image, probe_boot)).accel
        fwd_port = free_port()
        with anyio.fail_after(STAGE_TIMEOUT):
            async with AsyncExitStack() as stack:
                vm = await VM.create(image=image.build_id, network=False)
                stack.push_async_callback(vm.close)
                raw = RawShell(await stack.enter_async_context(
                    raw_guest(image, accel=accel, extra_args=hostfwd_args(fwd_port))))
                await raw.sh(SLIRP_SETUP, timeout=60)
                for shell in (VmShell(vm), raw):
                    await shell.sh(f"cat > {SCRIPT} <<'EOF'\n{SERVER_SCRIPT}\nEOF\n"
                                   f"nohup python3 {SCRIPT} {GUEST_PORT} 0.0.0.0 >/tmp/bench_srv.log 2>&1 &\n"
                                   "for i in $(seq 300); do grep -q ready /tmp/bench_srv.log && exit 0; sleep 0.1; "
                                   "done; cat /tmp/bench_srv.log; exit 1")
                gateway = await vm.expose_http(GUEST_PORT, listeners_file=False)
                urls = {"ours": gateway.url, "fwd": f"http://127.0.0.1:{fwd_port}/"}
                ctx.log(f"ingress: VM and hostfwd guest up ({accel})")
                await _measure(ctx, res, urls, requests, reps)
    except Exception as exc:  # noqa: BLE001 - reported as error rows; cancellation passes
        res.failed(ctx, AREA, "ingress vs hostfwd", keys, exc)
    return rows(AREA, res, pairs(requests, reps))


async def _measure(ctx: Context, res: Results, urls: dict[str, str], requests: int, reps: int) -> None:
    latency: dict[str, list[float]] = {"ours": [], "fwd": []}
    download: dict[str, list[float]] = {"ours": [], "fwd": []}
    limits = httpx.Limits(max_keepalive_connections=1)
    async with httpx.AsyncClient(timeout=300, trust_env=False, limits=limits) as http:
        for url in urls.values():  # warm up: first connection, first fork of the server thread
            await _get_ok(http, url + "warmup")
        block = max(1, requests // 8)
        for start in range(0, requests, block):
            for side, url in urls.items():
                for i in range(start, min(requests, start + block)):
                    t0 = time.perf_counter()
                    await _get_ok(http, f"{url}item/{i}")
                    latency[side].append((time.perf_counter() - t0) * 1000)
        for rep in range(reps):
            for side, url in urls.items():
                download[side].append(SIZE / MiB / await _download(http, f"{url}bytes/{SIZE}"))
            ctx.log(f"ingress: download rep {rep + 1}/{reps}: {download['ours'][-1]:.1f} vs "
                    f"{download['fwd'][-1]:.1f} MiB/s")
    for side, prefix in (("ours", ""), ("fwd", "fwd_")):
        samples = tuple(latency[side])
        res.measures[f"{prefix}p50"] = Measure(percentile(samples, 50), "ms", samples)
        res.measures[f"{prefix}p99"] = Measure(percentile(samples, 99), "ms", samples)
        res.measures[f"{prefix}dl"] = Measure.median_of(download[side], "MiB/s")
    ctx.log(f"ingress: p50 {res.measures['p50'].value:.2f} vs {res.measures['fwd_p50'].value:.2f} ms, "
            f"p99 {res.measures['p99'].value:.2f} vs {res.measures['fwd_p99'].value:.2f} ms")
    res.note("p50", "each request crosses the control channel on a pooled vm.open_tcp stream; the guest "
                    "server answers in two writes (head, then body): the agent acknowledges each read at once "
                    "(TCP_QUICKACK), so the second write does not wait ~40 ms for a delayed ACK under Nagle; "
                    "the gateway itself adds no measurable time to a raw open_tcp exchange")


async def _get_ok(http: httpx.AsyncClient, url: str) -> None:
    r = await http.get(url)
    if r.status_code != 200 or not r.content:
        raise BenchError(f"GET {url} answered {r.status_code}: {r.text[:200]!r}")


async def _download(http: httpx.AsyncClient, url: str) -> float:
    t0 = time.perf_counter()
    total = 0
    async with http.stream("GET", url) as r:
        if r.status_code != 200:
            raise BenchError(f"GET {url} answered {r.status_code}")
        async for chunk in r.aiter_raw():
            total += len(chunk)
    secs = time.perf_counter() - t0
    if total != SIZE:
        raise BenchError(f"downloaded {total} bytes from {url}, expected {SIZE}")
    return secs
