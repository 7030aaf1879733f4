"""``gondolin image ...``: build, import, list and manage guest images."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import anyio


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("image", help="build, import, list and manage guest images")
    isub = p.add_subparsers(dest="image_cmd", required=True)
    b = isub.add_parser("build", help="build the default image, or a custom one from a build file")
    b.add_argument("--config", metavar="FILE", help="image build file (see: gondolin image init-config)")
    b.add_argument("--tag", "--ref", dest="tag", metavar="NAME[:TAG]",
                   help="name for the image (default: 'default', or the build file's name)")
    b.add_argument("--force", action="store_true", help="rebuild even when cached")
    isub.add_parser("init-config", help="print an annotated example build file")
    o = isub.add_parser("import-oci", help="import an OCI image layout (directory or tarball) or a docker save archive")
    o.add_argument("path")
    o.add_argument("--tag", metavar="NAME[:TAG]", help="name for the image (default: the file or directory name)")
    o.add_argument("--force", action="store_true", help="import again even when cached")
    isub.add_parser("list", help="list images in the store")
    i = isub.add_parser("inspect", help="print an image's manifest")
    i.add_argument("ref")
    t = isub.add_parser("tag", help="give an image another name")
    t.add_argument("source")
    t.add_argument("name")
    v = isub.add_parser("verify", help="check every asset against its manifest hash")
    v.add_argument("ref", nargs="?", default="default")
    r = isub.add_parser("rm", help="remove an image ref (and its files when unreferenced)")
    r.add_argument("ref")
    e = isub.add_parser("export", help="write an image to a tar file (.tar.gz compresses)")
    e.add_argument("ref")
    e.add_argument("file")
    m = isub.add_parser("import", help="add an image written by `gondolin image export`")
    m.add_argument("file")
    m.add_argument("--tag", metavar="NAME[:TAG]")
    isub.add_parser("gc", help="remove unnamed images and build-cache files no image uses")
    from ._cli_vms import add_image_warm

    add_image_warm(isub)


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit in ("B", "KB") else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def run(args: argparse.Namespace) -> int:
    from .images import ImageBuilder, ImageStore
    from .images.store import cache_root

    store = ImageStore()
    cmd = args.image_cmd
    if cmd == "build":
        if args.config:
            from .images.config import load_config
            from .images.custom import build_image

            config = load_config(args.config)
            tag = args.tag or Path(args.config).resolve().parent.name or "custom"
            image = build_image(config, tag, store=store, force=args.force)
        else:
            tag = args.tag or "default"
            image = ImageBuilder(store).build(tag, force=args.force)
        print(f"{tag} -> {image.build_id} ({image.path})")
    elif cmd == "init-config":
        from .images.config import EXAMPLE

        sys.stdout.write(EXAMPLE)
    elif cmd == "import-oci":
        from .images.oci import import_oci

        path = Path(args.path)
        tag = args.tag or path.name.split(".")[0] or "oci"
        image = import_oci(path, tag, store=store, force=args.force)
        print(f"{tag} -> {image.build_id} ({image.path})")
    elif cmd == "list":
        refs: dict[str, list[str]] = {}
        for name, bid in store.list_refs().items():
            refs.setdefault(bid, []).append(name)
        images = store.images()
        if not images:
            print("no images; build one with: gondolin image build")
        for img in images:
            size = sum(int(a.get("size", 0)) for a in img.manifest.get("assets", {}).values())
            print(f"{img.build_id}  {','.join(refs.get(img.build_id, [])) or '-':<14} "
                  f"{img.manifest.get('kind', 'default'):<8} kernel {img.kernel_version}  "
                  f"{img.manifest.get('created', '?')}  {_size(size)}")
    elif cmd == "inspect":
        image = store.resolve(args.ref)
        names = [n for n, b in store.list_refs().items() if b == image.build_id]
        print(json.dumps({**image.manifest, "refs": names, "path": str(image.path)}, indent=2, sort_keys=True))
    elif cmd == "tag":
        image = store.tag(args.source, args.name)
        print(f"{args.name} -> {image.build_id}")
    elif cmd == "verify":
        image = store.resolve(args.ref)
        problems = store.verify(image)
        for p in problems:
            print(f"{image.build_id}: {p}")
        print("ok" if not problems else f"{len(problems)} problem(s)")
        return 1 if problems else 0
    elif cmd == "rm":
        for what in store.remove(args.ref):
            print(f"removed {what}")
    elif cmd == "export":
        image = store.export(args.ref, Path(args.file))
        print(f"{image.build_id} -> {args.file} ({_size(Path(args.file).stat().st_size)})")
    elif cmd == "import":
        image = store.import_archive(Path(args.file), args.tag)
        print(f"{args.tag or '(no name)'} -> {image.build_id} ({image.path})")
    elif cmd == "gc":
        removed, freed = store.gc(cache_root() / "build")
        for what in removed:
            print(f"removed {what}")
        print(f"freed {_size(freed)}")
    elif cmd == "warm":
        from ._cli_vms import image_warm

        return int(anyio.run(image_warm, args))
    return 0


__all__ = ["add_parsers", "run"]
