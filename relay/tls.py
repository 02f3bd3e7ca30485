"""
TLS for the peer listener from a certificate and key in PEM files.

Agents connect with Go's crypto/tls and system roots; what they need from us is
a full chain and modern parameters. The files are checked at start-up so a
mismatched pair, an expired certificate or an unreadable file stops the relay
with one clear line instead of failing every handshake later.
"""

import re
from datetime import datetime, timezone

from OpenSSL import SSL, crypto
from twisted.internet.ssl import CertificateOptions, TLSVersion

from relay.server import ConfigurationError

_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


def _read(path, what):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigurationError(f"cannot read TLS {what} file {path!r}: {e.strerror}") from None


def loadCertificateOptions(certFile, keyFile, now=None):
    """
    @return: L{CertificateOptions} for the peer listener (TLS 1.2 or newer).
    @raise ConfigurationError: unreadable, malformed, expired or mismatched.
    """
    blobs = _PEM_CERT.findall(_read(certFile, "certificate"))
    if not blobs:
        raise ConfigurationError(f"no PEM certificate in {certFile!r}")
    try:
        chain = [crypto.load_certificate(crypto.FILETYPE_PEM, blob) for blob in blobs]
        key = crypto.load_privatekey(crypto.FILETYPE_PEM, _read(keyFile, "key"))
    except crypto.Error as e:
        raise ConfigurationError(f"invalid TLS certificate or key: {e}") from None
    leaf = chain[0]
    notAfter = datetime.strptime(leaf.get_notAfter().decode("ascii"), "%Y%m%d%H%M%SZ").replace(tzinfo=timezone.utc)
    if (now or datetime.now(timezone.utc)) > notAfter:
        raise ConfigurationError(f"TLS certificate in {certFile!r} expired on {notAfter:%Y-%m-%d}")
    context = SSL.Context(SSL.TLS_METHOD)
    try:
        context.use_certificate(leaf)
        context.use_privatekey(key)
        context.check_privatekey()
    except SSL.Error:
        raise ConfigurationError(f"TLS key in {keyFile!r} does not match the certificate in {certFile!r}") from None
    return CertificateOptions(
        privateKey=key,
        certificate=leaf,
        extraCertChain=chain[1:],
        raiseMinimumTo=TLSVersion.TLSv1_2,
    )
