"""HTTP mediation pairs: downloads and request latency through the mediator vs slirp.

| ours (VM.create(http_hooks=...), curl in the guest) | baseline, same run (-netdev user)              |
|-----------------------------------------------------|------------------------------------------------|
| 64 MiB HTTPS download, TLS intercepted              | the same file over plain HTTP (the goal's pair) |
| 64 MiB plain HTTP download, mediated                | the same file over plain HTTP                   |
| 64 MiB HTTPS download, TLS intercepted              | HTTPS straight to the upstream                  |
| 200 sequential small HTTPS requests, one keep-alive connection: p50 and p99 | same, straight to the upstream |
| 100 concurrent HTTPS requests (curl --parallel)     | same, straight to the upstream                  |

Upstreams are threaded servers in a child process on host loopback; the mediator reaches
``api.test`` through a resolver that maps it to 127.0.0.1, the slirp guest through 10.0.2.2
with ``curl --resolve`` and the test CA.
"""

from __future__ import annotations

import tempfile
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from gondolin import VM
from gondolin.http import create_http_hooks
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
    percentile,
    rows,
    slirp_guest,
    split_timed,
    timed,
)
from ._raw import cold_kwargs
from ._runner import Context
from ._table import Goal, Measure, Row

AREA = "http"
SIZE = 64 * MiB
SEQUENTIAL = 200
CONCURRENT = 100
STAGE_TIMEOUT = 1200.0
NAME = "api.test"
CA_FILE = "/tmp/bench-ca.pem"


def pairs(reps: int) -> list[Pair]:
    http = "plain HTTP through QEMU -netdev user (slirp) from the same server, curl in the same image"
    direct = "HTTPS through slirp straight to the same upstream (guest trusts the test CA), curl"
    return [
        Pair(f"64 MiB HTTPS download through mediation, curl (median of {reps})", "https", "slirp_http", http,
             Goal(min_ratio=0.5)),
        Pair(f"64 MiB plain HTTP download through mediation, curl (median of {reps})", "http", "slirp_http", http),
        Pair(f"64 MiB HTTPS download through mediation vs HTTPS without it (median of {reps})", "https",
             "slirp_https", direct),
        Pair(f"{SEQUENTIAL} sequential small HTTPS requests on one keep-alive connection: p50", "seq_p50",
             "slirp_seq_p50", direct),
        Pair(f"{SEQUENTIAL} sequential small HTTPS requests on one keep-alive connection: p99", "seq_p99",
             "slirp_seq_p99", direct),
        Pair(f"{CONCURRENT} concurrent small HTTPS requests, curl --parallel: all complete (median of {reps})",
             "conc", "slirp_conc", direct),
    ]


async def collect(ctx: Context) -> list[Row]:
    from tests.vm.netservers import loopback_resolver, make_pki, start_servers

    res = Results()
    reps = ctx.reps(3)
    keys = [k for p in pairs(reps) for k in (p.ours, p.baseline) if k]
    try:
        image = await anyio.to_thread.run_sync(ensure_image, "default", ImageStore())
        accel = (await _accel.decide(image, probe_boot)).accel
        with tempfile.TemporaryDirectory(prefix="gondolin-bench-") as tmp:
            pki = make_pki(tmp, [NAME])
            with start_servers({"http": {}, "https": pki.server_spec()}) as servers:
                hooks, _ = create_http_hooks(allowed_internal_hosts=[NAME], resolver=loopback_resolver(),
                                             upstream_ca_pem=pki.ca_pem)
                with anyio.fail_after(STAGE_TIMEOUT):
                    vm = await VM.create(image=image.build_id, http_hooks=hooks, **cold_kwargs())
                    try:
                        async with slirp_guest(image, accel) as slirp:
                            # Each side's curl trusts exactly one CA (the MITM CA, the test CA):
                            # loading the guest's whole system bundle per transfer would dominate.
                            assert vm.network is not None
                            await VmShell(vm).sh(_write_ca(vm.network.ca.cert_pem))
                            await slirp.sh(_write_ca(pki.ca_pem))
                            ctx.log(f"http: VM and slirp guest up ({accel})")
                            await _measure(ctx, res, VmShell(vm), slirp, servers.ports, reps)
                    finally:
                        await vm.close()
    except Exception as exc:  # noqa: BLE001 - reported as error rows; cancellation passes
        res.failed(ctx, AREA, "mediation vs slirp", keys, exc)
    return rows(AREA, res, pairs(reps))


def _write_ca(pem: bytes) -> str:
    return f"cat > {CA_FILE} <<'EOF'\n{pem.decode()}EOF"


def _urls(ports: dict[str, int]) -> dict[str, dict[str, str]]:
    s, h = ports["https"], ports["http"]
    return {
        "ours": {"https": f"https://{NAME}:{s}", "http": f"http://{NAME}:{h}", "curl": f"curl -s --fail --cacert {CA_FILE}"},
        "slirp": {"https": f"https://{NAME}:{s}", "http": f"http://{SLIRP_HOST}:{h}",
                  "curl": f"curl -s --fail --cacert {CA_FILE} --resolve {NAME}:{s}:{SLIRP_HOST}"},
    }


async def _download(shell: Shell, curl: str, url: str) -> float:
    out, secs = split_timed(await shell.sh(timed(f"{curl} -o /dev/null -w '%{{size_download}}' {url}/bytes/{SIZE}")))
    if out.strip() != str(SIZE):
        raise BenchError(f"downloaded {out.strip()!r} bytes from {url}, expected {SIZE}")
    return SIZE / MiB / secs


async def _sequential(shell: Shell, curl: str, url: str) -> list[float]:
    out = await shell.sh(f"{curl} --http1.1 -o /dev/null -w 'T %{{time_total}} %{{num_connects}}\\n' "
                         f"'{url}/small?i=[1-{SEQUENTIAL}]'")
    lines = [line.split() for line in out.splitlines() if line.startswith("T ")]
    if len(lines) != SEQUENTIAL or sum(int(c) for _, _, c in lines) != 1:
        raise BenchError(f"expected {SEQUENTIAL} requests on one connection, got {len(lines)} lines, "
                         f"{sum(int(c) for _, _, c in lines)} connects")
    return [float(t) * 1000 for _, t, _ in lines]


async def _concurrent(shell: Shell, curl: str, url: str) -> float:
    out, secs = split_timed(await shell.sh(timed(
        f"{curl} --http1.1 --parallel --parallel-max {CONCURRENT} -o /dev/null -w 'T %{{http_code}}\\n' "
        f"'{url}/small?c=[1-{CONCURRENT}]'")))
    codes = [line.split()[1] for line in out.splitlines() if line.startswith("T ")]
    if codes != ["200"] * CONCURRENT:
        raise BenchError(f"concurrent requests: {len(codes)} answers, statuses {sorted(set(codes))}")
    return secs


async def _measure(ctx: Context, res: Results, ours: VmShell, slirp: Shell, ports: dict[str, int], reps: int) -> None:
    urls = _urls(ports)
    shells: dict[str, Shell] = {"ours": ours, "slirp": slirp}
    samples: dict[str, list[float]] = {}
    latencies: dict[str, list[float]] = {"seq": [], "slirp_seq": []}

    async def attempt(key: str, measure: Callable[..., Awaitable[Any]], *args: str | Shell) -> None:
        """One sample; a failure marks ``key`` as failed and the other measurements go on."""
        if key in res.errors:
            return
        try:
            value = await measure(*args)
        except Exception as exc:  # noqa: BLE001 - becomes an error row; cancellation passes
            res.failed(ctx, AREA, key, [key, f"{key}_p50", f"{key}_p99"], exc)
            return
        if isinstance(value, list):
            latencies[key] += value
        else:
            samples.setdefault(key, []).append(value)

    for i in range(reps):
        for side, shell in shells.items():
            u = urls[side]
            p = "" if side == "ours" else "slirp_"
            await attempt(f"{p}http", _download, shell, u["curl"], u["http"])
            await attempt(f"{p}https", _download, shell, u["curl"], u["https"])
            await attempt(f"{p}seq", _sequential, shell, u["curl"], u["https"])
            await attempt(f"{p}conc", _concurrent, shell, u["curl"], u["https"])
        ctx.log(f"http: rep {i + 1}/{reps}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in sorted(samples.items())))
    for key, values in samples.items():
        res.measures[key] = Measure.median_of(values, "s" if key.endswith("conc") else "MiB/s")
    for key, lat in latencies.items():
        if lat:
            res.measures[f"{key}_p50"] = Measure(percentile(lat, 50), "ms")
            res.measures[f"{key}_p99"] = Measure(percentile(lat, 99), "ms")
    if "seq_p50" in res.measures and "slirp_seq_p50" in res.measures:
        overhead = res.measures["seq_p50"].value - res.measures["slirp_seq_p50"].value
        res.note("seq_p50", f"curl's time_total per request, {len(latencies['seq'])} requests on {reps} "
                            f"connection(s) (each first request includes the TLS handshake); latency added by "
                            f"mediation at the median: {overhead:+.2f} ms")
    res.note("https", "guest-side TLS runs under the same emulation on both sides; each curl trusts one CA file")
