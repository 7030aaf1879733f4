"""Actor options from a sandbox's VM options, resources and name (no cluster needed)."""

import threading

import pytest

pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'gondolin[ray]')")

from gondolin import VMOptions  # noqa: E402
from gondolin.cluster import ClusterError, Placement, Resources  # noqa: E402
from gondolin.cluster._placement import (  # noqa: E402
    HOST_OVERHEAD_MB,
    MiB,
    actor_name,
    actor_options,
    portable,
    sandbox_name,
)
from gondolin.http import create_http_hooks  # noqa: E402
from gondolin.vfs import MemoryProvider  # noqa: E402


def test_resources_follow_the_vm_unless_given():
    opts = VMOptions(cpus=2, memory="1G")
    got = actor_options(opts, Resources(), name=None, namespace="ns", detached=False)
    assert got == {"num_cpus": 2.0, "memory": (1024 + HOST_OVERHEAD_MB) * MiB, "resources": {"gondolin_vm": 1.0},
                   "max_restarts": 0, "max_task_retries": 0, "namespace": "ns"}
    custom = Resources(num_cpus=0.5, memory_mb=700, vm_slots=2, extra=(("kvm", 1),))
    got = actor_options(opts, custom, name=None, namespace="ns", detached=False)
    assert (got["num_cpus"], got["memory"], got["resources"]) == (0.5, 700 * MiB, {"gondolin_vm": 2.0, "kvm": 1.0})


def test_named_sandboxes_are_detached_actors_with_a_prefixed_name():
    got = actor_options(VMOptions(), Resources(), name="job-7", namespace="ns", detached=True)
    assert (got["name"], got["lifetime"]) == ("gondolin-sandbox:job-7", "detached")
    assert sandbox_name(got["name"]) == "job-7"
    assert sandbox_name("some-other-actor") is None
    with pytest.raises(ValueError, match="needs a name"):
        actor_options(VMOptions(), Resources(), name=None, namespace="ns", detached=True)


@pytest.mark.parametrize("bad", ["", "-x", "a b", "a/b", "x" * 101, 7])
def test_bad_names_are_refused(bad):
    with pytest.raises(ValueError, match="sandbox name"):
        actor_name(bad)


def test_placement_strategy_is_checked():
    assert Placement().strategy == "SPREAD"
    with pytest.raises(ValueError):
        Placement(strategy="PACK")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Resources(vm_slots=0).actor_resources(VMOptions())


def test_options_that_cannot_travel_are_refused():
    hooks, _env = create_http_hooks(allowed_hosts=["example.com"])
    assert portable(VMOptions(http_hooks=hooks)).http_hooks is hooks  # copied to the node by pickle
    with pytest.raises(ClusterError) as mounts:
        portable(VMOptions(mounts={"/data": MemoryProvider()}))
    assert mounts.value.code == "options_not_portable"

    class Unpicklable:
        lock = None

        def __init__(self):
            self.lock = threading.Lock()

    with pytest.raises(ClusterError) as hooks_err:
        portable(VMOptions(http_hooks=Unpicklable()))  # type: ignore[arg-type]
    assert hooks_err.value.code == "options_not_portable"
