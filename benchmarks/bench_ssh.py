"""SSH egress: ``git clone`` over the host's SSH proxy vs the same clone over plain mapped TCP.

| ours (VM.create(ssh=SshProxyOptions(...)))               | baseline, same run, same VM                      |
|----------------------------------------------------------|--------------------------------------------------|
| git clone of a 16 MiB repository over the SSH proxy       | the same clone over a ``tcp_hosts`` rule to the same sshd, the key in the guest |
| git clone of a one-file repository (connection setup)     | the same, over the mapped rule                   |

Both paths reach one real ``sshd`` on host loopback (tests/sshd.py) from one VM: the proxy path
ends the guest's SSH at the host and opens a second SSH connection upstream with the host's key;
the baseline relays the guest's own SSH connection byte for byte (the guest holds a throwaway
key for it). The clones alternate so drift in machine load hits both.
"""

from __future__ import annotations

import os
import shlex
import tempfile
from pathlib import Path

import anyio

from gondolin import VM

from ._netlab import BenchError, Pair, Results, VmShell, rows, split_timed, timed
from ._runner import Context
from ._table import Goal, Measure, Row

AREA = "ssh egress"
BIG = 16 * 1024 * 1024
STAGE_TIMEOUT = 900.0
PROXY_HOST = "git.test"
MAPPED_HOST = "sshd.test"
GUEST_KEY = "/root/.ssh/bench_ed25519"
GUEST_KH = "/root/.ssh/bench_known_hosts"


def pairs(reps: int) -> list[Pair]:
    base = "the same clone over a tcp_hosts rule straight to the same loopback sshd (the guest's own ssh, its key in the guest)"
    return [
        Pair(f"git clone over SSH of a 16 MiB repository (incompressible), through the host's SSH proxy "
             f"(median of {reps})", "big", "mapped_big", base, Goal(max_ratio=2.0)),
        Pair(f"git clone over SSH of a one-file repository: connection setup and negotiation (median of {reps})",
             "small", "mapped_small", base, Goal(max_ratio=2.5)),
    ]


async def collect(ctx: Context) -> list[Row]:
    from gondolin.ssh import SshProxyOptions
    from tests.sshd import LoopbackSshd, find_sshd

    res = Results()
    reps = ctx.reps(3)
    keys = [k for p in pairs(reps) for k in (p.ours, p.baseline) if k]
    try:
        if find_sshd() is None:
            raise BenchError("sshd is not installed (apt-get install openssh-server)")
        with tempfile.TemporaryDirectory(prefix="gondolin-bench-ssh-") as tmp, LoopbackSshd(Path(tmp)) as sshd:
            sshd.bare_repo("small")
            sshd.bare_repo("big", {"blob.bin": os.urandom(BIG), "README": b"big\n"})
            ssh = SshProxyOptions(allowed_hosts=[PROXY_HOST], credential=str(sshd.client_key),
                                  known_hosts=str(sshd.known_hosts), username=sshd.user,
                                  upstreams={PROXY_HOST: sshd.address})
            with anyio.fail_after(STAGE_TIMEOUT):
                async with await VM.create(memory="1G", ssh=ssh,
                                           tcp_hosts={f"{MAPPED_HOST}:22": sshd.address}) as vm:
                    ctx.log(f"ssh: VM up, sshd on {sshd.address}")
                    await _measure(ctx, res, vm, sshd, reps)
    except Exception as exc:  # noqa: BLE001 - reported as error rows; cancellation passes
        res.failed(ctx, AREA, "git clone over the SSH proxy vs mapped TCP", keys, exc)
    return rows(AREA, res, pairs(reps))


async def _measure(ctx: Context, res: Results, vm: VM, sshd: object, reps: int) -> None:
    from tests.sshd import LoopbackSshd

    assert isinstance(sshd, LoopbackSshd)
    shell = VmShell(vm)
    host_pub = (sshd.root / "host_ed25519.pub").read_text().split()
    await shell.sh(f"mkdir -p /root/.ssh && chmod 700 /root/.ssh && "
                   f"echo {shlex.quote(f'{MAPPED_HOST} {host_pub[0]} {host_pub[1]}')} > {GUEST_KH}")
    r = await vm.exec(["sh", "-c", f"cat > {GUEST_KEY} && chmod 600 {GUEST_KEY}"],
                      stdin=sshd.client_key.read_bytes())
    if r.exit_code != 0:
        raise BenchError(f"could not install the baseline key: {r.stderr}")
    repos = sshd.root / "repos"
    direct = (f"ssh -i {GUEST_KEY} -o IdentitiesOnly=yes -o UserKnownHostsFile={GUEST_KH} "
              "-o GlobalKnownHostsFile=/dev/null -o StrictHostKeyChecking=yes")
    urls = {"ours": f"{sshd.user}@{PROXY_HOST}:{repos}", "mapped": f"{sshd.user}@{MAPPED_HOST}:{repos}"}
    env = {"ours": "", "mapped": f"GIT_SSH_COMMAND={shlex.quote(direct)} "}
    samples: dict[str, list[float]] = {k: [] for k in ("big", "small", "mapped_big", "mapped_small")}
    for i in range(reps):
        for side in ("ours", "mapped"):
            for name in ("big", "small"):
                dest = f"/tmp/clone-{side}-{name}"
                out, secs = split_timed(await shell.sh(
                    timed(f"{env[side]}git clone -q {urls[side]}/{name}.git {dest}"), timeout=600))
                check = await shell.sh(f"git -C {dest} log -1 --format=%s; rm -rf {dest}")
                if check.strip() != "init":
                    raise BenchError(f"{side} clone of {name}: unexpected checkout {check!r}")
                key = name if side == "ours" else f"mapped_{name}"
                samples[key].append(secs)
        ctx.log(f"ssh: rep {i + 1}/{reps}: big {samples['big'][-1]:.2f}s vs {samples['mapped_big'][-1]:.2f}s, "
                f"small {samples['small'][-1]:.2f}s vs {samples['mapped_small'][-1]:.2f}s")
    for key, values in samples.items():
        res.measures[key] = Measure.median_of(values, "s")
    res.note("big", "both paths use the guest's OpenSSH and git; the proxy adds a second SSH session on the host "
                    "(asyncssh, decrypt + re-encrypt of every byte)")
