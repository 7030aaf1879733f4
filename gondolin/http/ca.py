"""The per-install certificate authority used to terminate guest TLS.

One EC P-256 CA per install, stored as ``ca.key`` (mode 0600, written under umask 077) and
``ca.crt`` in :func:`default_ca_dir`. Leaf certificates are issued on demand for each server name
the guest asks for and kept in a capped LRU cache of ready ``ssl.SSLContext`` objects. Every
certificate carries Subject/Authority Key Identifiers and a critical basicConstraints, which strict
verifiers (Python 3.13's ``VERIFY_X509_STRICT``) require. The CA key never leaves the host: the
guest only receives :meth:`CertificateAuthority.ca_bundle_pem`.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import ipaddress
import os
import secrets
import ssl
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .policy import normalize_host, parse_ip

CA_KEY_FILE = "ca.key"
CA_CERT_FILE = "ca.crt"
LOCK_FILE = ".lock"
CA_VALIDITY = dt.timedelta(days=3650)
LEAF_VALIDITY = dt.timedelta(days=397)  # CA/Browser Forum maximum; some clients enforce it
BACKDATE = dt.timedelta(hours=1)  # tolerate guest clocks that lag the host a little
RENEW_BEFORE = dt.timedelta(days=30)  # replace a CA that expires sooner than this
LEAF_CACHE_SIZE = 256  # server contexts kept; the guest picks the names, so this must be capped
ALPN_PROTOCOLS = ("h2", "http/1.1")

Clock = Callable[[], dt.datetime]
CAKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey  # we create EC P-256; an RSA CA loads too


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def default_ca_dir() -> Path:
    """``$XDG_CONFIG_HOME/gondolin/ca``, else ``$XDG_CACHE_HOME/gondolin/ca``, else ``~/.config/gondolin/ca``."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.environ.get("XDG_CACHE_HOME")
    root = Path(base) if base else Path.home() / ".config"
    return root / "gondolin" / "ca"


class LeafContext(ssl.SSLContext):
    """A server context for one name; ``server_name`` tells the mediator which leaf was served."""

    server_name: str


class CertificateAuthority:
    """A CA key and certificate plus an LRU cache of per-name server contexts."""

    def __init__(
        self,
        key: CAKey,
        cert: x509.Certificate,
        *,
        clock: Clock = _utcnow,
        cache_size: int = LEAF_CACHE_SIZE,
    ) -> None:
        if _spki(key.public_key()) != _spki(cert.public_key()):
            raise ValueError("CA key does not match CA certificate")
        self._key = key
        self._cert = cert
        self._clock = clock
        self._cache_size = cache_size
        self._leaf_key = ec.generate_private_key(ec.SECP256R1())
        self._leaf_key_pem = self._leaf_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        self._ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        self._contexts: OrderedDict[str, LeafContext] = OrderedDict()
        self._lock = threading.Lock()  # the sni callback may run in a worker thread

    def __repr__(self) -> str:
        return f"CertificateAuthority(subject={self._cert.subject.rfc4514_string()!r})"

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def generate(cls, *, clock: Clock = _utcnow, common_name: str | None = None) -> CertificateAuthority:
        """A fresh CA kept only in memory (tests, throwaway sandboxes)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = clock()
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Gondolin"),
                x509.NameAttribute(
                    NameOID.COMMON_NAME, common_name or f"Gondolin MITM CA {secrets.token_hex(4)}"
                ),
            ]
        )
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + CA_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert, clock=clock)

    @classmethod
    def load_or_create(cls, directory: str | os.PathLike[str] | None = None, *, clock: Clock = _utcnow) -> CertificateAuthority:
        """Load the CA in ``directory`` (default :func:`default_ca_dir`), creating it on first use.

        Safe against concurrent first use by several processes (an exclusive lock file), and a CA
        that is unreadable, mismatched or about to expire is replaced.
        """
        path = Path(directory) if directory is not None else default_ca_dir()
        old_umask = os.umask(0o077)
        try:
            path.mkdir(parents=True, exist_ok=True, mode=0o700)
            with open(path / LOCK_FILE, "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                existing = cls._load(path, clock)
                if existing is not None:
                    return existing
                ca = cls.generate(clock=clock)
                _write_private(path / CA_KEY_FILE, ca.key_pem())
                _write_private(path / CA_CERT_FILE, ca.cert_pem)
                return ca
        finally:
            os.umask(old_umask)

    @classmethod
    def _load(cls, path: Path, clock: Clock) -> CertificateAuthority | None:
        key_path, cert_path = path / CA_KEY_FILE, path / CA_CERT_FILE
        try:
            key_pem, cert_pem = key_path.read_bytes(), cert_path.read_bytes()
        except FileNotFoundError:
            return None
        if key_path.stat().st_mode & 0o077:
            os.chmod(key_path, 0o600)
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
            cert = x509.load_pem_x509_certificate(cert_pem)
            if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
                raise TypeError(f"unsupported CA key type in {key_path}: use EC or RSA")
            if cert.not_valid_after_utc - RENEW_BEFORE < clock():
                return None
            return cls(key, cert, clock=clock)
        except ValueError:
            return None

    # -- public material ------------------------------------------------------------------

    @property
    def cert_pem(self) -> bytes:
        return self._cert.public_bytes(serialization.Encoding.PEM)

    @property
    def certificate(self) -> x509.Certificate:
        return self._cert

    def ca_bundle_pem(self) -> bytes:
        """PEM bundle for the guest's trust store: the CA certificate only, never a key."""
        return self.cert_pem

    def key_pem(self) -> bytes:
        return self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    # -- leaves ---------------------------------------------------------------------------

    def issue_leaf(self, server_name: str) -> x509.Certificate:
        """Sign a new leaf for ``server_name`` (a DNS name or IP literal)."""
        name = normalize_host(server_name)
        if name is None:
            raise ValueError("invalid server name")
        ip = parse_ip(name)
        san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(ip)) if ip else x509.DNSName(name)
        now = self._clock()
        not_after = min(now + LEAF_VALIDITY, self._cert.not_valid_after_utc)
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name[:64])]))
            .issuer_name(self._cert.subject)
            .public_key(self._leaf_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName([san]), critical=False)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self._leaf_key.public_key()), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(self._ski),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )

    def server_context(self, server_name: str) -> LeafContext:
        """A TLS server context presenting a leaf for ``server_name``; switches leaf on SNI."""
        name = normalize_host(server_name)
        if name is None:
            raise ValueError("invalid server name")
        with self._lock:
            ctx = self._contexts.get(name)
            if ctx is not None:
                self._contexts.move_to_end(name)
                return ctx
        ctx = self._build_context(name)
        with self._lock:
            self._contexts[name] = ctx
            while len(self._contexts) > self._cache_size:
                self._contexts.popitem(last=False)
        return ctx

    def cached_names(self) -> list[str]:
        with self._lock:
            return list(self._contexts)

    def _build_context(self, name: str) -> LeafContext:
        leaf = self.issue_leaf(name)
        ctx = LeafContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.server_name = name
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_alpn_protocols(list(ALPN_PROTOCOLS))
        chain = leaf.public_bytes(serialization.Encoding.PEM) + self.cert_pem + self._leaf_key_pem
        # ssl can only load certificates from files: a 0600 mkstemp file, removed at once.
        fd, tmp = tempfile.mkstemp(prefix="gondolin-leaf-", suffix=".pem")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(chain)
            ctx.load_cert_chain(tmp)
        finally:
            os.unlink(tmp)
        ctx.sni_callback = self._on_sni
        return ctx

    def _on_sni(self, ssl_object: ssl.SSLObject, server_name: str | None, _ctx: ssl.SSLContext) -> int | None:
        if server_name is None:
            return None  # keep the context the connection started with
        if normalize_host(server_name) is None:
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        ssl_object.context = self.server_context(server_name)
        return None


def _spki(public_key: Any) -> bytes:
    return bytes(
        public_key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def served_name(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> str | None:
    """The name whose leaf a finished server handshake presented."""
    ctx = ssl_object.context
    return ctx.server_name if isinstance(ctx, LeafContext) else None


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
