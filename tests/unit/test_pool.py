"""The pure parts of the pool of spare VMs (gondolin/pool.py) and its sandbox-manager knob;
tests/vm/test_pool.py boots the real thing."""

import pytest
from pydantic import ValidationError

from gondolin import GondolinError, Timeouts, VMOptions, VMPool
from gondolin.http import Secret, create_http_hooks
from gondolin.pool import spare_options
from gondolin.vfs import MemoryProvider
from integrations import OperatorConfig, SandboxManager
from mcp_server.__main__ import build_parser, config_from_args

from .integrations.fakes import FakeBackend


def test_a_spare_takes_the_shape_and_nothing_of_the_callers():
    hooks, env = create_http_hooks(allowed_hosts=["example.com"],
                                   secrets={"TOKEN": Secret("real-value", hosts=["example.com"])})
    caller = VMOptions(memory="1G", cpus=2, rootfs="memory", env={**env, "A": "1"}, hostname="job", label="mine",
                       http_hooks=hooks, tcp_hosts={"db:5432": "127.0.0.1:5432"}, dns="trusted",
                       mounts={"/data": MemoryProvider()}, timeouts=Timeouts(call=5), pids_max=64).checked()
    spare = spare_options(caller)
    assert (spare.memory_mb, spare.cpus, spare.rootfs, spare.network, spare.pids_max) == (1024, 2, "memory", True, 64)
    assert spare.timeouts == caller.timeouts
    assert spare.env == {} and spare.http_hooks is None and spare.tcp_hosts == {} and spare.ssh is None
    assert spare.hostname == VMOptions().hostname and spare.label is None and spare.dns == "synthetic"
    assert list(spare.mounts) == ["/data"] and spare.mounts["/data"] is not caller.mounts["/data"]
    assert "real-value" not in repr(spare)


def test_a_pool_needs_a_size():
    with pytest.raises(ValueError, match="size"):
        VMPool(size=0)
    with pytest.raises(ValueError, match="memory"):
        VMPool(memory="1")


@pytest.mark.anyio
async def test_acquire_outside_the_block_is_refused():
    with pytest.raises(GondolinError) as err:
        await VMPool(size=1).acquire()
    assert err.value.code == "pool_not_running"


def test_pool_size_is_a_limit_with_a_default_of_one():
    assert OperatorConfig().limits.pool_size == 1
    assert OperatorConfig(limits={"pool_size": 0}).limits.pool_size == 0
    with pytest.raises(ValidationError):
        OperatorConfig(limits={"pool_size": -1})
    cfg = config_from_args(build_parser().parse_args(["--pool-size", "0"]))
    assert cfg.limits.pool_size == 0


@pytest.mark.anyio
async def test_the_manager_keeps_no_spares_for_another_backend_or_size_zero():
    async with SandboxManager(OperatorConfig(), backend=FakeBackend(), reap=False) as manager:
        assert manager.pool is None  # spares are local VMs: a custom backend starts its own
    async with SandboxManager(OperatorConfig(limits={"pool_size": 0}), reap=False) as manager:
        assert manager.pool is None
