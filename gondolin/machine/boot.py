"""How a machine starts: one closed type, a boot source.

- :class:`ColdBoot`: boot the image's kernel (with an empty disk overlay, or with a saved one:
  a disk-only checkpoint resumes this way).
- :class:`TemplateRestore`: load the memory and disk a warm template saved.
- :class:`CheckpointResume`: load a full checkpoint's memory and disk.
- :class:`ForkClone`: load the state a running machine just saved for its copies.

Templates, checkpoints and fork produce these values; :class:`gondolin.machine.Machine`
consumes them. Every kind except a cold boot restores saved memory, after which the host
sends the guest fresh entropy, the clock, a new generation id, and is told its host is new.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from .state import RestoreSource, Section

RestoreKind = Literal["template", "checkpoint", "fork"]


@dataclass(frozen=True)
class ColdBoot:
    """Boot the kernel. ``disk``: a saved qcow2 overlay to boot with (cow root disks only)."""

    disk: Section | None = None

    def restore_source(self) -> RestoreSource | None:
        return None


@dataclass(frozen=True)
class TemplateRestore:
    """Restore a warm template (see :mod:`gondolin.machine.templates`)."""

    memory: Section
    disk: Section | None
    key: str = ""

    def restore_source(self) -> RestoreSource:
        return RestoreSource("template", self.memory, self.disk)


@dataclass(frozen=True)
class CheckpointResume:
    """Resume a full checkpoint (see :mod:`gondolin.machine.checkpoint`)."""

    memory: Section
    disk: Section | None
    # the mounts' file-service session at the save (gondolin.vfs.port.VfsServer.hand_over)
    file_state: Any = field(default=None, compare=False, repr=False)

    def restore_source(self) -> RestoreSource:
        return RestoreSource("checkpoint", self.memory, self.disk)


@dataclass(frozen=True)
class ForkClone:
    """One copy of a running machine, from the state it saved for its forks."""

    memory: Section
    disk: Section | None
    parent: str = ""  # the id of the machine it was copied from
    file_state: Any = field(default=None, compare=False, repr=False)  # as for CheckpointResume

    def restore_source(self) -> RestoreSource:
        return RestoreSource("fork", self.memory, self.disk)


BootSource = ColdBoot | TemplateRestore | CheckpointResume | ForkClone

__all__ = ["BootSource", "CheckpointResume", "ColdBoot", "ForkClone", "RestoreKind", "TemplateRestore"]
