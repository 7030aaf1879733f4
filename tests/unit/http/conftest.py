from __future__ import annotations

import pytest

from gondolin.http import CertificateAuthority


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def mitm_ca() -> CertificateAuthority:
    return CertificateAuthority.generate(common_name="Gondolin test MITM CA")


@pytest.fixture(scope="session")
def upstream_ca() -> CertificateAuthority:
    return CertificateAuthority.generate(common_name="Gondolin test upstream CA")
