"""Image builds: the default image from scratch, and a custom image's rebuild after one file changed.

| ours                                                   | baseline, same run                                   |
|--------------------------------------------------------|------------------------------------------------------|
| `gondolin image build` with an empty build cache       | `mmdebstrap` of the same package list to a tarball   |
| (kernel package, mmdebstrap, customise, ext4, initrd)  | (the Debian tool alone, same mirror, same run)       |
| custom image rebuilt after one copied file changed     | the same image rebuilt with its Debian layer gone    |
| (Debian layer cached: unpack, copy, command, ext4)     | (mmdebstrap again, from the kept .deb files)         |

Everything runs in a scratch cache (``XDG_CACHE_HOME``, ``GONDOLIN_IMAGE_DIR``) so the real
store is untouched. What is cached where: the default build and its mmdebstrap baseline both
download every package from the Debian archive (neither keeps .debs; a proxy between this
machine and the archive may cache them: the sides alternate, baseline first, so neither always
finds it warm). The custom image's first build
downloads its packages into ``build/debs``; its baseline rebuild installs from those files
(no downloads), and the incremental rebuild does not run mmdebstrap at all.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio

from ._runner import Context
from ._table import Goal, Measure, Row, error_row

AREA = "images"
CUSTOM_TOML = """\
[debian]
packages = ["jq"]

[[files]]
src = "app.py"
dest = "/opt/app/app.py"

[build]
commands = ["python3 -c 'import compileall; compileall.compile_dir(\\"/opt/app\\", quiet=1)'"]
"""


@contextmanager
def scratch_cache() -> Iterator[Path]:
    saved = {k: os.environ.get(k) for k in ("XDG_CACHE_HOME", "GONDOLIN_IMAGE_DIR")}
    root = Path(tempfile.mkdtemp(prefix="gondolin-bench-images-", dir="/var/tmp"))
    os.environ["XDG_CACHE_HOME"] = str(root / "cache")
    os.environ["GONDOLIN_IMAGE_DIR"] = str(root / "store")
    try:
        yield root
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(root, ignore_errors=True)


def timed(fn: Callable[[], object]) -> float:
    t0 = time.monotonic()
    fn()
    return time.monotonic() - t0


def default_pair(root: Path, log: Callable[[str], None], reps: int) -> tuple[list[float], list[float]]:
    """Alternating sides (baseline, ours, ours, baseline, ...): a caching proxy between this
    machine and the Debian archive, warmed by whichever side runs first, favours neither."""
    from gondolin.images import ImageBuilder
    from gondolin.images.builder import PACKAGES, SUITE
    from gondolin.images.store import cache_root

    ours: list[float] = []
    base: list[float] = []
    out = root / "plain.tar"

    def plain() -> None:
        subprocess.run(["mmdebstrap", "--quiet", "--variant=essential", f"--include={','.join(PACKAGES)}",
                        SUITE, str(out)], check=True, capture_output=True)
        out.unlink()

    def gondolin_build() -> None:
        shutil.rmtree(cache_root() / "build", ignore_errors=True)  # empty build cache, kernel included
        shutil.rmtree(os.environ["GONDOLIN_IMAGE_DIR"], ignore_errors=True)
        ImageBuilder(progress=None).build("default")

    for i in range(reps):
        order = [("mmdebstrap alone", plain, base), ("default image build", gondolin_build, ours)]
        for name, fn, samples in order if i % 2 == 0 else order[::-1]:
            log(f"{name} ({i + 1}/{reps})")
            samples.append(timed(fn))
            log(f"  {samples[-1]:.1f}s")
    shutil.rmtree(cache_root() / "build", ignore_errors=True)  # the custom pair starts from an empty cache too
    return ours, base


def custom_pair(root: Path, log: Callable[[str], None]) -> tuple[float, float, float]:
    from gondolin.images.config import load_config
    from gondolin.images.custom import build_image
    from gondolin.images.store import cache_root

    src = root / "custom"
    src.mkdir()
    (src / "image.toml").write_text(CUSTOM_TOML)
    (src / "app.py").write_text("print('v1')\n")
    log("custom image, first build (downloads its packages into build/debs)")
    first = timed(lambda: build_image(load_config(src / "image.toml"), "bench", progress=None))
    layers = cache_root() / "build" / "layers"
    for f in layers.iterdir():
        f.unlink()
    (src / "app.py").write_text("print('v2')\n")
    log(f"  {first:.1f}s; rebuilt without its Debian layer (mmdebstrap from the kept .debs)")
    base = timed(lambda: build_image(load_config(src / "image.toml"), "bench", progress=None))
    (src / "app.py").write_text("print('v3')\n")
    log(f"  {base:.1f}s; after one file changed (Debian layer cached)")
    ours = timed(lambda: build_image(load_config(src / "image.toml"), "bench", progress=None))
    log(f"  {ours:.1f}s")
    return ours, base, first


async def collect(ctx: Context) -> list[Row]:
    rows: list[Row] = []
    what_default = "default image build, empty build cache"
    what_custom = "custom image rebuild after one copied file changed"
    if os.geteuid() != 0 or not shutil.which("mmdebstrap"):
        reason = RuntimeError("image builds need root and mmdebstrap")
        return [error_row(AREA, what_default, reason), error_row(AREA, what_custom, reason)]
    with scratch_cache() as root:
        try:
            reps = ctx.reps(2, 1)
            ours, base = await anyio.to_thread.run_sync(default_pair, root, ctx.log, reps)
            rows.append(Row(AREA, f"{what_default} (median of {reps})", Measure.median_of(ours, "s"),
                            Measure.median_of(base, "s"), "mmdebstrap of the same packages to a tarball, nothing else",
                            Goal(max_ratio=1.5),
                            note="both download every package from the Debian archive; ours adds the kernel "
                                 "package, customisation, ext4 and initramfs"))
        except Exception as exc:  # noqa: BLE001 - a failed pair becomes an error row, the run goes on
            traceback.print_exc()
            rows.append(error_row(AREA, what_default, exc, Goal(max_ratio=1.5)))
        try:
            inc, full, first = await anyio.to_thread.run_sync(custom_pair, root, ctx.log)
            rows.append(Row(AREA, what_custom, Measure(inc, "s"), Measure(full, "s"),
                            "the same build with its Debian layer removed (mmdebstrap from the kept .debs)",
                            Goal(max_ratio=0.5),
                            note=f"Debian layer cached, no mmdebstrap; first build {first:.0f}s with downloads"))
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            rows.append(error_row(AREA, what_custom, exc, Goal(max_ratio=0.5)))
    return rows
