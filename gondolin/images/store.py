"""Content-addressed store of guest images.

Layout under ``$XDG_CACHE_HOME/gondolin/images`` (or ``GONDOLIN_IMAGE_DIR``)::

    objects/<build_id>/vmlinux  initrd.img  rootfs.ext4  manifest.json
    refs/<name>                 text file holding a build id (e.g. refs/default)

The build id is derived from the sha256 of every asset, so two identical builds share an id and
a changed asset can never hide behind an old id. ``manifest.json`` records each asset's sha256
and size; :meth:`ImageStore.verify` checks them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ImageError

if TYPE_CHECKING:
    from ..options import VMOptions

ASSETS = ("vmlinux", "initrd.img", "rootfs.ext4")
_REF_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
_ID_RE = re.compile(r"^[0-9a-f]{12,64}$")


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gondolin"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def cached_sha256(path: Path) -> str:
    """sha256 of a file, remembered in a side file keyed by inode, size and mtime (big rootfs
    images are hashed once, not on every rebuild of the small assets)."""
    st = path.stat()
    stamp = f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"
    side = path.parent.parent / ".hashes" / f"{st.st_dev}-{st.st_ino}"
    try:
        saved_stamp, digest = side.read_text().split()
        if saved_stamp == stamp:
            return digest
    except (OSError, ValueError):
        pass
    digest = sha256_file(path)
    if st.st_size > 64 << 20:
        try:
            side.parent.mkdir(parents=True, exist_ok=True)
            side.write_text(f"{stamp} {digest}\n")
        except OSError:
            pass
    return digest


@dataclass(frozen=True)
class Image:
    """A built guest image: paths to its assets and its manifest."""

    build_id: str
    path: Path
    manifest: dict[str, Any]

    @property
    def kernel(self) -> Path:
        return self.path / "vmlinux"

    @property
    def initrd(self) -> Path:
        return self.path / "initrd.img"

    @property
    def rootfs(self) -> Path:
        return self.path / "rootfs.ext4"

    @property
    def kernel_version(self) -> str:
        return str(self.manifest.get("kernel_version", ""))

    @property
    def defaults(self) -> dict[str, Any]:
        """What VMs of this image start with unless told otherwise: ``env``, ``rootfs``,
        ``user``, ``workdir`` (a custom or imported image's; empty for the default image)."""
        value = self.manifest.get("defaults")
        return dict(value) if isinstance(value, dict) else {}


def apply_image_defaults(options: VMOptions, image: Image) -> VMOptions:
    """``options`` (checked) with the image's defaults under them: its env under the VM's env,
    its rootfs mode when the options keep the default ``"cow"``; and ``disk_size`` checked
    against the image's own size."""
    defaults = image.defaults
    env = defaults.get("env")
    if isinstance(env, dict) and env:
        options = options.replace(env={**{str(k): str(v) for k, v in env.items()}, **options.env})
    rootfs = defaults.get("rootfs")
    if rootfs in ("readonly", "memory") and options.rootfs == "cow" and options.disk_size is None:
        options = options.replace(rootfs=rootfs)
    if options.disk_size is not None:
        base_mb = -(-image.rootfs.stat().st_size // (1 << 20))
        if int(options.disk_size) < base_mb:
            raise ValueError(f"disk_size {options.disk_size} MiB is smaller than the image's root disk "
                             f"({base_mb} MiB); give at least {base_mb}M, or leave disk_size unset")
    return options


class ImageStore:
    def __init__(self, root: Path | None = None) -> None:
        env = os.environ.get("GONDOLIN_IMAGE_DIR")
        self.root = Path(root or env or cache_root() / "images")

    @property
    def objects(self) -> Path:
        return self.root / "objects"

    @property
    def refs(self) -> Path:
        return self.root / "refs"

    # -- refs --------------------------------------------------------------
    def set_ref(self, name: str, build_id: str) -> None:
        if not _REF_RE.match(name):
            raise ImageError(f"invalid image ref name {name!r}")
        self.refs.mkdir(parents=True, exist_ok=True)
        tmp = self.refs / f".{name}.tmp"
        tmp.write_text(build_id + "\n")
        os.replace(tmp, self.refs / name)

    def ref(self, name: str) -> str | None:
        try:
            value = (self.refs / name).read_text().strip()
        except (FileNotFoundError, NotADirectoryError):
            return None
        return value if _ID_RE.match(value) else None

    def list_refs(self) -> dict[str, str]:
        out: dict[str, str] = {}
        if self.refs.is_dir():
            for p in sorted(self.refs.iterdir()):
                if not p.name.startswith(".") and (v := self.ref(p.name)):
                    out[p.name] = v
        return out

    # -- objects -----------------------------------------------------------
    def resolve(self, selector: str) -> Image:
        """Find an image by ref name, build id (or unique prefix), or asset directory path."""
        if os.sep in selector and Path(selector).is_dir():
            return self._load(Path(selector))
        build_id = self.ref(selector)
        if build_id is None and re.match(r"^[0-9a-f]{6,64}$", selector):
            matches = [p.name for p in self._object_dirs() if p.name.startswith(selector)]
            if len(matches) > 1:
                raise ImageError(f"image id prefix {selector!r} is ambiguous: {', '.join(matches)}")
            build_id = matches[0] if matches else None
        if build_id is None:
            raise ImageError(
                f"no image named {selector!r}; build one with `gondolin image build` "
                f"(known: {', '.join(self.list_refs()) or 'none'})"
            )
        path = self.objects / build_id
        if not path.is_dir():
            raise ImageError(f"image ref {selector!r} points at missing build {build_id}")
        return self._load(path)

    def _object_dirs(self) -> list[Path]:
        if not self.objects.is_dir():
            return []
        return [p for p in self.objects.iterdir() if p.is_dir() and _ID_RE.match(p.name)]

    def _load(self, path: Path) -> Image:
        try:
            manifest = json.loads((path / "manifest.json").read_text())
        except (OSError, ValueError) as exc:
            raise ImageError(f"image at {path} has no readable manifest.json: {exc}") from exc
        for name in ASSETS:
            if not (path / name).is_file():
                raise ImageError(f"image at {path} is missing {name}; rebuild it with `gondolin image build`")
            meta = (manifest.get("assets") or {}).get(name) or {}
            if "size" in meta and (path / name).stat().st_size != meta["size"]:
                raise ImageError(f"image at {path} is damaged: {name} is {(path / name).stat().st_size} bytes, its "
                                 f"manifest says {meta['size']}; remove it (`gondolin image rm`) and build or import "
                                 "it again")
        return Image(str(manifest.get("build_id", path.name)), path, manifest)

    def images(self) -> list[Image]:
        out = []
        for p in sorted(self._object_dirs()):
            try:
                out.append(self._load(p))
            except ImageError:
                continue
        return out

    def add(self, staging: Path, manifest_extra: dict[str, Any]) -> Image:
        """Move a directory holding the three assets into the store under its content id."""
        assets = {}
        for name in ASSETS:
            f = staging / name
            if not f.is_file():
                raise ImageError(f"cannot add image: {name} missing in {staging}")
            assets[name] = {"sha256": cached_sha256(f), "size": f.stat().st_size}
        build_id = hashlib.sha256(
            "".join(f"{n}:{a['sha256']}\n" for n, a in sorted(assets.items())).encode()
        ).hexdigest()[:24]
        manifest = {
            "build_id": build_id,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "assets": assets,
            **manifest_extra,
        }
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        self.objects.mkdir(parents=True, exist_ok=True)
        dest = self.objects / build_id
        if dest.exists():  # same content: keep the files, refresh what the manifest says about them
            os.replace(staging / "manifest.json", dest / "manifest.json")
            shutil.rmtree(staging)
        else:
            os.replace(staging, dest)
        return self._load(dest)

    def verify(self, image: Image) -> list[str]:
        """Return a list of problems (empty when every asset matches its manifest hash)."""
        problems = []
        for name, meta in (image.manifest.get("assets") or {}).items():
            f = image.path / name
            if not f.is_file():
                problems.append(f"{name}: missing")
            elif f.stat().st_size != meta.get("size"):
                problems.append(f"{name}: size {f.stat().st_size} != {meta.get('size')}")
            elif sha256_file(f) != meta.get("sha256"):
                problems.append(f"{name}: sha256 mismatch")
        if not image.manifest.get("assets"):
            problems.append("manifest lists no assets")
        return problems

    def remove(self, selector: str) -> list[str]:
        """Remove a ref; remove its object too when no other ref points at it. Returns what went."""
        removed = []
        build_id = self.ref(selector)
        if build_id is not None:
            (self.refs / selector).unlink()
            removed.append(f"ref {selector}")
        else:
            build_id = self.resolve(selector).build_id
        if build_id not in self.list_refs().values():
            path = self.objects / build_id
            if path.is_dir():
                shutil.rmtree(path)
                removed.append(f"image {build_id}")
        return removed

    # -- management ------------------------------------------------------------------------------
    def tag(self, source: str, name: str) -> Image:
        """Point the ref ``name`` at the image ``source`` names."""
        image = self.resolve(source)
        self.set_ref(name, image.build_id)
        return image

    def export(self, selector: str, out: Path) -> Image:
        """Write an image to a tar file (gzip-compressed when ``out`` ends in .gz or .tgz)."""
        image = self.resolve(selector)
        problems = self.verify(image)
        if problems:
            raise ImageError(f"image {image.build_id} is damaged ({'; '.join(problems)}); not exporting it")
        compress = ["-z"] if str(out).endswith((".gz", ".tgz")) else []
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        try:
            proc = subprocess.run(["tar", "--sparse", "--owner=0", "--group=0", "--numeric-owner", *compress,
                                   "-cf", str(tmp), "-C", str(image.path), "manifest.json", *ASSETS],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise ImageError(f"cannot write {out}: {proc.stderr.strip()}")
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
        return image

    def import_archive(self, archive: Path, name: str | None = None) -> Image:
        """Add an image written by :meth:`export`; its checksums are checked before it is stored."""
        allowed = {"manifest.json", *ASSETS}
        try:
            with tarfile.open(archive) as tar:
                for member in tar:
                    if member.name.removeprefix("./") not in allowed or not member.isfile():
                        raise ImageError(f"{archive} holds {member.name!r}: not a Gondolin image archive "
                                         "(made by `gondolin image export`)")
        except (tarfile.TarError, OSError) as exc:
            raise ImageError(f"{archive} is not a readable image archive: {exc}") from exc
        self.objects.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".import-", dir=self.objects))
        try:
            proc = subprocess.run(["tar", "-xf", str(archive), "-C", str(staging), "--no-same-owner"],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise ImageError(f"cannot unpack {archive}: {proc.stderr.strip()}")
            try:
                manifest = json.loads((staging / "manifest.json").read_text())
            except (OSError, ValueError) as exc:
                raise ImageError(f"{archive} has no readable manifest.json: {exc}") from exc
            problems = self.verify(Image(str(manifest.get("build_id", "")), staging, manifest))
            if problems:
                raise ImageError(f"{archive} is damaged: {'; '.join(problems)}")
            extra = {k: v for k, v in manifest.items() if k not in ("build_id", "assets", "created")}
            image = self.add(staging, extra)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        if image.build_id != manifest.get("build_id"):
            raise ImageError(f"{archive}: its assets hash to {image.build_id}, its manifest says "
                             f"{manifest.get('build_id')}")
        if name:
            self.set_ref(name, image.build_id)
        return image

    def gc(self, build_cache: Path | None = None) -> tuple[list[str], int]:
        """Remove images no ref names, and build-cache root filesystems no image uses.
        Returns what went and the bytes freed (allocated blocks)."""
        removed, freed = [], 0
        keep = set(self.list_refs().values())
        for path in self._object_dirs():
            if path.name not in keep:
                freed += _disk_usage(path)
                shutil.rmtree(path, ignore_errors=True)
                removed.append(f"image {path.name}")
        for tmp in self.objects.glob(".import-*") if self.objects.is_dir() else []:
            shutil.rmtree(tmp, ignore_errors=True)
        if build_cache is not None and (build_cache / "layers").is_dir():
            for f in (build_cache / "layers").glob("*.ext4"):
                if f.stat().st_nlink == 1:  # not hard-linked into any stored image
                    freed += _disk_usage(f)
                    f.unlink()
                    removed.append(f"build cache {f.name}")
        live = set()
        for p in self._object_dirs():
            for a in ASSETS:
                with contextlib.suppress(OSError):
                    st = (p / a).stat()
                    live.add(f"{st.st_dev}-{st.st_ino}")
        for hashes in (self.objects / ".hashes", *([build_cache / ".hashes"] if build_cache else [])):
            for side in hashes.iterdir() if hashes.is_dir() else []:
                if side.name not in live:
                    side.unlink(missing_ok=True)
        return removed, freed


def _disk_usage(path: Path) -> int:
    if path.is_file():
        return path.stat().st_blocks * 512
    return sum(p.lstat().st_blocks * 512 for p in path.rglob("*"))
