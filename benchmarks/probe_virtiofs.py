"""Experiment for the shared-memory file path (docs/filesystem.md, "virtiofs transport"): one
raw guest with three shares side by side — our vhost-user-fs device (gondolin.vhost.fs_device)
over a RealFSProvider twice, with the guest page cache (``cache="auto"``, what the wired-in
transport uses) and with direct I/O (``cache="none"``), and QEMU's virtio-9p over another host
directory — running the same workloads as benchmarks/bench_vfs.py, without the gondolin VM
around it (bench_vfs.py measures the wired-in transport, `VM.create(fs_transport="virtiofs")`).

    .venv/bin/python -m benchmarks.probe_virtiofs [REPEATS]

Prints one JSON line per share and repeat (seconds; lower is better), with this process's CPU
seconds (``host_cpu``: the device) and QEMU's (``qemu_cpu``: the guest and 9p) over the
write + read workloads.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import tempfile

import anyio

from gondolin.images import ensure_image
from gondolin.vfs.port import VfsServer
from gondolin.vfs.realfs import RealFSProvider
from gondolin.vhost.fs_device import serve_virtiofs

from ._raw import process_cpu_seconds, raw_guest
from .bench_vfs import GUEST_SCRIPT, NINEP_OPTS

MAKE_TAR = ("import io, os, tarfile\n"
            "with tarfile.open('/tmp/small.tar', 'w') as t:\n"
            "    for i in range(1000):\n"
            "        ti = tarfile.TarInfo(f'd{i % 20}/f{i}'); ti.size = 512\n"
            "        t.addfile(ti, io.BytesIO(os.urandom(512)))\n")


def _self_cpu() -> float:
    t = os.times()
    return t.user + t.system


def _stat_tree(root: str) -> None:
    os.mkdir(f"{root}/stat")
    for i in range(2000):
        with open(f"{root}/stat/f{i}", "w") as f:
            f.write("x")


async def main(repeats: int) -> None:
    image = ensure_image()
    with tempfile.TemporaryDirectory() as vdir, tempfile.TemporaryDirectory() as ndir, \
            tempfile.TemporaryDirectory() as pdir, tempfile.TemporaryDirectory() as sockdir:
        for d in (vdir, ndir, pdir):
            _stat_tree(d)
        extra = ["-object", "memory-backend-memfd,id=mem,size=512M,share=on", "-machine", "memory-backend=mem",
                 "-virtfs", f"local,path={pdir},mount_tag=p9,security_model=none,id=p9"]
        devices = []
        for tag, root, cache in (("vfauto", vdir, "auto"), ("vfnone", ndir, "none")):
            path = os.path.join(sockdir, f"{tag}.sock")
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(path)
            listener.listen(1)
            devices.append((listener, VfsServer({"/v": RealFSProvider(root)}), cache))
            extra += ["-chardev", f"socket,id={tag},path={path}",
                      "-device", f"vhost-user-fs-pci,chardev={tag},tag={tag},queue-size=1024"]
        async with anyio.create_task_group() as tg:
            for listener, vfs, cache in devices:
                tg.start_soon(lambda lst=listener, v=vfs, c=cache: serve_virtiofs(lst, v, cache=c))
            async with raw_guest(image, accel="tcg", extra_args=extra) as guest:
                setup = ("modprobe virtiofs && mkdir -p /tmp/vf /tmp/vn /tmp/p9 && "
                         "mount -t virtiofs vfauto /tmp/vf && mount -t virtiofs vfnone /tmp/vn && "
                         "for m in /tmp/vf /tmp/vn; do echo 1024 > /sys/class/bdi/$(mountpoint -d $m)/read_ahead_kb; done && "
                         f"modprobe 9pnet_virtio && mount -t 9p -o {NINEP_OPTS} p9 /tmp/p9 && "
                         f"cat > /tmp/s.py <<'EOF'\n{GUEST_SCRIPT}\nEOF\n"
                         f"python3 -c \"$(cat <<'EOF'\n{MAKE_TAR}\nEOF\n)\"")
                await guest.check(["bash", "-c", setup])
                for rep in range(repeats):
                    for name, root in (("virtiofs", "/tmp/vf/v"), ("virtiofs cache=none", "/tmp/vn/v"),
                                       ("9p", "/tmp/p9")):
                        res = {}
                        cpu0 = (_self_cpu(), process_cpu_seconds(guest.qemu_pid))
                        for what, args in (("write", ["0", "64"]), ("read", []), ("stat", []),
                                           ("tar", [str(rep)])):
                            out = await guest.check(["python3", "/tmp/s.py", what, root, *args], timeout=600)
                            res[what] = json.loads(out)
                            if what == "read":
                                res["host_cpu"] = round(_self_cpu() - cpu0[0], 3)
                                res["qemu_cpu"] = round(process_cpu_seconds(guest.qemu_pid) - cpu0[1], 3)
                        print(json.dumps({"share": name, "repeat": rep, **res}), flush=True)
            tg.cancel_scope.cancel()


if __name__ == "__main__":
    anyio.run(main, int(sys.argv[1]) if len(sys.argv) > 1 else 2)
