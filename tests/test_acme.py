"""
Certificates from an ACME CA: renewal timing, storage, reuse, retries, and the
whole exchange against Debian's pebble on loopback.
"""

import hashlib
import json
import os
import socket
import stat
import time
import types

import josepy
import requests
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet import defer, protocol, reactor, threads
from twisted.internet.endpoints import SSL4ServerEndpoint
from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.interfaces import IHandshakeListener, IOpenSSLClientConnectionCreator
from twisted.internet.ssl import Certificate, CertificateOptions, TLSVersion, optionsForClientTLS
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web.test.requesthelper import DummyRequest
from zope.interface import implementer

from relay import acme
from relay.acme import (
    ACME_TLS_ALPN,
    HTTP_01,
    LETSENCRYPT_DIRECTORY,
    NO_CERTIFICATE,
    RENEW_BEFORE_MAX,
    TLS_ALPN_01,
    AcmeCertificateService,
    _ChallengeResource,
    challengeSite,
    renewalTime,
    tlsALPNCertificate,
)
from relay.counters import RelayCounters
from relay.relay import ConfigurationError
from tests.certs import writeCertificate
from tests.pebble import SKIP, Pebble, freePort

DAY = 24 * 3600.0


def _pem(path):
    with open(path, "rb") as f:
        return f.read()


def _serial(path):
    return x509.load_pem_x509_certificate(_pem(path)).serial_number


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


class _Events:
    """
    Collects log events while a test runs.
    """

    def __init__(self, case):
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        case.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def texts(self):
        return [formatEvent(e) for e in self.events]


class RenewalTimeTests(unittest.TestCase):
    def test_ninetyDays(self):
        """
        A Let's Encrypt 90-day certificate renews 30 days before expiry.
        """
        self.assertEqual(renewalTime(0.0, 90 * DAY), 60 * DAY)

    def test_longLived(self):
        """
        Longer lifetimes still renew 30 days before expiry.
        """
        self.assertEqual(renewalTime(0.0, 5 * 365 * DAY), 5 * 365 * DAY - RENEW_BEFORE_MAX)

    def test_shortLived(self):
        """
        Short-lived certificates renew a third of their lifetime before
        expiry, not 30 days (which would renew forever).
        """
        self.assertEqual(renewalTime(100.0, 100.0 + 6 * DAY), 100.0 + 4 * DAY)
        self.assertEqual(renewalTime(1000.0, 1009.0), 1006.0)

    def test_aroundNinetyDays(self):
        """
        A third of the lifetime below 90 days, 30 days above.
        """
        self.assertEqual(renewalTime(0.0, 87 * DAY), 58 * DAY)
        self.assertEqual(renewalTime(0.0, 93 * DAY), 63 * DAY)


class _FakeIssuer(AcmeCertificateService):
    """
    The service with the ACME exchange replaced by self-signed certificates
    or a given failure.
    """

    failWith = None

    def __init__(self, *args, days=90, **kwargs):
        super().__init__(*args, **kwargs)
        self.days = days
        self.obtainCalls = 0

    def _obtain(self):
        self.obtainCalls += 1
        self.orders += 1
        if self.failWith is not None:
            return defer.fail(self.failWith)
        scratch = os.path.join(self.dataDir + ".scratch", str(self.obtainCalls))
        cert, key, _ = writeCertificate(scratch, name=self.domains[0], days=self.days)
        return defer.succeed((_pem(key), _pem(cert)))


class UnitTests(unittest.TestCase):
    """
    The service without an ACME server: MemoryReactorClock for timers and
    listeners, the exchange replaced by L{_FakeIssuer}.
    """

    directoryURL = "https://acme.invalid/directory"

    def setUp(self):
        self.clock = MemoryReactorClock()
        self.clock.advance(time.time())
        self.dataDir = os.path.join(self.mktemp(), "data")
        self.loaded = []

    def service(self, domains=("relay.example",), cls=_FakeIssuer, **kwargs):
        kwargs.setdefault("onCertificate", self.loaded.append)
        s = cls(
            list(domains), self.dataDir, "ops@example.org", self.directoryURL, self.clock, **kwargs
        )
        self.addCleanup(lambda: s.running and s.stopService())
        return s

    def placeCertificate(self, name="relay.example", days=90, directoryURL=None, expired=False):
        """
        A certificate on disk as a previous run would have left it.
        """
        os.makedirs(self.dataDir, mode=0o700, exist_ok=True)
        cert, key, _ = writeCertificate(
            self.dataDir + ".old", name=name, days=days, expired=expired
        )
        for source, target in ((cert, "certificate.pem"), (key, "certificate.key")):
            with open(os.path.join(self.dataDir, target), "wb") as f:
                f.write(_pem(source))
        with open(os.path.join(self.dataDir, "certificate.json"), "w") as f:
            json.dump({"directoryURL": directoryURL or self.directoryURL, "domains": [name]}, f)
        return _serial(cert)

    def writeGoCache(self, name="relay.example", days=90):
        """
        What the Go relay's autocert.DirCache leaves: C{acme_account+key} and
        a file named after the domain with the key, then the chain (SEC1 PEM
        keys, as Go writes them).
        """
        os.makedirs(self.dataDir, mode=0o700, exist_ok=True)
        cert, key, _ = writeCertificate(self.dataDir + ".go", name=name, days=days)

        def sec1(pem):
            return serialization.load_pem_private_key(pem, None).private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            )

        with open(os.path.join(self.dataDir, name), "wb") as f:
            f.write(sec1(_pem(key)) + _pem(cert))
        account = ec.generate_private_key(ec.SECP256R1())
        with open(os.path.join(self.dataDir, "acme_account+key"), "wb") as f:
            f.write(
                account.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.TraditionalOpenSSL,
                    serialization.NoEncryption(),
                )
            )
        return _serial(cert), account

    def test_takesOverGoCertificate(self):
        """
        Pointed at the Go relay's data directory, the service serves the Go
        relay's certificate without an order.
        """
        serial, _ = self.writeGoCache()
        self.directoryURL = LETSENCRYPT_DIRECTORY
        s = self.service()
        s.startService()
        self.clock.advance(0)
        self.assertEqual(s.orders, 0)
        self.assertEqual(len(self.loaded), 1)
        self.assertEqual(_serial(s.certificatePath), serial)
        self.assertEqual(_mode(s.keyPath), 0o600)

    def test_goCertificateOnlyForLetsEncrypt(self):
        self.writeGoCache()
        s = self.service()
        s.startService()
        self.clock.advance(0)
        self.assertEqual(s.orders, 1)

    def test_goCertificateMustNameEveryDomain(self):
        self.writeGoCache()
        self.directoryURL = LETSENCRYPT_DIRECTORY
        s = self.service(domains=["relay.example", "other.example"])
        s.startService()
        self.clock.advance(0)
        self.assertEqual(s.orders, 1)

    def test_usesGoAccountKey(self):
        _, account = self.writeGoCache()
        s = self.service()
        self.assertEqual(s._accountKey().thumbprint(), josepy.JWKEC(key=account).thumbprint())
        self.assertFalse(os.path.exists(s.accountKeyPath))

    def test_refusesOtherChallenges(self):
        e = self.assertRaises(
            ConfigurationError,
            AcmeCertificateService,
            ["relay.example"],
            self.dataDir,
            None,
            self.directoryURL,
            self.clock,
            challenge="dns-01",
        )
        self.assertIn("not supported", str(e))

    def test_tlsALPNByDefault(self):
        """
        TLS-ALPN-01 on the peer port is the default, as in the Go relay: no
        second listener.
        """
        s = self.service()
        self.assertEqual(s.challenge, TLS_ALPN_01)
        s.privilegedStartService()
        s.startService()
        self.assertEqual(self.clock.tcpServers, [])

    def test_defaultDirectory(self):
        s = AcmeCertificateService(["relay.example"], self.dataDir, None, None, self.clock)
        self.assertEqual(s.directoryURL, "https://acme-v02.api.letsencrypt.org/directory")

    def test_needsDomains(self):
        self.assertRaises(
            ConfigurationError,
            AcmeCertificateService,
            [" ", ""],
            self.dataDir,
            None,
            self.directoryURL,
            self.clock,
        )

    def test_obtainStoresPrivately(self):
        """
        The first start orders a certificate and stores it owner-only in an
        owner-only directory; whenReady and onCertificate see it.
        """
        s = self.service()
        ready = s.whenReady()
        s.startService()
        self.assertNoResult(ready)
        self.clock.advance(0)
        options = self.successResultOf(ready)
        self.assertIs(self.successResultOf(s.whenReady()), options)
        self.assertEqual(self.loaded, [options])
        self.assertEqual(s.orders, 1)
        self.assertEqual(_mode(self.dataDir), 0o700)
        for path in (s.certificatePath, s.keyPath, s.metadataPath):
            self.assertEqual(_mode(path), 0o600, path)
        self.assertEqual(json.loads(_pem(s.metadataPath))["directoryURL"], self.directoryURL)
        self.assertEqual(
            sorted(os.listdir(self.dataDir)),
            ["certificate.json", "certificate.key", "certificate.pem"],
        )

    def test_accountKeyPrivateAndReused(self):
        s = self.service()
        first = s._accountKey()
        self.assertEqual(_mode(s.accountKeyPath), 0o600)
        self.assertEqual(first.thumbprint(), self.service()._accountKey().thumbprint())

    def test_tightensDirectory(self):
        os.makedirs(self.dataDir)
        os.chmod(self.dataDir, 0o755)
        self.service().startService()
        self.assertEqual(_mode(self.dataDir), 0o700)

    def test_reuseWithoutOrder(self):
        """
        A valid certificate on disk is used at once, without an order, and the
        next check is scheduled (at most checkInterval away).
        """
        serial = self.placeCertificate(days=90)
        s = self.service(checkInterval=3600.0)
        s.startService()
        options = self.successResultOf(s.whenReady())
        self.assertEqual(self.loaded, [options])
        self.clock.advance(0)
        self.assertEqual(s.orders, 0)
        self.assertEqual(_serial(s.certificatePath), serial)
        [call] = self.clock.getDelayedCalls()
        self.assertLessEqual(abs(call.getTime() - self.clock.seconds() - 3600.0), 1)
        self.clock.advance(3600)
        self.assertEqual(s.orders, 0)

    def test_renewsOnTimer(self):
        """
        When the renewal time comes the running service orders a new
        certificate and hands it over; no restart.
        """
        self.placeCertificate(days=6)
        s = self.service(days=30)
        s.startService()
        self.assertEqual(len(self.loaded), 1)
        renewAt = s.renewalTime()
        self.assertLessEqual(abs(s._notAfter - renewAt - (s._notAfter - s._notBefore) / 3), 1)
        self.clock.advance(renewAt - self.clock.seconds() - 10)
        self.assertEqual(s.orders, 0)
        self.clock.advance(20)
        self.assertEqual(s.orders, 1)
        self.assertEqual(len(self.loaded), 2)
        self.assertIsNot(self.loaded[0], self.loaded[1])
        self.assertIs(self.successResultOf(s.whenReady()), self.loaded[1])
        self.assertGreater(s.renewalTime(), self.clock.seconds())

    def test_dueOnDiskServedThenRenewed(self):
        """
        A certificate on disk that is due for renewal is still served while
        the new one is ordered.
        """
        self.placeCertificate(days=6)
        s = self.service(days=30, now=lambda: self.clock.seconds() + 5 * DAY)
        s.startService()
        self.assertEqual(len(self.loaded), 1)
        self.clock.advance(0)
        self.assertEqual(s.orders, 1)
        self.assertEqual(len(self.loaded), 2)

    def test_otherDirectoryOrders(self):
        """
        A certificate from another directory (staging) is not reused.
        """
        self.placeCertificate(directoryURL="https://acme-staging.invalid/directory")
        s = self.service()
        s.startService()
        self.assertEqual(self.loaded, [])
        self.clock.advance(0)
        self.assertEqual(s.orders, 1)

    def test_otherNamesOrders(self):
        self.placeCertificate(name="other.example")
        s = self.service()
        s.startService()
        self.clock.advance(0)
        self.assertEqual(s.orders, 1)
        self.assertEqual(len(self.loaded), 1)

    def test_expiredOrders(self):
        self.placeCertificate(expired=True)
        s = self.service()
        s.startService()
        self.assertEqual(self.loaded, [])
        self.clock.advance(0)
        self.assertEqual(s.orders, 1)

    def test_failuresRetryWithBackoff(self):
        """
        A CA that cannot be reached is logged in one line with the retry
        delay; retries back off; the next success is used.
        """
        events = _Events(self)
        s = self.service(retryDelay=10.0, maxRetryDelay=35.0)
        s.failWith = requests.ConnectionError("connection refused")
        s.startService()
        self.clock.advance(0)
        self.assertEqual(s.obtainCalls, 1)
        texts = [t for t in events.texts() if "could not obtain" in t]
        self.assertEqual(len(texts), 1)
        self.assertIn("cannot reach the CA: connection refused", texts[0])
        self.assertIn("no certificate yet", texts[0])
        delays = []
        for _ in range(4):
            [call] = self.clock.getDelayedCalls()
            delays.append(call.getTime() - self.clock.seconds())
            self.clock.advance(delays[-1])
        for got, want in zip(delays, [10, 20, 35, 35]):
            self.assertLessEqual(abs(got - want), want * 0.1 + 0.01, (got, want))
        s.failWith = None
        [call] = self.clock.getDelayedCalls()
        self.clock.advance(call.getTime() - self.clock.seconds())
        self.assertEqual(len(self.loaded), 1)
        self.assertEqual(s._failures, 0)

    def test_failedRenewalKeepsCertificate(self):
        events = _Events(self)
        self.placeCertificate(days=6)
        s = self.service(now=lambda: self.clock.seconds() + 5 * DAY)
        s.failWith = ValueError("order failed")
        s.startService()
        self.clock.advance(0)
        self.assertEqual(self.loaded, [self.successResultOf(s.whenReady())])
        [text] = [t for t in events.texts() if "could not obtain" in t]
        self.assertIn("the current certificate is valid until", text)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)

    def test_unexpectedErrorLoggedWithTraceback(self):
        s = self.service()
        s.failWith = ZeroDivisionError()
        s.startService()
        self.clock.advance(0)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)

    def test_stopCancelsTimer(self):
        self.placeCertificate()
        s = self.service()
        s.startService()
        s.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_onCertificateErrorsContained(self):
        def broken(options):
            raise RuntimeError("listener gone")

        s = self.service(onCertificate=broken)
        s.startService()
        self.clock.advance(0)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertIsNotNone(self.successResultOf(s.whenReady()))

    def test_whenReadyCancel(self):
        s = self.service()
        d = s.whenReady()
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        s.startService()
        self.clock.advance(0)

    def test_http01ListenerBound(self):
        s = self.service(challenge=HTTP_01, http01Port=8080)
        s.privilegedStartService()
        [(port, factory, backlog, interface)] = self.clock.tcpServers
        self.assertEqual((port, interface), (8080, "::"))
        self.assertEqual(factory.limit, acme.HTTP01_MAX_CONNECTIONS)
        self.assertEqual(factory.wrappedFactory.timeOut, acme.HTTP01_TIMEOUT)
        s.startService()
        self.assertEqual(len(self.clock.tcpServers), 1)
        self.assertEqual(s.challenge, HTTP_01)


class TLSALPNCertificateTests(unittest.TestCase):
    def test_acmeIdentifier(self):
        """
        RFC 8737 3: the domain as the only SAN and a critical acmeIdentifier
        holding the DER OCTET STRING of SHA-256(key authorization).
        """
        certificate, key = tlsALPNCertificate("relay.example", "token.thumbprint")
        parsed = certificate.to_cryptography()
        extension = parsed.extensions.get_extension_for_oid(
            x509.ObjectIdentifier("1.3.6.1.5.5.7.1.31")
        )
        self.assertTrue(extension.critical)
        self.assertEqual(
            extension.value.value, b"\x04\x20" + hashlib.sha256(b"token.thumbprint").digest()
        )
        self.assertEqual(
            parsed.extensions.get_extension_for_class(
                x509.SubjectAlternativeName
            ).value.get_values_for_type(x509.DNSName),
            ["relay.example"],
        )
        self.assertEqual(ACME_TLS_ALPN, b"acme-tls/1")

    def test_connectionBeforeCertificate(self):
        """
        Before the first certificate both modes hand the listener a
        connection on the placeholder (which refuses it during the
        handshake) instead of raising, which logged three tracebacks per
        connection with HTTP-01.
        """
        clock = MemoryReactorClock()
        for challenge in (HTTP_01, TLS_ALPN_01):
            s = AcmeCertificateService(
                ["relay.example"],
                self.mktemp(),
                None,
                "https://acme.invalid/",
                clock,
                challenge=challenge,
            )
            connection = s.serverConnectionCreator().serverConnectionForTLS(None)
            self.assertIs(connection.get_context(), s._bareContext)


@implementer(IHandshakeListener)
class _Probe(protocol.Protocol):
    """
    A TLS client that records whether its handshake completed, what it
    negotiated and the server's certificate, then waits for the server to
    end the connection (or hangs up itself after C{hangUp} handshakes).
    """

    completed = False
    negotiated = None
    certificate = None

    def handshakeCompleted(self):
        self.completed = True
        self.negotiated = self.transport.negotiatedProtocol
        self.certificate = self.transport.getPeerCertificate()
        if self.factory.hangUp:
            self.transport.loseConnection()

    def connectionLost(self, reason):
        self.factory.done.callback(self)


class _Ended(protocol.Protocol):
    """
    The server side: fires C{factory.ended} with the reason when the
    connection is gone.
    """

    def connectionLost(self, reason):
        self.factory.ended.callback(reason.value)


class RefusalBeforeCertificateTests(unittest.TestCase):
    """
    Real TLS handshakes on loopback against the placeholder that the peer
    listener serves before the first certificate.
    """

    def setUp(self):
        self.counters = RelayCounters()
        self.events = _Events(self)
        self.service = AcmeCertificateService(
            ["relay.example"],
            self.mktemp(),
            None,
            "https://acme.invalid/",
            reactor,
            challenge=HTTP_01,
            counters=self.counters,
        )

    @defer.inlineCallbacks
    def connect(self, options, hangUp=False):
        """
        One connection, until both ends have seen it end.
        """
        server = protocol.Factory.forProtocol(_Ended)
        server.ended = defer.Deferred()
        port = yield SSL4ServerEndpoint(
            reactor, 0, self.service.serverConnectionCreator(), interface="127.0.0.1"
        ).listen(server)
        self.addCleanup(port.stopListening)
        client = protocol.ClientFactory.forProtocol(_Probe)
        client.done, client.hangUp = defer.Deferred(), hangUp
        reactor.connectSSL("127.0.0.1", port.getHost().port, client, options)
        probe = yield client.done.addTimeout(10, reactor)
        probe.serverReason = yield server.ended.addTimeout(10, reactor)
        return probe

    def assertQuiet(self):
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertEqual(
            [e for e in self.events.events if e.get("log_failure") is not None or e.get("isError")],
            [],
        )

    @defer.inlineCallbacks
    def test_verifyingClientRefused(self):
        """
        An agent that checks certificates refuses the placeholder: one
        count per connection, nothing logged. Both modes, every TLS version
        an agent may use.
        """
        otherRoot = Certificate.loadPEM(
            tlsALPNCertificate("elsewhere.example", "x")[0]
            .to_cryptography()
            .public_bytes(serialization.Encoding.PEM)
        )
        for n, version in enumerate((None, TLSVersion.TLSv1_2), 1):
            options = optionsForClientTLS(
                "relay.example",
                trustRoot=otherRoot,
                extraCertificateOptions={"raiseMinimumTo": version} if version else None,
            )
            probe = yield self.connect(options)
            self.assertFalse(probe.completed)
            self.assertEqual(self.counters.handshakeRejects, {NO_CERTIFICATE: n})
            # Not the TLS error, which Autobahn logs at error level.
            self.assertIsInstance(probe.serverReason, ConnectionAborted)
        self.assertQuiet()

    @defer.inlineCallbacks
    def test_uncheckingClientRefused(self):
        """
        A client that does not check certificates is cut off when the
        server's side of the handshake completes: after the client's with
        TLS 1.3, before it (the server's Finished is never sent) with 1.2.
        """
        for n, maximum in enumerate((TLSVersion.TLSv1_3, TLSVersion.TLSv1_2), 1):
            probe = yield self.connect(CertificateOptions(lowerMaximumSecurityTo=maximum))
            self.assertEqual(probe.completed, maximum == TLSVersion.TLSv1_3)
            self.assertEqual(self.counters.handshakeRejects, {NO_CERTIFICATE: n})
            self.assertIsInstance(probe.serverReason, ConnectionAborted)
        self.assertQuiet()

    @defer.inlineCallbacks
    def test_plainTCPNotCounted(self):
        """
        A TCP connection closed without a TLS handshake (a port scan, a
        readiness probe) is no refused TLS connection.
        """
        server = protocol.Factory.forProtocol(_Ended)
        server.ended = defer.Deferred()
        port = yield SSL4ServerEndpoint(
            reactor, 0, self.service.serverConnectionCreator(), interface="127.0.0.1"
        ).listen(server)
        self.addCleanup(port.stopListening)
        client = yield protocol.ClientCreator(reactor, protocol.Protocol).connectTCP(
            "127.0.0.1", port.getHost().port
        )
        client.transport.loseConnection()
        yield server.ended.addTimeout(10, reactor)
        self.assertEqual(self.counters.handshakeRejects, {})
        self.assertQuiet()

    @defer.inlineCallbacks
    def test_validatorServed(self):
        """
        The ACME validator (acme-tls/1 for a name with a pending challenge)
        gets its validation certificate and is not counted, even after an
        HTTP-01 relay fell back to TLS-ALPN-01.
        """
        self.service._alpnResponses["relay.example"] = tlsALPNCertificate(
            "relay.example", "token.thumbprint"
        )
        options = CertificateOptions(acceptableProtocols=[ACME_TLS_ALPN])
        probe = yield self.connect(_WithServerName(options, b"relay.example"), hangUp=True)
        self.assertEqual(probe.negotiated, ACME_TLS_ALPN)
        self.assertEqual(
            probe.certificate.get_serial_number(),
            self.service._alpnResponses["relay.example"][0].get_serial_number(),
        )
        self.assertEqual(self.counters.handshakeRejects, {})
        self.assertQuiet()


@implementer(IOpenSSLClientConnectionCreator)
class _WithServerName:
    """
    Client connections from C{CertificateOptions} (no verification) that
    send C{name} as SNI, as a validator does.
    """

    def __init__(self, options, name):
        self._options = options
        self._name = name

    def clientConnectionForTLS(self, tlsProtocol):
        connection = self._options.clientConnectionForTLS(tlsProtocol)
        connection.set_tlsext_host_name(self._name)
        return connection


class ChallengeListenerTests(unittest.TestCase):
    """
    The HTTP-01 listener's bounds, driven over string transports and a
    clock.
    """

    def setUp(self):
        self.clock = MemoryReactorClock()
        self.factory = challengeSite({"tok": "tok.thumb"}, self.clock)

    def connect(self):
        channel = self.factory.buildProtocol(None)
        if channel is None:
            return None
        transport = StringTransport()
        channel.makeConnection(transport)
        return channel, transport

    def test_answers(self):
        channel, transport = self.connect()
        channel.dataReceived(
            b"GET /.well-known/acme-challenge/tok HTTP/1.1\r\nHost: relay.example\r\n\r\n"
        )
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 "), transport.value())
        self.assertTrue(transport.value().endswith(b"\r\n\r\ntok.thumb"))

    def test_connectionCap(self):
        """
        Past the cap new connections are closed at once (buildProtocol
        returns None); closing one makes room.
        """
        held = [self.connect() for _ in range(acme.HTTP01_MAX_CONNECTIONS)]
        self.assertNotIn(None, held)
        self.assertIsNone(self.connect())
        self.assertEqual(self.factory.refusals["connections"], 1)
        channel, transport = held[0]
        channel.connectionLost(Failure(ConnectionDone()))
        self.assertIsNotNone(self.connect())

    def test_idleTimeout(self):
        channel, transport = self.connect()
        channel.dataReceived(b"GET /.well-known/acme-")
        self.clock.advance(acme.HTTP01_TIMEOUT - 0.5)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(1)
        self.assertTrue(transport.disconnecting)

    def test_lifetime(self):
        """
        A client that keeps sending a byte before each idle timeout is cut
        off after HTTP01_LIFETIME anyway, and its slot is free again.
        """
        channel, transport = self.connect()
        channel.dataReceived(b"GET /")
        for _ in range(int(acme.HTTP01_LIFETIME // (acme.HTTP01_TIMEOUT / 2)) - 1):
            self.clock.advance(acme.HTTP01_TIMEOUT / 2)
            channel.dataReceived(b"a")
        self.assertFalse(transport.disconnecting)
        self.clock.advance(acme.HTTP01_TIMEOUT / 2)
        self.assertTrue(transport.disconnecting)
        channel.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.factory.protocols, {})
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_headerLimit(self):
        """
        Headers past Twisted's lowered limits get 400 and the connection
        closed.
        """
        channel, transport = self.connect()
        channel.dataReceived(
            b"GET / HTTP/1.1\r\n" + b"X-Pad: " + b"a" * acme.HTTP01_MAX_HEADER_BYTES + b"\r\n"
        )
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 400 "), transport.value())
        self.assertTrue(transport.disconnecting)
        channel, transport = self.connect()
        channel.dataReceived(
            b"GET / HTTP/1.1\r\n" + b"X-A: b\r\n" * (acme.HTTP01_MAX_HEADERS + 1) + b"\r\n"
        )
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 400 "), transport.value())

    def test_declaredBodyTooLarge(self):
        """
        A Content-Length over the limit ends the connection before any of
        the body is stored (a 40 MiB POST became a temporary file before).
        """
        channel, transport = self.connect()
        channel.dataReceived(b"POST / HTTP/1.1\r\nContent-Length: 41943040\r\n\r\n" + b"a" * 65536)
        self.assertEqual(transport.value(), b"")
        self.assertTrue(transport.disconnecting)
        self.assertLessEqual(
            channel.wrappedProtocol.requests[-1].content.tell(), acme.HTTP01_MAX_BODY
        )

    def test_chunkedBodyTooLarge(self):
        channel, transport = self.connect()
        chunk = b"%x\r\n%s\r\n" % (4096, b"a" * 4096)
        channel.dataReceived(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk * 4)
        self.assertTrue(transport.disconnecting)
        self.assertLessEqual(
            channel.wrappedProtocol.requests[-1].content.tell(), acme.HTTP01_MAX_BODY
        )

    def test_smallBodyServed(self):
        channel, transport = self.connect()
        channel.dataReceived(
            b"POST /.well-known/acme-challenge/tok HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}"
        )
        self.assertFalse(transport.disconnecting)
        self.assertIn(b" 405 ", transport.value().split(b"\r\n")[0])


class ChallengeResourceTests(unittest.TestCase):
    def render(self, path, responses):
        request = DummyRequest(path.strip(b"/").split(b"/"))
        body = _ChallengeResource(responses).render(request)
        return request.responseCode or 200, body

    def test_token(self):
        self.assertEqual(
            self.render(b"/.well-known/acme-challenge/tok", {"tok": "tok.thumb"}),
            (200, b"tok.thumb"),
        )

    def test_unknown(self):
        self.assertEqual(
            self.render(b"/.well-known/acme-challenge/other", {"tok": "tok.thumb"})[0], 404
        )
        self.assertEqual(self.render(b"/", {"tok": "tok.thumb"})[0], 404)
        self.assertEqual(
            self.render(b"/.well-known/acme-challenge/tok/x", {"tok": "tok.thumb"})[0], 404
        )


class _PoolClock(Clock):
    """
    A Clock that is also its own thread pool: a call runs at once, and its
    result is delivered when the work it simulated is done, C{busy}
    seconds later on this clock, so that a timeout races it in clock time.
    """

    busy = 0.0

    def getThreadPool(self):
        return self

    def callFromThread(self, f, *args):
        f(*args)

    def callInThreadWithCallback(self, onResult, f, *args):
        self.busy = 0.0
        try:
            outcome = (True, f(*args))
        except Exception as e:
            outcome = (False, Failure(e))
        self.callLater(self.busy, onResult, *outcome)


class _SlowCA:
    """
    An ACME client in the reactor's thread pool whose every challenge
    answer takes C{answerTime} and whose validation and issuance take
    C{finishTime}, on C{clock}.
    """

    def __init__(self, clock, answerTime, finishTime):
        self.clock = clock
        self.answerTime, self.finishTime = answerTime, finishTime
        self.answered = []

    def answer_challenge(self, challengeBody, response):
        self.clock.busy += self.answerTime
        self.answered.append(challengeBody.domain)

    def poll_and_finalize(self, order, deadline):
        self.clock.busy += self.finishTime
        return types.SimpleNamespace(fullchain_pem="chain")


class _SlowOrder(AcmeCertificateService):
    def _newOrder(self, accountKey, csrPEM):
        authorizations = [
            types.SimpleNamespace(
                body=types.SimpleNamespace(
                    status="pending",
                    identifier=types.SimpleNamespace(value=domain),
                    challenges=[
                        types.SimpleNamespace(
                            domain=domain,
                            chall=types.SimpleNamespace(
                                to_partial_json=lambda: {"type": TLS_ALPN_01, "token": "tok"}
                            ),
                        )
                    ],
                )
            )
            for domain in self.domains
        ]
        return self.ca, types.SimpleNamespace(authorizations=authorizations)


class OverallTimeoutTests(unittest.TestCase):
    def test_everyDomainFits(self):
        """
        Answering three domains' challenges, each within the per-request
        timeout, then validation within the order timeout, completes: the
        overall timeout grows with the number of authorisations (it was
        order + one request timeout, 0.75 s here, and gave up at 0.9 s).
        """
        clock = _PoolClock()
        s = _SlowOrder(
            ["a.example", "b.example", "c.example"],
            self.mktemp(),
            None,
            "https://acme.invalid/",
            clock,
            requestTimeout=0.25,
            orderTimeout=0.5,
        )
        s.ca = _SlowCA(clock, answerTime=0.2, finishTime=0.3)
        d = s._obtain()
        clock.pump([0.1] * 20)
        keyPEM, chain = self.successResultOf(d)
        self.assertEqual(chain, b"chain")
        self.assertEqual(s.ca.answered, ["a.example", "b.example", "c.example"])
        self.assertEqual(s._finishTimeout(3), 0.5 + 7 * 0.25 + 1.0)


class PortBusyTests(unittest.TestCase):
    def test_portBusyFallsBackToTLSALPN(self):
        """
        If the HTTP-01 port is taken (a second relay on the host) that is
        said once and the service answers TLS-ALPN-01 instead, also after
        the unprivileged start tries again.
        """
        events = _Events(self)
        busy = socket.socket()
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        self.addCleanup(busy.close)
        port = busy.getsockname()[1]
        s = AcmeCertificateService(
            ["relay.example"],
            self.mktemp(),
            None,
            "https://127.0.0.1:1/dir",
            reactor,
            challenge=HTTP_01,
            http01Port=port,
            http01Interface="127.0.0.1",
            retryDelay=60.0,
        )
        s.privilegedStartService()
        s.startService()
        self.addCleanup(s.stopService)
        self.assertIsNone(s._listeningPort)
        self.assertEqual(s.challenge, TLS_ALPN_01)
        [text] = [t for t in events.texts() if "HTTP-01" in t]
        self.assertEqual(
            text,
            f"ACME: cannot listen on port {port} for HTTP-01 challenges (Address already in "
            "use); answering TLS-ALPN-01 on the peer port instead",
        )
        self.assertEqual(
            [e["log_level"].name for e in events.events if "HTTP-01" in formatEvent(e)], ["warn"]
        )


@implementer(IHandshakeListener)
class _Client(protocol.Protocol):
    """
    Records the server's certificate once the handshake verifies, then hangs
    up; a failed verification fails C{factory.done}.
    """

    serial = None

    def connectionMade(self):
        self.transport.write(b"x")

    def handshakeCompleted(self):
        self.serial = self.transport.getPeerCertificate().to_cryptography().serial_number
        self.transport.loseConnection()

    def connectionLost(self, reason):
        if self.serial is None:
            self.factory.done.errback(reason)
        else:
            self.factory.done.callback(self.serial)


class PebbleTests(unittest.TestCase):
    """
    The real exchange with Debian's pebble on 127.0.0.1.
    """

    skip = SKIP
    timeout = 45

    @defer.inlineCallbacks
    def startPebble(self, **kwargs):
        self.http01Port = freePort()
        self.pebble = Pebble(self.mktemp(), httpPort=self.http01Port, **kwargs)
        self.addCleanup(self.pebble.stop, reactor)
        yield self.pebble.start(reactor)

    def service(self, dataDir, start=True, **kwargs):
        loaded = []
        s = AcmeCertificateService(
            ["localhost"],
            dataDir,
            "ops@example.org",
            self.pebble.directoryURL,
            reactor,
            caBundle=self.pebble.caBundle,
            http01Port=self.http01Port,
            http01Interface="127.0.0.1",
            onCertificate=loaded.append,
            retryDelay=0.5,
            **dict({"challenge": HTTP_01}, **kwargs),
        )
        s.loaded = loaded
        if start:
            s.startService()
        self.addCleanup(lambda: s.running and s.stopService())
        return s

    @defer.inlineCallbacks
    def handshake(self, s, protocols=None):
        """
        Serve C{s}'s certificate on a TLS listener and connect to it trusting
        only pebble's root, for the name localhost.
        """
        root = yield threads.deferToThread(self.pebble.rootPEM)
        server = protocol.Factory.forProtocol(protocol.Protocol)
        port = yield SSL4ServerEndpoint(
            reactor, 0, s.serverConnectionCreator(), interface="127.0.0.1"
        ).listen(server)
        self.addCleanup(port.stopListening)
        client = protocol.ClientFactory.forProtocol(_Client)
        client.done = defer.Deferred()
        options = optionsForClientTLS(
            "localhost", trustRoot=Certificate.loadPEM(root), acceptableProtocols=protocols
        )
        reactor.connectSSL("127.0.0.1", port.getHost().port, client, options)
        serial = yield client.done.addTimeout(10, reactor)
        return serial

    @defer.inlineCallbacks
    def test_obtainServeReuse(self):
        """
        HTTP-01 validated for real: pebble fetches the token from our
        listener; the certificate verifies against pebble's root in a TLS
        handshake; a restart reuses it without an order.
        """
        events = _Events(self)
        yield self.startPebble(alwaysValid=False)
        dataDir = os.path.join(self.mktemp(), "acme")
        s = self.service(dataDir)
        yield s.whenReady().addTimeout(30, reactor)
        self.assertEqual(s.orders, 1)
        self.assertIn(b"Attempting to validate w/ HTTP", self.pebble.output)
        self.assertEqual(_mode(dataDir), 0o700)
        for name in ("account.key", "certificate.pem", "certificate.key", "certificate.json"):
            self.assertEqual(_mode(os.path.join(dataDir, name)), 0o600, name)
        serial = _serial(s.certificatePath)
        self.assertEqual((yield self.handshake(s)), serial)
        yield s.stopService()

        again = self.service(dataDir)
        yield again.whenReady().addTimeout(5, reactor)
        self.assertEqual(again.orders, 0)
        self.assertEqual(_serial(again.certificatePath), serial)
        self.assertEqual(len(again.loaded), 1)

        logged = repr(events.events) + "\n".join(events.texts())
        self.assertNotIn("PRIVATE KEY", logged)
        for name in ("account.key", "certificate.key"):
            for line in _pem(os.path.join(dataDir, name)).decode("ascii").splitlines()[1:-1]:
                self.assertNotIn(line, logged)

    @defer.inlineCallbacks
    def test_tlsALPN01(self):
        """
        TLS-ALPN-01 validated for real: the peer listener, built on
        serverConnectionCreator before any certificate exists, shows pebble
        the validation certificate for acme-tls/1 and then serves the issued
        certificate to ordinary clients.
        """
        events = _Events(self)
        tlsPort = freePort()
        self.http01Port = None
        self.pebble = Pebble(self.mktemp(), alwaysValid=False, tlsPort=tlsPort)
        self.addCleanup(self.pebble.stop, reactor)
        yield self.pebble.start(reactor)
        s = self.service(os.path.join(self.mktemp(), "acme"), challenge=TLS_ALPN_01, start=False)
        server = protocol.Factory.forProtocol(protocol.Protocol)
        port = yield SSL4ServerEndpoint(
            reactor, tlsPort, s.serverConnectionCreator(), interface="127.0.0.1"
        ).listen(server)
        self.addCleanup(port.stopListening)
        s.startService()
        yield s.whenReady().addTimeout(30, reactor)
        self.assertIn(b"set VALID by completed challenge", self.pebble.output)
        self.assertTrue(
            any("answered the TLS-ALPN-01 challenge for localhost" in t for t in events.texts())
        )
        self.assertIsNone(s._listeningPort)
        self.assertEqual((yield self.handshake(s)), _serial(s.certificatePath))
        self.assertEqual(
            (yield self.handshake(s, [b"h2", b"http/1.1"])), _serial(s.certificatePath)
        )

    @defer.inlineCallbacks
    def test_renewsRunning(self):
        """
        With 9-second certificates pebble's second certificate arrives on the
        running service's own timer (a third of the lifetime before expiry)
        and new connections get it.
        """
        yield self.startPebble(validityPeriod=9)
        s = self.service(os.path.join(self.mktemp(), "acme"))
        yield s.whenReady().addTimeout(30, reactor)
        first = _serial(s.certificatePath)
        renewed = defer.Deferred()
        s._onCertificate = lambda options: renewed.called or renewed.callback(options)
        options = yield renewed.addTimeout(30, reactor)
        self.assertIs((yield s.whenReady()), options)
        second = _serial(s.certificatePath)
        self.assertNotEqual(first, second)
        self.assertEqual(s.orders, 2)
        self.assertEqual((yield self.handshake(s)), second)

    @defer.inlineCallbacks
    def test_restartCloseToExpiryRenews(self):
        """
        A restart with the certificate made to look close to expiry (clock
        moved past its renewal time) serves it, orders a new one at once and
        switches to it.
        """
        yield self.startPebble()
        dataDir = os.path.join(self.mktemp(), "acme")
        s = self.service(dataDir)
        yield s.whenReady().addTimeout(30, reactor)
        first = _serial(s.certificatePath)
        shift = s.renewalTime() - time.time() + 60
        yield s.stopService()

        again = self.service(dataDir, now=lambda: time.time() + shift)
        self.assertEqual(len(again.loaded), 1)
        renewed = defer.Deferred()
        again._onCertificate = renewed.callback
        yield renewed.addTimeout(30, reactor)
        self.assertEqual(again.orders, 1)
        self.assertNotEqual(_serial(again.certificatePath), first)

    @defer.inlineCallbacks
    def test_unreachableThenRecovers(self):
        """
        The CA down at start-up: errors are logged and retried until it
        answers.
        """
        events = _Events(self)
        self.http01Port = freePort()
        self.pebble = Pebble(self.mktemp(), httpPort=self.http01Port)
        self.addCleanup(self.pebble.stop, reactor)
        s = self.service(os.path.join(self.mktemp(), "acme"))
        ready = s.whenReady()
        yield _sleep(1.0)
        self.assertNoResult(ready)
        self.assertTrue(
            any("could not obtain a certificate" in t and "refused" in t for t in events.texts())
        )
        yield self.pebble.start(reactor)
        yield ready.addTimeout(30, reactor)
        self.assertEqual(s.orders, 1)


def _sleep(seconds):
    d = defer.Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d
