"""The interface between the network stack and the protocol handlers that serve guest flows.

The stack classifies each guest TCP flow from its first bytes before any host socket exists.
HTTP and TLS flows are then handed to a :data:`FlowHandler` as an anyio byte stream: bytes the
guest sends are received from the stream, bytes sent on the stream go to the guest. Closing the
stream sends FIN to the guest; the handler returning or raising closes it.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from anyio.abc import ByteStream


class FlowProtocol(enum.Enum):
    HTTP = "http"  # plaintext HTTP/1.x request line seen
    TLS = "tls"  # TLS ClientHello seen
    SSH = "ssh"  # SSH banner (only when SSH egress is enabled)
    MAPPED_TCP = "mapped-tcp"  # explicit tcp_hosts rule


@dataclass(frozen=True, slots=True)
class FlowInfo:
    """What the stack knows about a guest TCP flow when it hands it over."""

    protocol: FlowProtocol
    src_ip: str  # guest address
    src_port: int
    dst_ip: str  # address the guest connected to (often a synthetic DNS address)
    dst_port: int
    hostname: str | None  # name the guest resolved to reach dst_ip, when known (synthetic DNS)
    sni: str | None = None  # server name from the ClientHello (TLS only)


FlowHandler = Callable[[FlowInfo, ByteStream], Awaitable[None]]
