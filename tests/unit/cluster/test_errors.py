"""Errors cross the Ray boundary as data and come back as themselves (no cluster needed)."""

import pickle

import pytest

rx = pytest.importorskip("ray.exceptions", reason="the ray extra is not installed (pip install 'gondolin[ray]')")

from gondolin import GondolinError, GuestFileError, VMDiedError  # noqa: E402
from gondolin.cluster import ClusterError, SandboxLostError  # noqa: E402
from gondolin.cluster._errors import Failure, failure_of, rebuild, translate  # noqa: E402
from gondolin.machine.checkpoint import CheckpointError  # noqa: E402


def round_trip(exc):
    return rebuild(pickle.loads(pickle.dumps(failure_of(exc))))


@pytest.mark.parametrize("exc", [
    GuestFileError("guest No such file", errno=2, errno_name="ENOENT", path="/x"),
    VMDiedError("QEMU exited", console=["panic"]),
    CheckpointError("bad file", code="checkpoint_corrupt"),
    GondolinError("plain", code="something"),
    ValueError("cwd must be absolute"),
    TypeError("wrong type"),
])
def test_errors_keep_their_type_code_and_fields(exc):
    back = round_trip(exc)
    assert type(back) is type(exc)
    assert str(back) == str(exc)
    assert vars(back) == vars(exc)


def test_other_errors_become_cluster_errors():
    back = round_trip(KeyError("boom"))
    assert type(back) is ClusterError and back.code == "cluster_internal" and "KeyError" in str(back)
    forged = rebuild(Failure("os", "system", ("rm -rf /",), {}))  # only gondolin's and builtin errors are made
    assert type(forged) is ClusterError


def test_ray_errors_are_translated_once():
    lost = translate(rx.ActorDiedError(), "exec on sandbox s")
    assert isinstance(lost, SandboxLostError) and isinstance(lost, VMDiedError) and lost.code == "sandbox_lost"
    assert "exec on sandbox s" in str(lost)
    other = translate(rx.RaySystemError("gcs gone"), "x")
    assert type(other) is ClusterError and other.code == "cluster_internal"
    plain = KeyError("k")
    assert translate(plain, "x") is plain
