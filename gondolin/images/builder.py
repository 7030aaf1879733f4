"""Build the default guest image from Debian packages.

Three assets, each cached on its own so that changing the guest agent rebuilds only the
(sub-second) initramfs:

- ``rootfs.ext4``: a Debian bookworm tree from ``mmdebstrap`` plus our customisation, packed
  journal-less with ``mke2fs -d``. Cached by a key over the package list and customisation.
- ``vmlinux`` (decompressed, booted through PVH) + modules: extracted from Debian's ``linux-image-*-amd64`` package (``apt-get
  download`` + ``dpkg -x``), ``depmod`` run over it for the load order.
- ``initrd.img``: an uncompressed newc cpio holding static busybox, ``guest/init``, the modules
  the boot needs (in dependency order) and the guest agent with its protocol module.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ImageError, MissingToolError
from .cpio import write_newc
from .store import Image, ImageStore, cache_root

SUITE = "bookworm"
KERNEL_META = "linux-image-amd64"
PACKAGES = (
    "bash", "coreutils", "curl", "ca-certificates", "git", "python3", "python3-venv",
    "python3-pip", "procps", "iproute2", "less", "mount", "busybox", "kmod", "netcat-openbsd",
    "iputils-ping", "tar", "findutils", "sqlite3", "passwd", "xz-utils", "gzip", "file", "make",
    # `ssh`/`git` over SSH through the host's SSH proxy, and `sshd` for `vm.enable_ssh()` (never
    # started unless asked; host keys are made per VM at that point, none ship in the image).
    "openssh-client", "openssh-server",
)
# Loaded by the initramfs at every boot (their dependencies are added automatically).
BOOT_MODULES = ("virtio_pci", "virtio_blk", "virtio_console", "virtio_rng", "virtio_net", "crc32c_generic", "ext4",
                "overlay")
# Copied into the rootfs so the guest can `modprobe` them on demand.
ROOTFS_MODULE_DIRS = ("kernel/fs/fuse", "kernel/fs/9p", "kernel/net/9p", "kernel/fs/netfs",
                      "kernel/fs/fscache", "kernel/net/vmw_vsock", "kernel/drivers/char/hw_random")
BUILD_FORMAT = 6  # bump when the customisation below changes in a way the cache key cannot see
GUEST_DIR = Path(__file__).resolve().parent.parent.parent / "guest"
PROTOCOL_DIR = Path(__file__).resolve().parent.parent / "protocol"
VFS_WIRE = Path(__file__).resolve().parent.parent / "vfs" / "wire.py"

Progress = Callable[[str], None]


def _stderr_progress(msg: str) -> None:
    print(f"[gondolin image] {msg}", file=sys.stderr, flush=True)


@dataclass
class BuildConfig:
    suite: str = SUITE
    packages: tuple[str, ...] = PACKAGES
    rootfs_extra_mb: int = 1024  # free space in the guest root filesystem
    mirror: str | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def rootfs_key(self) -> str:
        h = hashlib.sha256()
        h.update(f"{BUILD_FORMAT}|{self.suite}|{','.join(sorted(self.packages))}|{self.rootfs_extra_mb}"
                 f"|{self.mirror}".encode())
        return h.hexdigest()[:16]


def mmdebstrap_argv(suite: str, packages: Iterable[str], out: Path, mirror: str | None = None,
                    extra: Iterable[str] = ()) -> list[str]:
    """The mmdebstrap command every image build runs: essential variant plus ``packages``, without
    manuals, docs (copyright kept), locales or info pages; ``extra`` options go before the suite."""
    argv = [
        "mmdebstrap", "--variant=essential", f"--include={','.join(packages)}",
        "--dpkgopt=path-exclude=/usr/share/man/*", "--dpkgopt=path-exclude=/usr/share/doc/*",
        "--dpkgopt=path-include=/usr/share/doc/*/copyright",
        "--dpkgopt=path-exclude=/usr/share/locale/*", "--dpkgopt=path-include=/usr/share/locale/locale.alias",
        "--dpkgopt=path-exclude=/usr/share/info/*", "--aptopt=Acquire::Retries \"3\"",
        *extra, suite, str(out),
    ]
    return [*argv, mirror] if mirror else argv


def require(tool: str, package: str, purpose: str) -> str:
    path = shutil.which(tool) or (f"/usr/sbin/{tool}" if os.path.exists(f"/usr/sbin/{tool}") else None) or (
        f"/sbin/{tool}" if os.path.exists(f"/sbin/{tool}") else None)
    if not path:
        raise MissingToolError(tool, package, purpose)
    return path


def _run(argv: list[str], what: str, progress: Progress | None = None, **kw: object) -> str:
    """Run a build step; on failure raise ImageError with the tail of its output."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)  # type: ignore[call-overload]
    lines: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line.rstrip())
        if progress and line.startswith("I: "):
            progress(f"  {what}: {line[3:].strip()}")
    rc = proc.wait()
    if rc != 0:
        tail = "\n".join(lines[-25:])
        raise ImageError(f"{what} failed (exit {rc}):\n{tail}")
    return "\n".join(lines)


class ImageBuilder:
    def __init__(self, store: ImageStore | None = None, config: BuildConfig | None = None,
                 progress: Progress | None = _stderr_progress) -> None:
        self.store = store or ImageStore()
        self.config = config or BuildConfig()
        self.progress = progress or (lambda _m: None)
        self.work = cache_root() / "build"

    # -- public ------------------------------------------------------------
    def inputs_key(self) -> str:
        """Hash of everything that goes into an image except the Debian packages' own contents."""
        h = hashlib.sha256(self.config.rootfs_key().encode())
        h.update(",".join(BOOT_MODULES).encode())
        for f in sorted([GUEST_DIR / "init", *GUEST_DIR.glob("*.py"), *PROTOCOL_DIR.glob("*.py"),
                         *([VFS_WIRE] if VFS_WIRE.is_file() else [])]):
            h.update(f.name.encode() + b"\0" + f.read_bytes())
        return h.hexdigest()[:16]

    def is_current(self, ref: str = "default") -> bool:
        build_id = self.store.ref(ref)
        if build_id is None:
            return False
        try:
            image = self.store.resolve(build_id)
        except ImageError:
            return False
        return bool(image.manifest.get("inputs_key") == self.inputs_key())

    def build(self, ref: str = "default", force: bool = False) -> Image:
        if not force and self.is_current(ref):
            image = self.store.resolve(ref)
            self.progress(f"image '{ref}' is up to date ({image.build_id}); use --force to rebuild")
            return image
        import fcntl

        self.work.mkdir(parents=True, exist_ok=True)
        with open(self.work / ".lock", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.progress("another process is building the image; waiting for it")
                fcntl.flock(lock, fcntl.LOCK_EX)
            if not force and self.is_current(ref):  # built while we waited
                return self.store.resolve(ref)
            if not force and (same := self._find_by_inputs()) is not None:
                # Another checkout or version of gondolin moved the ref; the image for this
                # code is still in the store, so point the ref back instead of rebuilding.
                self.store.set_ref(ref, same.build_id)
                return same
            return self._build_locked(ref, force)

    def _find_by_inputs(self) -> Image | None:
        key = self.inputs_key()
        for image in self.store.images():
            if image.manifest.get("inputs_key") == key and not image.manifest.get("partial"):
                return image
        return None

    def _build_locked(self, ref: str, force: bool) -> Image:
        t0 = time.monotonic()
        self._check_tools()
        self.work.mkdir(parents=True, exist_ok=True)
        kdir, kver = self._kernel(force)
        rootfs = self._rootfs(kdir, kver, force)
        staging = Path(tempfile.mkdtemp(prefix="staging-", dir=self.work))
        try:
            extract_vmlinux(kdir / "boot" / f"vmlinuz-{kver}", staging / "vmlinux")
            self._initramfs(kdir, kver, staging / "initrd.img")
            # VMs only ever open the base image read-only (or as a qcow2 backing file), so the store
            # may share the build cache's file instead of copying 1+ GB.
            try:
                os.link(rootfs, staging / "rootfs.ext4")
            except OSError:
                subprocess.run(["cp", "--sparse=always", "--reflink=auto", str(rootfs),
                                str(staging / "rootfs.ext4")], check=True)
            image = self.store.add(staging, {
                "inputs_key": self.inputs_key(),
                "kernel_version": kver, "suite": self.config.suite,
                "packages": sorted(self.config.packages), "arch": "x86_64", "format": BUILD_FORMAT,
                **self.manifest_extra(),
            })
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        self.store.set_ref(ref, image.build_id)
        self.progress(f"image {image.build_id} ready as '{ref}' in {time.monotonic() - t0:.1f}s")
        return image

    def manifest_extra(self) -> dict[str, object]:
        """More manifest fields (a custom or imported image records its inputs and defaults)."""
        return {"kind": "default"}

    # -- steps -------------------------------------------------------------
    def _check_tools(self) -> None:
        require("mmdebstrap", "mmdebstrap", "build the guest root filesystem")
        require("mke2fs", "e2fsprogs", "pack the guest root filesystem")
        require("depmod", "kmod", "order the guest kernel modules")
        require("dpkg", "dpkg", "unpack the guest kernel")
        require("apt-get", "apt", "download the guest kernel")
        if not Path("/bin/busybox").is_file() or b"statically linked" not in subprocess.run(
                ["file", "-b", "/bin/busybox"], capture_output=True).stdout and not self._busybox_static():
            raise MissingToolError("busybox (static)", "busybox-static", "build the guest initramfs")
        if os.geteuid() != 0:
            raise ImageError(
                "building the guest image needs root (the root filesystem must keep file ownership); "
                "run `sudo gondolin image build` once, or `make run`, which does it for you"
            )

    @staticmethod
    def _busybox_static() -> bool:
        try:
            out = subprocess.run(["ldd", "/bin/busybox"], capture_output=True, text=True).stdout
        except OSError:
            return True
        return "not a dynamic executable" in out or "statically linked" in out

    def _kernel(self, force: bool) -> tuple[Path, str]:
        pkg = self._kernel_package()
        kdir = self.work / f"kernel-{pkg}"
        marker = kdir / ".complete"
        if marker.exists() and not force:
            kver = marker.read_text().strip()
            self.progress(f"kernel {kver}: cached")
            return kdir, kver
        shutil.rmtree(kdir, ignore_errors=True)
        dl = Path(tempfile.mkdtemp(prefix="kernel-dl-", dir=self.work))
        try:
            self.progress(f"downloading kernel package {pkg}")
            _run(["apt-get", "download", pkg], "apt-get download", cwd=str(dl))
            debs = list(dl.glob("*.deb"))
            if not debs:
                raise ImageError(f"apt-get download {pkg} produced no .deb")
            self.progress("unpacking kernel")
            _run(["dpkg", "-x", str(debs[0]), str(kdir)], "dpkg -x")
        finally:
            shutil.rmtree(dl, ignore_errors=True)
        versions = [p.name for p in (kdir / "lib" / "modules").iterdir()]
        if len(versions) != 1:
            raise ImageError(f"unexpected module trees in {pkg}: {versions}")
        kver = versions[0]
        _run([require("depmod", "kmod", "order modules"), "-b", str(kdir), kver], "depmod")
        marker.write_text(kver + "\n")
        return kdir, kver

    def _kernel_package(self) -> str:
        def depends() -> str | None:
            out = subprocess.run(["apt-cache", "depends", KERNEL_META], capture_output=True, text=True).stdout
            for line in out.splitlines():
                line = line.strip()
                if line.startswith("Depends: linux-image-"):
                    return line.split(":", 1)[1].strip()
            return None

        pkg = depends()
        if pkg is None and os.geteuid() == 0:
            self.progress("apt package lists are empty; running apt-get update")
            _run(["apt-get", "update", "-q"], "apt-get update")
            pkg = depends()
        if pkg is None:
            raise ImageError(
                f"cannot find the Debian kernel package ({KERNEL_META}) in the apt lists; run "
                "`sudo apt-get update` (a Debian bookworm apt source is needed)"
            )
        return pkg

    def _rootfs(self, kdir: Path, kver: str, force: bool) -> Path:
        key = self.config.rootfs_key() + "-" + hashlib.sha256(kver.encode()).hexdigest()[:6]
        out = self.work / f"rootfs-{key}.ext4"
        if out.exists() and not force:
            self.progress("root filesystem: cached")
            return out
        tmp = Path(tempfile.mkdtemp(prefix="rootfs-", dir=self.work))
        try:
            tar = tmp / "rootfs.tar"
            self.progress(f"building Debian {self.config.suite} root filesystem with mmdebstrap (~1 min)")
            argv = mmdebstrap_argv(self.config.suite, self.config.packages, tar, self.config.mirror)
            _run(argv, "mmdebstrap", self.progress)
            tree = tmp / "tree"
            tree.mkdir()
            self.progress("customising root filesystem")
            _run(["tar", "--numeric-owner", "-xpf", str(tar), "-C", str(tree)], "tar -x")
            tar.unlink()
            self._customise(tree, kdir, kver)
            used = int(subprocess.run(["du", "-sm", str(tree)], capture_output=True, text=True).stdout.split()[0])
            size_mb = used + used // 5 + self.config.rootfs_extra_mb
            self.progress(f"packing ext4 ({used} MiB used, {size_mb} MiB image)")
            part = tmp / "rootfs.ext4"
            _run([require("mke2fs", "e2fsprogs", "pack the rootfs"), "-q", "-t", "ext4", "-O", "^has_journal",
                  "-L", "gondolin-root", "-E", "root_owner=0:0", "-m", "0", "-d", str(tree), str(part),
                  f"{size_mb}M"], "mke2fs")
            os.replace(part, out)
            for old in self.work.glob("rootfs-*.ext4"):
                if old != out:
                    old.unlink()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return out

    def _customise(self, root: Path, kdir: Path, kver: str) -> None:
        etc = root / "etc"
        (etc / "hostname").write_text("gondolin\n")
        (etc / "hosts").write_text("127.0.0.1\tlocalhost gondolin\n::1\tlocalhost ip6-localhost ip6-loopback\n")
        (etc / "resolv.conf").unlink(missing_ok=True)
        (etc / "resolv.conf").write_text("nameserver 192.168.127.1\n")
        # The unprivileged user agent code can run as (uid/gid 1000), unless an imported image
        # already has one of that name.
        passwd = (etc / "passwd").read_text() if (etc / "passwd").is_file() else ""
        if not any(line.startswith("agent:") for line in passwd.splitlines()):
            shell = "/bin/bash" if (root / "bin" / "bash").exists() or (root / "usr" / "bin" / "bash").exists() \
                else "/bin/sh"
            with open(etc / "passwd", "a") as f:
                f.write(f"agent:x:1000:1000:Gondolin agent:/home/agent:{shell}\n")
            with open(etc / "group", "a") as f:
                f.write("agent:x:1000:\n")
            if (etc / "shadow").exists():
                with open(etc / "shadow", "a") as f:
                    f.write("agent:!:19000:0:99999:7:::\n")
        # The initramfs mounts the kernel's file systems and tmpfs over these (an imported image
        # may lack some).
        for d in ("dev", "proc", "sys", "tmp", "run", "root", "var/tmp", "var/cache", "var/log"):
            (root / d).mkdir(parents=True, exist_ok=True)
        home = root / "home" / "agent"
        home.mkdir(parents=True, exist_ok=True)
        for skel in (etc / "skel").glob(".*") if (etc / "skel").is_dir() else []:
            shutil.copy2(skel, home / skel.name)
        for p in [home, *home.iterdir()]:
            os.chown(p, 1000, 1000)
        os.chmod(home, 0o755)
        (root / "workspace").mkdir(exist_ok=True)
        os.chmod(root / "workspace", 0o777)
        # `pip install` works as in any throwaway machine: the VM is the environment, so Debian's
        # PEP 668 marker goes (root installs to /usr/local, other users to ~/.local), and pip
        # neither warns about root nor asks PyPI for its own newer version.
        for marker in (root / "usr" / "lib").glob("python3*/EXTERNALLY-MANAGED"):
            marker.unlink()
        (etc / "pip.conf").write_text("[global]\nroot-user-action = ignore\ndisable-pip-version-check = true\n")
        # Kernel modules the guest may load on demand (FUSE, 9p, vsock), with their own modules.dep.
        src = kdir / "lib" / "modules" / kver
        dst = root / "lib" / "modules" / kver
        for sub in ROOTFS_MODULE_DIRS:
            if (src / sub).is_dir():
                shutil.copytree(src / sub, dst / sub, dirs_exist_ok=True)
        for ko in dst.rglob("*.ko"):
            ko.write_bytes(strip_module_signature(ko.read_bytes()))
        for name in ("modules.order", "modules.builtin", "modules.builtin.modinfo"):
            if (src / name).exists():
                shutil.copy2(src / name, dst / name)
        _run([require("depmod", "kmod", "order modules"), "-b", str(root), kver], "depmod (rootfs)")
        # sshd's host keys are per VM (made by `vm.enable_ssh()`), never baked into an image that
        # every VM and template shares.
        for key in (etc / "ssh").glob("ssh_host_*"):
            key.unlink()
        # Nothing in the guest should try to start services or fetch updates.
        for unwanted in ("usr/share/doc", "usr/share/man", "var/cache/apt/archives"):
            shutil.rmtree(root / unwanted, ignore_errors=True)
            (root / unwanted).mkdir(parents=True, exist_ok=True)

    def _initramfs(self, kdir: Path, kver: str, out: Path) -> None:
        self.progress("writing initramfs")
        order = module_load_order(kdir / "lib" / "modules" / kver / "modules.dep", BOOT_MODULES)
        entries: list[tuple[str, Path | bytes, int]] = []
        dirs = ["bin", "dev", "proc", "sys", "etc", "newroot", "lib", "lib/modules", "gondolin",
                "gondolin/gondolin", "gondolin/gondolin/protocol"]
        for d in dirs:
            entries.append((d, b"", 0o40755))
        entries.append(("bin/busybox", Path("/bin/busybox"), 0o100755))
        entries.append(("bin/sh", b"busybox", 0o120777))
        entries.append(("init", GUEST_DIR / "init", 0o100755))
        listed = []
        for rel in order:
            name = rel.replace("/", "_")  # flat: initramfs keeps only what boot needs
            module = strip_module_signature((kdir / "lib" / "modules" / kver / rel).read_bytes())
            entries.append((f"lib/modules/{name}", module, 0o100644))
            listed.append(name)
        entries.append(("etc/gondolin-modules", ("\n".join(listed) + "\n").encode(), 0o100644))
        entries.append(("gondolin/agent.py", GUEST_DIR / "agent.py", 0o100644))
        entries.append(("gondolin/gondolin/__init__.py", b"", 0o100644))
        entries.append(("gondolin/gondolin/protocol/__init__.py", PROTOCOL_DIR / "__init__.py", 0o100644))
        for sub in ("fuse.py",):  # optional guest helpers shipped when present
            if (GUEST_DIR / sub).is_file():
                entries.append((f"gondolin/{sub}", GUEST_DIR / sub, 0o100644))
        if VFS_WIRE.is_file():  # the FUSE daemon's wire format, shared with the host (stdlib only)
            entries.append(("gondolin/vfs_wire.py", VFS_WIRE, 0o100644))
        write_newc(out, entries)


def extract_vmlinux(bzimage: Path, out: Path) -> None:
    """Decompress the kernel ELF out of a bzImage so QEMU can boot it through its PVH entry point.

    Debian compresses the kernel with xz; under TCG the in-guest decompressor takes ~4.5 s of a
    ~10 s boot, while booting the uncompressed ELF directly skips that step entirely.
    """
    import gzip
    import lzma
    import zlib

    data = bzimage.read_bytes()
    candidates = ((b"\xfd7zXZ\x00", "xz"), (b"\x1f\x8b\x08", "gzip"))
    for magic, kind in candidates:
        start = data.find(magic)
        while start != -1:
            try:
                if kind == "xz":
                    elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data[start:])
                else:
                    elf = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data[start:])
            except (lzma.LZMAError, zlib.error, gzip.BadGzipFile, EOFError):
                elf = b""
            if elf[:4] == b"\x7fELF":
                out.write_bytes(elf)
                return
            start = data.find(magic, start + 1)
    raise ImageError(f"cannot find an xz- or gzip-compressed ELF kernel inside {bzimage}")


MODULE_SIG_MAGIC = b"~Module signature appended~\n"


def strip_module_signature(data: bytes) -> bytes:
    """Drop the appended signature of a kernel module.

    The guest kernel does not enforce signatures (CONFIG_MODULE_SIG_FORCE is off), but it still
    verifies any signature present: RSA + sha256 per module under TCG costs most of the time
    the initramfs spends loading modules. Layout (scripts/sign-file.c): module, signature,
    struct module_signature (12 bytes, big-endian sig_len in the last 4), then the magic.
    """
    if not data.endswith(MODULE_SIG_MAGIC):
        return data
    end = len(data) - len(MODULE_SIG_MAGIC)
    sig_len = int.from_bytes(data[end - 4 : end], "big")
    start = end - 12 - sig_len
    if start <= 0:
        return data
    return data[:start]


def module_load_order(modules_dep: Path, wanted: Iterable[str]) -> list[str]:
    """Module paths (relative to the modules dir) in an order where dependencies load first."""
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in modules_dep.read_text().splitlines():
        if ":" not in line:
            continue
        mod, _, rest = line.partition(":")
        mod = mod.strip()
        deps[mod] = rest.split()
        base = os.path.basename(mod)
        for suffix in (".ko", ".ko.xz", ".ko.zst", ".ko.gz"):
            if base.endswith(suffix):
                base = base[: -len(suffix)]
        by_name[base.replace("-", "_")] = mod
    order: list[str] = []
    seen: set[str] = set()

    def visit(mod: str, stack: tuple[str, ...]) -> None:
        if mod in seen:
            return
        if mod in stack:
            raise ImageError(f"module dependency cycle: {' -> '.join((*stack, mod))}")
        for dep in deps.get(mod, []):
            visit(dep, (*stack, mod))
        seen.add(mod)
        order.append(mod)

    for name in wanted:
        found = by_name.get(name.replace("-", "_"))
        if found is None:
            continue  # built into this kernel
        visit(found, ())
    return order


def ensure_image(ref: str = "default", store: ImageStore | None = None,
                 progress: Progress | None = _stderr_progress) -> Image:
    """Resolve an image; build the default one if it is missing (the first-use path of VM.create)."""
    store = store or ImageStore()
    if ref != "default":
        return store.resolve(ref)
    builder = ImageBuilder(store, progress=progress)
    if builder.is_current(ref):
        return store.resolve(ref)
    if progress:
        what = "is out of date (the guest agent changed)" if store.ref(ref) else "not found"
        progress(f"default guest image {what}: building it (cached afterwards)")
    return builder.build(ref)
