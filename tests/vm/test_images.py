"""Custom guest images, end to end: a build file with Debian packages, a copied file and a
post-build ``pip install``; an OCI image layout made here; bad build files; ``disk_size``.

The slow builds are cached by content in the real image store (and the OCI layout under the
build cache), so only the first run of the suite on a machine pays for them: about 90 s for the
custom image (mmdebstrap of numpy + nodejs with downloads, a pip install) and 25 s for the OCI
layout and its import (measured on a busy 2-core machine). A warm run of this module takes about
a minute: three cold VM boots under TCG, filling a small disk, and the failing build (which
unpacks the cached Debian layer before its command fails).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import anyio
import pytest

from gondolin import VM
from gondolin.errors import ImageError
from gondolin.images import ImageStore
from gondolin.images.config import config_from_dict, load_config
from gondolin.images.custom import build_image
from gondolin.images.oci import import_oci, write_layout
from gondolin.images.store import cache_root

pytestmark = [pytest.mark.anyio, pytest.mark.vm]

FILES = Path(__file__).resolve().parent / "image_files"
TOOLS_TAG = "gondolin-test-tools"
OCI_TAG = "gondolin-test-oci"


@pytest.fixture(scope="module")
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="module")
def tools_image():
    """The build file's image: built once per content of its inputs, then found in the store."""
    return build_image(load_config(FILES / "image.toml"), TOOLS_TAG, progress=None)


async def test_custom_image_packages_pip_files_env_workdir_and_disk_size(tools_image):
    base_mb = tools_image.rootfs.stat().st_size >> 20
    disk_mb = base_mb + 64
    async with await VM.create(image=TOOLS_TAG, warm=False, disk_size=f"{disk_mb}M") as vm:
        r = await vm.exec("python3 -c 'import numpy, tomli_w; print(int(numpy.arange(4).sum()), tomli_w.dumps({\"a\": 1}).strip())'")
        assert r.exit_code == 0, r.stderr
        assert r.stdout.strip() == "6 a = 1"
        r = await vm.exec(["node", "-e", "console.log(6 * 7)"])
        assert (r.exit_code, r.stdout.strip()) == (0, "42"), r.stderr
        r = await vm.exec("greet; pwd; echo $GONDOLIN_IMAGE_FLAVOUR")
        assert r.stdout.split() == ["hello", "from", "the", "custom", "image", "/srv", "test-tools"]
        assert (await vm.exec("pwd", cwd="/tmp")).stdout.strip() == "/tmp"  # exec's own cwd wins
        # disk_size: the root file system grew past the image's size at start ...
        r = await vm.exec("df -BM --output=size,avail / | tail -1")
        size_mb, avail_mb = (int(v.rstrip("M")) for v in r.stdout.split())
        assert base_mb < size_mb <= disk_mb, r.stdout
        # ... and a guest that writes forever gets ENOSPC, while the host overlay stays capped.
        r = await vm.exec("dd if=/dev/zero of=/fill bs=1M status=none; echo rc=$?; sync", timeout=600)
        assert "No space left on device" in r.stderr and "rc=1" in r.stdout, (r.stdout, r.stderr)
        full = await vm.exec("df -BM --output=avail / | tail -1")
        assert int(full.stdout.strip().rstrip("M")) <= 1
        overlay = vm._machine.disk_overlay
        assert overlay is not None
        info = (await anyio.run_process(["qemu-img", "info", "--output=json", "-U", str(overlay)])).stdout.decode()
        assert f'"virtual-size": {disk_mb << 20}' in info
        used = os.stat(overlay).st_blocks * 512
        assert used <= (disk_mb + 16) << 20, f"overlay uses {used >> 20} MiB for a {disk_mb} MiB disk"
        assert used >= (avail_mb - 64) << 20  # the writes really went to this file


def test_unknown_package_and_failing_command_name_the_problem(tools_image, tmp_path):
    store = ImageStore()
    before = {i.build_id for i in store.images()}
    with pytest.raises(ImageError, match="unknown package 'no-such-package-gondolin'"):
        build_image(config_from_dict({"debian": {"packages": ["no-such-package-gondolin"]}}, tmp_path),
                    "gondolin-test-bad", progress=None)
    # Same packages as the tools image: its Debian layer is cached, only the command runs.
    config = load_config(FILES / "image.toml")
    bad = config_from_dict({"debian": {"packages": list(config.packages)}, "rootfs": {"free_space": "64M"},
                            "build": {"commands": ["echo preparing; echo broken >&2; exit 3"]}}, tmp_path)
    with pytest.raises(ImageError) as info:
        build_image(bad, "gondolin-test-bad", progress=None)
    message = str(info.value)
    assert "post-build command #1 failed (exit 3)" in message and "preparing" in message and "broken" in message
    assert store.ref("gondolin-test-bad") is None
    assert {i.build_id for i in store.images()} == before  # no half image in the store


def oci_layout() -> Path:
    """An OCI layout of two layers made from the default image's root filesystem (debugfs
    dumps it, no mount): a Debian tree, then a layer that adds an app directory, deletes a file
    (whiteout) and hides a directory's old contents (opaque). Cached by the tree's identity."""
    rootfs = ImageStore().resolve("default").rootfs
    st = rootfs.stat()
    key = hashlib.sha256(f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:1".encode()).hexdigest()[:12]
    layout = cache_root() / "build" / f"test-oci-{key}"
    if (layout / "index.json").is_file():
        return layout
    for old in layout.parent.glob("test-oci-*"):
        subprocess.run(["rm", "-rf", str(old)], check=True)
    tmp = layout.with_name(layout.name + ".tmp")
    subprocess.run(["rm", "-rf", str(tmp)], check=True)
    tree = tmp / "tree"
    tree.mkdir(parents=True)
    subprocess.run(["debugfs", "-R", f"rdump / {tree}", str(rootfs)], check=True, capture_output=True)
    (tree / "etc" / "gondolin-doomed").write_text("deleted by the upper layer\n")
    (tree / "opt" / "hidden").mkdir(parents=True)
    (tree / "opt" / "hidden" / "old.txt").write_text("hidden by an opaque directory\n")
    base = io.BytesIO()
    with tarfile.open(fileobj=base, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.add(tree, arcname=".", recursive=True)
    upper = io.BytesIO()
    with tarfile.open(fileobj=upper, mode="w", format=tarfile.PAX_FORMAT) as tar:
        def add(name: str, data: bytes | None = None, mode: int = 0o644, uid: int = 0) -> None:
            info = tarfile.TarInfo(name)
            info.mode, info.uid, info.gid = mode, uid, uid
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        add("srv/app", mode=0o755, uid=1000)
        add("srv/app/hello.txt", b"hello from the upper layer\n", uid=1000)
        add("etc/.wh.gondolin-doomed", b"")
        add("opt/hidden/.wh..wh..opq", b"")
        add("opt/hidden/new.txt", b"new\n")
    write_layout(tmp / "layout", [base.getvalue(), upper.getvalue()],
                 env={"PATH": "/usr/local/bin:/usr/bin:/bin", "APP_GREETING": "from-oci"}, workdir="/srv/app")
    os.replace(tmp / "layout", layout)
    subprocess.run(["rm", "-rf", str(tmp)], check=True)
    return layout


@pytest.fixture(scope="module")
def oci_image():
    return import_oci(oci_layout(), OCI_TAG, progress=None)


async def test_oci_layout_imports_and_boots_with_its_env_and_workdir(oci_image):
    image = oci_image
    assert image.manifest["kind"] == "oci" and image.manifest["oci_source"]["digest"].startswith("sha256:")
    assert import_oci(oci_layout(), OCI_TAG, progress=None).build_id == image.build_id  # cached
    assert image.defaults["workdir"] == "/srv/app" and image.defaults["env"]["APP_GREETING"] == "from-oci"
    async with await VM.create(image=OCI_TAG, warm=False) as vm:
        r = await vm.exec("pwd; echo $APP_GREETING; cat hello.txt; stat -c %u hello.txt; ls /opt/hidden; "
                          "test -e /etc/gondolin-doomed || echo whiteout-applied")
        assert r.exit_code == 0, r.stderr
        assert r.stdout.split("\n")[:6] == ["/srv/app", "from-oci", "hello from the upper layer", "1000",
                                            "new.txt", "whiteout-applied"]


async def test_disk_size_survives_a_warm_start_and_is_a_template_shape_of_its_own(tmp_path, monkeypatch):
    monkeypatch.setenv("GONDOLIN_TEMPLATE_DIR", str(tmp_path / "templates"))  # none of the shared templates
    base_mb = ImageStore().resolve("default").rootfs.stat().st_size >> 20
    size = f"{base_mb + 512}M"
    sizes = []
    for _ in range(2):  # the first boots and saves the template, the second is restored from it
        async with await VM.create(memory="384M", network=False, disk_size=size) as vm:
            sizes.append((vm.restored_from, (await vm.exec("df -BM --output=size / | tail -1")).stdout.strip()))
    assert sizes[0][0] is None and sizes[1][0] is not None, sizes
    grown = int(sizes[1][1].rstrip("M"))
    assert sizes[0][1] == sizes[1][1] and grown > base_mb + 256, sizes


def test_the_cli_finds_the_cached_build_and_inspects_it(tools_image):
    cli = [sys.executable, "-m", "gondolin.cli", "image"]
    build = subprocess.run([*cli, "build", "--config", str(FILES / "image.toml"), "--tag", TOOLS_TAG],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr
    assert f"{TOOLS_TAG} -> {tools_image.build_id}" in build.stdout and "up to date" in build.stderr
    inspect = subprocess.run([*cli, "inspect", TOOLS_TAG], capture_output=True, text=True, timeout=60)
    manifest = json.loads(inspect.stdout)
    assert manifest["kind"] == "custom" and TOOLS_TAG in manifest["refs"]
    assert manifest["extra_packages"] == ["python3-numpy", "nodejs"] and "openssh-server" in manifest["packages"]
    assert manifest["config"]["files"][0]["dest"] == "/usr/local/bin/greet"
    assert len(manifest["config"]["files"][0]["sha256"]) == 64
    assert manifest["defaults"]["workdir"] == "/srv"
    assert set(manifest["assets"]) == {"vmlinux", "initrd.img", "rootfs.ext4"}
