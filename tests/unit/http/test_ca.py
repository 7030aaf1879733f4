from __future__ import annotations

import datetime as dt
import os
import ssl
import stat
from pathlib import Path

import anyio
import pytest
from anyio.streams.tls import TLSAttribute, TLSStream
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from gondolin.http.ca import (
    BACKDATE,
    CA_CERT_FILE,
    CA_KEY_FILE,
    CertificateAuthority,
    default_ca_dir,
    served_name,
)

from .support import byte_stream_pair, client_context


def ext(cert: x509.Certificate, kind: type) -> x509.Extension:  # type: ignore[type-arg]
    return cert.extensions.get_extension_for_class(kind)


def test_ca_files_are_private_and_reloaded(tmp_path: Path) -> None:
    directory = tmp_path / "ca"
    first = CertificateAuthority.load_or_create(directory)
    key_mode = stat.S_IMODE(os.stat(directory / CA_KEY_FILE).st_mode)
    assert key_mode == 0o600
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    second = CertificateAuthority.load_or_create(directory)
    assert second.cert_pem == first.cert_pem
    assert not list(directory.glob("*.tmp"))


def test_loose_key_permissions_are_tightened(tmp_path: Path) -> None:
    CertificateAuthority.load_or_create(tmp_path)
    os.chmod(tmp_path / CA_KEY_FILE, 0o644)
    CertificateAuthority.load_or_create(tmp_path)
    assert stat.S_IMODE(os.stat(tmp_path / CA_KEY_FILE).st_mode) == 0o600


def test_corrupt_or_expiring_ca_is_replaced(tmp_path: Path) -> None:
    first = CertificateAuthority.load_or_create(tmp_path)
    (tmp_path / CA_CERT_FILE).write_bytes(b"garbage")
    second = CertificateAuthority.load_or_create(tmp_path)
    assert second.cert_pem != first.cert_pem
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=3649)
    third = CertificateAuthority.load_or_create(tmp_path, clock=lambda: later)
    assert third.cert_pem != second.cert_pem


def test_default_dir_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    assert default_ca_dir() == tmp_path / "config" / "gondolin" / "ca"
    monkeypatch.delenv("XDG_CONFIG_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert default_ca_dir() == tmp_path / "cache" / "gondolin" / "ca"


def test_ca_certificate_extensions(mitm_ca: CertificateAuthority) -> None:
    cert = mitm_ca.certificate
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    bc = ext(cert, x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    ku = ext(cert, x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
    ski = ext(cert, x509.SubjectKeyIdentifier).value
    aki = ext(cert, x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    assert b"PRIVATE" not in mitm_ca.ca_bundle_pem()


@pytest.mark.parametrize(("name", "san_type"), [("api.github.com", x509.DNSName), ("10.0.0.1", x509.IPAddress)])
def test_leaf_certificate(mitm_ca: CertificateAuthority, name: str, san_type: type) -> None:
    now = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    ca = CertificateAuthority(mitm_ca._key, mitm_ca.certificate, clock=lambda: now)
    leaf = ca.issue_leaf(name)
    assert leaf.not_valid_before_utc == now - BACKDATE
    assert leaf.issuer == mitm_ca.certificate.subject
    san = ext(leaf, x509.SubjectAlternativeName).value
    assert [str(v) for v in san.get_values_for_type(san_type)] == [name]
    assert not ext(leaf, x509.BasicConstraints).value.ca
    assert ext(leaf, x509.AuthorityKeyIdentifier).value.key_identifier == ext(
        mitm_ca.certificate, x509.SubjectKeyIdentifier
    ).value.digest
    leaf.verify_directly_issued_by(mitm_ca.certificate)


def test_leaf_cache_is_capped_lru() -> None:
    ca = CertificateAuthority.generate()
    ca._cache_size = 3
    for name in ["a.test", "b.test", "c.test"]:
        ca.server_context(name)
    ca.server_context("a.test")  # refresh a
    ca.server_context("d.test")
    assert ca.cached_names() == ["c.test", "a.test", "d.test"]


@pytest.mark.parametrize("name", ["", "bad name", "a..b", "*.x.test"])
def test_invalid_leaf_names(mitm_ca: CertificateAuthority, name: str) -> None:
    with pytest.raises(ValueError):
        mitm_ca.server_context(name)


async def handshake(ca: CertificateAuthority, start_name: str, sni: str | None, alpn: list[str]) -> tuple[str | None, str | None]:
    guest, host = byte_stream_pair()
    result: dict[str, str | None] = {}

    async def server() -> None:
        tls = await TLSStream.wrap(host, server_side=True, ssl_context=ca.server_context(start_name), standard_compatible=False)
        result["name"] = served_name(tls.extra(TLSAttribute.ssl_object))

    ctx = client_context(ca, alpn=alpn)
    if sni is None:
        ctx.check_hostname = False
    async with anyio.create_task_group() as tg:
        tg.start_soon(server)
        tls = await TLSStream.wrap(guest, server_side=False, hostname=sni, ssl_context=ctx, standard_compatible=False)
        protocol = tls.extra(TLSAttribute.alpn_protocol)
    return result["name"], protocol


@pytest.mark.anyio
async def test_strict_python_client_accepts_leaf_chosen_by_sni(mitm_ca: CertificateAuthority) -> None:
    name, alpn = await handshake(mitm_ca, "fallback.test", "api.example.test", ["h2", "http/1.1"])
    assert name == "api.example.test"
    assert alpn == "h2"


@pytest.mark.anyio
async def test_without_sni_the_starting_leaf_is_served(mitm_ca: CertificateAuthority) -> None:
    name, alpn = await handshake(mitm_ca, "fallback.test", None, ["http/1.1"])
    assert name == "fallback.test"
    assert alpn == "http/1.1"


@pytest.mark.anyio
async def test_untrusting_client_fails(mitm_ca: CertificateAuthority) -> None:
    other = CertificateAuthority.generate()
    assert await handshake_with(mitm_ca, mitm_ca) is None
    error = await handshake_with(other, mitm_ca)
    assert isinstance(error, ssl.SSLCertVerificationError)


async def handshake_with(client_ca: CertificateAuthority, server_ca: CertificateAuthority) -> ssl.SSLError | None:
    guest, host = byte_stream_pair()

    async def server() -> None:
        try:
            await TLSStream.wrap(host, server_side=True, ssl_context=server_ca.server_context("x.test"), standard_compatible=False)
        except (ssl.SSLError, anyio.EndOfStream, anyio.BrokenResourceError):
            pass

    error = None
    async with anyio.create_task_group() as tg:
        tg.start_soon(server)
        try:
            await TLSStream.wrap(guest, hostname="x.test", ssl_context=client_context(client_ca), standard_compatible=False)
        except ssl.SSLError as exc:
            error = exc
        finally:
            await guest.aclose()
    return error


def test_an_rsa_ca_placed_by_the_user_is_used(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "corp root")])
    now = dt.datetime.now(dt.UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(1).not_valid_before(now - BACKDATE).not_valid_after(now + dt.timedelta(days=400))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    (tmp_path / CA_KEY_FILE).write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    (tmp_path / CA_CERT_FILE).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    ca = CertificateAuthority.load_or_create(tmp_path)
    assert ca.certificate == cert
    ca.issue_leaf("a.test").verify_directly_issued_by(cert)
