"""The ``gondolin`` command line."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from typing import Any

import anyio

from ._terminal import interactive_shell
from .errors import GondolinError


def _env_pairs(items: list[str]) -> dict[str, str]:
    env = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"gondolin: --env expects KEY=VALUE, got {item!r}")
        env[key] = value
    return env


def _vm_options(args: argparse.Namespace) -> dict[str, Any]:
    opts: dict[str, Any] = {"memory": args.memory, "cpus": args.cpus, "rootfs": args.rootfs, "image": args.image}
    if getattr(args, "vm_env", None):
        opts["env"] = _env_pairs(args.vm_env)
    if getattr(args, "mount", None):
        from .vfs.mountspec import mounts_from_specs

        try:
            opts["mounts"] = mounts_from_specs(args.mount)
        except ValueError as exc:
            raise SystemExit(f"gondolin: {exc}") from None
    return opts


def _add_mount_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mount", action="append", default=[], metavar="HOST:GUEST[:ro|:cow]",
                   help="show host directory HOST at GUEST: read-write, read-only (:ro), or copy-on-write "
                        "(:cow: the guest's changes stay in memory, are listed at exit and discarded); "
                        "repeatable")


async def _report_cow(vm: Any) -> None:
    """List what the guest changed in copy-on-write mounts (those changes are discarded)."""
    from .vfs import CopyOnWriteProvider

    for point, provider in sorted(vm.mounts.items()):
        if isinstance(provider, CopyOnWriteProvider):
            changes = await provider.changes()
            if changes:
                print(f"gondolin: {point} (copy-on-write, discarded): {len(changes.added)} added, "
                      f"{len(changes.modified)} modified, {len(changes.deleted)} deleted", file=sys.stderr)


# -- network policy for exec and bash ---------------------------------------------
MAX_REPORTED_REQUESTS = 100  # refused requests kept for the report after the command


def _parse_secret(item: str) -> tuple[str, str, list[str]]:
    """``NAME=ENVVAR@host[,host...]`` -> (NAME, ENVVAR, hosts)."""
    name, sep, rest = item.partition("=")
    envvar, at, hosts_text = rest.rpartition("@")
    hosts = [h.strip() for h in hosts_text.split(",") if h.strip()]
    if not sep or not name or not at or not envvar or not hosts:
        raise SystemExit(f"gondolin: --secret expects NAME=ENVVAR@host[,host], got {item!r}")
    return name, envvar, hosts


class RefusedRequests:
    """Audit-event observer that keeps refused requests to print when the command is done."""

    def __init__(self, limit: int = MAX_REPORTED_REQUESTS) -> None:
        self.events: list[Any] = []
        self.more = 0
        self._limit = limit

    def __call__(self, event: Any) -> None:
        if event.decision.value in ("allowed", "answered"):
            return
        if len(self.events) < self._limit:
            self.events.append(event)
        else:
            self.more += 1

    def report(self, out: Any) -> None:
        for e in self.events:
            default = {"http": 80, "https": 443}.get(e.scheme)
            where = e.host if e.port in (0, default) else f"{e.host}:{e.port}"
            print(f"gondolin: {e.decision.value} {e.method or '?'} {e.scheme}://{where}{e.path}: {e.reason}", file=out)
        if self.more:
            print(f"gondolin: ... and {self.more} more refused requests", file=out)


def _egress_options(args: argparse.Namespace, refused: RefusedRequests) -> dict[str, Any]:
    """``http_hooks`` and the secrets' placeholders in ``env`` from --allow-host / --secret."""
    from .http import Secret, create_http_hooks

    secrets: dict[str, Secret] = {}
    for item in args.secret:
        name, envvar, hosts = _parse_secret(item)
        value = os.environ.get(envvar)
        if not value:
            raise SystemExit(f"gondolin: --secret {name}: the host environment variable {envvar} is not set")
        try:
            secrets[name] = Secret(value, hosts=hosts)
        except ValueError as exc:
            raise SystemExit(f"gondolin: --secret {name}: {exc}") from None
    try:
        hooks, placeholders = create_http_hooks(allowed_hosts=args.allow_host, secrets=secrets, on_event=refused)
    except ValueError as exc:
        raise SystemExit(f"gondolin: {exc}") from None
    for name, secret in secrets.items():
        for host in secret.hosts:
            if "*" not in host and not hooks.policy.host_allowed(host):
                print(f"gondolin: note: secret {name} may go to {host}, but no --allow-host lets requests "
                      f"reach it", file=sys.stderr)
    env = _env_pairs(getattr(args, "vm_env", None) or [])
    clash = sorted(set(env) & set(placeholders))
    if clash:
        raise SystemExit(f"gondolin: {', '.join(clash)} given both as --secret and --vm-env")
    return {"http_hooks": hooks, "env": {**env, **placeholders}}


def _add_net_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-host", action="append", default=[], metavar="HOST",
                   help="let HTTP(S) requests reach HOST (pattern such as *.github.com; repeatable; "
                        "default: no egress at all)")
    p.add_argument("--secret", action="append", default=[], metavar="NAME=ENVVAR@HOST[,HOST]",
                   help="the guest sees a placeholder in $NAME; requests to HOST carry the value of the "
                        "host environment variable ENVVAR instead (repeatable)")


def _add_vm_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--memory", default="512M", help="guest memory, e.g. 512M or 2G (default 512M)")
    p.add_argument("--cpus", type=int, default=1, help="virtual CPUs (default 1)")
    p.add_argument("--rootfs", choices=["cow", "memory", "readonly"], default="cow",
                   help="root filesystem mode (default cow: writes are discarded with the VM)")
    p.add_argument("--image", default="default", help="image ref, build id or directory")


# -- exec ---------------------------------------------------------------------
async def _exec(args: argparse.Namespace) -> int:
    from .vm import VM

    command: str | list[str]
    argv = list(args.command)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise SystemExit("gondolin exec: give a command: gondolin exec -- CMD ARGS, or gondolin exec 'shell string'")
    command = argv[0] if (len(argv) == 1 and not args.argv_form) else argv
    refused = RefusedRequests()
    async with await VM.create(**{**_vm_options(args), **_egress_options(args, refused)}) as vm:
        try:
            stdin: Any = None
            if not sys.stdin.isatty() and not args.no_stdin:
                stdin = _stdin_chunks()
            proc = await vm.start(command, env=_env_pairs(args.env), cwd=args.cwd, user=args.user,
                                  timeout=args.timeout, stdin=stdin, stdout="pipe", stderr="pipe")
            async for chunk in proc:
                out = sys.stdout.buffer if chunk.stream == "stdout" else sys.stderr.buffer
                out.write(chunk.data)
                out.flush()
            result = await proc.wait()
            if result.timed_out:
                print(f"gondolin: command killed after its {args.timeout}s timeout", file=sys.stderr)
            await _report_cow(vm)
            return result.exit_code
        finally:
            refused.report(sys.stderr)


async def _stdin_chunks() -> Any:
    fd = sys.stdin.fileno()
    while True:
        data = await anyio.to_thread.run_sync(os.read, fd, 65536)
        if not data:
            return
        yield data


# -- bash ---------------------------------------------------------------------
async def _bash(args: argparse.Namespace) -> int:
    from .vm import VM

    refused = RefusedRequests()
    if args.resume:
        from ._cli_snapshots import resume_for_shell

        starting = resume_for_shell(args.resume, _egress_options(args, refused))
    else:
        starting = VM.create(**{**_vm_options(args), **_egress_options(args, refused)})
    async with await starting as vm:
        try:
            code = await interactive_shell(vm, args.command or ["/bin/bash", "-l"], user=args.user)
            await _report_cow(vm)
            return code
        finally:
            refused.report(sys.stderr)  # after the terminal left raw mode



# -- image --------------------------------------------------------------------
def _image(args: argparse.Namespace) -> int:
    from .images import ImageBuilder, ImageStore

    store = ImageStore()
    if args.image_cmd == "build":
        image = ImageBuilder(store).build(args.ref, force=args.force)
        print(f"{args.ref} -> {image.build_id} ({image.path})")
    elif args.image_cmd == "list":
        refs: dict[str, list[str]] = {}
        for name, bid in store.list_refs().items():
            refs.setdefault(bid, []).append(name)
        images = store.images()
        if not images:
            print("no images; build one with: gondolin image build")
        for img in images:
            size = sum(int(a.get("size", 0)) for a in img.manifest.get("assets", {}).values())
            print(f"{img.build_id}  {','.join(refs.get(img.build_id, [])) or '-':<10} "
                  f"kernel {img.kernel_version}  {img.manifest.get('created', '?')}  {size / 1e6:.0f} MB")
    elif args.image_cmd == "verify":
        image = store.resolve(args.ref)
        problems = store.verify(image)
        for p in problems:
            print(f"{image.build_id}: {p}")
        print("ok" if not problems else f"{len(problems)} problem(s)")
        return 1 if problems else 0
    elif args.image_cmd == "rm":
        for what in store.remove(args.ref):
            print(f"removed {what}")
    elif args.image_cmd == "warm":
        from ._cli_snapshots import image_warm

        return int(anyio.run(image_warm, args))
    return 0


# -- doctor -------------------------------------------------------------------
async def _doctor(args: argparse.Namespace) -> int:
    from .images import ImageStore
    from .machine.launch import probe_boot
    from .qemu import accel
    from .qemu.process import find_qemu
    from .vm import VM

    ok = True

    def line(status: str, what: str, detail: str) -> None:
        print(f"[{status:^4}] {what:<14} {detail}")

    try:
        qemu = find_qemu()
        line("ok", "qemu", f"{qemu} ({accel.qemu_version(qemu)})")
    except GondolinError as exc:
        line("FAIL", "qemu", str(exc))
        return 1
    for tool, pkg in (("qemu-img", "qemu-utils"), ("mmdebstrap", "mmdebstrap"), ("mke2fs", "e2fsprogs")):
        found = shutil.which(tool) or (os.path.exists(f"/usr/sbin/{tool}") and f"/usr/sbin/{tool}")
        line("ok" if found else "warn", tool, str(found) if found else f"missing (apt-get install {pkg})")
        ok = ok and bool(found or tool == "mmdebstrap")
    store = ImageStore()
    try:
        image = store.resolve(args.image)
        line("ok", "image", f"{args.image} -> {image.build_id} (kernel {image.kernel_version})")
    except GondolinError as exc:
        line("FAIL", "image", str(exc))
        return 1
    kvm_ok, why = accel.kvm_usable()
    line("ok" if kvm_ok else "info", "/dev/kvm", why)
    choice = await accel.decide(image, probe_boot)
    line("ok", "accelerator", f"{choice.accel}: {choice.reason}{' (cached)' if choice.cached else ''}")
    if args.boot:
        t0 = time.monotonic()
        async with await VM.create(image=args.image) as vm:
            r = await vm.exec(["uname", "-sr"])
            line("ok", "boot", f"{time.monotonic() - t0:.2f}s to first exec: {r.stdout.strip()}")
    return 0 if ok else 1


# -- demo ---------------------------------------------------------------------
async def _demo(args: argparse.Namespace) -> int:
    from .vm import VM

    t0 = time.monotonic()
    print("booting a micro-VM (the first run builds the guest image, ~1 min) ...", flush=True)
    async with await VM.create(**_vm_options(args)) as vm:
        print(f"  booted in {time.monotonic() - t0:.2f}s (accelerator {vm.accel})")
        r = await vm.exec("echo \"hello from $(hostname), kernel $(uname -r), $(nproc) cpu\"; python3 --version")
        print("  exec:", r.stdout.strip().replace("\n", " | "), f"[exit {r.exit_code}, {r.duration * 1000:.0f} ms]")
        payload = "written by the host at " + time.strftime("%H:%M:%S") + "\n"
        await vm.fs.write("/workspace/note.txt", payload)
        r = await vm.exec("wc -c /workspace/note.txt && sha256sum /workspace/note.txt", cwd="/workspace")
        print("  guest sees:", r.stdout.strip().replace("\n", " | "))
        back = await vm.fs.read_text("/workspace/note.txt")
        print("  read back:", back.strip(), "(matches)" if back == payload else "(MISMATCH)")
        r = await vm.exec(["id"], user="agent")
        print("  as agent:", r.stdout.strip())
    print(f"done in {time.monotonic() - t0:.2f}s; the VM and its files are gone")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gondolin", description="Run untrusted code in local QEMU micro-VMs.")
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("exec", help="run one command in a fresh VM; its exit code becomes ours")
    _add_vm_args(p)
    _add_net_args(p)
    _add_mount_args(p)
    p.add_argument("--env", "-e", action="append", default=[], help="KEY=VALUE for the command (repeatable)")
    p.add_argument("--vm-env", action="append", default=[], help="KEY=VALUE for every command in the VM")
    p.add_argument("--cwd", help="working directory in the guest")
    p.add_argument("--user", "-u", help="guest user name or uid (default root)")
    p.add_argument("--timeout", type=float, help="kill the command after this many seconds")
    p.add_argument("--argv", dest="argv_form", action="store_true",
                   help="treat a single argument as a program, not a shell string")
    p.add_argument("--no-stdin", action="store_true", help="do not forward this process's stdin")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS, or one shell string")

    p = sub.add_parser("bash", help="interactive shell in a fresh VM (Ctrl-D exits)")
    _add_vm_args(p)
    _add_net_args(p)
    _add_mount_args(p)
    p.add_argument("--user", "-u", help="guest user name or uid")
    p.add_argument("--resume", metavar="CHECKPOINT",
                   help="resume a checkpoint (path or name, see gondolin checkpoint list) instead of a fresh VM")
    p.add_argument("command", nargs="*", help="program to run instead of bash -l")

    p = sub.add_parser("image", help="build, list, verify or remove guest images")
    isub = p.add_subparsers(dest="image_cmd", required=True)
    b = isub.add_parser("build", help="build the default guest image from Debian packages")
    b.add_argument("--ref", default="default")
    b.add_argument("--force", action="store_true", help="rebuild even when cached")
    isub.add_parser("list", help="list images in the store")
    v = isub.add_parser("verify", help="check every asset against its manifest hash")
    v.add_argument("ref", nargs="?", default="default")
    r = isub.add_parser("rm", help="remove an image ref (and its files when unreferenced)")
    r.add_argument("ref")
    from ._cli_snapshots import add_image_warm, add_parsers

    add_image_warm(isub)
    add_parsers(sub)

    p = sub.add_parser("doctor", help="check QEMU, tools, image and accelerator")
    p.add_argument("--image", default="default")
    p.add_argument("--boot", action="store_true", help="also boot a VM and time it")

    p = sub.add_parser("demo", help="boot a VM, run a command, write a file in and read it back")
    _add_vm_args(p)

    p = sub.add_parser("mcp", help="serve sandboxes to MCP clients (Claude Desktop, Claude Code, ...)",
                       add_help=False)
    p.add_argument("mcp_args", nargs=argparse.REMAINDER, help="options of gondolin-mcp (see gondolin mcp --help)")
    return parser


def _mcp(mcp_args: list[str]) -> int:
    try:
        from mcp_server.__main__ import main as mcp_main
    except ImportError as exc:
        print(f"gondolin mcp needs the MCP extra: pip install 'gondolin[mcp]' ({exc})", file=sys.stderr)
        return 2
    mcp_main(mcp_args, prog="gondolin mcp")
    return 0


def main(argv: list[str] | None = None) -> None:
    raw = sys.argv[1:] if argv is None else list(argv)
    if raw[:1] == ["mcp"]:  # every option belongs to gondolin-mcp, --help included
        sys.exit(_mcp(raw[1:]))
    args = build_parser().parse_args(argv)
    try:
        if args.cmd == "exec":
            code = anyio.run(_exec, args)
        elif args.cmd == "bash":
            code = anyio.run(_bash, args)
        elif args.cmd == "image":
            code = _image(args)
        elif args.cmd == "doctor":
            code = anyio.run(_doctor, args)
        elif args.cmd == "demo":
            code = anyio.run(_demo, args)
        elif args.cmd == "mcp":
            code = _mcp(args.mcp_args)
        elif args.cmd in ("list", "attach", "snapshot", "checkpoint"):
            from ._cli_snapshots import run as run_snapshot_command

            code = run_snapshot_command(args)
        else:  # pragma: no cover - argparse enforces the choices
            code = 2
    except GondolinError as exc:
        print(f"gondolin: {exc}", file=sys.stderr)
        code = 125
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
