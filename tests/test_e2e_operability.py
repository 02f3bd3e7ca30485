"""
End to end: the metrics endpoint, health and readiness, and the logs of a
real C{twistd relay} process.
"""

import re
import time

from twisted.internet import defer, reactor
from twisted.trial import unittest
from twisted.web.client import Agent, readBody

from relay import client
from relay import messages as m
from relay.auth import generateToken
from tests.e2e import freePort, sleep, startRelay

A, B = m.peerID("peer-a"), m.peerID("peer-b")
SECRET = "e2e-Secret-3f9c1d"
TIMEOUT = 10


@defer.inlineCallbacks
def get(port, path):
    response = (
        yield Agent(reactor)
        .request(b"GET", f"http://127.0.0.1:{port}{path}".encode())
        .addTimeout(TIMEOUT, reactor)
    )
    body = yield readBody(response)
    return response.code, body.decode()


def sample(text, name, **labels):
    """
    The value of one series in Prometheus text, ignoring the otel_scope_*
    labels the exporter adds.
    """
    for line in text.splitlines():
        match = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$", line)
        if not match or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(match.group(3))
    return None


class MetricsTests(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def test_scrape(self):
        metricsPort = freePort()
        relay = yield startRelay(self, "--metrics-port", str(metricsPort), secret=SECRET)
        code, _ = yield get(metricsPort, "/readyz")
        self.assertEqual(code, 200)

        a = yield client.connect(reactor, relay.url, A, secret=SECRET)
        b = yield client.connect(reactor, relay.url, B, secret=SECRET)
        self.addCleanup(
            lambda: [p.transport.abortConnection() for p in (a, b) if p.transport.connected]
        )
        yield a.waitOnline(B)
        for _i in range(10):
            a.send(B, b"x" * 1000)
            b.send(A, b"y" * 500)
        for _i in range(10):
            yield b.transports.get().addTimeout(TIMEOUT, reactor)
            yield a.transports.get().addTimeout(TIMEOUT, reactor)
        a.send(m.peerID("nobody"), b"lost")
        with self.assertRaises(client.HandshakeRefused):
            yield client.connect(reactor, relay.url, m.peerID("intruder"), secret="wrong")
        yield sleep(0.1)

        code, text = yield get(metricsPort, "/metrics")
        self.assertEqual(code, 200)
        transported = 10 * (38 + 1000) + 10 * (38 + 500)
        self.assertEqual(sample(text, "relay_transfer_received_bytes_total"), transported + 38 + 4)
        self.assertEqual(sample(text, "relay_transfer_sent_bytes_total"), transported)
        self.assertEqual(sample(text, "relay_peers"), 2)
        self.assertEqual(sample(text, "relay_peers_active"), 2)
        self.assertEqual(sample(text, "relay_peers_idle"), 0)
        self.assertEqual(sample(text, "relay_peer_reconnections_total"), 0)
        self.assertEqual(sample(text, "relay_peer_authentication_time_milliseconds_count"), 2)
        self.assertEqual(sample(text, "relay_peer_store_time_milliseconds_count"), 2)
        self.assertEqual(
            sample(text, "relay_peer_authentication_time_milliseconds_bucket", le="10000.0"), 2
        )
        self.assertEqual(sample(text, "relay_connections", transport="websocket"), 2)
        self.assertEqual(sample(text, "relay_handshake_rejects_total", reason="bad_signature"), 1)
        self.assertEqual(sample(text, "relay_dropped_messages_total", reason="unknown_peer"), 1)

        code, body = yield get(metricsPort, "/healthz")
        self.assertEqual(code, 200)

        # Draining: a peer that does not read keeps the close handshake open
        # for up to 3 s; meanwhile the pod must be unready but alive.
        a.transport.pauseProducing()
        relay.signal("TERM")
        for _ in range(100):
            code, _ = yield get(metricsPort, "/readyz")
            if code == 503:
                break
            yield sleep(0.02)
        self.assertEqual(code, 503)
        code, _ = yield get(metricsPort, "/healthz")
        self.assertEqual(code, 200)
        self.assertEqual((yield relay.ended()), 0)


class SecretsTests(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def test_noSecretInTraceLogs(self):
        relay = yield startRelay(self, "--log-level", "trace", secret=SECRET)
        # A live token: it must still be valid on the day the test runs.
        token = generateToken(SECRET, int(time.time()) + 86400)
        a = yield client.connect(reactor, relay.url, A, token=token)
        b = yield client.connect(reactor, relay.url, B, secret=SECRET)
        yield a.waitOnline(B)
        a.send(B, b"payload")
        yield b.transports.get().addTimeout(TIMEOUT, reactor)
        with self.assertRaises(client.HandshakeRefused):
            yield client.connect(reactor, relay.url, A, token=token[:-1] + bytes([token[-1] ^ 1]))
        yield a.close()
        yield b.close()
        yield relay.stop()
        log = relay.output
        self.assertIn(b"connected", log)
        for secret in (
            SECRET.encode(),
            token,
            token[1:33].hex().encode(),
            token.hex().encode(),
            token[1:33],
        ):
            self.assertNotIn(secret, log)
