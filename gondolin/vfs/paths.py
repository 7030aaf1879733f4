"""Provider paths: validation, splitting, and glob predicates.

A provider path is absolute and ``/``-separated (``"/"`` is the provider's root). ``.`` and
``..`` components, NUL bytes, empty names and over-long names are refused rather than
normalised: the guest kernel resolves ``..`` and symlinks itself and only ever sends plain
names, so anything else is either a bug or an attack. Names are ``str``; undecodable bytes
from the guest travel as surrogate escapes (``os.fsdecode``), so every byte name round-trips.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

from .errors import EINVAL, ENAMETOOLONG, VfsError

MAX_NAME = 255  # bytes in one component (NAME_MAX)
MAX_PATH = 4096  # bytes in a whole path (PATH_MAX)
MAX_TARGET = 4095  # bytes in a symlink target

PathPredicate = Callable[[str], bool]


def encode(name: str) -> bytes:
    return name.encode("utf-8", "surrogateescape")


def decode(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid single component, else raise EINVAL/ENAMETOOLONG."""
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise VfsError(EINVAL, f"invalid name {name!r}")
    if len(encode(name)) > MAX_NAME:
        raise VfsError(ENAMETOOLONG)
    return name


def check_target(target: str) -> str:
    if not target or "\0" in target:
        raise VfsError(EINVAL, "invalid symlink target")
    if len(encode(target)) > MAX_TARGET:
        raise VfsError(ENAMETOOLONG)
    return target


def split(path: str) -> tuple[str, ...]:
    """``"/a/b"`` -> ``("a", "b")``; ``"/"`` -> ``()``. Repeated and trailing slashes are fine."""
    if not isinstance(path, str) or not path.startswith("/"):
        raise VfsError(EINVAL, f"not an absolute path: {path!r}")
    if len(encode(path)) > MAX_PATH:
        raise VfsError(ENAMETOOLONG)
    return tuple(check_name(p) for p in path.split("/") if p)


def join(parts: Iterable[str]) -> str:
    return "/" + "/".join(parts)


def child(parent: str, name: str) -> str:
    return (parent.rstrip("/") or "") + "/" + name


def normalize(path: str) -> str:
    return join(split(path))


def parent_of(path: str) -> str:
    return join(split(path)[:-1])


def is_within(path: str, top: str) -> bool:
    """``path`` is ``top`` or below it (both normalised)."""
    return top == "/" or path == top or path.startswith(top + "/")


# --- glob predicates ---------------------------------------------------------------------------


def _translate(pattern: str) -> str:
    """One gitignore-style glob as a regex over a root-relative path ``a/b/c``."""
    anchored = pattern.startswith("/") or "/" in pattern.rstrip("/")
    body = pattern.strip("/")
    if not body:
        return ".*"  # "/" itself: everything
    out: list[str] = []
    comps = body.split("/")
    for i, comp in enumerate(comps):
        last = i == len(comps) - 1
        if comp == "**":
            if not last:
                out.append("(?:.*/)?")
            elif out and out[-1] == "/":
                out[-1] = "(?:/.*)?"  # "a/**" matches "a" itself too
            else:
                out.append(".*")
            continue
        j = 0
        while j < len(comp):
            c = comp[j]
            if c == "*":
                out.append("[^/]*")
            elif c == "?":
                out.append("[^/]")
            elif c == "[":
                end = comp.find("]", j + 2 if comp[j + 1 : j + 2] in ("!", "]") else j + 1)
                if end < 0:
                    out.append(re.escape(c))
                else:
                    cls = comp[j + 1 : end].replace("\\", "\\\\")
                    if cls.startswith("!"):
                        cls = "^" + cls[1:]
                    out.append(f"(?!/)[{cls}]")
                    j = end
            else:
                out.append(re.escape(c))
            j += 1
        if not last:
            out.append("/")
    prefix = "" if anchored else "(?:.*/)?"
    return prefix + "".join(out)


def matcher(spec: PathPredicate | str | Iterable[str] | None) -> PathPredicate:
    """A predicate over provider paths from globs (or a callable, returned as is).

    Globs follow gitignore: ``*``, ``?``, ``[...]`` stay within one component, ``**`` spans
    any number; a pattern with a leading or inner ``/`` is anchored at the provider root,
    otherwise it matches at any depth (``.env``, ``*.pem``). A path matches when it or any of
    its ancestors does, so hiding a directory hides everything under it.
    """
    if spec is None:
        return _never
    if callable(spec):
        return spec
    patterns = [spec] if isinstance(spec, str) else list(spec)
    if not patterns:
        return _never
    regex = re.compile(
        "^(?:" + "|".join(f"(?:{_translate(p)})" for p in patterns) + ")(?:/.*)?$", re.DOTALL
    )

    def match(path: str) -> bool:
        rel = path.strip("/")
        return bool(rel) and regex.match(rel) is not None

    return match


def _never(path: str) -> bool:
    return False


def always(path: str) -> bool:
    return True
