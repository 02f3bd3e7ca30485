"""
The logs of real C{twistd relay} processes: JSON a shipper reads, and a
bounded number of lines for a flood of strangers.
"""

import json
import os
import sys
from datetime import datetime

from twisted.internet import defer, reactor
from twisted.trial import unittest

from relay import client
from relay import messages as m
from relay.auth import generateToken
from tests import wsraw
from tests.e2e import ROOT, RelayProcess, rawConnect, relayArgs, sleep, startRelay
from tests.loopback import freePort
from tests.test_e2e_operability import get, sample

TWISTED_KEYS = {
    "log_logger",
    "log_source",
    "log_format",
    "log_flattened",
    "log_namespace",
    "log_level",
    "log_time",
    "log_io",
    "log_text",
    "__class_uuid__",
    "isError",
    "message",
}


def jsonLines(output):
    """
    Every line of C{output} as a JSON object; fails on any other line.
    """
    lines = []
    for raw in output.splitlines():
        line = json.loads(raw)
        assert isinstance(line, dict), raw
        assert not TWISTED_KEYS & set(line), raw
        assert isinstance(line["msg"], str) and isinstance(line["logger"], str), raw
        assert line["level"] in ("debug", "info", "warning", "error", "critical"), raw
        assert datetime.fromisoformat(line["time"]).tzinfo is not None, raw
        lines.append(line)
    return lines


@defer.inlineCallbacks
def rawConnection(port, data):
    """
    Send C{data} on a plain TCP connection and wait for the relay to close it.
    """
    raw = yield rawConnect(port)
    raw.transport.write(data)
    yield raw.closed.addTimeout(15, reactor)


class JSONSessionTests(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def test_everyLineParses(self):
        """
        A session at debug level with everything a relay logs about peers:
        agents that connect, relay, reconnect, leave cleanly and not; a
        wrong token, a wrong first message, a wrong path, a refused upgrade,
        a Close with control characters, bytes that are not HTTP; then the
        shutdown. Every line of standard output and error is one JSON
        object (what C{jq -c .} accepts) with the keys a shipper needs.
        """
        metricsPort = freePort("127.0.0.1")
        relay = yield startRelay(
            self,
            "--log-format",
            "json",
            "--log-level",
            "debug",
            "--connection-rate-per-ip",
            "0",
            "--metrics-port",
            str(metricsPort),
            "--metrics-address",
            "127.0.0.1",
        )
        yield rawConnection(metricsPort, b"GET /metrics HTTP/1.0\r\n\r\n")
        yield rawConnection(metricsPort, b"\x00\xff not HTTP at all\r\n\r\n")
        a = yield client.connect(reactor, relay.url, m.peerID("peer-a"), secret="relay-secret")
        b = yield client.connect(reactor, relay.url, m.peerID("peer-b"), secret="relay-secret")
        yield a.waitOnline(b.factory.peerID)
        a.send(b.factory.peerID, b"hello")
        self.assertEqual(
            (yield b.transports.get().addTimeout(10, reactor)), (a.factory.peerID, b"hello")
        )
        again = yield client.connect(reactor, relay.url, m.peerID("peer-a"), secret="relay-secret")
        yield a.whenLost()
        yield again.close()
        b.transport.abortConnection()
        yield b.whenLost()
        yield self.assertFailure(
            client.connect(reactor, relay.url, m.peerID("peer-c"), secret="wrong"),
            client.HandshakeRefused,
        )
        yield self.assertFailure(
            client.connect(
                reactor, relay.url, m.peerID("peer-d"), token=generateToken("relay-secret", 1)
            ),
            client.HandshakeRefused,
        )
        raw = yield wsraw.connect(reactor, relay.port)
        self.assertEqual((yield raw.handshake), 101)
        raw.sendMessage(b"\x01\x05not auth")
        yield raw.whenClosed(timeout=10)
        raw = yield wsraw.connect(reactor, relay.port)
        yield raw.handshake
        raw.sendClose(4000, b"\n\x1b[31m{evil} \xe2\x98\x83")
        yield raw.whenClosed(timeout=10)
        raw = yield wsraw.connect(reactor, relay.port, path="/elsewhere")
        self.assertEqual((yield raw.handshake), 404)
        raw = yield wsraw.connect(
            reactor, relay.port, extraHeaders=[("Origin", "http://evil.example")]
        )
        self.assertEqual((yield raw.handshake), 403)
        yield rawConnection(relay.port, b"\x16\x03\x01\x00\xff\x01garbage that is not HTTP\r\n\r\n")
        yield rawConnection(
            relay.port,
            b"GET /relay HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Version: 99\r\n\r\n",
        )
        self.assertEqual((yield relay.stop()), 0)

        lines = jsonLines(relay.output)
        messages = [line["msg"] for line in lines]
        text = "\n".join(messages)
        for expected in (
            "relay listening on",
            ": connected",
            "reconnected, closing the previous connection",
            "peer closed the session",
            "WebSocket closed with code 1006",
            "handshake rejected: bad_signature",
            "handshake rejected: malformed",
            "handshake rejected: first message is",
            "WebSocket closed with code 4000: '\\n\\x1b[31m{evil} \u2603'",
            "refused WebSocket upgrade for path '/elsewhere'",
            "refused WebSocket upgrade from origin",
            "failing WebSocket opening handshake",
            "shutting down",
            "metrics port: GET /metrics 200",
        ):
            self.assertIn(expected, text)
        self.assertIn("debug", {line["level"] for line in lines})
        closed = [line for line in lines if "code 4000" in line["msg"]][0]
        self.assertEqual(
            (closed["code"], closed["level"], closed["logger"]),
            (4000, "warning", "relay.listener.ws.PeerWebSocketProtocol"),
        )
        connected = [line for line in lines if line["msg"].endswith(": connected")][0]
        self.assertIsInstance(connected["peer"], str)
        self.assertNotIn("relay-secret", relay.output.decode())


class FloodTests(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def test_refusedUpgradesBounded(self):
        """
        300 refused upgrades in a burst: Autobahn's lines and the relay's
        own are within the log budget (50 per 10 s), not one or two each.
        """
        relay = yield startRelay(self, "--log-format", "json", "--connection-rate-per-ip", "0")
        before = len(relay.output.splitlines())
        for _ in range(30):
            yield defer.gatherResults(
                [
                    rawConnection(
                        relay.port,
                        b"GET /relay HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                        b"Connection: Upgrade\r\nSec-WebSocket-Version: 99\r\n\r\n",
                    )
                    for _ in range(10)
                ]
            )
        yield sleep(0.2)
        lines = jsonLines(relay.output)[before:]
        self.assertTrue(any("failing WebSocket opening handshake" in line["msg"] for line in lines))
        self.assertLessEqual(len(lines), 50, [line["msg"] for line in lines[:5]])
        self.assertEqual((yield relay.stop()), 0)


class _LowDescriptorRelay(RelayProcess):
    """
    A relay process whose descriptor limit (soft and hard) is C{limit}.
    """

    limit = 64

    def spawn(self):
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        code = (
            f"import resource; resource.setrlimit(resource.RLIMIT_NOFILE, ({self.limit}, "
            f"{self.limit})); from twisted.scripts.twistd import run; run()"
        )
        argv = [sys.executable, "-c", code, "-n", "--pidfile=", "relay"] + self.args
        self.transport = reactor.spawnProcess(self, sys.executable, argv, env=env, path=ROOT)


class DescriptorFloodTests(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def test_emfileBounded(self):
        """
        Out of descriptors, each new connection is closed at once: by the
        admission, which keeps a reserve of descriptors and has a waiting
        connection make room (C{descriptors}, C{pending_evicted}), or, if
        accepting fails all the same, by Twisted's EMFILE recovery, which
        logs three lines for it (C{no_descriptors}). Under the budget a
        flood of up to 300 makes at most 50 lines, and each connection
        closed is counted.
        """
        relay = _LowDescriptorRelay([])
        metricsPort = freePort("127.0.0.1")
        relay.args = relayArgs(
            relay,
            "relay-secret",
            "--log-format",
            "json",
            "--connection-rate-per-ip",
            "0",
            "--metrics-port",
            str(metricsPort),
            "--metrics-address",
            "127.0.0.1",
        )
        self.addCleanup(relay.stop)
        yield relay.start()
        held = []
        self.addCleanup(
            lambda: [p.transport.abortConnection() for p in held if p.transport.connected]
        )
        # Fill the table: connections that wait to authenticate.
        for _ in range(relay.limit):
            held.append((yield rawConnect(relay.port)))
        yield sleep(0.5)
        before = len(relay.output.splitlines())
        # All at once, so that the flood falls within one or two windows of
        # the budget.
        results = yield defer.DeferredList(
            [rawConnection(relay.port, b"").addTimeout(3, reactor) for _ in range(300)],
            consumeErrors=True,
        )
        closed = [ok for ok, _ in results if ok]
        yield sleep(0.5)
        lines = jsonLines(relay.output)
        # Three lines per connection closed without the budget.
        accepting = [line for line in lines if line["logger"] == "twisted.internet.tcp.Port"]
        # One or two windows of the budget: 50 lines each, and a summary.
        self.assertLessEqual(len(lines[before:]), 102)
        for p in held:
            p.transport.abortConnection()
        yield sleep(0.5)
        _, metrics = yield get(metricsPort, "/metrics")
        found = [
            sample(metrics, "relay_handshake_rejects_total", reason=r)
            for r in ("no_descriptors", "descriptors", "pending_evicted")
        ]
        self.assertTrue(any(found), metrics[-2000:])
        counted = sum(int(f) for f in found if f)
        # Every connection of the flood the relay closed is counted, and so
        # are the held ones it closed to make room; none twice.
        self.assertGreater(len(closed), 0)
        self.assertGreaterEqual(counted, len(closed))
        self.assertLessEqual(counted, 300 + relay.limit)
        self.assertLessEqual(len(accepting), 100)
        self.assertEqual((yield relay.stop()), 0)
