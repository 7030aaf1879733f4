"""SSH into the guest (vm.enable_ssh) with the host's real OpenSSH client."""

import shutil

import anyio
import pytest

from gondolin import VM, Checkpoint
from gondolin.ssh_access import SshError

pytestmark = [pytest.mark.anyio, pytest.mark.vm,
              pytest.mark.skipif(shutil.which("ssh") is None, reason="needs the OpenSSH client (openssh-client)")]
BATCH = ["-o", "BatchMode=yes", "-o", "ConnectTimeout=60"]


async def ssh(access, *args: str, options=()):
    """Run ``ssh`` with the access's command (non-interactive); the completed process.
    ``options`` go first: for each option ssh uses the first value it is given."""
    argv = [access.command[0], *options, *BATCH, *access.command[1:], *args]
    with anyio.fail_after(120):
        return await anyio.run_process(argv, check=False, input=b"")


@pytest.fixture(scope="module")
async def cold_vm():
    async with await VM.create(warm=False) as vm:
        yield vm


@pytest.fixture(scope="module")
async def access(cold_vm):
    return await cold_vm.enable_ssh()


async def test_ssh_runs_commands_in_a_cold_booted_vm(access):
    assert access.host == "127.0.0.1" and access.user == "agent"
    assert access.key_path.stat().st_mode & 0o077 == 0
    assert str(access) == " ".join(access.command)  # no characters needing quotes in run paths
    r = await ssh(access, "id -un; cd && pwd; echo $SSH_CONNECTION")
    assert r.returncode == 0, r.stderr
    user, home, conn = r.stdout.decode().splitlines()
    assert (user, home) == ("agent", "/home/agent")
    assert conn.split()[2:] == ["127.0.0.1", "22"]  # sshd sees a guest loopback connection
    r = await ssh(access, "cat > /tmp/from-ssh; wc -c < /tmp/from-ssh")
    assert r.returncode == 0 and r.stdout.strip() == b"0"


async def test_sshd_refuses_passwords_and_forwarding(cold_vm, access):
    r = await ssh(access, "true", options=["-o", "PubkeyAuthentication=no",
                                            "-o", "PreferredAuthentications=password,keyboard-interactive"])
    assert r.returncode == 255 and b"Permission denied (publickey)" in r.stderr
    r = await ssh(access, options=["-W", "127.0.0.1:22"])  # a TCP forward through sshd
    assert r.returncode != 0 and b"administratively prohibited" in r.stderr
    r = await ssh(access, "true", options=["-o", "ExitOnForwardFailure=yes", "-R", "0:127.0.0.1:22"])
    assert r.returncode != 0 and b"forwarding failed" in r.stderr
    effective = (await cold_vm.exec("/usr/sbin/sshd -T -f /run/gondolin/ssh/sshd_config")).stdout.splitlines()
    for line in ("listenaddress 127.0.0.1:22", "passwordauthentication no", "kbdinteractiveauthentication no",
                 "allowtcpforwarding no", "allowagentforwarding no", "x11forwarding no", "permittunnel no",
                 "allowstreamlocalforwarding no", "allowusers agent"):
        assert line in effective, line


async def test_a_wrong_host_key_is_refused(cold_vm, access, tmp_path):
    forged = tmp_path / "known_hosts"
    other = (await cold_vm.exec("ssh-keygen -q -t ed25519 -N '' -f /tmp/other && cat /tmp/other.pub")).stdout
    forged.write_text(f"{access.host_key_alias} {' '.join(other.split()[:2])}\n")
    r = await ssh(access, "true", options=["-o", f"UserKnownHostsFile={forged}"])
    assert r.returncode == 255 and b"Host key verification failed" in r.stderr


async def test_each_call_makes_new_keys_and_root_needs_asking(cold_vm, access):
    first = access
    second = await cold_vm.enable_ssh(user="root")
    assert second.host_key != first.host_key
    r = await ssh(second, "id -u")
    assert r.returncode == 0 and r.stdout.strip() == b"0", r.stderr
    with pytest.raises(OSError):  # the first listener was closed
        await anyio.connect_tcp(first.host, first.port)
    with pytest.raises(SshError, match="no user nobody-here"):
        await cold_vm.enable_ssh(user="nobody-here")
    with pytest.raises(ValueError):
        await cold_vm.enable_ssh(user="agent; reboot")


async def test_warm_restore_and_checkpoint_resume_get_their_own_keys(access, tmp_path, no_leaks):
    cold = access
    async with await VM.create() as warm:  # restored from the image's warm template
        assert warm.restored_from == "template"
        w = await warm.enable_ssh()
        assert w.host_key != cold.host_key
        r = await ssh(w, "echo warm")
        assert r.returncode == 0 and r.stdout == b"warm\n", r.stderr
        checkpoint = await warm.checkpoint(tmp_path / "ssh.ckpt")
        saved_key = tmp_path / "saved_key"
        shutil.copy(w.key_path, saved_key)
    assert not w.key_path.exists() and not w.known_hosts_path.exists()  # gone with their VM
    async with await Checkpoint.load(checkpoint.path).resume() as resumed:
        assert resumed.restored_from == "checkpoint"
        access = await resumed.enable_ssh()
        assert access.host_key not in (w.host_key, cold.host_key)
        r = await ssh(access, "echo resumed")
        assert r.returncode == 0 and r.stdout == b"resumed\n", r.stderr
        # The saved VM's client key is not authorized in the resumed one.
        stale = [*access.command[:1], "-i", str(saved_key), *access.command[3:]]
        with anyio.fail_after(120):
            r = await anyio.run_process([*stale[:-1], *BATCH, stale[-1], "true"], check=False)
        assert r.returncode == 255 and b"Permission denied" in r.stderr


def test_the_sync_facade_forwards_and_enables_ssh():
    import socket
    import subprocess

    from gondolin.sync import VM as SyncVM

    with SyncVM.create() as vm:
        vm.exec("nohup python3 -c \"import socket\ns=socket.create_server(('127.0.0.1',7300))\n"
                "c,_=s.accept();c.sendall(b'sync hello');c.close()\" >/dev/null 2>&1 &")
        access = vm.enable_ssh()  # sshd's own start gives the server above time to listen
        fwd = vm.forward_tcp(7300)
        with socket.create_connection((fwd.host, fwd.port), timeout=60) as client:
            assert client.recv(100) == b"sync hello"
        fwd.close()
        r = subprocess.run([*access.command[:-1], *BATCH, access.command[-1], "echo over ssh"],
                           capture_output=True, stdin=subprocess.DEVNULL, timeout=120)
        assert r.returncode == 0 and r.stdout == b"over ssh\n", r.stderr
    assert not access.key_path.exists()
