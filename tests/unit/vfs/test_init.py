import gondolin.vfs as vfs
from tests.support import assert_exports


def test_public_names_are_pinned() -> None:
    assert_exports(
        vfs,
        [
            "Attr", "Caller", "Changes", "CommitConflict", "CopyOnWriteProvider", "Dirent",
            "FileHandle", "FsRpcService", "FsRpcStats", "HookEvent", "HookedProvider",
            "MemoryProvider", "MountRouter", "OpenMode", "OverlayProvider", "Provider",
            "ProviderWrapper", "RENAME_EXCHANGE", "RENAME_NOREPLACE", "ReadonlyProvider",
            "RealFSProvider", "SetAttr", "ShadowProvider", "StatFs", "VfsError",
        ]
    )  # fmt: skip
