"""TLS on the gRPC port: the server's certificate and key, and with a client CA, mutual TLS.

The files are read again when they change, so a renewed certificate (cert-manager, a Kubernetes
Secret swapped in place, a cron job) reaches new connections without a restart. This is gRPC's
own mechanism: `grpc.dynamic_ssl_server_credentials` asks `CertificateFiles.fetch` for the
configuration at each new connection's handshake; `fetch` compares the files' stat (one
`stat` each) and rereads them only when one changed. Connections already open keep the
certificate they started with. A half-written rotation (a certificate without its new key) is
refused with a warning and the previous pair goes on serving until the files agree again.

With mutual TLS, gRPC has verified the client's certificate against the client CA before any
call reaches the server; `client_identity` reads who it names from a call's auth context.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from rnnserve.errors import UnusableCredentials

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TlsFiles:
    """Where the server's PEM files are: its certificate (chain), its key and, for mutual TLS,
    the CA bundle that client certificates must chain to."""

    cert: Path
    key: Path
    client_ca: Path | None = None


@dataclass(frozen=True)
class _Material:
    cert: bytes
    key: bytes
    client_ca: bytes | None


@dataclass(frozen=True)
class ClientIdentity:
    """Who a verified client certificate names: its subject's common name and its subject
    alternative names (DNS names, URIs such as SPIFFE ids, e-mail addresses, IPs)."""

    common_name: str | None
    alt_names: tuple[str, ...]

    @property
    def principal(self) -> str | None:
        """The principal it names: the subject's common name, else its first subject
        alternative name (a SPIFFE id, say); None when it has neither."""
        if self.common_name:
            return self.common_name
        return self.alt_names[0] if self.alt_names else None


def client_identity(auth_context: Mapping[str, Sequence[bytes]]) -> ClientIdentity | None:
    """The identity in a call's `context.auth_context()`; None without a client certificate.

    gRPC fills the auth context only from a certificate it verified against the client CA
    (`x509_common_name`, `x509_subject_alternative_name`), so an auth layer may trust it.
    """
    names = tuple(n.decode() for n in auth_context.get("x509_subject_alternative_name", ()))
    common = auth_context.get("x509_common_name", ())
    if not names and not common:
        return None
    return ClientIdentity(common[0].decode() if common else None, names)


class CertificateFiles:
    """The server's TLS files, loaded and checked now, reloaded when they change.

    Raises UnusableCredentials, naming the file, when one is missing, unreadable or unusable.
    """

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        self._lock = threading.Lock()
        self._seen = self._stat()
        self._current = _load(files)

    @property
    def mutual(self) -> bool:
        """Whether clients must present a certificate the client CA signed."""
        return self.files.client_ca is not None

    def credentials(self) -> grpc.ServerCredentials:
        """Server credentials that ask `fetch` for the files at each new connection."""
        return grpc.dynamic_ssl_server_credentials(
            _configuration(self._current),
            self.fetch,
            require_client_authentication=self.mutual,
        )

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """The new configuration when the files changed and are whole; None to keep the one in
        use (gRPC calls this from its own threads, at each handshake)."""
        with self._lock:
            seen = self._stat()
            if seen == self._seen:
                return None
            self._seen = seen
            try:
                material = _load(self.files)
            except UnusableCredentials as error:
                logger.warning("%s; the previous certificate is served until it is fixed", error)
                return None
            if material == self._current:
                return None
            self._current = material
        logger.info("TLS certificate reloaded from %s", self.files.cert)
        return _configuration(material)

    def _stat(self) -> tuple[tuple[int, int, int] | None, ...]:
        # A rotation that renames files into place (or swaps a Secret's symlink) changes the
        # inode; one that rewrites them changes the size or the modification time.
        paths = (self.files.cert, self.files.key, self.files.client_ca)
        return tuple(_signature(path) for path in paths if path is not None)


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return (stat.st_ino, stat.st_size, stat.st_mtime_ns)


def _configuration(material: _Material) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration(
        [(material.key, material.cert)], root_certificates=material.client_ca
    )


def _load(files: TlsFiles, attempts: int = 3) -> _Material:
    """The files' bytes, checked by OpenSSL as a server loads them.

    OpenSSL reads the certificate and key from their paths, so the bytes are read before and
    after: a rotation between the two reads is read again rather than checked half-way.
    """
    for _ in range(attempts):
        before = _read_all(files)
        _check(files, before)
        if _read_all(files) == before:
            return before
    raise UnusableCredentials(f"TLS files {files.cert} and {files.key} keep changing while read")


def _read_all(files: TlsFiles) -> _Material:
    ca = _read(files.client_ca, "--tls-client-ca") if files.client_ca is not None else None
    return _Material(_read(files.cert, "--tls-cert"), _read(files.key, "--tls-key"), ca)


def _read(path: Path, flag: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise UnusableCredentials(f"{flag} {path}: cannot read it ({error.strerror})") from error


def _check(files: TlsFiles, material: _Material) -> None:
    if b"-----BEGIN CERTIFICATE-----" not in material.cert:
        raise UnusableCredentials(f"--tls-cert {files.cert}: no PEM certificate in it")
    if b"ENCRYPTED" in material.key:
        raise UnusableCredentials(
            f"--tls-key {files.key}: the key is encrypted; gRPC needs it without a passphrase"
        )
    if b"PRIVATE KEY-----" not in material.key:
        raise UnusableCredentials(f"--tls-key {files.key}: no PEM private key in it")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(files.cert, files.key, password=_no_passphrase)
    except (ssl.SSLError, OSError) as error:
        if "KEY_VALUES_MISMATCH" in str(error):
            raise UnusableCredentials(
                f"--tls-key {files.key} is not the key of the certificate in {files.cert}"
            ) from error
        raise UnusableCredentials(
            f"--tls-cert {files.cert} and --tls-key {files.key} cannot be loaded: {error}"
        ) from error
    if material.client_ca is not None:
        try:
            context.load_verify_locations(cadata=material.client_ca.decode("ascii"))
        except (ssl.SSLError, UnicodeDecodeError, ValueError) as error:
            raise UnusableCredentials(
                f"--tls-client-ca {files.client_ca}: no PEM CA certificates in it ({error})"
            ) from error


def _no_passphrase() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal for an encrypted key.
    raise ValueError("an encrypted key")
