from __future__ import annotations

import ast
import dataclasses
import struct
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gondolin.vfs import wire as w

ATTR = w.Attr(
    ino=0xFFFF_FFFF_FFFF,
    mode=0o100644,
    nlink=3,
    uid=1000,
    gid=1000,
    rdev=0,
    blksize=4096,
    size=1 << 40,
    blocks=8,
    atime_ns=-1,  # before the epoch
    mtime_ns=1_700_000_000_123_456_789,
    ctime_ns=0,
)
ENTRY = w.EntryReply(node=42, generation=0, entry_ttl_ms=1000, attr_ttl_ms=500, attr=ATTR)

REQUESTS: list[w.Body] = [
    w.Hello(),
    w.Lookup(1, b"name"),
    w.Forget(((2, 1), (3, 1 << 40))),
    w.Forget(()),
    w.Getattr(5),
    w.Getattr(5, fh=9),
    w.Setattr(5, 0, w.FATTR_MODE | w.FATTR_MTIME, 0o755, 0, 0, 0, 0, 123),
    w.Readlink(5),
    w.Symlink(1, b"l", b"../target"),
    w.Mkdir(1, 0o755, b"dir"),
    w.Unlink(1, b"f"),
    w.Rmdir(1, b"d"),
    w.Rename(1, 2, w.RENAME_EXCHANGE, b"a", b"b"),
    w.Link(5, 1, b"hard"),
    w.Open(5, 0o2),
    w.Create(1, 0o644, 0o101, b"new"),
    w.Read(3, 1 << 33, w.MAX_IO),
    w.Write(3, 0, b"\x00\xff" * 100),
    w.Write(3, 7, b""),
    w.Statfs(1),
    w.Release(3),
    w.Fsync(3, 1),
    w.Flush(3),
    w.Opendir(1),
    w.Readdir(4, 2, 4096, 1),
    w.Releasedir(4),
    w.Access(5, 7),
    w.Fallocate(3, 0, 1 << 20),
    w.CopyFileRange(3, 0, 4, 10, 1 << 30),
]

REPLIES: list[tuple[w.Op, object]] = [
    (w.Op.HELLO, w.HelloReply()),
    (w.Op.LOOKUP, ENTRY),
    (w.Op.GETATTR, w.AttrReply(1000, ATTR)),
    (w.Op.READLINK, w.DataReply(b"target")),
    (w.Op.OPEN, w.OpenReply(7, w.FOPEN_KEEP_CACHE)),
    (w.Op.CREATE, w.CreateReply(ENTRY, w.OpenReply(8))),
    (w.Op.READ, w.DataReply(b"x" * 1000)),
    (w.Op.WRITE, w.SizeReply(1000)),
    (w.Op.STATFS, w.StatFs(1, 2, 3, 4, 5)),
    (w.Op.UNLINK, w.EmptyReply()),
    (
        w.Op.READDIR,
        w.ReaddirReply(
            True,
            (
                w.Dirent(1, 5, 4, b".", None),
                w.Dirent(2, 1, 4, b"..", None),
                w.Dirent(3, 9, 8, b"file", ENTRY),
            ),
        ),
    ),
    (w.Op.READDIR, w.ReaddirReply(False, (w.Dirent(1, 9, 10, b"link"),))),
    (w.Op.READDIR, w.ReaddirReply(False, ())),
    (w.Op.COPY_FILE_RANGE, w.SizeReply(1 << 33)),
]


@pytest.mark.parametrize("body", REQUESTS, ids=lambda b: type(b).__name__)
def test_request_round_trip(body: w.Body) -> None:
    req = w.Request(id=0xFFFFFFFF, body=body, uid=1000, gid=100, pid=4242)
    data = w.encode_request(req)
    assert w.message_kind(data) == w.Kind.REQUEST
    assert w.decode_request(data) == req


@pytest.mark.parametrize(("op", "body"), REPLIES, ids=lambda x: getattr(x, "name", ""))
def test_response_round_trip(op: w.Op, body: object) -> None:
    resp = w.Response(id=7, op=op, errno=0, body=body)  # type: ignore[arg-type]
    data = w.encode_response(resp)
    assert w.message_kind(data) == w.Kind.RESPONSE
    assert w.decode_response(data) == resp


def test_error_response() -> None:
    data = w.encode_response(w.Response(id=3, op=w.Op.LOOKUP, errno=2))
    assert len(data) == 12
    assert w.decode_response(data) == w.Response(3, w.Op.LOOKUP, 2, None)
    assert w.decode_response(w.encode_error(3, w.Op.LOOKUP, 2)) == w.Response(3, w.Op.LOOKUP, 2)


@pytest.mark.parametrize(
    "note", [w.InvalInode(5, 0, 0), w.InvalInode(5, -1, 0), w.InvalEntry(1, b"gone")]
)
def test_notify_round_trip(note: w.Body) -> None:
    data = w.encode_notify(w.Notify(note, seq=9))
    assert w.message_kind(data) == w.Kind.NOTIFY
    assert w.decode_notify(data) == w.Notify(note, 9)


def test_encoders_check_types() -> None:
    with pytest.raises(ValueError):
        w.encode_request(w.Request(1, w.InvalEntry(1, b"x")))
    with pytest.raises(ValueError):
        w.encode_response(w.Response(1, w.Op.LOOKUP, 0, w.EmptyReply()))
    with pytest.raises(ValueError):
        w.encode_notify(w.Notify(w.Lookup(1, b"x")))


def test_data_travels_raw() -> None:
    payload = bytes(range(256)) * 4
    data = w.encode_request(w.Request(1, w.Write(3, 0, payload)))
    assert data.endswith(payload)
    assert len(data) == 20 + 16 + len(payload)  # header, fh + offset, raw bytes


@pytest.mark.parametrize(
    ("data", "has_id"),
    [
        (b"", False),
        (b"\x01", False),
        (struct.pack("<BBHIIII", 2, 2, 0, 1, 0, 0, 0), False),  # a response, not a request
        (struct.pack("<BBHIIII", 1, 200, 0, 7, 0, 0, 0), True),  # unknown op
        (struct.pack("<BBHIIII", 1, 2, 0, 7, 0, 0, 0), True),  # lookup without a body
        (struct.pack("<BBHIIII", 1, 2, 0, 7, 0, 0, 0) + struct.pack("<QI", 1, 99), True),
        (w.encode_request(w.Request(7, w.Getattr(1))) + b"x", True),  # trailing byte
        (
            struct.pack("<BBHIIII", 1, 14, 0, 7, 0, 0, 0) + struct.pack("<QQI", 1, 0, w.MAX_IO + 1),
            True,
        ),
        (struct.pack("<BBHIIII", 1, 3, 0, 7, 0, 0, 0) + struct.pack("<I", 1 << 30), True),
    ],
)
def test_bad_requests(data: bytes, has_id: bool) -> None:
    with pytest.raises(w.WireError) as info:
        w.decode_request(data)
    assert (info.value.request_id is not None) is has_id


def test_oversized_write_is_refused() -> None:
    data = w.encode_request(w.Request(9, w.Write(1, 0, bytes(w.MAX_IO + 1))))
    with pytest.raises(w.WireError) as info:
        w.decode_request(data)
    assert info.value.request_id == 9
    with pytest.raises(w.WireError):
        w.decode_request(bytes(w.MAX_MESSAGE + 1))


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_decoders_raise_only_wire_error(data: bytes) -> None:
    for decode in (w.decode_request, w.decode_response, w.decode_notify, w.message_kind):
        try:
            decode(data)
        except w.WireError:
            pass


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([w.encode_request(w.Request(5, b)) for b in REQUESTS]),
    st.integers(min_value=0, max_value=400),
    st.binary(min_size=1, max_size=8),
)
def test_fuzz_mutated_requests(data: bytes, where: int, junk: bytes) -> None:
    """Valid messages with bytes overwritten, cut or appended still decode or fail cleanly."""
    where %= len(data) + 1
    for mutated in (
        data[:where] + junk + data[where + len(junk) :],
        data[:where],
        data + junk,
    ):
        try:
            w.decode_request(mutated)
        except w.WireError:
            pass


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from([w.encode_response(w.Response(5, op, 0, b)) for op, b in REPLIES]),  # type: ignore[arg-type]
    st.integers(min_value=0, max_value=400),
    st.binary(min_size=1, max_size=8),
)
def test_fuzz_mutated_responses(data: bytes, where: int, junk: bytes) -> None:
    where %= len(data) + 1
    for mutated in (data[:where] + junk + data[where + len(junk) :], data[:where], data + junk):
        try:
            w.decode_response(mutated)
        except w.WireError:
            pass


@given(st.lists(st.binary(max_size=50), max_size=10), st.integers(min_value=1, max_value=7))
def test_frames_split_anywhere(messages: list[bytes], step: int) -> None:
    stream = b"".join(w.encode_frame(m) for m in messages)
    splitter = w.FrameSplitter()
    out: list[bytes] = []
    for i in range(0, len(stream), step):
        out += splitter.feed(stream[i : i + step])
    assert out == messages and splitter.buffered == 0


@pytest.mark.parametrize("body", REQUESTS, ids=lambda b: type(b).__name__)
def test_request_frame_matches_the_codec(body: w.Body) -> None:
    """The raw path the guest daemon uses writes exactly what encode_request writes."""
    cls = type(body)
    skip = {*cls._VARS, cls._TAIL}
    names = [f.name for f in dataclasses.fields(body) if f.name not in skip]
    fixed = tuple(getattr(body, n) for n in names)
    variables = tuple(getattr(body, n) for n in cls._VARS)
    tail = getattr(body, cls._TAIL) if cls._TAIL else b""
    if isinstance(body, w.Forget):
        fixed, tail = (), body.pack()
    head, rest = w.request_frame(9, cls, fixed, variables, memoryview(tail), 1, 2, 3)
    req = w.Request(id=9, body=body, uid=1, gid=2, pid=3)
    assert head + bytes(rest) == w.encode_frame(w.encode_request(req))


def test_request_frame_refuses_oversized_messages() -> None:
    with pytest.raises(ValueError):
        w.request_frame(1, w.Write, (1, 0), (), bytes(w.MAX_MESSAGE))


@given(st.lists(st.binary(max_size=9000), min_size=1, max_size=4), st.integers(1, 5000))
def test_missing_counts_the_rest_of_the_frame(messages: list[bytes], step: int) -> None:
    stream = b"".join(w.encode_frame(m) for m in messages)
    splitter = w.FrameSplitter()
    pos = got = 0
    while pos < len(stream):
        chunk = stream[pos : pos + step]
        got += len(splitter.feed(chunk))
        pos += len(chunk)
        missing = splitter.missing
        # Reading exactly ``missing`` more bytes (never past the frame) completes it.
        if missing:
            assert pos + missing <= len(stream)
            before = got
            got += len(splitter.feed(stream[pos : pos + missing]))
            pos += missing
            assert got == before + 1
    assert got == len(messages) and splitter.missing == 0


def test_oversized_frame() -> None:
    with pytest.raises(w.WireError):
        w.FrameSplitter().feed(struct.pack(">I", w.MAX_MESSAGE + 1))
    with pytest.raises(ValueError):
        w.encode_frame(bytes(w.MAX_MESSAGE + 1))


@pytest.mark.parametrize(
    ("name_len", "plus", "size"),
    [(1, False, 32), (8, False, 32), (9, False, 40), (1, True, 160), (255, True, 408)],
)
def test_fuse_dirent_size(name_len: int, plus: bool, size: int) -> None:
    assert w.fuse_dirent_size(name_len, plus) == size


def test_wire_imports_only_the_standard_library() -> None:
    """The guest image carries wire.py on its own."""
    tree = ast.parse(Path(w.__file__).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, "no relative imports"
            assert node.module is not None
            roots = [node.module.split(".")[0]]
        elif isinstance(node, ast.Import):
            roots = [a.name.split(".")[0] for a in node.names]
        else:
            continue
        for root in roots:
            assert root == "__future__" or root in sys.stdlib_module_names, root
