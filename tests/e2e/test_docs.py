"""Every fenced ``python``, ``sh``/``bash`` and ``toml`` block in README.md and docs/ runs as written.

How a block runs:

- ``python``: blocks of one page share a namespace, in page order, like a doctest session. A
  block with top-level ``await`` runs on the test's event loop; any other block (``anyio.run(main)``
  programs, the synchronous facade) runs in a worker thread, where no loop is running. The
  namespace starts with a running ``vm`` (one VM per page) and the few names the prose
  implies (``PAGE_CONTEXT``): a fragment such as ``r = await vm.exec(...)`` is run against it.
  A block that closes its own ``vm`` gets the page's back; VMs blocks leave open are closed
  at the end.
- ``sh``/``bash``: each command (a line, with ``\\`` continuations) runs with ``bash -c`` in a
  scratch directory, with ``.venv/bin`` first on PATH and stdin from /dev/null, and must exit 0.
- ``toml``: parsed; on docs/mcp.md it must load as an operator configuration.

Both run in a scratch directory holding what the pages' examples name as "your" files: a
``project`` directory with a ``Makefile`` (``make test``), a ``data`` directory and ``local.tar``.

One rewrite, for the host and not the page: where this machine resolves a host an example
allows (``--allow pypi``) to an internal address (a local mirror or proxy, as on some CI
machines), the command gets ``--allow-internal-host HOST`` too, which a machine resolving the
public addresses does not need.

A page may put one HTML comment right before a fence to say how that block is run (it is not
shown by Markdown renderers, so readers copy the block exactly as it is):

- ``<!-- doc-test: skip: REASON -->``: not run here (a real API key, an external program, or
  the command that runs this very test); REASON names where its offline path is tested. The
  test reports it as skipped with REASON, never silently.
- ``<!-- doc-test: env NAME=VALUE ... -->``: extra host environment for a shell block (a
  dummy token for a command that reads one).
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import socket
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LANGS = {"python", "sh", "bash", "toml"}
FENCE = re.compile(r"^(?:<!-- doc-test: (?P<directive>.*?) -->\n)?```(?P<lang>\w*)\n(?P<body>.*?)^```", re.M | re.S)
SHELL_TIMEOUT = 300

pytestmark = [pytest.mark.vm, pytest.mark.anyio]

# Names a page's prose implies for its fragments (a secret's value, the registry built earlier).
PAGE_CONTEXT: dict[str, str] = {
    "network.md": "key = value = new_value = v = 'sk-doc-test-0123456789'\n"
                  "os.environ.setdefault('GITHUB_TOKEN', 'ghp_doc_test_0123456789')\n",
    "sdk.md": "async def _chunks():\n    yield b'x' * 65536\nasync_iterator_of_bytes = _chunks()\n",
}


@dataclass
class Block:
    page: str
    line: int
    lang: str
    body: str
    directive: str = ""
    env: dict[str, str] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


def collect() -> list[Block]:
    blocks = []
    for path in PAGES:
        text = path.read_text()
        for m in FENCE.finditer(text):
            if m["lang"] not in LANGS:
                continue
            directive = (m["directive"] or "").strip()
            block = Block(path.name, text[: m.start("body")].count("\n"), m["lang"], m["body"], directive)
            if directive.startswith("env "):
                block.env = dict(item.split("=", 1) for item in shlex.split(directive[4:]))
            elif directive and not directive.startswith("skip: "):
                raise AssertionError(f"{block.id}: unknown doc-test directive {directive!r}")
            blocks.append(block)
    return blocks


BLOCKS = collect()


def test_the_collection_is_not_empty_and_skips_are_few():
    """A skipped block must say where its offline path runs (an existing test or cookbook
    file); skips that name none are the exception."""
    assert len(BLOCKS) > 25
    skipped = [b for b in BLOCKS if b.directive.startswith("skip: ")]
    unrun = []
    for block in skipped:
        named = re.findall(r"(?:tests|cookbook)/[\w/]+\.py", block.directive)
        missing = [path for path in named if not (ROOT / path).is_file()]
        assert not missing, f"{block.id}: its skip names {missing}, which do not exist"
        if not named:
            unrun.append(block.id)
    assert len(unrun) <= len(BLOCKS) // 10, unrun


# -- python ------------------------------------------------------------------------------------
class PageSession:
    """One namespace and one VM per page."""

    def __init__(self, vm: Any, page: str) -> None:
        self.vm = vm
        self.made: list[Any] = []  # VMs the page's blocks created and left open: closed at the end
        self.namespace: dict[str, Any] = {"__name__": f"doc_{page.replace('.', '_')}", "vm": vm,
                                          "anyio": anyio, "os": os}
        exec(PAGE_CONTEXT.get(page, ""), self.namespace)

    async def run(self, block: Block) -> None:
        filename = f"<{block.id}>"
        source = "\n" * (block.line - 1) + block.body  # tracebacks point at the page's lines
        code = compile(source, filename, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
        from gondolin import VM

        try:
            if code.co_flags & 0x80:  # CO_COROUTINE: the block awaits at top level
                await eval(code, self.namespace)
            else:
                await anyio.to_thread.run_sync(exec, code, self.namespace)
        finally:
            self.made += [v for v in self.namespace.values() if isinstance(v, VM) and v not in self.made]
            if not getattr(self.namespace.get("vm"), "running", False):
                self.namespace["vm"] = self.vm  # `vm` in the prose is always a running VM


@pytest.fixture(scope="module")
async def sessions():
    from gondolin import VM

    opened: dict[str, PageSession] = {}
    vms = []
    try:
        async def session(page: str) -> PageSession:
            if page not in opened:
                vm = await VM.create(memory="512M")
                vms.append(vm)
                opened[page] = PageSession(vm, page)
            return opened[page]
        yield session
    finally:
        for vm in [*vms, *(v for s in opened.values() for v in s.made)]:
            await vm.close()


def _skip_if_marked(block: Block) -> None:
    if block.directive.startswith("skip: "):
        pytest.skip(f"{block.id} not run here: {block.directive[6:]}")


def scratch(path: Path) -> Path:
    (path / "project").mkdir()
    (path / "project" / "Makefile").write_text("test:\n\techo tests pass | tee result.txt\n")
    (path / "data").mkdir()
    (path / "data" / "sales.csv").write_text("region,total\nnorth,10\n")
    (path / "local.tar").write_bytes(b"\0" * 10240)  # an empty tar archive
    return path


def host_quirks(command: str) -> str:
    """``--allow-internal-host`` for allowed hosts that this machine resolves to internal addresses."""
    from gondolin.http import expand_presets, is_internal_address

    if not command.startswith("gondolin exec") or "--allow" not in command:
        return command
    words = command.split(" -- ")[0].split()
    hosts = [w for flag, w in zip(words, words[1:], strict=False) if flag == "--allow-host"]
    hosts += expand_presets(w for flag, w in zip(words, words[1:], strict=False) if flag == "--allow")
    extra = []
    for host in hosts:
        try:
            addresses = {info[4][0] for info in socket.getaddrinfo(host, 443)}
        except OSError:
            continue
        if any(is_internal_address(a) for a in addresses):
            extra.append(f"--allow-internal-host {host}")
    return command.replace("gondolin exec", "gondolin exec " + " ".join(extra), 1) if extra else command


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.lang == "python"], ids=lambda b: b.id)
async def test_python_block(block: Block, sessions, tmp_path, monkeypatch):
    _skip_if_marked(block)
    monkeypatch.chdir(scratch(tmp_path))  # blocks that write files (checkpoints, uploads) write here
    session = await sessions(block.page)
    with anyio.fail_after(SHELL_TIMEOUT):
        await session.run(block)


# -- shell -------------------------------------------------------------------------------------
def commands(body: str) -> list[str]:
    out: list[str] = []
    pending = ""
    for raw in body.splitlines():
        line = pending + raw
        if line.rstrip().endswith("\\"):
            pending = line.rstrip()[:-1] + " "
            continue
        pending = ""
        if line.strip() and not line.lstrip().startswith("#"):
            out.append(line.strip())
    return out


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.lang in ("sh", "bash")], ids=lambda b: b.id)
def test_shell_block(block: Block, tmp_path):
    _skip_if_marked(block)
    env = {**os.environ, **block.env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    scratch(tmp_path)
    for command in map(host_quirks, commands(block.body)):
        proc = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=SHELL_TIMEOUT)
        assert proc.returncode == 0, (f"{block.id}: `{command}` exited {proc.returncode}\n"
                                      f"stdout: {proc.stdout[-2000:]}\nstderr: {proc.stderr[-2000:]}")


# -- toml --------------------------------------------------------------------------------------
@pytest.mark.parametrize("block", [b for b in BLOCKS if b.lang == "toml"], ids=lambda b: b.id)
def test_toml_block(block: Block, tmp_path):
    _skip_if_marked(block)
    tomllib.loads(block.body)
    if block.page == "mcp.md":  # the operator configuration, loaded as `gondolin mcp --config FILE` does
        from integrations import load_config

        (tmp_path / "mcp.toml").write_text(block.body)
        load_config(tmp_path / "mcp.toml")
