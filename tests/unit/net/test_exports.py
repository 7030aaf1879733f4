import gondolin.net
from tests.support import assert_exports


def test_public_names_are_pinned() -> None:
    assert_exports(gondolin.net, [
        "DnsRequest", "FlowClosed", "FlowData", "FlowEof", "FlowHandler", "FlowInfo",
        "FlowOpened", "FlowProtocol", "FlowStream", "FlowWritable", "JUMBO_MTU", "MappedTarget",
        "NetworkConfig", "NetworkDriver", "NetworkStack", "NetworkStats", "PacketError",
        "StackConfig", "StackEvent", "TcpHostRules", "run_network",
    ])
    assert gondolin.net.JUMBO_MTU > 1500
