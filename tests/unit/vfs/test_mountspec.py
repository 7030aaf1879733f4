"""--mount HOST:GUEST[:ro|:cow] parsing."""

from __future__ import annotations

from pathlib import Path

import pytest

from gondolin.vfs import CopyOnWriteProvider, ReadonlyProvider, RealFSProvider
from gondolin.vfs.mountspec import MountSpec, mounts_from_specs


@pytest.mark.parametrize(
    ("suffix", "guest", "mode", "kind"),
    [
        ("", "/workspace", "rw", RealFSProvider),
        (":ro", "/data", "ro", ReadonlyProvider),
        (":cow", "/w/x/../y", "cow", CopyOnWriteProvider),
    ],
)
def test_modes(tmp_path: Path, suffix: str, guest: str, mode: str, kind: type) -> None:
    spec = MountSpec.parse(f"{tmp_path}:{guest}{suffix}")
    assert (spec.host, spec.mode) == (str(tmp_path), mode)
    assert spec.guest == guest.replace("/x/..", "")
    assert isinstance(spec.provider(), kind)


def test_relative_host_path_and_colons_in_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    odd = tmp_path / "a:b"
    odd.mkdir()
    monkeypatch.chdir(tmp_path)
    assert MountSpec.parse("a:b:/g:ro") == MountSpec(str(odd), "/g", "ro")
    assert MountSpec.parse(".:/g").host == str(tmp_path)


@pytest.mark.parametrize(
    "text",
    ["/tmp", "/tmp:relative", "/tmp:/", "/tmp:/proc", "/tmp:/run", ":/g", "/no/such/dir:/g",
     "/tmp:/g:rx"],
)  # fmt: skip
def test_bad_specs(text: str) -> None:
    with pytest.raises(ValueError):
        MountSpec.parse(text)


def test_same_guest_path_twice(tmp_path: Path) -> None:
    assert set(mounts_from_specs([f"{tmp_path}:/a", f"{tmp_path}:/b:ro"])) == {"/a", "/b"}
    with pytest.raises(ValueError, match="twice"):
        mounts_from_specs([f"{tmp_path}:/a", f"{tmp_path}:/a/"])
