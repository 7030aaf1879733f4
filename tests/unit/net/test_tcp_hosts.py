import pytest

from gondolin.net.tcp_hosts import MappedTarget, TcpHostRules


def test_match_order_and_normalisation() -> None:
    rules = TcpHostRules({
        "DB.Internal.:5432": "127.0.0.1:5432",
        "db.internal": "127.0.0.1:1",
        "10.0.0.5:6379": "[::1]:6379",
    })
    assert rules.match("db.internal", "198.19.0.1", 5432) == MappedTarget("127.0.0.1", 5432)
    assert rules.match("db.internal", "198.19.0.1", 99) == MappedTarget("127.0.0.1", 1)
    assert rules.match(None, "10.0.0.5", 6379) == MappedTarget("::1", 6379)
    assert rules.match(None, "10.0.0.5", 6380) is None
    assert rules.match("other.internal", "198.19.0.2", 5432) is None
    assert rules.hostnames == frozenset({"db.internal"})


@pytest.mark.parametrize("rules", [
    {"db:0": "127.0.0.1:1"},
    {"db:70000": "127.0.0.1:1"},
    {"db:x": "127.0.0.1:1"},
    {"*.db": "127.0.0.1:1"},  # no wildcards
    {"db": "127.0.0.1"},  # target needs a port
    {"db": ":5432"},
    {"db": "[not-v6]:1"},
    {"db": "bad host:1"},
    {"db:5": "127.0.0.1:1", "DB:5": "127.0.0.1:2"},  # duplicate after normalising
])
def test_invalid_rules(rules: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        TcpHostRules(rules)
