"""CLI commands for running VMs, checkpoints and warm templates (wired up in cli.py):
``list``, ``attach``, ``checkpoint save|list|rm``, ``image warm`` and the resume half of
``bash --resume``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import anyio

from .errors import GondolinError
from .options import VMOptions

COMMANDS = ("list", "attach", "checkpoint")


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("list", help="list running VMs (of every gondolin process of this user)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")

    p = sub.add_parser("attach", help="a shell (or a command) in a running VM owned by another process")
    p.add_argument("id", help="VM id, unique id prefix, or label (see gondolin list)")
    p.add_argument("--user", "-u", help="guest user name or uid")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS (default: a login shell)")

    p = sub.add_parser("checkpoint", help="save a checkpoint of a running VM, list or remove saved ones")
    csub = p.add_subparsers(dest="checkpoint_cmd", required=True)
    c = csub.add_parser("save", help="save a checkpoint of a running VM (of any process); it keeps running")
    c.add_argument("id", help="VM id, unique id prefix, or label (see gondolin list)")
    c.add_argument("--output", "-o", help="checkpoint file (default: in the checkpoint folder)")
    c.add_argument("--disk-only", action="store_true", help="save the disk only (boots on resume)")
    c = csub.add_parser("list", help="checkpoints in the checkpoint folder, newest first")
    c.add_argument("--dir", help="another folder to list")
    c = csub.add_parser("rm", help="remove checkpoints (name in the checkpoint folder, or a path)")
    c.add_argument("names", nargs="+")


def add_image_warm(isub: Any) -> None:
    w = isub.add_parser("warm", help="save (or check) the warm template for a machine shape")
    w.add_argument("--memory", default="512M")
    w.add_argument("--cpus", type=int, default=1)
    w.add_argument("--rootfs", choices=["cow", "memory", "readonly"], default="cow")
    w.add_argument("--image", default="default")
    w.add_argument("--no-network", action="store_true", help="the shape without a NIC")
    w.add_argument("--rebuild", action="store_true", help="discard the saved template first")
    w.add_argument("--list", action="store_true", help="list saved templates instead")


def run(args: argparse.Namespace) -> int:
    if args.cmd == "list":
        return _list(args)
    if args.cmd == "attach":
        return int(anyio.run(_attach, args))
    if args.cmd == "checkpoint" and args.checkpoint_cmd == "save":
        return int(anyio.run(_checkpoint_save, args))
    if args.cmd == "checkpoint":
        return _checkpoint(args)
    raise AssertionError(args.cmd)


def _age(t: float) -> str:
    s = max(0, int(time.time() - t))
    return f"{s}s" if s < 120 else f"{s // 60}m" if s < 7200 else f"{s // 3600}h"


def _size(n: int) -> str:
    return f"{n / 1e6:.0f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


def _list(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from .registry import list_vms

    sessions = list_vms()
    if args.json:
        for s in sessions:
            print(json.dumps(asdict(s)))
        return 0
    if not sessions:
        print("no running VMs")
        return 0
    print(f"{'ID':<13} {'PID':>7} {'AGE':>5} {'MEMORY':>7} {'STARTED':<10} {'IMAGE':<13} LABEL")
    for s in sessions:
        print(f"{s.id:<13} {s.pid:>7} {_age(s.created):>5} {s.memory_mb:>5}M  {s.restored_from or 'boot':<10} "
              f"{s.image[:12]:<13} {s.label or '-'}")
    return 0


async def _attach(args: argparse.Namespace) -> int:
    from ._terminal import interactive_shell, piped_command
    from .registry import RemoteVM

    remote = RemoteVM.find(args.id)
    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command or sys.stdin.isatty():
        return await interactive_shell(remote, command or ["/bin/bash", "-l"], user=args.user)
    # Not a terminal: plain pipes, so output and exit status can be scripted.
    result = await piped_command(remote, command if len(command) > 1 else command[0], user=args.user)
    return int(result.exit_code)


def default_checkpoint_path(ident: str) -> Path:
    from .machine.checkpoint import SUFFIX, default_dir

    d = default_dir()
    d.mkdir(parents=True, exist_ok=True)
    return d / f"{ident}-{time.strftime('%Y%m%d-%H%M%S')}{SUFFIX}"


async def _checkpoint_save(args: argparse.Namespace) -> int:
    from .registry import RemoteVM

    remote = RemoteVM.find(args.id)
    path = Path(args.output) if args.output else default_checkpoint_path(remote.info.label or remote.id)
    done = await remote.checkpoint(path, disk_only=args.disk_only)
    print(f"{done['path']}  ({done['kind']}, {_size(int(done['size']))}, saved in {float(done['seconds']):.2f}s)")
    return 0


def resolve_checkpoint(name: str) -> Path:
    """A path, or a name in the checkpoint folder (with or without its suffix)."""
    from .machine.checkpoint import SUFFIX, default_dir

    p = Path(name)
    if p.exists() or os.sep in name:
        return p
    for candidate in (default_dir() / name, default_dir() / f"{name}{SUFFIX}"):
        if candidate.exists():
            return candidate
    return p


def _checkpoint(args: argparse.Namespace) -> int:
    from .machine.checkpoint import default_dir, list_checkpoints
    from .vm import Checkpoint

    if args.checkpoint_cmd == "list":
        folder = Path(args.dir) if args.dir else default_dir()
        cps = list_checkpoints(folder)
        if not cps:
            print(f"no checkpoints in {folder}")
            return 0
        print(f"{'NAME':<40} {'KIND':<5} {'CREATED':<20} {'MEMORY':>7} {'SIZE':>8} {'IMAGE':<13} LABEL")
        for cp in cps:
            created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(cp.created))
            print(f"{cp.path.name:<40} {cp.kind:<5} {created:<20} {cp.shape.memory_mb:>5}M  {_size(cp.size):>8} "
                  f"{cp.image_id[:12]:<13} {cp.label or '-'}")
        return 0
    status = 0
    for name in args.names:
        path = resolve_checkpoint(name)
        try:
            Checkpoint.load(path)  # refuse to delete what is not a checkpoint
        except GondolinError as exc:
            print(f"gondolin: not removing {path}: {exc}", file=sys.stderr)
            status = 1
            continue
        path.unlink()
        print(f"removed {path}")
    return status


async def resume_for_shell(name: str, options: VMOptions) -> Any:
    """``gondolin bash --resume``: the VM from a checkpoint, with the shell's network options and
    environment (the checkpoint fixes the machine shape)."""
    from .vm import Checkpoint

    cp = Checkpoint.load(resolve_checkpoint(name))
    kwargs: dict[str, Any] = {}
    if options.env:
        kwargs["env"] = {**cp.header.options.env, **options.env}
    if cp.header.options.network:
        kwargs["http_hooks"] = options.http_hooks
    return await cp.resume(**kwargs)


async def image_warm(args: argparse.Namespace) -> int:
    from .machine.launch import resolve
    from .machine.shape import machine_shape
    from .machine.templates import TemplateStore
    from .vm import VM

    store = TemplateStore()
    if args.list:
        templates = store.templates()
        if not templates:
            print(f"no templates in {store.root}")
        for t in templates:
            print(f"{t.key}  {_size(t.size):>7}  saved {_age(t.created)} ago  {t.shape.describe()}")
        return 0
    options = VMOptions(memory=args.memory, cpus=args.cpus, rootfs=args.rootfs, image=args.image,
                        network=not args.no_network)
    if args.rebuild:
        checked, image, accel = await resolve(options)
        if store.remove(machine_shape(checked, image, accel).key()):
            print("discarded the saved template")
    t0 = time.monotonic()
    async with await VM.create(options) as vm:
        shape = vm.shape()
        how = "restored it" if vm.restored_from else "booted and saved it"
    tpl = store.lookup(shape)
    if tpl is None:
        print("gondolin: the template could not be saved (see the warnings above)", file=sys.stderr)
        return 1
    print(f"template {tpl.key} ready ({how} in {time.monotonic() - t0:.2f}s): {shape.describe()}, {_size(tpl.size)}")
    return 0
