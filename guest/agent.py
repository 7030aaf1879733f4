"""Gondolin guest agent: PID 1 of the micro-VM and the control service on the control port.

Stdlib only. One single-threaded selector loop serves every exec and file operation, so file
operations run interleaved with execs instead of waiting behind them. Every byte stream is
credit-limited in both directions, so no buffer here grows beyond what the host granted.

The wire format lives in ``gondolin.protocol`` (copied next to this file at image build).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import glob
import mmap
import os
import pwd
import selectors
import shutil
import signal
import socket
import stat as statmod
import struct
import subprocess
import sys
import termios
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gondolin.protocol import (  # noqa: E402
    DATA_CHUNK,
    DEFAULT_WINDOW,
    FrameDecoder,
    FrameError,
    Message,
    T,
    message,
)

CONTROL_PORT_NAME = "gondolin.control"
READ_CHUNK = 256 * 1024  # one read from a child pipe
PIPE_SIZE = 1024 * 1024  # F_SETPIPE_SZ for child output pipes: fewer, larger reads
# The virtio-console driver hands out at most one 4 KiB buffer per read() and takes at most
# 32 KiB per write(); readv/writev with that many pieces moves many buffers per system call.
PORT_READ_PIECE = 4096
PORT_READ_PIECES = 256
PORT_WRITE_PIECE = 32 * 1024
PORT_WRITE_PIECES = 32
STDIN_WINDOW = 256 * 1024  # bytes of stdin the host may have in flight per exec
# Guest TCP streams (the host connects to a guest loopback port): only loopback is reachable, a
# stream buffers at most TCP_WINDOW bytes from the host, and the agent holds at most
# MAX_TCP_STREAMS of them.
TCP_HOSTS = {"127.0.0.1": socket.AF_INET, "::1": socket.AF_INET6}
TCP_WINDOW = 256 * 1024
MAX_TCP_STREAMS = 1024
PTY_DRAIN_SECONDS = 0.25  # after the main process exits, how long to drain its output
PIPE_DRAIN_SECONDS = 0.5  # same for pipes kept open by background children
DRAIN_RECHECK_SECONDS = 0.05
# End of input on a PTY is a ^D, which the terminal's line discipline interprets when it arrives.
# A program that changes its terminal mode after starting (readline: python3 -i, bash) loses a
# ^D that arrived before, and then waits forever. So the ^D goes only once the program has read
# everything typed before it and the terminal has been quiet for PTY_EOF_SETTLE seconds (at most
# PTY_EOF_MAX_WAIT after the host closed stdin).
PTY_EOF_SETTLE = 0.3
PTY_EOF_POLL = 0.05
PTY_EOF_MAX_WAIT = 5.0
TIOCGPTN = 0x80045430  # the pty number of a master (linux/include/uapi/asm-generic/ioctls.h)
# Kernel functions a process sleeps in while it waits for input (/proc/PID/wchan): a terminal
# read (n_tty_read -> wait_woken), select/poll/epoll on the terminal (readline, shells).
INPUT_WAITS = frozenset({"wait_woken", "n_tty_read", "do_select", "core_sys_select", "do_sys_poll",
                         "do_poll", "ep_poll"})
RNDADDENTROPY = 0x40085203  # _IOW('R', 0x03, int[2]), linux/random.h
RNDRESEEDCRNG = 0x5207  # _IO('R', 0x07), linux/random.h: reseed the CRNG from the input pool now
MAX_PATH = 4096
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
BOOT_T0 = time.monotonic()
CGROUP_ROOT = "/sys/fs/cgroup"
AGENT_CGROUP = CGROUP_ROOT + "/agent"  # the agent and the helpers it starts: never limited
EXEC_CGROUP = CGROUP_ROOT + "/exec"  # one child cgroup per exec, each with its own pids.max
# cpu.weight (1-10000, default 100): when user commands and the agent both want the CPU, the
# agent runs first, so a guest busy with a fork bomb still answers the host.
AGENT_CPU_WEIGHT = 10000
EXEC_CPU_WEIGHT = 100
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND = 1, 2, 4, 8, 4096  # linux/mount.h
VIRTIOFS_READ_AHEAD_KB = 1024  # as the FUSE daemon sets it (guest/fuse.py READ_AHEAD_KB)


def log(msg: str) -> None:
    try:
        os.write(2, f"gondolin-agent: {msg}\n".encode())
    except OSError:
        pass


def find_port(name: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        base = "/sys/class/virtio-ports"
        try:
            for entry in os.listdir(base):
                try:
                    with open(f"{base}/{entry}/name") as f:
                        if f.read().strip() == name:
                            return f"/dev/{entry}"
                except OSError:
                    continue
        except FileNotFoundError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"virtio port {name!r} not found")
        time.sleep(0.01)


def errno_error(id: int, exc: OSError, op: str) -> bytes:
    code = errno.errorcode.get(exc.errno or 0, "EIO")
    return message(
        T.ERROR,
        id,
        code=code,
        errno=exc.errno or errno.EIO,
        message=f"{op}: {exc.strerror or exc}" + (f": {exc.filename!r}" if exc.filename else ""),
    )


SIOCGIFFLAGS, SIOCSIFFLAGS = 0x8913, 0x8914  # linux/sockios.h
SIOCSIFADDR, SIOCSIFNETMASK, SIOCADDRT, SIOCSIFMTU = 0x8916, 0x891C, 0x890B, 0x8922
IFF_UP, IFF_RUNNING = 0x1, 0x40
RTF_UP, RTF_GATEWAY = 0x1, 0x2


def _sockaddr_in(ip: str) -> bytes:
    return struct.pack("@H2s4s8s", socket.AF_INET, b"", socket.inet_aton(ip), b"")


def configure_interface(name: str, cidr: str, gateway: str, mtu: int = 1500) -> None:
    """MTU, address, link up and default route with ioctls: no iproute2 process to spawn at boot."""
    ip, _, bits = cidr.partition("/")
    mask = socket.inet_ntoa(((0xFFFFFFFF << (32 - int(bits or 24))) & 0xFFFFFFFF).to_bytes(4, "big"))
    ifname = name.encode()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        fcntl.ioctl(s, SIOCSIFMTU, struct.pack("16si20x", ifname, mtu))
        for dev in (b"lo", ifname):
            req = fcntl.ioctl(s, SIOCGIFFLAGS, struct.pack("16sh14x", dev, 0))
            flags = struct.unpack("16sh14x", req)[1]
            fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sh14x", dev, flags | IFF_UP | IFF_RUNNING))
        fcntl.ioctl(s, SIOCSIFADDR, struct.pack("16s16s8x", ifname, _sockaddr_in(ip)))
        fcntl.ioctl(s, SIOCSIFNETMASK, struct.pack("16s16s8x", ifname, _sockaddr_in(mask)))
        # struct rtentry (linux/route.h), native layout; rt_dev NULL: the kernel picks the device.
        route = struct.pack("@L16s16s16sHhLPhPLLH6x", 0, _sockaddr_in("0.0.0.0"), _sockaddr_in(gateway),
                            _sockaddr_in("0.0.0.0"), RTF_UP | RTF_GATEWAY, 0, 0, 0, 0, 0, 0, 0, 0)
        try:
            fcntl.ioctl(s, SIOCADDRT, route)
        except FileExistsError:
            pass


def _unread_bytes(fd: int) -> int:
    try:
        return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]
    except OSError:
        return 0


def _pty_input_pending(master: int) -> int:
    """Bytes typed into the terminal of ``master`` that its program has not read yet."""
    try:
        number = struct.unpack("I", fcntl.ioctl(master, TIOCGPTN, b"\0\0\0\0"))[0]
        slave = os.open(f"/dev/pts/{number}", os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return 0
    try:
        return _unread_bytes(slave)
    finally:
        os.close(slave)


def _terminal_waiting(master: int) -> bool:
    """Whether the foreground process group of ``master``'s terminal waits for input: none of
    its processes runs, and one sleeps where programs wait for input."""
    try:
        pgrp = os.tcgetpgrp(master)
    except OSError:
        return True
    waiting = False
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
            fields = stat[stat.rfind(b")") + 2:].split()
            if int(fields[2]) != pgrp:
                continue
            if fields[0] in (b"R", b"D"):
                return False
            with open(f"/proc/{entry}/wchan") as f:
                waiting = waiting or f.read().strip() in INPUT_WAITS
        except (OSError, ValueError, IndexError):
            continue
    return waiting


class Exec:
    """One running process and the byte streams that connect it to the host."""

    def __init__(self, agent: Agent, id: int, p: dict) -> None:
        self.agent = agent
        self.id = id
        self.pty = bool(p.get("pty"))
        self.want_stdin = bool(p.get("stdin"))
        window = int(p.get("window") or DEFAULT_WINDOW)
        self.credit: dict[int, int] = {T.STDOUT: window, T.STDERR: window}
        self.fds: dict[int, int] = {}  # fd -> stream type
        self.stdin_fd: int | None = None
        self.stdin_buf = bytearray()
        self.stdin_eof = False
        self.stdin_returned = 0  # credit owed back to the host for written stdin bytes
        self.pty_eof_at: float | None = None  # a ^D is owed: when the host closed stdin
        self.pty_quiet_since = time.monotonic()  # last write into the terminal (or the start)
        self.proc: subprocess.Popen | None = None
        self.status: int | None = None
        self.exited_at: float | None = None
        self.timed_out = False
        timeout = p.get("timeout")
        self.deadline = time.monotonic() + float(timeout) if timeout else None
        self.done = False
        self.orphaned = False  # its host went away (a restore): keep it running, drop its output
        self.cgroup: str | None = None  # its pids cgroup, when process limits are on

    # -- start -------------------------------------------------------------
    def start(self, p: dict) -> None:
        agent = self.agent
        user = p.get("user")
        env = agent.base_env(user)
        env.update(agent.system_env)
        env.update(agent.vm_env)
        env.update({str(k): str(v) for k, v in (p.get("env") or {}).items()})
        uid = gid = None
        if user is not None:
            pw = agent.lookup_user(user)
            uid, gid = pw.pw_uid, pw.pw_gid
        cwd = p.get("cwd") or env.get("HOME") or "/"
        if p.get("shell") is not None:
            argv = ["/bin/sh", "-c", str(p["shell"])]
        else:
            argv = [str(a) for a in p["argv"]]
        if not argv:
            raise ValueError("empty argv")
        extra: dict = {}
        if uid is not None:
            extra.update(user=uid, group=gid, extra_groups=[])
        try:
            with agent.limits.spawning() as self.cgroup:
                self._spawn(p, argv, env, cwd, extra)
        except BaseException:
            agent.limits.release(self.cgroup)
            raise

    def _spawn(self, p: dict, argv: list[str], env: dict[str, str], cwd: str, extra: dict) -> None:
        agent = self.agent
        if self.pty:
            master, slave = os.openpty()
            self._winsize(master, int(p.get("rows") or 24), int(p.get("cols") or 80))
            env.setdefault("TERM", "xterm-256color")

            def setctty() -> None:
                fcntl.ioctl(0, termios.TIOCSCTTY, 0)

            try:
                self.proc = subprocess.Popen(
                    argv, stdin=slave, stdout=slave, stderr=slave, cwd=cwd, env=env,
                    start_new_session=True, preexec_fn=setctty, close_fds=True, **extra,
                )
            finally:
                os.close(slave)
            os.set_blocking(master, False)
            self.fds[master] = T.STDOUT
            self.stdin_fd = master
        else:
            # Our own pipes (plain fds, not file objects) so closing them is ours alone.
            out_r, out_w = os.pipe2(os.O_CLOEXEC)
            err_r, err_w = os.pipe2(os.O_CLOEXEC)
            in_r, in_w = os.pipe2(os.O_CLOEXEC) if self.want_stdin else (subprocess.DEVNULL, -1)
            try:
                self.proc = subprocess.Popen(
                    argv, stdin=in_r, stdout=out_w, stderr=err_w, cwd=cwd, env=env,
                    start_new_session=True, close_fds=True, **extra,
                )
            except BaseException:
                for fd in (out_r, err_r, in_w):
                    if fd >= 0:
                        os.close(fd)
                raise
            finally:
                for fd in (out_w, err_w, in_r):
                    if fd >= 0:
                        os.close(fd)
            for fd, kind in ((out_r, T.STDOUT), (err_r, T.STDERR)):
                try:
                    fcntl.fcntl(fd, 1031, PIPE_SIZE)  # F_SETPIPE_SZ
                except OSError:
                    pass
                os.set_blocking(fd, False)
                self.fds[fd] = kind
            if in_w >= 0:
                os.set_blocking(in_w, False)
                self.stdin_fd = in_w
        agent.by_pid[self.proc.pid] = self
        for fd in self.fds:
            agent.watch_read(fd, self)
        agent.send(message(T.EXEC_STARTED, self.id, pid=self.proc.pid, stdin_window=STDIN_WINDOW))

    @staticmethod
    def _winsize(fd: int, rows: int, cols: int) -> None:
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    # -- events ------------------------------------------------------------
    def on_readable(self, fd: int) -> None:
        kind = self.fds.get(fd)
        if kind is None:
            return
        credit = self.credit[kind]
        if credit <= 0:
            self.agent.unwatch_read(fd)
            return
        try:
            data = os.read(fd, min(READ_CHUNK, credit))
            if self.pty:
                self.pty_quiet_since = time.monotonic()  # the program is still talking
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno != errno.EIO:  # EIO: PTY slave closed
                log(f"exec {self.id}: read: {exc}")
            data = b""
        if not data:
            self._close_fd(fd)
            self.maybe_finish()
            return
        if self.orphaned:
            return
        self.credit[kind] -= len(data)
        self.agent.send(message(kind, self.id, data))
        if self.credit[kind] <= 0:
            self.agent.unwatch_read(fd)

    def on_writable(self, fd: int) -> None:
        self.flush_stdin()

    def orphan(self) -> None:
        """Detach from the host that started us: the process runs on, its output is discarded."""
        self.orphaned = True
        self.credit = {T.STDOUT: 1 << 62, T.STDERR: 1 << 62}
        for fd in self.fds:
            self.agent.watch_read(fd, self)
        if self.agent.execs.get(self.id) is self:
            del self.agent.execs[self.id]

    def add_credit(self, p: dict) -> None:
        for key, kind in (("stdout", T.STDOUT), ("stderr", T.STDERR)):
            n = int(p.get(key) or 0)
            if n > 0:
                was = self.credit[kind]
                self.credit[kind] += n
                if was <= 0:
                    for fd, k in self.fds.items():
                        if k == kind:
                            self.agent.watch_read(fd, self)

    def stdin_data(self, data: bytes) -> None:
        if self.stdin_fd is None or self.stdin_eof:
            return
        if len(self.stdin_buf) + len(data) > STDIN_WINDOW * 2:
            log(f"exec {self.id}: host exceeded stdin credit; dropping {len(data)} bytes")
            return
        self.stdin_buf += data
        self.flush_stdin()

    def stdin_close(self) -> None:
        self.stdin_eof = True
        self.flush_stdin()

    def flush_stdin(self) -> None:
        fd = self.stdin_fd
        if fd is None:
            return
        while self.stdin_buf:
            try:
                n = os.write(fd, self.stdin_buf[:65536])
            except BlockingIOError:
                self.agent.watch_write(fd, self)
                return
            except OSError:  # reader went away: discard what is left
                self.stdin_returned += len(self.stdin_buf)
                self.stdin_buf.clear()
                break
            del self.stdin_buf[:n]
            self.stdin_returned += n
            self.pty_quiet_since = time.monotonic()
        self.agent.unwatch_write(fd)
        if self.stdin_returned:
            self.agent.send(message(T.CREDIT, self.id, stdin=self.stdin_returned))
            self.stdin_returned = 0
        if self.stdin_eof:
            if self.pty:
                self.stdin_eof = False  # only one ^D per close
                self.want_stdin = False
                self.pty_eof_at = time.monotonic()
                self.send_pty_eof(self.pty_eof_at)
            else:
                self.agent.unwatch_write(fd)
                try:
                    os.close(fd)
                except OSError:
                    pass
                self.stdin_fd = None

    def signal(self, signum: int) -> None:
        if self.proc is None or self.status is not None:
            return
        try:
            os.killpg(self.proc.pid, signum)
        except OSError:
            try:
                os.kill(self.proc.pid, signum)
            except OSError:
                pass

    def resize(self, rows: int, cols: int) -> None:
        if self.pty and self.fds:
            fd = next(iter(self.fds))
            try:
                self._winsize(fd, rows, cols)
            except OSError:
                pass

    def on_exit(self, status: int) -> None:
        self.status = status
        self.exited_at = time.monotonic()
        self.maybe_finish()

    def send_pty_eof(self, now: float) -> None:
        """Write the owed ^D once the program has read its input and the terminal is quiet."""
        fd = self.stdin_fd
        if self.pty_eof_at is None or fd is None:
            return
        settled = (now - self.pty_quiet_since >= PTY_EOF_SETTLE and not _pty_input_pending(fd)
                   and _terminal_waiting(fd))
        if settled or now - self.pty_eof_at >= PTY_EOF_MAX_WAIT:
            self.pty_eof_at = None
            try:
                os.write(fd, b"\x04")
            except OSError:
                pass

    def next_timer(self, now: float) -> float | None:
        """Seconds until this exec needs :meth:`check_timers` (None: nothing pending)."""
        drain = PTY_DRAIN_SECONDS if self.pty else PIPE_DRAIN_SECONDS
        waits = [when - now for when in (self.deadline, (self.exited_at + drain) if self.exited_at else None)
                 if when is not None]
        if self.pty_eof_at is not None:
            waits.append(PTY_EOF_POLL)
        return max(0.0, min(waits)) if waits else None

    def check_timers(self, now: float) -> None:
        if self.pty_eof_at is not None and self.status is None:
            self.send_pty_eof(now)
        if self.status is None and self.deadline is not None and now >= self.deadline:
            self.timed_out = True
            self.deadline = None
            self.signal(signal.SIGKILL)
        if self.status is not None and self.exited_at is not None and not self.done:
            limit = PTY_DRAIN_SECONDS if self.pty else PIPE_DRAIN_SECONDS
            if now - self.exited_at < limit:
                return
            # The process is gone but something (a background child) holds its output open. Cut
            # the streams only once they hold no unread bytes: output the process wrote before it
            # exited is never dropped, however long the host takes to grant credit for it.
            if any(_unread_bytes(fd) for fd in self.fds):
                self.exited_at = now - limit + DRAIN_RECHECK_SECONDS
                return
            for fd in list(self.fds):
                self._close_fd(fd)
            self.maybe_finish()

    def _close_fd(self, fd: int) -> None:
        self.agent.unwatch_read(fd)
        self.fds.pop(fd, None)
        if fd == self.stdin_fd:
            self.agent.unwatch_write(fd)
            self.stdin_fd = None
        try:
            os.close(fd)
        except OSError:
            pass

    def maybe_finish(self) -> None:
        if self.done or self.status is None or self.fds:
            return
        self.done = True
        self.agent.limits.release(self.cgroup)
        if self.stdin_fd is not None:
            self.agent.unwatch_write(self.stdin_fd)
            try:
                os.close(self.stdin_fd)
            except OSError:
                pass
            self.stdin_fd = None
        st = self.status
        if os.WIFSIGNALED(st):
            sig = os.WTERMSIG(st)
            code, signame = 128 + sig, sig
        else:
            code, signame = os.WEXITSTATUS(st), None
        if self.orphaned:
            return
        self.agent.send(message(T.EXIT, self.id, exit_code=code, signal=signame, timed_out=self.timed_out))
        if self.agent.execs.get(self.id) is self:
            del self.agent.execs[self.id]


SHM_PCI_ID = ("0x1af4", "0x1110")  # ivshmem: the host's bulk-transfer region (gondolin/shm.py)
SHM_CHUNK = 1024 * 1024  # bytes announced by one FILE_SHM message at most
SHM_MIN_FILE = 256 * 1024  # smaller files are sent inline even when the host offers a slot


class SharedRegion:
    """The ivshmem device's memory (BAR 2), mapped from sysfs: the host maps the same pages."""

    def __init__(self) -> None:
        self.view: memoryview | None = None
        self.size = 0

    def map(self) -> int:
        """Map the device (once); its size, or 0 when the VM has none."""
        if self.view is not None:
            return self.size
        for dev in sorted(glob.glob("/sys/bus/pci/devices/*")):
            try:
                with open(dev + "/vendor") as v, open(dev + "/device") as d:
                    if (v.read().strip(), d.read().strip()) != SHM_PCI_ID:
                        continue
                fd = os.open(dev + "/resource2", os.O_RDWR | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                size = os.fstat(fd).st_size
                self.view = memoryview(mmap.mmap(fd, size))
                self.size = size
            finally:
                os.close(fd)
            break
        return self.size

    def slot(self, spec: object) -> tuple[int, int]:
        """A host-named slot ``[offset, size]``, checked against the region."""
        if (not isinstance(spec, list) or len(spec) != 2 or not all(type(x) is int for x in spec)
                or self.view is None or spec[0] < 0 or spec[1] <= 0 or spec[0] + spec[1] > self.size):
            raise ValueError(f"bad shared-region slot {str(spec)[:40]}")
        return spec[0], spec[1]

    def span(self, slot: tuple[int, int], p: dict) -> memoryview:
        """The bytes a host ``FILE_SHM {off, len}`` names, checked to lie within ``slot``."""
        off, n = p.get("off"), p.get("len")
        if (type(off) is not int or type(n) is not int or n <= 0 or off < slot[0]
                or off + n > slot[0] + slot[1] or self.view is None):
            raise ValueError(f"bad shared-region span off={str(off)[:20]} len={str(n)[:20]}")
        return self.view[off:off + n]


class FileRead:
    def __init__(self, agent: Agent, id: int, p: dict) -> None:
        self.agent = agent
        self.id = id
        self.fd = os.open(agent.check_path(p["path"]), os.O_RDONLY | os.O_CLOEXEC)
        st = os.fstat(self.fd)
        if statmod.S_ISDIR(st.st_mode):
            os.close(self.fd)
            raise IsADirectoryError(errno.EISDIR, "Is a directory", p["path"])
        if p.get("offset"):
            os.lseek(self.fd, int(p["offset"]), os.SEEK_SET)
        self.remaining = int(p["length"]) if p.get("length") is not None else None
        self.credit = int(p.get("window") or DEFAULT_WINDOW)
        self.chunk = max(1024, min(int(p.get("chunk") or DATA_CHUNK), DATA_CHUNK))
        self.slot: tuple[int, int] | None = None  # shared-region ring for a large file
        self.pos = 0
        left = st.st_size - int(p.get("offset") or 0)
        if self.remaining is not None:
            left = min(left, self.remaining)
        big = left >= SHM_MIN_FILE or not statmod.S_ISREG(st.st_mode)  # a FIFO or device: size unknown
        if p.get("shm") is not None and big and agent.region.map():
            try:
                self.slot = agent.region.slot(p["shm"])
            except ValueError:
                os.close(self.fd)
                raise
            self.credit = self.slot[1]  # the host reads the slot as a ring within this credit
        agent.send(message(T.FILE_DONE, id, size=st.st_size, mode=st.st_mode, shm=self.slot is not None))

    def pump(self) -> bool:
        """Send at most one chunk. Returns False when there is nothing to do until more credit."""
        if self.credit <= 0:
            return False
        if self.slot is not None:
            return self.pump_shared(self.slot)
        n = min(self.chunk, self.credit)
        if self.remaining is not None:
            n = min(n, self.remaining)
        try:
            data = os.read(self.fd, n) if n > 0 else b""
        except OSError as exc:
            self.agent.send(errno_error(self.id, exc, "read"))
            self.close()
            return False
        if not data:
            self.agent.send(message(T.FILE_EOF, self.id))
            self.close()
            return False
        self.credit -= len(data)
        if self.remaining is not None:
            self.remaining -= len(data)
        self.agent.send(message(T.FILE_DATA, self.id, data))
        return self.credit > 0

    def pump_shared(self, slot: tuple[int, int]) -> bool:
        """Read the next piece straight into the region's ring; send only where it lies."""
        view = self.agent.region.view
        assert view is not None
        n = min(self.credit, SHM_CHUNK, slot[1] - self.pos)
        if self.remaining is not None:
            n = min(n, self.remaining)
        off = slot[0] + self.pos
        try:
            got = os.readv(self.fd, [view[off:off + n]]) if n > 0 else 0
        except OSError as exc:
            self.agent.send(errno_error(self.id, exc, "read"))
            self.close()
            return False
        if not got:
            self.agent.send(message(T.FILE_EOF, self.id))
            self.close()
            return False
        self.credit -= got
        if self.remaining is not None:
            self.remaining -= got
        self.pos = (self.pos + got) % slot[1]
        self.agent.send(message(T.FILE_SHM, self.id, off=off, len=got))
        return self.credit > 0

    def close(self) -> None:
        os.close(self.fd)
        self.agent.reads.pop(self.id, None)


class FileWrite:
    def __init__(self, agent: Agent, id: int, p: dict) -> None:
        self.agent = agent
        self.id = id
        path = agent.check_path(p["path"])
        flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC
        flags |= os.O_APPEND if p.get("append") else os.O_TRUNC
        mode = int(p["mode"]) if p.get("mode") is not None else 0o644
        if p.get("parents"):
            os.makedirs(os.path.dirname(path) or "/", exist_ok=True)
        self.fd = os.open(path, flags, mode)
        if p.get("mode") is not None:
            os.fchmod(self.fd, mode)
        if p.get("user") is not None:
            pw = agent.lookup_user(p["user"])
            os.fchown(self.fd, pw.pw_uid, pw.pw_gid)
        self.size = 0
        self.pending_credit = 0
        self.error: OSError | None = None
        self.slot: tuple[int, int] | None = None
        if p.get("shm") is not None:
            try:
                if not agent.region.map():
                    raise OSError(errno.ENODEV, "the host offered its bulk-transfer region, but this VM has none")
                self.slot = agent.region.slot(p["shm"])
            except (OSError, ValueError):
                os.close(self.fd)
                raise

    def shared(self, p: dict) -> None:
        """Bytes the host placed in the region (FILE_SHM): write them, then return the credit
        at once (the host reuses the ring only within the credit)."""
        if self.slot is None:
            raise ValueError("FILE_SHM for a write that has no shared-region slot")
        self.data(self.agent.region.span(self.slot, p), flush_credit=True)

    def data(self, data: bytes | memoryview, flush_credit: bool = False) -> None:
        if self.error is None:
            try:
                view = memoryview(data)
                while view:
                    n = os.write(self.fd, view)
                    view = view[n:]
                self.size += len(data)
            except OSError as exc:
                self.error = exc
        self.pending_credit += len(data)
        if self.pending_credit >= DEFAULT_WINDOW // 4 or flush_credit:
            self.agent.send(message(T.CREDIT, self.id, file=self.pending_credit))
            self.pending_credit = 0

    def finish(self) -> None:
        self.agent.writes.pop(self.id, None)
        try:
            os.close(self.fd)
        except OSError as exc:
            self.error = self.error or exc
        if self.error is not None:
            self.agent.send(errno_error(self.id, self.error, "write"))
        else:
            self.agent.send(message(T.FILE_DONE, self.id, size=self.size))


class TcpStream:
    """One host connection to a guest loopback port: socket bytes go to the host within the
    credit it granted; host bytes are buffered (at most TCP_WINDOW) until the socket takes them."""

    def __init__(self, agent: Agent, id: int, p: dict) -> None:
        host, port = p.get("host"), p.get("port")
        family = TCP_HOSTS.get(host) if isinstance(host, str) else None
        if family is None:
            raise ValueError(f"only guest loopback (127.0.0.1, ::1) is reachable, not {str(host)[:64]!r}")
        if not isinstance(port, int) or not 0 < port < 65536:
            raise ValueError(f"bad port {str(port)[:16]!r}")
        if len(agent.streams) >= MAX_TCP_STREAMS:
            raise OSError(errno.EMFILE, f"the guest already has {MAX_TCP_STREAMS} host connections")
        self.agent = agent
        self.id = id
        self.credit = max(0, int(p.get("window") or DEFAULT_WINDOW))  # bytes we may send the host
        self.out = bytearray()  # host bytes the socket has not taken yet
        self.returned = 0  # credit owed back to the host for bytes the socket took
        self.host_eof = False  # the host sent TCP_EOF
        self.shut = False  # our write side is shut (after the host's EOF was flushed)
        self.eof = False  # the socket said EOF and the host was told
        self.connected = False
        self.sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        self.fd = self.sock.fileno()
        try:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sock.connect((host, port))
        except BlockingIOError:
            agent.watch_write(self.fd, self)  # connecting: writable when done
        except OSError:
            self.sock.close()
            raise
        else:
            self.opened()
        agent.streams[id] = self

    def opened(self) -> None:
        self.connected = True
        self.agent.send(message(T.TCP_OPENED, self.id, window=TCP_WINDOW))
        if self.credit > 0:
            self.agent.watch_read(self.fd, self)
        self.flush()

    def on_writable(self, fd: int) -> None:
        if not self.connected:
            self.agent.unwatch_write(fd)
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.agent.send(errno_error(self.id, OSError(err, os.strerror(err)), "connect"))
                self.close(notify=False)
            else:
                self.opened()
            return
        self.flush()

    def on_readable(self, fd: int) -> None:
        if self.credit <= 0 or self.eof:
            self.agent.unwatch_read(fd)
            return
        try:
            data = self.sock.recv(min(READ_CHUNK, DATA_CHUNK, self.credit))
        except BlockingIOError:
            return
        except OSError as exc:
            self.close(error=f"read: {exc.strerror or exc}")
            return
        if not data:
            self.eof = True
            self.agent.unwatch_read(fd)
            self.agent.send(message(T.TCP_EOF, self.id))
            self.maybe_done()
            return
        self.credit -= len(data)
        # Acknowledge at once: a guest server that writes a reply in two pieces (headers, then
        # body, as http.server does) would otherwise wait for our delayed ACK under Nagle (~40 ms).
        try:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        except OSError:
            pass
        self.agent.send(message(T.TCP_DATA, self.id, data))
        if self.credit <= 0:
            self.agent.unwatch_read(fd)

    def add_credit(self, n: int) -> None:
        if n > 0:
            self.credit += n
            if self.connected and not self.eof:
                self.agent.watch_read(self.fd, self)

    def data(self, data: bytes) -> None:
        if self.host_eof:
            return
        if len(self.out) + len(data) > TCP_WINDOW:
            self.close(error="the host sent more than the credit the guest granted")
            return
        self.out += data
        self.flush()

    def host_end(self) -> None:
        self.host_eof = True
        self.flush()

    def flush(self) -> None:
        if not self.connected:
            return
        while self.out:
            try:
                n = self.sock.send(self.out[:READ_CHUNK])
            except BlockingIOError:
                break
            except OSError as exc:
                self.close(error=f"write: {exc.strerror or exc}")
                return
            del self.out[:n]
            self.returned += n
        if self.out:
            self.agent.watch_write(self.fd, self)
        else:
            self.agent.unwatch_write(self.fd)
        if self.returned and (not self.out or self.returned >= TCP_WINDOW // 4):
            self.agent.send(message(T.CREDIT, self.id, tcp=self.returned))
            self.returned = 0
        if self.host_eof and not self.out and not self.shut:
            self.shut = True
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            self.maybe_done()

    def maybe_done(self) -> None:
        if self.eof and self.shut:
            self.close()

    def close(self, *, notify: bool = True, error: str | None = None) -> None:
        """Drop the stream; ``notify`` tells the host (TCP_CLOSE, with ``error`` for an abort)."""
        if self.agent.streams.get(self.id) is self:
            del self.agent.streams[self.id]
        self.agent.unwatch_read(self.fd)
        self.agent.unwatch_write(self.fd)
        self.sock.close()
        if notify:
            self.agent.send(message(T.TCP_CLOSE, self.id, error=error) if error else message(T.TCP_CLOSE, self.id))


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _mount_users(mounts: list[str], limit: int = 8) -> list[str]:
    """Processes whose working directory or open files are under ``mounts`` (for an error)."""
    out: list[str] = []
    roots = tuple(m.rstrip("/") + "/" for m in mounts)

    def under(path: str) -> bool:
        return (path.rstrip("/") + "/").startswith(roots)

    for pid in _listdir("/proc"):
        if not pid.isdigit() or len(out) >= limit:
            continue
        what = []
        try:
            if under(os.readlink(f"/proc/{pid}/cwd")):
                what.append("working directory")
            for fd in _listdir(f"/proc/{pid}/fd"):
                try:
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if under(target):
                    what.append(f"open {target}")
                    break
            if what:
                with open(f"/proc/{pid}/comm") as f:
                    out.append(f"pid {pid} ({f.read().strip()}: {', '.join(what)})")
        except OSError:
            continue
    return out


def _copy_fd(src: int, dst: int, offset: int | None, length: int) -> int:
    """Copy up to ``length`` bytes from ``src`` (at ``offset``, or its position) to ``dst`` in
    the kernel (sendfile), falling back to read/write where sendfile refuses (O_APPEND)."""
    done = 0
    try:
        while done < length:
            n = os.sendfile(dst, src, None if offset is None else offset + done, min(length - done, 1 << 30))
            if n == 0:
                return done
            done += n
        return done
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOSYS) or done:
            raise
    if offset is not None:
        os.lseek(src, offset, os.SEEK_SET)
    while done < length:
        data = os.read(src, min(length - done, 1 << 20))
        if not data:
            break
        view = memoryview(data)
        while view:
            view = view[os.write(dst, view):]
        done += len(data)
    return done


def load_virtiofs_driver() -> None:
    """Load the guest kernel's virtiofs driver (once: a hot-plugged device binds to it)."""
    if not os.path.isdir("/sys/module/virtiofs"):
        subprocess.run(["/sbin/modprobe", "virtiofs"], capture_output=True, timeout=20)


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


class ProcessLimits:
    """Each exec's processes in a cgroup of their own whose ``pids.max`` is the host's
    ``pids_max``: a fork bomb runs out of process slots in its own cgroup, while the agent (in a
    cgroup of its own, weighted to win the CPU) keeps forking for later execs.

    A child is born in its parent's cgroup, so the agent steps into the exec's cgroup for the
    fork and straight back out (it is single-threaded: nothing else forks meanwhile).
    """

    def __init__(self) -> None:
        self.pids_max: int | None = None
        self.ready = False
        self._count = 0
        self._leftover: list[str] = []  # exec cgroups still holding background processes

    def configure(self, pids_max: int | None) -> None:
        if pids_max is not None and pids_max < 1:
            raise ValueError("pids_max must be positive")
        self.pids_max = pids_max
        if pids_max is not None and not self.ready:
            self._setup()

    def _setup(self) -> None:
        os.makedirs(CGROUP_ROOT, exist_ok=True)
        if not os.path.exists(CGROUP_ROOT + "/cgroup.controllers"):
            libc = ctypes.CDLL(None, use_errno=True)
            flags = MS_NOSUID | MS_NODEV | MS_NOEXEC
            # favordynmods (Linux 6.0+): moving a process between cgroups, which every exec does
            # twice, no longer waits for an RCU grace period (tens of ms under TCG).
            if (libc.mount(b"cgroup2", CGROUP_ROOT.encode(), b"cgroup2", flags, b"favordynmods") != 0
                    and libc.mount(b"cgroup2", CGROUP_ROOT.encode(), b"cgroup2", flags, None) != 0):
                raise OSError(ctypes.get_errno(), "cannot mount cgroup2")
        with open(CGROUP_ROOT + "/cgroup.controllers") as f:
            available = f.read().split()
        if "pids" not in available:
            raise OSError(errno.ENOTSUP, "the guest kernel has no pids cgroup controller")
        wanted = " ".join("+" + c for c in ("pids", "cpu") if c in available)
        for path in (AGENT_CGROUP, EXEC_CGROUP):
            os.makedirs(path, exist_ok=True)
        _write(AGENT_CGROUP + "/cgroup.procs", str(os.getpid()))
        _write(CGROUP_ROOT + "/cgroup.subtree_control", wanted)
        _write(EXEC_CGROUP + "/cgroup.subtree_control", wanted)
        if "cpu" in available:
            _write(AGENT_CGROUP + "/cpu.weight", str(AGENT_CPU_WEIGHT))
            _write(EXEC_CGROUP + "/cpu.weight", str(EXEC_CPU_WEIGHT))
        self.ready = True

    @contextlib.contextmanager
    def spawning(self):  # type: ignore[no-untyped-def]
        """Around one exec's fork: yields its cgroup's path (None when limits are off)."""
        if not self.ready or self.pids_max is None:
            yield None
            return
        self._count += 1
        path = f"{EXEC_CGROUP}/{self._count}"
        os.makedirs(path, exist_ok=True)
        _write(path + "/pids.max", str(self.pids_max))
        _write(path + "/cgroup.procs", str(os.getpid()))
        try:
            yield path
        finally:
            _write(AGENT_CGROUP + "/cgroup.procs", str(os.getpid()))

    def release(self, path: str | None) -> None:
        """Remove an exec's cgroup once its processes are gone (else retry at later releases)."""
        pending = self._leftover + ([path] if path else [])
        self._leftover = []
        for p in pending:
            try:
                os.rmdir(p)
            except FileNotFoundError:
                pass
            except OSError:
                self._leftover.append(p)


class Agent:
    def __init__(self, port: str) -> None:
        self.fd = os.open(port, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        self.sel = selectors.DefaultSelector()
        self.decoder = FrameDecoder()
        self.out = bytearray()
        self.execs: dict[int, Exec] = {}
        self.by_pid: dict[int, Exec] = {}
        self.reads: dict[int, FileRead] = {}
        self.region = SharedRegion()
        self.writes: dict[int, FileWrite] = {}
        self.streams: dict[int, TcpStream] = {}
        self.vm_env: dict[str, str] = {}
        self._login_env: dict[str, str] | None = None
        self._login_proc: subprocess.Popen | None = None
        self._read_watch: dict[int, object] = {}
        self._write_watch: dict[int, object] = {}
        self.writing = False
        self._read_bufs = [bytearray(PORT_READ_PIECE) for _ in range(PORT_READ_PIECES)]
        self.system_env: dict[str, str] = {}  # set by configure (CA bundle paths, ...)
        self.network_ready = False
        self.ca_mounted = False
        self.ca_pem = ""
        self.system_bundle: str | None = None
        self.fuse_proc: subprocess.Popen | None = None
        self.fuse_mounts: list[str] = []
        self.virtiofs = False  # the mounts come from the virtiofs device, not the FUSE daemon
        self.limits = ProcessLimits()
        rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.wake_r = rfd
        signal.set_wakeup_fd(wfd)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        self.sel.register(self.fd, selectors.EVENT_READ, "control")
        self.sel.register(self.wake_r, selectors.EVENT_READ, "wake")

    # -- environment -------------------------------------------------------
    def start_login_shell(self) -> None:
        """Start the login shell whose environment execs use, in parallel with the boot handshake."""
        try:
            self._login_proc = subprocess.Popen(
                ["/bin/sh", "-lc", "exec env -0"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL, cwd="/",
                env={"HOME": "/root", "USER": "root", "LOGNAME": "root", "SHELL": "/bin/bash",
                     "PATH": DEFAULT_PATH, "TERM": "dumb"},
            )
        except OSError as exc:
            log(f"login environment: {exc}")
            self._login_proc = None

    def login_env(self) -> dict[str, str]:
        """The environment a login shell sets up, computed once (a login shell per exec is slow)."""
        if self._login_env is None:
            env = {"PATH": DEFAULT_PATH}
            proc = self._login_proc
            if proc is None:
                self.start_login_shell()
                proc = self._login_proc
            if proc is not None and proc.stdout is not None:
                try:
                    out = proc.stdout.read()
                finally:
                    proc.stdout.close()
                    try:
                        proc.wait(timeout=20)
                    except (subprocess.SubprocessError, ChildProcessError):
                        pass
                for item in out.split(b"\0"):
                    k, sep, v = item.decode(errors="replace").partition("=")
                    if sep and k not in ("PWD", "SHLVL", "_", "OLDPWD", "TERM"):
                        env[k] = v
            env.setdefault("LANG", "C.UTF-8")
            self._login_env = env
        return self._login_env

    def lookup_user(self, user: object) -> pwd.struct_passwd:
        try:
            if isinstance(user, int) or (isinstance(user, str) and user.isdigit()):
                return pwd.getpwuid(int(user))
            return pwd.getpwnam(str(user))
        except KeyError:
            raise LookupError(f"no such user in the guest: {user!r}") from None

    def base_env(self, user: object) -> dict[str, str]:
        env = dict(self.login_env())
        pw = self.lookup_user(user if user is not None else 0)
        env.update(HOME=pw.pw_dir, USER=pw.pw_name, LOGNAME=pw.pw_name, SHELL=pw.pw_shell or "/bin/sh")
        if pw.pw_uid != 0:
            env["PATH"] = "/usr/local/bin:/usr/bin:/bin"
        # Where `pip install` puts a user's scripts (non-root users install to ~/.local), as
        # Debian's ~/.profile would once the directory exists.
        env["PATH"] = f"{pw.pw_dir}/.local/bin:{env.get('PATH', '/usr/bin:/bin')}"
        return env

    @staticmethod
    def check_path(path: object) -> str:
        if not isinstance(path, str) or not path.startswith("/") or "\0" in path or len(path) > MAX_PATH:
            raise OSError(errno.EINVAL, "path must be an absolute path", str(path)[:200])
        return path

    # -- I/O plumbing ------------------------------------------------------
    def send(self, frame: bytes) -> None:
        self.out += frame
        self.flush()

    def flush(self) -> None:
        while self.out:
            try:
                view = memoryview(self.out)
                pieces = [view[i:i + PORT_WRITE_PIECE]
                          for i in range(0, min(len(view), PORT_WRITE_PIECE * PORT_WRITE_PIECES), PORT_WRITE_PIECE)]
                try:
                    n = os.writev(self.fd, pieces)
                finally:
                    del pieces
                    view.release()
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.ENXIO, errno.EPIPE):
                    break
                raise
            del self.out[:n]
        want = selectors.EVENT_READ | (selectors.EVENT_WRITE if self.out else 0)
        if bool(self.out) != self.writing:
            self.writing = bool(self.out)
            self.sel.modify(self.fd, want, "control")

    def watch_read(self, fd: int, owner: object) -> None:
        self._watch(fd, owner, self._read_watch)

    def unwatch_read(self, fd: int) -> None:
        self._unwatch(fd, self._read_watch)

    def watch_write(self, fd: int, owner: object) -> None:
        self._watch(fd, owner, self._write_watch)

    def unwatch_write(self, fd: int) -> None:
        self._unwatch(fd, self._write_watch)

    def _watch(self, fd: int, owner: object, table: dict[int, object]) -> None:
        if fd in table:
            return
        table[fd] = owner
        self._sync(fd)

    def _unwatch(self, fd: int, table: dict[int, object]) -> None:
        if table.pop(fd, None) is not None:
            self._sync(fd)

    def _sync(self, fd: int) -> None:
        events = (selectors.EVENT_READ if fd in self._read_watch else 0) | (
            selectors.EVENT_WRITE if fd in self._write_watch else 0
        )
        owner = self._read_watch.get(fd) or self._write_watch.get(fd)
        try:
            self.sel.get_key(fd)
            registered = True
        except KeyError:
            registered = False
        if not events:
            if registered:
                self.sel.unregister(fd)
        elif registered:
            self.sel.modify(fd, events, owner)
        else:
            self.sel.register(fd, events, owner)

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            ex = self.by_pid.pop(pid, None)
            if ex is not None:
                if ex.proc is not None:
                    ex.proc.returncode = status  # keep Popen from waiting on it again
                ex.on_exit(status)

    # -- messages ----------------------------------------------------------
    def handle(self, m: Message) -> None:
        t, id, p = m.t, m.id, m.p
        if t == T.STDIN:
            ex = self.execs.get(id)
            if ex:
                ex.stdin_data(m.data)
        elif t == T.FILE_DATA:
            w = self.writes.get(id)
            if w:
                w.data(m.data)
        elif t == T.FILE_SHM:
            w = self.writes.get(id)
            if w:
                self.guard(id, "write", lambda: w.shared(p))
        elif t == T.TCP_DATA:
            st = self.streams.get(id)
            if st:
                st.data(m.data)
        elif t == T.CREDIT:
            ex = self.execs.get(id)
            if ex:
                ex.add_credit(p)
            st = self.streams.get(id)
            if st:
                st.add_credit(int(p.get("tcp") or 0))
            r = self.reads.get(id)
            if r:
                r.credit += int(p.get("file") or 0)
        elif t == T.EXEC:
            self.start_exec(id, p)
        elif t == T.STDIN_EOF:
            ex = self.execs.get(id)
            if ex:
                ex.stdin_close()
        elif t == T.SIGNAL:
            ex = self.execs.get(id)
            if ex:
                ex.signal(int(p.get("signal") or signal.SIGKILL))
        elif t == T.RESIZE:
            ex = self.execs.get(id)
            if ex:
                ex.resize(int(p.get("rows") or 24), int(p.get("cols") or 80))
        elif t == T.FILE_EOF:
            w = self.writes.get(id)
            if w:
                w.finish()
        elif t == T.FILE_READ:
            self.guard(id, "open", lambda: self.reads.__setitem__(id, FileRead(self, id, p)))
        elif t == T.FILE_WRITE:
            def start() -> None:
                self.writes[id] = FileWrite(self, id, p)
                self.send(message(T.CREDIT, id, file=0))
            self.guard(id, "open", start)
        elif t == T.TCP_OPEN:
            if id in self.streams:
                self.send(message(T.ERROR, id, code="duplicate_id", message=f"stream id {id} is in use"))
            else:
                self.guard(id, "connect", lambda: TcpStream(self, id, p))
        elif t == T.TCP_EOF:
            st = self.streams.get(id)
            if st:
                st.host_end()
        elif t == T.TCP_CLOSE:
            st = self.streams.get(id)
            if st:
                st.close(notify=False)
        elif t in (T.STAT, T.LISTDIR, T.MKDIR, T.RENAME, T.REMOVE):
            self.guard(id, T(t).name.lower(), lambda: self.send(message(T.FILE_DONE, id, **self.fileop(t, p))))
        elif t == T.CONFIGURE:
            self.configure(id, p, m.data)
        elif t == T.PING:
            self.send(message(T.PONG, id, data=m.data))
        elif t == T.SHUTDOWN:
            os.sync()
            libc = ctypes.CDLL(None, use_errno=True)
            libc.reboot(0x4321FEDC)  # LINUX_REBOOT_CMD_POWER_OFF
        else:
            self.send(message(T.ERROR, id, code="unknown_message", message=f"unknown message type {t}"))

    def guard(self, id: int, op: str, fn) -> None:  # type: ignore[no-untyped-def]
        try:
            fn()
        except OSError as exc:
            self.send(errno_error(id, exc, op))
        except (LookupError, ValueError, TypeError, KeyError) as exc:
            self.send(message(T.ERROR, id, code="invalid_request", message=f"{op}: {exc}"))

    def start_exec(self, id: int, p: dict) -> None:
        if id in self.execs:
            self.send(message(T.ERROR, id, code="duplicate_id", message=f"exec id {id} is in use"))
            return
        ex = Exec(self, id, p)
        try:
            ex.start(p)
        except (FileNotFoundError, PermissionError, NotADirectoryError, IsADirectoryError) as exc:
            cwd = p.get("cwd")
            if cwd and exc.filename == cwd:
                what = f"working directory {cwd!r}"
            else:
                what = f"{exc.filename or (p.get('argv') or ['/bin/sh'])[0]!r}"
            msg = f"gondolin: cannot execute {what}: {exc.strerror}\n"
            self.send(message(T.EXEC_STARTED, id, pid=0, stdin_window=0))
            self.send(message(T.STDERR, id, msg.encode()))
            self.send(message(T.EXIT, id, exit_code=126 if isinstance(exc, PermissionError) else 127,
                              signal=None, timed_out=False, error=msg.strip()))
            return
        except (OSError, LookupError, ValueError, TypeError, KeyError, subprocess.SubprocessError) as exc:
            self.send(message(T.ERROR, id, code="exec_failed", message=f"cannot start process: {exc}"))
            return
        self.execs[id] = ex

    def fileop(self, t: int, p: dict) -> dict:
        if t == T.STAT:
            path = self.check_path(p["path"])
            st = os.stat(path) if p.get("follow", True) else os.lstat(path)
            return {
                "mode": st.st_mode, "size": st.st_size, "uid": st.st_uid, "gid": st.st_gid,
                "mtime_ns": st.st_mtime_ns, "atime_ns": st.st_atime_ns, "ctime_ns": st.st_ctime_ns,
                "nlink": st.st_nlink, "ino": st.st_ino,
            }
        if t == T.LISTDIR:
            entries = []
            with os.scandir(self.check_path(p["path"])) as it:
                for e in it:
                    kind = "dir" if e.is_dir(follow_symlinks=False) else (
                        "symlink" if e.is_symlink() else ("file" if e.is_file(follow_symlinks=False) else "other"))
                    entries.append([e.name, kind])
            entries.sort()
            return {"entries": entries}
        if t == T.MKDIR:
            path = self.check_path(p["path"])
            mode = int(p.get("mode") or 0o755)
            if p.get("parents"):
                os.makedirs(path, mode, exist_ok=bool(p.get("exist_ok", True)))
            else:
                os.mkdir(path, mode)
            return {}
        if t == T.RENAME:
            os.rename(self.check_path(p["src"]), self.check_path(p["dst"]))
            return {}
        if t == T.REMOVE:
            path = os.path.normpath(self.check_path(p["path"]))
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                if p.get("force"):
                    return {"removed": False}
                raise
            if statmod.S_ISDIR(st.st_mode):
                if p.get("recursive"):
                    if path == "/":
                        raise OSError(errno.EPERM, "refusing to remove /", path)
                    shutil.rmtree(path)
                else:
                    os.rmdir(path)
            else:
                os.unlink(path)
            return {"removed": True}
        raise ValueError(f"unknown file op {t}")

    def new_host(self, keep_mounts: bool = False) -> None:
        """A new host connection after a restore: the previous host's requests are gone. Their
        processes keep running (output discarded); file transfers and TCP streams in flight are dropped.
        ``keep_mounts``: the new host took over the FUSE session (same node and file ids), so
        the daemon and its mounts stay, and open files and working directories on them keep working."""
        for ex in list(self.execs.values()):
            ex.orphan()
        for r in list(self.reads.values()):
            r.close()
        for st in list(self.streams.values()):
            st.close(notify=False)
        for w in list(self.writes.values()):
            self.writes.pop(w.id, None)
            try:
                os.close(w.fd)
            except OSError:
                pass
        if keep_mounts and self.fuse_proc is not None and self.fuse_proc.poll() is None:
            return
        self.stop_mounts()

    def stop_mounts(self) -> None:
        """Drop the FUSE daemon and its mounts: the host that served them is gone, so every handle
        they hold is stale. The configure that follows mounts afresh from the new host."""
        proc, self.fuse_proc = self.fuse_proc, None
        virtiofs, self.virtiofs = self.virtiofs, False
        if proc is None and not virtiofs:
            return
        if proc is not None:
            try:
                proc.kill()
                proc.wait(timeout=5)
            except (OSError, subprocess.SubprocessError):
                pass
        libc = ctypes.CDLL(None, use_errno=True)
        for m in [*reversed(self.fuse_mounts), "/run/gondolin/fs"]:
            libc.umount2(m.encode(), 2)  # MNT_DETACH: busy mounts go once their users let go
        self.fuse_mounts = []

    def configure(self, id: int, p: dict, entropy: bytes) -> None:
        """Apply the host's configuration. Sent after every boot and every restore, possibly
        several times, so each step is idempotent."""
        errors = []
        if p.get("fs_detach"):  # before a save: the host unplugs the virtiofs device next
            self.send(message(T.CONFIGURED, id, errors=self.detach_virtiofs()))
            return
        if p.get("new_host"):
            self.new_host(keep_mounts=bool(p.get("keep_mounts")))
        if p.get("clock_ns"):
            try:
                time.clock_settime_ns(time.CLOCK_REALTIME, int(p["clock_ns"]))
            except OSError as exc:
                errors.append(f"clock: {exc}")
        if entropy:
            try:
                fd = os.open("/dev/urandom", os.O_WRONLY)
                try:
                    info = struct.pack("ii", len(entropy) * 8, len(entropy)) + entropy
                    fcntl.ioctl(fd, RNDADDENTROPY, info)
                except OSError:
                    os.write(fd, entropy)  # mixes in without crediting
                try:
                    # Without this a restored clone keeps the CRNG state of its template until the
                    # kernel's next scheduled reseed: two clones would read the same bytes.
                    fcntl.ioctl(fd, RNDRESEEDCRNG)
                except OSError as exc:
                    errors.append(f"entropy reseed: {exc}")
                finally:
                    os.close(fd)
            except OSError as exc:
                errors.append(f"entropy: {exc}")
        if p.get("hostname"):
            try:
                socket.sethostname(str(p["hostname"]))
            except OSError as exc:
                errors.append(f"hostname: {exc}")
        if p.get("network"):
            try:
                self.setup_network(p["network"])
            except (OSError, subprocess.SubprocessError, ValueError) as exc:
                errors.append(f"network: {exc}")
        if p.get("ca_pem"):
            try:
                self.install_ca(str(p["ca_pem"]))
            except OSError as exc:
                errors.append(f"ca: {exc}")
        if p.get("fs_transport") == "virtiofs" and not p.get("mounts"):
            load_virtiofs_driver()  # a template: its restored copies find the driver loaded
        if p.get("mounts"):
            try:
                if p.get("fs_transport") == "virtiofs":
                    self.start_virtiofs([str(m) for m in p["mounts"]], bool(p.get("fs_readonly")),
                                        float(p.get("fs_wait_s") or 20))
                else:
                    self.start_mounts([str(m) for m in p["mounts"]])
            except (OSError, subprocess.SubprocessError, RuntimeError) as exc:
                errors.append(f"mounts: {exc}")
        if "pids_max" in p:
            try:
                self.limits.configure(None if p["pids_max"] is None else int(p["pids_max"]))
            except (OSError, ValueError) as exc:
                errors.append(f"pids_max: {exc}")
        if "env" in p:
            self.vm_env = {str(k): str(v) for k, v in (p.get("env") or {}).items()}
        for path, content in (p.get("files") or {}).items():
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "w") as f:
                    f.write(content)
            except OSError as exc:
                errors.append(f"file {path}: {exc}")
        self.login_env()
        try:
            shm = self.region.map()  # the host sends large vm.fs transfers through it once it knows
        except (OSError, ValueError) as exc:
            shm = 0
            errors.append(f"shared region: {exc}")
        self.send(message(T.CONFIGURED, id, errors=errors, shm=shm))

    def setup_network(self, net: dict) -> None:
        """Static address on eth0 (no DHCP round trips at boot; the host stack also serves DHCP)."""
        if self.network_ready:  # set up before the template was saved
            return
        try:
            with open("/proc/sys/net/ipv6/conf/all/disable_ipv6", "w") as f:
                f.write("1")
        except OSError:
            pass
        mtu = int(net.get("mtu") or 1500)
        try:
            configure_interface("eth0", net["address"], net["gateway"], mtu)
        except OSError as exc:  # fall back to iproute2
            log(f"network ioctls failed ({exc}); using ip")
            script = (f"link set lo up\nlink set eth0 mtu {mtu}\nlink set eth0 up\n"
                      f"addr add {net['address']} dev eth0\n"
                      f"route add default via {net['gateway']}\n")
            out = subprocess.run(["/sbin/ip", "-batch", "-"], input=script.encode(), capture_output=True,
                                 timeout=20)
            if out.returncode != 0:
                raise ValueError(out.stderr.decode(errors="replace").strip() or "ip failed") from None
        self.network_ready = True

    def install_ca(self, pem: str) -> None:
        """Trust the host's interception CA: system bundle (bind-mounted, so a read-only root works)
        plus the environment variables common clients read."""
        bundle = "/etc/ssl/certs/ca-certificates.crt"
        ours = "/run/gondolin/ca-bundle.pem"
        if not self.ca_mounted or pem != self.ca_pem:  # a restored template may meet a new CA
            if self.system_bundle is None:  # read before our bind mount hides it
                try:
                    with open(bundle) as f:
                        self.system_bundle = f.read()
                except OSError:
                    self.system_bundle = ""
            system = self.system_bundle
            os.makedirs("/run/gondolin", exist_ok=True)
            with open(ours, "w") as f:  # same inode: the bind mount below shows the new content
                f.write(system.rstrip("\n") + "\n" + pem.strip() + "\n")
            os.chmod(ours, 0o644)
            self.ca_pem = pem
        if not self.ca_mounted:
            if os.path.exists(bundle):
                libc = ctypes.CDLL(None, use_errno=True)
                if libc.mount(ours.encode(), bundle.encode(), None, 4096, None) != 0:  # MS_BIND
                    raise OSError(ctypes.get_errno(), "bind mount of the CA bundle failed")
            self.ca_mounted = True
        for var in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS",
                    "GIT_SSL_CAINFO", "PIP_CERT"):
            self.system_env[var] = ours

    def start_virtiofs(self, mounts: list[str], readonly: bool, wait_s: float = 20.0) -> None:
        """Mount the host's virtiofs device (tag ``gondolin``) at /run/gondolin/fs and bind each
        mount point from it, as the FUSE daemon does (guest/fuse.py Daemon.bind_all): the
        kernel's own driver talks to the host, no daemon runs here. The host hot-plugs the device
        just before it sends the configuration, so the mount is retried until the kernel has
        found the PCI device and bound the driver to it (the tag is unknown until then), for at
        most ``wait_s`` seconds."""
        if self.virtiofs:
            return
        hidden = "/run/gondolin/fs"
        load_virtiofs_driver()
        os.makedirs(hidden, exist_ok=True)
        libc = ctypes.CDLL(None, use_errno=True)
        flags = MS_NOSUID | MS_NODEV | (MS_RDONLY if readonly else 0)
        deadline = time.monotonic() + wait_s
        bound = "/sys/bus/virtio/drivers/virtiofs"  # a device's link appears once its probe registered the tag
        while not any(name.startswith("virtio") for name in _listdir(bound)):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the virtiofs device did not appear within {wait_s:.0f}s (hot-plugged by the "
                                   "host; no virtio device is bound to the virtiofs driver)")
            time.sleep(0.002)
        while libc.mount(b"gondolin", hidden.encode(), b"virtiofs", flags, None) != 0:
            err = ctypes.get_errno()
            if time.monotonic() > deadline:  # a device of an earlier attach may still be going away
                raise RuntimeError(f"cannot mount the virtiofs device: {os.strerror(err)}")
            time.sleep(0.01)
        self.virtiofs = True
        self.fuse_mounts = []
        for m in sorted({m.rstrip("/") or "/" for m in mounts}, key=len):
            os.makedirs(m, exist_ok=True)
            if libc.mount((hidden + m).encode(), m.encode(), None, MS_BIND, None) != 0:
                err = ctypes.get_errno()
                self.stop_mounts()
                raise RuntimeError(f"cannot bind {m} from the virtiofs device: {os.strerror(err)}")
            self.fuse_mounts.append(m)
        dev = os.stat(hidden).st_dev
        try:
            with open(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb", "w") as f:
                f.write(str(VIRTIOFS_READ_AHEAD_KB))
        except OSError as exc:
            log(f"virtiofs read-ahead stays at the default: {exc}")

    def detach_virtiofs(self) -> list[str]:
        """Unmount the virtiofs mounts (not lazily) so that the host can unplug the device for a
        save: a mount cannot move to the device plugged in afterwards (the kernel answers its
        requests with ENOTCONN once its device is gone). When something still uses a mount (an
        open file, a working directory) nothing is unmounted and the errors say who."""
        if not self.virtiofs:
            return []
        libc = ctypes.CDLL(None, use_errno=True)
        done: list[str] = []
        for m in [*reversed(self.fuse_mounts), "/run/gondolin/fs"]:
            if libc.umount2(m.encode(), 0) == 0:
                done.append(m)
                continue
            err = ctypes.get_errno()
            for back in reversed(done):  # bind back what was unmounted already
                if back == "/run/gondolin/fs":
                    continue
                libc.mount(("/run/gondolin/fs" + back).encode(), back.encode(), None, MS_BIND, None)
            users = _mount_users([*self.fuse_mounts, "/run/gondolin/fs"]) if err == errno.EBUSY else []
            return [f"mounts: {m} is in use ({os.strerror(err)})" + (": " + ", ".join(users) if users else "")]
        self.virtiofs = False
        self.fuse_mounts = []
        return []

    def start_mounts(self, mounts: list[str]) -> None:
        """Start the FUSE daemon serving ``mounts`` from the host over the fs port; wait until mounted."""
        if self.fuse_proc is not None and self.fuse_proc.poll() is None:
            return
        daemon = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fuse.py")
        if not os.path.exists(daemon):
            raise RuntimeError("this image has no FUSE daemon (guest/fuse.py); rebuild the image")
        subprocess.run(["/sbin/modprobe", "fuse"], capture_output=True, timeout=20)
        for m in mounts:
            os.makedirs(m, exist_ok=True)
        self.fuse_mounts = list(mounts)
        self.fuse_proc = subprocess.Popen(
            [sys.executable, "-S", "-E", "-u", daemon, "--port", "gondolin.fs", *[f"--mount={m}" for m in mounts]],
            start_new_session=True, close_fds=True,
        )
        self.by_pid.pop(self.fuse_proc.pid, None)
        deadline = time.monotonic() + 30
        while True:
            with open("/proc/self/mounts") as f:
                mounted = {line.split()[1] for line in f}
            if all(m.rstrip("/") in mounted for m in mounts):
                return
            if self.fuse_proc.poll() is not None:
                raise RuntimeError(f"FUSE daemon exited with {self.fuse_proc.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError("FUSE mounts did not appear within 30 s")
            time.sleep(0.01)

    # -- main loop ---------------------------------------------------------
    def run(self) -> None:
        self.start_login_shell()
        self.send(message(T.HELLO, 0, version=1, pid=os.getpid(), boot_ms=int(time.monotonic() * 1000)))
        while True:
            busy = [r for r in self.reads.values() if r.credit > 0]
            timeout: float | None = 0 if busy else None
            now = time.monotonic()
            for ex in self.execs.values():
                wait = ex.next_timer(now)
                if wait is not None:
                    timeout = wait if timeout is None else min(timeout, wait)
            try:
                events = self.sel.select(timeout)
            except InterruptedError:
                events = []
            for key, mask in events:
                owner = key.data
                if owner == "control":
                    if mask & selectors.EVENT_WRITE:
                        self.flush()
                    if mask & selectors.EVENT_READ:
                        self.read_control()
                elif owner == "wake":
                    try:
                        while os.read(self.wake_r, 4096):
                            pass
                    except BlockingIOError:
                        pass
                    self.reap()
                else:
                    ex = owner
                    if mask & selectors.EVENT_READ and key.fd in self._read_watch:
                        ex.on_readable(key.fd)  # type: ignore[attr-defined]
                    if mask & selectors.EVENT_WRITE and key.fd in self._write_watch:
                        ex.on_writable(key.fd)  # type: ignore[attr-defined]
            self.reap()
            for r in busy:
                if r.id in self.reads:
                    r.pump()
            now = time.monotonic()
            for ex in list(self.execs.values()):
                ex.check_timers(now)

    def read_control(self) -> None:
        bufs = self._read_bufs
        try:
            n = os.readv(self.fd, bufs)
        except BlockingIOError:
            return
        except OSError as exc:
            log(f"control port read: {exc}")
            time.sleep(0.05)
            return
        if not n:
            # Host side not connected (e.g. between a snapshot and its restore): wait for it.
            time.sleep(0.01)
            return
        full, rest = divmod(n, PORT_READ_PIECE)
        data = b"".join(bufs[:full]) + (bytes(bufs[full][:rest]) if rest else b"")
        try:
            self.decoder.feed(data)
            msgs = self.decoder.messages()
        except FrameError as exc:
            log(f"protocol error from host, resetting decoder: {exc}")
            self.send(message(T.ERROR, 0, code=exc.code, message=exc.message))
            self.decoder = FrameDecoder()
            return
        for m in msgs:
            self.handle(m)


EXT4_IOC_RESIZE_FS = 0x40086610  # _IOW('f', 16, __u64)


def grow_root() -> None:
    """``gondolin.disk=`` on the kernel command line (VMOptions.disk_size): grow the root ext4
    online to fill its disk, which the host made that large."""
    try:
        with open("/proc/cmdline") as f:
            if "gondolin.disk=" not in f.read():
                return
        with open("/sys/block/vda/size") as f:
            size = int(f.read()) * 512
        fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.ioctl(fd, EXT4_IOC_RESIZE_FS, struct.pack("Q", size // os.statvfs("/").f_frsize))
        finally:
            os.close(fd)
    except (OSError, ValueError) as exc:
        log(f"cannot grow the root file system: {exc!r}")


def main() -> None:
    grow_root()
    port = find_port(CONTROL_PORT_NAME)
    os.environ.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    agent = Agent(port)
    try:
        agent.run()
    except BaseException as exc:  # PID 1 must not exit quietly: say why, then the VM powers off
        log(f"fatal: {exc!r}")
        raise


if __name__ == "__main__":
    main()
