import anyio
import pytest

from gondolin.errors import VMDiedError, VMStartError
from gondolin.options import MOUNT_MODES
from integrations import (
    MountRoot,
    NetworkProfile,
    OperatorConfig,
    SandboxManager,
    SecretSpec,
    ToolError,
)
from integrations.config import MOUNT_MODE_RANK, Limits
from integrations.models import EnvVar, MountRequest, SandboxCreateInput

from .fakes import FakeBackend

pytestmark = pytest.mark.anyio


class Clock:
    def __init__(self):
        self.now = 1_000_000.0

    def __call__(self):
        return self.now


@pytest.fixture
def backend():
    return FakeBackend()


@pytest.fixture
def booted(backend):
    return backend.booted


def manager(backend, clock=None, **config):
    cfg = OperatorConfig(**config)
    return SandboxManager(cfg, backend=backend, clock=clock or Clock(), reap=False,
                          environ={"API_TOKEN": "value-of-the-token"})


async def test_create_passes_the_profile_to_the_runtime(backend, booted):
    cfg = dict(network_profiles={"api": NetworkProfile(allowed_hosts=("api.example.com",), dns="trusted",
                                                       tcp_hosts={"db:5432": "127.0.0.1:5432"})},
               secrets={"API_TOKEN": SecretSpec(hosts=("api.example.com",))},
               env={"LANG": "C.UTF-8"}, rootfs="memory")
    async with manager(backend, **cfg) as mgr:
        sb = await mgr.create(SandboxCreateInput(network="api", secrets=["API_TOKEN"], env=[EnvVar(name="A", value="1")],
                                                 name="job", cpus=2, memory_mb=1024))
    opts = booted[0].options
    assert (opts.image, opts.cpus, opts.memory, opts.rootfs, opts.label) == ("default", 2, 1024, "memory", "job")
    assert opts.network is True and opts.dns == "trusted" and opts.tcp_hosts == {"db:5432": "127.0.0.1:5432"}
    hooks = opts.http_hooks
    assert hooks.policy.host_allowed("api.example.com") and not hooks.policy.host_allowed("evil.com")
    assert hooks.secrets.placeholders()["API_TOKEN"] == opts.env["API_TOKEN"]
    assert opts.env["A"] == "1" and opts.env["LANG"] == "C.UTF-8"
    placeholder = opts.env["API_TOKEN"]
    assert placeholder.startswith("GONDOLIN_SECRET_") and "value-of-the-token" not in str(opts.env)
    assert sb.info().secrets == ["API_TOKEN"]
    assert booted[0].closed == 1  # closed at shutdown


async def test_offline_profile_has_no_nic(backend, booted):
    async with manager(backend) as mgr:
        await mgr.create(SandboxCreateInput(network="offline"))
    assert booted[0].options.network is False and booted[0].options.http_hooks is None


@pytest.mark.parametrize(
    ("request_", "code"),
    [
        (SandboxCreateInput(image="other"), "not_allowed"),
        (SandboxCreateInput(cpus=64), "not_allowed"),
        (SandboxCreateInput(memory_mb=65536), "not_allowed"),
        (SandboxCreateInput(ttl_s=10**7), "not_allowed"),
        (SandboxCreateInput(network="internet"), "not_allowed"),
        (SandboxCreateInput(secrets=["NOPE"]), "not_allowed"),
        (SandboxCreateInput(secrets=["UNSET"]), "not_allowed"),
        (SandboxCreateInput(secrets=["API_TOKEN"], network="offline"), "invalid_argument"),
        (SandboxCreateInput(mounts=[MountRequest(host_path="/etc")]), "not_allowed"),
        (SandboxCreateInput(mounts=[MountRequest(host_path="relative")]), "invalid_argument"),
        (SandboxCreateInput(from_checkpoint="cp_missing"), "checkpoint_not_found"),
    ],
)
async def test_choices_outside_the_config_are_refused_before_booting(backend, booted, request_, code):
    cfg = dict(secrets={"API_TOKEN": SecretSpec(hosts=("a.com",)), "UNSET": SecretSpec(hosts=("a.com",))})
    async with manager(backend, **cfg) as mgr:
        with pytest.raises(ToolError) as err:
            await mgr.create(request_)
    assert err.value.code == code
    assert not booted


async def test_mounts_stay_inside_approved_roots(backend, booted, tmp_path):
    (tmp_path / "proj" / "sub").mkdir(parents=True)
    outside = tmp_path.parent
    roots = (MountRoot(host_path=str(tmp_path / "proj"), mode="cow", guest_path="/workspace/proj"),)
    async with manager(backend, mounts=roots) as mgr:
        sb = await mgr.create(SandboxCreateInput(mounts=[MountRequest(host_path=str(tmp_path / "proj" / "sub"))]))
        assert [m.model_dump() for m in sb.mounts] == [
            {"guest_path": "/workspace/proj/sub", "host_path": str(tmp_path / "proj" / "sub"), "mode": "cow"}]
        assert set(booted[0].options.mounts) == {"/workspace/proj/sub"}
        for bad in (str(tmp_path / "proj" / ".." / ".."), str(outside), str(tmp_path / "proj-evil")):
            with pytest.raises(ToolError) as err:
                await mgr.create(SandboxCreateInput(mounts=[MountRequest(host_path=bad)]))
            assert err.value.code in ("not_allowed", "path_not_found")
        with pytest.raises(ToolError, match="at most 'cow'"):
            await mgr.create(SandboxCreateInput(mounts=[MountRequest(host_path=str(tmp_path / "proj"), mode="rw")]))
        for system_dir in ("/", "/usr", "/lib64", "/boot", "relative"):  # the library's one list
            with pytest.raises(ToolError) as err:
                await mgr.create(SandboxCreateInput(mounts=[MountRequest(host_path=str(tmp_path / "proj"),
                                                                         guest_path=system_dir)]))
            assert err.value.code == "invalid_argument"
        (tmp_path / "proj" / "link").symlink_to(outside)
        with pytest.raises(ToolError) as err:
            await mgr.create(SandboxCreateInput(mounts=[MountRequest(host_path=str(tmp_path / "proj" / "link"))]))
        assert err.value.code == "not_allowed"


def test_every_mount_mode_of_the_library_has_a_rank():
    assert set(MOUNT_MODE_RANK) == set(MOUNT_MODES)


async def test_the_cap_counts_live_and_booting_sandboxes():
    gate = anyio.Event()

    class SlowBackend(FakeBackend):
        async def create(self, options):
            await gate.wait()
            return await super().create(options)

    slow = SlowBackend()
    booted = slow.booted
    async with manager(slow, limits=Limits(max_sandboxes=2)) as mgr:
        async with anyio.create_task_group() as tg:
            tg.start_soon(mgr.create, SandboxCreateInput())
            tg.start_soon(mgr.create, SandboxCreateInput())
            await anyio.sleep(0.01)
            with pytest.raises(ToolError) as err:
                await mgr.create(SandboxCreateInput())
            assert err.value.code == "sandbox_limit"
            gate.set()
        assert len(mgr.sandboxes()) == 2
        await mgr.destroy(mgr.sandboxes()[0].id)
        await mgr.create(SandboxCreateInput())
    assert all(vm.closed == 1 for vm in booted)


async def test_a_failed_boot_frees_its_slot_and_is_a_tool_error():
    class FailingBackend(FakeBackend):
        async def create(self, options):
            raise VMStartError("qemu exploded")

    async with manager(FailingBackend(), limits=Limits(max_sandboxes=1)) as mgr:
        for _ in range(2):
            with pytest.raises(ToolError) as err:
                await mgr.create(SandboxCreateInput())
            assert err.value.code == "vm_start_failed"


async def test_idle_sandboxes_are_reaped_but_busy_ones_are_not(backend, booted):
    clock = Clock()
    async with manager(backend, clock=clock) as mgr:
        a = await mgr.create(SandboxCreateInput(ttl_s=60))
        b = await mgr.create(SandboxCreateInput(ttl_s=600))
        c = await mgr.create(SandboxCreateInput(ttl_s=60))
        clock.now += 30
        mgr.get(c.id)  # using a sandbox pushes its expiry back
        clock.now += 40
        with mgr.use(a.id):
            assert await mgr.reap_expired() == []  # a is in use
        clock.now += 1
        assert await mgr.reap_expired() == []  # a was just used
        clock.now += 60
        assert sorted(await mgr.reap_expired()) == sorted([a.id, c.id])
        assert [s.id for s in mgr.sandboxes()] == [b.id]
        with pytest.raises(ToolError) as err:
            mgr.get(a.id)
        assert err.value.code == "sandbox_not_found"
    assert [vm.closed for vm in booted] == [1, 1, 1]


async def test_the_reaper_task_runs_on_its_own(backend, booted):
    clock = Clock()
    cfg = OperatorConfig(limits=Limits(reap_interval_s=0.01))
    async with SandboxManager(cfg, backend=backend, clock=clock) as mgr:
        sb = await mgr.create(SandboxCreateInput(ttl_s=10))
        clock.now += 11
        with anyio.fail_after(5):
            while mgr.sandboxes():  # noqa: ASYNC110 - polling the reaper's effect is the point
                await anyio.sleep(0.01)
        assert mgr.reaped == [sb.id]


async def test_shutdown_closes_everything_even_when_cancelled(backend, booted):
    with anyio.CancelScope() as scope:
        async with manager(backend) as mgr:
            await mgr.create(SandboxCreateInput())
            await mgr.create(SandboxCreateInput())
            scope.cancel()
            await anyio.sleep(1)
    assert [vm.closed for vm in booted] == [1, 1]


async def test_a_stopped_vm_is_reported(backend, booted):
    async with manager(backend) as mgr:
        sb = await mgr.create(SandboxCreateInput())
        booted[0].running = False
        with pytest.raises(ToolError) as err:
            mgr.get(sb.id)
        assert err.value.code == "sandbox_not_running"
        assert sb.info().status == "stopped"


async def test_checkpoint_restore_and_roll_back(backend, booted, tmp_path):
    cfg = dict(network_profiles={"api": NetworkProfile(allowed_hosts=("api.example.com",))},
               secrets={"API_TOKEN": SecretSpec(hosts=("api.example.com",))}, checkpoint_dir=str(tmp_path))
    async with manager(backend, **cfg) as mgr:
        sb = await mgr.create(SandboxCreateInput(name="base", network="api", secrets=["API_TOKEN"]))
        record = await mgr.checkpoint(sb, "before", False)
        assert backend.saved == [(record.path, False)] and record.path.startswith(str(tmp_path))
        disk = await mgr.checkpoint(sb, "disk", True)
        assert backend.saved[-1] == (disk.path, True) and disk.info().disk_only
        forked = await mgr.restore(record.id)
        assert forked.id != sb.id and forked.from_checkpoint == record.id
        resumed = booted[-1]
        assert resumed.resumed_from == record.path and resumed.options.label == "base"
        # Policy hooks are live host objects: the resumed VM gets its own, with the same profile and secret.
        hooks = resumed.options.http_hooks
        assert hooks is not booted[0].options.http_hooks and hooks.policy.host_allowed("api.example.com")
        assert hooks.secrets.placeholders()["API_TOKEN"] == resumed.options.env["API_TOKEN"]
        rolled = await mgr.restore(record.id, sandbox_id=sb.id)
        assert rolled.id == sb.id and booted[0].closed == 1 and sb.vm is booted[-1]
        assert [c.id for c in mgr.list_checkpoints(sb.id)] == [record.id, disk.id]


async def test_a_vm_that_died_in_the_background_still_closes_every_sandbox(backend, booted):
    async with manager(backend) as mgr:
        await mgr.create(SandboxCreateInput())
        await mgr.create(SandboxCreateInput())

        async def died():
            booted[0].closed += 1
            raise VMDiedError("the network driver crashed")

        booted[0].close = died
    assert [vm.closed for vm in booted] == [1, 1]


async def test_a_restarted_manager_adopts_a_kept_sandbox_by_id():
    from integrations import ToolRegistry

    from .fakes import NamingFakeBackend

    first = NamingFakeBackend()
    cfg = dict(network_profiles={"api": NetworkProfile(allowed_hosts=("api.example.com",))},
               secrets={"API_TOKEN": SecretSpec(hosts=("api.example.com",))})
    old = manager(first, **cfg)  # a server that died without closing anything
    sb = await old.create(SandboxCreateInput(name="kept", network="api", secrets=["API_TOKEN"], ttl_s=600,
                                             env=[EnvVar(name="A", value="1")]))
    record = first.kept[sb.id][1]
    assert "value-of-the-token" not in repr(record)  # names only, never a secret's value

    second = NamingFakeBackend(first.kept)
    async with manager(second, **cfg) as mgr:
        registry = ToolRegistry(mgr)
        events = await registry.call("network_events", {"sandbox_id": sb.id})
        assert events.error is None, events.text
        assert events.output.events == [] and events.output.network == "api"
        adopted = mgr.get(sb.id)
        assert adopted.vm is sb.vm and adopted.info().model_dump(exclude={"expires_at"}) == \
            sb.info().model_dump(exclude={"expires_at"})
        missing = await registry.call("network_events", {"sandbox_id": "sb_00000000"})
        assert missing.error is not None and missing.error.code == "sandbox_not_found"
        assert second.attached == [sb.id, "sb_00000000"]
    assert sb.vm.closed == 1  # the restarted manager owns it: closed at its shutdown


async def test_a_local_backend_never_looks_for_unknown_sandboxes(backend):
    from integrations import ToolRegistry

    async with manager(backend) as mgr:
        out = await ToolRegistry(mgr).call("exec", {"sandbox_id": "sb_12345678", "command": "true"})
        assert out.error is not None and out.error.code == "sandbox_not_found"
        assert await mgr.destroy("sb_12345678") is False
