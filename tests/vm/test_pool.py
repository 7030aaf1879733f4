"""Spare VMs configured on acquire (gondolin/pool.py) and the sandbox manager's default pool."""

from __future__ import annotations

import secrets

import anyio
import pytest

from gondolin import GondolinError, VMOptions, VMPool, VMStartError
from gondolin.http import Decision, Secret, create_http_hooks
from gondolin.machine.launch import start_spare
from gondolin.machine.machine import GATEWAY_IP
from gondolin.vfs import MemoryProvider, RealFSProvider
from gondolin.vm import vm_for
from integrations import OperatorConfig, SandboxManager, ToolRegistry

from .netservers import loopback_resolver, start_servers

pytestmark = [pytest.mark.anyio, pytest.mark.vm]

SHAPE = {"memory": "512M"}  # the default sandbox's shape: its template is shared with other modules
REAL_TOKEN = "sk_pool_" + secrets.token_hex(16)
READY_TIMEOUT = 180


@pytest.fixture(scope="module")
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    log = tmp_path_factory.mktemp("pool-site") / "requests.jsonl"
    with start_servers({"http": {}, "log": str(log)}) as servers:
        yield servers


@pytest.fixture(scope="module")
async def pool():
    async with VMPool(size=1, **SHAPE) as p:
        yield p


async def ready(pool: VMPool, count: int = 1) -> None:
    with anyio.fail_after(READY_TIMEOUT):
        while pool.ready < count:  # noqa: ASYNC110 - polls the pool's count
            await anyio.sleep(0.05)


def policy(site):
    port = site.ports["http"]
    return create_http_hooks(
        allowed_hosts=[], allowed_internal_hosts=["api.test"], resolver=loopback_resolver(),
        secrets={"API_TOKEN": Secret(REAL_TOKEN, hosts=[f"api.test:{port}"], schemes=["http"])})


async def test_a_spare_reaches_nothing_before_it_is_handed_out(site):
    spare = await start_spare(VMOptions(**SHAPE).checked())
    vm = await vm_for(spare)
    async with vm:
        assert vm.network is None  # no network service runs for a spare
        r = await vm.exec(f"curl -sS --max-time 3 http://{GATEWAY_IP}:{site.ports['http']}/headers/spare; "
                          "echo TOKEN=$API_TOKEN")
        assert r.exit_code == 0 and "TOKEN=\n" in r.stdout  # curl failed; no secret placeholder either
        assert not [e for e in site.log_entries() if e["path"] == "/headers/spare"]


async def test_a_pooled_vm_gets_its_callers_env_hostname_and_policy(pool, site):
    await ready(pool)
    before = pool.handed_out
    hooks, env = policy(site)
    port = site.ports["http"]
    async with await pool.acquire(env={**env, "WHO": "caller"}, hostname="pooled-1", http_hooks=hooks) as vm:
        assert pool.handed_out == before + 1 and vm.restored_from == "template"
        assert vm.hostname == "pooled-1"
        r = await vm.exec("echo $WHO $(hostname); echo $API_TOKEN; "
                          f'curl -sS --fail -H "Authorization: Bearer $API_TOKEN" http://api.test:{port}/headers/pool; '
                          f"curl -sS --max-time 10 -o /dev/null -w '%{{http_code}}' http://other.test:{port}/small")
        leaked = REAL_TOKEN in r.stdout + r.stderr
        assert not leaked, "the real secret value reached the guest"
        lines = r.stdout.splitlines()
        assert lines[0] == "caller pooled-1"
        assert lines[1].startswith("GONDOLIN_SECRET_")
        assert lines[-1].endswith("403")  # other.test is outside the policy
        (entry,) = [e for e in site.log_entries() if e["path"] == "/headers/pool"]
        got = [v for n, v in entry["headers"] if n.lower() == "authorization"] == [f"Bearer {REAL_TOKEN}"]
        assert got, "the upstream did not get the real value"
        blocked = [e for e in vm.network.events() if e.host == "other.test"]
        assert blocked and blocked[0].decision is Decision.BLOCKED


async def test_two_acquisitions_share_nothing(pool):
    await ready(pool)
    async with await pool.acquire(env={"WHO": "a"}) as a:
        await a.exec("touch /tmp/mine")
        await ready(pool)
        async with await pool.acquire() as b:
            assert a.id != b.id and a.qemu_pid != b.qemu_pid
            assert (await b.exec("echo ${WHO:-none}")).stdout == "none\n"
            assert not await b.fs.exists("/tmp/mine")
            rand = [(await vm.exec("head -c 16 /dev/urandom | od -An -tx1")).stdout for vm in (a, b)]
            assert rand[0] != rand[1]
    assert pool.created_directly == 0


async def test_mounts_reach_a_pooled_vm(tmp_path):
    (tmp_path / "hello.txt").write_text("from the host\n")
    async with VMPool(size=1, mounts={"/data": MemoryProvider()}, **SHAPE) as mounted:
        await ready(mounted)
        async with await mounted.acquire(mounts={"/data": RealFSProvider(str(tmp_path))}) as vm:
            assert (await vm.exec("cat /data/hello.txt")).stdout == "from the host\n"
            await vm.exec("echo back > /data/new.txt")
        assert mounted.handed_out == 1
    assert (tmp_path / "new.txt").read_text() == "back\n"


async def test_a_failing_refill_does_not_break_acquire(monkeypatch, no_leaks):
    async def broken(*args, **kwargs):
        raise VMStartError("no spare today")

    monkeypatch.setattr("gondolin.pool.start_spare", broken)
    async with VMPool(size=1, **SHAPE) as failing:
        async with await failing.acquire(timeout=READY_TIMEOUT, hostname="direct") as vm:
            assert (await vm.exec("hostname")).stdout == "direct\n"
        assert failing.created_directly == 1 and failing.handed_out == 0


async def test_closing_the_pool_leaves_nothing_even_when_the_user_raises(no_leaks):
    with pytest.raises(RuntimeError, match="user code"):
        async with VMPool(size=2, **SHAPE) as p:
            await ready(p, 2)
            vm = await p.acquire()
            await vm.close()
            raise RuntimeError("user code")
    with pytest.raises(GondolinError) as err:
        await p.acquire()
    assert err.value.code == "pool_not_running"


async def test_the_manager_creates_sandboxes_from_its_spare(no_leaks):
    config = OperatorConfig(limits={"pool_size": 1, "max_sandboxes": 1})
    async with SandboxManager(config, reap=False) as manager:
        assert manager.pool is not None
        await ready(manager.pool)
        registry = ToolRegistry(manager)
        sandbox = (await registry.call("sandbox_create", {"env": [{"name": "A", "value": "1"}]})).data()
        result = (await registry.call("exec", {"sandbox_id": sandbox["sandbox_id"], "command": "echo $A"})).data()
        assert result["exit_code"] == 0 and result["stdout"] == "1\n"
        assert manager.pool.handed_out == 1
        await ready(manager.pool)  # the refill is a spare, not a sandbox: the limit of one still has room for none
        second = await registry.call("sandbox_create", {})
        assert second.is_error and second.data()["error"]["code"] == "sandbox_limit"


async def test_pool_size_zero_disables_the_pool(no_leaks):
    async with SandboxManager(OperatorConfig(limits={"pool_size": 0}), reap=False) as manager:
        assert manager.pool is None
        registry = ToolRegistry(manager)
        sandbox = (await registry.call("sandbox_create", {})).data()
        result = (await registry.call("exec", {"sandbox_id": sandbox["sandbox_id"], "command": "true"})).data()
        assert result["exit_code"] == 0
