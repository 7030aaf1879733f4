"""Counters for one VM's network stack: what came in, what went out, what was refused and why."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass(slots=True)
class NetworkStats:
    frames_in: int = 0
    frames_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    arp_replies: int = 0
    dhcp_replies: int = 0
    icmp_echo_replies: int = 0
    dns_answers: int = 0
    dns_forwards: int = 0
    flows_opened: int = 0  # TCP flows handed to the app (classified or mapped)
    flows_closed: int = 0
    # Reason code -> count. Codes are fixed strings from the stack, so these stay small.
    drops: Counter[str] = field(default_factory=Counter)  # packets dropped
    rejects: Counter[str] = field(default_factory=Counter)  # TCP flows refused or reset

    def drop(self, reason: str) -> None:
        self.drops[reason] += 1

    def reject(self, reason: str) -> None:
        self.rejects[reason] += 1

    @property
    def dropped(self) -> int:
        return sum(self.drops.values())

    def as_dict(self) -> dict[str, object]:
        return {
            "frames_in": self.frames_in, "frames_out": self.frames_out,
            "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
            "arp_replies": self.arp_replies, "dhcp_replies": self.dhcp_replies,
            "icmp_echo_replies": self.icmp_echo_replies, "dns_answers": self.dns_answers,
            "dns_forwards": self.dns_forwards, "flows_opened": self.flows_opened,
            "flows_closed": self.flows_closed,
            "drops": dict(self.drops), "rejects": dict(self.rejects),
        }
