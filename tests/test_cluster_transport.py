"""
Tests for L{relay.cluster.transport}: HELLO handshake and every rejection
reason, one stream per pod (simultaneous dials), PING/PONG keepalive and its
compatibility rule, bounded writes, dialing.
"""

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from relay.cluster import frames, transport
from relay.counters import ClusterCounters

NOW = 1893456000
SECRET = "cluster-secret"
PEER_A = frames.peerIDOf("peer-a")
PEER_B = frames.peerIDOf("peer-b")


class RecordingHandler:
    """
    An L{transport.IStreamHandler} that records what it is told.
    """

    def __init__(self):
        self.events = []

    def streamUp(self, stream):
        self.events.append(("up", stream))

    def streamDown(self, stream):
        self.events.append(("down", stream))

    def frameReceived(self, stream, frame):
        self.events.append(("frame", stream, frame))

    def frames(self):
        return [e[2] for e in self.events if e[0] == "frame"]


class FakeEndpoint:
    """
    A client endpoint whose connection attempt the test completes by hand.
    """

    def __init__(self, address):
        self.address = address
        self.factory = None
        self.result = defer.Deferred()

    def connect(self, factory):
        self.factory = factory
        return self.result


class FakeEndpoints:
    def __init__(self):
        self.made = []

    def __call__(self, address):
        endpoint = FakeEndpoint(address)
        self.made.append(endpoint)
        return endpoint


def makeTransport(address="10.0.0.1:7090", secret=SECRET, clock=None, counters=None, handler=None, **kw):
    if clock is None:
        clock = Clock()
        clock.advance(NOW)
    return transport.ClusterTransport(
        address,
        secret,
        clock,
        counters if counters is not None else ClusterCounters(),
        FakeEndpoints(),
        handler=handler if handler is not None else RecordingHandler(),
        **kw,
    )


def accept(owner, peerHost="10.0.0.9"):
    """
    An accepted stream on C{owner} with a string transport.
    """
    proto = owner.serverFactory().buildProtocol(IPv4Address("TCP", peerHost, 40000))
    tr = StringTransport(peerAddress=IPv4Address("TCP", peerHost, 40000))
    proto.makeConnection(tr)
    return proto, tr


def lose(proto, tr=None):
    proto.connectionLost(ConnectionDone())


class Wire:
    """
    Two protocols joined back to back by string transports; L{pump} moves
    bytes both ways until quiet and delivers disconnections.
    """

    def __init__(self, dialer, acceptor):
        self.dialer = dialer
        self.acceptor = acceptor
        self.dialerTransport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.2", 7090))
        self.acceptorTransport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.1", 40000))
        self.lost = False

    def connect(self):
        self.dialer.makeConnection(self.dialerTransport)
        self.acceptor.makeConnection(self.acceptorTransport)

    def pump(self):
        moved = True
        while moved and not self.lost:
            moved = False
            for source, target in (
                (self.dialerTransport, self.acceptor),
                (self.acceptorTransport, self.dialer),
            ):
                data = source.value()
                if data:
                    source.clear()
                    target.dataReceived(data)
                    moved = True
            if self.dialerTransport.disconnecting or self.acceptorTransport.disconnecting:
                self.lost = True
                self.dialer.connectionLost(ConnectionDone())
                self.acceptor.connectionLost(ConnectionDone())


def dialedStream(owner, address):
    """
    Dial C{address} from C{owner} and connect the attempt.

    @return: C{(stream, dial Deferred)}; the stream is not yet connected.
    """
    d = owner.dial(address)
    endpoint = owner.endpointFactory.made[-1]
    return endpoint.factory.buildProtocol(None), endpoint, d


class AddressTests(SynchronousTestCase):
    def test_split(self):
        self.assertEqual(transport.splitAddress("10.0.0.1:7090"), ("10.0.0.1", 7090))
        self.assertEqual(transport.splitAddress("[fd00::1]:7090"), ("fd00::1", 7090))
        self.assertEqual(transport.splitAddress("relay-0.relay:7090"), ("relay-0.relay", 7090))
        for bad in ("10.0.0.1", ":7090", "h:0", "h:65536", "h:x"):
            self.assertRaises(ValueError, transport.splitAddress, bad)

    def test_join(self):
        self.assertEqual(transport.joinAddress("10.0.0.1", 7090), "10.0.0.1:7090")
        self.assertEqual(transport.joinAddress("fd00::1", 7090), "[fd00::1]:7090")

    def test_tcpEndpoint(self):
        reactor = MemoryReactorClock()
        self.assertIsInstance(transport.tcpEndpoint(reactor, "10.0.0.1:7090"), TCP4ClientEndpoint)
        self.assertIsInstance(transport.tcpEndpoint(reactor, "[fd00::1]:7090"), TCP6ClientEndpoint)
        self.assertIsInstance(transport.tcpEndpoint(reactor, "relay-0:7090"), HostnameEndpoint)


class DialerTests(SynchronousTestCase):
    def test_helloFirst(self):
        """
        The dialer's first bytes are its signed HELLO; the stream is live at
        once under the dialed address.
        """
        owner = makeTransport()
        stream, endpoint, d = dialedStream(owner, "10.0.0.2:7090")
        self.assertEqual(endpoint.address, "10.0.0.2:7090")
        tr = StringTransport()
        stream.makeConnection(tr)
        self.assertEqual(tr.value(), frames.helloFrame("10.0.0.1:7090", NOW, SECRET))
        self.assertIs(owner.stream("10.0.0.2:7090"), stream)
        self.assertEqual(owner.handler.events, [("up", stream)])
        endpoint.result.callback(stream)
        self.assertIs(self.successResultOf(d), stream)
        self.assertTrue(stream.dialedByUs)

    def test_helloUnsigned(self):
        owner = makeTransport(secret="")
        stream, endpoint, d = dialedStream(owner, "10.0.0.2:7090")
        tr = StringTransport()
        stream.makeConnection(tr)
        self.assertEqual(tr.value(), frames.helloFrame("10.0.0.1:7090", NOW, ""))

    def test_dialShared(self):
        """
        A second dial to an address being dialed shares the attempt; a dial
        to a live stream fires at once.
        """
        owner = makeTransport()
        d1 = owner.dial("10.0.0.2:7090")
        d2 = owner.dial("10.0.0.2:7090")
        self.assertEqual(len(owner.endpointFactory.made), 1)
        self.assertTrue(owner.isDialing("10.0.0.2:7090"))
        endpoint = owner.endpointFactory.made[0]
        stream = endpoint.factory.buildProtocol(None)
        stream.makeConnection(StringTransport())
        endpoint.result.callback(stream)
        self.assertIs(self.successResultOf(d1), stream)
        self.assertIs(self.successResultOf(d2), stream)
        self.assertFalse(owner.isDialing("10.0.0.2:7090"))
        self.assertIs(self.successResultOf(owner.dial("10.0.0.2:7090")), stream)
        self.assertEqual(len(owner.endpointFactory.made), 1)

    def test_dialFails(self):
        owner = makeTransport()
        d = owner.dial("10.0.0.2:7090")
        owner.endpointFactory.made[0].result.errback(ConnectionRefusedError())
        self.failureResultOf(d, ConnectionRefusedError)
        self.assertFalse(owner.isDialing("10.0.0.2:7090"))
        self.assertEqual(owner.streamCount(), 0)

    def test_dialTimesOut(self):
        owner = makeTransport(dialTimeout=5)
        d = owner.dial("10.0.0.2:7090")
        owner.clock.advance(4.9)
        self.assertNoResult(d)
        owner.clock.advance(0.1)
        self.failureResultOf(d, defer.TimeoutError)
        self.assertFalse(owner.isDialing("10.0.0.2:7090"))

    def test_badAddress(self):
        owner = makeTransport()
        owner.endpointFactory = lambda address: transport.tcpEndpoint(MemoryReactorClock(), address)
        self.failureResultOf(owner.dial("no-port"), ValueError)
        self.assertFalse(owner.isDialing("no-port"))


class AcceptorTests(SynchronousTestCase):
    def setUp(self):
        self.logged = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)

    def rejections(self):
        return [e for e in self.logged if e.get("reason") and "rejecting" in e.get("log_format", "")]

    def assertRejected(self, owner, proto, tr, reason):
        self.assertEqual(dict(owner.counters.helloRejects), {reason: 1})
        self.assertTrue(tr.disconnecting)
        self.assertEqual(owner.streamCount(), 0)
        self.assertEqual(owner.handler.events, [])
        [event] = self.rejections()
        self.assertEqual(event["reason"], reason)
        self.assertEqual(event["peer"], "10.0.0.9:40000")

    def test_validHello(self):
        owner = makeTransport()
        proto, tr = accept(owner)
        self.assertIsNone(owner.stream("10.0.0.2:7090"))
        proto.dataReceived(frames.helloFrame("10.0.0.2:7090", NOW - 299, SECRET))
        self.assertIs(owner.stream("10.0.0.2:7090"), proto)
        self.assertEqual(proto.address, "10.0.0.2:7090")
        self.assertFalse(proto.dialedByUs)
        self.assertEqual(owner.handler.events, [("up", proto)])
        self.assertEqual(tr.value(), b"")
        self.assertFalse(tr.disconnecting)
        owner.clock.advance(60)
        self.assertFalse(tr.disconnecting)
        self.assertEqual(dict(owner.counters.helloRejects), {})

    def test_helloAndFramesInOneChunk(self):
        owner = makeTransport()
        proto, tr = accept(owner)
        data = frames.helloFrame("10.0.0.2:7090", NOW, SECRET) + frames.whoHasFrame(PEER_A) + frames.iHaveFrame(PEER_B, 7)
        for i in range(0, len(data), 5):
            proto.dataReceived(data[i:i + 5])
        self.assertEqual(owner.handler.frames(), [frames.WhoHas(PEER_A), frames.IHave(PEER_B, 7)])

    def test_timeout(self):
        owner = makeTransport()
        proto, tr = accept(owner)
        proto.dataReceived(frames.helloFrame("10.0.0.2:7090", NOW, SECRET)[:10])
        owner.clock.advance(9.999)
        self.assertFalse(tr.disconnecting)
        owner.clock.advance(0.001)
        self.assertRejected(owner, proto, tr, frames.TIMEOUT)

    def test_firstFrameNotHello(self):
        owner = makeTransport()
        proto, tr = accept(owner)
        proto.dataReceived(frames.whoHasFrame(PEER_A) + frames.helloFrame("10.0.0.2:7090", NOW, SECRET))
        self.assertRejected(owner, proto, tr, frames.FIRST_FRAME_NOT_HELLO)
        owner.clock.advance(20)
        self.assertEqual(owner.counters.helloRejects[frames.TIMEOUT], 0)

    def test_pingFirst(self):
        owner = makeTransport()
        proto, tr = accept(owner)
        proto.dataReceived(frames.pingFrame())
        self.assertRejected(owner, proto, tr, frames.FIRST_FRAME_NOT_HELLO)
        self.assertEqual(tr.value(), b"")

    def test_hmacMismatch(self):
        owner = makeTransport()
        proto, tr = accept(owner)
        proto.dataReceived(frames.helloFrame("10.0.0.2:7090", NOW, "another") + frames.fwdFrame(PEER_A, b"\x01\x03" + PEER_B))
        self.assertRejected(owner, proto, tr, frames.HMAC_MISMATCH)

    def test_unsignedButRequired(self):
        owner = makeTransport()
        proto, tr = accept(owner)
        proto.dataReceived(frames.helloFrame("10.0.0.2:7090", NOW, ""))
        self.assertRejected(owner, proto, tr, frames.UNSIGNED_BUT_REQUIRED)

    def test_signedButUnsupported(self):
        owner = makeTransport(secret="")
        proto, tr = accept(owner)
        proto.dataReceived(frames.helloFrame("10.0.0.2:7090", NOW, SECRET))
        self.assertRejected(owner, proto, tr, frames.SIGNED_BUT_UNSUPPORTED)

    def test_unsignedAccepted(self):
        owner = makeTransport(secret="")
        proto, tr = accept(owner)
        proto.dataReceived(frames.helloFrame("10.0.0.2:7090", NOW, ""))
        self.assertIs(owner.stream("10.0.0.2:7090"), proto)

    def test_stale(self):
        owner = makeTransport()
        proto, tr = accept(owner)
        proto.dataReceived(frames.helloFrame("10.0.0.2:7090", NOW + 301, SECRET))
        self.assertRejected(owner, proto, tr, frames.STALE_TIMESTAMP)

    def test_malformed(self):
        owner = makeTransport()
        proto, tr = accept(owner)
        proto.dataReceived(frames.encodeFrame(frames.HELLO, b"\x02\x00"))
        self.assertRejected(owner, proto, tr, frames.MALFORMED)

    def test_secretNotLogged(self):
        owner = makeTransport()
        proto, tr = accept(owner)
        proto.dataReceived(frames.helloFrame("10.0.0.2:7090", NOW, "another"))
        self.assertNotEqual(self.logged, [])
        for event in self.logged:
            self.assertNotIn(SECRET, repr(event))


def established(owner=None, address="10.0.0.2:7090"):
    owner = owner or makeTransport()
    proto, tr = accept(owner)
    proto.dataReceived(frames.helloFrame(address, NOW, SECRET))
    owner.handler.events.clear()
    return owner, proto, tr


class StreamFrameTests(SynchronousTestCase):
    def test_dispatch(self):
        owner, proto, tr = established()
        fwd = frames.fwdFrame(PEER_B, b"\x01\x03" + PEER_A + b"x")
        proto.dataReceived(frames.whoHasFrame(PEER_A) + frames.peerGoneFrame(PEER_A) + fwd)
        self.assertEqual(
            owner.handler.events,
            [
                ("frame", proto, frames.WhoHas(PEER_A)),
                ("frame", proto, frames.PeerGone(PEER_A)),
                ("frame", proto, frames.Fwd(PEER_B, b"\x01\x03" + PEER_A + b"x")),
            ],
        )

    def test_unknownIgnored(self):
        owner, proto, tr = established()
        proto.dataReceived(
            frames.encodeFrame(0x04, b"future") + frames.encodeFrame(0x12, b"\x00" * 4) + frames.encodeFrame(0x7F, b"")
            + frames.whoHasFrame(PEER_A)
        )
        self.assertFalse(tr.disconnecting)
        self.assertEqual(owner.handler.frames(), [frames.WhoHas(PEER_A)])
        self.assertEqual(dict(owner.counters.dropped), {})

    def test_repeatedHelloIgnored(self):
        owner, proto, tr = established()
        proto.dataReceived(frames.helloFrame("10.9.9.9:7090", NOW, SECRET) + frames.whoHasFrame(PEER_A))
        self.assertFalse(tr.disconnecting)
        self.assertEqual(proto.address, "10.0.0.2:7090")
        self.assertEqual(owner.handler.frames(), [frames.WhoHas(PEER_A)])

    def test_malformedCloses(self):
        """
        WHO_HAS or I_HAVE of the wrong length, FWD shorter than an id: the
        stream is closed and nothing after it is handled.
        """
        for bad in (
            frames.encodeFrame(frames.WHO_HAS, PEER_A[:-1]),
            frames.encodeFrame(frames.I_HAVE, PEER_A + b"\x00\x00\x00"),
            frames.encodeFrame(frames.FWD, PEER_A[:35]),
            frames.encodeFrame(frames.PEER_GONE, PEER_A + b"\x00"),
            frames.encodeFrame(frames.PING, b"\x00"),
        ):
            owner, proto, tr = established()
            proto.dataReceived(bad + frames.whoHasFrame(PEER_A))
            self.assertTrue(tr.disconnecting)
            self.assertEqual(owner.handler.frames(), [])
            self.assertEqual(dict(owner.counters.dropped), {"malformed_frame": 1})
            lose(proto)
            self.assertIsNone(owner.stream("10.0.0.2:7090"))
            self.assertEqual(owner.handler.events, [("down", proto)])

    def test_handlerErrorKeepsStream(self):
        owner, proto, tr = established()

        def boom(stream, frame):
            raise RuntimeError("bug")

        owner.handler.frameReceived = boom
        proto.dataReceived(frames.whoHasFrame(PEER_A))
        self.assertFalse(tr.disconnecting)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_streamUpErrorClosesStream(self):
        """
        A handler failing on a new stream is logged and the stream closed,
        instead of the exception escaping into the read loop.
        """
        owner = makeTransport(pingInterval=15)

        def boom(stream):
            raise RuntimeError("bug")

        owner.handler.streamUp = boom
        proto, tr = accept(owner)
        proto.dataReceived(frames.helloFrame("10.0.0.2:7090", NOW, SECRET))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertTrue(tr.disconnecting)
        self.assertIsNone(owner.stream("10.0.0.2:7090"))
        owner.clock.advance(15)
        self.assertEqual(tr.value(), b"")
        lose(proto)
        self.assertEqual(owner.handler.events, [("down", proto)])
        self.assertEqual(owner.clock.getDelayedCalls(), [])

    def test_pingAnswered(self):
        owner, proto, tr = established()
        proto.dataReceived(frames.pingFrame() + frames.pingFrame())
        self.assertEqual(tr.value(), frames.pongFrame() * 2)
        self.assertEqual(owner.handler.frames(), [])

    def test_framesBeforeHelloNotHandled(self):
        owner = makeTransport()
        proto, tr = accept(owner)
        proto.dataReceived(frames.helloFrame("10.0.0.2:7090", NOW, "bad") + frames.whoHasFrame(PEER_A))
        self.assertEqual(owner.handler.events, [])


class KeepaliveTests(SynchronousTestCase):
    def test_originalPodNeverClosed(self):
        """
        A remote that never answered a PING (an original pod) loses PINGs but
        is never closed for it.
        """
        owner, proto, tr = established(makeTransport(pingInterval=15, pongTimeout=10))
        owner.clock.advance(14.9)
        self.assertEqual(tr.value(), b"")
        owner.clock.advance(0.1)
        self.assertEqual(tr.value(), frames.pingFrame())
        self.assertEqual(owner.counters.pingsSent, 1)
        for i in range(10):
            owner.clock.advance(15)
        self.assertEqual(owner.counters.pingsSent, 11)
        self.assertEqual(owner.counters.pingsLost, 10)
        self.assertFalse(tr.disconnecting)
        self.assertIs(owner.stream("10.0.0.2:7090"), proto)

    def test_answeringPodClosedOnMiss(self):
        owner, proto, tr = established(makeTransport(pingInterval=15, pongTimeout=10))
        owner.clock.advance(15)
        owner.clock.advance(9)
        proto.dataReceived(frames.pongFrame())
        self.assertTrue(proto.answersPing)
        owner.clock.advance(1)
        self.assertEqual(owner.counters.pingsLost, 0)
        owner.clock.advance(5)
        self.assertEqual(owner.counters.pingsSent, 2)
        owner.clock.advance(9.9)
        self.assertFalse(tr.disconnecting)
        owner.clock.advance(0.1)
        self.assertEqual(owner.counters.pingsLost, 1)
        self.assertTrue(tr.disconnecting)
        lose(proto)
        self.assertIsNone(owner.stream("10.0.0.2:7090"))
        self.assertEqual(owner.clock.getDelayedCalls(), [])

    def test_lateFirstPongThenAnswers(self):
        """
        A remote that only starts answering later is then held to it.
        """
        owner, proto, tr = established(makeTransport(pingInterval=15, pongTimeout=10))
        owner.clock.advance(15)
        owner.clock.advance(10)
        self.assertEqual(owner.counters.pingsLost, 1)
        proto.dataReceived(frames.pongFrame())
        self.assertFalse(tr.disconnecting)
        owner.clock.advance(5)
        owner.clock.advance(10)
        self.assertEqual(owner.counters.pingsLost, 2)
        self.assertTrue(tr.disconnecting)

    def test_dialedStreamPings(self):
        owner = makeTransport(pingInterval=15, pongTimeout=10)
        stream, endpoint, d = dialedStream(owner, "10.0.0.2:7090")
        tr = StringTransport()
        stream.makeConnection(tr)
        endpoint.result.callback(stream)
        self.assertIs(self.successResultOf(d), stream)
        tr.clear()
        owner.clock.advance(15)
        self.assertEqual(tr.value(), frames.pingFrame())

    def test_pingErrorLogged(self):
        """
        An exception stopping the keepalive loop is logged, not left in an
        unhandled Deferred.
        """
        owner, proto, tr = established(makeTransport(pingInterval=15, pongTimeout=10))

        def boom(data, droppable=False):
            raise RuntimeError("bug")

        proto.send = boom
        owner.clock.advance(15)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_noPingBeforeHello(self):
        owner = makeTransport(pingInterval=15, pongTimeout=10)
        proto, tr = accept(owner)
        owner.clock.advance(9)
        self.assertEqual(tr.value(), b"")
        self.assertEqual(owner.counters.pingsSent, 0)


class BoundedWriteTests(SynchronousTestCase):
    def test_writesThroughWhenNotPaused(self):
        owner, proto, tr = established(makeTransport(highWater=100))
        fwd = frames.fwdFrame(PEER_A, b"x" * 200)
        self.assertEqual(proto.send(fwd, droppable=True), transport.SENT)
        self.assertEqual(tr.value(), fwd)
        self.assertIs(tr.producer, proto)
        self.assertTrue(tr.streaming)

    def test_slowStreamDropsFWD(self):
        owner, proto, tr = established(makeTransport(highWater=100))
        tr.producer.pauseProducing()
        fwd = frames.fwdFrame(PEER_A, b"x" * 4)  # 43 bytes
        self.assertEqual(proto.send(fwd, droppable=True), transport.SENT)
        self.assertEqual(proto.send(fwd, droppable=True), transport.SENT)
        self.assertEqual(proto.queuedBytes(), 86)
        self.assertEqual(proto.send(fwd, droppable=True), transport.SLOW)
        self.assertEqual(owner.counters.dropped["slow_stream"], 1)
        self.assertEqual(tr.value(), b"")
        whoHas = frames.whoHasFrame(PEER_B)
        self.assertEqual(proto.send(whoHas), transport.SENT)
        self.assertEqual(proto.queuedBytes(), 125)
        tr.producer.resumeProducing()
        self.assertEqual(tr.value(), fwd + fwd + whoHas)
        self.assertEqual(proto.queuedBytes(), 0)
        self.assertEqual(proto.send(fwd, droppable=True), transport.SENT)
        self.assertEqual(tr.value(), fwd * 2 + whoHas + fwd)

    def test_orderKeptWhileQueued(self):
        """
        Once something is queued, later frames queue behind it even if the
        transport is no longer paused.
        """
        owner, proto, tr = established(makeTransport(highWater=1000))
        proto.pauseProducing()
        proto.send(b"1")
        proto._paused = False
        proto.send(b"2")
        self.assertEqual(tr.value(), b"")
        proto.resumeProducing()
        self.assertEqual(tr.value(), b"12")

    def test_pauseDuringFlush(self):
        owner, proto, tr = established(makeTransport(highWater=1000))
        proto.pauseProducing()
        for chunk in (b"a", b"b", b"c"):
            proto.send(chunk)
        original = tr.write

        def write(data):
            original(data)
            if data == b"b":
                proto.pauseProducing()

        tr.write = write
        proto.resumeProducing()
        self.assertEqual(tr.value(), b"ab")
        self.assertEqual(proto.queuedBytes(), 1)

    def test_stuckStreamAborted(self):
        owner, proto, tr = established(makeTransport(highWater=100))
        proto.pauseProducing()
        who = frames.whoHasFrame(PEER_A)  # 39 bytes
        for i in range(5):
            self.assertEqual(proto.send(who), transport.SENT)
        self.assertEqual(proto.send(who), transport.GONE)
        self.assertEqual(owner.counters.dropped["stream_overflow"], 1)
        self.assertTrue(tr.disconnecting)
        self.assertEqual(proto.send(who), transport.GONE)
        self.assertEqual(proto.queuedBytes(), 0)

    def test_closedStreamGone(self):
        owner, proto, tr = established()
        lose(proto)
        self.assertEqual(proto.send(frames.pingFrame()), transport.GONE)


class RegistryTests(SynchronousTestCase):
    def test_secondAcceptedClosed(self):
        """
        A second stream from the same pod, dialed from the same side, is
        closed; the first stays live, and the loser's end does not remove it.
        """
        owner, first, tr1 = established()
        second, tr2 = accept(owner)
        second.dataReceived(frames.helloFrame("10.0.0.2:7090", NOW, SECRET) + frames.whoHasFrame(PEER_A))
        self.assertTrue(tr2.disconnecting)
        self.assertFalse(tr1.disconnecting)
        self.assertIs(owner.stream("10.0.0.2:7090"), first)
        self.assertEqual(owner.handler.events, [])
        lose(second)
        self.assertIs(owner.stream("10.0.0.2:7090"), first)
        self.assertEqual(owner.handler.events, [])
        lose(first)
        self.assertIsNone(owner.stream("10.0.0.2:7090"))
        self.assertEqual(owner.handler.events, [("down", first)])

    def test_newStreamAfterEnd(self):
        owner, first, tr1 = established()
        lose(first)
        second, tr2 = accept(owner)
        second.dataReceived(frames.helloFrame("10.0.0.2:7090", NOW, SECRET))
        self.assertIs(owner.stream("10.0.0.2:7090"), second)

    def test_streamsByAddress(self):
        owner, one, _ = established(address="10.0.0.2:7090")
        owner, two, _ = established(owner, address="10.0.0.3:7090")
        self.assertEqual(owner.streamCount(), 2)
        self.assertEqual(set(owner.liveStreams()), {one, two})

    def assertOneStream(self, a, b, kept):
        """
        Both pods hold exactly C{kept} (a L{Wire}) as their live stream.
        """
        self.assertIs(a.stream(b.announceAddress), kept.dialer if kept.dialer.owner is a else kept.acceptor)
        self.assertIs(b.stream(a.announceAddress), kept.dialer if kept.dialer.owner is b else kept.acceptor)

    def simultaneous(self, lowAddress, highAddress, order):
        """
        Pods at C{lowAddress} and C{highAddress} dial each other at once.
        """
        clock = Clock()
        clock.advance(NOW)
        low = makeTransport(lowAddress, clock=clock)
        high = makeTransport(highAddress, clock=clock)
        fromLow = Wire(dialedStream(low, highAddress)[0], high.serverFactory().buildProtocol(None))
        fromHigh = Wire(dialedStream(high, lowAddress)[0], low.serverFactory().buildProtocol(None))
        if order == "interleaved":
            fromLow.connect()
            fromHigh.connect()
            fromLow.pump()
            fromHigh.pump()
        elif order == "lowFirst":
            fromLow.connect()
            fromLow.pump()
            fromHigh.connect()
            fromHigh.pump()
        else:
            fromHigh.connect()
            fromHigh.pump()
            fromLow.connect()
            fromLow.pump()
        fromLow.pump()
        fromHigh.pump()
        return low, high, fromLow, fromHigh

    def test_simultaneousDials(self):
        """
        Whatever the timing, both pods keep the stream dialed by the lower
        announce address and close the other.
        """
        for order in ("interleaved", "lowFirst", "highFirst"):
            low, high, fromLow, fromHigh = self.simultaneous("10.0.0.1:7090", "10.0.0.2:7090", order)
            self.assertTrue(fromHigh.lost, order)
            self.assertFalse(fromLow.lost, order)
            self.assertOneStream(low, high, fromLow)
            self.assertEqual((low.streamCount(), high.streamCount()), (1, 1))

    def test_simultaneousDialsOtherOrder(self):
        for order in ("interleaved", "lowFirst", "highFirst"):
            low, high, fromLow, fromHigh = self.simultaneous("10.0.0.5:7090", "10.0.0.40:7090", order)
            # "10.0.0.40:7090" < "10.0.0.5:7090": the comparison is of the
            # address strings, the same on both pods.
            self.assertTrue(fromLow.lost, order)
            self.assertFalse(fromHigh.lost, order)
            self.assertOneStream(low, high, fromHigh)

    def test_replacedStreamNotReportedDown(self):
        """
        When the incoming stream wins over a live one, the handler hears of
        the new one and never of the replaced one going down.
        """
        low, high, fromLow, fromHigh = self.simultaneous("10.0.0.1:7090", "10.0.0.2:7090", "highFirst")
        self.assertEqual([e[0] for e in high.handler.events], ["up", "up"])
        self.assertIs(high.handler.events[-1][1], fromLow.acceptor)
        self.assertEqual([e[0] for e in low.handler.events], ["up", "up"])
        self.assertIs(low.handler.events[-1][1], fromLow.dialer)

    def test_stop(self):
        owner, one, tr1 = established(address="10.0.0.2:7090")
        pending, tr2 = accept(owner)
        dialing = owner.dial("10.0.0.3:7090")
        d = owner.stop()
        self.assertTrue(tr1.disconnecting)
        self.assertTrue(tr2.disconnecting)
        self.failureResultOf(dialing, defer.CancelledError)
        self.assertNoResult(d)
        lose(one)
        lose(pending)
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(owner.streamCount(), 0)
        self.failureResultOf(owner.dial("10.0.0.2:7090"), RuntimeError)

    def test_stopAbortsAfterTimeout(self):
        owner, one, tr1 = established()
        d = owner.stop()
        self.assertFalse(tr1.disconnected)
        owner.clock.advance(transport.CLOSE_TIMEOUT)
        self.assertTrue(tr1.disconnected)
        lose(one)
        self.assertIsNone(self.successResultOf(d))


class SocketOptionTests(SynchronousTestCase):
    def test_noDelayAndKeepAlive(self):
        owner = makeTransport()
        proto = owner.serverFactory().buildProtocol(None)
        tr = StringTransport()
        options = []
        tr.setTcpNoDelay = lambda enabled: options.append(("nodelay", enabled))
        tr.setTcpKeepAlive = lambda enabled: options.append(("keepalive", enabled))
        proto.makeConnection(tr)
        self.assertEqual(options, [("nodelay", True), ("keepalive", True)])


class EarlyRejectTests(SynchronousTestCase):
    """
    A stranger's first frame is refused from its header alone.
    """

    def test_notHelloHeader(self):
        owner = makeTransport()
        proto, tr = accept(owner)
        proto.dataReceived(b"\x14\xff\xff" + b"x" * 100)
        self.assertTrue(tr.disconnecting)
        self.assertEqual(dict(owner.counters.helloRejects), {frames.FIRST_FRAME_NOT_HELLO: 1})
        owner.clock.advance(20)
        self.assertEqual(dict(owner.counters.helloRejects), {frames.FIRST_FRAME_NOT_HELLO: 1})

    def test_oversizedHello(self):
        owner = makeTransport()
        proto, tr = accept(owner)
        proto.dataReceived(b"\x00\x01")
        self.assertFalse(tr.disconnecting)
        proto.dataReceived(b"\x2b")  # 299 bytes: one more than the largest HELLO
        self.assertTrue(tr.disconnecting)
        self.assertEqual(dict(owner.counters.helloRejects), {frames.MALFORMED: 1})
        owner.clock.advance(20)
        self.assertEqual(dict(owner.counters.helloRejects), {frames.MALFORMED: 1})

    def test_largestHelloWaitedFor(self):
        owner = makeTransport()
        proto, tr = accept(owner)
        hello = frames.helloFrame("h" * 250 + ":7090", NOW, SECRET)
        self.assertEqual(len(hello), 3 + frames.HELLO_MAX_PAYLOAD)
        proto.dataReceived(hello[:-1])
        self.assertFalse(tr.disconnecting)
        proto.dataReceived(hello[-1:])
        self.assertIs(owner.stream("h" * 250 + ":7090"), proto)
