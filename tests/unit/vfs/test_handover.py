"""A file-service session handed over to another host (checkpoint resume, fork): the same node
and handle ids, open files reopened by path with their modes, recorded replies sent again."""

from __future__ import annotations

import errno as E
import json

import pytest

from gondolin.vfs import FsRpcService, MemoryProvider
from gondolin.vfs import wire as w
from gondolin.vfs.nodes import ROOT_NODE, NodeTable
from gondolin.vfs.port import VfsServer

from .support import read_file
from .test_rpc import O_CREAT, O_EXCL, O_RDONLY, O_RDWR, O_WRONLY, Client

pytestmark = pytest.mark.anyio
O_TRUNC, O_APPEND = 0o1000, 0o2000


async def test_a_new_service_answers_the_saved_ids_and_reopens_files() -> None:
    fs = MemoryProvider()
    old = Client(FsRpcService(fs, id_offset=1 << 20))
    d = await old.entry(w.Mkdir(ROOT_NODE, 0o755, b"d"))
    created = await old.ok(w.Create(d.node, 0o644, O_RDWR | O_CREAT | O_EXCL | O_TRUNC, b"f"))
    assert isinstance(created, w.CreateReply)
    await old.ok(w.Write(created.open.fh, 0, b"before "))
    ro = await old.ok(w.Open(created.entry.node, O_RDONLY))
    gone = await old.ok(w.Open(created.entry.node, O_WRONLY | O_APPEND))
    await old.entry(w.Lookup(ROOT_NODE, b"d"))
    state = json.loads(json.dumps(old.service.export_state()))  # what a checkpoint stores

    fresh = FsRpcService(fs, id_offset=5 << 30)  # a resumed host: other ids of its own
    rows = fresh.import_state(state)
    assert len(rows) == 3
    assert await fresh.reopen_files(rows) == 3
    new = Client(fresh)
    new.next_id = 100
    # the guest's ids keep working: no truncation again, the file position is the guest's
    assert await new.ok(w.Write(created.open.fh, 7, b"after")) == w.SizeReply(5)
    assert await new.ok(w.Read(ro.fh, 0, 100)) == w.DataReply(b"before after")
    assert await new.err(w.Write(ro.fh, 0, b"x")) == E.EBADF  # still read-only
    assert (await new.entry(w.Lookup(d.node, b"f"))).node == created.entry.node
    attr = await new.ok(w.Getattr(created.entry.node))
    assert isinstance(attr, w.AttrReply) and attr.attr.size == 12
    await new.ok(w.Write(gone.fh, 0, b"!"))  # append mode carried over
    assert await read_file(fs, "/d/f") == b"before after!"
    # new ids never collide with the saved ones
    again = await new.ok(w.Open(created.entry.node, O_RDONLY))
    assert again.fh > max(created.open.fh, ro.fh, gone.fh)
    mk = await new.entry(w.Mkdir(ROOT_NODE, 0o755, b"e"))
    assert mk.node > created.entry.node


async def test_a_file_whose_path_is_gone_is_left_out_and_bad_state_changes_nothing() -> None:
    fs = MemoryProvider()
    old = Client(FsRpcService(fs))
    created = await old.ok(w.Create(ROOT_NODE, 0o644, O_RDWR | O_CREAT, b"f"))
    state = old.service.export_state()
    await fs.unlink("/f")
    fresh = FsRpcService(fs)
    assert await fresh.reopen_files(fresh.import_state(state)) == 0
    assert await Client(fresh).err(w.Read(created.open.fh, 0, 1)) == E.EBADF
    untouched = FsRpcService(fs)
    nodes = untouched.nodes
    for bad in (None, {"v": 2}, {"v": 1, "files": [], "nodes": {"next": "x", "nodes": []}},
                {"v": 1, "files": [], "nodes": {"next": 9, "nodes": [[1, 0, "", 1]]}, "next_file": 1, "next_dir": 1},
                {"v": 1, "files": [], "nodes": {"next": 9, "nodes": []}, "next_file": "1", "next_dir": 1}):
        with pytest.raises(ValueError):
            untouched.import_state(bad)
    assert untouched.nodes is nodes
    with pytest.raises(ValueError):
        NodeTable.restore({"next": 3, "nodes": [[5, 1, "x", 1]]})  # an id past the counter


async def test_recorded_replies_are_sent_again_by_the_server_that_takes_over() -> None:
    fs = MemoryProvider()
    server = VfsServer({"/m": fs})
    assert await server.hand_over(timeout=0.1) is None  # not recording
    server.begin_hand_over()
    server._record(b"\x01\x0e", b"reply-1")  # what serve() does with each answer
    state = await server.hand_over(timeout=1)
    server.end_hand_over()
    assert state is not None and len(state["replies"]) == 1
    taker = VfsServer({"/m": fs}, state=json.loads(json.dumps(state)))
    assert taker.carried_over and taker._replay == [(b"reply-1", None, b"")]
    assert not VfsServer({"/m": fs}, state={"v": 1}).carried_over  # unusable: mount afresh
