import base64
from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from integrations.output import Clip, HeadTailBuffer, Redactor, clip_bytes, render_clip


@pytest.mark.parametrize(
    ("chunks", "limit", "head", "tail", "omitted"),
    [
        ([b"hello"], 10, b"hello", b"", 0),
        ([b"0123456789"], 10, b"01234", b"56789", 0),
        ([b"0123456789AB"], 10, b"01234", b"789AB", 2),
        ([b"01", b"23", b"45", b"67", b"89", b"AB"], 10, b"01234", b"789AB", 2),
        ([b"x" * 3, b"y" * 100], 6, b"xxx", b"yyy", 100 - 3),
        ([], 8, b"", b"", 0),
    ],
)
def test_head_tail_buffer_keeps_both_ends(chunks, limit, head, tail, omitted):
    buf = HeadTailBuffer(limit)
    for chunk in chunks:
        buf.append(chunk)
    view = buf.view()
    assert (view.head, view.tail, view.omitted) == (head, tail, omitted)
    assert buf.total == sum(map(len, chunks))


@given(st.lists(st.binary(max_size=50), max_size=30), st.integers(min_value=2, max_value=64))
def test_head_tail_buffer_is_exact_prefix_and_suffix(chunks, limit):
    buf = HeadTailBuffer(limit)
    for chunk in chunks:
        buf.append(chunk)
    data = b"".join(chunks)
    view = buf.view()
    assert len(buf) <= limit
    if not view.omitted:
        assert view.head + view.tail == data
    assert data.startswith(view.head)
    assert data.endswith(view.tail)
    assert view.omitted == len(data) - len(view.head) - len(view.tail)


@given(st.binary(max_size=300), st.integers(min_value=2, max_value=100), st.integers(min_value=2, max_value=100))
def test_clip_never_exceeds_limit_and_accounts_for_every_byte(data, buffer_limit, show_limit):
    buf = HeadTailBuffer(buffer_limit)
    buf.append(data)
    clip = buf.view().clip(show_limit)
    assert clip.shown <= show_limit
    assert data.startswith(clip.head) and data.endswith(clip.tail)
    assert clip.shown + clip.omitted == len(data)


def test_take_empties_the_buffer_but_holds_back_a_fragment():
    buf = HeadTailBuffer(100)
    buf.append(b"line one\nsec")
    first = buf.take(hold=3)
    assert first.head + first.tail == b"line one\n"
    buf.append(b"ret")
    assert buf.view().head == b"secret"


def test_render_marks_the_omission():
    assert render_clip(Clip(b"ab", b"yz", 10)) == "ab\n...[10 bytes omitted]...\nyz"
    assert render_clip(clip_bytes(b"abc", 10)) == "abc"


SECRET = "tok_ABCdef123456"


@pytest.mark.parametrize(
    "leak",
    [SECRET, quote(SECRET, safe=""), base64.b64encode(SECRET.encode()).decode(),
     f"Authorization: Bearer {SECRET}", f'{{"auth": "{SECRET}{SECRET}"}}'],
)
def test_redactor_removes_every_form(leak):
    r = Redactor({"API_TOKEN": SECRET})
    out = r.redact(leak)
    assert SECRET not in out and "[REDACTED:API_TOKEN]" in out
    assert SECRET.encode() not in r.redact_bytes(leak.encode())


def test_redactor_ignores_short_values_and_empty_config():
    assert not Redactor({})
    assert Redactor({"PIN": "1234"}).redact("pin 1234") == "pin 1234"
    assert Redactor({}).redact_obj({"a": ["x"]}) == {"a": ["x"]}


def test_redactor_walks_nested_data():
    r = Redactor({"T": SECRET})
    out = r.redact_obj({"a": [SECRET, {"b": f"x{SECRET}"}], "n": 3})
    assert out == {"a": ["[REDACTED:T]", {"b": "x[REDACTED:T]"}], "n": 3}


def test_pending_prefix_finds_the_start_of_a_secret():
    r = Redactor({"T": SECRET})
    assert r.pending_prefix(b"output tok_ABC") == len("tok_ABC")
    assert r.pending_prefix(b"output plain") == 0
    assert r.pending_prefix(SECRET.encode()) == 0  # a whole secret is redacted, not held


def test_secret_cut_at_the_truncation_point_is_masked():
    r = Redactor({"T": SECRET})
    clip = r.redact_clip(Clip(b"start tok_ABCd", b"ef123456 end", 5))
    assert b"tok_ABCd" not in clip.head and clip.head.endswith(b"[REDACTED:T]")
    assert b"ef123456" not in clip.tail and clip.tail.startswith(b"[REDACTED:T]")


@given(st.text(max_size=40), st.text(max_size=40))
def test_redacted_text_never_contains_the_secret(before, after):
    r = Redactor({"T": SECRET})
    assert SECRET not in r.redact(before + SECRET + after)


def test_take_holds_a_fragment_that_spans_head_and_tail():
    buf = HeadTailBuffer(10)
    buf.append(b"abcdefg")  # head "abcde", tail "fg", nothing omitted
    first = buf.take(hold=4)
    assert first.head + first.tail == b"abc" and not first.omitted
    assert buf.view().head == b"defg"


@given(st.binary(max_size=40), st.integers(min_value=0, max_value=50), st.integers(min_value=2, max_value=16))
def test_take_with_hold_loses_no_bytes_when_nothing_is_omitted(data, hold, limit):
    buf = HeadTailBuffer(limit * 4)
    buf.append(data[: limit * 4])
    taken = buf.take(hold=hold)
    kept = buf.view()
    assert taken.head + taken.tail + kept.head + kept.tail == data[: limit * 4]
