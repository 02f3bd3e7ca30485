"""
End to end: what strangers can send a real C{twistd relay} before they
authenticate, on the peer port and on the metrics port, is bounded.
"""

from twisted.internet import defer, reactor
from twisted.trial import unittest

from relay.listener.ws import MAX_UPGRADE_REQUEST
from relay.web import MAX_CONNECTIONS
from tests.e2e import freePort, rawConnect, sleep, startRelay
from tests.test_e2e_operability import get, sample

TIMEOUT = 10


class StrangerTests(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def setUp(self):
        self.metricsPort = freePort()
        self.relay = yield startRelay(
            self, "--metrics-port", str(self.metricsPort), "--metrics-address", "127.0.0.1"
        )

    def closeAll(self, clients):
        for c in clients:
            if c.transport.connected:
                c.transport.abortConnection()

    @defer.inlineCallbacks
    def test_idleMetricsConnectionsDoNotLockOutProbes(self):
        """
        300 idle connections to the metrics port: the relay keeps at most
        its limit, and /healthz answers. It used to hold all 300.
        """
        idle = []
        self.addCleanup(self.closeAll, idle)
        for _ in range(300):
            idle.append((yield rawConnect(self.metricsPort)))
        yield sleep(0.5)
        code, body = yield get(self.metricsPort, "/healthz")
        self.assertEqual((code, body), (200, "ok\n"))
        open_ = [c for c in idle if not c.closed.called]
        self.assertLessEqual(len(open_), MAX_CONNECTIONS)
        _, text = yield get(self.metricsPort, "/metrics")
        self.assertGreaterEqual(
            sample(text, "relay_metrics_refusals_total", reason="connections"),
            300 - MAX_CONNECTIONS,
        )

    @defer.inlineCallbacks
    def test_metricsBodyNotRead(self):
        """
        A POST to /metrics announcing 40 MiB is answered 405 and closed
        after its headers, not spooled to a temporary file.
        """
        c = yield rawConnect(self.metricsPort)
        self.addCleanup(self.closeAll, [c])
        c.transport.write(
            b"POST /metrics HTTP/1.1\r\nHost: relay\r\nContent-Length: 41943040\r\n\r\n"
            + b"z" * 65536
        )
        yield c.closed.addTimeout(TIMEOUT, reactor)
        self.assertTrue(c.received.startswith(b"HTTP/1.1 405 "))
        _, text = yield get(self.metricsPort, "/metrics")
        self.assertEqual(sample(text, "relay_metrics_refusals_total", reason="method"), 1)

    @defer.inlineCallbacks
    def test_endlessUpgradeRequestRefused(self):
        """
        An upgrade request that never ends is answered 431 and closed once
        it passes the limit; it used to be buffered (and searched from its
        start on every read) until the handshake timeout.
        """
        c = yield rawConnect(self.relay.port)
        self.addCleanup(self.closeAll, [c])
        c.transport.write(b"GET /relay HTTP/1.1\r\nHost: relay\r\nX-Pad: ")
        for _ in range(MAX_UPGRADE_REQUEST // 1024 + 1):
            c.transport.write(b"p" * 1024)
            yield sleep(0.001)
        yield c.closed.addTimeout(TIMEOUT / 2, reactor)
        self.assertTrue(c.received.startswith(b"HTTP/1.1 431 "), c.received[:40])
        _, text = yield get(self.metricsPort, "/metrics")
        self.assertEqual(
            sample(text, "relay_handshake_rejects_total", reason="request_too_large"), 1
        )
