"""Run in a fresh process: host RSS before and after creating N idle VMs. Prints one JSON line.

``python -m benchmarks._memprobe N [IMAGE]``. QEMU's own memory is reported apart (``qemu_rss``): the
goal is about what the Python host process spends per VM besides QEMU. The VMs have the default
options (cow disk, network on) but boot cold, so no warm-start template is saved meanwhile.
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import anyio

SETTLE_SECONDS = 2.0  # let the VMs go idle before reading RSS


def rss_bytes(pid: int | str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise OSError(f"no VmRSS for pid {pid}")


async def probe(n: int, image: str = "default") -> dict[str, object]:
    from gondolin import VM
    from gondolin.images import ImageStore, ensure_image

    from ._raw import cold_kwargs

    # One-time work that is no VM's cost: resolving the image (and anyio's worker thread).
    await anyio.to_thread.run_sync(ensure_image, image, ImageStore())
    gc.collect()
    before = rss_bytes()
    vms: list[VM] = []

    async def create() -> None:
        vms.append(await VM.create(image=image, **cold_kwargs()))

    try:
        async with anyio.create_task_group() as tg:
            for _ in range(n):
                tg.start_soon(create)
        await anyio.sleep(SETTLE_SECONDS)
        gc.collect()
        after = rss_bytes()
        qemu = [rss_bytes(vm.qemu_pid) for vm in vms if vm.qemu_pid]
    finally:
        with anyio.CancelScope(shield=True):
            for vm in vms:
                await vm.close()
    return {"n": n, "before": before, "after": after, "qemu_rss": qemu}


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    image = sys.argv[2] if len(sys.argv) > 2 else "default"
    print(json.dumps(anyio.run(probe, n, image)), flush=True)


if __name__ == "__main__":
    main()
