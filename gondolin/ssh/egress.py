"""The SSH egress proxy: the guest's SSH connections end at an SSH server in the host process.

:class:`SshEgressProxy` is the network stack's handler for flows classified as SSH. It runs an
``asyncssh`` server over the guest's TCP flow (bridged through a socket pair, since asyncssh
wants a socket), with a per-VM host key the guest trusts through its ``known_hosts`` (see
:meth:`SshEgressProxy.known_hosts_line`). The guest authenticates with nothing; it holds no key.

Per exec request the proxy checks the destination against the allowed hosts and asks the
``exec_policy``; an allowed command then runs on the real server over a connection the host
opens with its own credential (key file or ssh-agent) after verifying the server's host key,
and stdin, stdout, stderr, EOF and the exit status are relayed with flow control on both sides.
Shells, subsystems (sftp), port forwarding and agent forwarding are refused with a message on
the guest's stderr. Every decision is an audit event in the VM's network event log (scheme
``"ssh"``, method the git service or ``"exec"``, path a summary of the command).

asyncssh runs on asyncio only: under trio the options check and the proxy refuse to start (SshProxyError).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import sniffio

from ..errors import GondolinError
from ..http.hooks import AuditEvent, Decision, EventLog, maybe_await
from ..net.flow import FlowHandler, FlowInfo, FlowProtocol
from .policy import (
    ALLOW,
    SshAllow,
    SshDeny,
    SshProxyOptions,
    command_summary,
    git_policy,
    parse_git_command,
)

log = logging.getLogger(__name__)

PROXY_VERSION = "gondolin-ssh-proxy"
LOGIN_TIMEOUT = 60.0  # the guest's key exchange must finish by then (TCG guests are slow)
COPY_CHUNK = 65536
HIGH_WATER = 256 * 1024  # bytes queued on a channel before the other side stops being read
EXIT_NO_UPSTREAM = 255  # ssh's own code for "connection failed"
POLICY_TIMEOUT = 30.0  # seconds an exec_policy callback may take before the command is refused


class SshProxyError(GondolinError):
    """The SSH egress proxy cannot run (asyncssh missing, or not on asyncio)."""

    code = "ssh_proxy_error"


def _asyncssh() -> Any:
    try:
        import asyncssh
    except ImportError:
        raise SshProxyError("SSH egress needs the asyncssh package: pip install 'gondolin[ssh]'") from None
    return asyncssh


class _Refused(Exception):
    """A request is refused: ``message`` goes to the guest's stderr."""

    def __init__(self, message: str, exit_code: int = 1, reason: str = "", decision: Decision = Decision.BLOCKED):
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code
        self.reason = reason or message
        self.decision = decision


class SshEgressProxy:
    """One VM's SSH egress proxy; call it as a flow handler for SSH flows."""

    def __init__(self, options: SshProxyOptions, events: EventLog | None = None) -> None:
        asyncssh = _asyncssh()
        try:
            backend = sniffio.current_async_library()
        except sniffio.AsyncLibraryNotFoundError:
            backend = "none"
        if backend != "asyncio":
            raise SshProxyError(f"SSH egress (asyncssh) runs on asyncio only, not {backend}: start this VM "
                                "from an asyncio event loop, or leave out the ssh option")
        self.client_key = None
        if options.credential is not None:
            path = str(Path(os.fspath(options.credential)).expanduser())
            try:
                self.client_key = asyncssh.read_private_key(path, options.passphrase)
            except (OSError, ValueError, asyncssh.KeyImportError) as exc:
                detail = ("it is encrypted: pass its passphrase" if "assphrase must be" in str(exc)
                          else f"{type(exc).__name__}: {exc}")
                raise SshProxyError(f"the SSH credential {path} could not be loaded ({detail})") from None
        self.options = options
        self.events = events if events is not None else EventLog()
        self.policy = options.exec_policy if options.exec_policy is not None else git_policy()
        self.host_key = asyncssh.generate_private_key("ssh-ed25519", comment=PROXY_VERSION)
        self.upstream_total = 0
        self.connections = 0

    # -- the guest's side ---------------------------------------------------------------------

    def known_hosts_line(self, exclude: Iterable[str] = ()) -> str:
        """The guest's ``known_hosts`` line: the proxy's key for every host except ``exclude``
        (names the guest reaches over mapped TCP, which present their own keys). Sound because
        every SSH connection the guest makes to a sniffed port ends at this proxy."""
        negated = sorted({h for e in exclude for h in (f"!{e}", f"![{e}]:*")})
        key = self.host_key.export_public_key("openssh").decode().split()
        return ",".join(["*", *negated]) + f" {key[0]} {key[1]}\n"

    async def __call__(self, flow: FlowInfo, stream: anyio.abc.ByteStream) -> None:
        """Serve one guest SSH connection until either side ends it; closes ``stream``."""
        try:
            if sniffio.current_async_library() != "asyncio":  # the constructor already refuses this
                self._record(flow, "connect", "", Decision.ERROR, "the SSH proxy runs on asyncio only (asyncssh)")
                return
            self.connections += 1
            mine, theirs = socket.socketpair()
            try:
                bridge = await anyio.abc.SocketStream.from_socket(mine)
            except BaseException:
                mine.close()
                theirs.close()
                raise
            activity = [anyio.current_time()]
            async with bridge, anyio.create_task_group() as tg:
                tg.start_soon(_pump, stream, bridge, activity)
                tg.start_soon(_pump, bridge, stream, activity)
                tg.start_soon(self._idle_watch, activity, tg.cancel_scope)
                try:
                    await self._serve(flow, theirs)
                finally:
                    theirs.close()
                    tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(1):
                try:
                    await stream.aclose()
                except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError):
                    pass

    async def _idle_watch(self, activity: list[float], scope: anyio.CancelScope) -> None:
        """Close a guest connection (and its relays) after ``idle_timeout`` s without traffic."""
        idle = self.options.idle_timeout
        while True:
            left = activity[0] + idle - anyio.current_time()
            if left <= 0:
                log.debug("closing an idle guest SSH connection")
                scope.cancel()
                return
            await anyio.sleep(left)

    async def _serve(self, flow: FlowInfo, sock: socket.socket) -> None:
        asyncssh = _asyncssh()
        guest = _GuestConnection(self, flow)
        try:
            conn = await asyncssh.run_server(
                sock, server_factory=lambda: guest, server_host_keys=[self.host_key],
                server_version=PROXY_VERSION, encoding=None, allow_pty=False, agent_forwarding=False,
                x11_forwarding=False, login_timeout=LOGIN_TIMEOUT,
                keepalive_interval=0, config=None)
        except (OSError, asyncssh.Error, TimeoutError) as exc:
            log.debug("guest SSH handshake on %s:%d failed: %s", flow.dst_ip, flow.dst_port, exc)
            return
        try:
            await conn.wait_closed()
        finally:
            conn.abort()
            for task in list(guest.tasks):
                task.cancel()

    # -- decisions ------------------------------------------------------------------------------

    def _record(self, flow: FlowInfo, method: str, command: str, decision: Decision, reason: str,
                status: int | None = None, nbytes: int = 0) -> None:
        host = flow.hostname or flow.dst_ip
        self.events.record(AuditEvent(
            time=self.events.clock(), method=method, scheme="ssh", host=host, port=flow.dst_port,
            path=command_summary(command) if command else "", status=status, response_bytes=nbytes,
            decision=decision, reason=reason, protocol="SSH-2.0"))

    async def decide(self, flow: FlowInfo, user: str, command: str) -> None:
        """Raise :class:`_Refused` unless ``command`` may run upstream."""
        host = flow.hostname or flow.dst_ip
        port = flow.dst_port
        if not self.options.allows(flow.hostname, flow.dst_ip, port):
            raise _Refused(f"SSH to {host}:{port} is not allowed: it is not one of this VM's SSH allowed hosts "
                           "(ssh allowed_hosts / --ssh-allow-host)", 1, "host not allowed")
        try:
            with anyio.fail_after(POLICY_TIMEOUT):
                answer = await maybe_await(self.policy(host, port, user, command))
        except TimeoutError:
            raise _Refused(f"the VM's SSH policy did not decide within {POLICY_TIMEOUT:g} s", 1,
                           "exec_policy timed out", Decision.ERROR) from None
        except Exception as exc:  # a broken policy denies, it never allows
            log.exception("ssh exec_policy raised")
            raise _Refused(f"the VM's SSH policy failed on this command ({type(exc).__name__})", 1,
                           "exec_policy raised", Decision.ERROR) from None
        if answer is True or isinstance(answer, SshAllow):
            return
        if isinstance(answer, SshDeny):
            raise _Refused(answer.message, answer.exit_code, f"exec_policy: {answer.message}")
        if answer is False:
            raise _Refused(f"the command is not allowed by the VM's SSH policy: {command_summary(command)}", 1,
                           "exec_policy denied")
        raise _Refused("the VM's SSH policy returned no decision (it must return ALLOW, SshDeny or a bool)", 1,
                       f"exec_policy returned {type(answer).__name__}", Decision.ERROR)

    # -- the upstream side ---------------------------------------------------------------------

    async def connect_upstream(self, flow: FlowInfo, user: str) -> Any:
        asyncssh = _asyncssh()
        opts = self.options
        host = flow.hostname or flow.dst_ip
        target_host, target_port = opts.upstream_for(host, flow.dst_port)
        username = opts.username or user or "git"
        kwargs: dict[str, Any] = dict(
            username=username, config=None, agent_forwarding=False, x11_forwarding=False,
            password_auth=False, kbdint_auth=False, host_based_auth=False, gss_auth=False,
            connect_timeout=opts.connect_timeout, login_timeout=opts.connect_timeout,
            keepalive_interval=opts.keepalive_interval, keepalive_count_max=3,
            agent_path=None, client_version=PROXY_VERSION)
        agent = None
        if self.client_key is not None:
            kwargs["client_keys"] = [self.client_key]
        else:
            agent_path = opts.agent_path()
            try:
                agent = await asyncssh.connect_agent(agent_path)
                keys = await agent.get_keys()
            except (OSError, asyncssh.Error) as exc:
                raise _Refused(f"the host's ssh-agent at {agent_path} is not reachable ({exc})", EXIT_NO_UPSTREAM,
                               "ssh-agent unreachable", Decision.ERROR) from None
            if not keys:
                agent.close()
                raise _Refused("the host's ssh-agent holds no keys (ssh-add one)", EXIT_NO_UPSTREAM,
                               "ssh-agent has no keys", Decision.ERROR)
            kwargs["client_keys"] = keys
        verifier = opts.host_key_verifier
        if verifier is not None:
            kwargs["known_hosts"] = lambda h, a, p: ([], [], [])
            kwargs["client_factory"] = lambda: _VerifyingClient(verifier, target_host, target_port)
        else:
            kwargs["known_hosts"] = [os.path.expanduser(p) for p in opts.known_hosts_paths()]
        where = f"{target_host}:{target_port}"
        try:
            with anyio.fail_after(opts.connect_timeout + 5):
                return await asyncssh.connect(target_host, target_port, **kwargs)
        except asyncssh.HostKeyNotVerifiable as exc:
            raise _Refused(f"the host key of {where} is not trusted ({exc.reason}): it is not in the host's "
                           f"known_hosts ({', '.join(opts.known_hosts_paths()) or 'host_key_verifier'}) or it "
                           "changed; the connection was refused", EXIT_NO_UPSTREAM, "upstream host key not trusted",
                           Decision.BLOCKED) from None
        except asyncssh.PermissionDenied:
            raise _Refused(f"the host's credential was refused by {where} as user {username!r}", EXIT_NO_UPSTREAM,
                           "upstream authentication failed", Decision.ERROR) from None
        except TimeoutError:
            raise _Refused(f"connecting to {where} timed out", EXIT_NO_UPSTREAM, "upstream timeout",
                           Decision.ERROR) from None
        except (OSError, asyncssh.Error) as exc:
            raise _Refused(f"cannot connect to {where}: {exc}", EXIT_NO_UPSTREAM, "upstream unreachable",
                           Decision.ERROR) from None
        finally:
            if agent is not None:
                agent.close()


class _VerifyingClient:
    """asyncssh client callbacks that ask the user's host key verifier (duck-typed SSHClient)."""

    def __new__(cls, verifier: Callable[[str, int, str], bool], host: str, port: int) -> Any:
        asyncssh = _asyncssh()

        class Client(asyncssh.SSHClient):  # type: ignore[misc, name-defined]
            def validate_host_public_key(self, h: str, addr: str, p: int, key: Any) -> bool:
                text = key.export_public_key("openssh").decode().strip()
                try:
                    return verifier(host, port, text) is True
                except Exception:
                    log.exception("ssh host_key_verifier raised; the key is not trusted")
                    return False

        return Client()


async def _pump(src: anyio.abc.ByteStream, dst: anyio.abc.ByteStream, activity: list[float]) -> None:
    try:
        while True:
            try:
                data = await src.receive(COPY_CHUNK)
            except anyio.EndOfStream:
                await dst.send_eof()
                return
            activity[0] = anyio.current_time()
            await dst.send(data)
    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        return


class _GuestConnection:
    """asyncssh server callbacks for one guest connection (an ``SSHServer``)."""

    def __new__(cls, proxy: SshEgressProxy, flow: FlowInfo) -> Any:
        asyncssh = _asyncssh()

        class Server(asyncssh.SSHServer):  # type: ignore[misc, name-defined]
            def __init__(self) -> None:
                self.proxy = proxy
                self.flow = flow
                self.user = ""
                self.upstreams = 0
                self.tasks: set[asyncio.Task[None]] = set()

            def begin_auth(self, username: str) -> bool:
                self.user = username
                return False  # no authentication: the guest holds no credential

            def session_requested(self) -> Any:
                return _make_session(self)

            def connection_requested(self, *args: Any) -> Any:
                proxy._record(flow, "forward", "", Decision.BLOCKED, "port forwarding refused")
                raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED,
                                                "port forwarding is not available through the gondolin SSH proxy")

            def unix_connection_requested(self, *args: Any) -> Any:
                return self.connection_requested()

            def server_requested(self, *args: Any) -> bool:
                proxy._record(flow, "forward", "", Decision.BLOCKED, "remote port forwarding refused")
                return False

            def unix_server_requested(self, *args: Any) -> bool:
                return False

        return Server()


def _make_session(server: Any) -> Any:
    asyncssh = _asyncssh()

    class Session(asyncssh.SSHServerSession):  # type: ignore[misc, name-defined]
        """One guest channel: refuses shells and subsystems, relays an allowed exec."""

        def __init__(self) -> None:
            self.chan: Any = None
            self.command: str | None = None
            self.refusal: str | None = None
            self.upstream: Any = None  # the SSHClientProcess once running
            self.guest_writable = asyncio.Event()
            self.guest_writable.set()
            self.pending: list[tuple[bytes, int | None]] = []  # guest input before upstream is up
            self.pending_bytes = 0
            self.eof = False
            self.draining = False

        def connection_made(self, chan: Any) -> None:
            self.chan = chan

        def pty_requested(self, *args: Any) -> bool:
            return False  # no terminal: the command's output is passed through as is

        def shell_requested(self) -> bool:
            self.refusal = ("interactive shells are not available through the gondolin SSH proxy: run a command "
                            "such as git clone/fetch/push")
            return True

        def subsystem_requested(self, subsystem: str) -> bool:
            self.refusal = (f"the {subsystem!r} subsystem (sftp, scp -s) is not available through the gondolin SSH "
                            "proxy; only commands such as git fetch/push run")
            return True

        def exec_requested(self, command: str) -> bool:
            self.command = command
            return True

        def session_started(self) -> None:
            task = asyncio.get_running_loop().create_task(self.run())
            server.tasks.add(task)
            task.add_done_callback(server.tasks.discard)

        # guest -> upstream

        def data_received(self, data: bytes, datatype: int | None) -> None:
            if self.upstream is None:
                self.pending.append((data, datatype))
                self.pending_bytes += len(data)
                if self.pending_bytes > HIGH_WATER:
                    self.chan.pause_reading()
                return
            if datatype is None:
                self.upstream.stdin.write(data)
                self._throttle()

        def _throttle(self) -> None:
            chan = self.upstream.stdin.channel
            if chan.get_write_buffer_size() > HIGH_WATER and not self.draining:
                self.draining = True
                self.chan.pause_reading()
                task = asyncio.get_running_loop().create_task(self._drain())
                server.tasks.add(task)
                task.add_done_callback(server.tasks.discard)

        async def _drain(self) -> None:
            try:
                await self.upstream.stdin.drain()
            except Exception:  # noqa: BLE001 - the upstream went away; run() reports it
                pass
            self.draining = False
            self.chan.resume_reading()

        def eof_received(self) -> bool:
            self.eof = True
            if self.upstream is not None:
                self.upstream.stdin.write_eof()
            return True  # keep our side open for the rest of the output and the exit status

        # upstream -> guest flow control

        def pause_writing(self) -> None:
            self.guest_writable.clear()

        def resume_writing(self) -> None:
            self.guest_writable.set()

        def connection_lost(self, exc: Exception | None) -> None:
            self.guest_writable.set()
            if self.upstream is not None:
                self.upstream.close()

        def refuse(self, message: str, code: int) -> None:
            self.chan.write_stderr(f"gondolin: {message}\r\n".encode())
            self.chan.exit(code)

        async def run(self) -> None:
            proxy: SshEgressProxy = server.proxy
            flow: FlowInfo = server.flow
            command = self.command
            if self.refusal is not None or command is None:
                kind = "shell" if self.refusal is None or "shell" in self.refusal else "subsystem"
                message = self.refusal or "interactive shells are not available through the gondolin SSH proxy"
                proxy._record(flow, kind, "", Decision.BLOCKED, message)
                self.refuse(message, 1)
                return
            git = parse_git_command(command)
            method = git.service if git is not None else "exec"
            conn = None
            counted = False
            try:
                await proxy.decide(flow, server.user, command)
                opts = proxy.options
                if server.upstreams >= opts.max_upstream_per_connection:
                    raise _Refused(f"too many concurrent commands on one SSH connection (limit "
                                   f"{opts.max_upstream_per_connection})", 1, "per-connection upstream limit")
                if proxy.upstream_total >= opts.max_upstream_total:
                    raise _Refused(f"too many SSH upstream connections from this VM (limit {opts.max_upstream_total})",
                                   1, "upstream limit")
                server.upstreams += 1
                proxy.upstream_total += 1
                counted = True
                conn = await proxy.connect_upstream(flow, server.user)
                try:
                    with anyio.fail_after(proxy.options.connect_timeout):
                        self.upstream = await conn.create_process(command, encoding=None)
                except Exception as exc:  # noqa: BLE001 - asyncssh.Error, OSError, TimeoutError
                    raise _Refused(f"the server refused the command: {exc}", EXIT_NO_UPSTREAM,
                                   "upstream refused the channel", Decision.ERROR) from None
                for data, datatype in self.pending:
                    if datatype is None and data:
                        self.upstream.stdin.write(data)
                self.pending.clear()
                self.pending_bytes = 0
                self.chan.resume_reading()
                if self.eof:
                    self.upstream.stdin.write_eof()
                else:
                    self._throttle()
                nbytes = 0

                async def copy(reader: Any, stderr: bool) -> None:
                    nonlocal nbytes
                    while True:
                        data = await reader.read(COPY_CHUNK)
                        if not data:
                            return
                        nbytes += len(data)
                        await self.guest_writable.wait()
                        if stderr:
                            self.chan.write_stderr(data)
                        else:
                            self.chan.write(data)

                await asyncio.gather(copy(self.upstream.stdout, False), copy(self.upstream.stderr, True))
                result = await self.upstream.wait(check=False)
                status = result.exit_status if result.exit_status is not None else EXIT_NO_UPSTREAM
                proxy._record(flow, method, command, Decision.ALLOWED, f"user {server.user}", status, nbytes)
                if result.exit_signal is not None:
                    sig, core, msg, lang = result.exit_signal
                    self.chan.exit_with_signal(sig, core, msg, lang)
                else:
                    self.chan.exit(status)
            except _Refused as refused:
                proxy._record(flow, method, command, refused.decision, refused.reason)
                self.refuse(refused.message, refused.exit_code)
            except Exception as exc:  # noqa: BLE001 - asyncssh.Error, OSError, anything: the guest gets an answer
                proxy._record(flow, method, command, Decision.ERROR, f"relay failed: {type(exc).__name__}")
                try:
                    self.refuse(f"the SSH relay failed ({type(exc).__name__})", EXIT_NO_UPSTREAM)
                except Exception:  # noqa: BLE001 - the guest side is gone too
                    pass
            finally:
                if conn is not None:
                    conn.close()
                if counted:
                    server.upstreams -= 1
                    proxy.upstream_total -= 1

    return Session()


def flow_router(http: FlowHandler | None, ssh: SshEgressProxy) -> FlowHandler:
    """One flow handler for the network stack: SSH flows to ``ssh``, the rest to ``http``."""

    async def route(flow: FlowInfo, stream: anyio.abc.ByteStream) -> None:
        if flow.protocol is FlowProtocol.SSH:
            await ssh(flow, stream)
        elif http is not None:
            await http(flow, stream)

    return route


__all__ = ["ALLOW", "SshEgressProxy", "SshProxyError", "flow_router"]
