import anyio
import pytest

from gondolin.errors import GondolinError, VMStartError
from gondolin.images.store import Image
from gondolin.qemu import accel


@pytest.fixture
def image(tmp_path):
    return Image("abc123abc123", tmp_path, {"kernel_version": "6.1.0-test"})


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("GONDOLIN_ACCEL", raising=False)


def run(coro_fn, *args):
    return anyio.run(coro_fn, *args)


async def never_called(image, accel_name, timeout):
    raise AssertionError("probe must not run")


def test_env_override_wins(image, monkeypatch):
    monkeypatch.setenv("GONDOLIN_ACCEL", "tcg")
    choice = run(accel.decide, image, never_called)
    assert (choice.accel, choice.reason) == ("tcg", "set by GONDOLIN_ACCEL")


def test_env_override_is_validated(image, monkeypatch):
    monkeypatch.setenv("GONDOLIN_ACCEL", "xen")
    with pytest.raises(GondolinError):
        run(accel.decide, image, never_called)


def test_no_kvm_device_means_tcg_without_probe(image, monkeypatch):
    monkeypatch.setattr(accel, "kvm_usable", lambda: (False, "/dev/kvm does not exist"))
    choice = run(accel.decide, image, never_called)
    assert choice.accel == "tcg" and "/dev/kvm does not exist" in choice.reason


def test_probe_that_hangs_falls_back_to_tcg_and_is_cached(image, monkeypatch):
    monkeypatch.setattr(accel, "kvm_usable", lambda: (True, "present"))
    calls = []

    async def hanging(img, accel_name, timeout):
        calls.append((accel_name, timeout))
        raise VMStartError("the guest agent did not answer within 10s", code="vm_start_timeout")

    first = run(accel.decide, image, hanging)
    assert first.accel == "tcg" and "KVM probe boot failed" in first.reason and not first.cached
    second = run(accel.decide, image, never_called)
    assert second.accel == "tcg" and second.cached
    assert calls == [("kvm", accel.PROBE_TIMEOUT)]


def test_probe_that_answers_chooses_kvm(image, monkeypatch):
    monkeypatch.setattr(accel, "kvm_usable", lambda: (True, "present"))

    async def fine(img, accel_name, timeout):
        return None

    assert run(accel.decide, image, fine).accel == "kvm"


def test_cache_is_per_image_kernel(image, tmp_path, monkeypatch):
    monkeypatch.setattr(accel, "kvm_usable", lambda: (True, "present"))

    async def fine(img, accel_name, timeout):
        return None

    run(accel.decide, image, fine)
    other = Image("def456def456", tmp_path, {"kernel_version": "6.2.0-other"})
    probed = []

    async def probe(img, accel_name, timeout):
        probed.append(img.kernel_version)
        raise VMStartError("hang")

    assert run(accel.decide, other, probe).accel == "tcg"
    assert probed == ["6.2.0-other"]
