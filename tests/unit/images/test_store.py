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


def test_tag_export_import_and_damage(tmp_path):
    store = ImageStore(tmp_path / "store")
    image = store.add(staging_dir(tmp_path), {"kernel_version": "6.1", "defaults": {"workdir": "/w"}})
    store.set_ref("one", image.build_id)
    assert store.tag("one", "two:latest").build_id == image.build_id
    assert store.resolve("two:latest").defaults == {"workdir": "/w"}
    archive = tmp_path / "img.tar.gz"
    store.export("two:latest", archive)
    other = ImageStore(tmp_path / "other")
    imported = other.import_archive(archive, "copy")
    assert imported.build_id == image.build_id and other.resolve("copy").manifest["kernel_version"] == "6.1"
    assert other.verify(imported) == []
    # a damaged asset: same size, different bytes -> verify names it; a changed size -> resolve refuses
    rootfs = imported.path / "rootfs.ext4"
    rootfs.write_bytes(b"X" * rootfs.stat().st_size)
    assert other.verify(other.resolve("copy")) == ["rootfs.ext4: sha256 mismatch"]
    with pytest.raises(ImageError, match="damaged"):
        other.export("copy", tmp_path / "again.tar")
    rootfs.write_bytes(b"short")
    with pytest.raises(ImageError, match="damaged: rootfs.ext4 is 5 bytes"):
        other.resolve("copy")


def test_import_refuses_foreign_archives(tmp_path):
    import tarfile

    bad = tmp_path / "bad.tar"
    (tmp_path / "evil").write_text("x")
    with tarfile.open(bad, "w") as tar:
        tar.add(tmp_path / "evil", arcname="../evil")
    with pytest.raises(ImageError, match="not a Gondolin image archive"):
        ImageStore(tmp_path / "store").import_archive(bad)


def test_gc_removes_unreferenced_images_and_unused_build_layers(tmp_path):
    store = ImageStore(tmp_path / "store")
    kept = store.add(staging_dir(tmp_path, "a", b"a"), {})
    store.set_ref("kept", kept.build_id)
    dropped = store.add(staging_dir(tmp_path, "b", b"b"), {})
    build = tmp_path / "build"
    (build / "layers").mkdir(parents=True)
    used = build / "layers" / "rootfs-used.ext4"
    os.link(kept.rootfs, used)
    unused = build / "layers" / "rootfs-unused.ext4"
    unused.write_bytes(b"z" * 8192)
    base = build / "layers" / "base-x.tar"
    base.write_bytes(b"t")
    removed, freed = store.gc(build)
    assert f"image {dropped.build_id}" in removed and "build cache rootfs-unused.ext4" in removed
    assert freed > 0 and used.exists() and base.exists() and not unused.exists()
    assert [i.build_id for i in store.images()] == [kept.build_id]
