"""The OCI layer unpacker and image reader: whiteouts, ownership, and every way out of the root refused."""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile

import pytest

from gondolin.errors import ImageError
from gondolin.images.oci import _Source, image_defaults, read_image, unpack_layer, write_layout


def layer(*entries) -> bytes:
    """entries: (name, kind, payload, extra) with kind in file/dir/sym/link/fifo/chr."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in entries:
            name, kind, payload, extra = (*entry, {})[:4]
            info = tarfile.TarInfo(name)
            info.mode = extra.get("mode", 0o755 if kind == "dir" else 0o644)
            info.uid = info.gid = extra.get("uid", 0)
            info.mtime = extra.get("mtime", 1_700_000_000)
            data = None
            if kind == "file":
                data = payload.encode() if isinstance(payload, str) else payload
                info.size = len(data)
            elif kind == "dir":
                info.type = tarfile.DIRTYPE
            elif kind == "sym":
                info.type, info.linkname = tarfile.SYMTYPE, payload
            elif kind == "link":
                info.type, info.linkname = tarfile.LNKTYPE, payload
            elif kind == "fifo":
                info.type = tarfile.FIFOTYPE
            elif kind == "chr":
                info.type = tarfile.CHRTYPE
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def apply(root, *layers):
    for raw in layers:
        unpack_layer(io.BytesIO(raw), root)


def test_layers_apply_in_order_with_ownership_modes_and_links(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    apply(root,
          layer(("usr", "dir", None), ("usr/bin", "dir", None), ("usr/bin/tool", "file", "v1", {"mode": 0o4755}),
                ("bin", "sym", "usr/bin"), ("etc/", "dir", None), ("etc/conf", "file", "a", {"uid": 1000}),
                ("etc/conf.link", "link", "etc/conf"), ("run/pipe", "fifo", None), ("dev/null", "chr", None),
                ("./home/u/", "dir", None, {"mode": 0o700, "uid": 1000})),
          layer(("usr/bin/tool", "file", "v2", {"mode": 0o755})))
    assert (root / "usr/bin/tool").read_text() == "v2" and (root / "bin/tool").read_text() == "v2"
    assert os.readlink(root / "bin") == "usr/bin"
    st = (root / "etc/conf").stat()
    assert st.st_uid == 1000 and st.st_ino == (root / "etc/conf.link").stat().st_ino
    assert (root / "home/u").stat().st_mode & 0o7777 == 0o700 and (root / "home/u").stat().st_uid == 1000
    assert (root / "etc/conf").stat().st_mtime == 1_700_000_000
    assert not (root / "dev/null").exists()  # devices are skipped: the guest has devtmpfs
    assert (root / "run/pipe").is_fifo()


def test_setuid_bits_survive(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    apply(root, layer(("su", "file", "x", {"mode": 0o4755, "uid": 0})))
    assert (root / "su").stat().st_mode & 0o7777 == 0o4755


def test_whiteouts_and_opaque_directories(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    apply(root,
          layer(("a/keep", "file", "k"), ("a/gone", "file", "g"), ("a/sub/deep", "file", "d"),
                ("o/old1", "file", "1"), ("o/olddir/x", "file", "x")),
          layer(("a/.wh.gone", "file", ""), ("a/.wh.sub", "file", ""),
                ("o/new", "file", "n"), ("o/.wh..wh..opq", "file", "")))  # the marker after a sibling
    assert sorted(p.name for p in (root / "a").iterdir()) == ["keep"]
    assert sorted(p.name for p in (root / "o").iterdir()) == ["new"]


@pytest.mark.parametrize(("entries", "needle"), [
    ([("../evil", "file", "x")], "path traversal"),
    ([("a/../../evil", "file", "x")], "path traversal"),
    ([("link", "sym", "../../../../etc/passwd")], "points outside the root"),
    ([("d", "dir", None), ("d/up", "sym", "../..")], "points outside the root"),
    ([("hl", "link", "../../etc/passwd")], "path traversal"),
    ([("hl", "link", "not/there")], "not in the image"),
    ([("etc", "sym", "/etc"), ("etc/passwd", "file", "pwned")], "written through the symlink /etc"),
    ([("x", "sym", "/tmp"), ("x/.wh.y", "file", "")], "written through the symlink /x"),
])
def test_ways_out_of_the_root_are_refused(tmp_path, entries, needle):
    root = tmp_path / "root"
    root.mkdir()
    outside = tmp_path / "outside"
    outside.write_text("untouched")
    with pytest.raises(ImageError, match=needle):
        apply(root, layer(*entries))
    assert outside.read_text() == "untouched"


def test_absolute_symlinks_stay_allowed(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    apply(root, layer(("etc/localtime", "sym", "/usr/share/zoneinfo/UTC")))
    assert os.readlink(root / "etc/localtime") == "/usr/share/zoneinfo/UTC"


def test_layout_round_trip_and_defaults(tmp_path):
    digest = write_layout(tmp_path / "layout", [layer(("f", "file", "1")), layer(("g", "file", "2"))],
                          env={"A": "1", "PATH": "/bin"}, workdir="/app", user="app:app")
    layers, config, found = read_image(_Source(tmp_path / "layout", tmp_path))
    assert found == digest and len(layers) == 2
    assert image_defaults(config) == {"rootfs": "cow", "env": {"A": "1", "PATH": "/bin"}, "workdir": "/app",
                                      "user": "app"}
    root = tmp_path / "root"
    root.mkdir()
    for path, _ in layers:
        with open(path, "rb") as f:
            unpack_layer(f, root)
    assert (root / "f").read_text() == "1" and (root / "g").read_text() == "2"
    # the same layout as a tarball
    with tarfile.open(tmp_path / "layout.tar", "w") as tar:
        tar.add(tmp_path / "layout", arcname=".")
    work = tmp_path / "work"
    work.mkdir()
    assert read_image(_Source(tmp_path / "layout.tar", work))[2] == digest


def test_a_damaged_blob_is_refused(tmp_path):
    write_layout(tmp_path / "layout", [layer(("f", "file", "1"))])
    blobs = sorted((tmp_path / "layout" / "blobs" / "sha256").iterdir(), key=lambda p: p.stat().st_size)
    big = blobs[-1]
    big.write_bytes(big.read_bytes()[:-1] + b"\0")
    with pytest.raises(ImageError, match="does not match its digest"):
        read_image(_Source(tmp_path / "layout", tmp_path))


def test_docker_save_archive(tmp_path):
    d = tmp_path / "save"
    (d / "abc").mkdir(parents=True)
    (d / "abc" / "layer.tar").write_bytes(gzip.compress(layer(("hello", "file", "hi"))))
    (d / "cfg.json").write_text(json.dumps({"config": {"Env": ["X=1"], "WorkingDir": "/w"}}))
    (d / "manifest.json").write_text(json.dumps([{"Config": "cfg.json", "RepoTags": ["x:1"],
                                                  "Layers": ["abc/layer.tar"]}]))
    layers, config, _ = read_image(_Source(d, tmp_path))
    assert image_defaults(config)["workdir"] == "/w" and len(layers) == 1


def test_not_an_image(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageError, match="neither an OCI image layout"):
        read_image(_Source(tmp_path / "empty", tmp_path))
    with pytest.raises(ImageError, match="no OCI image at"):
        _Source(tmp_path / "missing", tmp_path)


def test_python3_is_required_and_found_where_images_put_it(tmp_path):
    from gondolin.images.oci import ensure_python

    empty = tmp_path / "empty"
    (empty / "usr" / "bin").mkdir(parents=True)
    with pytest.raises(ImageError, match="no /usr/bin/python3.*apt-get install -y python3-minimal"):
        ensure_python(empty, tmp_path / "img")
    debian = tmp_path / "debian"
    (debian / "usr" / "bin").mkdir(parents=True)
    (debian / "usr" / "bin" / "python3.11").write_text("elf")
    (debian / "usr" / "bin" / "python3").symlink_to("/usr/bin/python3.11")  # absolute: inside the tree
    ensure_python(debian, tmp_path / "img")
    official = tmp_path / "official"
    (official / "usr" / "local" / "bin").mkdir(parents=True)
    (official / "usr" / "local" / "bin" / "python3").write_text("elf")
    ensure_python(official, tmp_path / "img")
    assert os.readlink(official / "usr" / "bin" / "python3") == "/usr/local/bin/python3"
    dangling = tmp_path / "dangling"
    (dangling / "usr" / "bin").mkdir(parents=True)
    (dangling / "usr" / "bin" / "python3").symlink_to("/nowhere/python3")
    with pytest.raises(ImageError, match="no /usr/bin/python3"):
        ensure_python(dangling, tmp_path / "img")
