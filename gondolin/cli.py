"""The ``gondolin`` command line."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from ._cli_options import (
    EXIT_USAGE,
    NetworkReport,
    Parser,
    UsageError,
    add_mount_args,
    add_net_args,
    add_vm_args,
    check_cow_flags,
    finish_cow,
    first_mount,
    forward_spec,
    guest_dir,
    key_value,
    listen_address,
    open_network_log,
    seconds,
    vm_options,
)
from ._terminal import interactive_shell, piped_command
from .errors import GondolinError
from .options import VMOptions


# -- exec ---------------------------------------------------------------------
async def _exec(args: argparse.Namespace) -> int:
    argv = list(args.command)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise UsageError("gondolin exec: give a command: gondolin exec -- CMD ARGS, or gondolin exec 'shell string'")
    command: str | list[str] = argv[0] if (len(argv) == 1 and not args.argv_form) else argv
    forward = not sys.stdin.isatty() and not args.no_stdin
    return await _in_vm(args, lambda vm: piped_command(
        vm, command, env=dict(args.env), cwd=args.cwd or first_mount(args), user=args.user, timeout=args.timeout,
        forward_stdin=forward))


async def _in_vm(args: argparse.Namespace, run: Callable[[Any], Awaitable[Any]],
                 starting: Callable[[VMOptions], Awaitable[Any]] | None = None) -> int:
    """Start the VM the flags describe, run the command, report the network and the mounts."""
    from .vm import VM

    check_cow_flags(args)
    report = NetworkReport(open_network_log(args.network_log))
    try:
        options = vm_options(args, report)
        async with await (starting or VM.create)(options) as vm:
            try:
                outcome = await run(vm)
                code = outcome if isinstance(outcome, int) else int(outcome.exit_code)
                if not isinstance(outcome, int) and outcome.timed_out:
                    print(f"gondolin: command killed after its {args.timeout}s timeout", file=sys.stderr)
                if not await finish_cow(vm, args):
                    code = EXIT_USAGE
                return code
            finally:
                report.report(sys.stderr)  # after the terminal left raw mode
    finally:
        report.close()


# -- bash ---------------------------------------------------------------------
async def _bash(args: argparse.Namespace) -> int:
    command = args.command or ["/bin/bash", "-l"]
    cwd = first_mount(args)
    starting = None
    if args.resume:
        from ._cli_vms import resume_for_shell

        def starting(options: VMOptions) -> Awaitable[Any]:
            return resume_for_shell(args.resume, options)
    if sys.stdin.isatty():
        return await _in_vm(args, _reaching(args, _listening(args, lambda vm: interactive_shell(
            vm, command, user=args.user, cwd=cwd))), starting)
    # Not a terminal (a pipe, a file, /dev/null): the shell reads its commands from our stdin
    # and exits at its end, like `bash < script`; its exit code is ours.
    return await _in_vm(args, _reaching(args, _listening(args, lambda vm: piped_command(
        vm, command, user=args.user, cwd=cwd))), starting)


def _reaching(args: argparse.Namespace, run: Callable[[Any], Awaitable[Any]]) -> Callable[[Any], Awaitable[Any]]:
    """``run``, after the port forwards (``--forward``) and SSH access (``--ssh``) are up; each
    prints where to reach it (stderr, so the shell's output stays its own)."""
    if not args.forward and not args.ssh:
        return run

    async def with_access(vm: Any) -> Any:
        for guest_port, host_port in args.forward:
            try:
                fwd = await vm.forward_tcp(guest_port, host_port=host_port)
            except GondolinError as exc:
                raise UsageError(f"--forward {guest_port}:{host_port}: {exc.message}") from None
            print(f"Forwarding {fwd.address} -> guest port {guest_port}", file=sys.stderr)
        if args.ssh:
            access = await vm.enable_ssh(user=args.user if args.user and not args.user.isdigit() else "agent")
            print(f"SSH: {access}", file=sys.stderr)
        return await run(vm)

    return with_access


def _listening(args: argparse.Namespace, run: Callable[[Any], Awaitable[Any]]) -> Callable[[Any], Awaitable[Any]]:
    """``run``, after starting the ingress gateway that ``--listen`` asks for (routes from the
    guest's /etc/gondolin/listeners)."""
    if args.listen is None:
        return run
    from .streams import is_loopback

    host, port = args.listen
    if not is_loopback(host) and not args.listen_remote:
        raise UsageError(f"--listen {host}:{port} would let anyone who can reach {host} reach the guest's "
                         "servers; add --listen-remote to mean it, or listen on 127.0.0.1")

    async def with_gateway(vm: Any) -> Any:
        await vm.fs.mkdir("/etc/gondolin")
        gateway = await vm.expose_http(host=host, listen_port=port, allow_remote=args.listen_remote)
        print(f"Ingress enabled: {gateway.url} (routes: /etc/gondolin/listeners in the guest, "
              "one '<prefix> :<port>' per line)", file=sys.stderr)
        return await run(vm)

    return with_gateway


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
    async with await VM.create(vm_options(args, None)) as vm:
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
    parser = Parser(prog="gondolin", description="Run untrusted code in local QEMU micro-VMs. Exit status: the "
                    f"guest command's; {EXIT_USAGE} for a usage or setup error.")
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("exec", help="run one command in a fresh VM; its exit code becomes ours")
    add_vm_args(p)
    add_net_args(p)
    add_mount_args(p)
    p.add_argument("--env", "-e", action="append", type=key_value, default=[], metavar="KEY=VALUE",
                   help="environment for the command (repeatable)")
    p.add_argument("--cwd", type=guest_dir, help="working directory in the guest (default: the first --mount, "
                                                 "else the user's home)")
    p.add_argument("--user", "-u", help="guest user name or uid (default root)")
    p.add_argument("--timeout", type=seconds, help="kill the command after this many seconds")
    p.add_argument("--argv", dest="argv_form", action="store_true",
                   help="treat a single argument as a program, not a shell string")
    p.add_argument("--no-stdin", action="store_true", help="do not forward this process's stdin")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS, or one shell string")

    p = sub.add_parser("bash", help="interactive shell in a fresh VM (Ctrl-D or the end of stdin exits)")
    add_vm_args(p)
    add_net_args(p)
    add_mount_args(p)
    p.add_argument("--user", "-u", help="guest user name or uid")
    p.add_argument("--resume", metavar="CHECKPOINT",
                   help="resume a checkpoint (path or name, see gondolin checkpoint list) instead of a fresh VM")
    p.add_argument("--listen", type=listen_address, metavar="[HOST:]PORT",
                   help="serve the guest's HTTP servers at http://HOST:PORT (default host 127.0.0.1, port 0: a "
                        "free one); routes come from /etc/gondolin/listeners in the guest")
    p.add_argument("--listen-remote", action="store_true",
                   help="allow --listen on an address other than loopback")
    p.add_argument("--forward", action="append", type=forward_spec, default=[], metavar="GUEST_PORT[:HOST_PORT]",
                   help="relay 127.0.0.1:HOST_PORT on this machine (default a free port, printed) to the guest's "
                        "loopback GUEST_PORT (repeatable)")
    p.add_argument("--ssh", action="store_true",
                   help="start sshd in the guest (guest loopback, key login only) and print the ssh command that "
                        "logs in as --user (default agent)")
    p.add_argument("command", nargs="*", help="program to run instead of bash -l")

    from ._cli_images import add_parsers as add_image_parsers
    from ._cli_vms import add_parsers

    add_image_parsers(sub)
    add_parsers(sub)

    p = sub.add_parser("doctor", help="check QEMU, tools, image and accelerator")
    p.add_argument("--image", default="default")
    p.add_argument("--boot", action="store_true", help="also boot a VM and time it")

    p = sub.add_parser("demo", help="boot a VM, run a command, write a file in and read it back")
    add_vm_args(p)

    p = sub.add_parser("mcp", help="serve sandboxes to MCP clients (Claude Desktop, Claude Code, ...)",
                       add_help=False)
    p.add_argument("mcp_args", nargs=argparse.REMAINDER, help="options of gondolin-mcp (see gondolin mcp --help)")
    return parser


def _mcp(mcp_args: list[str]) -> int:
    try:
        from mcp_server.__main__ import main as mcp_main
    except ImportError as exc:
        print(f"gondolin mcp needs the MCP extra: pip install 'gondolin[mcp]' ({exc})", file=sys.stderr)
        return EXIT_USAGE
    mcp_main(mcp_args, prog="gondolin mcp")
    return 0


def main(argv: list[str] | None = None) -> None:
    raw = sys.argv[1:] if argv is None else list(argv)
    if raw[:1] == ["mcp"]:  # every option belongs to gondolin-mcp, --help included
        sys.exit(_mcp(raw[1:]))
    try:
        args = build_parser().parse_args(argv)
        if args.cmd == "exec":
            code = anyio.run(_exec, args)
        elif args.cmd == "bash":
            code = anyio.run(_bash, args)
        elif args.cmd == "image":
            from ._cli_images import run as run_image_command

            code = run_image_command(args)
        elif args.cmd == "doctor":
            code = anyio.run(_doctor, args)
        elif args.cmd == "demo":
            code = anyio.run(_demo, args)
        elif args.cmd == "mcp":
            code = _mcp(args.mcp_args)
        elif args.cmd in ("list", "attach", "checkpoint"):
            from ._cli_vms import run as run_vm_command

            code = run_vm_command(args)
        else:  # pragma: no cover - argparse enforces the choices
            code = EXIT_USAGE
    except UsageError as exc:
        print(exc, file=sys.stderr)
        code = EXIT_USAGE
    except GondolinError as exc:
        print(f"gondolin: {exc}", file=sys.stderr)
        code = EXIT_USAGE
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
