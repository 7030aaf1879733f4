from __future__ import annotations

import errno as E

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gondolin.vfs import VfsError
from gondolin.vfs.nodes import ROOT_NODE, NodeTable


def stale(table: NodeTable, node: int) -> bool:
    try:
        table.path(node)
    except VfsError as exc:
        assert exc.errno == E.ESTALE
        return True
    return False


def test_lookup_reuses_ids_and_counts() -> None:
    t = NodeTable()
    a = t.lookup(ROOT_NODE, "a")
    assert t.lookup(ROOT_NODE, "a") == a and t.lookups(a) == 2
    b = t.lookup(a, "b")
    assert t.path(b) == "/a/b" and t.child_path(b, "c") == "/a/b/c"
    assert len(t) == 3


def test_forget_shrinks_the_table() -> None:
    t = NodeTable()
    a = t.lookup(ROOT_NODE, "a")
    b = t.lookup(a, "b")
    t.forget(a, 1)
    assert a in t  # still the parent of b
    t.forget(b, 1)
    assert len(t) == 1 and stale(t, a) and stale(t, b)
    assert t.lookup(ROOT_NODE, "a") not in (a, b)  # ids are never reused
    t.forget(ROOT_NODE, 100)
    t.forget(12345, 1)
    assert t.path(ROOT_NODE) == "/"


def test_rename_moves_subtree() -> None:
    t = NodeTable()
    d = t.lookup(ROOT_NODE, "d")
    f = t.lookup(d, "f")
    e = t.lookup(ROOT_NODE, "e")
    t.move(ROOT_NODE, "d", e, "moved")
    assert t.path(f) == "/e/moved/f"
    assert t.child(ROOT_NODE, "d") is None


def test_rename_over_detaches_target() -> None:
    t = NodeTable()
    a = t.lookup(ROOT_NODE, "a")
    b = t.lookup(ROOT_NODE, "b")
    t.move(ROOT_NODE, "a", ROOT_NODE, "b")
    assert t.path(a) == "/b" and stale(t, b)
    t.forget(b, 1)
    assert b not in t


def test_exchange_swaps() -> None:
    t = NodeTable()
    a = t.lookup(ROOT_NODE, "a")
    d = t.lookup(ROOT_NODE, "d")
    x = t.lookup(d, "x")
    t.exchange(ROOT_NODE, "a", ROOT_NODE, "d")
    assert t.path(a) == "/d" and t.path(d) == "/a" and t.path(x) == "/a/x"
    t.exchange(ROOT_NODE, "a", ROOT_NODE, "unknown")
    assert t.path(d) == "/unknown"


def test_detach_keeps_id_until_forget() -> None:
    t = NodeTable()
    a = t.lookup(ROOT_NODE, "a")
    t.detach(ROOT_NODE, "a")
    assert a in t and stale(t, a)
    with pytest.raises(VfsError):
        t.lookup(a, "child")  # a removed directory gets no children
    t.forget(a, 1)
    assert len(t) == 1


def test_table_is_bounded() -> None:
    t = NodeTable(max_nodes=3)
    t.lookup(ROOT_NODE, "a")
    t.lookup(ROOT_NODE, "b")
    with pytest.raises(VfsError) as info:
        t.lookup(ROOT_NODE, "c")
    assert info.value.errno == E.ENFILE
    t.lookup(ROOT_NODE, "a")  # known names still resolve


OPS = st.lists(
    st.tuples(
        st.sampled_from(["lookup", "forget", "detach", "move", "exchange"]),
        st.integers(0, 6),
        st.sampled_from(["a", "b", "c"]),
        st.integers(0, 6),
        st.sampled_from(["a", "b", "c"]),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(OPS)
def test_random_ops_then_forget_everything_empties_the_table(ops: list) -> None:
    t = NodeTable()
    ids = [ROOT_NODE]
    held: dict[int, int] = {}
    for op, i, name, j, name2 in ops:
        parent, other = ids[i % len(ids)], ids[j % len(ids)]
        if parent not in t or other not in t:
            continue
        try:
            if op == "lookup":
                node = t.lookup(parent, name)
                ids.append(node)
                held[node] = held.get(node, 0) + 1
            elif op == "forget" and held.get(parent):
                t.forget(parent, 1)
                held[parent] -= 1
            elif op == "detach":
                t.detach(parent, name)
            elif op == "move" and t.child(parent, name) not in (None, other):
                t.move(parent, name, other, name2)
            elif op == "exchange":
                t.exchange(parent, name, other, name2)
        except VfsError as exc:
            assert exc.errno == E.ESTALE
        for node in list(held):
            if node in t:
                try:
                    t.path(node)  # never loops, never raises anything but ESTALE
                except VfsError as exc:
                    assert exc.errno == E.ESTALE
    for node, count in held.items():
        t.forget(node, count)
    assert len(t) == 1
