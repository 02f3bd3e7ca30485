"""
End to end: QUIC peers (aioquic, shaped like Go agents) on a real
C{twistd relay} process, beside WebSocket peers on the same port.
"""

import os
import socket

from twisted.internet import defer, reactor, ssl
from twisted.trial import unittest

from relay import client
from relay import messages as m
from relay.quic import QuicHandshakeFailed, connectQuic
from tests.certs import writeCertificate
from tests.e2e import sleep, startRelay

A, B, C = m.peerID("peer-a"), m.peerID("peer-b"), m.peerID("peer-c")
TIMEOUT = 10


class QuicEndToEndTests(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def startRelay(self):
        self.cert, key, self.pem = writeCertificate(os.path.abspath(self.mktemp()))
        self.relay = yield startRelay(self, "--tls-cert-file", self.cert, "--tls-key-file", key)
        return self.relay

    @defer.inlineCallbacks
    def quicPeer(self, pid, **options):
        peer = yield connectQuic(reactor, "127.0.0.1", self.relay.port, pid, secret="relay-secret", cafile=self.cert, timeout=TIMEOUT, **options)
        self.addCleanup(lambda: peer.close())
        return peer

    @defer.inlineCallbacks
    def wsPeer(self, pid):
        url = self.relay.url.replace("rel://", "rels://")
        peer = yield client.connect(reactor, url, pid, secret="relay-secret", trustRoot=ssl.Certificate.loadPEM(self.pem))
        self.addCleanup(lambda: peer.transport.abortConnection() if peer.transport.connected else None)
        return peer

    @defer.inlineCallbacks
    def test_quicAndWebSocketExchange(self):
        yield self.startRelay()
        a = yield self.quicPeer(A)
        b = yield self.wsPeer(B)
        self.assertEqual(a.instanceURL, self.relay.url.replace("rel://", "rels://"))
        yield a.waitOnline(B)
        yield b.waitOnline(A)
        received = {A: [], B: []}
        a.onTransport = lambda message: received[A].append(bytes(message))
        b.onTransport = lambda message: received[B].append(bytes(message))
        for batch in range(10):
            for i in range(batch * 100, batch * 100 + 100):
                a.send(B, b"q->w %04d " % i + b"x" * 1000)
                b.send(A, b"w->q %04d " % i + b"y" * 1000)
            for _ in range(500):
                if len(received[A]) == len(received[B]) == batch * 100 + 100:
                    break
                yield sleep(0.01)
        self.assertEqual(received[B], [m.encodeTransport(A, b"q->w %04d " % i + b"x" * 1000) for i in range(1000)])
        self.assertEqual(received[A], [m.encodeTransport(B, b"w->q %04d " % i + b"y" * 1000) for i in range(1000)])

    @defer.inlineCallbacks
    def test_wrongALPNRefused(self):
        yield self.startRelay()
        with self.assertRaises(QuicHandshakeFailed):
            yield connectQuic(reactor, "127.0.0.1", self.relay.port, A, secret="relay-secret", cafile=self.cert, timeout=TIMEOUT, alpn="h3")

    @defer.inlineCallbacks
    def test_garbageAndOversizedDatagrams(self):
        yield self.startRelay()
        a = yield self.quicPeer(A)
        b = yield self.wsPeer(B)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
            for size in (0, 1, 20, 1200, 1500, 9000, 65000):
                s.sendto(os.urandom(size), ("127.0.0.1", self.relay.port))
        c = yield self.quicPeer(C)
        yield b.waitOnline(A)
        a.send(B, b"still fine")
        self.assertEqual((yield b.transports.get().addTimeout(TIMEOUT, reactor)), (A, b"still fine"))
        c.send(B, b"new one fine")
        self.assertEqual((yield b.transports.get().addTimeout(TIMEOUT, reactor)), (C, b"new one fine"))

    @defer.inlineCallbacks
    def test_tooLargeForDatagramDroppedNotTruncated(self):
        yield self.startRelay()
        a = yield self.quicPeer(A)
        b = yield self.wsPeer(B)
        yield b.waitOnline(A)
        b.send(A, b"z" * 3000)
        b.send(A, b"fits")
        source, payload = yield a.transports.get().addTimeout(TIMEOUT, reactor)
        self.assertEqual((source, payload), (B, b"fits"))
