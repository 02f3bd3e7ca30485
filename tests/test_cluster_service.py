"""
Tests for L{relay.cluster.service}: the fabric's pieces wired on a memory
reactor, listening, discovery, delegation and stop.
"""

from twisted.internet.error import CannotListenError, ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from relay.cluster import frames
from relay.cluster.locator import LOOKUP_TIMEOUT, seqnoOf
from relay.cluster.service import ClusterService
from relay.cluster.streams import ClusterStream
from relay.config import ClusterConfig
from relay.counters import ClusterCounters
from relay.endpoints import LISTEN_BACKLOG
from relay.interfaces import ICrossPodForwarder
from tests.test_cluster_discovery import FakeResolver
from tests.test_cluster_forwarder import NOW, PEER_A, PEER_B, PEER_C
from tests.test_cluster_locator import FakeLocalPeers, FakePeer
from tests.test_cluster_streams import answer


class ClusterServiceTests(SynchronousTestCase):
    """
    L{relay.cluster.service.ClusterService} wired on a memory reactor.
    """

    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.reactor.advance(NOW)
        self.local = FakeLocalPeers(FakePeer(PEER_A))
        self.counters = ClusterCounters()
        self.logged = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)

    def makeService(
        self,
        listen=("0.0.0.0", 7090),
        secret="cluster-secret",
        headless="10.0.0.1,10.0.0.2",
        compat=False,
        **kwargs,
    ):
        config = ClusterConfig(
            headless=headless,
            podIP="10.0.0.1",
            port=7090,
            listen=listen,
            secret=secret,
            discoveryInterval=10.0,
            compat=compat,
        )
        return ClusterService(config, self.local, self.counters, self.reactor, **kwargs)

    def liveStream(self, service):
        """
        Start C{service} and bring up its stream to 10.0.0.2.
        """
        service.startService()
        [(host, port, clientFactory, timeout, bindAddress)] = self.reactor.tcpClients
        stream = clientFactory.buildProtocol(None)
        tr = StringTransport()
        stream.makeConnection(tr)
        answer(stream, tr)
        self.assertEqual(service.streamCount(), 1)
        return stream, tr

    def warnings(self):
        return [
            e
            for e in self.logged
            if e.get("log_level") == LogLevel.warn
            and e.get("log_namespace", "").startswith("relay.cluster")
        ]

    def test_interfaces(self):
        service = self.makeService()
        verifyObject(ICrossPodForwarder, service)
        self.assertEqual(service.announceAddress, "10.0.0.1:7090")

    def test_start(self):
        service = self.makeService()
        service.startService()
        [(port, factory, backlog, interface)] = self.reactor.tcpServers
        self.assertEqual((port, interface), (7090, "0.0.0.0"))
        self.assertIsNotNone(service.port)
        [(host, port, clientFactory, timeout, bindAddress)] = self.reactor.tcpClients
        self.assertEqual((host, port), ("10.0.0.2", 7090))
        # Discovery ran its first pass at start (IP literals resolve at once).
        self.assertIsNone(self.successResultOf(service.whenDiscoveryRan()))
        self.assertEqual(service.streamCount(), 0)
        self.assertEqual(self.warnings(), [])
        self.assertEqual(bindAddress, ("10.0.0.1", 0))
        stream = clientFactory.buildProtocol(None)
        tr = StringTransport()
        stream.makeConnection(tr)
        hello = frames.helloFrame("10.0.0.1:7090", NOW, "cluster-secret")
        self.assertEqual(tr.value()[: len(hello)], hello)
        self.assertEqual(service.streamCount(), 0)
        handshake = answer(stream, tr)
        [_, (frameType, payload)] = frames.FrameReader().feed(tr.value())
        self.assertEqual(
            frames.encodeFrame(
                frameType, frames.Opener(handshake.dialerKey).open(frameType, payload)
            ),
            frames.iHaveFrame(PEER_A, seqnoOf(NOW)),
        )
        self.assertEqual(service.streamCount(), 1)
        accepted = factory.buildProtocol(None)
        self.assertIsInstance(accepted, ClusterStream)

    def test_cannotListen(self):
        service = self.makeService()

        def refuse(port, factory, backlog=50, interface=""):
            raise CannotListenError(interface, port, OSError(98, "Address already in use"))

        self.reactor.listenTCP = refuse
        self.assertRaises(CannotListenError, service.startService)
        self.assertFalse(service.running)
        self.assertEqual(self.reactor.tcpClients, [])
        [critical] = [e for e in self.logged if e.get("log_level") == LogLevel.critical]
        self.assertIn("Address already in use", critical["reason"])

    def test_whenDiscoveryRan(self):
        service = self.makeService(headless="relay-internal")
        service.discovery.resolver = FakeResolver({"relay-internal": ["10.0.0.2"]})
        service.discovery.resolver.hold.add("relay-internal")
        d = service.whenDiscoveryRan()
        service.startService()
        self.assertNoResult(d)
        self.assertNoResult(service.whenDiscoveryRan())
        service.discovery.resolver.held["relay-internal"].resolutionComplete()
        self.assertIsNone(self.successResultOf(d))
        self.assertIsNone(self.successResultOf(service.whenDiscoveryRan()))

    def test_lookupObserver(self):
        """
        The observer given at construction is told how long each WHO_HAS
        lookup took (the metrics' histogram in the relay).
        """
        durations = []
        service = self.makeService(lookupObserver=durations.append)
        self.liveStream(service)
        d = service.locate(PEER_B)
        self.assertNoResult(d)
        self.assertEqual(durations, [])
        self.reactor.advance(LOOKUP_TIMEOUT)
        self.assertIs(self.successResultOf(d), False)
        [duration] = durations
        self.assertAlmostEqual(duration, LOOKUP_TIMEOUT, places=5)

    def test_emptySecretWarns(self):
        service = self.makeService(secret="")
        service.startService()
        [warning] = self.warnings()
        self.assertIn("NO CLUSTER SECRET", warning["log_format"])

    def test_compatWarns(self):
        """
        Compatibility mode from the configuration reaches the streams and
        is warned about at start.
        """
        service = self.makeService(compat=True)
        self.assertTrue(service.streams.compat)
        self.assertFalse(self.makeService().streams.compat)
        service.startService()
        [warning] = self.warnings()
        self.assertIn("compatibility mode", warning["log_format"])

    def test_listenAddresses(self):
        """
        The configured C{(host, port)} is listened on through the relay's
        one listener builder, with its backlog, and logged as C{host:port}.
        """
        for listen, expected, logged in (
            (("10.0.0.1", 7095), (7095, "10.0.0.1"), "10.0.0.1:7095"),
            (("", 7096), (7096, "0.0.0.0"), "0.0.0.0:7096"),
            (("::", 7097), (7097, "::"), "[::]:7097"),
        ):
            self.reactor.tcpServers.clear()
            del self.logged[:]
            service = self.makeService(listen=listen, headless="10.0.0.1")
            service.startService()
            [(port, factory, backlog, interface)] = self.reactor.tcpServers
            self.assertEqual((port, interface, backlog), expected + (LISTEN_BACKLOG,))
            [line] = [
                e
                for e in self.logged
                if e.get("log_format", "").startswith("cluster: listening on")
            ]
            self.assertEqual(line["listen"], logged)
            self.successResultOf(service.stopService())

    def test_delegates(self):
        service = self.makeService(headless="10.0.0.1")
        service.startService()
        service.forward(PEER_B, b"\x01\x03" + PEER_A)
        self.assertEqual(dict(self.counters.forwards), {"peer_not_found": 1})
        self.assertIs(self.successResultOf(service.locate(PEER_B)), False)
        self.assertIs(self.successResultOf(service.locate(PEER_A)), True)
        service.peerConnected(FakePeer(PEER_C))
        service.peerDisconnected(FakePeer(PEER_C))

    def test_stop(self):
        service = self.makeService()
        service.startService()
        [(host, port, clientFactory, timeout, bindAddress)] = self.reactor.tcpClients
        stream = clientFactory.buildProtocol(None)
        tr = StringTransport()
        stream.makeConnection(tr)
        d = service.stopService()
        self.assertTrue(tr.disconnecting)
        self.assertNoResult(d)
        stream.connectionLost(ConnectionDone())
        self.assertIsNone(self.successResultOf(d))
        self.assertIsNone(service.port)
        self.reactor.advance(60)
        self.assertEqual(len(self.reactor.tcpClients), 1)
