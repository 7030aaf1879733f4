"""docs/cli.md lists every command and flag of the argument parser, and docs/mcp.md every flag
of gondolin-mcp: a flag added without documentation fails here."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from gondolin.cli import build_parser
from mcp_server.__main__ import build_parser as build_mcp_parser

DOCS = Path(__file__).resolve().parents[2] / "docs"
SHARED = "VM, network and mount flags"  # the section documenting the flags exec and bash share
SHARING = {"gondolin exec", "gondolin bash"}


def commands(parser: argparse.ArgumentParser, path: str = "gondolin") -> list[tuple[str, list[str]]]:
    """(command path, its long options) for every command that has no subcommands of its own."""
    out = []
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return [(path, [s for a in parser._actions for s in a.option_strings
                        if s.startswith("--") and s != "--help"])]
    for action in subs:
        for name, sub in action.choices.items():
            out += commands(sub, f"{path} {name}")
    return out


def sections(text: str) -> dict[str, str]:
    """Heading text -> the text under it, up to the next heading of the same or a higher level."""
    heads = list(re.finditer(r"^(#+) (.*)$", text, re.M))
    out = {}
    for i, h in enumerate(heads):
        end = next((n.start() for n in heads[i + 1:] if len(n[1]) <= len(h[1])), len(text))
        out[h[2].strip("`")] = text[h.end():end]
    return out


CLI_PAGE = sections((DOCS / "cli.md").read_text())


@pytest.mark.parametrize(("command", "options"), commands(build_parser()), ids=lambda v: v if isinstance(v, str) else "")
def test_every_command_and_flag_is_documented(command, options):
    assert command in CLI_PAGE, f"docs/cli.md has no section headed `{command}`"
    text = CLI_PAGE[command] + (CLI_PAGE[SHARED] if command in SHARING else "")
    missing = [o for o in options if not re.search(re.escape(o) + r"(?![\w-])", text)]
    assert not missing, f"docs/cli.md does not document {missing} under `{command}`"


def test_every_mcp_flag_is_documented():
    text = (DOCS / "mcp.md").read_text()
    options = [s for a in build_mcp_parser()._actions for s in a.option_strings if s.startswith("--") and s != "--help"]
    missing = [o for o in options if not re.search(re.escape(o) + r"(?![\w-])", text)]
    assert not missing, f"docs/mcp.md does not document {missing}"
