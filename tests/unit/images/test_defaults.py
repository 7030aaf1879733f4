"""Image defaults under the VM's options, and disk_size from options to the QEMU command line."""

from pathlib import Path

import pytest

from gondolin.images.store import Image, apply_image_defaults
from gondolin.machine.shape import machine_spec
from gondolin.options import VMOptions
from gondolin.qemu.argv import build_argv


def image(tmp_path, defaults=None, rootfs_mb=100):
    for name in ("vmlinux", "initrd.img"):
        (tmp_path / name).write_bytes(b"x")
    with open(tmp_path / "rootfs.ext4", "wb") as f:
        f.truncate(rootfs_mb << 20)
    return Image("a" * 24, tmp_path, {"defaults": defaults} if defaults is not None else {})


def test_disk_size_is_checked():
    assert VMOptions(disk_size="4G").checked().disk_size == 4096
    assert VMOptions(disk_size=2048).checked().disk_size == 2048
    with pytest.raises(ValueError, match="disk_size needs rootfs='cow'"):
        VMOptions(disk_size="4G", rootfs="readonly").checked()
    with pytest.raises(ValueError, match="invalid disk_size 'lots'"):
        VMOptions(disk_size="lots").checked()


def test_image_env_sits_under_the_vms_env(tmp_path):
    img = image(tmp_path, {"env": {"A": "image", "B": "image"}, "rootfs": "readonly"})
    opts = apply_image_defaults(VMOptions(env={"B": "vm"}).checked(), img)
    assert opts.env == {"A": "image", "B": "vm"}
    assert opts.rootfs == "readonly"  # the image's mode when the options keep the default
    assert apply_image_defaults(VMOptions(rootfs="memory").checked(), img).rootfs == "memory"
    assert apply_image_defaults(VMOptions().checked(), image(tmp_path)).env == {}


def test_disk_size_smaller_than_the_image_is_refused(tmp_path):
    img = image(tmp_path, rootfs_mb=300)
    with pytest.raises(ValueError, match="smaller than the image's root disk"):
        apply_image_defaults(VMOptions(disk_size="256M").checked(), img)
    assert apply_image_defaults(VMOptions(disk_size="1G").checked(), img).disk_size == 1024


def test_disk_size_reaches_the_kernel_command_line(tmp_path):
    img = image(tmp_path)
    run = Path("/run-dir")
    plain = " ".join(build_argv(machine_spec(VMOptions().checked(), img, "tcg", run)))
    grown = " ".join(build_argv(machine_spec(VMOptions(disk_size="2G").checked(), img, "tcg", run)))
    assert "gondolin.disk=" not in plain and "gondolin.disk=2048M" in grown  # a template shape of its own
