"""The public API of `gondolin` is small and pinned: a change here is a deliberate API change."""

import inspect

import gondolin

EXPECTED = {
    "VM", "VMPool", "VMOptions", "Timeouts", "open_vm", "Checkpoint", "CheckpointError",
    "ExecProcess", "ExecResult", "OutputChunk", "DirEntry", "FileStat", "HttpHooks", "Provider",
    "RootfsMode", "MountMode",
    "GondolinError", "VMStartError", "VMDiedError", "VMUnresponsiveError", "VMClosedError", "ExecTimeout",
    "GuestTimeoutError", "GuestFileError", "GuestConnectionError", "ProtocolError", "ImageError", "MissingToolError",
}


def test_exports_are_pinned():
    assert set(gondolin.__all__) == EXPECTED
    public = {name for name in vars(gondolin) if not name.startswith("_")}
    assert EXPECTED <= public


def test_errors_share_a_base_and_have_distinct_codes():
    codes = {}
    for name in EXPECTED:
        obj = getattr(gondolin, name)
        if isinstance(obj, type) and issubclass(obj, BaseException):
            assert issubclass(obj, gondolin.GondolinError), name
            assert isinstance(obj.code, str) and obj.code, name
            assert obj.code not in codes, f"{name} and {codes.get(obj.code)} share the code {obj.code}"
            codes[obj.code] = name


def test_classes_and_functions_are_documented_and_come_from_gondolin():
    for name in EXPECTED - {"RootfsMode", "MountMode"}:
        obj = getattr(gondolin, name)
        assert obj.__module__.startswith("gondolin."), name
        assert inspect.getdoc(obj), f"{name} has no docstring"


def test_errors_survive_pickling_with_their_fields():
    import pickle

    err = gondolin.GuestFileError("guest open /x: No such file", errno=2, errno_name="ENOENT", path="/x")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is gondolin.GuestFileError
    assert (back.errno, back.errno_name, back.path, back.code, str(back)) == (2, "ENOENT", "/x", "ENOENT", str(err))
    died = pickle.loads(pickle.dumps(gondolin.VMUnresponsiveError("gone", ["last line"])))
    assert isinstance(died, gondolin.VMDiedError) and died.console == ["last line"] and died.code == "vm_unresponsive"
