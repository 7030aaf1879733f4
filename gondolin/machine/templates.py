"""Warm templates: a booted, idle guest saved once per image and machine shape, restored
instead of booted by every later :meth:`VM.create` of the same shape.

Layout under ``$XDG_CACHE_HOME/gondolin/templates``::

    <key>/template.json   the shape it was saved for, sizes, when
          memory.bin      RAM and device state (a QEMU migration stream)
          root.qcow2      the disk overlay at that moment (rootfs="cow" only)
    .lock-<key>           held while one process boots and saves that template

The key is a hash of the :class:`MachineShape`: image build id, memory, vCPUs, root disk mode,
accelerator, QEMU version and a fingerprint of the QEMU command line with per-VM paths taken
out (so any change to the device set, the kernel command line or the machine type is a new key).
A template whose recorded shape, format or files do not match is deleted, never used; one that
QEMU refuses to load is deleted too and the VM boots cold, which saves a fresh one.

Templates are never written after they are saved: each restored VM copies the small overlay to
its own run directory (see docs/snapshots.md for why a copy rather than a backing chain).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import shutil
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import anyio

from .._log import get_logger
from ..errors import GondolinError, VMStartError
from ..exec import ExecProcess
from ..images import ImageStore
from ..images.store import cache_root
from ..protocol import DEFAULT_WINDOW
from .boot import BootSource, ColdBoot, TemplateRestore
from .machine import Machine
from .shape import TEMPLATE_FORMAT, MachineShape, uses_virtiofs
from .state import Section, StateError, save_running_vm
from .zeropages import StreamFormatError, drop_untouched_zero_pages

log = get_logger("vm")
MAX_TEMPLATES = 8  # kept on disk; the least recently used go first
LOCK_POLL = 0.05  # seconds between attempts to take another builder's lock
META = "template.json"
MEMORY = "memory.bin"
DISK = "root.qcow2"
# A shell command, then a program run directly: the second also runs what an exec does after
# an earlier one (removing the earlier one's cgroup), and the binaries and libraries of both forms.
WARM_UP_COMMANDS = (("/bin/sh", "-c", "true"), ("/bin/true",))


@dataclass(frozen=True)
class Template:
    path: Path
    shape: MachineShape
    created: float
    memory_size: int
    has_disk: bool

    @property
    def key(self) -> str:
        return self.path.name

    def boot_source(self) -> TemplateRestore:
        disk = Section(self.path / DISK) if self.has_disk else None
        return TemplateRestore(Section(self.path / MEMORY), disk, self.key)

    @property
    def size(self) -> int:
        disk = (self.path / DISK).stat().st_size if self.has_disk else 0
        return self.memory_size + disk


class TemplateStore:
    def __init__(self, root: Path | None = None) -> None:
        env = os.environ.get("GONDOLIN_TEMPLATE_DIR")
        self.root = Path(root or env or cache_root() / "templates")

    def path(self, shape: MachineShape) -> Path:
        return self.root / shape.key()

    # -- reading -----------------------------------------------------------------------
    def _load(self, path: Path) -> Template:
        """Read and check one template directory; raises ValueError/OSError when unusable."""
        meta = json.loads((path / META).read_text())
        if not isinstance(meta, dict) or meta.get("format") != TEMPLATE_FORMAT:
            raise ValueError(f"template format {meta.get('format') if isinstance(meta, dict) else '?'}")
        shape = MachineShape.from_dict(meta.get("shape"))
        if shape.key() != path.name:
            raise ValueError("template directory name does not match its shape")
        size = (path / MEMORY).stat().st_size
        if size != meta.get("memory_size") or size == 0:
            raise ValueError(f"memory image is {size} bytes, expected {meta.get('memory_size')}")
        has_disk = bool(meta.get("disk"))
        if has_disk and not (path / DISK).is_file():
            raise ValueError("disk overlay missing")
        return Template(path, shape, float(meta.get("created") or 0), size, has_disk)

    def lookup(self, shape: MachineShape) -> Template | None:
        """The usable template for ``shape``; a broken or mismatched one is deleted."""
        path = self.path(shape)
        if not path.is_dir():
            return None
        try:
            tpl = self._load(path)
            if tpl.shape != shape:
                raise ValueError("; ".join(tpl.shape.differences(shape)))
        except (OSError, ValueError) as exc:
            log.warning("discarding template %s: %s", path.name, exc)
            self.remove(path.name)
            return None
        with contextlib.suppress(OSError):
            os.utime(path / META)  # least recently used goes first in prune()
        return tpl

    def templates(self) -> list[Template]:
        out = []
        if self.root.is_dir():
            for p in sorted(self.root.iterdir()):
                if p.is_dir() and not p.name.startswith("."):
                    try:
                        out.append(self._load(p))
                    except (OSError, ValueError):
                        continue
        return out

    # -- writing -----------------------------------------------------------------------
    def staging(self, shape: MachineShape) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        staging = self.root / f".staging-{shape.key()}-{os.getpid()}-{os.urandom(3).hex()}"
        staging.mkdir(mode=0o700)
        return staging

    def commit(self, staging: Path, shape: MachineShape, memory_size: int, has_disk: bool) -> Template:
        meta = {"format": TEMPLATE_FORMAT, "shape": shape.to_dict(), "created": time.time(),
                "memory_size": memory_size, "disk": has_disk}
        (staging / META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        dest = self.path(shape)
        if dest.exists():  # a stale one (the lock holder decided to rebuild it)
            self.remove(dest.name)
        try:
            os.rename(staging, dest)
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return self._load(dest)

    def remove(self, key: str) -> bool:
        path = self.root / key
        if not path.exists():
            return False
        # Rename first so a concurrent reader never sees a half-deleted template.
        doomed = self.root / f".removing-{key}-{os.urandom(3).hex()}"
        try:
            os.rename(path, doomed)
        except OSError:
            return False
        shutil.rmtree(doomed, ignore_errors=True)
        return True

    def prune(self, keep: int = MAX_TEMPLATES, known_images: set[str] | None = None) -> list[str]:
        """Delete templates of images no longer in the store, then the least recently used
        beyond ``keep``, and staging leftovers of dead processes. Returns the removed keys."""
        removed = []
        templates = self.templates()
        if known_images is not None:
            for t in templates:
                if t.shape.image not in known_images and self.remove(t.key):
                    removed.append(t.key)
            templates = [t for t in templates if t.key not in removed]

        def last_used(t: Template) -> float:
            try:
                return (t.path / META).stat().st_mtime
            except OSError:
                return 0.0

        for t in sorted(templates, key=last_used, reverse=True)[keep:]:
            if self.remove(t.key):
                removed.append(t.key)
        if self.root.is_dir():
            for p in self.root.iterdir():
                if p.name.startswith((".staging-", ".removing-")) and time.time() - p.stat().st_mtime > 600:
                    shutil.rmtree(p, ignore_errors=True)
        return removed

    # -- one builder per shape ---------------------------------------------------------
    @contextlib.asynccontextmanager
    async def build_lock(self, shape: MachineShape) -> AsyncIterator[None]:
        """Hold the lock for building ``shape``'s template; waits while another task or process
        holds it (flock: released by the kernel if the holder dies)."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / f".lock-{shape.key()}", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    await anyio.sleep(LOCK_POLL)
            yield
        finally:
            os.close(fd)  # releases the lock


def memory_command(path: Path) -> str:
    """The shell command QEMU pipes the migration stream into."""
    return f"cat > {shlex.quote(str(path))}"


async def save_template(store: TemplateStore, machine: Machine) -> Template:
    """Save ``machine`` (booted, configured with the per-VM parts left out, idle) as the
    template of its shape."""
    shape = machine.shape()
    staging = store.staging(shape)
    overlay = machine.disk_overlay
    try:
        memory = staging / MEMORY

        async def copy_disk() -> None:
            if overlay is not None:
                await anyio.to_thread.run_sync(shutil.copyfile, overlay, staging / DISK)

        async with machine.state_lock, machine.health_paused():
            stats = await save_running_vm(await machine.qmp(), machine.quiesced, memory_command(memory), memory,
                                          copy_disk)
        memory_bytes = stats.memory_bytes
        if uses_virtiofs(machine.options):  # guest RAM in a shared memfd: see gondolin/machine/zeropages.py
            memory_bytes = await anyio.to_thread.run_sync(_drop_zero_pages, memory)
        template = store.commit(staging, shape, memory_bytes, overlay is not None)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.debug("saved template %s (%s) in %.2fs, %d MB", template.key, shape.describe(), stats.seconds,
              stats.memory_bytes >> 20)
    with contextlib.suppress(OSError):
        store.prune(known_images={i.build_id for i in ImageStore().images()})
    return template


def _drop_zero_pages(memory: Path) -> int:
    """Rewrite a memfd machine's memory image without the zero-page records nothing needs (its
    restores then neither allocate nor check all of guest RAM); the image's size after."""
    rewritten = memory.with_name(memory.name + ".dropped")
    try:
        stats = drop_untouched_zero_pages(memory, rewritten)
        os.replace(rewritten, memory)
        log.debug("template memory image: %d of %d page records dropped", stats.dropped, stats.records)
    except (StreamFormatError, OSError) as exc:
        log.warning("template memory image kept as QEMU wrote it (%s); its restores allocate all guest RAM", exc)
        with contextlib.suppress(OSError):
            rewritten.unlink()
    return memory.stat().st_size


async def warm_up(machine: Machine) -> None:
    """Run a few commands through the guest's exec path. Before a template is saved: what the
    first exec loads (the name-service modules of the user lookup, the cgroup set-up, the
    shell's pages) is then in every restored guest's memory. In a pool's spare: under TCG the
    guest code of an exec is then translated before a caller's first command needs it."""
    for argv in WARM_UP_COMMANDS:
        proc = ExecProcess(machine, {"argv": list(argv)}, stdin=None, stdout="ignore", stderr="ignore",
                           window=DEFAULT_WINDOW, timeout=None)
        try:
            with anyio.fail_after(machine.timeouts.call):
                await proc.start()
                await proc.wait()
        except (GondolinError, TimeoutError) as exc:  # it only costs a first exec some time
            log.debug("warm-up command failed: %s", exc)
            return


async def _boot_and_save(machine: Machine, store: TemplateStore | None) -> None:
    """Cold boot ``machine``; with a ``store``, save it as its shape's template first (a failure
    to save only costs speed)."""
    await machine.start(ColdBoot())
    if store is not None:
        await machine.configure(base=True)
        try:
            await warm_up(machine)
            await save_template(store, machine)
        except (StateError, OSError) as exc:
            log.warning("could not save a warm template (%s); later VMs boot cold", exc)


def _from_restore(exc: BaseException) -> bool:
    """Whether a failed start came from loading the saved state (QEMU refused it, the restored
    guest never answered), not from this VM's own options (those fail a cold boot alike)."""
    cause = exc.__cause__
    return not isinstance(cause, (ValueError, TypeError))


async def start_warm(make: Callable[[], Machine]) -> Machine:
    """Start a machine from its shape's template; boot cold and save the template when there is
    none (one builder per shape: concurrent callers wait for it, then restore). The machine is
    started, not yet configured."""
    store = TemplateStore()
    machine = make()
    shape = machine.shape()
    template = store.lookup(shape)
    if template is None:
        async with store.build_lock(shape):
            template = store.lookup(shape)
            if template is None:
                await _boot_and_save(machine, store)
                return machine
    try:
        await machine.start(template.boot_source())
        return machine
    except (VMStartError, StateError) as exc:
        if exc.code == "vm_start_timeout" or not _from_restore(exc):
            raise  # a slow host or a bad option, not a bad template
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        log.warning("template %s could not be restored (%s); booting cold and saving a new one", template.key,
                    first)
        store.remove(template.key)
    machine = make()
    async with store.build_lock(shape):
        again = store.lookup(shape)
        await _boot_and_save(machine, None if again is not None else store)
    return machine


__all__ = ["BootSource", "Template", "TemplateStore", "save_template", "start_warm"]
