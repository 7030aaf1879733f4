"""Choose the accelerator: KVM when a probe boot works, else TCG.

On some hosts ``/dev/kvm`` exists and opens, yet guests hang before the kernel prints anything
(NOTES-platform.md), so opening the device proves nothing: we boot the real guest under KVM
with a deadline and fall back to TCG when it does not answer. The verdict is cached per machine
(QEMU version, host kernel, image kernel), and ``GONDOLIN_ACCEL=kvm|tcg`` overrides it.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .._log import get_logger
from ..errors import GondolinError

if TYPE_CHECKING:
    from ..images import Image

log = get_logger("qemu")
PROBE_TIMEOUT = float(os.environ.get("GONDOLIN_KVM_PROBE_TIMEOUT", "10"))
ProbeBoot = Callable[["Image", str, float], Awaitable[None]]


@dataclass(frozen=True)
class AccelChoice:
    accel: str
    reason: str
    cached: bool = False


def cache_file() -> Path:
    from ..images.store import cache_root

    return cache_root() / "accel.json"


_VERSIONS: dict[tuple[str, int, int], str] = {}


def qemu_version(qemu: str) -> str:
    """First line of ``qemu --version``, cached per binary (path, inode, mtime): spawning QEMU
    costs ~20 ms, which a warm create cannot afford every time."""
    try:
        st = os.stat(qemu)
        key = (qemu, st.st_ino, st.st_mtime_ns)
    except OSError:
        key = (qemu, 0, 0)
    if key not in _VERSIONS:
        _VERSIONS[key] = _query_version(qemu)
    return _VERSIONS[key]


def _query_version(qemu: str) -> str:
    try:
        out = subprocess.run([qemu, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.splitlines()[0] if out else "unknown"


def cache_key(qemu: str, image: Image) -> str:
    return f"{qemu_version(qemu)}|{os.uname().release}|{image.kernel_version}"


def kvm_usable() -> tuple[bool, str]:
    if not os.path.exists("/dev/kvm"):
        return False, "/dev/kvm does not exist"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm is not readable and writable by this user (add yourself to group kvm)"
    return True, "/dev/kvm is present"


def read_cache(key: str) -> AccelChoice | None:
    try:
        data = json.loads(cache_file().read_text())
        entry = data[key]
        return AccelChoice(entry["accel"], entry["reason"], cached=True)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_cache(key: str, choice: AccelChoice) -> None:
    path = cache_file()
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            data = {}
    except (OSError, ValueError):
        data = {}
    data[key] = {"accel": choice.accel, "reason": choice.reason, "at": time.time()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


async def decide(image: Image, probe: ProbeBoot, qemu: str = "qemu-system-x86_64") -> AccelChoice:
    forced = os.environ.get("GONDOLIN_ACCEL", "").strip().lower()
    if forced:
        if forced not in ("kvm", "tcg"):
            raise GondolinError(f"GONDOLIN_ACCEL must be 'kvm' or 'tcg', not {forced!r}")
        return AccelChoice(forced, "set by GONDOLIN_ACCEL")
    ok, why = kvm_usable()
    if not ok:
        return AccelChoice("tcg", f"software emulation: {why}")
    from .process import find_qemu

    key = cache_key(find_qemu(), image)
    cached = read_cache(key)
    if cached is not None:
        return cached
    log.debug("probing KVM with a %.0fs boot", PROBE_TIMEOUT)
    t0 = time.monotonic()
    try:
        await probe(image, "kvm", PROBE_TIMEOUT)
        choice = AccelChoice("kvm", f"KVM probe boot answered in {time.monotonic() - t0:.1f}s")
    except GondolinError as exc:
        first = str(exc).splitlines()[0]
        choice = AccelChoice("tcg", f"software emulation: a KVM probe boot failed ({first[:160]})")
    write_cache(key, choice)
    return choice


async def choose(image: Image, probe: ProbeBoot) -> str:
    return (await decide(image, probe)).accel
