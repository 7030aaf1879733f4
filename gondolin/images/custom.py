"""Build a custom guest image from a build file (:mod:`gondolin.images.config`).

Two cached layers under ``$XDG_CACHE_HOME/gondolin/build/layers``, each keyed by the content of
its own inputs, so that changing a copied file or a command rebuilds only the second:

- ``base-<key>.tar``: ``mmdebstrap`` of the suite with the base packages plus the file's own,
  keyed by suite, mirror and package list. The downloaded ``.deb`` files are kept in
  ``build/debs`` and handed to the next ``mmdebstrap`` (its ``sync-in``/``sync-out`` hooks), so
  a changed package list downloads only the packages that are new.
- ``rootfs-<key>.ext4``: that tree with Gondolin's customisation, the copied files and the
  post-build commands, packed as ext4; keyed by the base key, the kernel version, the files'
  contents (never mtimes), the commands and the free space.

Kernel and initramfs are the default image's (same kernel package, same agent). Nothing reaches
the store until every step succeeded: a failing command leaves no image behind.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
import tempfile
from collections import deque
from pathlib import Path

from ..errors import ImageError
from .builder import (
    BUILD_FORMAT,
    PACKAGES,
    BuildConfig,
    ImageBuilder,
    Progress,
    _stderr_progress,
    mmdebstrap_argv,
    require,
)
from .config import ImageConfig
from .store import Image, ImageStore

CUSTOM_FORMAT = 1  # bump when what a custom layer holds changes in a way its key cannot see
MAX_OUTPUT_LINES = 40  # of a failing command, in its error
# Host settings a post-build command may need to reach PyPI / npm from this machine; host paths
# (file:// indexes, find-links) are left out: they do not exist inside the new root.
PASS_ENV = ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_TRUSTED_HOST", "PIP_DEFAULT_TIMEOUT",
            "http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY",
            "npm_config_registry")
BUILD_CA = "/tmp/gondolin-build-ca.crt"


def _digest(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def unknown_package(output: str) -> str | None:
    """The package apt could not find, from mmdebstrap's output."""
    for line in output.splitlines():
        for marker in ("Unable to locate package ", "Package '"):
            if marker in line and ("Unable to locate" in line or "has no installation candidate" in line):
                rest = line.split(marker, 1)[1]
                return rest.split("'")[0].split()[0].strip()
    return None


class CustomImageBuilder(ImageBuilder):
    """The default image's builder with a build file's packages, files, commands and defaults."""

    def __init__(self, config: ImageConfig, store: ImageStore | None = None,
                 progress: Progress | None = _stderr_progress) -> None:
        packages = tuple(dict.fromkeys((*PACKAGES, *config.packages)))
        super().__init__(store, BuildConfig(suite=config.suite, packages=packages,
                                            rootfs_extra_mb=config.free_space_mb, mirror=config.mirror), progress)
        self.image = config
        self.layers = self.work / "layers"
        self.debs = self.work / "debs"

    # -- keys -------------------------------------------------------------------------------
    def base_key(self) -> str:
        return _digest("base", str(BUILD_FORMAT), self.config.suite, str(self.config.mirror),
                       ",".join(sorted(self.config.packages)))

    def layer_key(self, kver: str) -> str:
        return _digest("layer", str(CUSTOM_FORMAT), self.base_key(), kver, str(self.image.free_space_mb),
                       *(f"{f.dest}:{f.digest()}" for f in self.image.files),
                       *(f"cmd:{c}" for c in self.image.commands))

    def inputs_key(self) -> str:
        return _digest("custom", super().inputs_key(), str(CUSTOM_FORMAT),
                       *(f"{f.dest}:{f.digest()}" for f in self.image.files),
                       *(f"cmd:{c}" for c in self.image.commands),
                       repr(sorted(self.image.defaults().items())))

    def manifest_extra(self) -> dict[str, object]:
        return {"kind": "custom", "config": self.image.describe(), "defaults": self.image.defaults(),
                "extra_packages": list(self.image.packages)}

    # -- layers -----------------------------------------------------------------------------
    def _rootfs(self, kdir: Path, kver: str, force: bool) -> Path:
        self.layers.mkdir(parents=True, exist_ok=True)
        out = self.layers / f"rootfs-{self.layer_key(kver)}.ext4"
        if out.exists() and not force:
            self.progress("root filesystem (packages, files, commands): cached")
            return out
        base = self._base_tar(force)
        tmp = Path(tempfile.mkdtemp(prefix="layer-", dir=self.work))
        try:
            tree = tmp / "tree"
            tree.mkdir()
            self.progress("unpacking the base tree")
            self._run_step(["tar", "--numeric-owner", "-xpf", str(base), "-C", str(tree)], "tar -x")
            self.progress("customising root filesystem")
            self._customise(tree, kdir, kver)
            for copy in self.image.files:
                self._copy_in(tree, copy.src, copy.dest, copy.mode)
            for i, command in enumerate(self.image.commands, 1):
                self.progress(f"post-build command {i}/{len(self.image.commands)}: {command}")
                self._chroot(tree, command, i)
            for junk in ("tmp", "var/tmp", "root/.cache", "root/.npm", "var/cache/apt/archives"):
                path = tree / junk
                if path.is_dir() and not path.is_symlink():
                    for child in path.iterdir():
                        if child.is_dir() and not child.is_symlink():
                            shutil.rmtree(child, ignore_errors=True)
                        else:
                            child.unlink(missing_ok=True)
            part = tmp / "rootfs.ext4"
            pack_ext4(tree, part, self.image.free_space_mb, self.progress)
            os.replace(part, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return out

    def _run_step(self, argv: list[str], what: str) -> None:
        proc = subprocess.run(argv, capture_output=True, text=True)
        if proc.returncode != 0:
            raise ImageError(f"{what} failed (exit {proc.returncode}): {(proc.stderr or proc.stdout)[-2000:]}")

    def _base_tar(self, force: bool) -> Path:
        out = self.layers / f"base-{self.base_key()}.tar"
        if out.exists() and not force:
            self.progress(f"Debian {self.config.suite} packages: cached")
            return out
        self._check_packages()
        self.debs.mkdir(parents=True, exist_ok=True)
        part = self.layers / f".base-{self.base_key()}.{os.getpid()}.tar"
        self.progress(f"installing {len(self.config.packages)} Debian {self.config.suite} packages with mmdebstrap"
                      f" (.debs already in {self.debs} are not downloaded again)")
        debs = shlex.quote(str(self.debs))
        argv = mmdebstrap_argv(self.config.suite, self.config.packages, part, self.config.mirror, extra=(
            "--skip=download/empty", "--skip=essential/unlink",
            "--setup-hook=mkdir -p \"$1\"/var/cache/apt/archives/",
            f"--setup-hook=sync-in {debs} /var/cache/apt/archives/",
            f"--customize-hook=sync-out /var/cache/apt/archives {debs}",
            "--customize-hook=rm -f \"$1\"/var/cache/apt/archives/*.deb",
        ))
        lines: deque[str] = deque(maxlen=200)
        try:
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(line.rstrip())
                if line.startswith("I: "):
                    self.progress(f"  mmdebstrap: {line[3:].strip()}")
            rc = proc.wait()
            output = "\n".join(lines)
            if rc != 0:
                pkg = unknown_package(output)
                if pkg is not None:
                    raise ImageError(f"unknown package {pkg!r}: Debian {self.config.suite} has no package of "
                                     f"that name (check [debian] packages in the build file; `apt-cache search` "
                                     "finds names)")
                raise ImageError(f"mmdebstrap failed (exit {rc}):\n" + "\n".join(list(lines)[-25:]))
            os.replace(part, out)
        finally:
            part.unlink(missing_ok=True)
        for old in self.layers.glob("base-*.tar"):  # one base per package list is plenty; keep the newest few
            if old != out and old.stat().st_mtime < out.stat().st_mtime - 7 * 86400:
                old.unlink(missing_ok=True)
        return out

    def _check_packages(self) -> None:
        """Fail fast on a package name this host's apt lists do not know, when they are lists
        of the same suite (otherwise mmdebstrap's own error is the check)."""
        if self.config.mirror or not self.image.packages or not shutil.which("apt-cache"):
            return
        try:
            release = Path("/etc/os-release").read_text()
        except OSError:
            return
        if f"VERSION_CODENAME={self.config.suite}\n" not in release + "\n":
            return
        for pkg in self.image.packages:
            name = pkg.split("=")[0]
            proc = subprocess.run(["apt-cache", "show", "--no-all-versions", name], capture_output=True, text=True)
            if proc.returncode != 0:
                raise ImageError(f"unknown package {name!r}: Debian {self.config.suite} has no package of that "
                                 "name (check [debian] packages in the build file; `apt-cache search` finds names)")

    @staticmethod
    def _copy_in(tree: Path, src: Path, dest: str, mode: int | None) -> None:
        target = confined(tree, dest)
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, target, symlinks=True, dirs_exist_ok=True)
        else:
            if target.is_dir() and not target.is_symlink():
                target = target / src.name
            shutil.copy2(src, target, follow_symlinks=False)
        if mode is not None:
            os.chmod(target, mode)

    def _chroot(self, tree: Path, command: str, index: int) -> None:
        """Run one command in the new root: its own mount namespace (the /proc and /dev mounts
        vanish with it) and PID namespace (a daemon a command leaves behind dies with it), the host's
        resolver and CA bundle for the length of the build only."""
        unshare = require("unshare", "util-linux", "run post-build commands")
        resolv = tree / "etc" / "resolv.conf"
        saved = resolv.read_bytes() if resolv.is_file() and not resolv.is_symlink() else None
        ca = tree / BUILD_CA.lstrip("/")
        try:
            resolv.unlink(missing_ok=True)
            shutil.copy(Path("/etc/resolv.conf").resolve(), resolv)
            host_ca = Path("/etc/ssl/certs/ca-certificates.crt")
            env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root",
                   "LANG": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive", "TMPDIR": "/tmp"}
            if host_ca.is_file():
                ca.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(host_ca, ca)
                env.update(SSL_CERT_FILE=BUILD_CA, PIP_CERT=BUILD_CA, REQUESTS_CA_BUNDLE=BUILD_CA,
                           CURL_CA_BUNDLE=BUILD_CA, NODE_EXTRA_CA_CERTS=BUILD_CA, npm_config_cafile=BUILD_CA)
            for name in PASS_ENV:
                value = os.environ.get(name)
                if value and "file://" not in value:
                    env[name] = value
            script = ('mount -t proc proc "$0/proc" && mount --rbind /dev "$0/dev" && '
                      'exec chroot "$0" /bin/sh -ec "$1"')
            argv = [unshare, "--mount", "--pid", "--propagation", "private", "--fork", "/bin/sh", "-ec", script,
                    str(tree), command]
            lines: deque[str] = deque(maxlen=MAX_OUTPUT_LINES)
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    text=True, errors="replace", env=env)
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(line.rstrip())
                self.progress(f"  | {line.rstrip()[:200]}")
            rc = proc.wait()
            if rc != 0:
                raise ImageError(f"post-build command #{index} failed (exit {rc}): {command}\n"
                                 + "\n".join(lines) + "\nno image was stored; fix the command and build again")
        finally:
            ca.unlink(missing_ok=True)
            resolv.unlink(missing_ok=True)
            if saved is not None:
                resolv.write_bytes(saved)


def confined(root: Path, guest_path: str) -> Path:
    """``guest_path`` inside ``root``, following the tree's own symlinks the way the guest
    would (an absolute target is relative to ``root``); never a host path outside ``root``."""
    parts = [p for p in guest_path.split("/") if p not in ("", ".")]
    resolved: list[str] = []
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = root.joinpath(*resolved, part)
        if candidate.is_symlink() and parts:  # the last component is written, not followed
            hops += 1
            if hops > 40:
                raise ImageError(f"too many symlinks resolving {guest_path} in the image")
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            parts = [p for p in target.split("/") if p not in ("", ".")] + parts
            continue
        resolved.append(part)
    return root.joinpath(*resolved)


def pack_ext4(tree: Path, out: Path, free_mb: int, progress: Progress) -> None:
    used = int(subprocess.run(["du", "-sm", str(tree)], capture_output=True, text=True).stdout.split()[0])
    size_mb = used + used // 5 + free_mb + 64
    progress(f"packing ext4 ({used} MiB used, {size_mb} MiB image)")
    proc = subprocess.run([require("mke2fs", "e2fsprogs", "pack the rootfs"), "-q", "-t", "ext4", "-O",
                           "^has_journal", "-L", "gondolin-root", "-E", "root_owner=0:0", "-m", "0", "-d", str(tree),
                           str(out), f"{size_mb}M"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise ImageError(f"mke2fs failed (exit {proc.returncode}): {proc.stderr[-2000:]}")


def build_image(config: ImageConfig, tag: str, *, store: ImageStore | None = None, force: bool = False,
                progress: Progress | None = _stderr_progress) -> Image:
    """Build (or find in the cache) the image ``config`` describes and name it ``tag``."""
    return CustomImageBuilder(config, store, progress).build(tag, force=force)


__all__ = ["CustomImageBuilder", "build_image", "confined", "pack_ext4", "unknown_package"]
