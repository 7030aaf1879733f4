"""The bulk-transfer region (gondolin.shm) and vm.fs transfers through it, against a scripted
guest that reads and writes the region file as the agent does through the ivshmem BAR."""

import os

import anyio
import pytest

from gondolin.errors import GuestFileError, ProtocolError
from gondolin.fs import GuestFS
from gondolin.protocol import T
from gondolin.shm import CHUNK, MIN_TRANSFER, SLOT_COUNT, SharedRegion
from tests.support import BOTH_BACKENDS, fake_machine

SIZE = 64 << 20  # sparse: only the pages a test touches exist


@pytest.fixture
def region(tmp_path):
    r = SharedRegion(tmp_path / "xfer.mem", SIZE)
    r.usable = True
    yield r
    r.close()


def test_slots_are_handed_out_once_released_with_their_pages_and_retired_for_good(region):
    assert SharedRegion(region.path.with_name("other.mem"), SIZE).take() is None  # not usable yet
    slots = [region.take() for _ in range(SLOT_COUNT)]
    assert sorted(s.offset for s in slots) == [i * region.slot_size for i in range(SLOT_COUNT)]
    assert slots[0].size * SLOT_COUNT <= len(region.view) - len(region.fuse_area())
    assert region.take() is None  # all busy: the caller uses the control channel
    a, b = slots[0], slots[1]
    region.view[a.offset:a.offset + 5] = b"dirty"
    a.release()
    a.release()  # twice is harmless
    assert bytes(region.view[a.offset:a.offset + 5]) == b"\0" * 5  # pages punched out
    again = region.take()
    assert again is not None and again.offset == a.offset
    b.retire()
    b.release()  # a retired slot never comes back
    assert region.take() is None
    with open(region.path, "rb") as f:  # the host's writes are in the file QEMU maps
        assert os.fstat(f.fileno()).st_size == SIZE


def test_the_guest_may_only_announce_the_next_bytes_of_its_ring_within_credit(region):
    slot = region.take()
    size = slot.size
    bad = [{"off": slot.offset + 1, "len": 10},  # not at the ring position
           {"off": slot.offset, "len": 0}, {"off": slot.offset, "len": -1},
           {"off": slot.offset, "len": size + 1},  # past the slot
           {"off": slot.offset, "len": 101},  # past the credit
           {"off": True, "len": 10}, {"off": str(slot.offset), "len": 10}, {"len": 10}]
    for p in bad:
        with pytest.raises(ProtocolError):
            slot.take_incoming(p, 100)
    assert len(slot.take_incoming({"off": slot.offset, "len": size - 10}, size)) == size - 10
    with pytest.raises(ProtocolError):  # a span never wraps past the slot's end
        slot.take_incoming({"off": slot.offset + size - 10, "len": 20}, size)
    assert len(slot.take_incoming({"off": slot.offset + size - 10, "len": 10}, size)) == 10
    assert slot.pos == 0  # wrapped
    off, span = slot.next_span(10 * CHUNK)
    assert off == slot.offset and len(span) == min(CHUNK, size)


def test_a_closed_region_hands_out_nothing(tmp_path):
    r = SharedRegion(tmp_path / "x.mem", SIZE)
    r.usable = True
    r.close()
    r.close()
    assert r.take() is None
    with pytest.raises(FileExistsError):  # a run directory's region is never reused
        SharedRegion(tmp_path / "x.mem", SIZE)


@BOTH_BACKENDS
@pytest.mark.anyio
async def test_a_large_write_goes_through_the_region_and_frees_its_slot(region):
    data = os.urandom(3 * region.slot_size + 12345)  # wraps the 1 MiB ring three times
    async with fake_machine() as machine:
        fs = GuestFS(machine, region=lambda: region)

        async def guest():
            req = await machine.guest.expect(T.FILE_WRITE)
            off, size = req.p["shm"]
            got = bytearray()
            while (msg := await machine.guest.receive()).t == T.FILE_SHM:
                assert msg.data == b"" and off <= msg.p["off"] and msg.p["off"] + msg.p["len"] <= off + size
                got += region.view[msg.p["off"]:msg.p["off"] + msg.p["len"]]
                await machine.guest.send(T.CREDIT, req.id, file=msg.p["len"])
            assert msg.t == T.FILE_EOF and bytes(got) == data
            await machine.guest.send(T.FILE_DONE, req.id, size=len(got))

        async with anyio.create_task_group() as tg:
            tg.start_soon(guest)
            assert await fs.write("/big", data) == len(data)
        assert region.free_slots == SLOT_COUNT

        async def small():  # below MIN_TRANSFER: inline, no slot
            req = await machine.guest.expect(T.FILE_WRITE)
            assert "shm" not in req.p
            assert (await machine.guest.expect(T.FILE_DATA)).data == b"tiny"
            await machine.guest.expect(T.FILE_EOF)
            await machine.guest.send(T.FILE_DONE, req.id, size=4)

        async with anyio.create_task_group() as tg:
            tg.start_soon(small)
            assert await fs.write("/small", b"tiny") == 4


@BOTH_BACKENDS
@pytest.mark.anyio
async def test_a_large_read_comes_through_the_region_and_a_lying_guest_is_refused(region):
    data = os.urandom(2 * region.slot_size + 777)
    async with fake_machine() as machine:
        fs = GuestFS(machine, region=lambda: region)

        async def guest(lie: bool):
            while (req := await machine.guest.receive()).t == T.CREDIT:
                pass  # credit the host returned after the previous read's last bytes
            assert req.t == T.FILE_READ
            off, size = req.p["shm"]
            await machine.guest.send(T.FILE_DONE, req.id, size=len(data), shm=True)
            pos, credit, sent = 0, size, 0
            while sent < len(data):
                n = min(len(data) - sent, credit, size - pos, CHUNK)
                if n == 0:
                    credit += (await machine.guest.expect(T.CREDIT)).p["file"]
                    continue
                region.view[off + pos:off + pos + n] = data[sent:sent + n]
                announced = off + pos + (4096 if lie else 0)
                await machine.guest.send(T.FILE_SHM, req.id, off=announced, len=n)
                if lie:
                    return
                sent += n
                credit -= n
                pos = (pos + n) % size
            await machine.guest.send(T.FILE_EOF, req.id)

        got = []

        async def read():
            async for chunk in await fs.open_read("/big"):
                got.append(chunk)

        async with anyio.create_task_group() as tg:
            tg.start_soon(guest, False)
            await read()
        assert b"".join(got) == data and region.free_slots == SLOT_COUNT

        async with anyio.create_task_group() as tg:
            tg.start_soon(guest, True)
            with pytest.raises(ProtocolError, match="outside its slot"):
                await read()
        assert region.free_slots == SLOT_COUNT - 1  # the liar's slot is never used again


@BOTH_BACKENDS
@pytest.mark.anyio
async def test_a_small_file_is_sent_inline_and_a_failed_open_frees_the_slot(region):
    async with fake_machine() as machine:
        fs = GuestFS(machine, region=lambda: region)

        async def guest():
            req = await machine.guest.expect(T.FILE_READ)
            assert "shm" in req.p  # size unknown up front: offered, the guest decides
            await machine.guest.send(T.FILE_DONE, req.id, size=3, shm=False)
            await machine.guest.send(T.FILE_DATA, req.id, b"abc")
            await machine.guest.send(T.FILE_EOF, req.id)
            req = await machine.guest.expect(T.FILE_READ)
            await machine.guest.send(T.ERROR, req.id, code="ENOENT", errno=2, message="no such file")
            req = await machine.guest.expect(T.FILE_READ)
            assert "shm" not in req.p  # a short ranged read never takes a slot
            await machine.guest.send(T.FILE_DONE, req.id, size=3)
            await machine.guest.send(T.FILE_EOF, req.id)

        async with anyio.create_task_group() as tg:
            tg.start_soon(guest)
            assert await fs.read_bytes("/small") == b"abc"
            assert region.free_slots == SLOT_COUNT
            with pytest.raises(GuestFileError):
                await fs.read_bytes("/missing")
            assert region.free_slots == SLOT_COUNT
            chunks = [c async for c in await fs.open_read("/r", length=MIN_TRANSFER - 1)]
            assert chunks == []
