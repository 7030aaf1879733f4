"""Named sets of hosts for common package registries: ``allow=["pypi"]`` instead of a host list.

A preset expands to the host patterns its client needs for an ordinary install, nothing more:
the index and the file host it redirects to. The names are shared by
:func:`gondolin.http.create_http_hooks`, the CLI's ``--allow`` and the MCP operator config.
"""

from __future__ import annotations

from collections.abc import Iterable

HOST_PRESETS: dict[str, tuple[str, ...]] = {
    # pip: the simple index, and the CDN it links every file to.
    "pypi": ("pypi.org", "files.pythonhosted.org"),
    # npm: metadata and tarballs come from the same registry host.
    "npm": ("registry.npmjs.org",),
    # git clone/fetch over HTTPS, the REST API, archive downloads and raw files / release assets.
    "github": ("github.com", "api.github.com", "codeload.github.com", "raw.githubusercontent.com",
               "objects.githubusercontent.com"),
}


def expand_presets(names: Iterable[str]) -> tuple[str, ...]:
    """The host patterns of the presets ``names``, in order, without repeats; ``ValueError`` names
    an unknown preset and lists the known ones."""
    hosts: dict[str, None] = {}
    for name in names:
        try:
            patterns = HOST_PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown host preset {name!r}; known presets: {', '.join(sorted(HOST_PRESETS))}") from None
        hosts.update(dict.fromkeys(patterns))
    return tuple(hosts)


__all__ = ["HOST_PRESETS", "expand_presets"]
