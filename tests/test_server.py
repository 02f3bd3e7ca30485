"""
L{relay.server}: the L{Relay}'s interface for sessions (what a handshake
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
from relay.server import LocalPeers
from tests.helpers import NOW, SECRET, connect, makeRelay


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
        relay = makeRelay(Clock(), limits=limits, forwarder=forwarder, noisyLog=budget, recordAuthenticationTime=times.append)
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
