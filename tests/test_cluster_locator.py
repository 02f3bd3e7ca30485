"""
Tests for L{relay.cluster.locator}: lookup timing (first I_HAVE, 200 ms),
shared broadcasts, seqno choice with serial wrap, the 5 min cache and its
invalidation, WHO_HAS answers.
"""

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from relay.cluster import frames, locator
from relay.cluster.streams import GONE, SENT
from relay.interfaces import ILocalPeers, IPeerConnection
from relay.messages import peerID

NOW = 1893456000
PEER_A = peerID("peer-a")
PEER_B = peerID("peer-b")


class FakeStream:
    """
    A live stream that records the frames sent on it.
    """

    def __init__(self, address, result=SENT):
        self.address = address
        self.sent = []
        self.result = result
        self.closing = False

    def send(self, data, droppable=False):
        if self.result == SENT:
            self.sent.append(data)
        return self.result


class FakeStreams:
    def __init__(self, *addresses):
        self.streams = {a: FakeStream(a) for a in addresses}

    def liveStreams(self):
        return [s for s in self.streams.values() if s.result != GONE]

    def stream(self, address):
        s = self.streams.get(address)
        return s if s is not None and s.result != GONE else None


@implementer(IPeerConnection)
class FakePeer:
    def __init__(self, peerID, registeredAt=NOW):
        self.peerID = peerID
        self.registeredAt = registeredAt
        self.received = []

    def sendMessage(self, message):
        self.received.append(message)
        return True

    def close(self):
        pass


@implementer(ILocalPeers)
class FakeLocalPeers:
    def __init__(self, *peers):
        self.peers = {p.peerID: p for p in peers}
        self.online = []
        self.gone = []

    def localPeer(self, peerID):
        return self.peers.get(peerID)

    def localPeers(self):
        return list(self.peers.values())

    def peerOnlineElsewhere(self, peerID):
        self.online.append(peerID)

    def peerGoneElsewhere(self, peerID):
        self.gone.append(peerID)


def makeClock():
    clock = Clock()
    clock.advance(NOW)
    return clock


class SeqnoTests(SynchronousTestCase):
    def test_seqnoOf(self):
        self.assertEqual(locator.seqnoOf(1.234), 123)
        self.assertEqual(locator.seqnoOf(NOW), NOW * 100 % 2**32)
        self.assertEqual(locator.seqnoOf(2**32 / 100 + 0.05), 5)
        self.assertEqual(locator.seqnoOf(NOW + 0.01) - locator.seqnoOf(NOW), 1)

    def test_serialGreater(self):
        cases = [
            (1, 0, True),
            (0, 1, False),
            (5, 5, False),
            (0, 2**32 - 1, True),
            (2**32 - 1, 0, False),
            (10, 2**32 - 10, True),
            (2**31 - 1, 0, True),
            (2**31, 0, False),
            (0, 2**31, False),
            (2**31 + 1, 0, False),
            (0, 2**31 + 1, True),
        ]
        for a, b, expected in cases:
            self.assertEqual(locator.serialGreater(a, b), expected, (a, b))


class LookupTests(SynchronousTestCase):
    def setUp(self):
        self.clock = makeClock()
        self.streams = FakeStreams("10.0.0.2:7090", "10.0.0.3:7090")
        self.observed = []
        self.locator = locator.Locator(
            self.streams, FakeLocalPeers(), self.clock, lookupObserver=self.observed.append
        )
        self.b, self.c = (
            self.streams.streams["10.0.0.2:7090"],
            self.streams.streams["10.0.0.3:7090"],
        )

    def test_noStreamsMissAtOnce(self):
        self.streams.streams.clear()
        self.assertIsNone(self.successResultOf(self.locator.lookup(PEER_A)))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.observed, [])

    def test_broadcastAndFirstIHave(self):
        """
        WHO_HAS goes to every live stream; the first I_HAVE completes the
        lookup at once.
        """
        d = self.locator.lookup(PEER_A)
        self.assertEqual(self.b.sent, [frames.whoHasFrame(PEER_A)])
        self.assertEqual(self.c.sent, [frames.whoHasFrame(PEER_A)])
        self.clock.advance(0.05)
        self.assertNoResult(d)
        self.assertEqual(self.locator.iHaveReceived("10.0.0.3:7090", PEER_A, 7), (True, True))
        self.assertEqual(self.successResultOf(d), "10.0.0.3:7090")
        self.assertEqual(len(self.observed), 1)
        self.assertAlmostEqual(self.observed[0], 0.05, places=6)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertFalse(self.locator.pending(PEER_A))

    def test_silenceMissesAfter200ms(self):
        d = self.locator.lookup(PEER_A)
        self.clock.advance(0.199)
        self.assertNoResult(d)
        self.clock.advance(0.0011)
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(len(self.observed), 1)
        self.assertAlmostEqual(self.observed[0], 0.2, places=3)
        self.assertIsNone(self.locator.cached(PEER_A))

    def test_lateIHaveAfterMissIsCached(self):
        d = self.locator.lookup(PEER_A)
        self.clock.advance(0.2)
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.locator.iHaveReceived("10.0.0.2:7090", PEER_A, 1), (True, False))
        self.assertEqual(self.locator.cached(PEER_A), "10.0.0.2:7090")

    def test_sharedBroadcast(self):
        d1 = self.locator.lookup(PEER_A)
        d2 = self.locator.lookup(PEER_A)
        d3 = self.locator.lookup(PEER_B)
        self.assertEqual(self.b.sent, [frames.whoHasFrame(PEER_A), frames.whoHasFrame(PEER_B)])
        self.locator.iHaveReceived("10.0.0.2:7090", PEER_A, 1)
        self.assertEqual(self.successResultOf(d1), "10.0.0.2:7090")
        self.assertEqual(self.successResultOf(d2), "10.0.0.2:7090")
        self.assertNoResult(d3)
        self.assertEqual(len(self.observed), 1)
        self.clock.advance(0.2)
        self.assertIsNone(self.successResultOf(d3))

    def test_cancelledWaiter(self):
        """
        A waiter given up by its caller does not disturb the others.
        """
        d1 = self.locator.lookup(PEER_A)
        d2 = self.locator.lookup(PEER_A)
        d1.cancel()
        self.failureResultOf(d1, defer.CancelledError)
        self.locator.iHaveReceived("10.0.0.2:7090", PEER_A, 1)
        self.assertEqual(self.successResultOf(d2), "10.0.0.2:7090")

    def test_cacheHit(self):
        self.locator.iHaveReceived("10.0.0.2:7090", PEER_A, 1)
        self.assertEqual(self.successResultOf(self.locator.lookup(PEER_A)), "10.0.0.2:7090")
        self.assertEqual(self.b.sent, [])
        self.assertEqual(self.observed, [])

    def test_reentrantLookup(self):
        """
        A waiter's callback may start a new lookup of the same id.
        """
        d = self.locator.lookup(PEER_A)
        again = []
        d.addCallback(lambda _: again.append(self.locator.lookup(PEER_A)))
        self.clock.advance(0.2)
        self.assertNoResult(again[0])
        self.assertEqual(len(self.b.sent), 2)
        self.clock.advance(0.2)
        self.assertIsNone(self.successResultOf(again[0]))

    def test_stop(self):
        d = self.locator.lookup(PEER_A)
        self.locator.stop()
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.clock.getDelayedCalls(), [])


class SeqnoChoiceTests(SynchronousTestCase):
    def setUp(self):
        self.clock = makeClock()
        self.streams = FakeStreams("10.0.0.2:7090", "10.0.0.3:7090")
        self.locator = locator.Locator(self.streams, FakeLocalPeers(), self.clock)

    def test_laterHigherUpdatesCache(self):
        """
        The lookup completes with the first answer; a later, higher seqno
        from another pod still takes the cache.
        """
        d = self.locator.lookup(PEER_A)
        self.locator.iHaveReceived("10.0.0.2:7090", PEER_A, 100)
        self.assertEqual(self.successResultOf(d), "10.0.0.2:7090")
        self.assertEqual(self.locator.iHaveReceived("10.0.0.3:7090", PEER_A, 101), (True, False))
        self.assertEqual(self.locator.cached(PEER_A), "10.0.0.3:7090")

    def test_lowerIgnored(self):
        self.locator.iHaveReceived("10.0.0.3:7090", PEER_A, 101)
        self.assertEqual(self.locator.iHaveReceived("10.0.0.2:7090", PEER_A, 100), (False, False))
        self.assertEqual(self.locator.cached(PEER_A), "10.0.0.3:7090")
        self.assertEqual(self.locator.cachedEntry(PEER_A).seqno, 101)

    def test_serialWrap(self):
        """
        Just after the seqno wraps, the small value is the newer one.
        """
        self.locator.iHaveReceived("10.0.0.2:7090", PEER_A, 2**32 - 10)
        self.assertEqual(self.locator.iHaveReceived("10.0.0.3:7090", PEER_A, 5), (True, False))
        self.assertEqual(self.locator.cached(PEER_A), "10.0.0.3:7090")
        self.assertEqual(
            self.locator.iHaveReceived("10.0.0.2:7090", PEER_A, 2**32 - 10), (False, False)
        )
        self.assertEqual(self.locator.cached(PEER_A), "10.0.0.3:7090")

    def test_equalSeqnoUpdates(self):
        self.locator.iHaveReceived("10.0.0.2:7090", PEER_A, 5)
        self.assertEqual(self.locator.iHaveReceived("10.0.0.3:7090", PEER_A, 5), (True, False))
        self.assertEqual(self.locator.cached(PEER_A), "10.0.0.3:7090")

    def test_sameOwnerNotChanged(self):
        self.assertEqual(self.locator.iHaveReceived("10.0.0.2:7090", PEER_A, 5), (True, False))
        self.assertEqual(self.locator.iHaveReceived("10.0.0.2:7090", PEER_A, 6), (False, False))
        self.assertEqual(self.locator.cachedEntry(PEER_A).seqno, 6)


class CacheTests(SynchronousTestCase):
    def setUp(self):
        self.clock = makeClock()
        self.streams = FakeStreams("10.0.0.2:7090")
        self.locator = locator.Locator(self.streams, FakeLocalPeers(), self.clock)
        self.stream = self.streams.streams["10.0.0.2:7090"]

    def test_expiresAfterFiveMinutes(self):
        """
        An answer from a pod that pushes no presence (the Go original) is
        kept 5 min, used or not: such a pod never says the peer left.
        """
        self.locator.lookup(PEER_A)
        self.locator.iHaveReceived("10.0.0.2:7090", PEER_A, 5)
        self.stream.sent.clear()
        self.clock.advance(299.999)
        self.assertEqual(self.locator.cached(PEER_A), "10.0.0.2:7090")
        self.clock.advance(0.001)
        self.assertIsNone(self.locator.cached(PEER_A))
        self.locator.lookup(PEER_A)
        self.assertEqual(self.stream.sent, [frames.whoHasFrame(PEER_A)])

    def test_renewedByUseAtAnnouncingPod(self):
        """
        An entry at a pod that pushes presence lives on while it is used
        (issue 12, item 6: a cross-pod flow was looked up again every 5
        min); unused, it expires; the pod's stream ending forgets it.
        """
        self.locator.iHaveReceived("10.0.0.2:7090", PEER_A, 5)
        self.locator.iHaveReceived("10.0.0.2:7090", PEER_B, 6)
        for _ in range(10):
            self.clock.advance(200)
            self.assertEqual(self.locator.cached(PEER_A), "10.0.0.2:7090")
        self.assertIsNone(self.locator.cached(PEER_B))
        self.locator.lookup(PEER_A)
        self.assertEqual(self.stream.sent, [])
        self.locator.invalidatePod("10.0.0.2:7090")
        self.locator.lookup(PEER_B)
        self.locator.iHaveReceived("10.0.0.2:7090", PEER_B, 6)
        self.clock.advance(200)
        self.assertEqual(self.locator.cached(PEER_B), "10.0.0.2:7090")
        self.clock.advance(100)
        self.assertIsNone(self.locator.cached(PEER_B))

    def test_presenceAnnounced(self):
        """
        A pod that sent PEER_GONE announces presence: its answers to
        lookups are renewed by use too.
        """
        self.locator.presenceAnnounced("10.0.0.2:7090")
        self.locator.lookup(PEER_A)
        self.locator.iHaveReceived("10.0.0.2:7090", PEER_A, 5)
        self.clock.advance(200)
        self.assertEqual(self.locator.cached(PEER_A), "10.0.0.2:7090")
        self.clock.advance(200)
        self.assertEqual(self.locator.cached(PEER_A), "10.0.0.2:7090")

    def test_refreshedByIHave(self):
        self.locator.iHaveReceived("10.0.0.2:7090", PEER_A, 5)
        self.clock.advance(200)
        self.locator.iHaveReceived("10.0.0.2:7090", PEER_A, 5)
        self.clock.advance(200)
        self.assertEqual(self.locator.cached(PEER_A), "10.0.0.2:7090")

    def test_expiredHigherDoesNotBlock(self):
        self.locator.iHaveReceived("10.0.0.2:7090", PEER_A, 500)
        self.clock.advance(300)
        self.assertEqual(self.locator.iHaveReceived("10.0.0.3:7090", PEER_A, 5), (True, False))
        self.assertEqual(self.locator.cached(PEER_A), "10.0.0.3:7090")

    def test_invalidate(self):
        self.locator.iHaveReceived("10.0.0.2:7090", PEER_A, 5)
        self.assertFalse(self.locator.invalidate(PEER_A, "10.0.0.3:7090"))
        self.assertEqual(self.locator.cached(PEER_A), "10.0.0.2:7090")
        self.assertTrue(self.locator.invalidate(PEER_A, "10.0.0.2:7090"))
        self.assertIsNone(self.locator.cached(PEER_A))
        self.assertFalse(self.locator.invalidate(PEER_A))
        self.locator.iHaveReceived("10.0.0.2:7090", PEER_A, 5)
        self.assertTrue(self.locator.invalidate(PEER_A))
        self.locator.lookup(PEER_A)
        self.assertEqual(self.stream.sent, [frames.whoHasFrame(PEER_A)])

    def test_invalidateAllowsLowerSeqno(self):
        self.locator.iHaveReceived("10.0.0.2:7090", PEER_A, 500)
        self.locator.invalidate(PEER_A)
        self.assertEqual(self.locator.iHaveReceived("10.0.0.3:7090", PEER_A, 5), (True, False))

    def test_invalidatePod(self):
        self.locator.iHaveReceived("10.0.0.2:7090", PEER_A, 5)
        self.locator.iHaveReceived("10.0.0.3:7090", PEER_B, 5)
        self.locator.invalidatePod("10.0.0.2:7090")
        self.assertIsNone(self.locator.cached(PEER_A))
        self.assertEqual(self.locator.cached(PEER_B), "10.0.0.3:7090")

    def test_sweep(self):
        """
        Entries nobody asks for again are dropped once they expire.
        """
        for i in range(50):
            self.locator.iHaveReceived("10.0.0.2:7090", peerID(str(i)), 1)
        self.assertEqual(len(self.locator._cache), 50)
        self.clock.advance(300)
        self.locator.iHaveReceived("10.0.0.2:7090", PEER_A, 1)
        self.assertEqual(len(self.locator._cache), 1)


class WhoHasTests(SynchronousTestCase):
    def test_answersForLocalPeer(self):
        peer = FakePeer(PEER_A, registeredAt=NOW + 0.42)
        loc = locator.Locator(FakeStreams(), FakeLocalPeers(peer), makeClock())
        stream = FakeStream("10.0.0.2:7090")
        loc.whoHasReceived(stream, PEER_A)
        self.assertEqual(stream.sent, [frames.iHaveFrame(PEER_A, (NOW * 100 + 42) % 2**32)])

    def test_silentOtherwise(self):
        loc = locator.Locator(FakeStreams(), FakeLocalPeers(FakePeer(PEER_A)), makeClock())
        stream = FakeStream("10.0.0.2:7090")
        loc.whoHasReceived(stream, PEER_B)
        self.assertEqual(stream.sent, [])
