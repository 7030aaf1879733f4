"""The default image's everyday tools: `make`, and `pip install` from the public index through
the mediation with one preset (`allow=["pypi"]`)."""

from __future__ import annotations

import socket

import pytest

from gondolin import VM
from gondolin.http import create_http_hooks, expand_presets, is_internal_address

pytestmark = [pytest.mark.vm, pytest.mark.anyio]


def _pypi_hosts_on_internal_addresses() -> list[str]:
    """Preset hosts this machine resolves to internal addresses (a local mirror or proxy, as on
    some CI hosts): they must be allowed as internal hosts explicitly. Skips when offline."""
    internal = []
    for host in expand_presets(["pypi"]):
        try:
            addresses = {info[4][0] for info in socket.getaddrinfo(host, 443, type=socket.SOCK_STREAM)}
        except OSError as exc:
            pytest.skip(f"PyPI is not reachable from this machine ({host}: {exc})")
        if any(is_internal_address(a) for a in addresses):
            internal.append(host)
    return internal


async def test_make_is_in_the_image(vm):
    r = await vm.exec("printf 'all:\\n\\techo built\\n' > /tmp/Makefile && make -s -C /tmp")
    assert r.exit_code == 0 and r.stdout == "built\n", r.stderr


async def test_pip_install_from_pypi_with_one_preset():
    hooks, env = create_http_hooks(allow=["pypi"], allowed_internal_hosts=_pypi_hosts_on_internal_addresses())
    async with await VM.create(http_hooks=hooks, env=env) as vm:
        root = await vm.exec("pip install -q six && python3 -c 'import six; print(six.__file__)'", timeout=240)
        assert root.exit_code == 0, root.stderr
        assert root.stdout.startswith("/usr/local/lib/python3")  # system-wide, no PEP 668 refusal
        user = await vm.exec("pip install -q --no-cache-dir idna && python3 -c 'import idna; print(idna.__file__)'",
                             user="agent", timeout=240)
        assert user.exit_code == 0, user.stderr
        assert user.stdout.startswith("/home/agent/.local/lib/python3")  # a user install for non-root
        assert "WARNING" not in root.stderr + user.stderr  # no root-user or pip-version nagging
        hosts = {(e.host, e.decision.value) for e in vm.network.events()}
        assert ("pypi.org", "allowed") in hosts and ("files.pythonhosted.org", "allowed") in hosts
