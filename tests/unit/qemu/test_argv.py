import pytest

from gondolin.options import parse_memory
from gondolin.qemu.argv import MachineSpec, SerialPort, build_argv


def spec(**kw):
    base = dict(kernel="/img/vmlinux", initrd="/img/initrd.img", disk="/img/rootfs.ext4")
    base.update(kw)
    return MachineSpec(**base)


def arg_after(argv, flag):
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_tcg_machine_with_control_port():
    argv = build_argv(spec(ports=(SerialPort("gondolin.control", "/run/x/control.sock"),)), "qemu")
    assert argv[0] == "qemu"
    assert "-no-reboot" in argv and "-nodefaults" in argv
    assert arg_after(argv, "-accel") == ["tcg,thread=multi"]
    assert arg_after(argv, "-m") == ["512M"]
    assert "socket,id=vp0,path=/run/x/control.sock,server=off" in arg_after(argv, "-chardev")
    assert "virtserialport,bus=vser.0,chardev=vp0,name=gondolin.control" in arg_after(argv, "-device")
    assert not any(a.startswith("stream") for a in arg_after(argv, "-netdev"))


def test_kvm_uses_host_cpu():
    argv = build_argv(spec(accel="kvm"))
    assert arg_after(argv, "-accel") == ["kvm"]
    assert arg_after(argv, "-cpu") == ["host"]


def test_readonly_disk_and_root_mode_reach_qemu_and_kernel():
    argv = build_argv(spec(disk_readonly=True, root_mode="overlay"))
    [drive] = arg_after(argv, "-drive")
    assert "readonly=on" in drive and "format=raw" in drive
    [append] = arg_after(argv, "-append")
    assert "gondolin.root=overlay" in append and "console=ttyS0" in append


def test_qcow2_overlay_disk():
    [drive] = arg_after(build_argv(spec(disk="/run/x/root.qcow2", disk_format="qcow2")), "-drive")
    assert drive.startswith("file=/run/x/root.qcow2,") and "format=qcow2" in drive and "readonly" not in drive


def test_network_socket_adds_nic_without_option_rom():
    argv = build_argv(spec(net_socket="/run/x/net.sock"))
    assert arg_after(argv, "-netdev") == ["stream,id=n0,server=off,addr.type=unix,addr.path=/run/x/net.sock"]
    assert any(d.startswith("virtio-net-pci,netdev=n0,romfile=,") for d in arg_after(argv, "-device"))


def test_incoming_and_qmp():
    argv = build_argv(spec(qmp_socket="/run/x/qmp.sock", incoming="exec:cat /t/mem"))
    assert arg_after(argv, "-qmp") == ["unix:/run/x/qmp.sock,server=on,wait=off"]
    assert arg_after(argv, "-incoming") == ["exec:cat /t/mem"]


@pytest.mark.parametrize("bad", [dict(cpus=0), dict(accel="hvf")])
def test_invalid_specs_are_refused(bad):
    with pytest.raises(ValueError):
        build_argv(spec(**bad))


@pytest.mark.parametrize(
    ("value", "mb"), [(512, 512), ("512M", 512), ("1G", 1024), ("2g", 2048), ("1GiB", 1024), ("768", 768)]
)
def test_parse_memory(value, mb):
    assert parse_memory(value) == mb


@pytest.mark.parametrize("value", ["lots", "12X", "64M", 16])
def test_parse_memory_rejects_nonsense_and_tiny(value):
    with pytest.raises(ValueError):
        parse_memory(value)
