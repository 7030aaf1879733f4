"""`gondolin image ...` management commands against a scratch store (no builds, no VMs)."""

import json
import tomllib

import pytest

from gondolin.cli import main
from gondolin.images.store import ASSETS, ImageStore


def run(capsys, *argv):
    with pytest.raises(SystemExit) as info:
        main(["image", *argv])
    out, err = capsys.readouterr()
    return info.value.code, out, err


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("GONDOLIN_IMAGE_DIR", str(tmp_path / "store"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    staging = tmp_path / "staging"
    staging.mkdir()
    for asset in ASSETS:
        (staging / asset).write_bytes(b"x" + asset.encode())
    s = ImageStore()
    image = s.add(staging, {"kind": "custom", "defaults": {"workdir": "/srv"}})
    s.set_ref("mine", image.build_id)
    return s


def test_init_config_prints_valid_toml(capsys):
    code, out, _ = run(capsys, "init-config")
    assert code == 0 and tomllib.loads(out)["debian"]["packages"]


def test_list_inspect_tag_export_import_rm_gc(store, capsys, tmp_path):
    build_id = store.ref("mine")
    code, out, _ = run(capsys, "list")
    assert code == 0 and build_id in out and "mine" in out and "custom" in out
    code, out, _ = run(capsys, "inspect", "mine")
    manifest = json.loads(out)
    assert manifest["build_id"] == build_id and manifest["refs"] == ["mine"]
    assert set(manifest["assets"]) == set(ASSETS) and manifest["defaults"] == {"workdir": "/srv"}
    assert run(capsys, "tag", "mine", "other:2")[0] == 0 and store.ref("other:2") == build_id
    assert run(capsys, "export", "mine", str(tmp_path / "x.tar"))[0] == 0
    assert run(capsys, "rm", "mine")[0] == 0 and run(capsys, "rm", "other:2")[0] == 0
    assert store.images() == []
    code, out, _ = run(capsys, "import", str(tmp_path / "x.tar"), "--tag", "back")
    assert code == 0 and store.ref("back") == build_id
    assert run(capsys, "verify", "back")[1].strip() == "ok"
    store.set_ref("back", "0" * 24)  # the image is now unnamed
    code, out, _ = run(capsys, "gc")
    assert code == 0 and f"removed image {build_id}" in out


def test_missing_image_is_a_one_line_error(store, capsys):
    code, _, err = run(capsys, "inspect", "nope")
    assert code == 125 and "no image named 'nope'" in err and "mine" in err


def test_bad_build_file_is_a_one_line_error(store, capsys, tmp_path):
    (tmp_path / "image.toml").write_text('[[files]]\nsrc = "../../etc/passwd"\ndest = "/x"\n')
    code, _, err = run(capsys, "build", "--config", str(tmp_path / "image.toml"), "--tag", "t")
    assert code == 125 and "outside the build file's directory" in err
