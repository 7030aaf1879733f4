"""Pure helpers behind the file tools: line ranges, exact-string edits, glob patterns, paths."""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass
from functools import lru_cache

from .errors import ToolError

MAX_PATH_LENGTH = 4096  # PATH_MAX in the guest
MAX_GLOB_LENGTH = 512


def guest_path(path: str, *, what: str = "path") -> str:
    """A normalized absolute guest path, or a ToolError the model can act on."""
    if not isinstance(path, str) or not path:
        raise ToolError("invalid_argument", f"{what} is empty", "Give an absolute guest path such as /workspace/main.py.")
    if "\0" in path:
        raise ToolError("invalid_argument", f"{what} contains a NUL byte")
    if len(path) > MAX_PATH_LENGTH:
        raise ToolError("invalid_argument", f"{what} is longer than {MAX_PATH_LENGTH} characters")
    if not path.startswith("/"):
        raise ToolError("invalid_argument", f"{what} must be absolute, got {path!r}",
                        f"Did you mean /workspace/{path.lstrip('./')}?")
    normalized = posixpath.normpath(path)
    return "/" + normalized.lstrip("/")


def parse_mode(mode: str | None) -> int | None:
    if mode is None:
        return None
    text = mode.strip()
    if not re.fullmatch(r"0?[0-7]{3,4}|0o[0-7]{3,4}", text):
        raise ToolError("invalid_argument", f"mode must be octal like '0644' or '755', got {mode!r}")
    value = int(text.removeprefix("0o"), 8)
    if value > 0o7777:
        raise ToolError("invalid_argument", f"mode {mode!r} is out of range")
    return value


@dataclass(frozen=True)
class LineSlice:
    content: str
    start_line: int  # 1-based first line returned (0 when nothing was returned)
    end_line: int  # 1-based last line returned
    total_lines: int
    more: bool  # lines after end_line remain


def count_lines(text: str) -> int:
    if not text:
        return 0
    return text.count("\n") + (0 if text.endswith("\n") else 1)


def slice_lines(text: str, offset: int | None, limit: int | None) -> LineSlice:
    """Lines ``offset`` (1-based) to ``offset + limit - 1``, keeping their line endings."""
    start = 1 if offset is None else offset
    if start < 1:
        raise ToolError("invalid_argument", "offset is a 1-based line number and must be >= 1")
    lines = text.splitlines(keepends=True)
    total = len(lines)
    if start > total and total > 0:
        raise ToolError("invalid_argument", f"offset {start} is past the end of the file ({total} lines)",
                        f"Use an offset between 1 and {total}.")
    stop = total if limit is None else min(total, start - 1 + limit)
    chosen = lines[start - 1:stop]
    return LineSlice("".join(chosen), start if chosen else 0, stop if chosen else 0, total, stop < total)


def apply_edit(text: str, old: str, new: str, *, replace_all: bool = False) -> tuple[str, int]:
    """Replace ``old`` by ``new``: exactly one occurrence unless ``replace_all``."""
    if old == "":
        raise ToolError("invalid_argument", "old_string is empty",
                        "Give the exact text to replace; use write_file to create or overwrite a file.")
    if old == new:
        raise ToolError("invalid_argument", "old_string and new_string are the same; nothing would change")
    count = text.count(old)
    if count == 0:
        hint = "Read the file again with read_file and copy the text exactly, including whitespace."
        stripped = old.strip()
        if stripped and stripped != old and text.count(stripped):
            hint = "The text occurs with different leading/trailing whitespace; copy it exactly from read_file."
        raise ToolError("no_match", "old_string was not found in the file", hint)
    if count > 1 and not replace_all:
        raise ToolError("ambiguous_match", f"old_string occurs {count} times in the file",
                        "Include more surrounding lines to make it unique, or set replace_all=true.")
    return text.replace(old, new), count


@lru_cache(maxsize=128)
def glob_regex(pattern: str) -> re.Pattern[str]:
    """Translate a glob: ``*`` and ``?`` stay within one path segment, ``**`` spans any depth,
    ``[...]`` is a character class."""
    if len(pattern) > MAX_GLOB_LENGTH:
        raise ToolError("invalid_argument", f"glob is longer than {MAX_GLOB_LENGTH} characters")
    out = []
    i = 0
    n = len(pattern)
    while i < n:
        c = pattern[i]
        if c == "*":
            if pattern.startswith("**", i):
                i += 2
                if i < n and pattern[i] == "/":
                    out.append("(?:.*/)?")
                    i += 1
                else:
                    out.append(".*")
                continue
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            j = pattern.find("]", i + 2 if pattern.startswith("[!", i) or pattern.startswith("[^", i) else i + 1)
            if j == -1:
                out.append(re.escape(c))
            else:
                body = pattern[i + 1:j]
                if body.startswith(("!", "^")):
                    body = "^" + body[1:]
                out.append("[" + body.replace("\\", "\\\\") + "]")
                i = j
        else:
            out.append(re.escape(c))
        i += 1
    try:
        return re.compile("".join(out) + r"\Z")
    except re.error as exc:
        raise ToolError("invalid_argument", f"invalid glob {pattern!r}: {exc}") from None


def glob_match(relative_path: str, pattern: str) -> bool:
    """Match a path relative to the listed directory. A pattern without ``/`` matches the
    file name at any depth (like ``find -name``)."""
    if "/" not in pattern:
        return glob_regex(pattern).match(posixpath.basename(relative_path)) is not None
    return glob_regex(pattern.lstrip("/")).match(relative_path) is not None
