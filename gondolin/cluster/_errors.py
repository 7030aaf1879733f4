"""The cluster's errors, and the one place where errors cross the Ray boundary.

A sandbox actor never lets an error of its own escape into Ray: it answers a :class:`Failure`
that names the error's class and carries its state, and the client raises the same error
again (:func:`rebuild`). Gondolin's errors keep their type, ``code`` and attributes
(``errno``, ``console``) that way, without relying on them being picklable, and Ray does not
log a traceback for a command that merely failed. Ray's own errors (a dead actor, a lost node)
are translated once, here, by :func:`translate`.
"""

from __future__ import annotations

import builtins
import importlib
from dataclasses import dataclass, field
from typing import Any

from ..errors import GondolinError, VMDiedError


class ClusterError(GondolinError):
    """The cluster could not do what was asked: Ray is not reachable, no node can take the
    sandbox, a name is taken or unknown, or the options cannot travel to another node."""

    code = "cluster_error"


class SandboxLostError(ClusterError, VMDiedError):
    """The actor that held the sandbox is gone (its node died, or the actor was killed), so
    its VM is gone too. Resume the sandbox elsewhere from its last checkpoint."""

    code = "sandbox_lost"


# Errors an actor answers with as themselves; anything else becomes a ClusterError.
_PASSED = (GondolinError, ValueError, TypeError)


@dataclass(frozen=True)
class Failure:
    """An error raised in a sandbox actor, as data: the error's class and state."""

    module: str
    qualname: str
    args: tuple[Any, ...]
    state: dict[str, Any] = field(default_factory=dict)


def failure_of(exc: BaseException) -> Failure:
    """What an actor answers for ``exc`` (one of the errors a VM call may raise)."""
    cls = type(exc)
    if not isinstance(exc, _PASSED):
        return Failure(ClusterError.__module__, ClusterError.__qualname__,
                       (f"{cls.__name__} in the sandbox actor: {exc}",), {"code": "cluster_internal"})
    state = {k: v for k, v in vars(exc).items() if isinstance(v, (str, int, float, bool, list, tuple, type(None)))}
    return Failure(cls.__module__, cls.__qualname__, tuple(str(a) for a in exc.args), state)


def rebuild(failure: Failure) -> BaseException:
    """The error an actor answered, as an exception of its own class (a ClusterError when the
    class is not one Gondolin or Python defines)."""
    cls: Any = None
    if failure.module == "builtins":
        cls = getattr(builtins, failure.qualname, None)
    elif failure.module == "gondolin" or failure.module.startswith("gondolin."):
        try:
            cls = getattr(importlib.import_module(failure.module), failure.qualname, None)
        except ImportError:
            cls = None
    if not (isinstance(cls, type) and issubclass(cls, _PASSED)):
        return ClusterError(" ".join(map(str, failure.args)) or failure.qualname, code="cluster_internal")
    exc = cls.__new__(cls)
    BaseException.__init__(exc, *failure.args)
    vars(exc).update(failure.state)
    return exc


def translate(exc: BaseException, what: str) -> BaseException:
    """The Gondolin error for a Ray error raised while waiting on ``what`` (a sandbox call).
    Errors that are not Ray's are returned as they are."""
    import ray.exceptions as rx

    if isinstance(exc, (rx.ActorDiedError, rx.ActorUnavailableError, rx.RayActorError, rx.NodeDiedError,
                        rx.WorkerCrashedError, rx.LocalRayletDiedError)):
        return SandboxLostError(f"{what}: the sandbox's actor is gone ({type(exc).__name__}): its node died or "
                                "the actor was killed; resume it elsewhere from its last checkpoint")
    if isinstance(exc, (rx.OwnerDiedError, rx.ObjectLostError, rx.ObjectFetchTimedOutError)):
        return ClusterError(f"{what}: data in Ray's object store was lost ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''})", code="object_lost")
    if isinstance(exc, rx.ActorUnschedulableError | rx.TaskUnschedulableError):
        return ClusterError(f"{what}: no node can take it ({exc})", code="unschedulable")
    if isinstance(exc, rx.RayError):
        return ClusterError(f"{what}: {type(exc).__name__}: {exc}", code="cluster_internal")
    return exc


__all__ = ["ClusterError", "Failure", "SandboxLostError", "failure_of", "rebuild", "translate"]
