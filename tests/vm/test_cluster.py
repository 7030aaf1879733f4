"""Sandboxes on a local three-node Ray cluster: placement, files, named sandboxes, migration of
a checkpoint between nodes, a node that dies, and the MCP server with --ray-address.

Every node is a raylet on this machine with its own ``gondolin_vm`` slots; the VMs are real.
The node-death test removes a worker node, so it runs last.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'gondolin[ray]')")
cluster_utils = pytest.importorskip("ray.cluster_utils")

import gondolin.cluster as gc  # noqa: E402
from gondolin import GuestFileError, VMClosedError  # noqa: E402
from integrations import models as m  # noqa: E402

pytestmark = [pytest.mark.anyio, pytest.mark.vm]
ROOT = Path(__file__).parents[2]
SLOTS = 2  # gondolin_vm slots per node
# Ray declares a node dead after health_check_failure_threshold missed checks: seconds, not minutes.
FAST_FAILURE = {"health_check_period_ms": 500, "health_check_timeout_ms": 500, "health_check_failure_threshold": 4}


def node_args(**extra):
    return {"num_cpus": 2, "resources": {gc.VM_RESOURCE: SLOTS}, "object_store_memory": 400 << 20, **extra}


@pytest.fixture(scope="module")
def ray_cluster():
    cluster = cluster_utils.Cluster(initialize_head=True, head_node_args=node_args(
        include_dashboard=False, _system_config=FAST_FAILURE))
    workers = [cluster.add_node(**node_args()) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace="gondolin-test", log_to_driver=False, include_dashboard=False)
    try:
        yield cluster, workers
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture
def cluster(ray_cluster):
    return gc.connect(ray_cluster[0].address, namespace="gondolin-test")


def qemu_gone(pid, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state == "Z":
            return True
        time.sleep(0.1)
    return False


async def test_sandboxes_spread_over_nodes_and_files_round_trip(cluster):
    assert len(cluster.nodes()) == 3
    async with cluster:
        a, b = await cluster.create(memory="512M"), await cluster.create(memory="512M")
        assert a.node_id != b.node_id, "SPREAD put both sandboxes on one node"
        data = os.urandom(9 << 20)  # more than one object-store part
        assert await a.fs.write("/tmp/blob", data) == len(data)
        assert await a.fs.read_bytes("/tmp/blob") == data
        assert (await a.fs.stat("/tmp/blob")).size == len(data)
        assert await b.fs.exists("/tmp/blob") is False
        with pytest.raises(GuestFileError) as info:
            await b.fs.read_bytes("/nonexistent")
        assert info.value.errno_name == "ENOENT"  # the guest's error, type and fields intact

        result = await b.exec(["sh", "-c", "echo out; echo err >&2; exit 3"])
        assert (result.exit_code, result.stdout, result.stderr) == (3, "out\n", "err\n")
        proc = await b.start("for i in 1 2 3; do echo line $i; sleep 0.05; done")
        assert [line async for line in proc.lines()] == ["line 1", "line 2", "line 3"]
        assert (await proc.wait()).exit_code == 0
        cat = await b.start("cat", stdin=True)
        await cat.write("through stdin\n")
        await cat.close_stdin()
        assert b"".join([c.data async for c in cat]) == b"through stdin\n"

        pids = [a.qemu_pid, b.qemu_pid]
    assert not a.running and not b.running  # the cluster closed what it started
    with pytest.raises(VMClosedError):
        await a.exec("true")
    assert all(qemu_gone(pid) for pid in pids)


async def test_named_sandbox_is_found_from_another_process(cluster, ray_cluster):
    sandbox = await cluster.create(name="shared-one")
    try:
        assert "shared-one" in cluster.names()
        with pytest.raises(gc.ClusterError) as taken:
            await cluster.create(name="shared-one")
        assert taken.value.code == "name_taken"
        await sandbox.fs.write("/tmp/note", "left by the first process")
        script = ("import anyio, gondolin.cluster as gc\n"
                  "async def main():\n"
                  f"    c = gc.connect({ray_cluster[0].address!r}, namespace='gondolin-test')\n"
                  "    s = await c.get('shared-one')\n"
                  "    print(await s.fs.read_text('/tmp/note'), s.node_id)\n"
                  "anyio.run(main)\n")
        out = await anyio.to_thread.run_sync(lambda: subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT))
        assert out.returncode == 0, out.stderr[-3000:]
        assert out.stdout.split() == ["left", "by", "the", "first", "process", sandbox.node_id]
        again = await cluster.get("shared-one")
        assert again.id == sandbox.id
    finally:
        await sandbox.close()
    with anyio.fail_after(10):
        while "shared-one" in cluster.names():  # noqa: ASYNC110 - Ray drops the name once the actor ended
            await anyio.sleep(0.1)
    with pytest.raises(gc.ClusterError) as missing:
        await cluster.get("shared-one")
    assert missing.value.code == "sandbox_not_found"


async def test_checkpoint_moves_to_another_node_with_its_process_running(cluster, tmp_path):
    async with cluster:
        source = await cluster.create(memory="512M")
        await source.exec("nohup sh -c 'i=0; while :; do i=$((i+1)); echo $i > /tmp/count; sleep 0.1; done' "
                          ">/dev/null 2>&1 & echo $! > /tmp/loop.pid")
        await anyio.sleep(0.5)
        loop_pid = (await source.fs.read_text("/tmp/loop.pid")).strip()
        in_store = await source.checkpoint()  # parts in the object store, on the source's node
        on_disk = await source.checkpoint(tmp_path / "moved.ckpt")  # also written on this host
        assert on_disk.path and Path(on_disk.path).stat().st_size == on_disk.size
        others = [n.node_id for n in cluster.nodes() if n.node_id != source.node_id]
        await source.close()

        moved = await cluster.resume(in_store, node=others[0])
        from_file = await cluster.resume(on_disk.path, node=others[1])
        for copy, node in ((moved, others[0]), (from_file, others[1])):
            assert copy.node_id == node and copy.restored_from == "checkpoint"
            alive = await copy.exec(["sh", "-c", f"kill -0 {loop_pid} && cat /tmp/count"])
            assert alive.exit_code == 0, alive.stderr
            first = int(alive.stdout)
            await anyio.sleep(0.5)
            assert int((await copy.fs.read_text("/tmp/count")).strip()) > first  # the loop still counts

        forked = await moved.fork(1)
        assert forked[0].node_id == moved.node_id and forked[0].id != moved.id
        assert (await forked[0].exec(["kill", "-0", loop_pid])).exit_code == 0


async def test_prepare_gives_every_node_its_warm_template(cluster):
    ready = await cluster.prepare(memory="512M")
    assert sorted(r.node_id for r in ready) == sorted(n.node_id for n in cluster.nodes())
    assert all(r.restored_from in ("template", None) and r.seconds > 0 for r in ready)


async def test_mcp_server_with_ray_address_runs_a_sandbox_flow(ray_cluster, tmp_path):
    from mcp import Client, StdioServerParameters

    params = StdioServerParameters(
        command=sys.executable, args=["-m", "mcp_server", "--ray-address", ray_cluster[0].address],
        env={**os.environ, "PYTHONUNBUFFERED": "1"}, cwd=str(ROOT))
    with anyio.fail_after(180):
        async with Client(params, mode="legacy") as client:
            created = await client.call_tool("sandbox_create", {"name": "on-ray"})
            assert created.is_error is False, created.content[0].text
            sid = created.structured_content["sandbox_id"]
            wrote = await client.call_tool("write_file", {"sandbox_id": sid, "path": "/workspace/in.txt",
                                                          "content": "ray\n"})
            assert wrote.is_error is False, wrote.content[0].text
            ran = await client.call_tool("exec", {"sandbox_id": sid, "command": "tr a-z A-Z < /workspace/in.txt"})
            assert ran.structured_content["stdout"] == "RAY\n"
            read = await client.call_tool("read_file", {"sandbox_id": sid, "path": "/workspace/in.txt"})
            assert "ray" in read.content[0].text
            destroyed = await client.call_tool("sandbox_destroy", {"sandbox_id": sid})
            assert destroyed.is_error is False, destroyed.content[0].text


async def test_cookbook_fans_one_prepared_state_out_with_fork(ray_cluster):
    out = await anyio.to_thread.run_sync(lambda: subprocess.run(
        [sys.executable, "cookbook/ray_fanout.py", "--address", ray_cluster[0].address, "-n", "2"],
        capture_output=True, text=True, timeout=240, cwd=ROOT))
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    for needle in ("forked 2 copies", "shard 0: 10000 orders", "shard 1: 10000 orders",
                   "orders in all shards: 20000", "sandboxes left running: 0"):
        assert needle in out.stdout, out.stdout


async def test_a_second_manager_adopts_a_sandbox_by_id_and_sees_its_blocked_requests(cluster):
    from integrations import NetworkProfile, OperatorConfig, SandboxManager, ToolRegistry

    config = OperatorConfig(network_profiles={"deny": NetworkProfile()}, default_network="deny")
    backend = gc.RayBackend(cluster, prefix="test-adopt-")
    first = SandboxManager(config, backend=backend, reap=False)  # never closed: a server that died
    sandbox = await first.create(m.SandboxCreateInput(name="survivor", memory_mb=512))
    sid = sandbox.id
    assert any(name.startswith(f"test-adopt-{sid}.") for name in cluster.names())
    assert backend.sandbox_ids() == [sid]
    ran = await sandbox.vm.exec("curl -s -o /dev/null -w '%{http_code}' http://example.com/blocked-path")
    assert ran.stdout == "403", ran.stdout + ran.stderr

    async with SandboxManager(config, backend=gc.RayBackend(cluster, prefix="test-adopt-"), reap=False) as second:
        registry = ToolRegistry(second)
        out = await registry.call("exec", {"sandbox_id": sid, "command": "echo adopted"})
        assert out.error is None, out.text
        assert out.output.stdout == "adopted\n"
        info = second.get(sid).info()
        assert (info.name, info.network, info.memory_mb) == ("survivor", "deny", 512)
        events = await registry.call("network_events", {"sandbox_id": sid, "decision": "blocked"})
        assert events.error is None, events.text
        assert [(e.decision, e.url) for e in events.output.events] == [
            ("blocked", "http://example.com/blocked-path")]
        other = await ToolRegistry(second).call("exec", {"sandbox_id": "sb_00000000", "command": "true"})
        assert other.error is not None and other.error.code == "sandbox_not_found"
    with anyio.fail_after(10):
        while backend.sandbox_ids():  # noqa: ASYNC110 - the second manager closed what it adopted
            await anyio.sleep(0.1)


async def test_a_dead_node_fails_its_sandboxes_calls_promptly(cluster, ray_cluster):
    """Runs last: it removes a worker node."""
    _, workers = ray_cluster
    doomed = workers[-1]
    sandbox = await cluster.create(memory="512M", node=doomed.node_id)
    qemu = sandbox.qemu_pid
    failed: list[BaseException] = []

    async def long_call():
        try:
            await sandbox.exec("sleep 600")
        except BaseException as exc:  # noqa: BLE001 - what the call ended with is the point
            failed.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(long_call)
        await anyio.sleep(1.0)
        t0 = time.monotonic()
        await anyio.to_thread.run_sync(lambda: ray_cluster[0].remove_node(doomed, allow_graceful=False))
        with anyio.fail_after(60):
            while not failed:  # noqa: ASYNC110 - the call's task records its end
                await anyio.sleep(0.1)
        elapsed = time.monotonic() - t0
    assert isinstance(failed[0], gc.SandboxLostError), repr(failed[0])
    print(f"the pending call failed {elapsed:.1f}s after the node was removed")
    assert elapsed < 30, f"the pending call failed only after {elapsed:.1f}s"
    assert not sandbox.running
    with pytest.raises(gc.SandboxLostError):
        await sandbox.exec("true")
    await sandbox.close()  # quiet: its VM went with its node
    assert qemu_gone(qemu), f"QEMU {qemu} outlived its node"
