"""The virtiofs transport's QEMU machine and option checks (no QEMU needed)."""

from pathlib import Path

import pytest

from gondolin.images.store import Image
from gondolin.machine.shape import (
    FS_PORT,
    VIRTIOFS_SOCKET,
    machine_spec,
    uses_virtiofs,
    virtiofs_chardev,
    virtiofs_device,
)
from gondolin.options import VMOptions
from gondolin.qemu.argv import build_argv
from gondolin.vfs import MemoryProvider

IMAGE = Image("abc123", Path("/images/abc123"), {})
RUN = Path("/tmp/run")


def argv(**changes) -> list[str]:
    options = VMOptions(**changes).checked()
    return build_argv(machine_spec(options, IMAGE, "tcg", RUN), "qemu")


def test_virtiofs_replaces_the_fs_port_and_shares_guest_memory() -> None:
    args = argv(mounts={"/w": MemoryProvider()}, fs_transport="virtiofs", memory="1G")
    line = " ".join(args)
    assert FS_PORT not in line
    assert "memory-backend-memfd,id=mem,size=1024M,share=on" in args
    # QEMU cannot migrate the device: it is hot-plugged after every start, never on the command
    # line, so templates, checkpoints and forks hold the memfd machine without it.
    assert "vhost-user-fs" not in line and "id=vfs" not in line


def test_the_hot_plugged_device() -> None:
    chardev = virtiofs_chardev(str(RUN / VIRTIOFS_SOCKET))
    assert chardev["id"] == "vfs"
    assert chardev["backend"]["data"] == {"addr": {"type": "unix", "data": {"path": str(RUN / VIRTIOFS_SOCKET)}},
                                          "server": False}
    device = virtiofs_device()
    assert device["driver"] == "vhost-user-fs-pci" and device["chardev"] == "vfs" and device["tag"] == "gondolin"


def test_the_default_transport_is_unchanged() -> None:
    line = " ".join(argv(mounts={"/w": MemoryProvider()}))
    assert f"name={FS_PORT}" in line and "vhost-user-fs" not in line and "memfd" not in line


def test_virtiofs_without_mounts_adds_nothing() -> None:
    options = VMOptions(fs_transport="virtiofs").checked()
    assert not uses_virtiofs(options)
    assert "vhost-user-fs" not in " ".join(argv(fs_transport="virtiofs"))


def test_fs_transport_is_checked() -> None:
    with pytest.raises(ValueError, match="fs_transport must be 'port' or 'virtiofs'"):
        VMOptions(fs_transport="nfs").checked()  # type: ignore[arg-type]


def test_cli_flag() -> None:
    from gondolin._cli_options import vm_options
    from gondolin.cli import build_parser

    args = build_parser().parse_args(["exec", "--mount", "/tmp:/w", "--fs-transport", "virtiofs", "--", "true"])
    assert vm_options(args, None).fs_transport == "virtiofs"
    args = build_parser().parse_args(["exec", "--", "true"])
    assert vm_options(args, None).fs_transport == "port"
