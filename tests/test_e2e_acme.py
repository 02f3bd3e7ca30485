"""
End to end: a real C{twistd relay} obtains its certificate from Debian's
pebble ACME server on loopback, serves it to peers, reuses it across a
restart and renews it while running.
"""

import os

from twisted.internet import defer, reactor, ssl, threads
from twisted.trial import unittest

from relay import client
from relay import messages as m
from relay.quic import connectQuic
from tests.e2e import freePort, sleep, startRelay
from tests.pebble import SKIP, Pebble

A, B = m.peerID("peer-a"), m.peerID("peer-b")


class AcmeEndToEndTests(unittest.TestCase):
    skip = SKIP
    timeout = 180

    @defer.inlineCallbacks
    def startPebble(self, validityPeriod=None):
        self.pebble = Pebble(os.path.abspath(self.mktemp()), alwaysValid=True, validityPeriod=validityPeriod)
        self.addCleanup(self.pebble.stop, reactor)
        yield self.pebble.start(reactor)
        self.rootPEM = yield threads.deferToThread(self.pebble.rootPEM)
        self.root = ssl.Certificate.loadPEM(self.rootPEM)

    def startRelay(self, dataDir):
        env = dict(os.environ, REQUESTS_CA_BUNDLE=self.pebble.caBundle)
        return startRelay(
            self,
            "--letsencrypt-domains", "localhost",
            "--letsencrypt-data-dir", dataDir,
            "--letsencrypt-directory-url", self.pebble.directoryURL,
            "--letsencrypt-challenge", "http-01",
            "--letsencrypt-http-port", str(freePort()),
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
                peer = yield client.connect(reactor, url, pid, secret="relay-secret", trustRoot=self.root, timeout=5)
                self.addCleanup(lambda: peer.transport.abortConnection() if peer.transport.connected else None)
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
        self.assertEqual((yield b.transports.get().addTimeout(10, reactor)), (A, b"over an ACME certificate"))
        # QUIC serves the same certificate, verified against pebble's root.
        rootFile = os.path.abspath(self.mktemp())
        with open(rootFile, "wb") as f:
            f.write(self.rootPEM)
        q = None
        for _ in range(50):
            try:
                q = yield connectQuic(reactor, "127.0.0.1", relay.port, m.peerID("peer-q"), secret="relay-secret", cafile=rootFile, timeout=5)
                break
            except Exception:
                yield sleep(0.2)
        self.assertIsNotNone(q, "no QUIC connection with the ACME certificate")
        q.send(B, b"over QUIC")
        self.assertEqual((yield b.transports.get().addTimeout(10, reactor)), (m.peerID("peer-q"), b"over QUIC"))
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
