from __future__ import annotations

import errno as E

import pytest

from gondolin.vfs import VfsError, paths


@pytest.mark.parametrize(
    ("path", "parts"),
    [
        ("/", ()),
        ("/a", ("a",)),
        ("/a/b", ("a", "b")),
        ("//a///b/", ("a", "b")),
        ("/..a/b..", ("..a", "b..")),
    ],
)
def test_split(path: str, parts: tuple[str, ...]) -> None:
    assert paths.split(path) == parts


@pytest.mark.parametrize(
    ("path", "errno"),
    [
        ("", E.EINVAL),
        ("a/b", E.EINVAL),
        ("/a/../b", E.EINVAL),
        ("/a/./b", E.EINVAL),
        ("/..", E.EINVAL),
        ("/a\0", E.EINVAL),
        ("/" + "x" * 256, E.ENAMETOOLONG),
        ("/" + "é" * 128, E.ENAMETOOLONG),  # 256 bytes in UTF-8
        ("/a" * 2049, E.ENAMETOOLONG),
    ],
)
def test_split_rejects(path: str, errno: int) -> None:
    with pytest.raises(VfsError) as info:
        paths.split(path)
    assert info.value.errno == errno


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "a\0b"])
def test_check_name_rejects(name: str) -> None:
    with pytest.raises(VfsError) as info:
        paths.check_name(name)
    assert info.value.errno == E.EINVAL


def test_bytes_round_trip() -> None:
    raw = b"\xff\xfe name"
    assert paths.encode(paths.decode(raw)) == raw


@pytest.mark.parametrize(
    ("patterns", "path", "hit"),
    [
        (".env", "/.env", True),
        (".env", "/app/.env", True),  # no slash: any depth
        (".env", "/app/.envrc", False),
        ("/.env", "/app/.env", False),  # leading slash: anchored
        ("*.pem", "/certs/key.pem", True),
        ("*.pem", "/certs/key.pem.bak", False),
        ("secrets", "/secrets/a/b", True),  # descendants of a match match
        ("/secrets/**", "/secrets", True),  # ** also matches nothing
        ("/secrets/**", "/secrets/x/y", True),
        ("/secrets/**", "/other/secrets/x", False),
        ("a/*/c", "/a/b/c", True),
        ("a/*/c", "/a/b/x/c", False),
        ("a/**/c", "/a/b/x/c", True),
        ("a/**/c", "/a/c", True),
        ("file?.txt", "/file1.txt", True),
        ("file?.txt", "/file10.txt", False),
        ("[ab].txt", "/a.txt", True),
        ("[!ab].txt", "/a.txt", False),
        ("[!ab].txt", "/c.txt", True),
        ("a.b", "/axb", False),  # regex characters are literal
        ("**", "/anything/at/all", True),
        (["x", "y"], "/y", True),
        ([], "/y", False),
        (".env", "/", False),  # the root never matches a glob
    ],
)
def test_matcher(patterns: str | list[str], path: str, hit: bool) -> None:
    assert paths.matcher(patterns)(path) is hit


def test_matcher_passes_callables_through() -> None:
    def pred(p: str) -> bool:
        return p.endswith("!")

    assert paths.matcher(pred) is pred
    assert paths.matcher(None)("/x") is False
