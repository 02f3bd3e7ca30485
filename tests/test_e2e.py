"""
End to end: real C{twistd relay} processes and real clients over loopback.
"""

import os
import signal
import sys

from twisted.internet import defer, reactor, ssl
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest

from relay import client
from relay import messages as m
from relay.quicclient import connectQuic
from tests.certs import writeCertificate
from tests.e2e import ROOT, sleep, startRelay

A, B = m.peerID("peer-a"), m.peerID("peer-b")
TIMEOUT = 10


def nextEvent(peer):
    return peer.events.get().addTimeout(TIMEOUT, reactor)


def nextTransport(peer):
    return peer.transports.get().addTimeout(TIMEOUT, reactor)


class TwoPeerTests(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def connect(self, name):
        peer = yield client.connect(reactor, self.relay.url, m.peerID(name), secret="relay-secret")
        self.addCleanup(
            lambda: peer.transport.abortConnection() if peer.transport.connected else None
        )
        return peer

    @defer.inlineCallbacks
    def test_session(self):
        self.relay = yield startRelay(self)
        a = yield self.connect("peer-a")
        self.assertEqual(a.instanceURL, self.relay.url)

        a.subscribe([B])
        b = yield self.connect("peer-b")
        self.assertEqual((yield nextEvent(a)), ("online", [B]))

        b.subscribe([A])
        self.assertEqual((yield nextEvent(b)), ("online", [A]))

        for i in range(100):
            a.send(B, b"a->b %d" % i)
            b.send(A, b"b->a %d" % i)
        for i in range(100):
            self.assertEqual((yield nextTransport(b)), (A, b"a->b %d" % i))
            self.assertEqual((yield nextTransport(a)), (B, b"b->a %d" % i))

        # Replacement on reconnect: the old connection is closed, the new one
        # gets the traffic, and no subscriber hears the peer went offline.
        b2 = yield self.connect("peer-b")
        yield b.whenLost()
        a.send(B, b"to the new b")
        self.assertEqual((yield nextTransport(b2)), (A, b"to the new b"))
        self.assertEqual(len(a.events.pending), 0)

        yield b2.close()
        self.assertEqual((yield nextEvent(a)), ("offline", [B]))

    @defer.inlineCallbacks
    def test_sigtermSendsCloseAndExitsZero(self):
        self.relay = yield startRelay(self)
        a = yield self.connect("peer-a")
        code = yield self.relay.stop()
        yield a.whenLost()
        self.assertTrue(a.closeReceived)
        self.assertEqual(code, 0)

    @defer.inlineCallbacks
    def test_tls(self):
        cert, key, pem = writeCertificate(os.path.abspath(self.mktemp()))
        self.relay = yield startRelay(self, "--tls-cert-file", cert, "--tls-key-file", key)
        url = self.relay.url.replace("rel://", "rels://")
        trust = ssl.Certificate.loadPEM(pem)
        a = yield client.connect(reactor, url, A, secret="relay-secret", trustRoot=trust)
        b = yield client.connect(reactor, url, B, secret="relay-secret", trustRoot=trust)
        self.assertEqual(a.instanceURL, url)
        a.send(B, b"over tls")
        self.assertEqual((yield nextTransport(b)), (A, b"over tls"))
        yield a.close()
        yield b.close()

    @defer.inlineCallbacks
    def test_sighupReloadsCertificate(self):
        directory = os.path.abspath(self.mktemp())
        cert, key, first = writeCertificate(directory)
        self.relay = yield startRelay(self, "--tls-cert-file", cert, "--tls-key-file", key)
        url = self.relay.url.replace("rel://", "rels://")
        a = yield client.connect(
            reactor, url, A, secret="relay-secret", trustRoot=ssl.Certificate.loadPEM(first)
        )
        _, _, second = writeCertificate(directory)
        self.relay.signal(signal.SIGHUP)
        b = None
        for _ in range(100):
            try:
                b = yield client.connect(
                    reactor,
                    url,
                    B,
                    secret="relay-secret",
                    trustRoot=ssl.Certificate.loadPEM(second),
                    timeout=2,
                )
                break
            except Exception:
                yield sleep(0.05)
        self.assertIsNotNone(b, "no connection with the new certificate")
        q = yield connectQuic(
            reactor,
            "127.0.0.1",
            self.relay.port,
            m.peerID("peer-q"),
            secret="relay-secret",
            cafile=cert,
            timeout=5,
        )
        q.send(B, b"QUIC has it too")
        self.assertEqual((yield nextTransport(b)), (m.peerID("peer-q"), b"QUIC has it too"))
        yield q.close()
        a.send(B, b"old connection, new certificate")
        self.assertEqual((yield nextTransport(b)), (A, b"old connection, new certificate"))
        self.assertIn(b"TLS certificate reloaded", self.relay.output)
        yield a.close()
        yield b.close()


class StartupErrorTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def twistd(self, *args, env=None):
        argv = [
            "-c",
            "from twisted.scripts.twistd import run; run()",
            "-n",
            "--pidfile=",
            "relay",
            *args,
        ]
        out, err, code = yield getProcessOutputAndValue(
            sys.executable, argv, env=env or dict(os.environ), path=ROOT
        )
        return out + err, code

    @defer.inlineCallbacks
    def test_missingSecret(self):
        output, code = yield self.twistd("--exposed-address", "127.0.0.1:1")
        self.assertNotEqual(code, 0)
        self.assertIn(b"--auth-secret (or OZ_AUTH_SECRET) is required", output)

    @defer.inlineCallbacks
    def test_portsInUse(self):
        import socket

        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen(1)
            port = taken.getsockname()[1]
            address = f"127.0.0.1:{port}"
            output, code = yield self.twistd(
                "--listen-address",
                address,
                "--exposed-address",
                address,
                "--auth-secret",
                "x",
                "--metrics-port",
                "0",
            )
            self.assertNotEqual(code, 0)
            self.assertIn(b"relay: cannot start the peer listener:", output)
            self.assertIn(b"Address already in use", output)
            output, code = yield self.twistd(
                "--listen-address",
                "127.0.0.1:0",
                "--exposed-address",
                address,
                "--auth-secret",
                "x",
                "--metrics-port",
                "0",
                "--cluster-headless",
                "127.0.0.1",
                "--pod-ip",
                "127.0.0.1",
                "--cluster-listen-address",
                address,
                "--cluster-insecure",
            )
            self.assertNotEqual(code, 0)
            self.assertIn(b"relay: cannot start the inter-pod fabric:", output)
            self.assertNotIn(b"Traceback", output)
            # Before: the relay logged an unhandled error and served peers
            # with no /metrics, /healthz or /readyz.
            output, code = yield self.twistd(
                "--listen-address",
                "127.0.0.1:0",
                "--exposed-address",
                "127.0.0.1:1",
                "--auth-secret",
                "x",
                "--metrics-address",
                "127.0.0.1",
                "--metrics-port",
                str(port),
            )
            self.assertNotEqual(code, 0)
            self.assertIn(b"relay: cannot start: Couldn't listen on 127.0.0.1:", output)
            self.assertIn(b"Address already in use", output)
            self.assertNotIn(b"Traceback", output)

    @defer.inlineCallbacks
    def test_invalidExposedAddress(self):
        output, code = yield self.twistd("--exposed-address", "http://x:1", "--auth-secret", "x")
        self.assertNotEqual(code, 0)
        self.assertIn(b"scheme must be rel or rels", output)
