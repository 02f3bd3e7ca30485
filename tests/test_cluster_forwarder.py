"""
Tests for L{relay.cluster.forwarder}: FWD out and in, bounded lookup queues,
result counts, the 5 s limit, locate, presence push and PEER_GONE, two pods
joined in memory.
"""

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from relay.cluster import frames
from relay.cluster.forwarder import LOOKUPS_PER_PEER, MAX_LOOKUPS, SUBSCRIPTION_LOOKUPS, Forwarder
from relay.cluster.locator import Locator, seqnoOf
from relay.cluster.streams import GONE, SLOW, ClusterStreams, IStreamHandler
from relay.counters import ClusterCounters
from relay.interfaces import ICrossPodForwarder
from relay.messages import peerID
from tests.test_cluster_locator import FakeLocalPeers, FakePeer, FakeStreams
from tests.test_cluster_streams import FakeEndpoints, Wire

NOW = 1893456000
PEER_A = peerID("peer-a")
PEER_B = peerID("peer-b")
PEER_C = peerID("peer-c")
B = "10.0.0.2:7090"
C = "10.0.0.3:7090"


def waitingPackets(forwarder, destinationID):
    """
    How many packets for C{destinationID} wait for its lookup in
    C{forwarder}.
    """
    waiting = forwarder._waiting.get(destinationID)
    return 0 if waiting is None else len(waiting.packets)


def transportMessage(source, payload=b"hello"):
    return b"\x01\x03" + source + payload


class NeverLocator:
    """
    A locator whose lookups never complete (to reach the 5 s limit).
    """

    def __init__(self):
        self.lookups = []

    def cached(self, peerID):
        return None

    def lookup(self, peerID):
        d = defer.Deferred()
        self.lookups.append(d)
        return d

    def invalidate(self, peerID, address=None):
        return False

    def pending(self, peerID):
        return False


class ForwarderTestMixin:
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(NOW)
        self.streams = FakeStreams(B, C)
        self.b, self.c = self.streams.streams[B], self.streams.streams[C]
        self.local = FakeLocalPeers()
        self.counters = ClusterCounters()
        self.locator = Locator(self.streams, self.local, self.clock)
        self.forwarder = Forwarder(
            self.streams,
            self.locator,
            self.local,
            self.clock,
            self.counters,
            queuePackets=4,
            queueBytes=1000,
        )


class ForwardTests(ForwarderTestMixin, SynchronousTestCase):
    def test_interfaces(self):
        verifyObject(ICrossPodForwarder, self.forwarder)
        verifyObject(IStreamHandler, self.forwarder)

    def test_localPeer(self):
        peer = FakePeer(PEER_B)
        self.local.peers[PEER_B] = peer
        message = transportMessage(PEER_A)
        self.forwarder.forward(PEER_B, message)
        self.assertEqual(peer.received, [message])
        self.assertEqual(self.b.sent + self.c.sent, [])
        self.assertEqual(dict(self.counters.forwards), {"ok": 1})

    def test_cachedPod(self):
        self.locator.iHaveReceived(C, PEER_B, 1)
        message = transportMessage(PEER_A)
        self.forwarder.forward(PEER_B, message)
        self.assertEqual(
            self.c.sent,
            [bytes.fromhex("14004f") + PEER_B + bytes.fromhex("0103") + PEER_A + b"hello"],
        )
        self.assertEqual(self.b.sent, [])
        self.assertEqual(dict(self.counters.forwards), {"ok": 1})

    def test_noStreams(self):
        self.streams.streams.clear()
        self.forwarder.forward(PEER_B, transportMessage(PEER_A))
        self.assertEqual(dict(self.counters.forwards), {"peer_not_found": 1})
        self.assertEqual(waitingPackets(self.forwarder, PEER_B), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_lookupThenFWDInOrder(self):
        """
        Packets for a destination being looked up wait in order and leave at
        the first I_HAVE; other destinations are not held up meanwhile.
        """
        self.forwarder.forward(PEER_B, transportMessage(PEER_A, b"1"))
        self.forwarder.forward(PEER_B, transportMessage(PEER_A, b"2"))
        self.assertEqual(self.b.sent, [frames.whoHasFrame(PEER_B)])
        self.assertEqual(self.c.sent, [frames.whoHasFrame(PEER_B)])
        self.assertEqual(waitingPackets(self.forwarder, PEER_B), 2)
        self.locator.iHaveReceived(B, PEER_C, 1)
        self.forwarder.forward(PEER_C, transportMessage(PEER_A, b"other"))
        self.assertEqual(
            self.b.sent[-1], frames.fwdFrame(PEER_C, transportMessage(PEER_A, b"other"))
        )
        self.forwarder.forward(PEER_B, transportMessage(PEER_A, b"3"))
        self.clock.advance(0.01)
        self.forwarder.frameReceived(self.c, frames.IHave(PEER_B, 9))
        self.assertEqual(
            self.c.sent[1:],
            [frames.fwdFrame(PEER_B, transportMessage(PEER_A, n)) for n in (b"1", b"2", b"3")],
        )
        self.assertEqual(dict(self.counters.forwards), {"ok": 4})
        self.assertEqual(waitingPackets(self.forwarder, PEER_B), 0)
        self.assertEqual(self.local.online, [])
        self.forwarder.forward(PEER_B, transportMessage(PEER_A, b"4"))
        self.assertEqual(self.c.sent[-1], frames.fwdFrame(PEER_B, transportMessage(PEER_A, b"4")))
        self.assertEqual(len(self.b.sent), 2)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_queueBoundedByPackets(self):
        for n in range(6):
            self.forwarder.forward(PEER_B, transportMessage(PEER_A, bytes([n])))
        self.assertEqual(waitingPackets(self.forwarder, PEER_B), 4)
        self.assertEqual(self.counters.dropped["lookup_queue_full"], 2)
        self.forwarder.frameReceived(self.b, frames.IHave(PEER_B, 1))
        self.assertEqual(
            self.b.sent[1:],
            [frames.fwdFrame(PEER_B, transportMessage(PEER_A, bytes([n]))) for n in range(4)],
        )

    def test_queueBoundedByBytes(self):
        big = transportMessage(PEER_A, b"x" * 400)  # 438 bytes
        self.forwarder.forward(PEER_B, big)
        self.forwarder.forward(PEER_C, big)
        self.forwarder.forward(PEER_C, big)
        self.assertEqual(self.counters.dropped["lookup_queue_full"], 1)
        self.clock.advance(0.2)
        self.assertEqual(dict(self.counters.forwards), {"peer_not_found": 2})
        self.forwarder.forward(PEER_C, big)
        self.forwarder.forward(PEER_C, big)
        self.assertEqual(waitingPackets(self.forwarder, PEER_C), 2)

    def test_concurrentLookupsBounded(self):
        forwarder = Forwarder(
            self.streams, self.locator, self.local, self.clock, self.counters, maxLookups=2
        )
        for destination in (PEER_A, PEER_B, PEER_C):
            forwarder.forward(destination, transportMessage(PEER_A))
        self.assertEqual(self.counters.dropped["lookup_queue_full"], 1)
        self.assertEqual(self.b.sent, [frames.whoHasFrame(PEER_A), frames.whoHasFrame(PEER_B)])
        self.clock.advance(0.2)
        forwarder.forward(PEER_C, transportMessage(PEER_A))
        self.assertEqual(self.b.sent[-1], frames.whoHasFrame(PEER_C))

    def test_notFound(self):
        for n in range(3):
            self.forwarder.forward(PEER_B, transportMessage(PEER_A, bytes([n])))
        self.clock.advance(0.2)
        self.assertEqual(dict(self.counters.forwards), {"peer_not_found": 3})
        self.assertEqual(waitingPackets(self.forwarder, PEER_B), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_becameLocalDuringLookup(self):
        self.forwarder.forward(PEER_B, transportMessage(PEER_A))
        peer = FakePeer(PEER_B)
        self.local.peers[PEER_B] = peer
        self.forwarder.frameReceived(self.b, frames.IHave(PEER_B, 1))
        self.assertEqual(peer.received, [transportMessage(PEER_A)])
        self.assertEqual(len(self.b.sent), 1)

    def test_streamGone(self):
        self.locator.iHaveReceived(B, PEER_B, 1)
        del self.streams.streams[B]
        self.forwarder.forward(PEER_B, transportMessage(PEER_A))
        self.assertEqual(dict(self.counters.forwards), {"stream_gone": 1})
        self.assertIsNone(self.locator.cached(PEER_B))

    def test_streamClosing(self):
        self.locator.iHaveReceived(B, PEER_B, 1)
        self.b.result = GONE
        self.streams.stream = lambda address: self.b
        self.forwarder.forward(PEER_B, transportMessage(PEER_A))
        self.assertEqual(dict(self.counters.forwards), {"stream_gone": 1})
        self.assertIsNone(self.locator.cached(PEER_B))

    def test_sendError(self):
        self.locator.iHaveReceived(B, PEER_B, 1)

        def fail(data, droppable=False):
            raise OSError("broken")

        self.b.send = fail
        self.forwarder.forward(PEER_B, transportMessage(PEER_A))
        self.assertEqual(dict(self.counters.forwards), {"send_error": 1})
        self.assertIsNone(self.locator.cached(PEER_B))
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

    def test_slowStreamKeepsCache(self):
        self.locator.iHaveReceived(B, PEER_B, 1)
        self.b.result = SLOW
        self.forwarder.forward(PEER_B, transportMessage(PEER_A))
        self.assertEqual(dict(self.counters.forwards), {})
        self.assertEqual(self.locator.cached(PEER_B), B)

    def test_givesUpAfterFiveSeconds(self):
        never = NeverLocator()
        forwarder = Forwarder(self.streams, never, self.local, self.clock, self.counters)
        forwarder.forward(PEER_B, transportMessage(PEER_A, b"1"))
        forwarder.forward(PEER_B, transportMessage(PEER_A, b"2"))
        self.assertEqual(len(never.lookups), 1)
        self.clock.advance(4.99)
        self.assertEqual(dict(self.counters.forwards), {})
        self.clock.advance(0.01)
        self.assertEqual(dict(self.counters.forwards), {"peer_not_found": 2})
        self.assertEqual(waitingPackets(forwarder, PEER_B), 0)
        never.lookups[0].callback(B)
        self.assertEqual(self.b.sent, [])
        self.assertEqual(dict(self.counters.forwards), {"peer_not_found": 2})
        forwarder.forward(PEER_B, transportMessage(PEER_A, b"3"))
        self.assertEqual(len(never.lookups), 2)

    def test_forwardNeverRaises(self):
        def broken(peerID):
            raise RuntimeError("bug")

        self.local.localPeer = broken
        self.forwarder.forward(PEER_B, transportMessage(PEER_A))
        self.assertEqual(dict(self.counters.forwards), {"send_error": 1})
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_stop(self):
        self.forwarder.forward(PEER_B, transportMessage(PEER_A))
        self.forwarder.stop()
        self.assertEqual(self.counters.dropped["shutdown"], 1)
        self.assertEqual(waitingPackets(self.forwarder, PEER_B), 0)
        self.locator.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])


class LocateTests(ForwarderTestMixin, SynchronousTestCase):
    def test_local(self):
        self.local.peers[PEER_B] = FakePeer(PEER_B)
        self.assertTrue(self.successResultOf(self.forwarder.locate(PEER_B)))
        self.assertEqual(self.b.sent, [])

    def test_cached(self):
        self.locator.iHaveReceived(C, PEER_B, 1)
        self.assertTrue(self.successResultOf(self.forwarder.locate(PEER_B)))
        self.assertEqual(self.b.sent, [])

    def test_cachedPodWithoutStream(self):
        """
        A cached pod with no live stream does not count: the entry is dropped
        and the peer looked up again.
        """
        self.locator.iHaveReceived(B, PEER_B, 1)
        del self.streams.streams[B]
        d = self.forwarder.locate(PEER_B)
        self.assertNoResult(d)
        self.assertIsNone(self.locator.cached(PEER_B))
        self.assertEqual(self.c.sent, [frames.whoHasFrame(PEER_B)])
        self.clock.advance(0.2)
        self.assertIs(self.successResultOf(d), False)

    def test_found(self):
        d = self.forwarder.locate(PEER_B)
        self.assertNoResult(d)
        self.forwarder.frameReceived(self.c, frames.IHave(PEER_B, 1))
        self.assertIs(self.successResultOf(d), True)

    def test_notFound(self):
        d = self.forwarder.locate(PEER_B)
        self.clock.advance(0.2)
        self.assertIs(self.successResultOf(d), False)

    def test_noStreams(self):
        self.streams.streams.clear()
        self.assertIs(self.successResultOf(self.forwarder.locate(PEER_B)), False)

    def test_timeout(self):
        forwarder = Forwarder(self.streams, NeverLocator(), self.local, self.clock, self.counters)
        d = forwarder.locate(PEER_B)
        self.clock.advance(4.99)
        self.assertNoResult(d)
        self.clock.advance(0.01)
        self.assertIs(self.successResultOf(d), False)


class LookupShareTests(SynchronousTestCase):
    """
    Issue 12, item 6 and 5: one sender, or subscriptions, cannot take every
    lookup slot; the default bounds.
    """

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(NOW)
        self.streams = FakeStreams(B)
        self.b = self.streams.streams[B]
        self.counters = ClusterCounters()
        self.locator = Locator(self.streams, FakeLocalPeers(), self.clock)
        self.forwarder = Forwarder(
            self.streams, self.locator, FakeLocalPeers(), self.clock, self.counters
        )

    def test_sprayerDoesNotStarveOthers(self):
        """
        While one agent sends to 2,000 random ids, the first packets of ten
        other agents to real peers on another pod are looked up and leave.
        """
        sprayer = peerID("sprayer")
        for n in range(2000):
            self.forwarder.forward(peerID(f"random-{n}"), transportMessage(sprayer))
        self.assertEqual(self.counters.dropped["lookup_share_full"], 2000 - LOOKUPS_PER_PEER)
        self.assertEqual(len(self.b.sent), LOOKUPS_PER_PEER)
        self.b.sent.clear()
        for n in range(10):
            source, destination = peerID(f"agent-{n}"), peerID(f"remote-{n}")
            self.forwarder.forward(destination, transportMessage(source, b"first"))
            self.forwarder.frameReceived(self.b, frames.IHave(destination, 1))
        self.assertEqual(
            [frame for frame in self.b.sent if frame[0] == frames.FWD],
            [
                frames.fwdFrame(
                    peerID(f"remote-{n}"), transportMessage(peerID(f"agent-{n}"), b"first")
                )
                for n in range(10)
            ],
        )
        self.assertEqual(self.counters.dropped["lookup_queue_full"], 0)

    def test_globalBoundStillHolds(self):
        """
        Many senders together still start at most MAX_LOOKUPS lookups; the
        slots come back when lookups end.
        """
        for n in range(MAX_LOOKUPS + 10):
            self.forwarder.forward(peerID(f"random-{n}"), transportMessage(peerID(f"s-{n % 100}")))
        self.assertEqual(len(self.b.sent), MAX_LOOKUPS)
        self.assertEqual(self.counters.dropped["lookup_queue_full"], 10)
        self.clock.advance(0.2)
        self.forwarder.forward(PEER_C, transportMessage(PEER_A))
        self.assertEqual(self.b.sent[-1], frames.whoHasFrame(PEER_C))

    def test_slotReleasedOnGiveUp(self):
        forwarder = Forwarder(
            self.streams,
            NeverLocator(),
            FakeLocalPeers(),
            self.clock,
            self.counters,
            lookupsPerPeer=1,
        )
        forwarder.forward(PEER_B, transportMessage(PEER_A))
        forwarder.forward(PEER_C, transportMessage(PEER_A))
        self.assertEqual(self.counters.dropped["lookup_share_full"], 1)
        self.clock.advance(5)
        forwarder.forward(PEER_C, transportMessage(PEER_A))
        self.assertEqual(waitingPackets(forwarder, PEER_C), 1)

    def test_subscriptionLookupsBounded(self):
        """
        Subscribed ids nobody has were a WHO_HAS each without bound (9,760
        for 40 Subscribe messages); now at most SUBSCRIPTION_LOOKUPS at once,
        the rest answered "not found" at once and counted, and packets keep
        their slots.
        """
        results = [self.forwarder.locate(peerID(f"random-{n}")) for n in range(9760)]
        self.assertEqual(len(self.b.sent), SUBSCRIPTION_LOOKUPS)
        self.assertEqual(
            self.counters.dropped["subscription_lookup_share_full"], 9760 - SUBSCRIPTION_LOOKUPS
        )
        self.assertEqual(
            [self.successResultOf(d) for d in results[SUBSCRIPTION_LOOKUPS:]],
            [False] * (9760 - SUBSCRIPTION_LOOKUPS),
        )
        self.forwarder.forward(PEER_C, transportMessage(PEER_A))
        self.assertEqual(self.b.sent[-1], frames.whoHasFrame(PEER_C))
        self.clock.advance(0.2)
        self.assertEqual({self.successResultOf(d) for d in results[:SUBSCRIPTION_LOOKUPS]}, {False})
        found = self.forwarder.locate(PEER_B)
        self.forwarder.frameReceived(self.b, frames.IHave(PEER_B, 1))
        self.assertIs(self.successResultOf(found), True)

    def test_subscriptionLookupsShareWithRequester(self):
        """
        Given the subscriber, its lookups count against its own share (the
        one its packets use too), so another subscriber still gets slots.
        """
        churner, other = peerID("churner"), peerID("other")
        for n in range(100):
            self.forwarder.locate(peerID(f"random-{n}"), churner)
        self.assertEqual(len(self.b.sent), LOOKUPS_PER_PEER)
        self.assertEqual(
            self.counters.dropped["subscription_lookup_share_full"], 100 - LOOKUPS_PER_PEER
        )
        self.forwarder.forward(PEER_C, transportMessage(churner))
        self.assertEqual(self.counters.dropped["lookup_share_full"], 1)
        found = self.forwarder.locate(PEER_B, other)
        self.assertEqual(self.b.sent[-1], frames.whoHasFrame(PEER_B))
        self.forwarder.frameReceived(self.b, frames.IHave(PEER_B, 1))
        self.assertIs(self.successResultOf(found), True)
        self.clock.advance(0.2)
        self.assertEqual(self.forwarder._lookups, 0)
        self.assertEqual(self.forwarder._lookupsBy, {})

    def test_subscriptionJoinsPendingLookupFree(self):
        forwarder = Forwarder(
            self.streams,
            self.locator,
            FakeLocalPeers(),
            self.clock,
            self.counters,
            subscriptionLookups=1,
        )
        first = forwarder.locate(PEER_B)
        second = forwarder.locate(PEER_B)
        self.assertEqual(self.counters.dropped, {})
        forwarder.frameReceived(self.b, frames.IHave(PEER_B, 1))
        self.assertEqual((self.successResultOf(first), self.successResultOf(second)), (True, True))
        third = forwarder.locate(PEER_C)
        self.assertNoResult(third)


class IncomingTests(ForwarderTestMixin, SynchronousTestCase):
    def test_fwdDelivered(self):
        peer = FakePeer(PEER_B)
        other = FakePeer(PEER_A)
        self.local.peers.update({PEER_B: peer, PEER_A: other})
        message = transportMessage(PEER_C, b"\x00\xff" * 100)
        self.forwarder.frameReceived(self.b, frames.Fwd(PEER_B, message))
        self.assertEqual(peer.received, [message])
        self.assertEqual(other.received, [])

    def test_fwdNotHere(self):
        other = FakePeer(PEER_A)
        self.local.peers[PEER_A] = other
        self.forwarder.frameReceived(self.b, frames.Fwd(PEER_B, transportMessage(PEER_C)))
        self.assertEqual(other.received, [])
        self.assertEqual(dict(self.counters.dropped), {"fwd_peer_not_here": 1})
        self.assertEqual(self.b.sent, [])

    def test_hostileIDLogged(self):
        """
        The id of a FWD from another pod is logged in the peer side's
        guarded form: a 36-byte destination that is not a peer id shows as
        hex, so its newline and escape bytes never reach the log line.
        """
        logged = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        hostile = b"\n\x1b[2J" + b"\r" * 31
        self.forwarder.frameReceived(self.b, frames.Fwd(hostile, transportMessage(PEER_C)))
        self.assertEqual(dict(self.counters.dropped), {"fwd_peer_not_here": 1})
        [event] = [e for e in logged if e.get("log_namespace") == "relay.cluster.forwarder"]
        self.assertEqual(event["peer"], "invalid:" + hostile.hex())
        self.assertNotIn("\n", formatEvent(event))
        self.assertNotIn("\x1b", formatEvent(event))

    def test_fwdNotTransport(self):
        peer = FakePeer(PEER_B)
        self.local.peers[PEER_B] = peer
        for message in (b"", b"\x01\x04", b"\x01\x03" + PEER_C[:-1], b"\x02\x03" + PEER_C):
            self.forwarder.frameReceived(self.b, frames.Fwd(PEER_B, message))
        self.assertEqual(peer.received, [])
        self.assertEqual(dict(self.counters.dropped), {"fwd_not_transport": 4})

    def test_peerGoneMarksAnnouncingPod(self):
        """
        After a PEER_GONE from a pod, its answers are renewed by use (it
        will say when a peer leaves).
        """
        self.forwarder.forward(PEER_B, transportMessage(PEER_A))
        self.forwarder.frameReceived(self.b, frames.IHave(PEER_B, 1))
        self.forwarder.frameReceived(self.b, frames.PeerGone(PEER_C))
        for _ in range(4):
            self.clock.advance(200)
            self.forwarder.forward(PEER_B, transportMessage(PEER_A))
        self.assertEqual([frame[0] for frame in self.b.sent], [frames.WHO_HAS] + [frames.FWD] * 5)

    def test_fwdTooLarge(self):
        """
        A FWD embedding a message over 8820 bytes never reaches the agent.
        """
        peer = FakePeer(PEER_B)
        self.local.peers[PEER_B] = peer
        largest = transportMessage(PEER_C, b"x" * (8820 - 38))
        self.forwarder.frameReceived(self.b, frames.Fwd(PEER_B, largest + b"x"))
        self.assertEqual(peer.received, [])
        self.assertEqual(dict(self.counters.dropped), {"fwd_too_large": 1})
        self.forwarder.frameReceived(self.b, frames.Fwd(PEER_B, largest))
        self.assertEqual(peer.received, [largest])

    def test_whoHasAnswered(self):
        self.local.peers[PEER_B] = FakePeer(PEER_B, registeredAt=NOW + 1.5)
        self.forwarder.frameReceived(self.c, frames.WhoHas(PEER_B))
        self.forwarder.frameReceived(self.c, frames.WhoHas(PEER_A))
        self.assertEqual(self.c.sent, [frames.iHaveFrame(PEER_B, seqnoOf(NOW + 1.5))])
        self.assertEqual(self.b.sent, [])


class PresenceTests(ForwarderTestMixin, SynchronousTestCase):
    def test_peerConnectedAnnounced(self):
        self.locator.iHaveReceived(B, PEER_A, 1)
        peer = FakePeer(PEER_A, registeredAt=NOW + 0.07)
        self.local.peers[PEER_A] = peer
        self.forwarder.peerConnected(peer)
        expected = bytes.fromhex("020028") + PEER_A + ((NOW * 100 + 7) % 2**32).to_bytes(4, "big")
        self.assertEqual(self.b.sent, [expected])
        self.assertEqual(self.c.sent, [expected])
        self.assertIsNone(self.locator.cached(PEER_A))

    def test_peerDisconnectedAnnounced(self):
        peer = FakePeer(PEER_A)
        self.forwarder.peerDisconnected(peer)
        self.assertEqual(self.b.sent, [b"\x03\x00\x24" + PEER_A])
        self.assertEqual(self.c.sent, [b"\x03\x00\x24" + PEER_A])

    def test_replacedPeerNotGone(self):
        old, new = FakePeer(PEER_A), FakePeer(PEER_A)
        self.local.peers[PEER_A] = new
        self.forwarder.peerDisconnected(old)
        self.assertEqual(self.b.sent, [])

    def test_snapshotOnStreamUp(self):
        self.local.peers[PEER_A] = FakePeer(PEER_A, registeredAt=NOW)
        self.local.peers[PEER_B] = FakePeer(PEER_B, registeredAt=NOW + 1)
        self.forwarder.streamUp(self.c)
        self.assertEqual(
            sorted(self.c.sent),
            sorted(
                [
                    frames.iHaveFrame(PEER_A, seqnoOf(NOW)),
                    frames.iHaveFrame(PEER_B, seqnoOf(NOW + 1)),
                ]
            ),
        )
        self.assertEqual(self.b.sent, [])

    def test_streamDownInvalidates(self):
        self.locator.iHaveReceived(B, PEER_A, 1)
        self.locator.iHaveReceived(C, PEER_B, 1)
        self.forwarder.streamDown(self.b)
        self.assertIsNone(self.locator.cached(PEER_A))
        self.assertEqual(self.locator.cached(PEER_B), C)

    def test_unsolicitedIHave(self):
        """
        Only a new owner is announced to the relay, not every repeat.
        """
        self.forwarder.frameReceived(self.b, frames.IHave(PEER_A, 1))
        self.assertEqual(self.local.online, [PEER_A])
        self.forwarder.frameReceived(self.b, frames.IHave(PEER_A, 2))
        self.assertEqual(self.local.online, [PEER_A])
        self.forwarder.frameReceived(self.c, frames.IHave(PEER_A, 3))
        self.assertEqual(self.local.online, [PEER_A, PEER_A])
        self.assertEqual(self.locator.cached(PEER_A), C)
        self.forwarder.frameReceived(self.b, frames.IHave(PEER_A, 2))
        self.assertEqual(self.local.online, [PEER_A, PEER_A])
        self.assertEqual(self.locator.cached(PEER_A), C)

    def test_answerNotAnnounced(self):
        d = self.locator.lookup(PEER_A)
        self.forwarder.frameReceived(self.b, frames.IHave(PEER_A, 1))
        self.assertEqual(self.successResultOf(d), B)
        self.assertEqual(self.local.online, [])

    def test_peerGoneFromOwner(self):
        self.forwarder.frameReceived(self.b, frames.IHave(PEER_A, 1))
        self.forwarder.frameReceived(self.b, frames.PeerGone(PEER_A))
        self.assertIsNone(self.locator.cached(PEER_A))
        self.assertEqual(self.local.gone, [PEER_A])

    def test_peerGoneUnknown(self):
        self.forwarder.frameReceived(self.b, frames.PeerGone(PEER_A))
        self.assertEqual(self.local.gone, [PEER_A])

    def test_peerGoneAfterMove(self):
        """
        The old pod's PEER_GONE arriving after the new pod's I_HAVE neither
        drops the new owner nor reports the peer offline.
        """
        self.forwarder.frameReceived(self.b, frames.IHave(PEER_A, 1))
        self.forwarder.frameReceived(self.c, frames.IHave(PEER_A, 2))
        self.forwarder.frameReceived(self.b, frames.PeerGone(PEER_A))
        self.assertEqual(self.locator.cached(PEER_A), C)
        self.assertEqual(self.local.gone, [])


def makePod(address, clock, local):
    counters = ClusterCounters()
    streams = ClusterStreams(address, "cluster-secret", clock, counters, FakeEndpoints())
    locator = Locator(streams, local, clock)
    forwarder = Forwarder(streams, locator, local, clock, counters)
    streams.handler = forwarder
    return streams, forwarder, counters


class TwoPodTests(SynchronousTestCase):
    """
    Two pods over a real stream pair, bytes pumped in memory.
    """

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(NOW)
        self.peerA = FakePeer(PEER_A, registeredAt=NOW - 10)
        self.peerB = FakePeer(PEER_B, registeredAt=NOW - 5)
        self.localA = FakeLocalPeers(self.peerA)
        self.localB = FakeLocalPeers(self.peerB)
        self.podA, self.fwdA, self.countersA = makePod("10.0.0.1:7090", self.clock, self.localA)
        self.podB, self.fwdB, self.countersB = makePod("10.0.0.2:7090", self.clock, self.localB)
        self.podA.dial("10.0.0.2:7090")
        endpoint = self.podA.endpointFactory.made[0]
        self.wire = Wire(
            endpoint.factory.buildProtocol(None), self.podB.serverFactory().buildProtocol(None)
        )
        self.wire.connect()
        endpoint.result.callback(self.wire.dialer)
        self.wire.pump()

    def test_snapshotBothWays(self):
        self.assertEqual(self.localA.online, [PEER_B])
        self.assertEqual(self.localB.online, [PEER_A])
        self.assertEqual(self.fwdA.locator.cached(PEER_B), "10.0.0.2:7090")
        self.assertEqual(self.fwdB.locator.cached(PEER_A), "10.0.0.1:7090")

    def test_forwardByteForByte(self):
        sent = b"\x01\x03" + PEER_A + b"wireguard packet"
        self.fwdA.forward(PEER_B, sent)
        self.wire.pump()
        self.assertEqual(self.peerB.received, [sent])
        self.assertEqual(self.peerA.received, [])
        self.assertEqual(dict(self.countersA.forwards), {"ok": 1})

    def test_lookupAcrossPods(self):
        """
        Without presence push (an original sibling), the first packet waits
        for WHO_HAS / I_HAVE and then goes out.
        """
        self.fwdA.locator.invalidate(PEER_B)
        sent = b"\x01\x03" + PEER_A + b"first"
        self.fwdA.forward(PEER_B, sent)
        self.assertEqual(self.peerB.received, [])
        self.wire.pump()
        self.assertEqual(self.peerB.received, [sent])
        self.assertEqual(self.fwdA.locator.cached(PEER_B), "10.0.0.2:7090")

    def test_departure(self):
        del self.localB.peers[PEER_B]
        self.fwdB.peerDisconnected(self.peerB)
        self.wire.pump()
        self.assertEqual(self.localA.gone, [PEER_B])
        self.assertIsNone(self.fwdA.locator.cached(PEER_B))
        peerC = FakePeer(PEER_C, registeredAt=NOW)
        self.localB.peers[PEER_C] = peerC
        self.fwdB.peerConnected(peerC)
        self.wire.pump()
        self.assertEqual(self.localA.online, [PEER_B, PEER_C])

    def test_streamEndForgetsPod(self):
        self.wire.dialer.close()
        self.wire.pump()
        self.assertEqual(self.podA.streamCount(), 0)
        self.assertEqual(self.podB.streamCount(), 0)
        self.assertIsNone(self.fwdA.locator.cached(PEER_B))
        self.fwdA.forward(PEER_B, b"\x01\x03" + PEER_A)
        self.assertEqual(dict(self.countersA.forwards), {"peer_not_found": 1})

    def test_keepaliveBetweenNewPods(self):
        """
        Two pods of this kind answer each other's PINGs, so both become
        subject to the PONG deadline.
        """
        self.clock.advance(15)
        self.wire.pump()
        self.assertTrue(self.wire.dialer.answersPing)
        self.assertTrue(self.wire.acceptor.answersPing)
        self.assertEqual((self.countersA.pingsSent, self.countersA.pingsLost), (1, 0))
        self.clock.advance(15)
        self.clock.advance(10)
        self.assertEqual(self.countersA.pingsLost, 1)
        self.assertTrue(self.wire.dialerTransport.disconnecting)
