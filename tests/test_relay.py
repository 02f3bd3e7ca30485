"""
L{relay.relay}: the L{Relay}'s interface for sessions (what a handshake
asks it), its collaborators given at construction, and L{LocalPeers}, the
fabric's view of this pod's peers.
"""

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from relay import messages as m
from relay.auth import AuthError, generateToken
from relay.interfaces import ILocalPeers, IRelay
from relay.limits import Limits, LogBudget
from relay.peer import PeerSession
from relay.relay import LocalPeers
from tests.helpers import NOW, SECRET, FakeLink, authMessage, connect, makeRelay, stamped


class _Forwarder:
    def __init__(self):
        self.connected = []

    def peerConnected(self, peer):
        self.connected.append(peer.peerID)

    def peerDisconnected(self, peer):
        pass


class CollaboratorTests(SynchronousTestCase):
    def test_givenAtConstruction(self):
        forwarder, budget, times = _Forwarder(), LogBudget(Clock()), []
        limits = Limits(maxPeers=3)
        relay = makeRelay(
            Clock(),
            limits=limits,
            forwarder=forwarder,
            noisyLog=budget,
            recordAuthenticationTime=times.append,
        )
        self.assertIs(relay.limits, limits)
        self.assertIs(relay.admission.limits, limits)
        self.assertIs(relay.noisyLog, budget)
        connect(relay, "peer-a")
        self.assertEqual(forwarder.connected, [m.peerID("peer-a")])
        self.assertEqual(len(times), 1)

    def test_defaults(self):
        relay = makeRelay(Clock())
        self.assertIsNone(relay.forwarder)
        self.assertEqual(relay.limits.maxPeers, 0)


class HandshakeInterfaceTests(SynchronousTestCase):
    def setUp(self):
        self.relay = makeRelay(Clock(), limits=Limits(maxPeers=1))

    def test_providesIRelay(self):
        """
        The relay has every method and attribute sessions are promised
        (L{IRelay}), with the methods' signatures.
        """
        self.assertTrue(verifyObject(IRelay, self.relay))

    def test_validatorPrivate(self):
        """
        Tokens are checked through L{Relay.authenticate}; the validator
        itself is not handed out.
        """
        self.assertFalse(hasattr(self.relay, "validator"))

    def test_authenticate(self):
        self.relay.authenticate(generateToken(SECRET, NOW + 60))
        e = self.assertRaises(AuthError, self.relay.authenticate, generateToken("other", NOW + 60))
        self.assertTrue(e.reason)

    def test_refusal(self):
        a = m.peerID("peer-a")
        self.assertIsNone(self.relay.refusal(a))
        connect(self.relay, "peer-a")
        self.assertEqual(self.relay.peerCount(), 1)
        # The limit is reached for anyone else, not for peer-a reconnecting.
        self.assertEqual(self.relay.refusal(m.peerID("peer-b")), "max_peers")
        self.assertIsNone(self.relay.refusal(a))
        self.relay.draining = True
        self.assertEqual(self.relay.refusal(a), "draining")

    def test_admitSubscriptions(self):
        session, _ = connect(self.relay, "peer-a")
        limit = self.relay.maxSubscriptions
        self.assertEqual(limit, self.relay.store.maxSubscriptions)
        ids = [m.peerID(f"p{i}") for i in range(limit + 2)]
        admitted, refused = self.relay.admitSubscriptions(session, ids)
        self.assertEqual((len(admitted), refused), (limit, 2))


class LocalPeersTests(SynchronousTestCase):
    def test_view(self):
        relay = makeRelay(Clock())
        peers = LocalPeers(relay.store)
        verifyObject(ILocalPeers, peers)
        session, _ = connect(relay, "peer-a")
        a, b = m.peerID("peer-a"), m.peerID("peer-b")
        self.assertIs(peers.localPeer(a), session)
        self.assertIsNone(peers.localPeer(b))
        self.assertEqual(peers.localPeers(), [session])

    def test_presenceElsewhere(self):
        relay = makeRelay(Clock())
        peers = LocalPeers(relay.store)
        watcher, link = connect(relay, "watcher")
        b = m.peerID("peer-b")
        relay.subscribe(watcher, [b])
        link.take()
        peers.peerOnlineElsewhere(b)
        self.assertEqual(link.take(), m.encodeIDList(m.PEERS_ONLINE, [b]))
        peers.peerGoneElsewhere(b)
        self.assertEqual(link.take(), m.encodeIDList(m.PEERS_WENT_OFFLINE, [b]))


class _TellingLink(FakeLink):
    """
    A link that wants to hear of its messages dropped, as a WebSocket one.
    """

    def __init__(self, address="192.0.2.1:40000"):
        super().__init__(address)
        self.drops = []

    def messageDropped(self, destination, size):
        self.drops.append((destination, size))


class RouteTests(SynchronousTestCase):
    """
    L{Relay.route} tells the sender's C{dropped} of a refusal by a local
    destination, and of nothing else.
    """

    def setUp(self):
        self.relay = makeRelay(Clock())
        self.b, self.linkB = connect(self.relay, "peer-b")
        self.told = []

    def dropped(self, destination, size):
        self.told.append((destination, size))

    def test_refusalTold(self):
        self.linkB.accept = False
        self.relay.route(m.peerID("peer-b"), b"stamped", self.dropped)
        self.assertEqual(self.told, [(self.b, 7)])
        self.assertEqual(self.relay.counters.transferSentBytes, 0)

    def test_deliveryNotTold(self):
        self.relay.route(m.peerID("peer-b"), b"stamped", self.dropped)
        self.assertEqual(self.told, [])
        self.assertEqual(self.linkB.take(), [b"stamped"])
        self.assertEqual(self.relay.counters.transferSentBytes, 7)

    def test_unknownPeerNotTold(self):
        self.relay.route(m.peerID("nobody"), b"stamped", self.dropped)
        self.assertEqual(self.told, [])
        self.assertEqual(self.relay.counters.dropped["unknown_peer"], 1)

    def test_withoutSender(self):
        self.linkB.accept = False
        self.relay.route(m.peerID("peer-b"), b"stamped")
        self.assertEqual(self.relay.counters.transferSentBytes, 0)

    def test_sessionHandsItsLinksMessageDropped(self):
        """
        A session routes its Transport messages with its link's
        C{messageDropped}; a link without one is told nothing.
        """
        link = _TellingLink()
        a = PeerSession(self.relay, link)
        a.messageReceived(authMessage("peer-a"))
        self.linkB.accept = False
        message = m.encodeTransport(m.peerID("peer-b"), b"x" * 100)
        a.messageReceived(message)
        self.assertEqual(link.drops, [(self.b, len(stamped(message, m.peerID("peer-a"))))])
        plain, _ = connect(self.relay, "peer-c")
        plain.messageReceived(message)
        self.assertEqual(len(link.drops), 1)
