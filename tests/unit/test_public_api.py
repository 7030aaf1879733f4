"""The public API of `gondolin` is small and pinned: a change here is a deliberate API change."""

import gondolin

EXPECTED = {
    "VM", "VMPool", "Checkpoint", "CheckpointError",
    "ExecProcess", "ExecResult", "OutputChunk", "DirEntry", "FileStat",
    "GondolinError", "VMStartError", "VMDiedError", "VMClosedError", "ExecTimeout", "GuestFileError",
    "ProtocolError", "ImageError", "MissingToolError",
}


def test_exports_are_pinned():
    assert set(gondolin.__all__) == EXPECTED


def test_every_export_exists_and_errors_share_a_base():
    for name in gondolin.__all__:
        assert getattr(gondolin, name) is not None
    for name in EXPECTED:
        obj = getattr(gondolin, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, gondolin.GondolinError)
            assert isinstance(obj.code, str) and obj.code
