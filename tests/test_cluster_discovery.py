"""
Tests for L{relay.cluster.discovery}: passes, self filtering, comma-separated
names and IP literals, re-dials with backoff, DNS failures, readiness.
"""

from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IHostnameResolver
from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from relay.cluster.discovery import Discovery

PORT = 7090


@implementer(IHostnameResolver)
class FakeResolver:
    """
    Answers from a table at once; names listed in C{hold} wait for the test.
    """

    def __init__(self, table=None):
        self.table = table or {}
        self.asked = []
        self.held = {}
        self.hold = set()
        self.fail = False

    def resolveHostName(
        self, receiver, hostName, portNumber=0, addressTypes=None, transportSemantics="TCP"
    ):
        self.asked.append(hostName)
        if self.fail:
            raise RuntimeError("resolver broken")
        receiver.resolutionBegan(None)
        if hostName in self.hold:
            self.held[hostName] = receiver
            return None
        for host in self.table.get(hostName, []):
            kind = IPv6Address if ":" in host else IPv4Address
            receiver.addressResolved(kind("TCP", host, portNumber))
        receiver.resolutionComplete()
        return None


class FakeStreams:
    """
    The part of a ClusterStreams that discovery uses.
    """

    def __init__(self, announceAddress="10.0.0.1:7090"):
        self.announceAddress = announceAddress
        self.live = set()
        self.dials = []
        self.pending = {}

    def stream(self, address):
        return object() if address in self.live else None

    def isDialing(self, address):
        return address in self.pending

    def dial(self, address):
        self.dials.append(address)
        d = defer.Deferred()
        self.pending[address] = d
        return d

    def connect(self, address):
        self.live.add(address)
        self.pending.pop(address).callback(object())

    def refuse(self, address):
        self.pending.pop(address).errback(ConnectionRefusedError())


def makeDiscovery(headless="relay-internal", table=None, podIP="10.0.0.1", interval=10.0):
    clock = Clock()
    resolver = FakeResolver(
        table if table is not None else {"relay-internal": ["10.0.0.1", "10.0.0.2", "10.0.0.3"]}
    )
    streams = FakeStreams(f"{podIP}:{PORT}" if ":" not in podIP else f"[{podIP}]:{PORT}")
    discovery = Discovery(headless, PORT, podIP, streams, resolver, clock, interval=interval)
    return discovery, streams, resolver, clock


class PassTests(SynchronousTestCase):
    def test_firstPassAtOnce(self):
        discovery, streams, resolver, clock = makeDiscovery()
        self.assertFalse(discovery.hasRun)
        discovery.start()
        self.assertEqual(resolver.asked, ["relay-internal"])
        self.assertEqual(streams.dials, ["10.0.0.2:7090", "10.0.0.3:7090"])
        self.assertTrue(discovery.hasRun)
        self.assertEqual(discovery.known, {"10.0.0.2:7090", "10.0.0.3:7090"})
        discovery.stop()

    def test_hasRunAfterResolution(self):
        discovery, streams, resolver, clock = makeDiscovery()
        resolver.hold.add("relay-internal")
        discovery.start()
        self.assertFalse(discovery.hasRun)
        receiver = resolver.held.pop("relay-internal")
        receiver.addressResolved(IPv4Address("TCP", "10.0.0.2", 0))
        receiver.resolutionComplete()
        self.assertTrue(discovery.hasRun)
        self.assertEqual(streams.dials, ["10.0.0.2:7090"])
        discovery.stop()

    def test_interval(self):
        discovery, streams, resolver, clock = makeDiscovery()
        discovery.start()
        clock.advance(9.9)
        self.assertEqual(len(resolver.asked), 1)
        clock.advance(0.1)
        self.assertEqual(len(resolver.asked), 2)
        clock.advance(10)
        self.assertEqual(len(resolver.asked), 3)
        discovery.stop()
        clock.advance(100)
        self.assertEqual(len(resolver.asked), 3)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_liveAndDialingSkipped(self):
        """
        Addresses with a live stream or a dial in progress are not dialed.
        """
        discovery, streams, resolver, clock = makeDiscovery()
        discovery.start()
        streams.connect("10.0.0.2:7090")
        clock.advance(10)
        self.assertEqual(streams.dials, ["10.0.0.2:7090", "10.0.0.3:7090"])
        discovery.stop()

    def test_redialDroppedStream(self):
        """
        Beyond the original: an address still listed whose stream ended is
        dialed again.
        """
        discovery, streams, resolver, clock = makeDiscovery()
        discovery.start()
        streams.connect("10.0.0.2:7090")
        streams.connect("10.0.0.3:7090")
        clock.advance(10)
        self.assertEqual(len(streams.dials), 2)
        streams.live.discard("10.0.0.3:7090")
        clock.advance(10)
        self.assertEqual(streams.dials[2:], ["10.0.0.3:7090"])
        discovery.stop()

    def test_commaSeparatedNamesAndLiterals(self):
        discovery, streams, resolver, clock = makeDiscovery(
            headless=" relay-a , 10.0.0.9,relay-b,,10.0.0.1, fd00::7",
            table={"relay-a": ["10.0.0.2"], "relay-b": ["10.0.0.3", "10.0.0.2"]},
        )
        discovery.start()
        self.assertEqual(resolver.asked, ["relay-a", "relay-b"])
        self.assertEqual(
            streams.dials, ["10.0.0.2:7090", "10.0.0.3:7090", "10.0.0.9:7090", "[fd00::7]:7090"]
        )
        discovery.stop()

    def test_ipv6SelfFiltered(self):
        discovery, streams, resolver, clock = makeDiscovery(
            table={"relay-internal": ["fd00:0::1", "fd00::2"]}, podIP="fd00::1"
        )
        discovery.start()
        self.assertEqual(streams.dials, ["[fd00::2]:7090"])
        discovery.stop()

    def test_ownAnnounceAddressNotDialed(self):
        discovery, streams, resolver, clock = makeDiscovery(
            table={"relay-internal": ["10.0.0.2"]}, podIP="10.0.0.99"
        )
        streams.announceAddress = "10.0.0.2:7090"
        discovery.start()
        self.assertEqual(streams.dials, [])
        discovery.stop()


class BackoffTests(SynchronousTestCase):
    def test_backoff(self):
        """
        After n failed dials in a row the address waits interval * 2**(n-1)
        (at most 160 s) from the last dial.
        """
        discovery, streams, resolver, clock = makeDiscovery(table={"relay-internal": ["10.0.0.2"]})
        discovery.start()
        dialTimes = [clock.seconds()]
        streams.refuse("10.0.0.2:7090")
        for _i in range(80):
            clock.advance(10)
            if streams.pending:
                dialTimes.append(clock.seconds())
                streams.refuse("10.0.0.2:7090")
        gaps = [b - a for a, b in zip(dialTimes, dialTimes[1:])]
        self.assertEqual(gaps[:7], [10, 20, 40, 80, 160, 160, 160])
        discovery.stop()

    def test_shortLivedStreamsBackOff(self):
        """
        A dial that connects but whose stream is gone by the next pass (a
        sibling refusing our HELLO) backs off like a refused dial.
        """
        discovery, streams, resolver, clock = makeDiscovery(table={"relay-internal": ["10.0.0.2"]})
        discovery.start()
        dialTimes = []
        for _i in range(80):
            if streams.pending:
                dialTimes.append(clock.seconds())
                streams.connect("10.0.0.2:7090")
                streams.live.clear()
            clock.advance(10)
        gaps = [b - a for a, b in zip(dialTimes, dialTimes[1:])]
        self.assertEqual(gaps[:6], [10, 20, 40, 80, 160, 160])
        discovery.stop()

    def test_liveAtAPassResets(self):
        discovery, streams, resolver, clock = makeDiscovery(table={"relay-internal": ["10.0.0.2"]})
        discovery.start()
        streams.refuse("10.0.0.2:7090")
        clock.advance(10)
        streams.refuse("10.0.0.2:7090")
        clock.advance(30)
        streams.connect("10.0.0.2:7090")
        clock.advance(10)
        streams.live.clear()
        clock.advance(10)
        self.assertIn("10.0.0.2:7090", streams.pending)
        discovery.stop()

    def test_vanishedAddressForgotten(self):
        discovery, streams, resolver, clock = makeDiscovery(table={"relay-internal": ["10.0.0.2"]})
        discovery.start()
        streams.refuse("10.0.0.2:7090")
        clock.advance(10)
        streams.refuse("10.0.0.2:7090")
        resolver.table["relay-internal"] = []
        clock.advance(10)
        resolver.table["relay-internal"] = ["10.0.0.2"]
        clock.advance(10)
        self.assertIn("10.0.0.2:7090", streams.pending)
        discovery.stop()


class FailureTests(SynchronousTestCase):
    def test_noAddresses(self):
        discovery, streams, resolver, clock = makeDiscovery(table={})
        discovery.start()
        self.assertTrue(discovery.hasRun)
        self.assertEqual(streams.dials, [])
        resolver.table["relay-internal"] = ["10.0.0.2"]
        clock.advance(10)
        self.assertEqual(streams.dials, ["10.0.0.2:7090"])
        discovery.stop()

    def test_resolverRaises(self):
        discovery, streams, resolver, clock = makeDiscovery()
        resolver.fail = True
        discovery.start()
        self.assertTrue(discovery.hasRun)
        self.assertEqual(streams.dials, [])
        resolver.fail = False
        clock.advance(10)
        self.assertEqual(streams.dials, ["10.0.0.2:7090", "10.0.0.3:7090"])
        discovery.stop()

    def test_resolutionTimesOut(self):
        """
        A resolution that never completes is given up after half an
        interval; the other names still count and passes go on.
        """
        discovery, streams, resolver, clock = makeDiscovery(
            headless="slow,fast", table={"fast": ["10.0.0.3"]}
        )
        resolver.hold.add("slow")
        discovery.start()
        self.assertFalse(discovery.hasRun)
        clock.advance(4.9)
        self.assertFalse(discovery.hasRun)
        clock.advance(0.1)
        self.assertTrue(discovery.hasRun)
        self.assertEqual(streams.dials, ["10.0.0.3:7090"])
        late = resolver.held.pop("slow")
        late.addressResolved(IPv4Address("TCP", "10.0.0.2", 0))
        late.resolutionComplete()
        self.assertEqual(streams.dials, ["10.0.0.3:7090"])
        resolver.hold.clear()
        resolver.table["slow"] = ["10.0.0.2"]
        clock.advance(10)
        self.assertEqual(streams.dials, ["10.0.0.3:7090", "10.0.0.2:7090"])
        discovery.stop()


class FailureLogTests(SynchronousTestCase):
    """
    DNS failures are logged at warn (they were at debug only), at most once
    a minute per name while they last, and their end at info.
    """

    def setUp(self):
        self.logged = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)

    def levels(self):
        return [
            e["log_level"]
            for e in self.logged
            if e.get("log_namespace") == "relay.cluster.discovery"
            and "resolv" in e["log_format"] + e.get("why", "")
        ]

    def test_warnRateLimited(self):
        discovery, streams, resolver, clock = makeDiscovery(
            headless="relay-internal,empty", table={"relay-internal": ["10.0.0.2"]}
        )
        resolver.fail = True
        discovery.start()
        for _ in range(5):
            clock.advance(10)
        self.assertEqual(self.levels(), [LogLevel.warn, LogLevel.warn])
        [first, second] = [e for e in self.logged if e["log_level"] == LogLevel.warn]
        self.assertEqual({first["name"], second["name"]}, {"relay-internal", "empty"})
        self.assertIn("resolver broken", first["why"])
        clock.advance(10)
        self.assertEqual(self.levels(), [LogLevel.warn] * 4)
        self.assertEqual(self.logged[-1]["count"], 7)
        resolver.fail = False
        clock.advance(10)
        # relay-internal works again; "empty" lists nothing, still failing.
        self.assertEqual(self.levels(), [LogLevel.warn] * 4 + [LogLevel.info])
        discovery.stop()
