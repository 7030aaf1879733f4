"""The image build file (``image.toml``): what a custom guest image adds to the base.

A custom image is the base package set (what the guest agent, FUSE, TLS, networking and ssh
need, so no build file can make an unbootable image) plus the file's packages, files copied from
the host, commands run in the new root, and the defaults every VM of the image starts with.
:func:`load_config` checks the whole file before anything is built; :data:`EXAMPLE` is the
annotated example ``gondolin image init-config`` prints.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ImageError

DEFAULT_SUITE = "bookworm"
ROOTFS_MODES = ("cow", "readonly", "memory")
_PACKAGE_RE = re.compile(r"^[a-z0-9][a-z0-9+.\-]*(:[a-z0-9]+)?(=[A-Za-z0-9.+~:\-]+)?$")
_ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SUITE_RE = re.compile(r"^[a-z][a-z0-9\-]*$")
_TOP_KEYS = {"debian", "files", "build", "env", "defaults", "rootfs"}

EXAMPLE = '''\
# A Gondolin guest image. Build it with:
#   gondolin image build --config image.toml --tag mytools:1
# and use it with VM.create(image="mytools:1") or `gondolin exec --image mytools:1 ...`.

[debian]
suite = "bookworm"                       # the Debian release the root filesystem comes from
# mirror = "http://deb.debian.org/debian" # default: mmdebstrap's choice for the suite
# Added to the base set (python3, bash, curl, ca-certificates, git, openssh, ...), which is
# always there: the guest agent, FUSE, TLS and networking keep working whatever you list.
packages = ["python3-numpy", "nodejs"]

# Files copied from the host into the image. `src` is relative to this file and may not leave
# its directory; `dest` is an absolute guest path. `mode` is optional (default: the source's).
[[files]]
src = "tools/hello.sh"
dest = "/usr/local/bin/hello"
mode = "0755"

[build]
# Run in the new root filesystem (chroot, /proc and /dev bound) after the files are copied,
# with `sh -ec`, as root. The network is reachable here, during the build only: the VMs of the
# image get only what their network policy allows.
commands = [
  "pip install --no-cache-dir six",
  # "npm install -g typescript",
]

# Environment variables every command in a VM of this image sees (VMOptions.env and an exec's
# env= win over these).
[env]
APP_MODE = "sandbox"

[defaults]
rootfs = "cow"          # cow | readonly | memory: used when VM.create() does not say
user = "root"           # who commands run as when exec() does not say (a name or uid)
workdir = "/workspace"  # where commands start when exec() does not say

[rootfs]
free_space = "1G"       # free space in the image's root filesystem (VM.create(disk_size=) adds more)
'''


def parse_size_mb(value: Any, what: str) -> int:
    """MiB from an int (MiB) or a string such as ``"512M"``, ``"2G"``."""
    if isinstance(value, bool):
        raise ImageError(f"{what}: {value!r} is not a size; use MiB as an int, or '512M' / '2G'")
    if isinstance(value, int):
        mb = value
    elif isinstance(value, str):
        s = value.strip().upper().removesuffix("B").removesuffix("I")
        mult = {"K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 * 1024}.get(s[-1:])
        try:
            mb = int(float(s[:-1]) * mult) if mult is not None else int(s)
        except ValueError:
            raise ImageError(f"{what}: {value!r} is not a size; use MiB as an int, or '512M' / '2G'") from None
    else:
        raise ImageError(f"{what}: {value!r} is not a size; use MiB as an int, or '512M' / '2G'")
    if mb < 0:
        raise ImageError(f"{what}: a size cannot be negative")
    return mb


@dataclass(frozen=True)
class FileCopy:
    """One host file or directory copied into the image."""

    src: Path  # resolved, inside the config's directory
    dest: str  # absolute, normalised guest path
    mode: int | None = None

    def digest(self) -> str:
        """sha256 over the names, modes and contents (never mtimes) of what gets copied."""
        h = hashlib.sha256(f"{self.dest}|{self.mode}\n".encode())
        paths = [self.src] if self.src.is_file() else sorted(p for p in self.src.rglob("*"))
        for p in paths:
            rel = p.relative_to(self.src).as_posix() if p != self.src else "."
            st = p.lstat()
            h.update(f"{rel}|{st.st_mode:o}\n".encode())
            if p.is_symlink():
                h.update(os.readlink(p).encode())
            elif p.is_file():
                with open(p, "rb") as f:
                    while block := f.read(1 << 20):
                        h.update(block)
            h.update(b"\0")
        return h.hexdigest()


@dataclass(frozen=True)
class ImageConfig:
    """A parsed, checked build file (or the same built in Python)."""

    packages: tuple[str, ...] = ()
    suite: str = DEFAULT_SUITE
    mirror: str | None = None
    files: tuple[FileCopy, ...] = ()
    commands: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    rootfs_mode: str = "cow"
    user: str | None = None
    workdir: str | None = None
    free_space_mb: int = 1024
    source: Path | None = None  # the build file, when read from one

    def __post_init__(self) -> None:
        if not _SUITE_RE.match(self.suite):
            raise ImageError(f"[debian] suite {self.suite!r} is not a Debian suite name (e.g. 'bookworm')")
        if self.mirror is not None and not re.match(r"^(https?|file)://\S+$", self.mirror):
            raise ImageError(f"[debian] mirror {self.mirror!r} must be an http(s):// or file:// URL")
        for pkg in self.packages:
            if not isinstance(pkg, str) or not _PACKAGE_RE.match(pkg):
                raise ImageError(f"[debian] packages: {pkg!r} is not a Debian package name")
        for cmd in self.commands:
            if not isinstance(cmd, str) or not cmd.strip():
                raise ImageError("[build] commands must be non-empty strings")
        for key, value in self.env.items():
            if not _ENV_RE.match(key) or not isinstance(value, str) or "\0" in value:
                raise ImageError(f"[env] {key!r}: names are letters, digits and _, values strings")
        if self.rootfs_mode not in ROOTFS_MODES:
            raise ImageError(f"[defaults] rootfs must be one of {', '.join(ROOTFS_MODES)}, not {self.rootfs_mode!r}")
        if self.workdir is not None and not (isinstance(self.workdir, str) and self.workdir.startswith("/")):
            raise ImageError(f"[defaults] workdir must be an absolute guest path, not {self.workdir!r}")
        if self.user is not None and not (isinstance(self.user, str) and self.user):
            raise ImageError("[defaults] user must be a user name or a uid as a string")

    def defaults(self) -> dict[str, Any]:
        """What VMs of the image start with (recorded in the image's manifest)."""
        out: dict[str, Any] = {"rootfs": self.rootfs_mode, "env": dict(self.env)}
        if self.user is not None:
            out["user"] = self.user
        if self.workdir is not None:
            out["workdir"] = self.workdir
        return out

    def describe(self) -> dict[str, Any]:
        """The inputs, for the manifest (host paths relative to the build file)."""
        return {
            "suite": self.suite, "mirror": self.mirror, "packages": list(self.packages),
            "files": [{"src": f.src.name, "dest": f.dest, "sha256": f.digest()} for f in self.files],
            "commands": list(self.commands), "free_space_mb": self.free_space_mb,
            "source": str(self.source) if self.source else None,
        }


def _check_dest(dest: Any, where: str) -> str:
    if not isinstance(dest, str) or not dest.startswith("/") or "\0" in dest:
        raise ImageError(f"{where}: dest must be an absolute guest path, not {dest!r}")
    norm = posixpath.normpath(dest)
    if norm == "/" or norm.startswith("//"):
        norm = "/" + norm.lstrip("/")
    if norm == "/":
        raise ImageError(f"{where}: dest cannot be / itself")
    return norm


def file_copy(base: Path, src: Any, dest: Any, mode: Any = None, where: str = "[[files]]") -> FileCopy:
    """A checked copy: ``src`` relative to ``base`` and inside it (symlinks resolved)."""
    if not isinstance(src, str) or not src or "\0" in src:
        raise ImageError(f"{where}: src must be a path relative to the build file")
    base = base.resolve()
    path = (base / src).resolve()
    if os.path.isabs(src) or not path.is_relative_to(base):
        raise ImageError(f"{where}: src {src!r} is outside the build file's directory {base}; "
                         "copy the file next to image.toml (or below it) and name it relatively")
    if not path.exists():
        raise ImageError(f"{where}: src {src!r} does not exist (looked for {path})")
    if path.is_dir():
        for p in path.rglob("*"):
            if p.is_symlink() and not p.resolve().is_relative_to(base):
                raise ImageError(f"{where}: {p} is a symlink leading outside {base}")
    if mode is not None:
        if isinstance(mode, str) and re.match(r"^0?[0-7]{3,4}$", mode):
            mode = int(mode, 8)
        elif not isinstance(mode, int) or isinstance(mode, bool) or not 0 <= mode <= 0o7777:
            raise ImageError(f"{where}: mode {mode!r} must be an octal string such as '0755'")
    return FileCopy(path, _check_dest(dest, where), mode)


def _table(data: dict[str, Any], name: str, allowed: set[str]) -> dict[str, Any]:
    value = data.get(name, {})
    if not isinstance(value, dict):
        raise ImageError(f"[{name}] must be a table")
    unknown = set(value) - allowed
    if unknown and allowed:
        raise ImageError(f"unknown key(s) in [{name}]: {', '.join(sorted(unknown))} "
                         f"(known: {', '.join(sorted(allowed))})")
    return value


def load_config(path: str | os.PathLike[str]) -> ImageConfig:
    """Read and check a build file; :class:`ImageError` names the problem."""
    source = Path(path).resolve()
    try:
        with open(source, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ImageError(f"cannot read the image build file {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ImageError(f"image build file {path} is not valid TOML: {exc}") from exc
    return config_from_dict(data, source.parent, source)


def config_from_dict(data: dict[str, Any], base: Path, source: Path | None = None) -> ImageConfig:
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise ImageError(f"unknown section(s) in the image build file: {', '.join(sorted(unknown))} "
                         f"(known: {', '.join(sorted(_TOP_KEYS))})")
    debian = _table(data, "debian", {"suite", "mirror", "packages"})
    build = _table(data, "build", {"commands"})
    defaults = _table(data, "defaults", {"rootfs", "user", "workdir"})
    rootfs = _table(data, "rootfs", {"free_space"})
    env = data.get("env", {})
    if not isinstance(env, dict):
        raise ImageError("[env] must be a table of NAME = \"value\"")
    packages = debian.get("packages", [])
    commands = build.get("commands", [])
    if not isinstance(packages, list) or not isinstance(commands, list):
        raise ImageError("[debian] packages and [build] commands are lists of strings")
    files = data.get("files", [])
    if not isinstance(files, list):
        raise ImageError("[[files]] must be an array of tables: [[files]] src = ... dest = ...")
    copies = []
    for i, entry in enumerate(files):
        where = f"[[files]] #{i + 1}"
        if not isinstance(entry, dict) or set(entry) - {"src", "dest", "mode"}:
            raise ImageError(f"{where}: takes src, dest and optionally mode")
        copies.append(file_copy(base, entry.get("src"), entry.get("dest"), entry.get("mode"), where))
    user = defaults.get("user")
    return ImageConfig(
        packages=tuple(packages), suite=str(debian.get("suite", DEFAULT_SUITE)), mirror=debian.get("mirror"),
        files=tuple(copies), commands=tuple(commands), env=dict(env),
        rootfs_mode=str(defaults.get("rootfs", "cow")), user=str(user) if user is not None else None,
        workdir=defaults.get("workdir"),
        free_space_mb=parse_size_mb(rootfs.get("free_space", 1024), "[rootfs] free_space"),
        source=source,
    )


__all__ = ["EXAMPLE", "FileCopy", "ImageConfig", "config_from_dict", "file_copy", "load_config", "parse_size_mb"]
