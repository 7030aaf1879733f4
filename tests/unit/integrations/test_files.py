import pytest

from integrations.errors import ToolError
from integrations.files import (
    apply_edit,
    count_lines,
    glob_match,
    guest_path,
    parse_mode,
    slice_lines,
)


@pytest.mark.parametrize(
    ("path", "expected"),
    [("/workspace/a.py", "/workspace/a.py"), ("/workspace/../etc/x", "/etc/x"), ("//a//b/", "/a/b"), ("/", "/")],
)
def test_guest_path_normalizes(path, expected):
    assert guest_path(path) == expected


@pytest.mark.parametrize("path", ["", "relative/x", "./x", "/a\0b", "/" + "a" * 5000])
def test_guest_path_rejects(path):
    with pytest.raises(ToolError) as err:
        guest_path(path)
    assert err.value.code == "invalid_argument"


@pytest.mark.parametrize(("mode", "value"), [("0644", 0o644), ("755", 0o755), ("0o600", 0o600), (None, None)])
def test_parse_mode(mode, value):
    assert parse_mode(mode) == value


@pytest.mark.parametrize("mode", ["rw", "999", "0x1ff", "12"])
def test_parse_mode_rejects(mode):
    with pytest.raises(ToolError):
        parse_mode(mode)


TEXT = "one\ntwo\nthree\nfour\n"


@pytest.mark.parametrize(
    ("offset", "limit", "content", "start", "end", "more"),
    [
        (None, None, TEXT, 1, 4, False),
        (2, 2, "two\nthree\n", 2, 3, True),
        (4, 10, "four\n", 4, 4, False),
        (1, 1, "one\n", 1, 1, True),
    ],
)
def test_slice_lines(offset, limit, content, start, end, more):
    piece = slice_lines(TEXT, offset, limit)
    assert (piece.content, piece.start_line, piece.end_line, piece.total_lines, piece.more) == (
        content, start, end, 4, more)


def test_slice_lines_past_the_end_is_an_error():
    with pytest.raises(ToolError) as err:
        slice_lines(TEXT, 9, None)
    assert "4 lines" in err.value.message
    assert slice_lines("", None, None).total_lines == 0


@pytest.mark.parametrize(("text", "n"), [("", 0), ("a", 1), ("a\n", 1), ("a\nb", 2), ("\n\n", 2)])
def test_count_lines(text, n):
    assert count_lines(text) == n


def test_apply_edit_replaces_one_exact_occurrence():
    assert apply_edit("x = 1\ny = 2\n", "y = 2", "y = 3") == ("x = 1\ny = 3\n", 1)
    assert apply_edit("a a a", "a", "b", replace_all=True) == ("b b b", 3)


@pytest.mark.parametrize(
    ("text", "old", "new", "code"),
    [
        ("abc", "zzz", "y", "no_match"),
        ("a a", "a", "b", "ambiguous_match"),
        ("abc", "", "y", "invalid_argument"),
        ("abc", "b", "b", "invalid_argument"),
    ],
)
def test_apply_edit_errors(text, old, new, code):
    with pytest.raises(ToolError) as err:
        apply_edit(text, old, new)
    assert err.value.code == code


def test_no_match_hints_at_whitespace():
    with pytest.raises(ToolError) as err:
        apply_edit("def f():\n    return 1\n", "  return 1  ", "return 2")
    assert "whitespace" in err.value.hint


@pytest.mark.parametrize(
    ("path", "pattern", "hit"),
    [
        ("a.py", "*.py", True),
        ("src/pkg/a.py", "*.py", True),
        ("src/pkg/a.pyc", "*.py", False),
        ("src/pkg/a.py", "src/*.py", False),
        ("src/pkg/a.py", "src/**/*.py", True),
        ("src/a.py", "src/**/*.py", True),
        ("src/a.py", "**/a.py", True),
        ("data/x1.csv", "data/x?.csv", True),
        ("data/x10.csv", "data/x?.csv", False),
        ("b.txt", "[abc].txt", True),
        ("d.txt", "[!abc].txt", True),
        ("a.txt", "[!abc].txt", False),
        ("weird(1).txt", "weird(1).txt", True),
    ],
)
def test_glob_match(path, pattern, hit):
    assert glob_match(path, pattern) is hit


def test_glob_too_long():
    with pytest.raises(ToolError):
        glob_match("a", "*" * 600)
