"""Userspace network stack for the guest NIC: sans-IO layers plus one anyio driver."""

from gondolin.net.driver import FlowStream, NetworkConfig, NetworkDriver, run_network
from gondolin.net.errors import PacketError
from gondolin.net.ethernet import JUMBO_MTU
from gondolin.net.flow import FlowHandler, FlowInfo, FlowProtocol
from gondolin.net.stack import (
    DnsRequest,
    FlowClosed,
    FlowData,
    FlowEof,
    FlowOpened,
    FlowWritable,
    NetworkStack,
    StackConfig,
    StackEvent,
)
from gondolin.net.stats import NetworkStats
from gondolin.net.tcp_hosts import MappedTarget, TcpHostRules

__all__ = [
    "DnsRequest",
    "FlowClosed",
    "FlowData",
    "FlowEof",
    "FlowHandler",
    "FlowInfo",
    "FlowOpened",
    "FlowProtocol",
    "FlowStream",
    "FlowWritable",
    "JUMBO_MTU",
    "MappedTarget",
    "NetworkConfig",
    "NetworkDriver",
    "NetworkStack",
    "NetworkStats",
    "PacketError",
    "StackConfig",
    "StackEvent",
    "TcpHostRules",
    "run_network",
]
