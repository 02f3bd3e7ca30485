"""
TLS for the peer listener from a certificate and key in PEM files.

Agents connect with Go's crypto/tls and system roots; what they need from us is
a full chain and modern parameters (TLS 1.2 or newer, forward-secret AEAD
suites only). The files are checked at start-up so a mismatched pair, an
expired certificate or an unreadable file stops the relay with one clear line
instead of failing every handshake later. L{ReloadableTLS} lets a running
relay switch certificates (SIGHUP, or a renewal) for new connections without
touching the established ones.
"""

import os
import re
import stat
from datetime import UTC, datetime

from OpenSSL import SSL, crypto
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.ssl import AcceptableCiphers, CertificateOptions, TLSVersion
from twisted.logger import Logger
from zope.interface import implementer

from relay.relay import ConfigurationError

# TLS 1.2 suites Go's crypto/tls offers that are forward secret and AEAD;
# TLS 1.3 suites are all of that kind and not configured by this string.
MODERN_CIPHERS = AcceptableCiphers.fromOpenSSLCipherString("ECDHE+AESGCM:ECDHE+CHACHA20")

_log = Logger()

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
    _checkKeyPermissions(keyFile)
    try:
        chain = [crypto.load_certificate(crypto.FILETYPE_PEM, blob) for blob in blobs]
        key = crypto.load_privatekey(crypto.FILETYPE_PEM, _read(keyFile, "key"))
    except crypto.Error as e:
        raise ConfigurationError(f"invalid TLS certificate or key: {e}") from None
    leaf = chain[0]
    notAfter = datetime.strptime(leaf.get_notAfter().decode("ascii"), "%Y%m%d%H%M%SZ").replace(
        tzinfo=UTC
    )
    if (now or datetime.now(UTC)) > notAfter:
        raise ConfigurationError(f"TLS certificate in {certFile!r} expired on {notAfter:%Y-%m-%d}")
    context = SSL.Context(SSL.TLS_METHOD)
    try:
        context.use_certificate(leaf)
        context.use_privatekey(key)
        context.check_privatekey()
    except SSL.Error:
        raise ConfigurationError(
            f"TLS key in {keyFile!r} does not match the certificate in {certFile!r}"
        ) from None
    return CertificateOptions(
        privateKey=key,
        certificate=leaf,
        extraCertChain=chain[1:],
        raiseMinimumTo=TLSVersion.TLSv1_2,
        acceptableCiphers=MODERN_CIPHERS,
    )


def _checkKeyPermissions(keyFile):
    """
    Warn about a private key others can read. Not an error: Kubernetes mounts
    Secrets 0644 unless told otherwise, inside a container nobody else runs.
    """
    try:
        mode = os.stat(keyFile).st_mode
    except OSError as e:
        raise ConfigurationError(f"cannot read TLS key file {keyFile!r}: {e.strerror}") from None
    if not stat.S_ISREG(mode):
        raise ConfigurationError(f"TLS key file {keyFile!r} is not a regular file")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        _log.warn(
            "TLS key file {path} is readable by group or others (mode {mode:o}); 0600 is safer",
            path=keyFile,
            mode=stat.S_IMODE(mode),
        )


@implementer(IOpenSSLServerConnectionCreator)
class ReloadableTLS:
    """
    The server side of TLS with a certificate that can change at run time.

    @ivar current: the L{CertificateOptions} new connections use.
    """

    def __init__(self, current, certFile, keyFile):
        self.current = current
        self.certFile = certFile
        self.keyFile = keyFile

    def serverConnectionForTLS(self, protocol):
        return self.current.serverConnectionForTLS(protocol)

    def reload(self):
        """
        Read the files again; keep the old certificate if they are not valid.

        @return: True if the new certificate is in use.
        """
        try:
            self.current = loadCertificateOptions(self.certFile, self.keyFile)
        except ConfigurationError as e:
            _log.error("TLS reload failed, keeping the previous certificate: {error}", error=str(e))
            return False
        _log.info("TLS certificate reloaded from {path}", path=self.certFile)
        return True
