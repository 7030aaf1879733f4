import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gondolin.protocol import (
    MAX_FRAME,
    PROTOCOL_VERSION,
    FrameDecoder,
    FrameError,
    Message,
    T,
    decode_payload,
    encode,
    message,
)


def test_round_trip_with_header_and_raw_data():
    frame = message(T.STDOUT, 7, b"\x00\xffbinary", stream="x")
    dec = FrameDecoder()
    dec.feed(frame)
    [m] = dec.messages()
    assert (m.t, m.id, m.p, m.data) == (T.STDOUT, 7, {"stream": "x"}, b"\x00\xffbinary")


def test_empty_header_is_encoded_as_zero_length():
    frame = encode(Message(T.PING, 1))
    assert len(frame) == 4 + 10  # length prefix + envelope, nothing else
    assert decode_payload(frame[4:]).p == {}


def test_partial_frames_are_completed_by_later_reads():
    frame = message(T.EXEC, 3, shell="echo hi")
    dec = FrameDecoder()
    for i in range(len(frame) - 1):
        dec.feed(frame[i : i + 1])
        assert dec.messages() == []
    dec.feed(frame[-1:])
    [m] = dec.messages()
    assert m.p == {"shell": "echo hi"}
    assert dec.buffered() == 0


def test_several_frames_in_one_read():
    frames = b"".join(message(T.STDOUT, i, bytes([i]) * i) for i in range(1, 6))
    dec = FrameDecoder()
    dec.feed(frames + message(T.EXIT, 9)[:5])
    msgs = dec.messages()
    assert [m.id for m in msgs] == [1, 2, 3, 4, 5]
    assert [m.data for m in msgs] == [bytes([i]) * i for i in range(1, 6)]
    assert dec.buffered() == 5


def test_oversize_frame_is_refused_before_buffering_it():
    dec = FrameDecoder()
    dec.feed(struct.pack(">I", MAX_FRAME + 1))
    with pytest.raises(FrameError) as err:
        dec.messages()
    assert err.value.code == "frame_too_large"
    with pytest.raises(FrameError):  # the stream is out of sync: refuse further input
        dec.feed(b"more")


def test_encoding_an_oversize_message_fails():
    with pytest.raises(FrameError) as err:
        encode(Message(T.STDOUT, 1, {}, b"x" * MAX_FRAME))
    assert err.value.code == "frame_too_large"


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"\x01\x02", "short_frame"),
        (struct.pack(">BBII", PROTOCOL_VERSION + 1, 1, 0, 0), "bad_version"),
        (struct.pack(">BBII", PROTOCOL_VERSION, 1, 0, 50) + b"{}", "bad_header_length"),
        (struct.pack(">BBII", PROTOCOL_VERSION, 1, 0, 3) + b"{x}", "bad_header"),
        (struct.pack(">BBII", PROTOCOL_VERSION, 1, 0, 2) + b"[]", "bad_header"),
        (struct.pack(">BBII", PROTOCOL_VERSION, 1, 0, 2) + b"\xff\xfe", "bad_header"),
    ],
)
def test_malformed_payloads_have_stable_codes(payload, code):
    with pytest.raises(FrameError) as err:
        decode_payload(payload)
    assert err.value.code == code


def test_unknown_type_decodes_but_is_named_unknown():
    m = decode_payload(struct.pack(">BBII", PROTOCOL_VERSION, 250, 1, 0))
    assert m.type_name == "UNKNOWN(250)"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048), st.integers(min_value=1, max_value=64))
def test_garbage_never_raises_anything_but_frame_error(data, step):
    dec = FrameDecoder(max_frame=4096)
    try:
        for i in range(0, len(data), step):
            dec.feed(data[i : i + step])
            dec.messages()
    except FrameError:
        pass
    assert dec.buffered() <= 4096 + 4 + step


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(list(T)),
            st.integers(min_value=0, max_value=2**32 - 1),
            st.dictionaries(st.text(max_size=8), st.one_of(st.integers(), st.text(max_size=16), st.none()), max_size=4),
            st.binary(max_size=300),
        ),
        max_size=10,
    ),
    st.integers(min_value=1, max_value=97),
)
def test_any_message_sequence_survives_any_chunking(msgs, step):
    stream = b"".join(encode(Message(t, i, p, d)) for t, i, p, d in msgs)
    dec = FrameDecoder()
    out = []
    for i in range(0, len(stream), step):
        dec.feed(stream[i : i + step])
        out.extend(dec.messages())
    assert [(m.t, m.id, m.p, m.data) for m in out] == [(t, i, p, d) for t, i, p, d in msgs]
