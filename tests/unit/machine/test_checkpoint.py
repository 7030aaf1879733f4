import dataclasses
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gondolin import Checkpoint
from gondolin.machine.checkpoint import (
    HEADER_SPACE,
    MAGIC,
    CheckpointError,
    CheckpointHeader,
    SavedOptions,
    SectionInfo,
    decode_header,
    encode_header,
    list_checkpoints,
)
from gondolin.machine.shape import MachineShape

SHAPE = MachineShape(image="abc123", memory_mb=512, cpus=1, rootfs="cow", accel="tcg", network=True,
                     fs_port=False, qemu="QEMU emulator version 7.2.0", devices="d" * 24)
MEMORY = b"m" * 5000
DISK = b"QFI\xfb" + b"d" * 3000


def header(kind="full", **kw):
    sections = {"memory": SectionInfo(HEADER_SPACE, len(MEMORY), zlib.crc32(MEMORY)),
                "disk": SectionInfo(HEADER_SPACE + 8192, len(DISK), zlib.crc32(DISK))}
    if kind == "disk":
        sections = {"disk": SectionInfo(HEADER_SPACE, len(DISK), zlib.crc32(DISK))}
    base = dict(kind=kind, created=1700000000.5, image="abc123", kernel_version="6.1.0", shape=SHAPE,
                options=SavedOptions(hostname="h", label="lbl", env={"A": "1"}, network=True, dns="trusted",
                                     tcp_hosts={"db:5432": "127.0.0.1:5432"}, mounts=("/workspace",)),
                sections=sections, vm_id="0123456789ab")
    base.update(kw)
    return CheckpointHeader(**base)


def write_file(path, h):
    data = bytearray(encode_header(h))
    for name, blob in (("memory", MEMORY), ("disk", DISK)):
        if name in h.sections:
            sec = h.sections[name]
            data += bytes(sec.offset - len(data))
            data += blob
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("kind", ["full", "disk"])
def test_header_round_trip(kind):
    h = header(kind)
    raw = encode_header(h)
    assert len(raw) == HEADER_SPACE and raw.startswith(MAGIC)
    assert decode_header(raw, h.end()) == h


@pytest.mark.parametrize(
    "mutate, code",
    [
        (lambda b: b"PK\x03\x04" + b[4:], "not_a_checkpoint"),
        (lambda b: b[:10], "not_a_checkpoint"),
        (lambda b: b[:30], "checkpoint_truncated"),
        (lambda b: b[:40] + bytes([b[40] ^ 1]) + b[41:], "checkpoint_corrupt"),  # a flipped header bit
        (lambda b: b[:16] + (HEADER_SPACE * 2).to_bytes(4, "big") + b[20:], "checkpoint_corrupt"),
    ],
)
def test_bad_headers_are_clear_errors(mutate, code):
    h = header()
    with pytest.raises(CheckpointError) as err:
        decode_header(mutate(encode_header(h)), h.end())
    assert err.value.code == code


def test_a_truncated_file_is_refused():
    h = header()
    with pytest.raises(CheckpointError) as err:
        decode_header(encode_header(h), h.end() - 1)
    assert err.value.code == "checkpoint_truncated" and "truncated" in str(err.value)


def test_an_unknown_format_says_so():
    import json
    import struct

    body = json.dumps({"format": 99}).encode()
    raw = MAGIC + struct.pack(">II", len(body), zlib.crc32(body)) + body
    with pytest.raises(CheckpointError) as err:
        decode_header(raw, HEADER_SPACE)
    assert err.value.code == "checkpoint_format"


def test_a_header_that_does_not_fit_is_refused():
    with pytest.raises(CheckpointError):
        encode_header(header(options=SavedOptions(env={"BIG": "x" * HEADER_SPACE})))


@settings(max_examples=200, deadline=None)
@given(pos=st.integers(0, 400), bit=st.integers(0, 7))
def test_any_flipped_bit_in_the_header_is_caught_or_harmless(pos, bit):
    h = header()
    raw = bytearray(encode_header(h))
    raw[pos] ^= 1 << bit
    try:
        decoded = decode_header(bytes(raw), h.end())
    except CheckpointError:
        return
    assert decoded == h  # only padding was hit


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600))
def test_arbitrary_bytes_never_crash_the_decoder(data):
    try:
        decode_header(MAGIC + data, 1 << 40)
    except CheckpointError:
        pass


def test_load_and_verify(tmp_path):
    path = write_file(tmp_path / "a.ckpt", header())
    cp = Checkpoint.load(path)
    assert (cp.kind, cp.image_id, cp.label, cp.shape) == ("full", "abc123", "lbl", SHAPE)
    cp.verify()
    before = path.read_bytes()
    data = bytearray(before)
    data[HEADER_SPACE + 100] ^= 0xFF  # corrupt the memory section
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as err:
        Checkpoint.load(path).verify()
    assert err.value.code == "checkpoint_corrupt" and "memory" in str(err.value)


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(CheckpointError) as err:
        Checkpoint.load(tmp_path / "missing.ckpt")
    assert err.value.code == "checkpoint_missing"
    path = write_file(tmp_path / "t.ckpt", header())
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CheckpointError) as err:
        Checkpoint.load(path)
    assert "t.ckpt" in str(err.value) and err.value.code == "checkpoint_truncated"


def test_list_checkpoints_newest_first_and_skips_junk(tmp_path):
    write_file(tmp_path / "old.ckpt", header(created=1.0))
    write_file(tmp_path / "new.ckpt", header("disk", created=2.0))
    (tmp_path / "junk.ckpt").write_bytes(b"nope")
    (tmp_path / "other.txt").write_text("x")
    assert [c.path.name for c in list_checkpoints(tmp_path)] == ["new.ckpt", "old.ckpt"]


def test_options_survive_the_round_trip():
    h = header()
    got = decode_header(encode_header(h), h.end()).options
    assert got == h.options and got.mounts == ("/workspace",)
    assert dataclasses.asdict(got)["tcp_hosts"] == {"db:5432": "127.0.0.1:5432"}
