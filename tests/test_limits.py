"""
Resource limits: each holds, and a well-behaved peer is unaffected while
another hits it.
"""

from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial import unittest

from relay import messages as m
from relay.limits import ConnectionGate, Limits, LogBudget, TokenBucket, parseNetworks
from relay.peer import PeerWebSocketFactory
from relay.session import PeerSession
from tests.helpers import FakeLink, authMessage, connect, makeRelay
from tests.test_peer import Peer

A, B = m.peerID("peer-a"), m.peerID("peer-b")


class TokenBucketTests(unittest.TestCase):
    def test_burstThenRate(self):
        bucket = TokenBucket(10, 20, now=0)
        self.assertTrue(bucket.take(20, 0))
        self.assertFalse(bucket.take(1, 0))
        self.assertFalse(bucket.take(6, 0.5))
        self.assertTrue(bucket.take(5, 0.5))

    def test_capped(self):
        bucket = TokenBucket(10, 20, now=0)
        self.assertFalse(bucket.take(21, 1000))
        self.assertTrue(bucket.full(1000))


class GateTests(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()

    def test_perAddress(self):
        gate = ConnectionGate(Limits(maxPerIP=2), self.clock)
        self.assertIsNone(gate.admit("192.0.2.1"))
        self.assertIsNone(gate.admit("192.0.2.1"))
        self.assertEqual(gate.admit("192.0.2.1"), "per_ip_connections")
        self.assertIsNone(gate.admit("192.0.2.2"))
        gate.release("192.0.2.1")
        self.assertIsNone(gate.admit("192.0.2.1"))

    def test_rate(self):
        gate = ConnectionGate(Limits(ratePerIP=5), self.clock)
        results = [gate.admit("192.0.2.1") for _ in range(11)]
        self.assertEqual(results.count(None), 10)
        self.assertEqual(results[-1], "per_ip_rate")
        self.assertIsNone(gate.admit("192.0.2.9"))
        self.clock.advance(0.2)
        self.assertIsNone(gate.admit("192.0.2.1"))

    def test_pruneForgetsIdleAddresses(self):
        gate = ConnectionGate(Limits(ratePerIP=5), self.clock)
        gate.start()
        gate.admit("192.0.2.1")
        gate.admit("192.0.2.2")
        gate.release("192.0.2.1")
        self.clock.advance(60)
        self.assertEqual(sorted(gate._buckets), ["192.0.2.2"])
        gate.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_trustedProxies(self):
        gate = ConnectionGate(Limits(trustedProxies=parseNetworks("10.0.0.0/8, 192.0.2.7")), self.clock)
        self.assertTrue(gate.isTrustedProxy("10.1.2.3"))
        self.assertTrue(gate.isTrustedProxy("192.0.2.7"))
        self.assertFalse(gate.isTrustedProxy("192.0.2.8"))
        self.assertFalse(gate.isTrustedProxy("not an address"))

    def test_badNetwork(self):
        self.assertRaises(ValueError, parseNetworks, "10.0.0.0/33")


class SessionLimitTests(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.relay = makeRelay(self.clock)

    def test_maxPending(self):
        self.relay.limits = Limits(maxPending=2)
        waiting = [PeerSession(self.relay, FakeLink()) for _ in range(2)]
        refused = FakeLink()
        PeerSession(self.relay, refused)
        self.assertTrue(refused.aborted)
        self.assertEqual(self.relay.counters.handshakeRejects["max_pending"], 1)
        # The waiting ones are unaffected and authenticate; then there is room.
        waiting[0].messageReceived(authMessage("peer-a"))
        self.assertEqual(waiting[0].peerID, A)
        self.assertEqual(self.relay.pendingHandshakes, 1)
        waiting[1].linkLost()
        self.assertEqual(self.relay.pendingHandshakes, 0)
        later = FakeLink()
        PeerSession(self.relay, later)
        self.assertFalse(later.aborted)

    def test_maxPeers(self):
        self.relay.limits = Limits(maxPeers=2)
        a, linkA = connect(self.relay, "peer-a")
        b, linkB = connect(self.relay, "peer-b")
        link = FakeLink()
        PeerSession(self.relay, link).messageReceived(authMessage("peer-c"))
        self.assertTrue(link.aborted)
        self.assertEqual(link.written, [])
        self.assertEqual(self.relay.counters.handshakeRejects["max_peers"], 1)
        # A reconnecting peer replaces itself, so it is still let in.
        _, linkB2 = connect(self.relay, "peer-b")
        self.assertEqual(len(self.relay.store), 2)
        self.assertTrue(linkB.aborted)
        self.assertFalse(linkB2.aborted)
        a.messageReceived(m.encodeTransport(B, b"fine"))
        self.assertFalse(linkA.aborted)
        self.assertEqual(linkB2.take(), [m.encodeTransport(A, b"fine")])
        self.assertEqual(linkB.written, [])

    def test_peerByteRate(self):
        self.relay.limits = Limits(peerByteRate=10000)
        a, linkA = connect(self.relay, "peer-a")
        b, linkB = connect(self.relay, "peer-b")
        c, linkC = connect(self.relay, "peer-c")
        message = m.encodeTransport(B, b"x" * 962)
        for _ in range(20):
            a.messageReceived(message)
            c.messageReceived(m.encodeTransport(B, b"y" * 962))
        delivered = linkB.take()
        fromA = [x for x in delivered if x[2:38] == A]
        fromC = [x for x in delivered if x[2:38] == m.peerID("peer-c")]
        self.assertEqual(len(fromA), 10)
        self.assertEqual(len(fromC), 10)
        self.assertEqual(self.relay.counters.dropped["rate_limited"], 20)
        self.assertFalse(linkA.aborted)
        self.clock.advance(0.2)
        a.messageReceived(message)
        self.assertEqual(len(linkB.take()), 1)

    def test_noLimitsByDefault(self):
        a, _ = connect(self.relay, "peer-a")
        self.assertIsNone(a._bucket)


class ConnectionLimitTests(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.relay = makeRelay(self.clock)

    def factory(self, limits):
        self.relay.limits = limits
        return PeerWebSocketFactory(self.relay, self.clock)

    def test_perIPRefusedBeforeAnyByte(self):
        factory = self.factory(Limits(maxPerIP=1))
        first = Peer(factory, 1)
        second = Peer(factory, 2)
        self.assertTrue(second.closed)
        self.assertEqual(second.transport.value(), b"")
        self.assertIsNone(second.protocol.session)
        self.assertEqual(self.relay.counters.handshakeRejects["per_ip_connections"], 1)
        self.assertIn(b"101", first.upgrade())
        first.send(authMessage("peer-a"))
        self.assertEqual(first.messages(), [self.relay.authResponse])
        second.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(factory.gate._open, {"192.0.2.1": 1})
        first.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(factory.gate._open, {})
        self.assertIsNotNone(Peer(factory, 3).protocol.session)

    def test_trustedProxyUsesRealIP(self):
        factory = self.factory(Limits(maxPerIP=1, trustedProxies=parseNetworks("192.0.2.1")))
        one = Peer(factory, 1)
        self.assertIn(b"101", one.upgrade(extra="X-Real-IP: 198.51.100.1\r\nX-Real-Port: 5000\r\n"))
        two = Peer(factory, 2)
        self.assertIn(b"101", two.upgrade(extra="X-Real-IP: 198.51.100.2\r\n"))
        three = Peer(factory, 3)
        self.assertIn(b"429", three.upgrade(extra="X-Real-IP: 198.51.100.1\r\n"))
        self.assertEqual(one.protocol.peerAddress, "198.51.100.1:5000 via 192.0.2.1:1")

    def test_untrustedRealIPIgnored(self):
        factory = self.factory(Limits(maxPerIP=1))
        one = Peer(factory, 1)
        self.assertIn(b"101", one.upgrade(extra="X-Real-IP: 198.51.100.1\r\n"))
        self.assertEqual(factory.gate._open, {"192.0.2.1": 1})
        self.assertEqual(one.protocol.peerAddress, "192.0.2.1:1")


class LogBudgetTests(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.lines = []
        self.budget = LogBudget(self.clock, burst=3, window=10.0)

    def emit(self, format, **fields):
        self.lines.append(format.format(**fields))

    def test_burstThenSummary(self):
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        for i in range(10):
            self.budget(self.emit, "line {i}", i=i)
        self.assertEqual(self.lines, ["line 0", "line 1", "line 2"])
        self.assertEqual(self.budget.suppressed, 7)
        self.clock.advance(10)
        summaries = [formatEvent(e) for e in events if "were not logged" in formatEvent(e)]
        self.assertEqual(summaries, ["7 more lines about refused or ignored traffic were not logged in the last 10 s (the counters in /metrics have every event)"])
        self.budget(self.emit, "line {i}", i=10)
        self.assertEqual(self.lines[-1], "line 10")

    def test_newWindowNewBudget(self):
        for i in range(3):
            self.budget(self.emit, "a")
        self.clock.advance(10)
        for i in range(3):
            self.budget(self.emit, "b")
        self.assertEqual(self.lines, ["a"] * 3 + ["b"] * 3)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_floodOfBadHandshakesIsBounded(self):
        relay = makeRelay(self.clock)
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        for _ in range(500):
            PeerSession(relay, FakeLink()).messageReceived(b"\x02\x06")
        rejected = [e for e in events if "handshake rejected" in formatEvent(e)]
        self.assertEqual(len(rejected), 50)
        self.assertEqual(relay.counters.handshakeRejects["bad_version"], 500)
