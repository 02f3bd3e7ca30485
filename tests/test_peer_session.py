"""
The peer protocol of one session, driven with a fake link and a Clock.
"""

import hmac
from hashlib import sha256

from twisted.internet.task import Clock
from twisted.trial import unittest

from relay import messages as m
from relay.auth import generateToken, tokenKey
from relay.interfaces import IRelay
from relay.peer import PeerSession
from tests.helpers import NOW, SECRET, FakeLink, authMessage, connect, makeRelay, subscriptionCount

A, B, C = m.peerID("peer-a"), m.peerID("peer-b"), m.peerID("peer-c")


class HandshakeTests(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.relay = makeRelay(self.clock)

    def handshake(self, message):
        link = FakeLink()
        session = PeerSession(self.relay, link)
        session.messageReceived(message)
        return session, link

    def assertRejected(self, message, reason):
        session, link = self.handshake(message)
        self.assertEqual(link.written, [])
        self.assertTrue(link.aborted)
        self.assertIsNone(session.peerID)
        self.assertEqual(len(self.relay.store), 0)
        self.assertEqual(self.relay.counters.handshakeRejects[reason], 1)

    def test_success(self):
        session, link = self.handshake(authMessage("peer-a"))
        self.assertEqual(link.written, [b"\x01\x07rel://127.0.0.1:33080"])
        self.assertFalse(link.aborted)
        self.assertEqual(session.peerID, A)
        self.assertIs(self.relay.store.peers.get(A), session)
        self.assertEqual(session.registeredAt, NOW)

    def test_badVersion(self):
        self.assertRejected(b"\x02" + authMessage("peer-a")[1:], "bad_version")

    def test_notAuth(self):
        self.assertRejected(m.encodeTransport(B, b"x"), "not_auth")

    def test_legacyHello(self):
        self.assertRejected(b"\x01\x01" + m.MAGIC + A + b"gob", "legacy_hello")

    def test_short(self):
        self.assertRejected(b"\x01", "malformed")

    def test_shortAuth(self):
        self.assertRejected(b"\x01\x06" + m.MAGIC + A[:10], "malformed")

    def test_wrongMagic(self):
        self.assertRejected(b"\x01\x06\x00\x00\x00\x00" + authMessage("peer-a")[6:], "bad_magic")

    def test_badToken(self):
        self.assertRejected(authMessage("peer-a", secret="other"), "bad_signature")

    def test_expiredToken(self):
        self.assertRejected(authMessage("peer-a", expiresAt=NOW - 1), "expired")

    def test_unknownAlgo(self):
        message = bytearray(authMessage("peer-a"))
        message[42] = 7
        self.assertRejected(bytes(message), "unknown_algo")

    def test_tooLarge(self):
        self.assertRejected(authMessage("peer-a") + b"x" * (213 - 85), "too_large")

    def test_212BytesAccepted(self):
        token = generateToken(SECRET, NOW + 60)
        payload = token[33:].rjust(212 - 42 - 33, b"0")
        message = m.encodeAuth(
            A, token[:1] + hmac.new(tokenKey(SECRET), payload, sha256).digest() + payload
        )
        self.assertEqual(len(message), 212)
        session, link = self.handshake(message)
        self.assertEqual(session.peerID, A)

    def test_timeout(self):
        session = PeerSession(self.relay, FakeLink())
        self.clock.advance(9.9)
        self.assertFalse(session.link.aborted)
        self.clock.advance(0.1)
        self.assertTrue(session.link.aborted)
        self.assertEqual(self.relay.counters.handshakeRejects["timeout"], 1)

    def test_noTimeoutAfterAuth(self):
        session, link = self.handshake(authMessage("peer-a"))
        self.clock.advance(11)
        self.assertFalse(link.aborted)

    def test_timersStopOnLinkLost(self):
        session = PeerSession(self.relay, FakeLink())
        session.linkLost()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_messageReceivedStates(self):
        """
        The method is the handshake state; authentication, then the end,
        put the next state's handler in front of it on the instance, so
        relayed messages reach L{PeerSession._authenticated} with no
        dispatch in between, and a message after the end does nothing.
        """
        session, link = self.handshake(authMessage("peer-a"))
        self.assertEqual(session.messageReceived, session._authenticated)
        fresh = PeerSession(self.relay, FakeLink())
        self.assertNotIn("messageReceived", vars(fresh))
        self.assertEqual(fresh.messageReceived.__func__, PeerSession.messageReceived)
        fresh.linkLost()
        fresh.messageReceived(authMessage("peer-b"))
        self.assertEqual(fresh.link.written, [])
        self.assertIsNone(self.relay.store.peers.get(B))
        session.close()
        link.take()
        # A server-only type: a protocol error, were it not ignored.
        session.messageReceived(b"\x01\x02")
        self.assertEqual(dict(self.relay.counters.protocolErrors), {})

    def test_authenticationTimeRecorded(self):
        times = []
        self.relay.recordAuthenticationTime = times.append
        session = PeerSession(self.relay, FakeLink())
        self.clock.advance(0.25)
        session.messageReceived(authMessage("peer-a"))
        self.assertEqual(times, [250.0])


class TransportTests(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.relay = makeRelay(self.clock)
        self.a, self.linkA = connect(self.relay, "peer-a")
        self.b, self.linkB = connect(self.relay, "peer-b")

    def test_stamped(self):
        self.a.messageReceived(m.encodeTransport(B, b"hello"))
        self.assertEqual(self.linkB.take(), [bytes.fromhex("0103") + A + b"hello"])
        self.assertEqual(self.linkA.take(), [])
        self.assertEqual(self.relay.counters.transferReceivedBytes, 43)
        self.assertEqual(self.relay.counters.transferSentBytes, 43)

    def test_bothWays(self):
        self.a.messageReceived(m.encodeTransport(B, b"ping"))
        self.b.messageReceived(m.encodeTransport(A, b"pong"))
        self.assertEqual(self.linkB.take(), [b"\x01\x03" + A + b"ping"])
        self.assertEqual(self.linkA.take(), [b"\x01\x03" + B + b"pong"])

    def test_emptyPayload(self):
        self.a.messageReceived(m.encodeTransport(B, b""))
        self.assertEqual(self.linkB.take(), [b"\x01\x03" + A])

    def test_unknownDestinationDropped(self):
        self.a.messageReceived(m.encodeTransport(C, b"hello"))
        self.assertEqual(self.relay.counters.dropped["unknown_peer"], 1)
        self.assertFalse(self.linkA.aborted)
        self.a.messageReceived(m.encodeTransport(B, b"still here"))
        self.assertEqual(self.linkB.take(), [b"\x01\x03" + A + b"still here"])

    def test_slowDestinationCounted(self):
        self.linkB.accept = False
        self.a.messageReceived(m.encodeTransport(B, b"hello"))
        self.assertEqual(self.relay.counters.transferSentBytes, 0)

    def test_lastTransport(self):
        self.clock.advance(5)
        self.a.messageReceived(m.encodeTransport(B, b"hello"))
        self.assertEqual(self.a.lastTransport, NOW + 5)
        self.assertIsNone(self.b.lastTransport)

    def test_largest(self):
        message = m.encodeTransport(B, b"x" * (8820 - 38))
        self.a.messageReceived(message)
        self.assertEqual(len(self.linkB.take()[0]), 8820)

    def assertClosedForProtocolError(self, message, reason):
        self.a.messageReceived(message)
        self.assertTrue(self.linkA.aborted)
        self.assertEqual(self.relay.counters.protocolErrors[reason], 1)
        self.a.messageReceived(m.encodeTransport(B, b"late"))
        self.assertEqual(self.linkB.take(), [])
        # The other peer is unaffected.
        self.b.messageReceived(m.encodeTransport(A, b"x"))
        self.assertFalse(self.linkB.aborted)

    def test_tooLarge(self):
        self.assertClosedForProtocolError(b"\x01\x03" + B + b"x" * (8821 - 38), "too_large")

    def test_tooLargeOtherType(self):
        self.assertClosedForProtocolError(b"\x01\x08" + B * 245, "too_large")

    def test_wrongVersion(self):
        self.assertClosedForProtocolError(b"\x02\x03" + B + b"x", "bad_version")

    def test_serverTypes(self):
        for kind in (0, 2, 7, 10, 11, 12):
            self.setUp()
            self.assertClosedForProtocolError(bytes((1, kind)) + B, "bad_type")

    def test_empty(self):
        self.assertClosedForProtocolError(b"", "malformed")

    def test_shortTransportIgnored(self):
        self.a.messageReceived(b"\x01\x03" + B[:35])
        self.assertFalse(self.linkA.aborted)
        self.assertEqual(self.relay.counters.dropped["malformed"], 1)
        self.assertEqual(self.linkB.take(), [])

    def test_secondAuthIgnored(self):
        self.a.messageReceived(authMessage("peer-c"))
        self.assertFalse(self.linkA.aborted)
        self.assertEqual(self.linkA.take(), [])
        self.assertEqual(self.a.peerID, A)
        self.assertIsNone(self.relay.store.peers.get(C))

    def test_close(self):
        self.a.messageReceived(m.CLOSE_MESSAGE)
        self.assertTrue(self.linkA.aborted)
        self.a.linkLost()
        self.assertIsNone(self.relay.store.peers.get(A))


class SubscriptionTests(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.relay = makeRelay(self.clock)
        self.a, self.linkA = connect(self.relay, "peer-a")

    def test_subscribeOnlineNow(self):
        b, _ = connect(self.relay, "peer-b")
        self.a.messageReceived(m.encodeIDList(m.SUBSCRIBE_PEER_STATE, [B, C])[0])
        self.assertEqual(self.linkA.take(), [b"\x01\x0a" + B])

    def test_subscribeNoneOnline(self):
        self.a.messageReceived(m.encodeIDList(m.SUBSCRIBE_PEER_STATE, [B])[0])
        self.assertEqual(self.linkA.take(), [])

    def test_laterOnlineThenOffline(self):
        self.a.messageReceived(m.encodeIDList(m.SUBSCRIBE_PEER_STATE, [B])[0])
        b, _ = connect(self.relay, "peer-b")
        self.assertEqual(self.linkA.take(), [b"\x01\x0a" + B])
        b.linkLost()
        self.assertEqual(self.linkA.take(), [b"\x01\x0b" + B])

    def test_unsubscribe(self):
        self.a.messageReceived(m.encodeIDList(m.SUBSCRIBE_PEER_STATE, [B])[0])
        self.a.messageReceived(m.encodeIDList(m.UNSUBSCRIBE_PEER_STATE, [B])[0])
        b, _ = connect(self.relay, "peer-b")
        b.linkLost()
        self.assertEqual(self.linkA.take(), [])

    def test_malformedIgnored(self):
        """
        An id list that is not a multiple of 36 bytes is ignored and
        counted (docs/protocol.md's bad-input table), the connection kept.
        """
        self.a.messageReceived(b"\x01\x08" + B + b"\x00")
        self.a.messageReceived(b"\x01\x09" + B[:35])
        self.assertFalse(self.linkA.aborted)
        self.assertEqual(self.relay.counters.dropped["malformed"], 2)
        connect(self.relay, "peer-b")
        self.assertEqual(self.linkA.take(), [])

    def test_chunkedAnswer(self):
        names = [f"p{i}" for i in range(245)]
        for name in names:
            connect(self.relay, name)
        ids = [m.peerID(name) for name in names]
        for message in m.encodeIDList(m.SUBSCRIBE_PEER_STATE, ids):
            self.a.messageReceived(message)
        written = self.linkA.take()
        self.assertEqual([len(x) for x in written], [2 + 244 * 36, 2 + 36])
        self.assertEqual(sum((m.decodeIDList(x) for x in written), []), ids)

    def test_reconnectReplaces(self):
        self.a.messageReceived(m.encodeIDList(m.SUBSCRIBE_PEER_STATE, [B])[0])
        old, oldLink = connect(self.relay, "peer-b")
        self.linkA.take()
        new, newLink = connect(self.relay, "peer-b", address="192.0.2.2:1")
        self.assertTrue(oldLink.aborted)
        self.assertIs(self.relay.store.peers.get(B), new)
        self.assertEqual(self.relay.counters.reconnections, 1)
        old.linkLost()
        self.assertIs(self.relay.store.peers.get(B), new)
        self.assertEqual(self.linkA.take(), [])
        self.a.messageReceived(m.encodeTransport(B, b"to the new one"))
        self.assertEqual(newLink.take(), [b"\x01\x03" + A + b"to the new one"])
        self.assertEqual(oldLink.take(), [])

    def test_subscriberLeavingForgetsInterest(self):
        self.a.messageReceived(m.encodeIDList(m.SUBSCRIBE_PEER_STATE, [B])[0])
        self.a.linkLost()
        b, _ = connect(self.relay, "peer-b")
        self.assertEqual(self.relay.store._interested, {})


class SubscriptionLimitTests(unittest.TestCase):
    """
    Issue 12, item 5: one peer's subscriptions are bounded.
    """

    def setUp(self):
        self.clock = Clock()
        self.relay = makeRelay(self.clock)
        self.relay.store.maxSubscriptions = 300
        self.a, self.linkA = connect(self.relay, "peer-a")

    def subscribe(self, names):
        for message in m.encodeIDList(m.SUBSCRIBE_PEER_STATE, [m.peerID(name) for name in names]):
            self.a.messageReceived(message)

    def test_excessRefusedAndCounted(self):
        self.subscribe([f"p{i}" for i in range(1000)])
        self.assertEqual(subscriptionCount(self.relay.store, self.a), 300)
        self.assertEqual(self.relay.counters.dropped["subscription_limit"], 700)
        self.assertFalse(self.linkA.aborted)
        connect(self.relay, "p299")
        connect(self.relay, "p300")
        self.assertEqual(self.linkA.take(), [b"\x01\x0a" + m.peerID("p299")])

    def test_resubscribingHeldIdsAlwaysAccepted(self):
        self.subscribe([f"p{i}" for i in range(300)])
        self.subscribe(["p0", "p1", "new"])
        self.assertEqual(self.relay.counters.dropped["subscription_limit"], 1)
        self.assertEqual(subscriptionCount(self.relay.store, self.a), 300)

    def test_unsubscribingMakesRoom(self):
        self.subscribe([f"p{i}" for i in range(300)])
        self.a.messageReceived(m.encodeIDList(m.UNSUBSCRIBE_PEER_STATE, [m.peerID("p0")])[0])
        self.subscribe(["new", "newer"])
        self.assertEqual(self.relay.counters.dropped["subscription_limit"], 1)
        connect(self.relay, "new")
        self.assertEqual(self.linkA.take(), [b"\x01\x0a" + m.peerID("new")])

    def test_logBudget(self):
        """
        The refusal is logged, within the log budget.
        """
        from twisted.logger import globalLogPublisher

        lines = []
        globalLogPublisher.addObserver(lines.append)
        self.addCleanup(globalLogPublisher.removeObserver, lines.append)
        self.subscribe([f"p{i}" for i in range(300)])
        for n in range(200):
            self.subscribe([f"x{n}"])
        refusals = [e for e in lines if "over the limit" in e.get("log_format", "")]
        self.assertTrue(0 < len(refusals) < 100, len(refusals))
        self.assertEqual(self.relay.counters.dropped["subscription_limit"], 200)

    def test_defaultLimit(self):
        from relay.store import MAX_SUBSCRIPTIONS, Store

        self.assertEqual(Store().maxSubscriptions, MAX_SUBSCRIPTIONS)
        self.assertEqual(MAX_SUBSCRIPTIONS, 4096)


class SmallMessageLinkTests(unittest.TestCase):
    """
    Issue 12, item 12: id lists fit the link (a QUIC datagram).
    """

    def test_peersOnlineSplitToFit(self):
        clock = Clock()
        relay = makeRelay(clock)
        a, linkA = connect(relay, "peer-a")
        linkA.maxMessageSize = 1415
        names = [f"p{i}" for i in range(244)]
        for name in names:
            connect(relay, name)
        ids = [m.peerID(name) for name in names]
        a.messageReceived(m.encodeIDList(m.SUBSCRIBE_PEER_STATE, ids)[0])
        written = linkA.take()
        self.assertEqual(max(len(x) for x in written), 2 + 39 * 36)
        self.assertEqual(len(written), 7)
        self.assertEqual(sum((m.decodeIDList(x) for x in written), []), ids)
        for x in written:
            self.assertEqual(x[:2], b"\x01\x0a")
        for name in names[:50]:
            relay.store.peers.get(m.peerID(name)).linkLost()
        self.assertEqual(len(linkA.take()), 50)

    def test_peersWentOfflineSplitToFit(self):
        clock = Clock()
        relay = makeRelay(clock)
        a, linkA = connect(relay, "peer-a")
        linkA.maxMessageSize = 100
        ids = [m.peerID(f"p{i}") for i in range(5)]
        a.peersWentOffline(ids)
        self.assertEqual([len(x) for x in linkA.take()], [2 + 2 * 36, 2 + 2 * 36, 2 + 36])


class HealthCheckTests(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()

    def session(self, threshold=1):
        self.relay = makeRelay(self.clock, healthCheckThreshold=threshold)
        return connect(self.relay, "peer-a")

    def test_sentEvery25Seconds(self):
        session, link = self.session()
        self.clock.advance(24.9)
        self.assertEqual(link.take(), [])
        self.clock.advance(0.1)
        self.assertEqual(link.take(), [b"\x01\x05"])
        session.messageReceived(b"\x01\x05")
        self.clock.advance(25)
        self.assertEqual(link.take(), [b"\x01\x05"])

    def test_answeredKeepsSession(self):
        session, link = self.session()
        for _ in range(20):
            self.clock.advance(25)
            if link.take():
                session.messageReceived(b"\x01\x05")
        self.assertFalse(link.aborted)

    def test_unansweredClosesAfter45Seconds(self):
        session, link = self.session()
        self.clock.advance(44.9)
        self.assertFalse(link.aborted)
        self.clock.advance(0.1)
        self.assertTrue(link.aborted)
        self.assertEqual(self.relay.counters.protocolErrors["health_check_timeout"], 1)

    def test_threshold(self):
        session, link = self.session(threshold=3)
        self.clock.advance(45)
        self.clock.advance(45)
        self.assertFalse(link.aborted)
        self.clock.advance(45)
        self.assertTrue(link.aborted)

    def test_answerResetsMisses(self):
        session, link = self.session(threshold=2)
        self.clock.advance(45)
        session.messageReceived(b"\x01\x05")
        self.clock.advance(45)
        self.clock.advance(45)
        self.assertFalse(link.aborted)
        self.clock.advance(45)
        self.assertTrue(link.aborted)

    def test_pingAndWindowCoincide(self):
        session, link = self.session()
        pings = 0
        for _ in range(9):
            self.clock.advance(25)
            pings += len(link.take())
            session.messageReceived(b"\x01\x05")
        self.assertEqual(self.clock.seconds() - NOW, 225)
        self.assertEqual(pings, 9)
        self.assertFalse(link.aborted)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)

    def test_lateTimerSkipsWhatItMissed(self):
        session, link = self.session(threshold=3)
        self.clock.advance(100)
        self.assertEqual(link.take(), [b"\x01\x05"])
        self.assertEqual(session._missed, 1)
        self.assertFalse(link.aborted)

    def test_timersStopWhenClosed(self):
        session, link = self.session()
        session.linkLost()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_scheduleStartsAtAuth(self):
        """
        The first ping is due 25 s after Auth, not after the connection
        opened, and the session never has more than one timer.
        """
        self.relay = makeRelay(self.clock)
        link = FakeLink()
        session = PeerSession(self.relay, link)
        self.clock.advance(9)
        session.messageReceived(authMessage("peer-a"))
        self.assertEqual(link.take(), [self.relay.authResponse])
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(24.9)
        self.assertEqual(link.take(), [])
        self.assertFalse(link.aborted)
        self.clock.advance(0.1)
        self.assertEqual(link.take(), [b"\x01\x05"])
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)


class ShutdownTests(unittest.TestCase):
    def test_closeToEveryPeer(self):
        clock = Clock()
        relay = makeRelay(clock)
        sessions = [connect(relay, name) for name in ("a", "b")]
        done = relay.shutdown()
        for session, link in sessions:
            self.assertEqual(link.take(), [b"\x01\x04"])
            self.assertTrue(link.graceful)
            self.assertTrue(session.closed)
        self.assertTrue(relay.draining)
        self.successResultOf(done)

    def test_noNewPeersWhileDraining(self):
        clock = Clock()
        relay = makeRelay(clock)
        late = PeerSession(relay, FakeLink())
        relay.shutdown()
        late.messageReceived(authMessage("late"))
        self.assertTrue(late.link.aborted)
        self.assertEqual(late.link.written, [])
        self.assertEqual(relay.counters.handshakeRejects["draining"], 1)


class _OnlyIRelay:
    """
    A relay as far as L{IRelay} describes it: a session reaching for
    anything else (its store, its validator) gets AttributeError.
    """

    def __init__(self, relay):
        self._relay = relay
        self.used = set()

    def __getattr__(self, name):
        if name not in IRelay.names(all=True):
            raise AttributeError(f"{name!r} is not part of IRelay")
        self.used.add(name)
        return getattr(self._relay, name)


class RelayInterfaceTests(unittest.TestCase):
    """
    A session uses nothing of its relay but L{IRelay}: its whole life,
    every branch that talks to the relay, runs against a relay showing
    only that.
    """

    def test_sessionLifeThroughIRelay(self):
        from relay.limits import Limits

        clock = Clock()
        real = makeRelay(clock, limits=Limits(maxPeers=2, peerByteRate=100000))
        real.store.maxSubscriptions = 1
        relay = _OnlyIRelay(real)

        def session(name=None, address="192.0.2.1:40000"):
            link = FakeLink(address)
            s = PeerSession(relay, link)
            if name is not None:
                s.messageReceived(authMessage(name))
            return s, link

        refused, refusedLink = session()
        refused.messageReceived(authMessage("peer-a", secret="other"))
        self.assertTrue(refusedLink.aborted)
        a, linkA = session("peer-a")
        b, linkB = session("peer-b")
        self.assertEqual((linkA.take(), linkB.take()), ([real.authResponse], [real.authResponse]))
        full, fullLink = session("peer-c")
        self.assertTrue(fullLink.aborted)
        self.assertEqual(fullLink.written, [])

        a.messageReceived(m.encodeTransport(B, b"hello"))
        self.assertEqual(linkB.take(), [b"\x01\x03" + A + b"hello"])
        a.messageReceived(m.encodeIDList(m.SUBSCRIBE_PEER_STATE, [B, C])[0])
        self.assertEqual(linkA.take(), [b"\x01\x0a" + B])
        a.messageReceived(m.encodeIDList(m.UNSUBSCRIBE_PEER_STATE, [B])[0])
        clock.advance(25)
        self.assertEqual(
            (linkA.take(), linkB.take()), ([m.HEALTH_CHECK_MESSAGE], [m.HEALTH_CHECK_MESSAGE])
        )
        b.messageReceived(m.HEALTH_CHECK_MESSAGE)
        timedOut, timedOutLink = session(address="192.0.2.9:1")
        clock.advance(20)
        self.assertEqual((linkA.aborted, linkB.aborted), (True, False))
        b.messageReceived(b"\x01\x02")
        self.assertTrue(linkB.aborted)
        clock.advance(10)
        self.assertTrue(timedOutLink.aborted)
        for s in (a, b, refused, full, timedOut):
            s.linkLost()
        self.assertEqual(len(real.store), 0)
        self.assertEqual(
            dict(real.counters.handshakeRejects), {"bad_signature": 1, "max_peers": 1, "timeout": 1}
        )
        self.assertEqual(
            dict(real.counters.protocolErrors), {"bad_type": 1, "health_check_timeout": 1}
        )
        self.assertEqual(real.counters.dropped["subscription_limit"], 1)
        self.assertEqual(real.admission.pending, 0)
        # Every part of the interface but draining's refusal was needed.
        self.assertEqual(relay.used, set(IRelay.names(all=True)))
