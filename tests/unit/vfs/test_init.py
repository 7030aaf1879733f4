import gondolin.vfs as vfs


def test_public_names_are_pinned() -> None:
    assert sorted(vfs.__all__) == sorted(
        [
            "Attr", "Caller", "Changes", "CommitConflict", "CopyOnWriteProvider", "Dirent",
            "FileHandle", "FsRpcService", "FsRpcStats", "HookEvent", "HookedProvider",
            "MemoryProvider", "MountRouter", "OpenMode", "OverlayProvider", "Provider",
            "ProviderWrapper", "RENAME_EXCHANGE", "RENAME_NOREPLACE", "ReadonlyProvider",
            "RealFSProvider", "SetAttr", "ShadowProvider", "StatFs", "VfsError",
        ]
    )  # fmt: skip
    for name in vfs.__all__:
        assert getattr(vfs, name) is not None
