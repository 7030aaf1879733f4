"""Import an OCI image (a layout directory or tarball, or a ``docker save`` archive) as a guest image.

The layers are unpacked in order by :func:`unpack_layer`, written here on top of ``tarfile``
so that every path is checked before it is touched: whiteouts (``.wh.NAME``) delete what lower
layers made, opaque directories (``.wh..wh..opq``) hide it, ownership, modes and times are kept,
and an entry is refused when its path climbs out of the root, when it would be written through
a symlink, or when it is a hard link to something outside the root or a symlink whose relative
target climbs out of it. Device nodes are skipped (the guest mounts its own ``/dev``); extended
attributes are not kept.

Gondolin's customisation (the ``agent`` user, ``/workspace``, kernel modules) is then applied
to the unpacked tree, and the default image's kernel and initramfs (with the guest agent) are
added. The guest agent runs on the image's own ``python3`` (``/usr/bin/python3``, or
``/usr/local/bin/python3`` as in the official python images, linked from there): an image
without one is refused with a message saying so. The image config's ``Env``, ``WorkingDir`` and ``User`` become the
image's defaults.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import posixpath
import shutil
import stat
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

from ..errors import ImageError
from .builder import ImageBuilder, Progress, _stderr_progress
from .custom import confined, pack_ext4
from .store import Image, ImageStore

IMPORT_FORMAT = 1
MAX_JSON = 4 << 20  # an index, manifest or config larger than this is refused
WH_PREFIX = ".wh."
WH_OPAQUE = ".wh..wh..opq"
LAYER_GZIP = ("application/vnd.oci.image.layer.v1.tar+gzip", "application/vnd.docker.image.rootfs.diff.tar.gzip")
INDEX_TYPES = ("application/vnd.oci.image.index.v1+json", "application/vnd.docker.distribution.manifest.list.v2+json")


def _clean(name: str) -> str:
    """An archive path made relative and normal; ImageError when it climbs out of the root."""
    if "\0" in name:
        raise ImageError(f"layer entry {name!r} contains a NUL byte")
    norm = posixpath.normpath(name.lstrip("/"))
    if norm == ".." or norm.startswith("../"):
        raise ImageError(f"layer entry {name!r} leads outside the root filesystem (path traversal)")
    return "" if norm == "." else norm


def _parent_dir(root: Path, rel: str) -> Path:
    """The real directory that will hold ``rel``: every component must be a directory, never a symlink."""
    current = root
    for part in rel.split("/")[:-1]:
        current = current / part
        try:
            st = current.lstat()
        except FileNotFoundError:
            current.mkdir(mode=0o755)
            continue
        if stat.S_ISLNK(st.st_mode):
            raise ImageError(f"layer entry {rel!r} would be written through the symlink /{current.relative_to(root)}")
        if not stat.S_ISDIR(st.st_mode):
            current.unlink()
            current.mkdir(mode=0o755)
    return current


def _remove(path: Path) -> None:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        path.unlink()


def _symlink_escapes(rel: str, target: str) -> bool:
    if target.startswith("/"):
        return False  # absolute: inside the root once the guest boots (and host writes resolve it there)
    depth = len(rel.split("/")) - 1
    for part in target.split("/"):
        if part == "..":
            depth -= 1
            if depth < 0:
                return True
        elif part not in ("", "."):
            depth += 1
    return False


def unpack_layer(layer: IO[bytes], root: Path) -> None:
    """Apply one layer (an uncompressed or gzip/bzip2/xz tar stream) to ``root``."""
    made: set[str] = set()  # what this layer wrote: an opaque marker hides only lower layers
    deferred: list[tuple[Path, tarfile.TarInfo]] = []
    try:
        tar = tarfile.open(fileobj=layer, mode="r|*")
    except tarfile.TarError as exc:
        raise ImageError(f"a layer is not a tar archive: {exc}") from exc
    with tar:
        for member in tar:
            rel = _clean(member.name)
            if not rel:
                continue
            base = posixpath.basename(rel)
            if base == WH_OPAQUE:
                parent = root / posixpath.dirname(rel) if posixpath.dirname(rel) else root
                _parent_dir(root, rel)
                prefix = posixpath.dirname(rel)
                for child in list(parent.iterdir()) if parent.is_dir() and not parent.is_symlink() else []:
                    child_rel = f"{prefix}/{child.name}" if prefix else child.name
                    if child_rel not in made:
                        _remove(child)
                continue
            if base.startswith(WH_PREFIX):
                hidden = posixpath.join(posixpath.dirname(rel), base[len(WH_PREFIX):])
                _parent_dir(root, hidden)
                _remove(root / hidden)
                continue
            parent = _parent_dir(root, rel)
            path = parent / base
            if member.isdir():
                if path.is_symlink() or (path.exists() and not path.is_dir()):
                    _remove(path)
                path.mkdir(mode=0o755, exist_ok=True)
                deferred.append((path, member))  # modes and times after the contents
            elif member.issym():
                if _symlink_escapes(rel, member.linkname):
                    raise ImageError(f"layer symlink /{rel} -> {member.linkname} points outside the root filesystem")
                _remove(path)
                os.symlink(member.linkname, path)
                os.lchown(path, member.uid, member.gid)
            elif member.islnk():
                target_rel = _clean(member.linkname)
                if not target_rel:
                    raise ImageError(f"layer hard link /{rel} has no target")
                target = _parent_dir(root, target_rel) / posixpath.basename(target_rel)
                if not target.is_symlink() and not target.exists():
                    raise ImageError(f"layer hard link /{rel} -> /{target_rel}: the target is not in the image")
                _remove(path)
                os.link(target, path, follow_symlinks=False)
            elif member.isreg():
                _remove(path)
                src = tar.extractfile(member)
                assert src is not None
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                with os.fdopen(fd, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
                _attrs(path, member)
            elif member.isfifo():
                _remove(path)
                os.mkfifo(path)
                _attrs(path, member)
            else:
                continue  # character/block devices: the guest has devtmpfs
            made.add(rel)
    for path, member in reversed(deferred):
        _attrs(path, member)


def _attrs(path: Path, member: tarfile.TarInfo) -> None:
    os.lchown(path, member.uid, member.gid)
    os.chmod(path, member.mode & 0o7777)  # after chown, which clears setuid bits
    os.utime(path, (member.mtime, member.mtime), follow_symlinks=False)


# -- reading an image -----------------------------------------------------------------------------
class _Source:
    """Blobs of an OCI layout or a docker save archive, from a directory or an (extracted) tarball."""

    def __init__(self, path: Path, work: Path) -> None:
        self.origin = path
        if path.is_file():
            root = work / "archive"
            root.mkdir()
            try:
                with tarfile.open(path) as tar:
                    tar.extractall(root, filter="data")
            except (tarfile.TarError, OSError) as exc:
                raise ImageError(f"{path} is not a readable OCI or docker archive: {exc}") from exc
            self.root = root
        elif path.is_dir():
            self.root = path
        else:
            raise ImageError(f"no OCI image at {path} (give an OCI layout directory, its tarball, "
                             "or a `docker save` archive)")

    def read_json(self, rel: str) -> Any:
        path = self.root / rel
        try:
            if path.stat().st_size > MAX_JSON:
                raise ImageError(f"{rel} in {self.origin} is too large")
            return json.loads(path.read_bytes())
        except (OSError, ValueError) as exc:
            raise ImageError(f"{self.origin}: cannot read {rel}: {exc}") from exc

    def blob(self, digest: str) -> Path:
        algo, _, hexd = digest.partition(":")
        if algo != "sha256" or len(hexd) != 64 or not all(c in "0123456789abcdef" for c in hexd):
            raise ImageError(f"{self.origin}: unsupported or malformed digest {digest!r}")
        path = self.root / "blobs" / "sha256" / hexd
        if not path.is_file():
            raise ImageError(f"{self.origin}: blob {digest} is missing")
        return path


def _verify(path: Path, digest: str) -> None:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    if "sha256:" + h.hexdigest() != digest:
        raise ImageError(f"blob {path.name} does not match its digest {digest} (damaged image)")


def read_image(source: _Source, platform: str = "linux/amd64") -> tuple[list[tuple[Path, str]], dict[str, Any], str]:
    """(layers as (file, media type), image config, manifest digest or archive id)."""
    root = source.root
    if (root / "index.json").is_file():
        index = source.read_json("index.json")
        manifests = index.get("manifests") or []
        if not manifests:
            raise ImageError(f"{source.origin}: index.json lists no image")
        entry = manifests[0]
        while entry.get("mediaType") in INDEX_TYPES:
            path = source.blob(entry["digest"])
            _verify(path, entry["digest"])
            sub = json.loads(path.read_bytes()).get("manifests") or []
            want_os, want_arch = platform.split("/")
            chosen = [m for m in sub if (m.get("platform") or {}).get("os") == want_os
                      and (m.get("platform") or {}).get("architecture") == want_arch]
            if not chosen:
                raise ImageError(f"{source.origin}: the image has no {platform} variant")
            entry = chosen[0]
        mpath = source.blob(entry["digest"])
        _verify(mpath, entry["digest"])
        manifest = json.loads(mpath.read_bytes())
        cpath = source.blob(manifest["config"]["digest"])
        _verify(cpath, manifest["config"]["digest"])
        config = json.loads(cpath.read_bytes())
        layers = []
        for layer in manifest.get("layers") or []:
            lpath = source.blob(layer["digest"])
            _verify(lpath, layer["digest"])
            layers.append((lpath, str(layer.get("mediaType", ""))))
        return layers, config, str(entry["digest"])
    if (root / "manifest.json").is_file():  # docker save (older format, no index.json)
        entries = source.read_json("manifest.json")
        if not isinstance(entries, list) or not entries:
            raise ImageError(f"{source.origin}: manifest.json lists no image")
        entry = entries[0]
        config = source.read_json(_clean(entry["Config"]))
        layers = []
        for rel in entry.get("Layers") or []:
            path = root / _clean(rel)
            if not path.is_file():
                raise ImageError(f"{source.origin}: layer {rel} is missing")
            layers.append((path, ""))
        return layers, config, "sha256:" + hashlib.sha256(json.dumps(entry, sort_keys=True).encode()).hexdigest()
    raise ImageError(f"{source.origin} is neither an OCI image layout (index.json) nor a `docker save` "
                     "archive (manifest.json)")


def _open_layer(path: Path, media_type: str) -> IO[bytes]:
    if media_type.endswith("+zstd"):
        zstd = shutil.which("zstd")
        if zstd is None:
            raise ImageError("the image has zstd-compressed layers: install zstd (apt-get install zstd)")
        data = subprocess.run([zstd, "-dc", str(path)], capture_output=True, check=False)
        if data.returncode != 0:
            raise ImageError(f"cannot decompress layer {path.name}: {data.stderr.decode()[-500:]}")
        return io.BytesIO(data.stdout)
    return open(path, "rb")  # tarfile detects gzip/bzip2/xz or none


def image_defaults(config: dict[str, Any]) -> dict[str, Any]:
    """Env, WorkingDir and User of an image config, as Gondolin image defaults."""
    cfg = config.get("config") or {}
    env: dict[str, str] = {}
    for item in cfg.get("Env") or []:
        key, sep, value = str(item).partition("=")
        if sep and key:
            env[key] = value
    out: dict[str, Any] = {"rootfs": "cow", "env": env}
    if cfg.get("WorkingDir"):
        out["workdir"] = str(cfg["WorkingDir"])
    if cfg.get("User"):
        out["user"] = str(cfg["User"]).split(":")[0]
    return out


class OciImporter(ImageBuilder):
    """Turn an OCI image into a bootable guest image with the default image's kernel and agent."""

    def __init__(self, path: str | os.PathLike[str], store: ImageStore | None = None,
                 progress: Progress | None = _stderr_progress, free_space_mb: int = 1024) -> None:
        super().__init__(store, progress=progress)
        self.source_path = Path(path).resolve()
        self.free_space_mb = free_space_mb
        self._digest: str | None = None  # identity of the input (the cache key)
        self._manifest_digest: str | None = None  # the image manifest's digest, once read
        self._defaults: dict[str, Any] = {}

    def _source_digest(self) -> str:
        """Identity of the input: the manifest digest read from the layout, else a file hash."""
        if self._digest is None:
            p = self.source_path
            if p.is_dir() and (p / "index.json").is_file():
                data = (p / "index.json").read_bytes()[:MAX_JSON]
                self._digest = "index:" + hashlib.sha256(data).hexdigest()
            elif p.is_file():
                h = hashlib.sha256()
                with open(p, "rb") as f:
                    while block := f.read(1 << 20):
                        h.update(block)
                self._digest = "file:" + h.hexdigest()
            else:
                self._digest = "dir:" + hashlib.sha256(str(p).encode()).hexdigest()
        return self._digest

    def inputs_key(self) -> str:
        return hashlib.sha256(f"oci|{IMPORT_FORMAT}|{self._source_digest()}|{self.free_space_mb}|"
                              f"{super().inputs_key()}".encode()).hexdigest()[:16]

    def manifest_extra(self) -> dict[str, object]:
        return {"kind": "oci", "oci_source": {"path": str(self.source_path), "digest": self._manifest_digest},
                "defaults": self._defaults, "packages": []}

    def _rootfs(self, kdir: Path, kver: str, force: bool) -> Path:
        layers_dir = self.work / "layers"
        layers_dir.mkdir(parents=True, exist_ok=True)
        out = layers_dir / f"oci-{self.inputs_key()}-{kver}.ext4"
        tmp = Path(tempfile.mkdtemp(prefix="oci-", dir=self.work))
        try:
            source = _Source(self.source_path, tmp)
            layers, config, digest = read_image(source)
            self._manifest_digest = digest
            self._defaults = image_defaults(config)
            if out.exists() and not force:
                return out
            tree = tmp / "tree"
            tree.mkdir()
            for i, (path, media_type) in enumerate(layers, 1):
                self.progress(f"unpacking layer {i}/{len(layers)} ({path.stat().st_size / 1e6:.1f} MB)")
                with _open_layer(path, media_type) as f:
                    unpack_layer(f, tree)
            os.chmod(tree, 0o755)
            ensure_python(tree, self.source_path)
            for guest in ("/etc", "/etc/passwd", "/etc/group", "/etc/shadow", "/etc/hostname", "/etc/hosts",
                          "/etc/resolv.conf", "/etc/pip.conf", "/etc/skel", "/etc/ssh", "/home", "/workspace",
                          "/usr", "/usr/lib", "/lib", "/lib/modules", "/usr/share", "/var", "/var/cache",
                          "/dev", "/proc", "/sys", "/tmp", "/run", "/root"):
                _must_stay_inside(tree, guest)
            self.progress("customising root filesystem")
            self._customise(tree, kdir, kver)
            pack_ext4(tree, tmp / "rootfs.ext4", self.free_space_mb, self.progress)
            os.replace(tmp / "rootfs.ext4", out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return out


def ensure_python(tree: Path, origin: Path) -> None:
    """The guest agent starts as ``/usr/bin/python3``: link it to ``/usr/local/bin/python3`` when
    only that exists (the official python images); refuse an image with neither."""
    python = confined(tree, "/usr/bin/python3")
    if not python.exists() and not python.is_symlink() and _resolves(tree, "/usr/local/bin/python3"):
        # the official python images install into /usr/local; the initramfs starts /usr/bin/python3
        _must_stay_inside(tree, "/usr/bin")
        python.parent.mkdir(parents=True, exist_ok=True)
        os.symlink("/usr/local/bin/python3", python)
    if not (python.is_file() or python.is_symlink()) or not _resolves(tree, "/usr/bin/python3"):
        raise ImageError(
            f"{origin}: the image has no /usr/bin/python3, and the Gondolin guest agent runs on "
            "the image's python3; add it to the image (Debian/Ubuntu: apt-get install -y python3-minimal; "
            "Alpine: apk add python3) and import it again")


def _resolves(tree: Path, guest: str) -> bool:
    path = confined(tree, guest)
    for _ in range(40):
        if not path.is_symlink():
            return path.is_file()
        target = os.readlink(path)
        path = confined(tree, target if target.startswith("/") else
                        posixpath.join("/" + str(path.parent.relative_to(tree)), target))
    return False


def _must_stay_inside(tree: Path, guest: str) -> None:
    """Refuse an image where a path Gondolin writes is a symlink the host would follow outside ``tree``."""
    host = tree / guest.lstrip("/")
    try:
        real = host.resolve()
    except (OSError, RuntimeError) as exc:
        raise ImageError(f"the image's {guest} cannot be resolved: {exc}") from exc
    if not real.is_relative_to(tree.resolve()):
        raise ImageError(f"the image's {guest} is a symlink out of its root filesystem ({real}); refusing to import")


def import_oci(path: str | os.PathLike[str], tag: str, *, store: ImageStore | None = None, force: bool = False,
               progress: Progress | None = _stderr_progress) -> Image:
    """Import the OCI image at ``path`` and name it ``tag`` (cached by the image's digest)."""
    return OciImporter(path, store, progress).build(tag, force=force)


# -- writing a layout (tests, and packing a directory tree as an image) --------------------------
def _write_blob(layout: Path, data: bytes) -> dict[str, Any]:
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def write_layout(layout: Path, layers: Iterable[bytes | Path], *, env: dict[str, str] | None = None,
                 workdir: str | None = None, user: str | None = None, ref: str = "latest") -> str:
    """Write an OCI image layout holding ``layers`` (uncompressed tar bytes or tar files, bottom
    first; each gzip-compressed here) and a config with ``env``/``workdir``/``user``. Returns
    the manifest digest."""
    layout.mkdir(parents=True, exist_ok=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    descs, diff_ids = [], []
    for layer in layers:
        raw = layer.read_bytes() if isinstance(layer, Path) else layer
        diff_ids.append("sha256:" + hashlib.sha256(raw).hexdigest())
        desc = _write_blob(layout, gzip.compress(raw, compresslevel=1, mtime=0))
        descs.append({"mediaType": LAYER_GZIP[0], **desc})
    config = {"architecture": "amd64", "os": "linux", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(0)),
              "config": {"Env": [f"{k}={v}" for k, v in (env or {}).items()],
                         **({"WorkingDir": workdir} if workdir else {}), **({"User": user} if user else {})},
              "rootfs": {"type": "layers", "diff_ids": diff_ids}}
    cdesc = _write_blob(layout, json.dumps(config, sort_keys=True).encode())
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **cdesc}, "layers": descs}
    mdesc = _write_blob(layout, json.dumps(manifest, sort_keys=True).encode())
    index = {"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", **mdesc,
                                                "annotations": {"org.opencontainers.image.ref.name": ref}}]}
    (layout / "index.json").write_text(json.dumps(index, sort_keys=True))
    return str(mdesc["digest"])


__all__ = ["OciImporter", "image_defaults", "import_oci", "read_image", "unpack_layer",
           "write_layout"]
