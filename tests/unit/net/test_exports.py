import gondolin.net


def test_public_names_are_pinned() -> None:
    assert sorted(gondolin.net.__all__) == [
        "DnsRequest", "FlowClosed", "FlowData", "FlowEof", "FlowHandler", "FlowInfo",
        "FlowOpened", "FlowProtocol", "FlowStream", "FlowWritable", "JUMBO_MTU", "MappedTarget",
        "NetworkConfig", "NetworkDriver", "NetworkStack", "NetworkStats", "PacketError",
        "StackConfig", "StackEvent", "TcpHostRules", "run_network",
    ]
    for name in gondolin.net.__all__:
        assert getattr(gondolin.net, name) is not None
