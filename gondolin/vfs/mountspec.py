"""``HOST:GUEST[:ro|:cow]`` mount specifications (the CLI's ``--mount``)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import cast

from ..options import MOUNT_MODES, MountMode, check_mount_point
from .cow import CopyOnWriteProvider
from .provider import Provider
from .readonly import ReadonlyProvider
from .realfs import RealFSProvider


@dataclass(frozen=True)
class MountSpec:
    host: str  # absolute host directory
    guest: str  # absolute guest path, normalised
    mode: MountMode = "rw"

    @classmethod
    def parse(cls, text: str) -> MountSpec:
        """``HOST:GUEST``, ``HOST:GUEST:ro`` or ``HOST:GUEST:cow``; ValueError when malformed."""
        mode: MountMode = "rw"
        head, sep, tail = text.rpartition(":")
        if sep and tail in MOUNT_MODES:
            text, mode = head, cast(MountMode, tail)
        host, sep, guest = text.rpartition(":")
        if not sep or not host or not guest:
            raise ValueError(f"--mount {text!r}: use HOST:GUEST[:ro|:cow]")
        try:
            guest = check_mount_point(guest)
        except ValueError as exc:
            raise ValueError(f"--mount {text!r}: {exc}") from None
        host = os.path.abspath(os.path.expanduser(host))
        if not os.path.isdir(host):
            raise ValueError(f"--mount {text!r}: {host} is not a directory")
        return cls(host, guest, mode)

    def provider(self) -> Provider:
        """The provider for this host directory (the one place host-directory mounts are built);
        OSError when the directory cannot be opened."""
        if self.mode == "cow":
            return CopyOnWriteProvider(self.host)
        real = RealFSProvider(self.host, inline_metadata=True)
        return ReadonlyProvider(real) if self.mode == "ro" else real


def mounts_from_specs(texts: Iterable[str]) -> dict[str, Provider]:
    """``{guest path: provider}`` for ``VM.create(mounts=...)``; ValueError on a bad spec."""
    out: dict[str, Provider] = {}
    for text in texts:
        spec = MountSpec.parse(text)
        if spec.guest in out:
            raise ValueError(f"--mount: {spec.guest} is mounted twice")
        out[spec.guest] = spec.provider()
    return out


__all__ = ["MountSpec", "mounts_from_specs"]
