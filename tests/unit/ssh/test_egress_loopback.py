"""The SSH egress proxy without a VM: a host `git`/`ssh` client talks to the proxy over a loopback
TCP connection that stands in for a guest flow (FlowInfo says the guest dialled git.test:22),
and the proxy relays to a real sshd on 127.0.0.1 with a key only it holds."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import anyio
import pytest

import gondolin
from gondolin.http.hooks import Decision, EventLog
from gondolin.net.flow import FlowInfo, FlowProtocol
from gondolin.ssh import SshDeny, SshProxyOptions, git_policy
from gondolin.ssh.egress import SshEgressProxy, SshProxyError
from tests.sshd import LoopbackSshd, find_sshd

pytestmark = [pytest.mark.anyio,
              pytest.mark.skipif(find_sshd() is None, reason="needs openssh-server (scripts/ensure-deps.sh)")]


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    with LoopbackSshd(tmp_path_factory.mktemp("sshd")) as server:
        server.bare_repo("repo")
        yield server


class Harness:
    def __init__(self, sshd: LoopbackSshd, tmp: Path, options: SshProxyOptions, host: str = "git.test") -> None:
        self.sshd = sshd
        self.tmp = tmp
        self.events = EventLog()
        self.proxy = SshEgressProxy(options.checked(), self.events)
        self.host = host
        self.port = 0
        self.kh = tmp / "guest_known_hosts"
        self.kh.write_text(self.proxy.known_hosts_line())

    def ssh_command(self) -> str:
        return (f"ssh -p {self.port} -o UserKnownHostsFile={self.kh} -o GlobalKnownHostsFile=/dev/null "
                "-o StrictHostKeyChecking=yes -o IdentitiesOnly=yes -o IdentityFile=/dev/null -o BatchMode=yes")

    async def run(self, argv: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "GIT_SSH_COMMAND": self.ssh_command(), "SSH_AUTH_SOCK": ""}
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
        env["GIT_SSH_COMMAND"] = self.ssh_command()
        argv = [a.replace("{ssh}", self.ssh_command()) for a in argv]  # "{ssh}": the ssh command line
        flow_port = 22

        async def serve(stream: anyio.abc.ByteStream) -> None:
            info = FlowInfo(FlowProtocol.SSH, "192.168.127.3", 40000, "198.19.0.1", flow_port, self.host)
            await self.proxy(info, stream)

        async with listener, anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, serve)
            with anyio.fail_after(120):
                result = await anyio.run_process(argv, cwd=cwd, env=env, check=False)
            tg.cancel_scope.cancel()
        return subprocess.CompletedProcess(argv, result.returncode, result.stdout.decode(), result.stderr.decode())


def options(sshd: LoopbackSshd, **kw) -> SshProxyOptions:
    base = dict(allowed_hosts=["git.test"], credential=str(sshd.client_key), known_hosts=str(sshd.known_hosts),
                upstreams={"git.test": sshd.address}, username=sshd.user,
                exec_policy=git_policy(read=["*"], write=["*/pushme.git"]))
    base.update(kw)
    return SshProxyOptions(**base)


def repo_url(sshd: LoopbackSshd, name: str = "repo") -> str:
    return f"git@git.test:{sshd.root}/repos/{name}.git"


async def test_clone_and_push_through_the_proxy(sshd, tmp_path):
    sshd.bare_repo("pushme")
    h = Harness(sshd, tmp_path, options(sshd))
    url = repo_url(sshd).replace("git.test", "127.0.0.1")
    r = await h.run(["git", "clone", "-q", url, str(tmp_path / "c")])
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "c" / "README").read_text() == "hello from the host repo\n"
    events = h.events.events()
    assert events[-1].scheme == "ssh" and events[-1].method == "git-upload-pack"
    assert events[-1].decision is Decision.ALLOWED and events[-1].status == 0 and events[-1].host == "git.test"

    # push to a repository the policy allows
    push_url = f"git@127.0.0.1:{sshd.root}/repos/pushme.git"
    r = await h.run(["git", "clone", "-q", push_url, str(tmp_path / "p")])
    assert r.returncode == 0, r.stderr
    work = tmp_path / "p"
    (work / "new.txt").write_text("pushed\n")
    git_env = ["-c", "user.name=t", "-c", "user.email=t@example.com"]
    await anyio.run_process(["git", *git_env, "add", "new.txt"], cwd=work)
    await anyio.run_process(["git", *git_env, "commit", "-q", "-m", "push"], cwd=work)
    r = await h.run(["git", "push", "-q", "origin", "HEAD:main"], cwd=work)
    assert r.returncode == 0, r.stderr
    log = (await anyio.run_process(["git", "--git-dir", f"{sshd.root}/repos/pushme.git", "log", "--format=%s",
                                    "main"])).stdout.decode()
    assert log.split() == ["push", "init"]

    # a push the policy does not allow
    work2 = tmp_path / "c"
    (work2 / "x").write_text("x")
    await anyio.run_process(["git", *git_env, "add", "x"], cwd=work2)
    await anyio.run_process(["git", *git_env, "commit", "-q", "-m", "nope"], cwd=work2)
    r = await h.run(["git", "push", "-q", "origin", "HEAD:main"], cwd=work2)
    assert r.returncode != 0
    assert "push to" in r.stderr and "not allowed" in r.stderr
    assert h.events.events()[-1].decision is Decision.BLOCKED


async def test_refusals_have_clear_messages(sshd, tmp_path):
    h = Harness(sshd, tmp_path, options(sshd, exec_policy=lambda host, port, user, cmd:
                                        SshDeny("no uname for you", 7) if "uname" in cmd else True))
    base = ["ssh", "-p", "{port}", "-o", f"UserKnownHostsFile={h.kh}", "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-o", "IdentityFile=/dev/null"]

    async def ssh(*args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "SSH_AUTH_SOCK": ""}
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        port = listener.extra(anyio.abc.SocketAttribute.local_port)

        async def serve(stream):
            await h.proxy(FlowInfo(FlowProtocol.SSH, "192.168.127.3", 1, "198.19.0.1", 22, h.host), stream)

        argv = [a.replace("{port}", str(port)) for a in base] + list(args)
        async with listener, anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, serve)
            with anyio.fail_after(60):
                r = await anyio.run_process(argv, env=env, check=False)
            tg.cancel_scope.cancel()
        return subprocess.CompletedProcess(argv, r.returncode, r.stdout.decode(), r.stderr.decode())

    r = await ssh("git@127.0.0.1", "uname -a")
    assert r.returncode == 7 and "no uname for you" in r.stderr
    r = await ssh("git@127.0.0.1", "echo", "relayed")
    assert r.returncode == 0 and r.stdout == "relayed\n", r.stderr
    r = await ssh("-T", "git@127.0.0.1")
    assert r.returncode == 1 and "interactive shells are not available" in r.stderr
    r = await ssh("-s", "git@127.0.0.1", "sftp")
    assert r.returncode != 0 and "'sftp' subsystem" in r.stderr
    r = await ssh("-W", "127.0.0.1:1", "git@127.0.0.1")
    assert r.returncode != 0 and "port forwarding is not available" in r.stderr

    h.host = "evil.test"
    r = await ssh("git@127.0.0.1", "echo hi")
    assert r.returncode == 1 and "evil.test:22 is not allowed" in r.stderr
    assert h.events.events()[-1].reason == "host not allowed"


async def test_wrong_upstream_host_key_is_refused(sshd, tmp_path):
    h = Harness(sshd, tmp_path, options(sshd, known_hosts=str(sshd.wrong_known_hosts())))
    r = await h.run(["git", "clone", "-q", repo_url(sshd).replace("git.test", "127.0.0.1"), str(tmp_path / "c")])
    assert r.returncode != 0
    assert "host key of 127.0.0.1:" in r.stderr and "not trusted" in r.stderr
    event = h.events.events()[-1]
    assert event.decision is Decision.BLOCKED and event.reason == "upstream host key not trusted"


async def test_host_key_verifier_callback(sshd, tmp_path):
    seen = []
    good = (sshd.root / "host_ed25519.pub").read_text().split()[1]

    def verifier(host, port, key):
        seen.append((host, port))
        return key.split()[1] == good

    h = Harness(sshd, tmp_path, options(sshd, known_hosts=None, host_key_verifier=verifier))
    r = await h.run(["git", "ls-remote", repo_url(sshd).replace("git.test", "127.0.0.1")])
    assert r.returncode == 0 and "refs/heads/main" in r.stdout, r.stderr
    assert seen == [("127.0.0.1", sshd.port)]


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_trio_is_refused_at_start(sshd, anyio_backend):
    with pytest.raises(ValueError, match="asyncio only"):
        options(sshd).checked()  # VMOptions.checked() says so before any VM starts
    with pytest.raises(SshProxyError, match="asyncio only"):
        SshEgressProxy(options(sshd))
    assert issubclass(SshProxyError, gondolin.GondolinError)


async def test_an_encrypted_key_without_passphrase_is_a_clear_error(sshd, tmp_path):
    key = tmp_path / "enc"
    await anyio.run_process(["ssh-keygen", "-q", "-t", "ed25519", "-N", "secret-pass", "-f", str(key)])
    with pytest.raises(SshProxyError, match="encrypted") as err:
        SshEgressProxy(options(sshd, credential=str(key)).checked())
    assert "secret-pass" not in str(err.value)
    SshEgressProxy(options(sshd, credential=str(key), passphrase="secret-pass").checked())


async def serve_proxy(proxy: SshEgressProxy, host: str = "git.test"):
    """A loopback listener whose connections are served by ``proxy`` as guest flows to host:22."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)

    async def serve(stream):
        await proxy(FlowInfo(FlowProtocol.SSH, "192.168.127.3", 1, "198.19.0.1", 22, host), stream)

    return listener, serve


async def test_upstream_limits_and_idle_timeout(sshd, tmp_path):
    import asyncssh

    policy = lambda host, port, user, cmd: True  # noqa: E731
    proxy = SshEgressProxy(options(sshd, exec_policy=policy, max_upstream_per_connection=1,
                                   max_upstream_total=2, idle_timeout=3).checked())
    listener, serve = await serve_proxy(proxy)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)

    def client():
        return asyncssh.connect("127.0.0.1", port, username="git", known_hosts=None, client_keys=None,
                                agent_path=None, config=None)

    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, serve)
        with anyio.fail_after(90):
            async with client() as one, client() as two, client() as three:
                first = await one.create_process("sleep 60")
                await anyio.sleep(0.5)
                second = await one.run("echo second", check=False)  # same connection: over the per-connection limit
                assert second.exit_status == 1 and "too many concurrent commands" in second.stderr
                other = await two.create_process("sleep 60")
                await anyio.sleep(0.5)
                third = await three.run("echo third", check=False)  # the VM-wide limit of 2
                assert third.exit_status == 1 and "too many SSH upstream connections" in third.stderr
                # Idle for idle_timeout: the proxy closes the guest connections and their upstreams.
                await first.wait_closed()
                await other.wait_closed()
                assert first.exit_status is None or first.exit_status != 0
        assert proxy.upstream_total == 0
        tg.cancel_scope.cancel()


async def test_ssh_agent_credential(sshd, tmp_path):
    sock = tmp_path / "agent.sock"
    agent = await anyio.open_process(["ssh-agent", "-D", "-a", str(sock)])
    try:
        for _ in range(400):  # ssh-agent -D creates its socket at once; up to 20 s on a busy machine
            if sock.exists():
                break
            await anyio.sleep(0.05)
        await anyio.run_process(["ssh-add", "-q", str(sshd.client_key)], env={**os.environ, "SSH_AUTH_SOCK": str(sock)})
        h = Harness(sshd, tmp_path, options(sshd, credential=None, use_agent=str(sock)))
        r = await h.run(["git", "ls-remote", repo_url(sshd).replace("git.test", "127.0.0.1")])
        assert r.returncode == 0 and "refs/heads/main" in r.stdout, r.stderr
    finally:
        agent.kill()
        await agent.wait()
        await agent.aclose()


async def test_bulk_stdin_and_stdout_with_eof_and_exit_status(sshd, tmp_path):
    h = Harness(sshd, tmp_path, options(sshd, exec_policy=lambda host, port, user, cmd: True))
    size = 8 * 1024 * 1024
    payload = os.urandom(size)
    (tmp_path / "payload").write_bytes(payload)

    script = (f"{{ssh}} git@127.0.0.1 sha256sum < {tmp_path / 'payload'} && "
              f"{{ssh}} git@127.0.0.1 'head -c {size} /dev/zero' | wc -c && "
              "{ssh} git@127.0.0.1 'exit 42'; echo status=$?")
    # One shell runs three ssh commands; each is its own guest connection to the proxy.
    r = await h.run(["bash", "-c", script])
    assert hashlib.sha256(payload).hexdigest() in r.stdout, r.stderr
    assert f"\n{size}\n" in "\n" + r.stdout
    assert r.stdout.strip().endswith("status=42"), r.stdout
