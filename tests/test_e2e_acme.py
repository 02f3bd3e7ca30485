"""
End to end: a real C{twistd relay} obtains its certificate from Debian's
pebble ACME server on loopback, serves it to peers, reuses it across a
restart and renews it while running; two relays on one host both get theirs
over TLS-ALPN-01, the default; before its first certificate a relay refuses
TLS quietly and counts it.
"""

import os
import re
import urllib.request

from twisted.internet import defer, protocol, reactor, ssl, threads
from twisted.internet.interfaces import IHandshakeListener
from twisted.trial import unittest
from zope.interface import implementer

from relay import client
from relay import messages as m
from relay.quicclient import connectQuic
from tests.e2e import RelayProcess, freePort, relayArgs, sleep, startRelay
from tests.loopback import commonPort
from tests.pebble import SKIP, HostsDNS, Pebble

A, B = m.peerID("peer-a"), m.peerID("peer-b")


class AcmeEndToEndTests(unittest.TestCase):
    skip = SKIP
    timeout = 180

    @defer.inlineCallbacks
    def startPebble(self, validityPeriod=None, **kwargs):
        kwargs.setdefault("alwaysValid", True)
        self.pebble = Pebble(
            os.path.abspath(self.mktemp()), validityPeriod=validityPeriod, **kwargs
        )
        self.addCleanup(self.pebble.stop, reactor)
        yield self.pebble.start(reactor)
        self.rootPEM = yield threads.deferToThread(self.pebble.rootPEM)
        self.root = ssl.Certificate.loadPEM(self.rootPEM)

    def startRelay(self, dataDir):
        env = dict(os.environ, REQUESTS_CA_BUNDLE=self.pebble.caBundle)
        return startRelay(
            self,
            "--letsencrypt-domains",
            "localhost",
            "--letsencrypt-data-dir",
            dataDir,
            "--letsencrypt-directory-url",
            self.pebble.directoryURL,
            "--letsencrypt-challenge",
            "http-01",
            "--letsencrypt-http-port",
            str(freePort()),
            env=env,
        )

    @defer.inlineCallbacks
    def connectTrusting(self, relay, pid, timeout=60):
        """
        Connect over TLS verifying the certificate against pebble's root,
        retrying while the relay still serves its placeholder.
        """
        url = f"rels://localhost:{relay.port}"
        deadline = reactor.seconds() + timeout
        while True:
            try:
                peer = yield client.connect(
                    reactor, url, pid, secret="relay-secret", trustRoot=self.root, timeout=5
                )
                self.addCleanup(
                    lambda peer=peer: (
                        peer.transport.abortConnection() if peer.transport.connected else None
                    )
                )
                return peer
            except Exception:
                if reactor.seconds() > deadline:
                    raise
                yield sleep(0.2)

    @defer.inlineCallbacks
    def test_obtainServeAndReuse(self):
        yield self.startPebble()
        dataDir = os.path.abspath(self.mktemp())
        relay = yield self.startRelay(dataDir)
        a = yield self.connectTrusting(relay, A)
        b = yield self.connectTrusting(relay, B)
        self.assertEqual(a.instanceURL, f"rels://127.0.0.1:{relay.port}")
        a.send(B, b"over an ACME certificate")
        self.assertEqual(
            (yield b.transports.get().addTimeout(10, reactor)), (A, b"over an ACME certificate")
        )
        # QUIC serves the same certificate, verified against pebble's root.
        rootFile = os.path.abspath(self.mktemp())
        with open(rootFile, "wb") as f:
            f.write(self.rootPEM)
        q = None
        for _ in range(50):
            try:
                q = yield connectQuic(
                    reactor,
                    "127.0.0.1",
                    relay.port,
                    m.peerID("peer-q"),
                    secret="relay-secret",
                    cafile=rootFile,
                    timeout=5,
                )
                break
            except Exception:
                yield sleep(0.2)
        self.assertIsNotNone(q, "no QUIC connection with the ACME certificate")
        q.send(B, b"over QUIC")
        self.assertEqual(
            (yield b.transports.get().addTimeout(10, reactor)), (m.peerID("peer-q"), b"over QUIC")
        )
        yield q.close()
        yield a.close()
        yield b.close()
        self.assertEqual((yield relay.stop()), 0)
        self.assertIn(b"ACME: ordering a certificate", relay.output)
        self.assertEqual(os.stat(dataDir).st_mode & 0o777, 0o700)

        again = yield self.startRelay(dataDir)
        c = yield self.connectTrusting(again, A, timeout=10)
        yield c.close()
        self.assertEqual((yield again.stop()), 0)
        self.assertNotIn(b"ACME: ordering a certificate", again.output)

    @defer.inlineCallbacks
    def test_renewsWhileRunning(self):
        yield self.startPebble(validityPeriod=12)
        relay = yield self.startRelay(os.path.abspath(self.mktemp()))
        first = yield self.connectTrusting(relay, A)
        serial = first.transport.getPeerCertificate().get_serial_number()
        deadline = reactor.seconds() + 60
        while True:
            peer = yield self.connectTrusting(relay, B)
            renewed = peer.transport.getPeerCertificate().get_serial_number()
            peer.transport.abortConnection()
            if renewed != serial:
                break
            self.assertLess(reactor.seconds(), deadline, "no renewal within 60 s")
            yield sleep(0.5)
        self.assertTrue(first.transport.connected, "renewal must not touch established connections")
        self.assertGreaterEqual(relay.output.count(b"ACME: ordering a certificate"), 2)

    @defer.inlineCallbacks
    def test_twoRelaysOneHost(self):
        """
        Two relays on one host at once, on 127.0.0.2 and 127.0.0.3 with one
        port that is not 443, each for its own name and with the default
        challenge: pebble validates both over TLS-ALPN-01 on their peer
        ports (no port 80 to share) and both serve certificates that
        verify for their names. They refuse TLS quietly until then.
        """
        hosts = {"relay-a.example.com": "127.0.0.2", "relay-b.example.com": "127.0.0.3"}
        dns = HostsDNS(hosts)
        dns.start(reactor)
        self.addCleanup(dns.stop)
        port = commonPort(list(hosts.values()))
        self.assertNotEqual(port, 443)
        yield self.startPebble(alwaysValid=False, tlsPort=port, dnsServer=dns.address)
        env = dict(os.environ, REQUESTS_CA_BUNDLE=self.pebble.caBundle)
        relays = {}
        for name, host in hosts.items():
            process = RelayProcess([], host=host, port=port, env=env)
            process.args = relayArgs(
                process,
                "relay-secret",
                "--letsencrypt-domains",
                name,
                "--letsencrypt-data-dir",
                os.path.abspath(self.mktemp()),
                "--letsencrypt-directory-url",
                self.pebble.directoryURL,
            )
            self.addCleanup(process.stop)
            relays[name] = process
        yield defer.gatherResults([p.start() for p in relays.values()])
        for name, process in relays.items():
            serial = yield self.certificateFor(process.host, port, name)
            self.assertIsNotNone(serial)
        self.assertEqual(self.pebble.output.count(b"set VALID by completed challenge"), 2)
        for process in relays.values():
            self.assertIn(b"answered the TLS-ALPN-01 challenge", process.output)
            self.assertNotIn(b"HTTP-01", process.output)
        for process in relays.values():
            self.assertEqual((yield process.stop()), 0)
            self.assertNotIn(b"Traceback", process.output)
            self.assertNotIn(b"Unhandled Error", process.output)

    @defer.inlineCallbacks
    def certificateFor(self, host, port, name, timeout=60):
        """
        The serial of the certificate C{host:port} serves for C{name},
        verified against pebble's root; retried while it is refused
        (before its certificate).
        """
        deadline = reactor.seconds() + timeout
        while True:
            factory = protocol.ClientFactory.forProtocol(_Handshake)
            factory.done = defer.Deferred()
            reactor.connectSSL(
                host, port, factory, ssl.optionsForClientTLS(name, trustRoot=self.root)
            )
            serial = yield factory.done.addTimeout(10, reactor)
            if serial is not None:
                return serial
            self.assertLess(
                reactor.seconds(), deadline, f"no certificate for {name} on {host}:{port}"
            )
            yield sleep(0.2)


class RefusalBeforeCertificateTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_refusedQuietlyAndCounted(self):
        """
        A relay whose CA cannot be reached (no certificate, in either
        challenge mode) refuses TLS handshakes without a traceback and
        counts each in relay_handshake_rejects_total{reason="no_certificate"};
        it logged three "Unhandled Error" tracebacks per connection before.
        """
        for challenge in ("http-01", "tls-alpn-01"):
            metricsPort = freePort()
            relay = yield startRelay(
                self,
                "--letsencrypt-domains",
                "relay.example",
                "--letsencrypt-data-dir",
                os.path.abspath(self.mktemp()),
                "--letsencrypt-directory-url",
                "https://127.0.0.1:1/dir",
                "--letsencrypt-challenge",
                challenge,
                "--letsencrypt-http-port",
                str(freePort()),
                "--metrics-port",
                str(metricsPort),
                "--metrics-address",
                "127.0.0.1",
            )
            for _ in range(3):
                factory = protocol.ClientFactory.forProtocol(_Handshake)
                factory.done = defer.Deferred()
                reactor.connectSSL(
                    "127.0.0.1", relay.port, factory, ssl.optionsForClientTLS("relay.example")
                )
                self.assertIsNone((yield factory.done.addTimeout(10, reactor)))
            # The relay reads each client's alert a moment after the client
            # has gone.
            for _ in range(50):
                refused = _noCertificate((yield _scrape(metricsPort)))
                if refused >= 3:
                    break
                yield sleep(0.1)
            self.assertEqual(refused, 3)
            self.assertEqual((yield relay.stop()), 0)
            self.assertNotIn(b"Traceback", relay.output)
            self.assertNotIn(b"Unhandled Error", relay.output)
            self.assertNotIn(b"SSL error", relay.output)


@implementer(IHandshakeListener)
class _Handshake(protocol.Protocol):
    """
    Fires C{factory.done} with the serial of the server's certificate once
    the handshake verifies, or L{None} if the connection ends without.
    """

    serial = None

    def handshakeCompleted(self):
        self.serial = self.transport.getPeerCertificate().get_serial_number()
        self.transport.loseConnection()

    def connectionLost(self, reason):
        self.factory.done.callback(self.serial)


def _noCertificate(metrics):
    """
    @return: relay_handshake_rejects_total{reason="no_certificate"} in the
        Prometheus text C{metrics}, 0 if absent.
    """
    found = re.search(
        r'^relay_handshake_rejects_total\{[^}]*reason="no_certificate"[^}]*\} (\S+)$', metrics, re.M
    )
    return float(found.group(1)) if found else 0


def _scrape(port):
    def get():
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            return response.read().decode("utf-8")

    return threads.deferToThread(get)
