"""The client side: :class:`Cluster` starts sandboxes on a Ray cluster and hands back
:class:`ClusterVM` objects shaped like :class:`gondolin.VM`.

    cluster = gondolin.cluster.connect("ray://head:10001")
    async with cluster:
        sandbox = await cluster.create(memory="1G")
        print((await sandbox.exec("uname -a")).stdout)

Every call is one actor method call. Waiting on Ray happens in :func:`_resolve` and errors are
translated in :meth:`ClusterVM._answer`, nowhere else.
"""

from __future__ import annotations

import os
import signal as _signal
import weakref
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Unpack

import anyio
import sniffio

from ..errors import GondolinError, GuestFileError, VMClosedError
from ..exec import ExecResult, OutputChunk, stdout_lines
from ..fstypes import DirEntry, FileStat
from ..http.hooks import AuditEvent, Decision
from ..options import OptionChanges, VMOptions
from ..vm import Checkpoint
from ._actor import PART_SIZE, Boot, Facts, SandboxActor, SavedFile, prepare_node
from ._errors import ClusterError, Failure, SandboxLostError, rebuild, translate
from ._placement import (
    DEFAULT_NAMESPACE,
    VM_RESOURCE,
    Placement,
    Resources,
    actor_options,
    portable,
    sandbox_name,
)

QUEUE_TIMEOUT_S = 600.0  # how long create() waits for a node with a free VM slot, boot included


async def _resolve(ref: Any) -> Any:
    """The value of a Ray object ref, awaited without blocking the event loop."""
    import ray

    if sniffio.current_async_library() == "asyncio":
        return await ref
    return await anyio.to_thread.run_sync(ray.get, ref, abandon_on_cancel=True)


def _parts_of(data: bytes | bytearray | memoryview | str) -> Iterable[bytes]:
    raw = data.encode() if isinstance(data, str) else bytes(data)
    return (raw[i:i + PART_SIZE] for i in range(0, len(raw), PART_SIZE)) if raw else (b"",)


async def _put_parts(data: Any) -> list[Any]:
    """``data`` (bytes, str, or a (async) iterable of bytes) as object-store parts of at most
    :data:`PART_SIZE` bytes, owned by this process."""
    import ray

    refs: list[Any] = []
    if isinstance(data, (bytes, bytearray, memoryview, str)):
        return [ray.put(part) for part in _parts_of(data)]
    buf = bytearray()

    def take(chunk: bytes) -> None:
        buf.extend(chunk)
        while len(buf) >= PART_SIZE:
            refs.append(ray.put(bytes(buf[:PART_SIZE])))
            del buf[:PART_SIZE]

    if isinstance(data, AsyncIterable):
        async for chunk in data:
            take(chunk)
    else:
        for chunk in data:
            take(chunk)
    if buf or not refs:
        refs.append(ray.put(bytes(buf)))
    return refs


@dataclass(frozen=True)
class Node:
    """A live node that offers VM slots."""

    node_id: str
    address: str
    vm_slots: float


@dataclass(frozen=True)
class NodeReady:
    """One node after :meth:`Cluster.prepare`: ``restored_from`` is ``"template"`` when the
    node already had its warm template, None when it booted cold (and saved one)."""

    node_id: str
    seconds: float
    restored_from: str | None


@dataclass
class ClusterCheckpoint:
    """A checkpoint of a cluster sandbox: parts in Ray's object store (owned by this process,
    stored on the node that saved them until a resume elsewhere copies them), or a file on a
    path every node sees (``shared``). ``path`` is set when it was also written here."""

    size: int
    kind: str
    node_id: str
    cpus: int
    memory_mb: int
    parts: list[Any] = field(default_factory=list, repr=False)
    path: str | None = None
    shared: bool = False

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], *, shared: bool = False) -> ClusterCheckpoint:
        """A checkpoint file on this host (``shared=True``: at the same path on every node)."""
        import ray

        checkpoint = Checkpoint.load(path)
        h = checkpoint.header
        parts: list[Any] = []
        if not shared:
            with open(checkpoint.path, "rb") as f:
                while block := f.read(PART_SIZE):
                    parts.append(ray.put(block))
        return cls(checkpoint.size, h.kind, "", h.shape.cpus, h.shape.memory_mb, parts, str(checkpoint.path), shared)

    async def save(self, path: str | os.PathLike[str]) -> Checkpoint:
        """Write the checkpoint to a file on this host (a :class:`gondolin.Checkpoint`)."""
        target = Path(os.fspath(path))
        partial = target.with_name(target.name + ".partial")
        async with await anyio.open_file(partial, "wb") as f:
            for ref in self.parts:
                data = await _resolve(ref)
                if isinstance(data, Failure):
                    raise rebuild(data)
                await f.write(data)
        os.replace(partial, target)
        return await anyio.to_thread.run_sync(Checkpoint.load, target)

    def boot(self, options: VMOptions | None) -> Boot:
        if self.shared:
            return Boot(options=options, path=self.path, resume=True)
        return Boot(options=options, parts=list(self.parts), resume=True)


class Cluster:
    """Sandboxes on a Ray cluster. Get one with :func:`connect`; ``async with cluster`` closes
    the sandboxes it started (unnamed ones also end with this process, named ones do not).

    ``placement``: SPREAD across nodes by default. ``resources``: what each sandbox reserves
    (default: its vCPUs, its memory + overhead, one ``gondolin_vm`` slot). ``shared_dir``: a
    directory every node sees at the same path; checkpoints saved there skip the object store.
    """

    def __init__(self, *, namespace: str = DEFAULT_NAMESPACE, placement: Placement | None = None,
                 resources: Resources | None = None, shared_dir: str | os.PathLike[str] | None = None,
                 queue_timeout: float = QUEUE_TIMEOUT_S) -> None:
        self.namespace = namespace
        self.placement = placement or Placement()
        self.resources = resources or Resources()
        self.shared_dir = os.path.abspath(os.fspath(shared_dir)) if shared_dir is not None else None
        self.queue_timeout = queue_timeout
        self._owned: weakref.WeakSet[ClusterVM] = weakref.WeakSet()

    # -- what is there ------------------------------------------------------------------------------
    def nodes(self) -> list[Node]:
        """Live nodes that offer VM slots (the ``gondolin_vm`` resource)."""
        import ray

        return [Node(n["NodeID"], n.get("NodeManagerAddress", ""), float(n["Resources"][VM_RESOURCE]))
                for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get(VM_RESOURCE)]

    def names(self) -> list[str]:
        """Names of the named sandboxes that live in this cluster's namespace."""
        import ray.util

        found = ray.util.list_named_actors(all_namespaces=True)
        return sorted(name for a in found if a.get("namespace") == self.namespace
                      and (name := sandbox_name(a.get("name", ""))) is not None)

    # -- starting -----------------------------------------------------------------------------------
    async def create(self, options: VMOptions | None = None, /, *, name: str | None = None,
                     detached: bool | None = None, node: str | None = None, resources: Resources | None = None,
                     **changes: Unpack[OptionChanges]) -> ClusterVM:
        """Start a sandbox (the options of :meth:`gondolin.VM.create`) in its own actor.

        ``name`` makes it findable with :meth:`get` from any process; a named sandbox is
        ``detached`` by default (it outlives this process until closed). ``node`` pins it to a
        node id; otherwise the cluster's placement applies."""
        opts = portable(VMOptions.from_kwargs(options, **changes).checked())
        return await self._start(opts, Boot(options=opts), name=name, detached=detached, node=node,
                                 resources=resources)

    async def resume(self, checkpoint: ClusterCheckpoint | str | os.PathLike[str], options: VMOptions | None = None,
                     /, *, name: str | None = None, detached: bool | None = None, node: str | None = None,
                     resources: Resources | None = None, **changes: Unpack[OptionChanges]) -> ClusterVM:
        """Start a sandbox from a checkpoint, on any node (``node`` to choose one): a
        :class:`ClusterCheckpoint`, or the path of a checkpoint file on this host (under
        ``shared_dir``: read there by the node itself). ``options`` as for
        :meth:`gondolin.Checkpoint.resume`."""
        if not isinstance(checkpoint, ClusterCheckpoint):
            path = os.path.abspath(os.fspath(checkpoint))
            checkpoint = await anyio.to_thread.run_sync(
                lambda: ClusterCheckpoint.from_file(path, shared=self._is_shared(path)))
        opts = None
        if options is not None or changes:
            opts = portable(VMOptions.from_kwargs(options, **changes))
        shape = VMOptions(cpus=checkpoint.cpus, memory=checkpoint.memory_mb)
        return await self._start(shape, checkpoint.boot(opts), name=name, detached=detached, node=node,
                                 resources=resources)

    def _is_shared(self, path: str) -> bool:
        return self.shared_dir is not None and (path + "/").startswith(self.shared_dir.rstrip("/") + "/")

    async def _start(self, sizing: VMOptions, boot: Boot, *, name: str | None, detached: bool | None,
                     node: str | None, resources: Resources | None) -> ClusterVM:
        import ray

        if not self.nodes():
            raise ClusterError(f"no live node offers VM slots: start nodes with "
                               f"`ray start --resources '{{\"{VM_RESOURCE}\": N}}'`", code="unschedulable")
        kwargs = actor_options(sizing, resources or self.resources, name=name, namespace=self.namespace,
                               detached=name is not None if detached is None else detached)
        kwargs["scheduling_strategy"] = self._strategy(node)
        try:
            actor: Any = ray.remote(SandboxActor).options(**kwargs).remote()
        except ValueError as exc:
            if name is not None and "already" in str(exc):
                raise ClusterError(f"a sandbox named {name!r} already exists in namespace {self.namespace!r}",
                                   code="name_taken") from None
            raise
        vm = ClusterVM(self, actor, None, name=name)
        try:
            with anyio.fail_after(self.queue_timeout):
                facts = await vm._answer(actor.boot.remote(boot), "starting the sandbox")
        except TimeoutError:
            ray.kill(actor, no_restart=True)
            raise ClusterError(f"no node started the sandbox within {self.queue_timeout:g}s (are all "
                               f"{VM_RESOURCE} slots taken?)", code="unschedulable") from None
        except BaseException:
            ray.kill(actor, no_restart=True)
            raise
        vm._facts = facts
        vm._options = boot.options
        if not kwargs.get("lifetime"):
            self._owned.add(vm)
        return vm

    def _strategy(self, node: str | None) -> Any:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        node = node or self.placement.node
        if node is not None:
            return NodeAffinitySchedulingStrategy(node, soft=False)
        return self.placement.strategy

    async def get(self, name: str) -> ClusterVM:
        """The named sandbox ``name`` (started by any process)."""
        import ray

        from ._placement import actor_name

        try:
            actor = ray.get_actor(actor_name(name), namespace=self.namespace)
        except ValueError:
            raise ClusterError(f"no sandbox named {name!r} in namespace {self.namespace!r}",
                               code="sandbox_not_found") from None
        vm = ClusterVM(self, actor, None, name=name)
        vm._facts = await vm._answer(actor.facts.remote(), f"finding sandbox {name!r}")
        return vm

    async def prepare(self, options: VMOptions | None = None, /, **changes: Unpack[OptionChanges]) -> list[NodeReady]:
        """Give every node its image and warm template for ``options`` (one VM per node, started
        and closed), so that no sandbox pays for a cold boot there. Nodes that had them take
        a warm start."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        opts = portable(VMOptions.from_kwargs(options, **changes).checked())
        task = ray.remote(prepare_node)
        refs = [task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n.node_id, soft=False),
                             max_retries=0, **self.resources.actor_resources(opts)).remote(opts)
                for n in self.nodes()]
        out = []
        for ref in refs:
            try:
                node_id, seconds, how = await _resolve(ref)
            except Exception as exc:
                err = translate(exc, "preparing a node")
                raise err from (None if err is exc else exc)
            out.append(NodeReady(node_id, seconds, how))
        return out

    # -- lifetime ----------------------------------------------------------------------------------
    async def close(self) -> None:
        """Close every sandbox this client started that is not detached."""
        with anyio.CancelScope(shield=True):
            for vm in list(self._owned):
                await vm.discard()

    async def __aenter__(self) -> Cluster:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def connect(address: str | None = None, *, namespace: str = DEFAULT_NAMESPACE, placement: Placement | None = None,
            resources: Resources | None = None, shared_dir: str | os.PathLike[str] | None = None,
            queue_timeout: float = QUEUE_TIMEOUT_S, log_to_driver: bool = False) -> Cluster:
    """Join the Ray cluster at ``address`` (``"auto"``, ``"host:6379"``, ``"ray://host:10001"``;
    None: ``$RAY_ADDRESS``, else a new local Ray instance), unless this process already did.
    Worker output is not copied to this process's stdout unless ``log_to_driver``: an MCP server
    on stdio must keep stdout for the protocol."""
    import ray

    if not ray.is_initialized():
        try:
            ray.init(address=address, namespace=namespace, log_to_driver=log_to_driver, include_dashboard=False,
                     configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ClusterError(f"cannot join the Ray cluster at {address or '$RAY_ADDRESS'}: {exc}",
                               code="cluster_unreachable") from exc
    return Cluster(namespace=namespace, placement=placement, resources=resources, shared_dir=shared_dir,
                   queue_timeout=queue_timeout)


class ClusterVM:
    """A sandbox on the cluster, shaped like :class:`gondolin.VM`: ``exec``, ``start``,
    ``fs``, ``checkpoint``, ``fork``, ``close``. Differences: ``console()`` is a coroutine,
    ``network`` is None (the policy runs on the sandbox's node: read its audit events with
    ``await sandbox.network_events()``), and ``fork`` copies through
    a checkpoint (each copy is a sandbox of its own)."""

    def __init__(self, cluster: Cluster, actor: Any, facts: Facts | None, *, name: str | None) -> None:
        self.cluster = cluster
        self.name = name
        self._actor = actor
        self._facts = facts
        self._closed = False
        self._lost: SandboxLostError | None = None
        self._options: VMOptions | None = None  # what it was started with, when this client started it
        self.fs = ClusterFS(self)

    # -- what it is ---------------------------------------------------------------------------
    @property
    def facts(self) -> Facts:
        if self._facts is None:
            raise ClusterError("the sandbox has not started", code="sandbox_not_started")
        return self._facts

    id = property(lambda self: self.facts.id)
    node_id = property(lambda self: self.facts.node_id, doc="The Ray node the sandbox runs on.")
    hostname = property(lambda self: self.facts.hostname)
    label = property(lambda self: self.facts.label)
    accel = property(lambda self: self.facts.accel)
    cpus = property(lambda self: self.facts.cpus)
    memory_mb = property(lambda self: self.facts.memory_mb)
    restored_from = property(lambda self: self.facts.restored_from)
    boot_time = property(lambda self: self.facts.boot_time)
    qemu_pid = property(lambda self: self.facts.qemu_pid, doc="QEMU's pid on the sandbox's node.")
    network = None  # the network policy and its audit events live on the sandbox's node

    @property
    def env(self) -> dict[str, str]:
        return dict(self.facts.env)

    @property
    def running(self) -> bool:
        """False once closed, or once a call found the sandbox's actor gone."""
        return not self._closed and self._lost is None

    # -- one place that waits on Ray -----------------------------------------------------------
    async def _answer(self, ref: Any, what: str) -> Any:
        try:
            value = await _resolve(ref)
        except Exception as exc:
            err = translate(exc, what)
            if err is exc:
                raise
            if isinstance(err, SandboxLostError):
                self._lost = err
            raise err from exc
        if isinstance(value, Failure):
            raise rebuild(value)
        return value

    async def _call(self, method: str, *args: Any) -> Any:
        if self._closed:
            raise VMClosedError("this sandbox was closed")
        if self._lost is not None:
            raise SandboxLostError(self._lost.message)
        return await self._answer(getattr(self._actor, method).remote(*args),
                                  f"{method} on sandbox {self.name or (self._facts.id if self._facts else '?')}")

    # -- commands -------------------------------------------------------------------------------
    async def exec(self, command: str | list[str] | tuple[str, ...], *, env: Mapping[str, str] | None = None,
                   cwd: str | None = None, user: str | int | None = None,
                   stdin: bytes | str | Iterable[bytes] | AsyncIterable[bytes] | None = None, pty: bool = False,
                   rows: int = 24, cols: int = 80, timeout: float | None = None,
                   stdout: Literal["buffer", "ignore"] = "buffer",
                   stderr: Literal["buffer", "ignore"] = "buffer") -> ExecResult:
        """As :meth:`gondolin.VM.exec`; an iterable ``stdin`` is read here first, then sent."""
        if isinstance(stdin, AsyncIterable):
            stdin = b"".join([chunk async for chunk in stdin])
        elif stdin is not None and not isinstance(stdin, (bytes, str)):
            stdin = b"".join(stdin)
        kwargs = dict(env=dict(env) if env else None, cwd=cwd, user=user, stdin=stdin, pty=pty, rows=rows, cols=cols,
                      timeout=timeout, stdout=stdout, stderr=stderr)
        return await self._call("exec", _command(command), kwargs)  # type: ignore[no-any-return]

    async def start(self, command: str | list[str] | tuple[str, ...], *, env: Mapping[str, str] | None = None,
                    cwd: str | None = None, user: str | int | None = None, stdin: bytes | str | bool | None = None,
                    pty: bool = False, rows: int = 24, cols: int = 80, timeout: float | None = None,
                    stdout: Literal["buffer", "pipe", "ignore"] = "pipe",
                    stderr: Literal["buffer", "pipe", "ignore"] = "pipe") -> ClusterProcess:
        """As :meth:`gondolin.VM.start`; ``stdin`` is bytes/str (sent, then closed) or True
        (write it with ``proc.write()``)."""
        if stdin is not None and not isinstance(stdin, (bytes, str, bool)):
            raise TypeError("on a cluster, start(stdin=...) takes bytes, str or True (then write with proc.write())")
        kwargs = dict(env=dict(env) if env else None, cwd=cwd, user=user, stdin=stdin, pty=pty, rows=rows, cols=cols,
                      timeout=timeout, stdout=stdout, stderr=stderr)
        handle, pid = await self._call("start", _command(command), kwargs)
        return ClusterProcess(self, handle, pid)

    async def ping(self, timeout: float = 10.0) -> float:
        return await self._call("ping", timeout)  # type: ignore[no-any-return]

    async def console(self, lines: int = 50) -> list[str]:
        return await self._call("console", lines)  # type: ignore[no-any-return]

    async def network_events(self) -> list[AuditEvent]:
        """The sandbox's recent HTTP audit events (as ``vm.network.events()`` on its node; empty
        when it has no network)."""
        rows = await self._call("network_events")
        return [AuditEvent(**{**row, "decision": Decision(row["decision"]), "secrets": tuple(row["secrets"])})
                for row in rows]

    async def set_record(self, record: Mapping[str, Any]) -> None:
        """Keep ``record`` (plain data: str, numbers, lists, dicts) with the sandbox, for whoever
        finds it again by name (the integrations' manager keeps what a sandbox's listing needs)."""
        await self._call("set_record", dict(record))

    async def record(self) -> dict[str, Any] | None:
        """What :meth:`set_record` kept with the sandbox, or None."""
        return await self._call("record")  # type: ignore[no-any-return]

    # -- saved state ----------------------------------------------------------------------------
    async def checkpoint(self, path: str | os.PathLike[str] | None = None, *,
                         disk_only: bool = False) -> ClusterCheckpoint:
        """Save the sandbox (it keeps running). The result resumes on any node with
        :meth:`Cluster.resume`. With ``path``, the file is also written here (or, under the
        cluster's ``shared_dir``, written there by the sandbox's node and nothing else)."""
        target = os.path.abspath(os.fspath(path)) if path is not None else None
        if target is not None and self.cluster._is_shared(target):
            saved: SavedFile = await self._call("checkpoint", target, disk_only)
            return ClusterCheckpoint(saved.size, saved.kind, saved.node_id, self.cpus, self.memory_mb, [], target,
                                     shared=True)
        saved = await self._call("checkpoint", None, disk_only)
        try:
            parts = await self._collect_parts(saved)
        finally:
            await self._call("drop_checkpoint", saved.path)
        checkpoint = ClusterCheckpoint(saved.size, saved.kind, saved.node_id, self.cpus, self.memory_mb, parts)
        if target is not None:
            await checkpoint.save(target)
            checkpoint.path = target
        return checkpoint

    async def _collect_parts(self, saved: SavedFile) -> list[Any]:
        """Parts of a file the actor saved, as objects this process owns, stored on its node."""
        import ray

        refs = [self._actor.checkpoint_part.remote(saved.path, offset, PART_SIZE)
                for offset in range(0, max(saved.size, 1), PART_SIZE)]
        try:
            await anyio.to_thread.run_sync(lambda: ray.wait(refs, num_returns=len(refs), fetch_local=False))
        except Exception as exc:
            err = translate(exc, "saving the checkpoint")
            raise err from (None if err is exc else exc)
        return refs

    async def fork(self, n: int = 1, *, label: str | None = None, spread: bool = False) -> list[ClusterVM]:
        """``n`` new sandboxes whose memory, processes and disk are copies of this one now
        (this one keeps running). Copies start on this sandbox's node from a node-local
        checkpoint file, or with ``spread=True`` anywhere the placement puts them, through the
        object store. Each copy is an unnamed sandbox of this client; close each."""
        if n < 1:
            raise ValueError("n must be at least 1")
        opts = self._options
        if label is not None:
            opts = (opts or VMOptions(env=self.env, hostname=self.hostname)).replace(label=label)
        sizing = VMOptions(cpus=self.cpus, memory=self.memory_mb)
        if spread:
            checkpoint = await self.checkpoint()
            boot = checkpoint.boot(opts)
            node = None
        else:
            saved = await self._call("checkpoint", None, False)
            boot = Boot(options=opts, path=saved.path, resume=True)
            node = self.node_id
        copies: list[ClusterVM] = []
        try:
            async with anyio.create_task_group() as tg:
                async def one() -> None:
                    copies.append(await self.cluster._start(sizing, boot, name=None, detached=False, node=node,
                                                            resources=None))

                for _ in range(n):
                    tg.start_soon(one)
        except BaseException:
            with anyio.CancelScope(shield=True):
                for copy in copies:
                    await copy.discard()
            raise
        finally:
            if not spread:
                with anyio.CancelScope(shield=True):
                    await self._call("drop_checkpoint", saved.path)
        return copies

    # -- teardown -------------------------------------------------------------------------------
    async def close(self) -> None:
        """Stop the sandbox's VM and end its actor. Safe to call twice. A sandbox whose actor is
        already gone closes quietly (its VM went with it)."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._lost is None:
                self._closed = False
                try:
                    await self._call("close")
                finally:
                    self._closed = True
        except SandboxLostError:
            pass
        finally:
            self._kill()

    async def discard(self) -> None:
        """Close without raising why the sandbox failed."""
        with anyio.CancelScope(shield=True):
            try:
                await self.close()
            except GondolinError:
                pass

    def _kill(self) -> None:
        import ray

        try:
            ray.kill(self._actor, no_restart=True)
        except Exception:  # noqa: BLE001, S110 - already gone, or Ray is shutting down
            pass

    async def __aenter__(self) -> ClusterVM:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        ident = self._facts.id if self._facts else "?"
        node = self._facts.node_id[:8] if self._facts else "?"
        return f"<ClusterVM {self.name or ident} {state} node={node}>"


def _command(command: str | list[str] | tuple[str, ...]) -> str | list[str]:
    return command if isinstance(command, str) else [str(a) for a in command]


def _release(actor: Any, handle: int) -> None:
    try:
        actor.release.remote(handle)
    except Exception:  # noqa: BLE001, S110 - the actor or Ray is gone: nothing to release
        pass


class ClusterProcess:
    """A command running in a cluster sandbox, shaped like :class:`gondolin.ExecProcess`:
    iterate for piped output, ``write``/``close_stdin``/``signal``/``kill``/``resize``, and
    ``await proc.wait()`` (or ``await proc``). Output is pulled one chunk per call, so the
    guest produces more only as it is read. Cancelling a read loses nothing: the next read
    takes the answer of the one cancelled."""

    def __init__(self, vm: ClusterVM, handle: int, pid: int | None) -> None:
        self._vm = vm
        self._handle = handle
        self.pid = pid
        self._result: ExecResult | None = None
        self._pending: Any = None
        self._release = weakref.finalize(self, _release, vm._actor, handle)

    @property
    def id(self) -> int:
        return self._handle

    @property
    def result(self) -> ExecResult | None:
        return self._result

    async def write(self, data: bytes | str) -> None:
        await self._vm._call("write", self._handle, data.encode() if isinstance(data, str) else bytes(data))

    async def close_stdin(self) -> None:
        await self._vm._call("close_stdin", self._handle)

    async def signal(self, signum: int = _signal.SIGTERM) -> None:
        if self._result is None:
            await self._vm._call("signal", self._handle, int(signum))

    async def kill(self) -> None:
        await self.signal(_signal.SIGKILL)

    async def resize(self, rows: int, cols: int) -> None:
        await self._vm._call("resize", self._handle, rows, cols)

    async def _next(self) -> OutputChunk | None:
        if self._pending is None:
            if self._vm._closed:
                raise VMClosedError("this sandbox was closed")
            self._pending = self._vm._actor.read.remote(self._handle)
        chunk = await self._vm._answer(self._pending, "reading a process's output")
        self._pending = None
        return chunk  # type: ignore[no-any-return]

    def __aiter__(self) -> AsyncIterator[OutputChunk]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[OutputChunk]:
        while (chunk := await self._next()) is not None:
            yield chunk

    async def wait(self, timeout: float | None = None) -> ExecResult:
        """As :meth:`gondolin.ExecProcess.wait`."""
        if self._result is None:
            self._result = await self._vm._call("wait", self._handle, timeout)
            self._release.detach()
        return self._result

    def __await__(self) -> Any:
        return self.wait().__await__()

    async def lines(self) -> AsyncIterator[str]:
        """Piped stdout as text lines."""
        async for line in stdout_lines(self):
            yield line


class ClusterFS:
    """``sandbox.fs``: the file operations of :class:`gondolin.fs.GuestFS` on a cluster
    sandbox. Contents move as object-store parts of at most :data:`PART_SIZE` bytes."""

    def __init__(self, vm: ClusterVM) -> None:
        self._vm = vm

    async def _fs(self, call: str, *args: Any, **kwargs: Any) -> Any:
        return await self._vm._call("fs", call, args, kwargs)

    async def stat(self, path: str, *, follow_symlinks: bool = True) -> FileStat:
        return await self._fs("stat", path, follow_symlinks=follow_symlinks)  # type: ignore[no-any-return]

    async def exists(self, path: str) -> bool:
        return await self._fs("exists", path)  # type: ignore[no-any-return]

    async def listdir(self, path: str) -> list[str]:
        return await self._fs("listdir", path)  # type: ignore[no-any-return]

    async def scandir(self, path: str) -> list[DirEntry]:
        return await self._fs("scandir", path)  # type: ignore[no-any-return]

    async def mkdir(self, path: str, *, parents: bool = True, exist_ok: bool = True, mode: int = 0o755) -> None:
        await self._fs("mkdir", path, parents=parents, exist_ok=exist_ok, mode=mode)

    async def rename(self, src: str, dst: str) -> None:
        await self._fs("rename", src, dst)

    async def remove(self, path: str, *, recursive: bool = False, force: bool = False) -> bool:
        return await self._fs("remove", path, recursive=recursive, force=force)  # type: ignore[no-any-return]

    async def open_read(self, path: str, *, offset: int = 0, length: int | None = None) -> AsyncIterator[bytes]:
        """Stream a guest file in parts (the first is read before this returns, so a missing
        file raises here). Each part is one read of the file at its offset."""
        first = await self._part(path, offset, length)
        return self._parts(path, offset, length, first)

    async def _part(self, path: str, offset: int, length: int | None) -> bytes:
        size = PART_SIZE if length is None else min(PART_SIZE, length)
        return await self._vm._call("read_part", path, offset, size) if size else b""  # type: ignore[no-any-return]

    async def _parts(self, path: str, offset: int, length: int | None, first: bytes) -> AsyncIterator[bytes]:
        part = first
        while part:
            yield part
            offset += len(part)
            if length is not None:
                length -= len(part)
            if len(part) < PART_SIZE or length == 0:
                return
            part = await self._part(path, offset, length)

    async def read_bytes(self, path: str, *, max_size: int | None = None) -> bytes:
        parts, total = [], 0
        async for part in await self.open_read(path):
            total += len(part)
            if max_size is not None and total > max_size:
                raise GuestFileError(f"{path} is larger than max_size={max_size} bytes", errno=27,
                                     errno_name="EFBIG", path=path)
            parts.append(part)
        return b"".join(parts)

    async def read_text(self, path: str, *, encoding: str = "utf-8", errors: str = "strict") -> str:
        return (await self.read_bytes(path)).decode(encoding, errors)

    async def write(self, path: str, data: bytes | bytearray | memoryview | str | Iterable[bytes] | AsyncIterable[bytes],
                    *, mode: int | None = None, append: bool = False, parents: bool = False,
                    user: str | int | None = None) -> int:
        """As :meth:`gondolin.fs.GuestFS.write`. An iterable is gathered into object-store
        parts first, then streamed into the guest by the sandbox's actor."""
        parts = await _put_parts(data)
        return await self._vm._call("write_parts", path, parts,  # type: ignore[no-any-return]
                                    dict(mode=mode, append=append, parents=parents, user=user))

    async def walk(self, top: str, *, max_entries: int | None = None,
                   include_hidden: bool = True) -> AsyncGenerator[tuple[str, list[DirEntry]], None]:
        """As :meth:`gondolin.fs.GuestFS.walk`; the walk runs on the sandbox's node, and at
        most 100,000 entries come back."""
        for batch in await self._vm._call("walk", top, max_entries, include_hidden):
            yield batch

    async def upload(self, host_path: str | os.PathLike[str], guest_path: str, *, mode: int | None = None) -> int:
        """Copy a host file (on this host) into the guest."""
        def chunks() -> Iterable[bytes]:
            with open(host_path, "rb") as f:
                while block := f.read(PART_SIZE):
                    yield block

        parts = await anyio.to_thread.run_sync(lambda: _put_parts_sync(chunks()))
        return await self._vm._call("write_parts", guest_path, parts,  # type: ignore[no-any-return]
                                    dict(mode=mode, append=False, parents=False, user=None))

    async def download(self, guest_path: str, host_path: str | os.PathLike[str]) -> int:
        """Copy a guest file to this host."""
        total = 0
        async with await anyio.open_file(host_path, "wb") as f:
            async for part in await self.open_read(guest_path):
                await f.write(part)
                total += len(part)
        return total


def _put_parts_sync(blocks: Iterable[bytes]) -> list[Any]:
    import ray

    refs = [ray.put(block) for block in blocks]
    return refs or [ray.put(b"")]


__all__ = ["Cluster", "ClusterCheckpoint", "ClusterFS", "ClusterProcess", "ClusterVM", "Node", "NodeReady",
           "connect"]
