"""The VM lifecycle: :class:`Machine` owns one VM; boot sources say how it starts; templates,
checkpoints and fork produce boot sources. :class:`gondolin.VM` is the public facade."""

from .boot import BootSource, CheckpointResume, ColdBoot, ForkClone, TemplateRestore
from .machine import Machine, Network

__all__ = ["BootSource", "CheckpointResume", "ColdBoot", "ForkClone", "Machine", "Network", "TemplateRestore"]
