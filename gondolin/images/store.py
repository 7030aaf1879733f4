"""Content-addressed store of guest images.

Layout under ``$XDG_CACHE_HOME/gondolin/images`` (or ``GONDOLIN_IMAGE_DIR``)::

    objects/<build_id>/vmlinux  initrd.img  rootfs.ext4  manifest.json
    refs/<name>                 text file holding a build id (e.g. refs/default)

The build id is derived from the sha256 of every asset, so two identical builds share an id and
a changed asset can never hide behind an old id. ``manifest.json`` records each asset's sha256
and size; :meth:`ImageStore.verify` checks them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ImageError

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
