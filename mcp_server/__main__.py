"""``gondolin-mcp`` / ``gondolin mcp``: serve Gondolin sandboxes over MCP (stdio or streamable HTTP).

Operator configuration comes from a TOML file (``--config`` or ``$GONDOLIN_MCP_CONFIG``) and
flags, which add to it. Secret values are read from this process's environment. Over HTTP every
request needs the bearer token (``--token-file``, ``$GONDOLIN_MCP_TOKEN``, or one generated and
printed to stderr at start) unless ``--no-auth``, which only a loopback address allows.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import anyio

from gondolin.http.secrets import parse_scope
from gondolin.options import MOUNT_MODES
from integrations.config import ConfigError, OperatorConfig, load_config

from .http import TOKEN_ENV, check_binding, resolve_token

ENV_CONFIG = "GONDOLIN_MCP_CONFIG"
HTTP_SHUTDOWN_S = 3  # after a signal, how long open HTTP streams may take to finish
log = logging.getLogger("gondolin.mcp")


def build_parser(prog: str = "gondolin-mcp") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Serve Gondolin micro-VM sandboxes to MCP clients.")
    p.add_argument("--config", default=os.environ.get(ENV_CONFIG),
                   help=f"operator configuration (TOML); default ${ENV_CONFIG}")
    p.add_argument("--transport", choices=["stdio", "streamable-http"], default="stdio")
    p.add_argument("--host", default="127.0.0.1", help="streamable-http: address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8765, help="streamable-http: port (default 8765)")
    p.add_argument("--stateless", action="store_true",
                   help="streamable-http: no MCP sessions (any request, any time); every client shares one pool "
                        "of sandboxes")
    p.add_argument("--token-file", metavar="FILE",
                   help=f"streamable-http: the bearer token clients must send (default ${TOKEN_ENV}, else a new "
                        "one printed to stderr at start)")
    p.add_argument("--no-auth", action="store_true",
                   help="streamable-http: accept requests without a token (refused unless --host is loopback)")
    p.add_argument("--session-grace", type=float, metavar="S",
                   help="streamable-http: seconds a session may have no open request (a client gone, or "
                        "reconnecting) before it ends and its sandboxes close (default 60)")
    p.add_argument("--share-sandboxes", action="store_true",
                   help="streamable-http: every session may see and use every sandbox (default: only its own)")
    p.add_argument("--max-sandboxes-per-session", type=int, metavar="N",
                   help="live sandboxes one session may own (default: --max-sandboxes)")
    p.add_argument("--tools", help="comma-separated tool names to expose (default: all)")
    p.add_argument("--max-sandboxes", type=int, help="live sandboxes at once")
    p.add_argument("--ttl", type=int, help="default idle seconds before a sandbox is destroyed")
    p.add_argument("--pool-size", type=int, metavar="N",
                   help="spare VMs kept ready so sandbox_create only configures one (default 1; 0 disables; "
                        "spares count against no sandbox limit)")
    p.add_argument("--memory", type=int, help="default guest memory in MiB")
    p.add_argument("--image", action="append", default=[], help="allow this image (the first one is the default)")
    p.add_argument("--network-profile", action="append", default=[], metavar="NAME=HOST[,HOST...]",
                   help="a network profile allowing HTTP(S) to these host patterns (repeatable)")
    p.add_argument("--default-network", help="profile used when the model does not choose one")
    p.add_argument("--secret", action="append", default=[], metavar="NAME=HOST[,HOST...]",
                   help="a secret the model may bind by name; its value is read from $NAME. HOST may be "
                        "HOST:PORT and may start with http:// (default: https on its default port); repeatable")
    p.add_argument("--mount-root", action="append", default=[], metavar="PATH[:ro|cow|rw]",
                   help="a host directory sandboxes may mount (default mode ro; repeatable)")
    p.add_argument("--ray-address", default=os.environ.get("GONDOLIN_RAY_ADDRESS"),
                   help="run sandboxes on this Ray cluster ('auto', HOST:PORT or ray://HOST:PORT; needs the "
                        "ray extra; default $GONDOLIN_RAY_ADDRESS, else VMs on this host)")
    p.add_argument("--log-level", default="WARNING", help="server log level on stderr (default WARNING)")
    return p


def _pairs(items: Sequence[str], flag: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item in items:
        name, sep, hosts = item.partition("=")
        if not sep or not name or not hosts:
            raise ConfigError(f"{flag} expects NAME=HOST[,HOST...], got {item!r}")
        out[name] = [h.strip() for h in hosts.split(",") if h.strip()]
    return out


def config_from_args(args: argparse.Namespace) -> OperatorConfig:
    overrides: dict[str, Any] = {}
    limits: dict[str, Any] = {}
    if args.max_sandboxes is not None:
        limits["max_sandboxes"] = args.max_sandboxes
    if args.max_sandboxes_per_session is not None:
        limits["max_sandboxes_per_session"] = args.max_sandboxes_per_session
    if args.pool_size is not None:
        limits["pool_size"] = args.pool_size
    if args.ttl is not None:
        limits["default_ttl_s"] = args.ttl
        limits["max_ttl_s"] = max(args.ttl, 4 * 3600)
    if args.memory is not None:
        limits["default_memory_mb"] = args.memory
        limits["max_memory_mb"] = max(args.memory, 4096)
    if limits:
        overrides["limits"] = limits
    if args.image:
        overrides["allowed_images"] = list(args.image)
        overrides["default_image"] = args.image[0]
    profiles = _pairs(args.network_profile, "--network-profile")
    if profiles:
        overrides["network_profiles"] = {name: {"allowed_hosts": hosts} for name, hosts in profiles.items()}
    if args.default_network:
        overrides["default_network"] = args.default_network
    secrets = {}
    for name, hosts in _pairs(args.secret, "--secret").items():
        try:
            scope, schemes = parse_scope(",".join(hosts))
        except ValueError as exc:
            raise ConfigError(f"--secret {name}: {exc}") from None
        secrets[name] = {"hosts": scope, "schemes": schemes}
    if secrets:
        overrides["secrets"] = secrets
    mounts = []
    for item in args.mount_root:
        path, _, mode = item.rpartition(":") if item.rsplit(":", 1)[-1] in MOUNT_MODES else (item, "", "ro")
        mounts.append({"host_path": path, "mode": mode or "ro"})
    if mounts:
        overrides["mounts"] = mounts
    http: dict[str, Any] = {}
    if args.token_file:
        http["token_file"] = args.token_file
    if args.no_auth:
        http["auth"] = False
    if args.session_grace is not None:
        http["session_grace_s"] = args.session_grace
    if args.share_sandboxes:
        http["share_sandboxes"] = True
    if http:
        overrides["http"] = http
    return load_config(args.config, **overrides)


async def serve(config: OperatorConfig, tools: list[str] | None, args: argparse.Namespace,
                token: str | None = None) -> None:
    """Run until the client goes away or a signal arrives; every sandbox is closed either way."""
    from integrations import SandboxManager

    from .server import build_server

    backend = None
    if args.ray_address:
        from gondolin.cluster import RayBackend, connect

        backend = RayBackend(connect(args.ray_address))
    async with SandboxManager(config, backend=backend) as manager:  # type: ignore[arg-type]
        server = build_server(manager=manager, tools=tools)
        http = None if args.transport == "stdio" else http_server(server, manager, args, token)
        async with anyio.create_task_group() as tg:
            async def on_signal() -> None:
                with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP, signal.SIGINT) as signals:
                    async for signum in signals:
                        with anyio.CancelScope(shield=True):
                            await manager.close_all()
                        if args.transport == "stdio":
                            # stdin is read by a worker thread that cancellation cannot interrupt while
                            # the client keeps the pipe open; the sandboxes are closed, so leave now.
                            sys.stderr.flush()
                            os._exit(128 + signum)
                        if http is not None:
                            http.gate.close_streams()
                            http.should_exit = True  # stop accepting, let open requests end, then stop
                        else:
                            tg.cancel_scope.cancel()
                        return

            tg.start_soon(on_signal)
            if http is None:
                await server.run_stdio_async()
            else:
                async with http.gate.running():
                    await http.serve()
            tg.cancel_scope.cancel()


def http_server(server: Any, manager: Any, args: argparse.Namespace, token: str | None) -> Any:
    """A uvicorn server for streamable HTTP behind :class:`~mcp_server.http.HttpGate` (token,
    session ends). Signals stay with :func:`serve`, which closes the sandboxes first."""
    import uvicorn

    from .http import http_app

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    gate = http_app(server, manager, token=token, stateless=args.stateless, host=args.host)
    config = uvicorn.Config(gate, host=args.host, port=args.port, log_level=args.log_level.lower(),
                            lifespan="on", timeout_graceful_shutdown=HTTP_SHUTDOWN_S)
    http = Server(config)
    http.gate = gate  # type: ignore[attr-defined]
    return http


def main(argv: Sequence[str] | None = None, *, prog: str = "gondolin-mcp") -> None:
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    token: str | None = None
    try:
        config = config_from_args(args)
        if args.transport == "streamable-http":
            token, generated = resolve_token(config.http)
            check_binding(args.host, token)
    except ConfigError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        sys.exit(2)
    from integrations import TOOL_NAMES

    tools = [t.strip() for t in args.tools.split(",") if t.strip()] if args.tools else None
    unknown = sorted(set(tools or ()) - set(TOOL_NAMES))
    if unknown:
        print(f"{prog}: unknown tools: {', '.join(unknown)} (known: {', '.join(TOOL_NAMES)})", file=sys.stderr)
        sys.exit(2)
    if args.transport == "streamable-http":
        url = f"http://{args.host}:{args.port}/mcp"
        if token is None:
            print(f"{prog}: serving {url} WITHOUT authentication (--no-auth)", file=sys.stderr)
        elif generated:
            print(f"{prog}: serving {url}; clients must send 'Authorization: Bearer {token}' (a token generated "
                  f"for this run; set ${TOKEN_ENV} or --token-file to choose one)", file=sys.stderr)
        else:
            print(f"{prog}: serving {url}; clients must send the configured bearer token", file=sys.stderr)
        sys.stderr.flush()
    anyio.run(serve, config, tools, args, token)


if __name__ == "__main__":
    main()
