"""
Resource limits: each holds, and a well-behaved peer is unaffected while
another hits it.
"""

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial import unittest

from relay import messages as m
from relay.limits import (
    EVICTABLE_AFTER,
    Admission,
    Limits,
    LogBudget,
    TokenBucket,
    parseNetworks,
    sourceGroup,
)
from relay.listener.ws import PeerWebSocketFactory
from relay.peer import PeerSession
from tests.helpers import FakeLink, authMessage, connect, hypothesisProfile, makeRelay
from tests.test_listener_ws import UPGRADE, Peer, clientFrame, serverFrames

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
        gate = Admission(Limits(maxPerIP=2), self.clock)
        self.assertIsNone(gate.admit("192.0.2.1"))
        self.assertIsNone(gate.admit("192.0.2.1"))
        self.assertEqual(gate.admit("192.0.2.1"), "per_ip_connections")
        self.assertIsNone(gate.admit("192.0.2.2"))
        gate.release("192.0.2.1")
        self.assertIsNone(gate.admit("192.0.2.1"))

    def test_rate(self):
        gate = Admission(Limits(ratePerIP=5), self.clock)
        results = [gate.admit("192.0.2.1") for _ in range(11)]
        self.assertEqual(results.count(None), 10)
        self.assertEqual(results[-1], "per_ip_rate")
        self.assertIsNone(gate.admit("192.0.2.9"))
        self.clock.advance(0.2)
        self.assertIsNone(gate.admit("192.0.2.1"))

    def test_pruneForgetsIdleAddresses(self):
        gate = Admission(Limits(ratePerIP=5), self.clock)
        gate.start()
        gate.admit("192.0.2.1")
        gate.admit("192.0.2.2")
        gate.release("192.0.2.1")
        self.clock.advance(60)
        self.assertEqual(sorted(gate._buckets), ["192.0.2.2"])
        gate.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_trustedProxies(self):
        gate = Admission(Limits(trustedProxies=parseNetworks("10.0.0.0/8, 192.0.2.7")), self.clock)
        self.assertTrue(gate.isTrustedProxy("10.1.2.3"))
        self.assertTrue(gate.isTrustedProxy("192.0.2.7"))
        self.assertFalse(gate.isTrustedProxy("192.0.2.8"))
        self.assertFalse(gate.isTrustedProxy("not an address"))

    def test_badNetwork(self):
        self.assertRaises(ValueError, parseNetworks, "10.0.0.0/33")

    def test_ipv6GroupedBy64(self):
        self.assertEqual(sourceGroup("192.0.2.1"), "192.0.2.1")
        self.assertEqual(sourceGroup("2001:db8:1:2:aaaa::1"), "2001:db8:1:2::/64")
        self.assertEqual(sourceGroup("2001:db8:1:2:bbbb::7%eth0"), "2001:db8:1:2::/64")
        self.assertEqual(sourceGroup("::ffff:192.0.2.9"), "192.0.2.9")
        self.assertEqual(sourceGroup("not:an:address"), "not:an:address")
        gate = Admission(Limits(maxPerIP=2), self.clock)
        self.assertIsNone(gate.admit("2001:db8:1:2::1"))
        self.assertIsNone(gate.admit("2001:db8:1:2:ffff::2"))
        self.assertEqual(gate.admit("2001:db8:1:2:1234::3"), "per_ip_connections")
        self.assertIsNone(gate.admit("2001:db8:1:3::1"))

    def test_descriptorReserve(self):
        gate = Admission(Limits(), self.clock)
        gate.maxConnections = 2
        self.assertEqual([gate.accept() for _ in range(3)], [None, None, "descriptors"])
        gate.closed()
        self.assertIsNone(gate.accept())
        self.assertEqual(gate.connections, 2)

    def test_outOfDescriptorsEvictsWaiting(self):
        # A flood holds every descriptor with connections that never
        # authenticate: a newcomer still gets in, in place of the oldest of
        # the largest source, however young.
        gate = Admission(Limits(maxPending=1000), self.clock)
        gate.maxConnections = 3
        flood = [_Waiting(str(i)) for i in range(3)]
        for session in flood:
            self.assertIsNone(gate.accept())
            gate.enter(session, "198.51.100.1")
        self.assertIsNone(gate.accept())
        self.assertEqual(
            [s.evicted for s in flood], [("pending_evicted", 3, "198.51.100.1"), None, None]
        )
        self.assertEqual((gate.connections, gate.pending), (4, 2))
        # While evicted descriptors are still being closed, half the
        # reserve at most; then nothing is left to evict.
        gate.leave(flood[1])
        gate.leave(flood[2])
        self.assertEqual(gate.accept(), "descriptors")

    def test_defaultsAdmitEverything(self):
        gate = Admission(Limits(), self.clock)
        self.assertEqual([gate.admit("192.0.2.1") for _ in range(5000)], [None] * 5000)


class _Waiting:
    """
    A session as L{Admission} sees it.
    """

    def __init__(self, name):
        self.name = name
        self.evicted = None

    def evict(self, reason, pending, source):
        self.evicted = (reason, pending, source)


class PendingTests(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.admission = Admission(Limits(maxPending=6), self.clock)

    def enter(self, name, address):
        session = _Waiting(name)
        self.admission.enter(session, address)
        return session

    def test_evictsOldestOfLargestSource(self):
        a = [self.enter(f"a{i}", "192.0.2.1") for i in range(4)]
        b = [self.enter(f"b{i}", "192.0.2.2") for i in range(2)]
        self.clock.advance(EVICTABLE_AFTER)
        c = self.enter("c", "192.0.2.3")
        self.assertEqual(a[0].evicted, ("pending_evicted", 6, "192.0.2.1"))
        self.assertEqual([s.evicted for s in a[1:] + b + [c]], [None] * 6)
        self.assertEqual(self.admission.pending, 6)
        # Now 3 + 2 + 1: a[1] goes next, then a source of 2.
        self.enter("d", "192.0.2.4")
        self.assertIsNotNone(a[1].evicted)
        self.enter("e", "192.0.2.5")
        self.assertEqual(
            [s.evicted is not None for s in a + b], [True, True, False, False, True, False]
        )

    def test_youngConnectionsAreNotEvicted(self):
        # A reconnect storm from behind one NAT: more connections than slots
        # for a moment, all real. The limit bends until they have had time
        # to authenticate.
        storm = [self.enter(f"s{i}", "192.0.2.1") for i in range(10)]
        self.assertEqual(self.admission.pending, 10)
        self.clock.advance(EVICTABLE_AFTER - 0.1)
        storm.append(self.enter("s10", "192.0.2.1"))
        self.assertEqual([s.evicted for s in storm], [None] * 11)
        self.clock.advance(0.1)
        self.enter("late", "192.0.2.2")
        self.assertEqual([s.evicted is not None for s in storm], [True] + [False] * 10)
        self.assertEqual(self.admission.pending, 11)

    def test_newcomerFromLargestSourceEvictsItsOwnOldest(self):
        a = [self.enter(f"a{i}", "192.0.2.1") for i in range(5)]
        b = self.enter("b", "192.0.2.2")
        self.clock.advance(EVICTABLE_AFTER)
        late = self.enter("late", "192.0.2.1")
        self.assertIsNotNone(a[0].evicted)
        self.assertEqual([s.evicted for s in a[1:] + [b, late]], [None] * 6)

    def test_ipv6Source(self):
        flood = [self.enter(f"f{i}", f"2001:db8::{i + 1:x}") for i in range(5)]
        other = self.enter("o", "2001:db8:0:1::1")
        self.clock.advance(EVICTABLE_AFTER)
        self.enter("n", "198.51.100.1")
        self.assertEqual(flood[0].evicted, ("pending_evicted", 6, "2001:db8::/64"))
        self.assertIsNone(other.evicted)

    def test_leaveAndMove(self):
        a = [self.enter(f"a{i}", "192.0.2.1") for i in range(3)]
        b = [self.enter(f"b{i}", None) for i in range(3)]
        self.assertTrue(self.admission.leave(a[0]))
        self.assertFalse(self.admission.leave(a[0]))
        # A trusted proxy's connection turns out to be from 192.0.2.1.
        self.admission.move(b[0], "192.0.2.1")
        self.clock.advance(EVICTABLE_AFTER)
        self.enter("c", "192.0.2.3")
        self.admission.enter(_Waiting("d"), "192.0.2.4")
        self.assertEqual(
            [s.evicted is not None for s in a + b], [False, True, False, False, False, False]
        )
        self.assertEqual(self.admission._largest, 2)
        for session in list(self.admission._pendingSource):
            self.admission.leave(session)
        self.assertEqual(
            (
                self.admission.pending,
                self.admission._bySource,
                self.admission._bySize,
                self.admission._largest,
            ),
            (0, {}, {}, 0),
        )

    def test_noLimit(self):
        self.admission.limits = Limits()
        sessions = [self.enter(str(i), "192.0.2.1") for i in range(100)]
        self.assertEqual([s.evicted for s in sessions], [None] * 100)


_OPS = st.lists(
    st.tuples(
        st.sampled_from(["enter", "leave", "move", "tick"]),
        st.integers(0, 15),
        st.sampled_from(["192.0.2.1", "192.0.2.2", "2001:db8::1", "2001:db8::2", None]),
    ),
    max_size=200,
)


class PendingPropertyTests(unittest.TestCase):
    @hypothesisProfile()
    @given(_OPS)
    def test_tablesStayConsistent(self, ops):
        # Whatever enters, leaves, moves and ages: the count per source and
        # the largest source agree with the sessions held, a full table
        # evicts exactly when the oldest of a largest source is old enough,
        # and the victim is always from a largest source.
        clock = Clock()
        admission = Admission(Limits(maxPending=5), clock)
        sessions = [_Waiting(str(i)) for i in range(16)]
        waiting = set()
        for op, index, address in ops:
            session = sessions[index]
            if op == "enter" and session not in waiting:
                before = {src: len(members) for src, members in admission._bySource.items()}
                full = len(waiting) >= 5
                if full:
                    largest = admission._bySource[next(iter(admission._bySize[admission._largest]))]
                    oldAge = clock.seconds() - next(iter(largest.values()))
                admission.enter(session, address)
                waiting.add(session)
                evicted = [s for s in waiting if s.evicted]
                self.assertEqual(len(evicted), 1 if full and oldAge >= EVICTABLE_AFTER else 0)
                for victim in evicted:
                    self.assertEqual(before[victim.evicted[2]], max(before.values()))
                    waiting.discard(victim)
                    victim.evicted = None
            elif op == "leave":
                self.assertEqual(admission.leave(session), session in waiting)
                waiting.discard(session)
            elif op == "move" and address is not None:
                admission.move(session, address)
            elif op == "tick":
                clock.advance(1.0)
            self.assertEqual(set(admission._pendingSource), waiting)
            sizes = {src: len(members) for src, members in admission._bySource.items()}
            self.assertNotIn(0, sizes.values())
            self.assertEqual(admission._largest, max(sizes.values(), default=0))
            self.assertEqual(
                {n: set(srcs) for n, srcs in admission._bySize.items()},
                {n: {s for s, k in sizes.items() if k == n} for n in set(sizes.values())},
            )


class SessionLimitTests(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.relay = makeRelay(self.clock)

    def test_maxPending(self):
        self.relay = makeRelay(self.clock, limits=Limits(maxPending=2))
        links = [FakeLink() for _ in range(3)]
        waiting = [PeerSession(self.relay, link) for link in links[:2]]
        self.clock.advance(EVICTABLE_AFTER)
        waiting.append(PeerSession(self.relay, links[2]))
        # The oldest made room for the newest, and said why.
        self.assertEqual([link.aborted for link in links], [True, False, False])
        self.assertTrue(waiting[0].closed)
        self.assertEqual(self.relay.counters.handshakeRejects["pending_evicted"], 1)
        self.assertEqual(self.relay.admission.pending, 2)
        waiting[0].linkLost()
        self.assertEqual(self.relay.admission.pending, 2)
        # The others are unaffected and authenticate; then there is room.
        waiting[1].messageReceived(authMessage("peer-a"))
        self.assertEqual(waiting[1].peerID, A)
        self.assertEqual(self.relay.admission.pending, 1)
        waiting[2].linkLost()
        self.assertEqual(self.relay.admission.pending, 0)
        later = FakeLink()
        PeerSession(self.relay, later)
        self.assertFalse(later.aborted)

    def test_maxPeers(self):
        self.relay = makeRelay(self.clock, limits=Limits(maxPeers=2))
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
        self.relay = makeRelay(self.clock, limits=Limits(peerByteRate=10000))
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
        self.relay = makeRelay(self.clock, limits=limits)
        return PeerWebSocketFactory(self.relay, self.clock)

    def test_perIPRefusedBeforeAnyByte(self):
        factory = self.factory(Limits(maxPerIP=1))
        first = Peer(factory, 1)
        # No protocol: the listening port closes the socket at once.
        self.assertIsNone(factory.buildProtocol(IPv4Address("TCP", "192.0.2.1", 2)))
        self.assertEqual(self.relay.counters.handshakeRejects["per_ip_connections"], 1)
        self.assertEqual(self.relay.admission.connections, 1)
        self.assertIn(b"101", first.upgrade())
        first.send(authMessage("peer-a"))
        self.assertEqual(first.messages(), [self.relay.authResponse])
        self.assertEqual(self.relay.admission._open, {"192.0.2.1": 1})
        first.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual((self.relay.admission._open, self.relay.admission.connections), ({}, 0))
        self.assertIsNotNone(Peer(factory, 3).protocol.session)

    def test_descriptorsRefusedBeforeAnyByte(self):
        factory = self.factory(Limits())
        self.relay.admission.maxConnections = 1
        first = Peer(factory, 1)
        # Authenticated, so there is no waiting connection to make room.
        self.assertIn(b"101", first.upgrade())
        first.send(authMessage("peer-a"))
        self.assertIsNone(factory.buildProtocol(IPv4Address("TCP", "192.0.2.2", 2)))
        self.assertEqual(self.relay.counters.handshakeRejects["descriptors"], 1)
        first.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertIsNotNone(Peer(factory, 3).protocol.session)

    def _dir(self):
        import os

        path = self.mktemp()
        os.makedirs(path)
        return path

    def test_refusedOverTLS(self):
        from relay.listener.ws import RefusableTLSFactory
        from relay.tls import loadCertificateOptions
        from tests.certs import writeCertificate

        factory = self.factory(Limits(maxPerIP=1))
        cert, key, _ = writeCertificate(self._dir())
        tls = RefusableTLSFactory(loadCertificateOptions(cert, key), False, factory)
        self.assertIsNotNone(tls.buildProtocol(IPv4Address("TCP", "192.0.2.1", 1)))
        self.assertIsNone(tls.buildProtocol(IPv4Address("TCP", "192.0.2.1", 2)))

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
        self.assertEqual(self.relay.admission._open, {"192.0.2.1": 1})
        self.assertEqual(one.protocol.peerAddress, "192.0.2.1:1")


class _Client:
    """
    A connection to the factory under test from C{host}.
    """

    def __init__(self, factory, host, port):
        address = (IPv6Address if ":" in host else IPv4Address)("TCP", host, port)
        self.transport = StringTransport(peerAddress=address)
        self.protocol = factory.buildProtocol(address)
        self.protocol.makeConnection(self.transport)
        self.lost = False

    @property
    def closed(self):
        return self.transport.disconnecting or self.transport.disconnected

    def reap(self):
        """
        What the reactor does after an abort: the connection is lost.
        """
        if self.closed and not self.lost:
            self.lost = True
            self.protocol.connectionLost(Failure(ConnectionDone()))
        return self.lost


class FloodTests(unittest.TestCase):
    """
    Idle TCP connections from a few addresses cannot keep agents from
    elsewhere out (issue 12, item 2: three addresses at 90 connections per
    second filled 2,048 pending slots within 8 s; from then on every new
    connection was reset).
    """

    def setUp(self):
        self.clock = Clock()
        self.relay = makeRelay(self.clock, limits=Limits(maxPeers=50000, maxPending=2048))
        self.factory = PeerWebSocketFactory(self.relay, self.clock)
        self.ports = iter(range(1024, 65536))
        self.open = []

    def connect(self, host):
        client = _Client(self.factory, host, next(self.ports))
        self.open.append(client)
        return client

    def flood(self, sources, perSecond, seconds, step=0.1):
        for _ in range(round(seconds / step)):
            for host in sources:
                for _ in range(round(perSecond * step)):
                    self.connect(host)
            self.clock.advance(step)
            self.open = [c for c in self.open if not c.reap()]
            self.assertLessEqual(self.relay.admission.pending, 2048)

    def agentAuthenticates(self, host, name):
        agent = self.connect(host)
        agent.protocol.dataReceived(UPGRADE.format(path="/relay", extra="").encode())
        response, _, rest = agent.transport.value().partition(b"\r\n\r\n")
        self.assertIn(b" 101 ", response.split(b"\r\n")[0])
        agent.transport.clear()
        agent.protocol.dataReceived(clientFrame(authMessage(name)))
        self.assertEqual(
            [p for _, p in serverFrames(agent.transport.value())], [self.relay.authResponse]
        )
        return agent

    def test_agentFromElsewhereGetsIn(self):
        sources = ["198.51.100.1", "198.51.100.2", "198.51.100.3"]
        self.flood(sources, 90, 20)
        self.assertEqual(self.relay.admission.pending, 2048)
        self.agentAuthenticates("203.0.113.4", "peer-a")
        self.agentAuthenticates("2001:db8:4::1", "peer-b")
        # The flood keeps going; the agents stay, and so does the bound.
        self.flood(sources, 90, 5)
        self.assertEqual(len(self.relay.store), 2)
        self.assertGreater(self.relay.counters.handshakeRejects["pending_evicted"], 2000)

    def test_agentBehindAFloodingAddressGetsIn(self):
        # Each idle connection of a flood lives only as long as the slots
        # last at its rate (2,048 / 270 per second: 7.6 s), and an agent
        # answers in milliseconds, so even one behind a flooding address is
        # let in.
        sources = ["198.51.100.1", "198.51.100.2", "198.51.100.3"]
        self.flood(sources, 90, 20)
        self.agentAuthenticates("198.51.100.1", "peer-a")

    def test_ipv6FloodFromOne64(self):
        # A /64 is one source, however many addresses it uses.
        hosts = [f"2001:db8:0:1::{i:x}" for i in range(1, 301)]
        self.flood(hosts, 1, 10, step=1)
        self.assertEqual(self.relay.admission.pending, 2048)
        self.assertEqual(list(self.relay.admission._bySource), ["2001:db8:0:1::/64"])
        self.agentAuthenticates("2001:db8:0:2::1", "peer-a")


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
        self.assertEqual(
            summaries,
            [
                "7 more lines about refused or ignored traffic were not logged in the last 10 s "
                "(the counters in /metrics have every event)"
            ],
        )
        self.budget(self.emit, "line {i}", i=10)
        self.assertEqual(self.lines[-1], "line 10")

    def test_newWindowNewBudget(self):
        for _ in range(3):
            self.budget(self.emit, "a")
        self.clock.advance(10)
        for _ in range(3):
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
