"""The image build file: parsing, checks with messages that name the problem, content keys."""

from __future__ import annotations

import tomllib

import pytest

from gondolin.errors import ImageError
from gondolin.images.config import EXAMPLE, config_from_dict, load_config, parse_size_mb
from gondolin.images.custom import CustomImageBuilder, confined, unknown_package
from gondolin.images.store import ImageStore


def write(tmp_path, text, name="image.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_example_parses_once_its_file_exists(tmp_path):
    (tmp_path / "tools").mkdir()
    (tmp_path / "tools" / "hello.sh").write_text("echo hi\n")
    config = load_config(write(tmp_path, EXAMPLE))
    assert config.packages == ("python3-numpy", "nodejs")
    assert config.files[0].dest == "/usr/local/bin/hello" and config.files[0].mode == 0o755
    assert config.commands == ("pip install --no-cache-dir six",)
    assert config.env == {"APP_MODE": "sandbox"}
    assert config.defaults() == {"rootfs": "cow", "env": {"APP_MODE": "sandbox"}, "user": "root",
                                 "workdir": "/workspace"}
    assert config.free_space_mb == 1024


@pytest.mark.parametrize(("text", "needle"), [
    ('[debian]\npackages = ["Bad Name"]\n', "'Bad Name' is not a Debian package name"),
    ('[debain]\n', "unknown section(s) in the image build file: debain"),
    ('[debian]\npackagez = []\n', "unknown key(s) in [debian]: packagez"),
    ('[[files]]\nsrc = "../secret"\ndest = "/x"\n', "outside the build file's directory"),
    ('[[files]]\nsrc = "/etc/passwd"\ndest = "/x"\n', "outside the build file's directory"),
    ('[[files]]\nsrc = "missing.txt"\ndest = "/x"\n', "does not exist"),
    ('[[files]]\nsrc = "ok.txt"\ndest = "relative"\n', "dest must be an absolute guest path"),
    ('[[files]]\nsrc = "ok.txt"\ndest = "/x"\nmode = "rwx"\n', "octal string"),
    ('[defaults]\nrootfs = "tmpfs"\n', "rootfs must be one of cow, readonly, memory"),
    ('[defaults]\nworkdir = "srv"\n', "workdir must be an absolute guest path"),
    ('[env]\n"A-B" = "1"\n', "[env] 'A-B'"),
    ('[rootfs]\nfree_space = "lots"\n', "[rootfs] free_space"),
    ('[build]\ncommands = [""]\n', "[build] commands must be non-empty strings"),
    ('[debian]\nsuite = "Bookworm!"\n', "not a Debian suite name"),
    ('not toml = = 1', "not valid TOML"),
])
def test_bad_build_files_are_refused_naming_the_problem(tmp_path, text, needle):
    (tmp_path / "ok.txt").write_text("ok")
    with pytest.raises(ImageError) as info:
        load_config(write(tmp_path, text))
    assert needle in str(info.value)


def test_a_symlink_inside_a_copied_directory_may_not_lead_out(tmp_path):
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "link").symlink_to("/etc/passwd")
    with pytest.raises(ImageError, match="symlink leading outside"):
        load_config(write(tmp_path, '[[files]]\nsrc = "dir"\ndest = "/opt/dir"\n'))


def test_sizes():
    assert parse_size_mb("2G", "x") == 2048 and parse_size_mb(512, "x") == 512 and parse_size_mb("64M", "x") == 64
    with pytest.raises(ImageError):
        parse_size_mb(True, "x")


def test_keys_follow_file_contents_not_mtimes(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "a.txt").write_text("one")
    data = tomllib.loads('[debian]\npackages = ["nodejs"]\n[[files]]\nsrc = "a.txt"\ndest = "/a"\n'
                        '[build]\ncommands = ["true"]\n')
    store = ImageStore(tmp_path / "store")

    def keys():
        builder = CustomImageBuilder(config_from_dict(data, tmp_path), store, progress=None)
        return builder.base_key(), builder.layer_key("6.1"), builder.inputs_key()

    base, layer, inputs = keys()
    import os
    os.utime(tmp_path / "a.txt", (1, 1))
    assert keys() == (base, layer, inputs)  # touching a file changes nothing
    (tmp_path / "a.txt").write_text("two")
    base2, layer2, inputs2 = keys()
    assert base2 == base  # the packages layer is still cached
    assert layer2 != layer and inputs2 != inputs
    data["build"]["commands"] = ["true", "echo more"]
    assert keys()[0] == base and keys()[1] != layer2
    data["debian"]["packages"] = ["nodejs", "gcc"]
    assert keys()[0] != base


def test_base_packages_always_included(tmp_path):
    builder = CustomImageBuilder(config_from_dict({"debian": {"packages": ["nodejs"]}}, tmp_path),
                                 ImageStore(tmp_path / "s"), progress=None)
    for needed in ("python3", "ca-certificates", "kmod", "openssh-client", "nodejs"):
        assert needed in builder.config.packages


def test_unknown_package_is_read_from_apt_output():
    assert unknown_package("E: Unable to locate package nosuchpkg\nE: boom") == "nosuchpkg"
    assert unknown_package("E: Package 'foo' has no installation candidate") == "foo"
    assert unknown_package("E: something else") is None


def test_confined_resolves_symlinks_inside_the_tree(tmp_path):
    root = tmp_path / "root"
    (root / "usr" / "bin").mkdir(parents=True)
    (root / "bin").symlink_to("usr/bin")
    (root / "etc").symlink_to("/usr")  # absolute: relative to the tree, never the host
    (root / "up").symlink_to("../../../..")
    assert confined(root, "/bin/tool") == root / "usr" / "bin" / "tool"
    assert confined(root, "/etc/x") == root / "usr" / "x"
    assert confined(root, "/up/etc/passwd") == root / "usr" / "passwd"
    assert confined(root, "/../../x") == root / "x"
