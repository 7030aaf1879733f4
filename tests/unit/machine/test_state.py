import os
import shutil
import subprocess

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gondolin.machine.state import (
    PongScanner,
    RestoreSource,
    Section,
    StateError,
    copy_section,
    pong_marker,
    qcow2_backing,
)
from gondolin.protocol import FrameDecoder, Message, T, encode
from tests.support import byte_stream_pair

MARKER = encode(Message(T.PONG, 7, {}, b"n" * 16))


def feed_all(scanner, chunks):
    for c in chunks:
        rest = scanner.feed(c)
        if rest is not None:
            return rest
    return None


@pytest.mark.parametrize(
    "chunks, rest, skipped",
    [
        ([MARKER], b"", 0),
        ([MARKER + b"after"], b"after", 0),
        ([b"junk" + MARKER + b"x"], b"x", 4),
        ([b"ju", b"nk" + MARKER[:5], MARKER[5:] + b"tail"], b"tail", 4),
        ([MARKER[:-1], b"?", MARKER], b"", len(MARKER)),  # a near miss is junk
        ([b"a" * 1000], None, 1000 - (len(MARKER) - 1)),
    ],
)
def test_scanner_finds_the_pong(chunks, rest, skipped):
    s = PongScanner(MARKER)
    assert feed_all(s, chunks) == rest
    assert s.skipped == skipped


def test_scanner_accepts_any_of_several_pongs_and_the_earliest_wins():
    other = encode(Message(T.PONG, 7, {}, b"m" * 16))
    s = PongScanner(MARKER)
    s.add(other)
    assert s.feed(b"xx" + other + b"1" + MARKER + b"2") == b"1" + MARKER + b"2"
    assert s.skipped == 2


def test_scanner_gives_up_after_its_limit():
    s = PongScanner(MARKER, limit=100)
    s.feed(b"z" * 90)
    with pytest.raises(StateError):
        s.feed(b"z" * 200)


def test_scanner_passes_data_through_once_found():
    s = PongScanner(MARKER)
    assert s.feed(MARKER) == b""
    assert s.feed(b"later") == b"later"


@settings(max_examples=300, deadline=None)
@given(junk=st.binary(max_size=400), after=st.binary(max_size=100), cuts=st.lists(st.integers(0, 600), max_size=6))
def test_scanner_resyncs_after_arbitrary_stale_bytes(junk, after, cuts):
    # Stale output never contains our random nonce in practice; here it must not by construction.
    if MARKER in junk + MARKER[:-1]:
        return
    data = junk + MARKER + after
    points = sorted({min(c, len(data)) for c in cuts})
    chunks = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    s = PongScanner(MARKER)
    out = None
    collected = b""
    for c in chunks:
        r = s.feed(c)
        if out is None and r is not None:
            out = r
        elif out is not None:
            collected += r
        assert len(s._tail) < len(MARKER)
    assert out is not None
    assert out + collected == after
    assert s.skipped == len(junk)


def test_pong_marker_is_the_frame_the_agent_answers_with():
    ping, pong = pong_marker(9, b"abc")
    dec = FrameDecoder()
    dec.feed(ping)
    [m] = dec.messages()
    assert (m.t, m.id, m.data) == (T.PING, 9, b"abc")
    # guest/agent.py answers PING with message(T.PONG, id, data=m.data)
    assert pong == encode(Message(T.PONG, m.id, {}, m.data))


@pytest.mark.parametrize(
    "section, expected",
    [
        (Section("/t/memory.bin"), "exec:cat /t/memory.bin"),
        (Section("/t/a b.ckpt", 65536, 100), "exec:dd if='/t/a b.ckpt' iflag=skip_bytes,count_bytes skip=65536 "
                                              "count=100 bs=1M status=none"),
    ],
)
def test_incoming_uri_quotes_paths(section, expected):
    assert RestoreSource("template", section, None).incoming_uri() == expected


def test_incoming_uri_reads_exactly_the_section(tmp_path):
    f = tmp_path / "it's.bin"
    f.write_bytes(b"H" * 10 + b"payload" + b"D" * 5)
    uri = RestoreSource("checkpoint", Section(f, 10, 7), None).incoming_uri()
    out = subprocess.run(uri.removeprefix("exec:"), shell=True, capture_output=True, check=True).stdout
    assert out == b"payload"


def test_copy_section(tmp_path):
    src = tmp_path / "src"
    data = os.urandom(3 << 20)
    src.write_bytes(b"h" * 4096 + data + b"t" * 10)
    dest = tmp_path / "dest"
    assert copy_section(Section(src, 4096, len(data)), dest) == len(data)
    assert dest.read_bytes() == data
    copy_section(Section(src), tmp_path / "whole")
    assert (tmp_path / "whole").read_bytes() == src.read_bytes()


def test_copy_section_of_a_short_file_is_an_error(tmp_path):
    src = tmp_path / "src"
    src.write_bytes(b"abc")
    with pytest.raises(StateError):
        copy_section(Section(src, 0, 100), tmp_path / "dest")


@pytest.mark.skipif(not shutil.which("qemu-img"), reason="qemu-img not installed")
def test_qcow2_backing_reads_the_header(tmp_path):
    base = tmp_path / "base.raw"
    base.write_bytes(bytes(1 << 20))
    overlay = tmp_path / "o.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(base), str(overlay)], check=True)
    assert qcow2_backing(overlay) == str(base)
    plain = tmp_path / "p.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(plain), "1M"], check=True)
    assert qcow2_backing(plain) is None
    with pytest.raises(StateError):
        qcow2_backing(base)


@pytest.mark.anyio
async def test_resync_skips_stale_frames_and_survives_a_lost_ping(monkeypatch):
    import gondolin.machine.state as snap

    monkeypatch.setattr(snap, "RESYNC_RETRY", 0.05)
    host, guest = byte_stream_pair()
    stale = encode(Message(T.STDOUT, 3, {}, b"old output"))

    async def fake_guest():
        await guest.send(stale[5:])  # the tail of a frame cut in half by the snapshot
        dec = FrameDecoder()
        pings = 0
        while True:
            dec.feed(await guest.receive())
            for m in dec.messages():
                pings += 1
                if pings == 1:
                    continue  # lost
                await guest.send(encode(Message(T.PONG, m.id, {}, m.data)) + b"next-frame")
                return

    async with anyio.create_task_group() as tg:
        tg.start_soon(fake_guest)
        with anyio.fail_after(5):
            r = snap.Resync(host)
            await r.ping()
            stream = await r.wait()
    assert await stream.receive() == b"next-frame"


@pytest.mark.anyio
async def test_resync_reports_a_closed_port():
    import gondolin.machine.state as snap
    from gondolin.errors import VMStartError

    host, guest = byte_stream_pair()
    await guest.aclose()
    with pytest.raises(VMStartError):
        await snap.resync_control(host)
