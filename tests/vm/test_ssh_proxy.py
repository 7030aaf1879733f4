"""SSH egress through the host's proxy, from a real guest: `git clone` and `git push` over SSH to
a real sshd on host loopback with a key that never enters the guest; refusals (command, unknown
host, wrong upstream host key, shell, sftp) with clear messages; audit events. One VM."""

from __future__ import annotations

import shlex

import anyio
import pytest

from gondolin import VM
from gondolin.http.hooks import Decision
from gondolin.ssh import SshProxyOptions, git_policy
from tests.sshd import LoopbackSshd, find_sshd

pytestmark = [pytest.mark.anyio, pytest.mark.vm,
              pytest.mark.skipif(find_sshd() is None, reason="needs openssh-server (scripts/ensure-deps.sh)")]

GIT = "git -c user.name=agent -c user.email=agent@example.com"


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    root = tmp_path_factory.mktemp("sshd")
    with LoopbackSshd(root / "good") as good, LoopbackSshd(root / "badkey") as badkey:
        good.bare_repo("repo")
        good.bare_repo("pushme")
        badkey.bare_repo("repo")
        yield good, badkey


@pytest.fixture(scope="module")
async def vm(servers):
    good, badkey = servers
    ssh = SshProxyOptions(
        allowed_hosts=["git.test", "badkey.test"], credential=str(good.client_key), username=good.user,
        known_hosts=[str(good.known_hosts), str(badkey.wrong_known_hosts())],
        upstreams={"git.test": good.address, "badkey.test": badkey.address},
        exec_policy=git_policy(read=["*"], write=["*/pushme.git"]))
    async with await VM.create(memory="512M", ssh=ssh) as machine:
        yield machine


async def sh(vm: VM, script: str, timeout: float = 180):
    return await vm.exec(["bash", "-c", script], timeout=timeout)


async def test_clone_and_push_over_ssh_without_the_key_in_the_guest(vm, servers):
    good, _ = servers
    repos = good.root / "repos"
    r = await sh(vm, f"set -e; git clone -q git@git.test:{repos}/repo.git /tmp/c; cat /tmp/c/README")
    assert r.exit_code == 0, r.stderr
    assert r.stdout == "hello from the host repo\n"

    r = await sh(vm, f"set -e; git clone -q git@git.test:{repos}/pushme.git /tmp/p; cd /tmp/p; "
                     f"echo from-guest > guest.txt; {GIT} add guest.txt; {GIT} commit -q -m from-guest; "
                     "git push -q origin HEAD:main")
    assert r.exit_code == 0, r.stderr
    out = await anyio.run_process(["git", "--git-dir", str(repos / "pushme.git"), "show", "main:guest.txt"])
    assert out.stdout == b"from-guest\n"

    # The private key is nowhere in the guest: not in any file, not in any process environment.
    key_lines = [line for line in good.client_key.read_text().splitlines() if "PRIVATE KEY" not in line and len(line) >= 20]
    patterns = " ".join(f"-e {shlex.quote(line)}" for line in key_lines)
    r = await sh(vm, f"grep -rlF {patterns} / --exclude-dir=proc --exclude-dir=sys --exclude-dir=dev 2>/dev/null; "
                     f"cat /proc/[0-9]*/environ 2>/dev/null | tr '\\0' '\\n' | grep -cF {patterns}; true",
                 timeout=300)
    assert r.stdout.strip() == "0", f"private key material found in the guest: {r.stdout!r}"
    proxy_key = vm.network.ssh.host_key.export_public_key("openssh").decode().split()[1]
    r = await sh(vm, f"grep -rlF {shlex.quote(proxy_key)} /etc")  # the same search finds what is there
    assert r.stdout.split() == ["/etc/ssh/ssh_known_hosts"], r.stdout
    r = await sh(vm, "ls -A ~/.ssh 2>/dev/null; echo ${SSH_AUTH_SOCK:-none}")
    assert "id_" not in r.stdout and r.stdout.strip().endswith("none")

    events = [e for e in vm.network.events() if e.scheme == "ssh"]
    services = [(e.method, e.decision) for e in events]
    assert ("git-upload-pack", Decision.ALLOWED) in services
    assert ("git-receive-pack", Decision.ALLOWED) in services
    assert all(line not in repr(e) for e in events for line in key_lines)


async def test_refusals_reach_the_guest_with_clear_messages(vm, servers):
    good, _ = servers
    repos = good.root / "repos"
    r = await sh(vm, "ssh git@git.test uname -a")
    assert r.exit_code == 1 and "only git fetch/push commands are allowed" in r.stderr, r.stderr

    r = await sh(vm, f"cd /tmp/c && echo x > x && {GIT} add x && {GIT} commit -q -m x && git push -q origin HEAD:main")
    assert r.exit_code != 0 and "push to" in r.stderr and "not allowed" in r.stderr, r.stderr

    r = await sh(vm, "ssh git@other.test git-upload-pack /x.git")
    assert r.exit_code == 1 and "other.test:22 is not allowed" in r.stderr, r.stderr

    r = await sh(vm, f"git ls-remote git@badkey.test:{repos}/repo.git")
    assert r.exit_code != 0 and "not trusted" in r.stderr and "host key of 127.0.0.1:" in r.stderr, r.stderr

    r = await sh(vm, "ssh -T git@git.test")
    assert r.exit_code == 1 and "interactive shells are not available" in r.stderr, r.stderr

    r = await sh(vm, "echo 'ls' | sftp -b - git@git.test")
    assert r.exit_code != 0 and "'sftp' subsystem" in r.stderr, r.stderr

    r = await sh(vm, "ssh -W 127.0.0.1:22 git@git.test")
    assert r.exit_code != 0 and "port forwarding is not available" in r.stderr, r.stderr

    reasons = {e.reason for e in vm.network.events() if e.scheme == "ssh" and e.decision is not Decision.ALLOWED}
    assert "host not allowed" in reasons and "upstream host key not trusted" in reasons
