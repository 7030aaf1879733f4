import json
import os

import pytest

from gondolin.errors import ImageError
from gondolin.images.builder import module_load_order
from gondolin.images.cpio import write_newc
from gondolin.images.store import ASSETS, ImageStore


def staging_dir(tmp_path, name="s", content=b"k"):
    d = tmp_path / name
    d.mkdir()
    for asset in ASSETS:
        (d / asset).write_bytes(content + asset.encode())
    return d


def test_add_derives_build_id_from_content_and_records_hashes(tmp_path):
    store = ImageStore(tmp_path / "store")
    image = store.add(staging_dir(tmp_path), {"kernel_version": "6.1"})
    assert len(image.build_id) == 24
    manifest = json.loads((image.path / "manifest.json").read_text())
    assert set(manifest["assets"]) == set(ASSETS)
    assert manifest["kernel_version"] == "6.1"
    assert store.verify(image) == []
    same = store.add(staging_dir(tmp_path, "again"), {"kernel_version": "6.1", "note": "rebuilt"})
    assert same.build_id == image.build_id and same.manifest["note"] == "rebuilt"
    different = store.add(staging_dir(tmp_path, "other", b"z"), {})
    assert different.build_id != image.build_id


def test_refs_resolve_by_name_id_and_prefix(tmp_path):
    store = ImageStore(tmp_path / "store")
    image = store.add(staging_dir(tmp_path), {})
    store.set_ref("default", image.build_id)
    assert store.resolve("default").build_id == image.build_id
    assert store.resolve(image.build_id).build_id == image.build_id
    assert store.resolve(image.build_id[:8]).build_id == image.build_id
    assert store.resolve(str(image.path)).build_id == image.build_id
    assert store.list_refs() == {"default": image.build_id}


def test_missing_ref_names_the_fix(tmp_path):
    with pytest.raises(ImageError, match="gondolin image build"):
        ImageStore(tmp_path / "store").resolve("default")


@pytest.mark.parametrize("name", ["../evil", "", "a/b", ".hidden"])
def test_invalid_ref_names_are_refused(tmp_path, name):
    with pytest.raises(ImageError):
        ImageStore(tmp_path / "store").set_ref(name, "0" * 24)


def test_verify_detects_tampering_and_missing_assets(tmp_path):
    store = ImageStore(tmp_path / "store")
    image = store.add(staging_dir(tmp_path), {})
    (image.path / "initrd.img").write_bytes(b"kinitrd.imX")  # same size, different bytes
    assert store.verify(image) == ["initrd.img: sha256 mismatch"]
    os.unlink(image.path / "vmlinux")
    with pytest.raises(ImageError, match="missing vmlinux"):
        store.resolve(image.build_id)


def test_remove_ref_then_unreferenced_object(tmp_path):
    store = ImageStore(tmp_path / "store")
    image = store.add(staging_dir(tmp_path), {})
    store.set_ref("default", image.build_id)
    store.set_ref("pinned", image.build_id)
    assert store.remove("default") == ["ref default"]
    assert image.path.exists()
    assert store.remove("pinned") == ["ref pinned", f"image {image.build_id}"]
    assert not image.path.exists()


def test_module_load_order_puts_dependencies_first(tmp_path):
    dep = tmp_path / "modules.dep"
    dep.write_text(
        "kernel/fs/ext4/ext4.ko: kernel/fs/mbcache.ko kernel/fs/jbd2/jbd2.ko kernel/lib/crc16.ko\n"
        "kernel/fs/jbd2/jbd2.ko:\n"
        "kernel/fs/mbcache.ko:\n"
        "kernel/lib/crc16.ko:\n"
        "kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko\n"
        "kernel/drivers/virtio/virtio_ring.ko: kernel/drivers/virtio/virtio.ko\n"
        "kernel/drivers/virtio/virtio.ko:\n"
        "kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko\n"
    )
    order = module_load_order(dep, ["virtio_pci", "virtio-blk", "ext4", "builtin_thing"])
    names = [os.path.basename(p) for p in order]
    assert names.index("virtio.ko") < names.index("virtio_ring.ko") < names.index("virtio_pci.ko")
    assert names.index("jbd2.ko") < names.index("ext4.ko")
    assert names.count("virtio.ko") == 1
    assert "virtio_blk.ko" in names and len(names) == 8


def test_cpio_newc_is_readable_by_cpio_tool(tmp_path):
    import shutil
    import subprocess

    src = tmp_path / "file.txt"
    src.write_bytes(b"hello initramfs\n")
    out = tmp_path / "initrd.img"
    write_newc(out, [("bin", b"", 0o40755), ("bin/hello", src, 0o100755), ("bin/sh", b"hello", 0o120777)])
    data = out.read_bytes()
    assert data.startswith(b"070701") and b"TRAILER!!!" in data and len(data) % 4 == 0
    if shutil.which("cpio"):
        listing = subprocess.run(["cpio", "-it"], input=data, capture_output=True).stdout.decode().split()
        assert listing == ["bin", "bin/hello", "bin/sh"]
        extract = tmp_path / "x"
        extract.mkdir()
        subprocess.run(["cpio", "-idm", "--quiet"], input=data, cwd=extract, check=True)
        assert (extract / "bin/hello").read_bytes() == b"hello initramfs\n"
        assert os.readlink(extract / "bin/sh") == "hello"


def test_build_points_the_ref_back_at_an_image_built_from_the_same_inputs(tmp_path, monkeypatch):
    from gondolin.images.builder import ImageBuilder

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    store = ImageStore(tmp_path / "store")
    builder = ImageBuilder(store, progress=None)
    ours = store.add(staging_dir(tmp_path, "ours"), {"inputs_key": builder.inputs_key()})
    other = store.add(staging_dir(tmp_path, "other", b"z"), {"inputs_key": "from-another-checkout"})
    store.set_ref("default", other.build_id)
    assert not builder.is_current()

    def no_real_build(*args, **kwargs):
        raise AssertionError("must not rebuild when the store already has this code's image")

    monkeypatch.setattr(builder, "_build_locked", no_real_build)
    assert builder.build().build_id == ours.build_id
    assert store.ref("default") == ours.build_id and builder.is_current()
