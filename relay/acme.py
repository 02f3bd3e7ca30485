"""
Certificates for the peer listener from an ACME CA (Let's Encrypt).

Most operators give the relay a domain instead of a certificate file, so the
relay must obtain a certificate at start-up, keep it across restarts and renew
it while it runs, handing each new certificate to the listeners so that new
connections get it without a restart.

Challenges: TLS-ALPN-01 (the default) or HTTP-01, as the operator asks.
TLS-ALPN-01 is what the Go relay's autocert answers, on the peer port
whatever its number: the CA connects to the domain on port 443 offering ALPN
C{acme-tls/1}, which reaches the peer listener when it listens on 443 or
sits behind something forwarding 443 to it (a LoadBalancer in front of a pod
on 8443), and needs no second port, so several relays on one host can each
get a certificate. The C{acme} library (5.x) has no TLS-ALPN-01 support, so
the validation certificate (RFC 8737) is built here and the peer listener
takes its connections from L{AcmeCertificateService.serverConnectionCreator}:
its context's ALPN callback swaps in the validation certificate when a
client offers C{acme-tls/1} for a name with a pending challenge. OpenSSL
runs that callback before it sends the server's certificate, for TLS 1.3
and 1.2 alike (both certificates are ECDSA P-256, so the cipher chosen
earlier still fits); other clients negotiate no ALPN protocol, as before.
HTTP-01 is served by a small twisted.web listener on its own port (80):
C{/.well-known/acme-challenge/<token>}, 404 for anything else, with a
connection cap, small header and body limits and a timeout, since port 80
on the internet is scanned all day. It is bound in
L{privilegedStartService}, before twistd sheds root, and kept open for
renewals; if it cannot be bound that is logged once and TLS-ALPN-01 is
used instead.

Until the first certificate exists the peer listener serves a self-signed
placeholder that only the ACME validator's C{acme-tls/1} handshakes get
past: every other TLS connection is refused without a log line, counted
as C{relay_handshake_rejects_total{reason="no_certificate"}}.

The C{acme} library is synchronous (C{requests}), so every ACME exchange runs
in the reactor's thread pool with an overall timeout on top of the per-request
and polling deadlines; files, timers, challenge responses and callbacks stay
in the reactor thread.

Renewal follows Go's autocert: min(30 days, a third of the lifetime) before
expiry. A fixed 30 days would renew short-lived certificates forever.

State in the data directory (0700, files 0600):
    - C{account.key}: the ACME account key (EC P-256, PEM). The CA finds the
      account again from the key, so nothing else about the account is kept.
    - C{certificate.pem}: the certificate chain, leaf first.
    - C{certificate.key}: its private key.
    - C{certificate.json}: the directory URL and domains it was ordered for,
      so a staging certificate is not reused once the operator switches to
      production, nor one for another set of names.

A data directory the Go relay used (Go autocert's cache) is picked up: its
account key (C{acme_account+key}) when there is no C{account.key}, and its
certificate for the first domain (file named after it: key, then chain) when
there is no certificate of ours, it names every domain and Let's Encrypt
production is the directory. Moving from the Go relay then needs no new
account and no new order (Let's Encrypt limits duplicate certificates).
"""

import datetime
import hashlib
import json
import os
import random
import re
from collections import Counter
from io import BytesIO

import josepy
import requests
from acme import challenges, client, crypto_util, errors, messages
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from OpenSSL import SSL, crypto
from twisted.application.service import Service
from twisted.internet import defer, threads
from twisted.internet import error as ierror
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import Request
from zope.interface import implementer

from relay.relay import ConfigurationError
from relay.tls import loadCertificateOptions
from relay.web import ConnectionCap, QuietSite

LETSENCRYPT_DIRECTORY = "https://acme-v02.api.letsencrypt.org/directory"

RENEW_BEFORE_MAX = 30 * 24 * 3600.0

HTTP_01 = "http-01"
TLS_ALPN_01 = "tls-alpn-01"

ACME_TLS_ALPN = b"acme-tls/1"

_ACME_IDENTIFIER = x509.ObjectIdentifier("1.3.6.1.5.5.7.1.31")

_CHALLENGE_PREFIX = [b".well-known", b"acme-challenge"]

# Bounds of the HTTP-01 listener. A CA validates with a few short GETs from a
# handful of addresses; anything bigger or slower is not a validation.
HTTP01_MAX_CONNECTIONS = 64
HTTP01_TIMEOUT = 10.0
HTTP01_LIFETIME = 30.0
HTTP01_MAX_HEADERS = 32
HTTP01_MAX_HEADER_BYTES = 8192
HTTP01_MAX_BODY = 1024

# relay_handshake_rejects_total reason for TLS connections before the first
# certificate.
NO_CERTIFICATE = "no_certificate"

# OpenSSL's alert level in the info callback's return code (high byte).
_FATAL_ALERT = 2

# What Go's autocert.DirCache, used by the Go relay, keeps in the same
# directory: the account key, and per domain the key followed by the chain.
_GO_ACCOUNT_KEYS = ("acme_account+key", "acme_account.key")
_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z ]+)-----.+?-----END \1-----\r?\n?", re.S)


def renewalTime(notBefore, notAfter):
    """
    When to renew a certificate, as Go's autocert does.

    @param notBefore: start of validity, POSIX seconds.
    @param notAfter: end of validity, POSIX seconds.
    @return: POSIX seconds: min(30 days, a third of the lifetime) before
        C{notAfter}.
    """
    return notAfter - min(RENEW_BEFORE_MAX, (notAfter - notBefore) / 3.0)


def _writePrivate(path, data):
    """
    Replace C{path} atomically with C{data}, readable by the owner only.
    """
    temporary = f"{path}.{os.getpid()}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise


def _keyAuthorization(token, accountKey):
    """
    RFC 8555 8.1: the token and the account key's SHA-256 JWK thumbprint.
    """
    thumbprint = josepy.b64encode(accountKey.thumbprint(hash_function=hashes.SHA256))
    return f"{token}.{thumbprint.decode('ascii')}"


def tlsALPNCertificate(domain, keyAuthorization):
    """
    The self-signed certificate that answers a TLS-ALPN-01 challenge (RFC
    8737 3): the domain as its only name and the SHA-256 of the key
    authorization in a critical acmeIdentifier extension.

    @return: C{(OpenSSL.crypto.X509, OpenSSL.crypto.PKey)}.
    """
    digest = hashlib.sha256(keyAuthorization.encode("ascii")).digest()
    return _selfSigned(domain, x509.UnrecognizedExtension(_ACME_IDENTIFIER, b"\x04\x20" + digest))


def _selfSigned(domain, acmeIdentifier=None):
    """
    @return: C{(OpenSSL.crypto.X509, OpenSSL.crypto.PKey)}, a week's
        self-signed certificate for C{domain}.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, domain)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(domain)]), critical=False)
    )
    if acmeIdentifier is not None:
        builder = builder.add_extension(acmeIdentifier, critical=True)
    certificate = builder.sign(key, hashes.SHA256())
    return crypto.X509.from_cryptography(certificate), crypto.PKey.from_cryptography_key(key)


class _TLSALPN01Response(challenges.KeyAuthorizationChallengeResponse):
    """
    The answer to a TLS-ALPN-01 challenge, which the C{acme} library does not
    know. It goes on the wire as C{{}}; the key authorization field only keeps
    it truthy, since the library sends an empty (falsy) object as a
    POST-as-GET, which does not start validation.
    """

    typ = TLS_ALPN_01


class _ChallengeResource(Resource):
    """
    Answers HTTP-01 challenges from a token → key authorization mapping that
    the service fills while an order is pending.
    """

    isLeaf = True
    log = Logger()

    def __init__(self, responses):
        super().__init__()
        self._responses = responses

    def render_GET(self, request):
        path = request.postpath
        if len(path) == 3 and path[:2] == _CHALLENGE_PREFIX:
            token = path[2].decode("ascii", "replace")
            keyAuthorization = self._responses.get(token)
            if keyAuthorization is not None:
                self.log.info(
                    "ACME: answered the HTTP-01 challenge {token} for {client}",
                    token=token,
                    client=getattr(request.getClientAddress(), "host", "?"),
                )
                request.setHeader(b"content-type", b"text/plain")
                return keyAuthorization.encode("ascii")
        request.setResponseCode(404)
        request.setHeader(b"content-type", b"text/plain")
        return b"not found\n"


@implementer(IOpenSSLServerConnectionCreator)
class _CurrentCertificate:
    """
    TLS connections with whatever certificate the service holds now.
    """

    def __init__(self, service):
        self._service = service

    def serverConnectionForTLS(self, tlsProtocol):
        connection = SSL.Connection(self._service._serverContext(), None)
        # The placeholder's info callback finds the connection to refuse
        # here, as Twisted's own client-side hostname check does.
        connection.set_app_data(tlsProtocol)
        return connection


class _ChallengeRequest(Request):
    """
    A request whose body, which no HTTP-01 validation has, is kept in memory
    up to L{HTTP01_MAX_BODY} bytes; more ends the connection. Twisted's
    Request has no body limit and spools big bodies to a temporary file.
    """

    def gotLength(self, length):
        self.content = BytesIO()
        if length is not None and length > HTTP01_MAX_BODY:
            self.channel.forceAbortClient()

    def handleContentChunk(self, data):
        if self.content.tell() + len(data) > HTTP01_MAX_BODY:
            self.channel.forceAbortClient()
            return
        self.content.write(data)


class _ChallengeChannel(HTTPChannel):
    """
    HTTPChannel with Twisted's own header limits lowered to what a
    validation GET needs.
    """

    maxHeaders = HTTP01_MAX_HEADERS
    totalHeadersSize = HTTP01_MAX_HEADER_BYTES


def challengeSite(responses, reactor):
    """
    The factory of the HTTP-01 listener, bounded in connections, header and
    body bytes, idle time and lifetime (L{HTTP01_MAX_CONNECTIONS}, ...).

    @param responses: token → key authorization, filled while an order is
        pending.
    """
    refusals = Counter()
    # No access log at all: port 80 on the internet is scanned all day.
    site = QuietSite(
        _ChallengeResource(responses),
        _ChallengeChannel,
        refusals,
        requestFactory=_ChallengeRequest,
        timeout=HTTP01_TIMEOUT,
        reactor=reactor,
    )
    return ConnectionCap(
        site,
        HTTP01_MAX_CONNECTIONS,
        refusals,
        evict=False,
        lifetime=HTTP01_LIFETIME,
        reactor=reactor,
    )


class AcmeCertificateService(Service):
    """
    Obtains, stores, reuses and renews the certificate for C{domains}.

    @ivar certificatePath: PEM certificate chain (leaf first) on disk.
    @ivar keyPath: PEM private key on disk.
    @ivar orders: how many ACME orders this instance has placed.
    """

    log = Logger()

    def __init__(
        self,
        domains,
        dataDir,
        email,
        directoryURL,
        reactor,
        caBundle=None,
        challenge=TLS_ALPN_01,
        http01Port=80,
        onCertificate=None,
        http01Interface=None,
        counters=None,
        now=None,
        checkInterval=12 * 3600.0,
        retryDelay=30.0,
        maxRetryDelay=3600.0,
        requestTimeout=30.0,
        orderTimeout=90.0,
    ):
        """
        @param domains: DNS names for the certificate (the first is its subject).
        @param dataDir: directory for the account key and certificate.
        @param email: contact for the ACME account, or L{None}.
        @param directoryURL: the ACME directory; L{None} or empty for Let's
            Encrypt production (L{LETSENCRYPT_DIRECTORY}).
        @param reactor: provides IReactorTime, IReactorTCP and IReactorThreads.
        @param caBundle: PEM file of roots to verify the ACME server's HTTPS
            with, instead of the system's (for a private CA or pebble).
        @param challenge: L{TLS_ALPN_01} (answered by the peer listener
            through L{serverConnectionCreator}; the CA reaches it on port
            443) or L{HTTP_01} (a listener on C{http01Port}; TLS-ALPN-01 if
            that port cannot be bound).
        @param http01Port: TCP port of the HTTP-01 listener; 0 picks a free
            one (tests).
        @param onCertificate: called with fresh L{CertificateOptions} each
            time a certificate is loaded or renewed.
        @param http01Interface: address to bind; by default C{"::"} (both
            families on Linux), falling back to C{""} without IPv6.
        @param counters: the L{relay.counters.RelayCounters} that count TLS
            connections refused before the first certificate, or L{None}.
        @param now: callable returning POSIX seconds; by default
            C{reactor.seconds}.
        @param checkInterval: the longest sleep between renewal checks, so a
            jump of the wall clock cannot delay a renewal for months.
        @param retryDelay: first delay after a failed attempt; doubles up to
            C{maxRetryDelay}.
        @param requestTimeout: seconds for each HTTP request to the CA.
        @param orderTimeout: seconds for each step of an order (account and
            order creation; validation and issuance), plus
            C{requestTimeout} per request that is not bounded by this
            deadline (see L{_finishTimeout}). A thread cannot be
            interrupted, so a step in flight at shutdown may hold the
            reactor's thread pool this long.
        """
        domains = [d.strip().lower().rstrip(".") for d in domains if d.strip()]
        if not domains:
            raise ConfigurationError("--letsencrypt-domains: at least one domain is needed")
        if challenge not in (HTTP_01, TLS_ALPN_01):
            raise ConfigurationError(
                f"ACME challenge {challenge!r} is not supported; use {HTTP_01} or {TLS_ALPN_01}"
            )
        if not dataDir:
            raise ConfigurationError("--letsencrypt-data-dir is needed with --letsencrypt-domains")
        self.domains = list(dict.fromkeys(domains))
        self.dataDir = dataDir
        self.email = email or None
        self.directoryURL = directoryURL or LETSENCRYPT_DIRECTORY
        self.caBundle = caBundle
        self.challenge = challenge
        self.http01Port = http01Port
        self.http01Interface = http01Interface
        self.certificatePath = os.path.join(dataDir, "certificate.pem")
        self.keyPath = os.path.join(dataDir, "certificate.key")
        self.accountKeyPath = os.path.join(dataDir, "account.key")
        self.metadataPath = os.path.join(dataDir, "certificate.json")
        self.orders = 0
        self._reactor = reactor
        self._onCertificate = onCertificate
        self._counters = counters
        self._now = now or reactor.seconds
        self._checkInterval = checkInterval
        self._retryDelay = retryDelay
        self._maxRetryDelay = maxRetryDelay
        self._requestTimeout = requestTimeout
        self._orderTimeout = orderTimeout
        self._options = None
        self._notBefore = self._notAfter = None
        self._waiting = []
        self._responses = {}
        self._alpnResponses = {}
        self._bareContext = None
        self._armedContext = None
        self._listeningPort = None
        self._timer = None
        self._attempt = None
        self._failures = 0

    # Public API

    def whenReady(self):
        """
        @return: a L{Deferred} firing with the current L{CertificateOptions}
            once a certificate is available (at once if it already is).
        """
        if self._options is not None:
            return defer.succeed(self._options)
        d = defer.Deferred(lambda d: self._waiting.remove(d))
        self._waiting.append(d)
        return d

    def serverConnectionCreator(self):
        """
        @return: an L{IOpenSSLServerConnectionCreator} for a TLS listener
            (C{SSL4ServerEndpoint}, C{TLSMemoryBIOFactory}) that gives every
            new connection the current certificate, so renewals need no new
            listener. Listen with it from the start: it answers TLS-ALPN-01
            challenges, and until the first certificate arrives it refuses
            every other connection (counted, not logged).
        """
        return _CurrentCertificate(self)

    def renewalTime(self):
        """
        @return: POSIX seconds when the current certificate is due for
            renewal, or L{None} without one.
        """
        if self._notAfter is None:
            return None
        return renewalTime(self._notBefore, self._notAfter)

    # IService

    def privilegedStartService(self):
        super().privilegedStartService()
        self._listen()

    def startService(self):
        super().startService()
        try:
            self._prepareDirectory()
        except OSError as e:
            self.log.error(
                "ACME: cannot use the data directory {dir!r}: {error}",
                dir=self.dataDir,
                error=e.strerror or str(e),
            )
        self._listen()
        self._loadFromDisk()
        self._schedule(0 if self._options is None else self._untilCheck())

    def stopService(self):
        super().stopService()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._attempt is not None:
            self._attempt.cancel()
        port, self._listeningPort = self._listeningPort, None
        if port is not None:
            return port.stopListening()
        return None

    # Storage

    def _prepareDirectory(self):
        if not os.path.isdir(self.dataDir):
            os.makedirs(self.dataDir, mode=0o700, exist_ok=True)
        if os.stat(self.dataDir).st_mode & 0o077:
            try:
                os.chmod(self.dataDir, 0o700)
            except OSError as e:
                self.log.warn(
                    "ACME: cannot restrict {dir!r} to its owner: {error}",
                    dir=self.dataDir,
                    error=e.strerror,
                )

    def _loadFromDisk(self):
        """
        Use the certificate on disk if it was ordered from this directory for
        these domains, matches its key and is not yet due for renewal.
        """
        if (
            not (os.path.exists(self.certificatePath) and os.path.exists(self.keyPath))
            and not self._importGoCertificate()
        ):
            return
        try:
            with open(self.metadataPath) as f:
                metadata = json.load(f)
        except (OSError, ValueError):
            metadata = {}
        if metadata.get("directoryURL") != self.directoryURL:
            self.log.info(
                "ACME: the certificate in {dir!r} was not ordered from {url}; ordering a new one",
                dir=self.dataDir,
                url=self.directoryURL,
            )
            return
        try:
            self._install(*self._load())
        except (ConfigurationError, ValueError) as e:
            self.log.warn(
                "ACME: not using the certificate in {dir!r}: {error}; ordering a new one",
                dir=self.dataDir,
                error=str(e),
            )
            return
        if self._now() >= self.renewalTime():
            self.log.info("ACME: the certificate on disk is due for renewal")

    def _importGoCertificate(self):
        """
        Take over the Go relay's certificate for our first domain, if it is
        usable for us (see the module docstring).

        @return: whether our files now hold it.
        """
        path = os.path.join(self.dataDir, self.domains[0])
        if self.directoryURL != LETSENCRYPT_DIRECTORY or not os.path.isfile(path):
            return False
        try:
            with open(path, "rb") as f:
                blocks = [(m.group(1), m.group(0)) for m in _PEM_BLOCK.finditer(f.read())]
            keys = [pem for kind, pem in blocks if kind.endswith(b"PRIVATE KEY")]
            chain = b"".join(pem for kind, pem in blocks if kind == b"CERTIFICATE")
            key = serialization.load_pem_private_key(keys[0], password=None)
            leaf = x509.load_pem_x509_certificate(chain)
            if (
                key.public_key() != leaf.public_key()
                or not set(self.domains) <= _dnsNames(leaf)
                or leaf.not_valid_after_utc.timestamp() <= self._now()
            ):
                raise ValueError("it does not fit")
        except (OSError, ValueError, IndexError) as e:
            self.log.info(
                "ACME: not taking over the Go relay's certificate {path!r}: {error}",
                path=path,
                error=getattr(e, "strerror", None) or str(e) or e.__class__.__name__,
            )
            return False
        try:
            self._store(_keyPEM(key), chain)
        except OSError as e:
            self.log.error(
                "ACME: cannot take over the Go relay's certificate into {dir!r}: {error}",
                dir=self.dataDir,
                error=e.strerror or str(e),
            )
            return False
        self.log.info(
            "ACME: took over the Go relay's certificate for {domains} from {path!r}",
            domains=",".join(self.domains),
            path=path,
        )
        return True

    def _load(self):
        """
        @return: C{(options, notBefore, notAfter)} from the files on disk.
        @raise ConfigurationError: unusable files.
        @raise ValueError: the certificate does not name every domain.
        """
        options = loadCertificateOptions(
            self.certificatePath,
            self.keyPath,
            now=datetime.datetime.fromtimestamp(self._now(), datetime.UTC),
        )
        leaf = options.certificate.to_cryptography()
        names = _dnsNames(leaf)
        missing = [d for d in self.domains if d not in names]
        if missing:
            raise ValueError(f"it does not name {', '.join(missing)}")
        return options, leaf.not_valid_before_utc.timestamp(), leaf.not_valid_after_utc.timestamp()

    def _store(self, keyPEM, chainPEM):
        self._prepareDirectory()
        _writePrivate(self.keyPath, keyPEM)
        _writePrivate(self.certificatePath, chainPEM)
        _writePrivate(
            self.metadataPath,
            json.dumps(
                {"directoryURL": self.directoryURL, "domains": self.domains}, indent=1
            ).encode("utf-8")
            + b"\n",
        )

    def _accountKey(self):
        """
        @return: the account key from disk, made and stored on first use.
        """
        paths = [self.accountKeyPath] + [
            os.path.join(self.dataDir, name) for name in _GO_ACCOUNT_KEYS
        ]
        path = next((p for p in paths if os.path.exists(p)), self.accountKeyPath)
        try:
            with open(path, "rb") as f:
                key = serialization.load_pem_private_key(f.read(), password=None)
        except FileNotFoundError:
            key = ec.generate_private_key(ec.SECP256R1())
            self._prepareDirectory()
            _writePrivate(self.accountKeyPath, _keyPEM(key))
            self.log.info("ACME: created a new account key in {dir!r}", dir=self.dataDir)
        except (OSError, ValueError) as e:
            raise ConfigurationError(
                f"cannot read the ACME account key {path!r}: "
                f"{getattr(e, 'strerror', None) or e.__class__.__name__}"
            ) from None
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
            raise ConfigurationError(f"the ACME account key {path!r} is not an EC P-256 key")
        return josepy.JWKEC(key=key)

    # Certificates to listeners

    def _install(self, options, notBefore, notAfter):
        self._options, self._notBefore, self._notAfter = options, notBefore, notAfter
        if self._onCertificate is not None:
            try:
                self._onCertificate(options)
            except Exception:
                self.log.failure("ACME: the onCertificate callback failed")
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(options)

    # Scheduling

    def _untilCheck(self):
        return max(0.0, min(self.renewalTime() - self._now(), self._checkInterval))

    def _schedule(self, delay):
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = self._reactor.callLater(delay, self._check)

    def _check(self):
        self._timer = None
        if not self.running or self._attempt is not None:
            return
        if self._options is not None and self._now() < self.renewalTime():
            self._schedule(self._untilCheck())
            return
        self._attempt = self._obtain()
        self._attempt.addCallback(self._obtained)
        self._attempt.addErrback(self._failed)
        self._attempt.addBoth(self._attemptDone)

    def _attemptDone(self, _):
        self._attempt = None

    def _obtained(self, result):
        keyPEM, chainPEM = result
        self._store(keyPEM, chainPEM)
        options, notBefore, notAfter = self._load()
        self._failures = 0
        self._install(options, notBefore, notAfter)
        renewAt = self.renewalTime()
        self.log.info(
            "ACME: certificate for {domains} valid until {notAfter}, renewal from {renewAt}",
            domains=",".join(self.domains),
            notAfter=_iso(notAfter),
            renewAt=_iso(renewAt),
        )
        if self.running:
            self._schedule(self._untilCheck())

    def _failed(self, failure):
        if failure.check(defer.CancelledError) and not self.running:
            return
        self._failures += 1
        delay = min(self._maxRetryDelay, self._retryDelay * 2 ** (self._failures - 1))
        delay *= random.uniform(0.9, 1.1)
        if self._options is not None:
            still = f"the current certificate is valid until {_iso(self._notAfter)}"
        else:
            still = "no certificate yet"
        message = _describe(failure)
        if message is None:
            self.log.failure(
                "ACME: unexpected error obtaining a certificate for {domains} from {url} "
                "({still}); retrying in {delay:.0f} s",
                failure,
                domains=",".join(self.domains),
                url=self.directoryURL,
                still=still,
                delay=delay,
            )
        else:
            self.log.error(
                "ACME: could not obtain a certificate for {domains} from {url}: {error} "
                "({still}); retrying in {delay:.0f} s",
                domains=",".join(self.domains),
                url=self.directoryURL,
                error=message,
                still=still,
                delay=delay,
            )
        if self.running:
            self._schedule(delay)

    # ACME

    def _listen(self):
        """
        With HTTP-01, bind its listener if it is not bound; if it cannot be
        bound, say so and switch to TLS-ALPN-01 for the rest of this run.
        """
        if self.challenge != HTTP_01 or self._listeningPort is not None:
            return
        site = challengeSite(self._responses, self._reactor)
        interfaces = [self.http01Interface] if self.http01Interface is not None else ["::", ""]
        for interface in interfaces:
            try:
                self._listeningPort = self._reactor.listenTCP(
                    self.http01Port, site, interface=interface
                )
            except ierror.CannotListenError as e:
                reason = e
                continue
            self.log.info(
                "ACME: HTTP-01 challenges on {address}", address=self._listeningPort.getHost()
            )
            return
        self.challenge = TLS_ALPN_01
        self.log.warn(
            "ACME: cannot listen on port {port} for HTTP-01 challenges ({error}); answering "
            "TLS-ALPN-01 on the peer port instead",
            port=self.http01Port,
            error=getattr(reason.socketError, "strerror", None) or str(reason.socketError),
        )

    def _blocking(self, timeout, f, *args):
        d = threads.deferToThreadPool(self._reactor, self._reactor.getThreadPool(), f, *args)
        d.addTimeout(timeout, self._reactor)
        return d

    def _finishTimeout(self, answers):
        """
        The overall timeout of L{_finish} for C{answers} challenges: one
        request per answer, then the polling deadline, then the requests
        that deadline does not bound: the one in flight when it passes, the
        finalization, the order poll in flight and the certificate download,
        and the library's 1 s pause between polls. Every domain's
        authorisation fits, however many there are.
        """
        return self._orderTimeout + (answers + 4) * self._requestTimeout + 1.0

    @defer.inlineCallbacks
    def _obtain(self):
        """
        One order from account to certificate.

        @return: a L{Deferred} firing with C{(key PEM, chain PEM)}.
        """
        accountKey = self._accountKey()
        certificateKey = ec.generate_private_key(ec.SECP256R1())
        keyPEM = _keyPEM(certificateKey)
        csrPEM = crypto_util.make_csr(keyPEM, self.domains)
        self.log.info(
            "ACME: ordering a certificate for {domains} from {url}",
            domains=",".join(self.domains),
            url=self.directoryURL,
        )
        acmeClient, order = yield self._blocking(
            self._orderTimeout + self._requestTimeout, self._newOrder, accountKey, csrPEM
        )
        self.orders += 1
        answers, cleanups = [], []
        try:
            for authorization in order.authorizations:
                if authorization.body.status == messages.STATUS_VALID:
                    continue
                answers.append(self._prepareChallenge(authorization, accountKey, cleanups))
            order = yield self._blocking(
                self._finishTimeout(len(answers)), self._finish, acmeClient, order, answers
            )
        finally:
            for cleanup in cleanups:
                cleanup()
        return keyPEM, order.fullchain_pem.encode("ascii")

    def _prepareChallenge(self, authorization, accountKey, cleanups):
        """
        Get ready to answer the challenge of our type in C{authorization}.

        @param cleanups: gets a callable that withdraws the answer.
        @return: C{(challenge body, response)} for L{_finish}.
        """
        domain = authorization.body.identifier.value
        for challengeBody in authorization.body.challenges:
            if self.challenge == HTTP_01 and isinstance(challengeBody.chall, challenges.HTTP01):
                response, validation = challengeBody.chall.response_and_validation(accountKey)
                token = challengeBody.chall.encode("token")
                self._responses[token] = validation
                cleanups.append(lambda token=token: self._responses.pop(token, None))
                return challengeBody, response
            offered = challengeBody.chall.to_partial_json()
            if (
                self.challenge == TLS_ALPN_01
                and offered.get("type") == TLS_ALPN_01
                and isinstance(offered.get("token"), str)
            ):
                keyAuthorization = _keyAuthorization(offered["token"], accountKey)
                self._alpnResponses[domain] = tlsALPNCertificate(domain, keyAuthorization)
                cleanups.append(lambda: self._alpnResponses.pop(domain, None))
                return challengeBody, _TLSALPN01Response(key_authorization=keyAuthorization)
        raise _AcmeProblem(f"the CA offers no {self.challenge} challenge for {domain}")

    # TLS-ALPN-01 on the peer listener

    def _serverContext(self):
        """
        The context for a new peer connection: the current certificate's,
        armed for TLS-ALPN-01 (whatever the configured challenge, since an
        HTTP-01 relay may have fallen back to it); before the first
        certificate, the placeholder's, which refuses every handshake but
        TLS-ALPN-01 validations.
        """
        options = self._options
        if options is None:
            if self._bareContext is None:
                placeholder, placeholderKey = _selfSigned(self.domains[0])
                self._bareContext = SSL.Context(SSL.TLS_METHOD)
                self._bareContext.set_min_proto_version(SSL.TLS1_2_VERSION)
                self._bareContext.use_certificate(placeholder)
                self._bareContext.use_privatekey(placeholderKey)
                self._bareContext.set_alpn_select_callback(self._selectALPN)
                self._bareContext.set_info_callback(self._placeholderEvent)
            return self._bareContext
        context = options.getContext()
        if context is not self._armedContext:
            context.set_alpn_select_callback(self._selectALPN)
            self._armedContext = context
        return context

    def _placeholderEvent(self, connection, where, code):
        """
        OpenSSL's info callback on the placeholder context. A handshake that
        completes without C{acme-tls/1} (a client that does not check
        certificates) or that the client ends with a fatal alert (it checks
        them and refuses the placeholder) is one refused connection: counted,
        and aborted with L{ConnectionAborted}, which the peer protocol
        (Autobahn) logs at debug only, where the TLS error would be logged
        at error level: agents retry until the certificate is there. The
        ACME validator's handshakes end neither way, and alerts we send (a
        TCP connection closed without a TLS handshake, an unsupported
        version) are not about the certificate.
        """
        if where & SSL.SSL_CB_HANDSHAKE_DONE:
            refused = connection.get_alpn_proto_negotiated() != ACME_TLS_ALPN
        else:
            refused = (
                where & SSL.SSL_CB_READ_ALERT == SSL.SSL_CB_READ_ALERT
                and code >> 8 == _FATAL_ALERT
                and connection.get_alpn_proto_negotiated() != ACME_TLS_ALPN
            )
        if not refused:
            return
        if self._counters is not None:
            self._counters.handshakeRejects[NO_CERTIFICATE] += 1
        tlsProtocol = connection.get_app_data()
        if tlsProtocol is not None:
            # As Twisted's own client-side hostname check does from its info
            # callback; the reason it sets is the one the protocol gets.
            tlsProtocol.failVerification(
                Failure(ierror.ConnectionAborted(f"no certificate for {self.domains[0]} yet"))
            )

    def _selectALPN(self, connection, offered):
        """
        OpenSSL's ALPN callback: a client offering acme-tls/1 for a name with
        a pending challenge gets the validation certificate (swapped in
        before the server's certificate is sent); everyone else negotiates no
        protocol, as without the callback.
        """
        if ACME_TLS_ALPN in offered:
            name = (connection.get_servername() or b"").decode("ascii", "replace").lower()
            answer = self._alpnResponses.get(name)
            if answer is not None:
                connection.use_certificate(answer[0])
                connection.use_privatekey(answer[1])
                self.log.info("ACME: answered the TLS-ALPN-01 challenge for {name}", name=name)
                return ACME_TLS_ALPN
        return SSL.NO_OVERLAPPING_PROTOCOLS

    def _client(self, accountKey):
        """
        In a thread: the directory and the account for C{accountKey}.
        """
        network = client.ClientNetwork(
            accountKey,
            alg=josepy.ES256,
            verify_ssl=self.caBundle or True,
            user_agent="relay (openZro/NetBird relay in Twisted)",
            timeout=self._requestTimeout,
        )
        directory = client.ClientV2.get_directory(self.directoryURL, network)
        acmeClient = client.ClientV2(directory, network)
        registration = messages.NewRegistration.from_data(
            email=self.email, terms_of_service_agreed=True
        )
        try:
            acmeClient.new_account(registration)
        except errors.ConflictError as e:
            network.account = messages.RegistrationResource(
                uri=e.location, body=messages.Registration()
            )
        return acmeClient

    def _newOrder(self, accountKey, csrPEM):
        """
        In a thread: account and new order.
        """
        acmeClient = self._client(accountKey)
        return acmeClient, acmeClient.new_order(csrPEM)

    def _finish(self, acmeClient, order, answers):
        """
        In a thread: answer the challenges, wait for validation, finalize and
        download the chain.
        """
        for challengeBody, response in answers:
            acmeClient.answer_challenge(challengeBody, response)
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=self._orderTimeout)
        return acmeClient.poll_and_finalize(order, deadline)


class _AcmeProblem(Exception):
    """
    An attempt cannot go on; the message is for the operator.
    """


def _keyPEM(key):
    """
    @return: C{key} as unencrypted PKCS#8 PEM.
    """
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _dnsNames(certificate):
    """
    @return: the set of DNS names in C{certificate}'s subjectAltName
        (empty without that extension).
    """
    try:
        extension = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return set()
    return set(extension.value.get_values_for_type(x509.DNSName))


def _iso(seconds):
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _describe(failure):
    """
    @return: one line for an expected failure (CA unreachable or refusing,
        validation failed, timeouts, files), or L{None} for a bug.
    """
    if failure.check(defer.TimeoutError, defer.CancelledError):
        return "no answer from the CA in time"
    if failure.check(errors.ValidationError):
        details = []
        for authorization in failure.value.failed_authzrs:
            for challengeBody in authorization.body.challenges:
                if challengeBody.error is not None:
                    details.append(f"{authorization.body.identifier.value}: {challengeBody.error}")
        return "validation failed: " + "; ".join(details)
    if failure.check(requests.ConnectionError):
        return f"cannot reach the CA: {failure.value}"
    if failure.check(requests.Timeout, errors.TimeoutError):
        return "the CA did not answer in time"
    if failure.check(messages.Error):
        return f"the CA refused: {failure.value}"
    if failure.check(
        errors.Error,
        requests.RequestException,
        _AcmeProblem,
        ConfigurationError,
        OSError,
        ValueError,
    ):
        return str(failure.value) or failure.value.__class__.__name__
    return None
