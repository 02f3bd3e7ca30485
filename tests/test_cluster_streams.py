"""
Tests for L{relay.cluster.streams}: HELLO handshake and every rejection
reason, the secured handshake and sealed frames, compatibility mode, one
stream per pod (simultaneous dials, no eviction without proof), PING/PONG
keepalive and its compatibility rule, bounded writes, dialing, caps.
"""

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from relay.cluster import frames, streams
from relay.counters import ClusterCounters
from relay.limits import LogBudget
from relay.messages import peerID

NOW = 1893456000
SECRET = "cluster-secret"
PEER_A = peerID("peer-a")
PEER_B = peerID("peer-b")


class RecordingHandler:
    """
    An L{streams.IStreamHandler} that records what it is told.
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


def makeStreams(
    address="10.0.0.1:7090",
    secret=SECRET,
    clock=None,
    counters=None,
    handler=None,
    compat=False,
    wallClock=None,
    noisyLog=None,
    **settings,
):
    """
    L{streams.ClusterStreams} on fake endpoints; C{settings} are L{streams.FabricSettings}
    fields.
    """
    if clock is None:
        clock = Clock()
        clock.advance(NOW)
    return streams.ClusterStreams(
        address,
        secret,
        clock,
        counters if counters is not None else ClusterCounters(),
        FakeEndpoints(),
        handler=handler if handler is not None else RecordingHandler(),
        settings=streams.FabricSettings(**settings),
        compat=compat,
        wallClock=wallClock,
        noisyLog=noisyLog,
    )


def accept(owner, peerHost="10.0.0.2"):
    """
    An accepted stream on C{owner} with a string transport, from C{peerHost}
    (the host the tests' HELLOs announce, unless they test otherwise).
    """
    proto = owner.serverFactory().buildProtocol(IPv4Address("TCP", peerHost, 40000))
    assert proto is not None
    tr = StringTransport(peerAddress=IPv4Address("TCP", peerHost, 40000))
    proto.makeConnection(tr)
    return proto, tr


def lose(proto, tr=None):
    proto.connectionLost(ConnectionDone())


class Remote:
    """
    The other pod of an accepted stream, played by hand: it runs the secured
    handshake with C{proto} and then seals what it sends and opens what it
    reads, as a pod of this kind would.
    """

    def __init__(
        self,
        proto,
        tr,
        address="10.0.0.2:7090",
        secret=SECRET,
        now=NOW,
        nonce=b"\x11" * 32,
        helloSent=False,
    ):
        self.proto = proto
        self.tr = tr
        self.hello = frames.encodeHello(address, now, secret)
        hello = b"" if helloSent else frames.encodeFrame(frames.HELLO, self.hello)
        proto.dataReceived(hello + frames.challengeFrame(nonce))
        [(frameType, payload)] = frames.FrameReader().feed(tr.value())
        tr.clear()
        assert frameType == frames.AUTH, frameType
        acceptorNonce, mac = frames.decodeAuth(payload)
        handshake = frames.Handshake(secret, self.hello, nonce, acceptorNonce)
        assert mac == handshake.acceptorMAC
        self.sealer = frames.Sealer(handshake.dialerKey)
        self.opener = frames.Opener(handshake.acceptorKey)
        self.reader = frames.FrameReader()
        proto.dataReceived(frames.confirmFrame(handshake.dialerMAC))

    def seal(self, *encoded):
        return b"".join(self.sealer.seal(frame) for frame in encoded)

    def send(self, *encoded):
        self.proto.dataReceived(self.seal(*encoded))

    def received(self):
        """
        @return: what the stream wrote since the last call, opened, as the
            concatenated plain frames.
        """
        data = self.tr.value()
        self.tr.clear()
        return b"".join(
            frames.encodeFrame(frameType, self.opener.open(frameType, payload))
            for frameType, payload in self.reader.feed(data)
        )


class Wire:
    """
    Two protocols joined back to back by string transports; L{pump} moves
    bytes both ways until quiet and delivers disconnections. Each side sees
    the other's announced host as its TCP peer.
    """

    def __init__(self, dialer, acceptor):
        self.dialer = dialer
        self.acceptor = acceptor
        dialerHost = streams.splitAddress(dialer.owner.announceAddress)[0]
        acceptorHost = streams.splitAddress(dialer.address)[0]
        self.dialerTransport = StringTransport(peerAddress=IPv4Address("TCP", acceptorHost, 7090))
        self.acceptorTransport = StringTransport(peerAddress=IPv4Address("TCP", dialerHost, 40000))
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


def answer(stream, tr, secret=SECRET, nonce=b"\x22" * 32):
    """
    Play the acceptor of a dialed C{stream}: read its HELLO and CHALLENGE,
    send AUTH.

    @return: the L{frames.Handshake}.
    """
    [(helloType, hello), (challengeType, challenge)] = frames.FrameReader().feed(tr.value())
    assert (helloType, challengeType) == (frames.HELLO, frames.CHALLENGE)
    tr.clear()
    handshake = frames.Handshake(secret, hello, frames.decodeChallenge(challenge), nonce)
    stream.dataReceived(frames.authFrame(nonce, handshake.acceptorMAC))
    return handshake


def dialedStream(owner, address):
    """
    Dial C{address} from C{owner} and connect the attempt.

    @return: C{(stream, dial Deferred)}; the stream is not yet connected.
    """
    d = owner.dial(address)
    endpoint = owner.endpointFactory.made[-1]
    return endpoint.factory.buildProtocol(None), endpoint, d


class AddressTests(SynchronousTestCase):
    def test_tcpEndpoint(self):
        reactor = MemoryReactorClock()
        self.assertIsInstance(streams.tcpEndpoint(reactor, "10.0.0.1:7090"), TCP4ClientEndpoint)
        self.assertIsInstance(streams.tcpEndpoint(reactor, "[fd00::1]:7090"), TCP6ClientEndpoint)
        self.assertIsInstance(streams.tcpEndpoint(reactor, "relay-0:7090"), HostnameEndpoint)


class DialerTests(SynchronousTestCase):
    def test_helloFirst(self):
        """
        The dialer's first bytes are its signed HELLO, then its CHALLENGE;
        the stream is live under the dialed address once the acceptor has
        proved the secret (AUTH), and the dialer then proves it (CONFIRM).
        """
        owner = makeStreams()
        stream, endpoint, d = dialedStream(owner, "10.0.0.2:7090")
        self.assertEqual(endpoint.address, "10.0.0.2:7090")
        tr = StringTransport()
        stream.makeConnection(tr)
        hello = frames.helloFrame("10.0.0.1:7090", NOW, SECRET)
        self.assertEqual(tr.value()[: len(hello)], hello)
        [(challengeType, challenge)] = frames.FrameReader().feed(tr.value()[len(hello) :])
        self.assertEqual((challengeType, len(challenge)), (frames.CHALLENGE, 33))
        self.assertIsNone(owner.stream("10.0.0.2:7090"))
        self.assertEqual(owner.handler.events, [])
        handshake = answer(stream, tr)
        self.assertEqual(tr.value(), frames.confirmFrame(handshake.dialerMAC))
        self.assertIs(owner.stream("10.0.0.2:7090"), stream)
        self.assertTrue(stream.secured)
        self.assertEqual(owner.handler.events, [("up", stream)])
        endpoint.result.callback(stream)
        self.assertIs(self.successResultOf(d), stream)
        self.assertTrue(stream.dialedByUs)

    def test_fresh(self):
        """
        Every dial sends another CHALLENGE nonce.
        """
        owner = makeStreams()
        challenges = set()
        for i in range(3):
            stream, endpoint, d = dialedStream(owner, f"10.0.0.{i + 2}:7090")
            tr = StringTransport()
            stream.makeConnection(tr)
            challenges.add(frames.FrameReader().feed(tr.value())[1][1])
        self.assertEqual(len(challenges), 3)

    def test_helloUnsigned(self):
        owner = makeStreams(secret="")
        stream, endpoint, d = dialedStream(owner, "10.0.0.2:7090")
        tr = StringTransport()
        stream.makeConnection(tr)
        self.assertEqual(tr.value(), frames.helloFrame("10.0.0.1:7090", NOW, ""))

    def test_dialShared(self):
        """
        A second dial to an address being dialed shares the attempt; a dial
        to a live stream fires at once.
        """
        owner = makeStreams()
        d1 = owner.dial("10.0.0.2:7090")
        d2 = owner.dial("10.0.0.2:7090")
        self.assertEqual(len(owner.endpointFactory.made), 1)
        self.assertTrue(owner.isDialing("10.0.0.2:7090"))
        endpoint = owner.endpointFactory.made[0]
        stream = endpoint.factory.buildProtocol(None)
        tr = StringTransport()
        stream.makeConnection(tr)
        answer(stream, tr)
        endpoint.result.callback(stream)
        self.assertIs(self.successResultOf(d1), stream)
        self.assertIs(self.successResultOf(d2), stream)
        self.assertFalse(owner.isDialing("10.0.0.2:7090"))
        self.assertIs(self.successResultOf(owner.dial("10.0.0.2:7090")), stream)
        self.assertEqual(len(owner.endpointFactory.made), 1)

    def test_dialFails(self):
        owner = makeStreams()
        d = owner.dial("10.0.0.2:7090")
        owner.endpointFactory.made[0].result.errback(ConnectionRefusedError())
        self.failureResultOf(d, ConnectionRefusedError)
        self.assertFalse(owner.isDialing("10.0.0.2:7090"))
        self.assertEqual(owner.streamCount(), 0)

    def test_dialTimesOut(self):
        owner = makeStreams(dialTimeout=5)
        d = owner.dial("10.0.0.2:7090")
        owner.clock.advance(4.9)
        self.assertNoResult(d)
        owner.clock.advance(0.1)
        self.failureResultOf(d, defer.TimeoutError)
        self.assertFalse(owner.isDialing("10.0.0.2:7090"))

    def test_badAddress(self):
        owner = makeStreams()
        owner.endpointFactory = lambda address: streams.tcpEndpoint(MemoryReactorClock(), address)
        self.failureResultOf(owner.dial("no-port"), ValueError)
        self.assertFalse(owner.isDialing("no-port"))


class AcceptorTests(SynchronousTestCase):
    def setUp(self):
        self.logged = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)

    def rejections(self):
        return [
            e for e in self.logged if e.get("reason") and "rejecting" in e.get("log_format", "")
        ]

    def assertRejected(self, owner, proto, tr, reason):
        self.assertEqual(dict(owner.counters.helloRejects), {reason: 1})
        self.assertTrue(tr.disconnecting)
        self.assertEqual(owner.streamCount(), 0)
        self.assertEqual(owner.handler.events, [])
        [event] = self.rejections()
        self.assertEqual(event["reason"], reason)
        self.assertEqual(event["peer"], "10.0.0.2:40000")

    def test_validHello(self):
        """
        A valid HELLO alone does not make a stream live: the acceptor waits
        for the CHALLENGE, answers AUTH, and the stream is live at CONFIRM.
        """
        owner = makeStreams()
        proto, tr = accept(owner)
        self.assertIsNone(owner.stream("10.0.0.2:7090"))
        proto.dataReceived(frames.helloFrame("10.0.0.2:7090", NOW - 299, SECRET))
        self.assertIsNone(owner.stream("10.0.0.2:7090"))
        self.assertEqual(tr.value(), b"")
        Remote(proto, tr, now=NOW - 299, helloSent=True)
        self.assertIs(owner.stream("10.0.0.2:7090"), proto)
        self.assertEqual(proto.address, "10.0.0.2:7090")
        self.assertFalse(proto.dialedByUs)
        self.assertTrue(proto.secured)
        self.assertEqual(owner.handler.events, [("up", proto)])
        self.assertEqual(tr.value(), b"")
        self.assertFalse(tr.disconnecting)
        owner.clock.advance(60)
        self.assertFalse(tr.disconnecting)
        self.assertEqual(dict(owner.counters.helloRejects), {})

    def test_helloAndFramesInOneChunk(self):
        owner = makeStreams()
        proto, tr = accept(owner)
        nonce = b"\x33" * 32
        hello = frames.encodeHello("10.0.0.2:7090", NOW, SECRET)
        proto.dataReceived(frames.encodeFrame(frames.HELLO, hello) + frames.challengeFrame(nonce))
        acceptorNonce, _ = frames.decodeAuth(frames.FrameReader().feed(tr.value())[0][1])
        handshake = frames.Handshake(SECRET, hello, nonce, acceptorNonce)
        sealer = frames.Sealer(handshake.dialerKey)
        data = (
            frames.confirmFrame(handshake.dialerMAC)
            + sealer.seal(frames.whoHasFrame(PEER_A))
            + sealer.seal(frames.iHaveFrame(PEER_B, 7))
        )
        for i in range(0, len(data), 5):
            proto.dataReceived(data[i : i + 5])
        self.assertEqual(owner.handler.frames(), [frames.WhoHas(PEER_A), frames.IHave(PEER_B, 7)])

    def test_timeout(self):
        owner = makeStreams()
        proto, tr = accept(owner)
        proto.dataReceived(frames.helloFrame("10.0.0.2:7090", NOW, SECRET)[:10])
        owner.clock.advance(9.999)
        self.assertFalse(tr.disconnecting)
        owner.clock.advance(0.001)
        self.assertRejected(owner, proto, tr, frames.TIMEOUT)

    def test_firstFrameNotHello(self):
        owner = makeStreams()
        proto, tr = accept(owner)
        proto.dataReceived(
            frames.whoHasFrame(PEER_A) + frames.helloFrame("10.0.0.2:7090", NOW, SECRET)
        )
        self.assertRejected(owner, proto, tr, frames.FIRST_FRAME_NOT_HELLO)
        owner.clock.advance(20)
        self.assertEqual(owner.counters.helloRejects[frames.TIMEOUT], 0)

    def test_pingFirst(self):
        owner = makeStreams()
        proto, tr = accept(owner)
        proto.dataReceived(frames.pingFrame())
        self.assertRejected(owner, proto, tr, frames.FIRST_FRAME_NOT_HELLO)
        self.assertEqual(tr.value(), b"")

    def test_hmacMismatch(self):
        owner = makeStreams()
        proto, tr = accept(owner)
        proto.dataReceived(
            frames.helloFrame("10.0.0.2:7090", NOW, "another")
            + frames.fwdFrame(PEER_A, b"\x01\x03" + PEER_B)
        )
        self.assertRejected(owner, proto, tr, frames.HMAC_MISMATCH)

    def test_unsignedButRequired(self):
        owner = makeStreams()
        proto, tr = accept(owner)
        proto.dataReceived(frames.helloFrame("10.0.0.2:7090", NOW, ""))
        self.assertRejected(owner, proto, tr, frames.UNSIGNED_BUT_REQUIRED)

    def test_signedButUnsupported(self):
        owner = makeStreams(secret="")
        proto, tr = accept(owner)
        proto.dataReceived(frames.helloFrame("10.0.0.2:7090", NOW, SECRET))
        self.assertRejected(owner, proto, tr, frames.SIGNED_BUT_UNSUPPORTED)

    def test_unsignedAccepted(self):
        """
        Without a secret (the operator's explicit choice), an unsigned HELLO
        makes the stream live at once, and its frames are plain.
        """
        owner = makeStreams(secret="")
        proto, tr = accept(owner)
        proto.dataReceived(frames.helloFrame("10.0.0.2:7090", NOW, "") + frames.whoHasFrame(PEER_A))
        self.assertIs(owner.stream("10.0.0.2:7090"), proto)
        self.assertFalse(proto.secured)
        self.assertEqual(owner.handler.frames(), [frames.WhoHas(PEER_A)])

    def test_stale(self):
        owner = makeStreams()
        proto, tr = accept(owner)
        proto.dataReceived(frames.helloFrame("10.0.0.2:7090", NOW + 301, SECRET))
        self.assertRejected(owner, proto, tr, frames.STALE_TIMESTAMP)

    def test_malformed(self):
        owner = makeStreams()
        proto, tr = accept(owner)
        proto.dataReceived(frames.encodeFrame(frames.HELLO, b"\x02\x00"))
        self.assertRejected(owner, proto, tr, frames.MALFORMED)

    def test_secretNotLogged(self):
        owner = makeStreams()
        proto, tr = accept(owner)
        proto.dataReceived(frames.helloFrame("10.0.0.2:7090", NOW, "another"))
        self.assertNotEqual(self.logged, [])
        for event in self.logged:
            self.assertNotIn(SECRET, repr(event))


def established(owner=None, address="10.0.0.2:7090"):
    """
    A stream accepted by C{owner} after the secured handshake.

    @return: C{(owner, stream, string transport, L{Remote})}.
    """
    owner = owner or makeStreams()
    proto, tr = accept(owner, streams.splitAddress(address)[0])
    remote = Remote(proto, tr, address)
    owner.handler.events.clear()
    return owner, proto, tr, remote


def unsecured(owner, address="10.0.0.2:7090"):
    """
    A stream accepted by C{owner}, which has no secret, after an unsigned
    HELLO: frames are plain.
    """
    proto, tr = accept(owner, streams.splitAddress(address)[0])
    proto.dataReceived(frames.helloFrame(address, NOW, ""))
    owner.handler.events.clear()
    return owner, proto, tr


def legacy(owner=None, address="10.0.0.2:7090"):
    """
    A stream accepted by C{owner} in compatibility mode from an original
    pod: a signed HELLO, then nothing within the upgrade wait.
    """
    owner = owner or makeStreams(compat=True)
    proto, tr = accept(owner, streams.splitAddress(address)[0])
    proto.dataReceived(frames.helloFrame(address, NOW, SECRET))
    owner.clock.advance(owner.settings.upgradeWait)
    assert owner.stream(address) is proto
    owner.handler.events.clear()
    return owner, proto, tr


class StreamFrameTests(SynchronousTestCase):
    def test_dispatch(self):
        owner, proto, tr, remote = established()
        fwd = frames.fwdFrame(PEER_B, b"\x01\x03" + PEER_A + b"x")
        remote.send(frames.whoHasFrame(PEER_A), frames.peerGoneFrame(PEER_A), fwd)
        self.assertEqual(
            owner.handler.events,
            [
                ("frame", proto, frames.WhoHas(PEER_A)),
                ("frame", proto, frames.PeerGone(PEER_A)),
                ("frame", proto, frames.Fwd(PEER_B, b"\x01\x03" + PEER_A + b"x")),
            ],
        )

    def test_unknownIgnored(self):
        owner, proto, tr, remote = established()
        remote.send(
            frames.encodeFrame(0x07, b"future"),
            frames.encodeFrame(0x12, b"\x00" * 4),
            frames.encodeFrame(0x7F, b""),
            frames.challengeFrame(b"\x00" * 32),
            frames.whoHasFrame(PEER_A),
        )
        self.assertFalse(tr.disconnecting)
        self.assertEqual(owner.handler.frames(), [frames.WhoHas(PEER_A)])
        self.assertEqual(dict(owner.counters.dropped), {})

    def test_repeatedHelloIgnored(self):
        owner, proto, tr, remote = established()
        remote.send(frames.helloFrame("10.9.9.9:7090", NOW, SECRET), frames.whoHasFrame(PEER_A))
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
            owner, proto, tr, remote = established()
            remote.send(bad, frames.whoHasFrame(PEER_A))
            self.assertTrue(tr.disconnecting)
            self.assertEqual(owner.handler.frames(), [])
            self.assertEqual(dict(owner.counters.dropped), {"malformed_frame": 1})
            lose(proto)
            self.assertIsNone(owner.stream("10.0.0.2:7090"))
            self.assertEqual(owner.handler.events, [("down", proto)])

    def test_handlerErrorKeepsStream(self):
        owner, proto, tr, remote = established()

        def boom(stream, frame):
            raise RuntimeError("bug")

        owner.handler.frameReceived = boom
        remote.send(frames.whoHasFrame(PEER_A))
        self.assertFalse(tr.disconnecting)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_streamUpErrorClosesStream(self):
        """
        A handler failing on a new stream is logged and the stream closed,
        instead of the exception escaping into the read loop.
        """
        owner = makeStreams(pingInterval=15)

        def boom(stream):
            raise RuntimeError("bug")

        owner.handler.streamUp = boom
        proto, tr = accept(owner)
        Remote(proto, tr)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertTrue(tr.disconnecting)
        self.assertIsNone(owner.stream("10.0.0.2:7090"))
        owner.clock.advance(15)
        self.assertEqual(tr.value(), b"")
        lose(proto)
        self.assertEqual(owner.handler.events, [("down", proto)])
        self.assertEqual(owner.clock.getDelayedCalls(), [])

    def test_pingAnswered(self):
        owner, proto, tr, remote = established()
        remote.send(frames.pingFrame(), frames.pingFrame())
        self.assertEqual(remote.received(), frames.pongFrame() * 2)
        self.assertEqual(owner.handler.frames(), [])

    def test_framesBeforeHelloNotHandled(self):
        owner = makeStreams()
        proto, tr = accept(owner)
        proto.dataReceived(
            frames.helloFrame("10.0.0.2:7090", NOW, "bad") + frames.whoHasFrame(PEER_A)
        )
        self.assertEqual(owner.handler.events, [])


class KeepaliveTests(SynchronousTestCase):
    def test_originalPodNeverClosed(self):
        """
        A remote that never answered a PING (an original pod) loses PINGs but
        is never closed for it.
        """
        owner, proto, tr = legacy(makeStreams(pingInterval=15, pongTimeout=10, compat=True))
        owner.clock.advance(14.9)
        self.assertEqual(tr.value(), b"")
        owner.clock.advance(0.1)
        self.assertEqual(tr.value(), frames.pingFrame())
        self.assertEqual(owner.counters.pingsSent, 1)
        for _i in range(10):
            owner.clock.advance(15)
        self.assertEqual(owner.counters.pingsSent, 11)
        self.assertEqual(owner.counters.pingsLost, 10)
        self.assertFalse(tr.disconnecting)
        self.assertIs(owner.stream("10.0.0.2:7090"), proto)

    def test_answeringPodClosedOnMiss(self):
        owner, proto, tr, remote = established(makeStreams(pingInterval=15, pongTimeout=10))
        owner.clock.advance(15)
        owner.clock.advance(9)
        self.assertEqual(remote.received(), frames.pingFrame())
        remote.send(frames.pongFrame())
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
        owner, proto, tr = legacy(makeStreams(pingInterval=15, pongTimeout=10, compat=True))
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
        owner = makeStreams(pingInterval=15, pongTimeout=10)
        stream, endpoint, d = dialedStream(owner, "10.0.0.2:7090")
        tr = StringTransport()
        stream.makeConnection(tr)
        handshake = answer(stream, tr)
        endpoint.result.callback(stream)
        self.assertIs(self.successResultOf(d), stream)
        tr.clear()
        owner.clock.advance(15)
        [(frameType, payload)] = frames.FrameReader().feed(tr.value())
        self.assertEqual(
            (frameType, frames.Opener(handshake.dialerKey).open(frameType, payload)),
            (frames.PING, b""),
        )

    def test_securedSilentPodClosed(self):
        """
        A secured remote is one of ours, held to the PONG deadline from the
        first PING: a pod that stops answering is closed after 25 s, not
        kept "live" until the kernel gives up (about two hours).
        """
        owner, proto, tr, remote = established(makeStreams(pingInterval=15, pongTimeout=10))
        owner.clock.advance(15)
        owner.clock.advance(9.9)
        self.assertFalse(tr.disconnecting)
        owner.clock.advance(0.1)
        self.assertEqual((owner.counters.pingsSent, owner.counters.pingsLost), (1, 1))
        self.assertTrue(tr.disconnecting)

    def test_pingErrorLogged(self):
        """
        An exception stopping the keepalive loop is logged, not left in an
        unhandled Deferred.
        """
        owner, proto, tr, remote = established(makeStreams(pingInterval=15, pongTimeout=10))

        def boom(data, droppable=False):
            raise RuntimeError("bug")

        proto.send = boom
        owner.clock.advance(15)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_noPingBeforeHello(self):
        owner = makeStreams(pingInterval=15, pongTimeout=10)
        proto, tr = accept(owner)
        owner.clock.advance(9)
        self.assertEqual(tr.value(), b"")
        self.assertEqual(owner.counters.pingsSent, 0)


def queuedBytes(testCase, stream):
    """
    The bytes C{stream} holds for a slow connection, by the count its
    high-water decisions read, checked against the queue itself.
    """
    testCase.assertEqual(stream._queued, sum(len(data) for data in stream._queue))
    return stream._queued


class BoundedWriteTests(SynchronousTestCase):
    def test_writesThroughWhenNotPaused(self):
        owner, proto, tr = unsecured(makeStreams(secret="", highWater=100))
        fwd = frames.fwdFrame(PEER_A, b"x" * 200)
        self.assertEqual(proto.send(fwd, droppable=True), streams.SENT)
        self.assertEqual(tr.value(), fwd)
        self.assertIs(tr.producer, proto)
        self.assertTrue(tr.streaming)

    def test_slowStreamDropsFWD(self):
        owner, proto, tr = unsecured(makeStreams(secret="", highWater=100))
        tr.producer.pauseProducing()
        fwd = frames.fwdFrame(PEER_A, b"x" * 4)  # 43 bytes
        self.assertEqual(proto.send(fwd, droppable=True), streams.SENT)
        self.assertEqual(proto.send(fwd, droppable=True), streams.SENT)
        self.assertEqual(queuedBytes(self, proto), 86)
        self.assertEqual(proto.send(fwd, droppable=True), streams.SLOW)
        self.assertEqual(owner.counters.dropped["slow_stream"], 1)
        self.assertEqual(tr.value(), b"")
        whoHas = frames.whoHasFrame(PEER_B)
        self.assertEqual(proto.send(whoHas), streams.SENT)
        self.assertEqual(queuedBytes(self, proto), 125)
        tr.producer.resumeProducing()
        self.assertEqual(tr.value(), fwd + fwd + whoHas)
        self.assertEqual(queuedBytes(self, proto), 0)
        self.assertEqual(proto.send(fwd, droppable=True), streams.SENT)
        self.assertEqual(tr.value(), fwd * 2 + whoHas + fwd)

    def test_orderKeptWhileQueued(self):
        """
        Once something is queued, later frames queue behind it even if the
        transport is no longer paused.
        """
        owner, proto, tr = unsecured(makeStreams(secret="", highWater=1000))
        proto.pauseProducing()
        proto.send(b"1")
        proto._paused = False
        proto.send(b"2")
        self.assertEqual(tr.value(), b"")
        proto.resumeProducing()
        self.assertEqual(tr.value(), b"12")

    def test_pauseDuringFlush(self):
        owner, proto, tr = unsecured(makeStreams(secret="", highWater=1000))
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
        self.assertEqual(queuedBytes(self, proto), 1)

    def test_stuckStreamAborted(self):
        owner, proto, tr = unsecured(makeStreams(secret="", highWater=100))
        proto.pauseProducing()
        who = frames.whoHasFrame(PEER_A)  # 39 bytes
        for _i in range(5):
            self.assertEqual(proto.send(who), streams.SENT)
        self.assertEqual(proto.send(who), streams.GONE)
        self.assertEqual(owner.counters.dropped["stream_overflow"], 1)
        self.assertTrue(tr.disconnecting)
        self.assertEqual(proto.send(who), streams.GONE)
        self.assertEqual(queuedBytes(self, proto), 0)

    def test_sealedQueueKeepsOrder(self):
        """
        Frames queued on a secured stream are sealed in the order sent, so
        the remote opens them all after the flush.
        """
        owner, proto, tr, remote = established(makeStreams(highWater=1000))
        proto.pauseProducing()
        sent = [
            frames.whoHasFrame(PEER_A),
            frames.fwdFrame(PEER_B, b"\x01\x03" + PEER_A),
            frames.pingFrame(),
        ]
        for frame in sent:
            self.assertEqual(proto.send(frame, droppable=True), streams.SENT)
        self.assertEqual(tr.value(), b"")
        proto.resumeProducing()
        self.assertEqual(remote.received(), b"".join(sent))

    def test_closedStreamGone(self):
        owner, proto, tr, remote = established()
        lose(proto)
        self.assertEqual(proto.send(frames.pingFrame()), streams.GONE)


class RegistryTests(SynchronousTestCase):
    def test_secondAcceptedClosed(self):
        """
        A second stream from the same pod, dialed from the same side, is
        closed; the first stays live, and the loser's end does not remove it.
        """
        owner, first, tr1, _ = established()
        second, tr2 = accept(owner)
        Remote(second, tr2).send(frames.whoHasFrame(PEER_A))
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
        owner, first, tr1, _ = established()
        lose(first)
        second, tr2 = accept(owner)
        Remote(second, tr2)
        self.assertIs(owner.stream("10.0.0.2:7090"), second)

    def test_streamsByAddress(self):
        owner, one, _, _ = established(address="10.0.0.2:7090")
        owner, two, _, _ = established(owner, address="10.0.0.3:7090")
        self.assertEqual(owner.streamCount(), 2)
        self.assertEqual(set(owner.liveStreams()), {one, two})

    def assertOneStream(self, a, b, kept):
        """
        Both pods hold exactly C{kept} (a L{Wire}) as their live stream.
        """
        self.assertIs(
            a.stream(b.announceAddress), kept.dialer if kept.dialer.owner is a else kept.acceptor
        )
        self.assertIs(
            b.stream(a.announceAddress), kept.dialer if kept.dialer.owner is b else kept.acceptor
        )

    def simultaneous(self, lowAddress, highAddress, order):
        """
        Pods at C{lowAddress} and C{highAddress} dial each other at once.
        """
        clock = Clock()
        clock.advance(NOW)
        low = makeStreams(lowAddress, clock=clock)
        high = makeStreams(highAddress, clock=clock)
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
            low, high, fromLow, fromHigh = self.simultaneous(
                "10.0.0.1:7090", "10.0.0.2:7090", order
            )
            self.assertTrue(fromHigh.lost, order)
            self.assertFalse(fromLow.lost, order)
            self.assertOneStream(low, high, fromLow)
            self.assertEqual((low.streamCount(), high.streamCount()), (1, 1))

    def test_simultaneousDialsOtherOrder(self):
        for order in ("interleaved", "lowFirst", "highFirst"):
            low, high, fromLow, fromHigh = self.simultaneous(
                "10.0.0.5:7090", "10.0.0.40:7090", order
            )
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
        low, high, fromLow, fromHigh = self.simultaneous(
            "10.0.0.1:7090", "10.0.0.2:7090", "highFirst"
        )
        self.assertEqual([e[0] for e in high.handler.events], ["up", "up"])
        self.assertIs(high.handler.events[-1][1], fromLow.acceptor)
        self.assertEqual([e[0] for e in low.handler.events], ["up", "up"])
        self.assertIs(low.handler.events[-1][1], fromLow.dialer)

    def test_stop(self):
        owner, one, tr1, _ = established(address="10.0.0.2:7090")
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
        owner, one, tr1, _ = established()
        d = owner.stop()
        self.assertFalse(tr1.disconnected)
        owner.clock.advance(streams.CLOSE_TIMEOUT)
        self.assertTrue(tr1.disconnected)
        lose(one)
        self.assertIsNone(self.successResultOf(d))


class SocketOptionTests(SynchronousTestCase):
    def test_noDelayAndKeepAlive(self):
        owner = makeStreams()
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
        owner = makeStreams()
        proto, tr = accept(owner)
        proto.dataReceived(b"\x14\xff\xff" + b"x" * 100)
        self.assertTrue(tr.disconnecting)
        self.assertEqual(dict(owner.counters.helloRejects), {frames.FIRST_FRAME_NOT_HELLO: 1})
        owner.clock.advance(20)
        self.assertEqual(dict(owner.counters.helloRejects), {frames.FIRST_FRAME_NOT_HELLO: 1})

    def test_oversizedHello(self):
        owner = makeStreams()
        proto, tr = accept(owner)
        proto.dataReceived(b"\x00\x01")
        self.assertFalse(tr.disconnecting)
        proto.dataReceived(b"\x2b")  # 299 bytes: one more than the largest HELLO
        self.assertTrue(tr.disconnecting)
        self.assertEqual(dict(owner.counters.helloRejects), {frames.MALFORMED: 1})
        owner.clock.advance(20)
        self.assertEqual(dict(owner.counters.helloRejects), {frames.MALFORMED: 1})

    def test_largestHelloWaitedFor(self):
        owner = makeStreams()
        proto, tr = accept(owner)
        hello = frames.helloFrame("h" * 250 + ":7090", NOW, SECRET)
        self.assertEqual(len(hello), 3 + frames.HELLO_MAX_PAYLOAD)
        proto.dataReceived(hello[:-1])
        self.assertFalse(tr.disconnecting)
        proto.dataReceived(hello[-1:])
        # Read and judged whole: a name is not the TCP peer's address.
        self.assertEqual(dict(owner.counters.helloRejects), {frames.ADDRESS_MISMATCH: 1})


class AttackTests(SynchronousTestCase):
    """
    The fabric trusts only its pods (issue 12, item 8). Each test replays an
    attack found against the original design: a HELLO signed for pod .2
    replayed from .9, a spoofed FWD source, a forged I_HAVE, eviction of a
    live stream, and the stream-up snapshot leaking local peer ids.
    """

    def setUp(self):
        self.logged = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)

    def replayFrom(self, owner, host, *after):
        """
        An attacker at C{host} replays pod .2's signed HELLO (captured within
        its window) and sends C{after} frames.
        """
        proto, tr = accept(owner, host)
        proto.dataReceived(frames.helloFrame("10.0.0.2:7090", NOW - 10, SECRET) + b"".join(after))
        return proto, tr

    def test_replayedHelloFromAnotherAddress(self):
        """
        The replay from .9 is refused at once: the real stream to .2 stays,
        nothing the attacker sends reaches the fabric, and it gets nothing
        (no snapshot of local peers).
        """
        owner, real, realTransport, remote = established()
        spoofedFWD = frames.fwdFrame(PEER_A, b"\x01\x03" + PEER_B + b"spoofed source")
        forged = frames.iHaveFrame(PEER_A, 0xFFFFFFFF)
        attacker, tr = self.replayFrom(owner, "10.0.0.9", spoofedFWD, forged)
        self.assertTrue(tr.disconnecting)
        self.assertEqual(tr.value(), b"")
        self.assertEqual(dict(owner.counters.helloRejects), {frames.ADDRESS_MISMATCH: 1})
        self.assertIs(owner.stream("10.0.0.2:7090"), real)
        self.assertFalse(realTransport.disconnecting)
        self.assertEqual(owner.handler.events, [])
        remote.send(frames.whoHasFrame(PEER_A))
        self.assertEqual(owner.handler.frames(), [frames.WhoHas(PEER_A)])

    def test_replayCannotEvictOurDialedStream(self):
        """
        The original attack: pod .3 dialed .2; a HELLO of .2 replayed from
        .9 won the "lower address dials" rule, closed the real stream, got
        the snapshot and had its FWD and I_HAVE handled. Now it is refused
        and the real stream stays.
        """
        owner = makeStreams("10.0.0.3:7090")
        owner.handler.streamUp = lambda stream: stream.send(frames.iHaveFrame(PEER_B, 1))
        real, endpoint, d = dialedStream(owner, "10.0.0.2:7090")
        realTransport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.2", 7090))
        real.makeConnection(realTransport)
        endpoint.result.callback(real)
        answer(real, realTransport)
        self.assertIs(owner.stream("10.0.0.2:7090"), real)
        attacker, tr = self.replayFrom(
            owner,
            "10.0.0.9",
            frames.fwdFrame(PEER_A, b"\x01\x03" + PEER_B + b"spoofed"),
            frames.iHaveFrame(PEER_A, 0xFFFFFFFF),
        )
        self.assertIs(owner.stream("10.0.0.2:7090"), real)
        self.assertFalse(realTransport.disconnecting)
        self.assertEqual(tr.value(), b"")
        self.assertEqual(owner.handler.frames(), [])

    def test_replayedHelloNoStreamYet(self):
        """
        Without a live stream to .2 the replay is refused the same way, so
        the real .2 is not locked out afterwards.
        """
        owner = makeStreams()
        attacker, tr = self.replayFrom(owner, "10.0.0.9", frames.whoHasFrame(PEER_A))
        self.assertTrue(tr.disconnecting)
        self.assertIsNone(owner.stream("10.0.0.2:7090"))
        owner, real, realTransport, remote = established(owner)
        self.assertIs(owner.stream("10.0.0.2:7090"), real)

    def test_replayFromTheRightAddressNeedsTheSecret(self):
        """
        Even from .2's own address (a spoofed source), the replayed HELLO
        does not make a stream: it must be followed by the handshake, and
        plain frames in its place close the connection.
        """
        owner, real, realTransport, remote = established()
        spoofedFWD = frames.fwdFrame(PEER_A, b"\x01\x03" + PEER_B + b"spoofed source")
        attacker, tr = self.replayFrom(owner, "10.0.0.2", spoofedFWD)
        self.assertTrue(tr.disconnecting)
        self.assertEqual(dict(owner.counters.helloRejects), {frames.NOT_SECURED: 1})
        self.assertIs(owner.stream("10.0.0.2:7090"), real)
        self.assertEqual(owner.handler.events, [])

    def test_replayedChallengeCannotConfirm(self):
        """
        Replaying a whole captured opening (HELLO and CHALLENGE) gets a fresh
        AUTH, but the captured CONFIRM does not match it.
        """
        owner = makeStreams()
        proto, tr = accept(owner)
        hello = frames.encodeHello("10.0.0.2:7090", NOW, SECRET)
        nonce = b"\x11" * 32
        proto.dataReceived(frames.encodeFrame(frames.HELLO, hello) + frames.challengeFrame(nonce))
        captured = frames.Handshake(SECRET, hello, nonce, b"\x44" * 32).dialerMAC
        proto.dataReceived(frames.confirmFrame(captured))
        self.assertTrue(tr.disconnecting)
        self.assertEqual(dict(owner.counters.helloRejects), {frames.AUTH_MISMATCH: 1})
        self.assertIsNone(owner.stream("10.0.0.2:7090"))

    def test_malformedProofRefused(self):
        """
        An AUTH (at the dialer) or CONFIRM (at the acceptor) of the wrong
        size is refused as malformed, and no stream is made.
        """
        owner = makeStreams()
        stream, endpoint, d = dialedStream(owner, "10.0.0.2:7090")
        tr = StringTransport()
        stream.makeConnection(tr)
        endpoint.result.callback(stream)
        stream.dataReceived(frames.encodeFrame(frames.AUTH, b"\x00" * (frames.AUTH_SIZE - 1)))
        self.assertTrue(tr.disconnecting)
        proto, tr = accept(owner)
        hello = frames.encodeHello("10.0.0.2:7090", NOW, SECRET)
        proto.dataReceived(
            frames.encodeFrame(frames.HELLO, hello) + frames.challengeFrame(b"\x11" * 32)
        )
        proto.dataReceived(frames.encodeFrame(frames.CONFIRM, b"\x00" * (frames.MAC_SIZE + 1)))
        self.assertTrue(tr.disconnecting)
        self.assertEqual(dict(owner.counters.helloRejects), {frames.MALFORMED: 2})
        self.assertIsNone(owner.stream("10.0.0.2:7090"))
        self.assertEqual(owner.handler.events, [])

    def test_injectedFramesCloseTheStream(self):
        """
        Frames forged into a live secured stream (a spoofed FWD source, a
        forged I_HAVE), or one of its own frames replayed, close it without
        being handled.
        """
        for forged in (
            frames.fwdFrame(PEER_A, b"\x01\x03" + PEER_B + b"spoofed source"),
            frames.iHaveFrame(PEER_A, 0xFFFFFFFF),
            b"replay",
        ):
            owner, proto, tr, remote = established()
            first = remote.seal(frames.whoHasFrame(PEER_B))
            proto.dataReceived(first)
            proto.dataReceived(first if forged == b"replay" else forged)
            self.assertEqual(owner.handler.frames(), [frames.WhoHas(PEER_B)])
            self.assertTrue(tr.disconnecting)
            self.assertEqual(owner.counters.dropped["frame_auth_mismatch"], 1)

    def test_dialerAuthenticatesAcceptor(self):
        """
        A dialed host that cannot prove the secret never becomes a stream:
        a wrong AUTH is refused, and so is one that stays silent.
        """
        owner = makeStreams()
        stream, endpoint, d = dialedStream(owner, "10.0.0.2:7090")
        tr = StringTransport()
        stream.makeConnection(tr)
        endpoint.result.callback(stream)
        answer(stream, tr, secret="not the secret")
        self.assertTrue(tr.disconnecting)
        self.assertEqual(dict(owner.counters.helloRejects), {frames.AUTH_MISMATCH: 1})
        self.assertIsNone(owner.stream("10.0.0.2:7090"))
        self.assertEqual(owner.handler.events, [])

        stream, endpoint, d = dialedStream(owner, "10.0.0.3:7090")
        tr = StringTransport()
        stream.makeConnection(tr)
        endpoint.result.callback(stream)
        owner.clock.advance(owner.settings.helloTimeout)
        self.assertTrue(tr.disconnecting)
        self.assertEqual(owner.counters.helloRejects[frames.TIMEOUT], 1)
        self.assertEqual(owner.handler.events, [])

    def test_impostorAcceptorSendingFrames(self):
        """
        A dialed host answering with fabric frames instead of AUTH (an
        impostor, or an original pod without compatibility mode) is refused.
        """
        owner = makeStreams()
        stream, endpoint, d = dialedStream(owner, "10.0.0.2:7090")
        tr = StringTransport()
        stream.makeConnection(tr)
        stream.dataReceived(frames.iHaveFrame(PEER_A, 1))
        self.assertTrue(tr.disconnecting)
        self.assertEqual(dict(owner.counters.helloRejects), {frames.NOT_SECURED: 1})
        self.assertEqual(owner.handler.events, [])

    def test_noEvictionWithoutProof(self):
        """
        In compatibility mode a signed HELLO without the handshake (from the
        right address: a spoofed source) never replaces a live stream,
        secured or not; a secured stream does replace an unsecured one.
        """
        owner, real, realTransport, remote = established(makeStreams(compat=True))
        second, tr2 = accept(owner)
        second.dataReceived(
            frames.helloFrame("10.0.0.2:7090", NOW - 1, SECRET) + frames.whoHasFrame(PEER_A)
        )
        self.assertTrue(tr2.disconnecting)
        self.assertIs(owner.stream("10.0.0.2:7090"), real)
        self.assertFalse(realTransport.disconnecting)
        self.assertEqual(owner.handler.events, [])

        owner, old, oldTransport = legacy(makeStreams(compat=True))
        third, tr3 = accept(owner)
        third.dataReceived(frames.helloFrame("10.0.0.2:7090", NOW - 2, SECRET))
        owner.clock.advance(owner.settings.upgradeWait)
        self.assertTrue(tr3.disconnecting)
        self.assertIs(owner.stream("10.0.0.2:7090"), old)

        secured, tr4 = accept(owner)
        Remote(secured, tr4)
        self.assertIs(owner.stream("10.0.0.2:7090"), secured)
        self.assertTrue(oldTransport.disconnecting)

    def test_replayedLegacyHelloRefused(self):
        """
        In compatibility mode an original pod's HELLO is taken once: the
        same HELLO again (a replay from its address) is refused.
        """
        owner, first, tr1 = legacy(makeStreams(compat=True))
        lose(first)
        again, tr2 = accept(owner)
        again.dataReceived(
            frames.helloFrame("10.0.0.2:7090", NOW, SECRET) + frames.whoHasFrame(PEER_A)
        )
        self.assertTrue(tr2.disconnecting)
        self.assertEqual(dict(owner.counters.helloRejects), {frames.REPLAYED: 1})
        self.assertIsNone(owner.stream("10.0.0.2:7090"))
        fresh, tr3 = accept(owner)
        fresh.dataReceived(
            frames.helloFrame("10.0.0.2:7090", NOW + 1, SECRET) + frames.whoHasFrame(PEER_A)
        )
        self.assertIs(owner.stream("10.0.0.2:7090"), fresh)

    def test_secretNeverLogged(self):
        owner = makeStreams()
        self.replayFrom(owner, "10.0.0.9")
        stream, endpoint, d = dialedStream(owner, "10.0.0.3:7090")
        tr = StringTransport()
        stream.makeConnection(tr)
        answer(stream, tr, secret="not the secret")
        self.assertNotEqual(self.logged, [])
        for event in self.logged:
            self.assertNotIn(SECRET, repr(event))


class CompatibilityTests(SynchronousTestCase):
    """
    Compatibility mode talks to original (Go) pods, which send a v2 HELLO,
    ignore frame types they do not know and never answer the handshake.
    """

    def test_originalPodDialsUs(self):
        owner = makeStreams(compat=True)
        proto, tr = accept(owner)
        proto.dataReceived(
            frames.helloFrame("10.0.0.2:7090", NOW, SECRET) + frames.whoHasFrame(PEER_A)
        )
        self.assertIs(owner.stream("10.0.0.2:7090"), proto)
        self.assertFalse(proto.secured)
        self.assertEqual(owner.handler.frames(), [frames.WhoHas(PEER_A)])
        self.assertEqual(tr.value(), b"")

    def test_silentOriginalPodDialsUs(self):
        owner = makeStreams(compat=True)
        proto, tr = accept(owner)
        proto.dataReceived(frames.helloFrame("10.0.0.2:7090", NOW, SECRET))
        owner.clock.advance(owner.settings.upgradeWait - 0.01)
        self.assertIsNone(owner.stream("10.0.0.2:7090"))
        owner.clock.advance(0.01)
        self.assertIs(owner.stream("10.0.0.2:7090"), proto)

    def test_weDialAnOriginalPod(self):
        """
        The original pod takes our HELLO (it ignores the CHALLENGE after
        it); it answers nothing, so after the upgrade wait the stream is
        live with plain frames.
        """
        owner = makeStreams(compat=True, pingInterval=15)
        stream, endpoint, d = dialedStream(owner, "10.0.0.2:7090")
        tr = StringTransport()
        stream.makeConnection(tr)
        endpoint.result.callback(stream)
        [(helloType, hello), (challengeType, _)] = frames.FrameReader().feed(tr.value())
        self.assertEqual(frames.decodeHello(hello, SECRET, NOW).address, "10.0.0.1:7090")
        self.assertEqual(challengeType, frames.CHALLENGE)
        tr.clear()
        owner.clock.advance(owner.settings.upgradeWait)
        self.assertIs(owner.stream("10.0.0.2:7090"), stream)
        self.assertFalse(stream.secured)
        owner.clock.advance(15)
        self.assertEqual(tr.value(), frames.pingFrame())

    def test_originalPodAnswersFirst(self):
        owner = makeStreams(compat=True)
        stream, endpoint, d = dialedStream(owner, "10.0.0.2:7090")
        tr = StringTransport()
        stream.makeConnection(tr)
        stream.dataReceived(frames.iHaveFrame(PEER_A, 3))
        self.assertIs(owner.stream("10.0.0.2:7090"), stream)
        self.assertEqual(owner.handler.frames(), [frames.IHave(PEER_A, 3)])

    def test_ourPodsStillSecured(self):
        """
        Two pods of this kind secure their stream in compatibility mode too.
        """
        owner = makeStreams(compat=True)
        stream, endpoint, d = dialedStream(owner, "10.0.0.2:7090")
        tr = StringTransport()
        stream.makeConnection(tr)
        answer(stream, tr)
        self.assertTrue(stream.secured)
        owner, proto, tr, remote = established(makeStreams(compat=True))
        self.assertTrue(proto.secured)

    def test_originalPodRefusedWithoutCompat(self):
        owner = makeStreams()
        proto, tr = accept(owner)
        proto.dataReceived(frames.helloFrame("10.0.0.2:7090", NOW, SECRET))
        owner.clock.advance(owner.settings.helloTimeout)
        self.assertTrue(tr.disconnecting)
        self.assertEqual(dict(owner.counters.helloRejects), {frames.TIMEOUT: 1})
        self.assertIsNone(owner.stream("10.0.0.2:7090"))


class CapTests(SynchronousTestCase):
    def test_pendingCap(self):
        """
        When the handshake slots are full the oldest pending connection makes
        room: idle strangers cannot keep a pod's dial out. A finished
        handshake frees its slot.
        """
        owner = makeStreams(maxPending=2)
        first, tr1 = accept(owner, "10.0.0.7")
        second, tr2 = accept(owner, "10.0.0.8")
        third, tr3 = accept(owner, "10.0.0.2")
        self.assertTrue(tr1.disconnected)
        self.assertFalse(tr2.disconnecting)
        self.assertEqual(dict(owner.counters.helloRejects), {frames.EVICTED: 1})
        Remote(third, tr3)
        self.assertIs(owner.stream("10.0.0.2:7090"), third)
        fourth, tr4 = accept(owner, "10.0.0.9")
        self.assertFalse(tr2.disconnecting)
        self.assertEqual(dict(owner.counters.helloRejects), {frames.EVICTED: 1})

    def test_perHostCap(self):
        owner = makeStreams(maxPendingPerHost=2)
        accept(owner, "10.0.0.7")
        accept(owner, "10.0.0.7")
        self.assertIsNone(owner.serverFactory().buildProtocol(IPv4Address("TCP", "10.0.0.7", 1)))
        self.assertEqual(dict(owner.counters.helloRejects), {frames.CONNECTION_LIMIT: 1})
        self.assertIsNotNone(owner.serverFactory().buildProtocol(IPv4Address("TCP", "10.0.0.2", 1)))

    def test_connectionCap(self):
        owner = makeStreams(maxConnections=1)
        established(owner)
        self.assertIsNone(owner.serverFactory().buildProtocol(IPv4Address("TCP", "10.0.0.7", 1)))
        self.assertEqual(owner.counters.helloRejects[frames.CONNECTION_LIMIT], 1)

    def test_bindsToAnnouncedAddress(self):
        reactor = MemoryReactorClock()
        endpoint = streams.tcpEndpoint(reactor, "10.0.0.2:7090", bindHost="10.0.0.1")
        endpoint.connect(Factory())
        self.assertEqual(reactor.tcpClients[0][4], ("10.0.0.1", 0))
        endpoint = streams.tcpEndpoint(reactor, "[fd00::2]:7090", bindHost="10.0.0.1")
        self.assertIsNone(endpoint._bindAddress)


# Streams without the relay's budget have one of their own, of the default size.
DEFAULT_BUDGET = LogBudget(None)


class LogBudgetTests(SynchronousTestCase):
    """
    Lines anyone who reaches the fabric port can cause share a log budget
    (L{relay.limits.LogBudget}); the counters still count every event.
    """

    def setUp(self):
        self.logged = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)

    def lines(self, word):
        return [e for e in self.logged if word in e.get("log_format", "")]

    def test_badHelloFlood(self):
        """
        A thousand strangers' bad HELLOs (each on its own connection) are
        all counted, give at most one budget's worth of lines and then one
        summary line with the rest.
        """
        owner = makeStreams()
        for _i in range(1000):
            proto, tr = accept(owner)
            proto.dataReceived(frames.helloFrame("10.0.0.2:7090", NOW, "not-the-secret"))
            self.assertTrue(tr.disconnecting)
            lose(proto)
        self.assertEqual(dict(owner.counters.helloRejects), {frames.HMAC_MISMATCH: 1000})
        self.assertEqual(len(self.lines("rejecting inter-pod stream")), DEFAULT_BUDGET.burst)
        owner.clock.advance(DEFAULT_BUDGET.window)
        [summary] = self.lines("were not logged")
        self.assertEqual(summary["count"], 1000 - DEFAULT_BUDGET.burst)

    def test_budgetShared(self):
        """
        A budget given to the streams (the relay's) is the one spent.
        """
        clock = Clock()
        clock.advance(NOW)
        budget = LogBudget(clock, burst=3)
        owner = makeStreams(clock=clock, noisyLog=budget)
        for _i in range(5):
            proto, tr = accept(owner)
            proto.dataReceived(b"\x7f\x00\x00")
            lose(proto)
        self.assertEqual(dict(owner.counters.helloRejects), {frames.FIRST_FRAME_NOT_HELLO: 5})
        self.assertEqual(len(self.lines("rejecting inter-pod stream")), 3)
        self.assertEqual(budget.suppressed, 2)

    def test_detailQuoted(self):
        """
        What a stranger wrote (a 255-byte announce address with control
        characters) is quoted and cut in the reject line.
        """
        owner = makeStreams()
        proto, tr = accept(owner, peerHost="10.0.0.9")
        address = "\x1b[31m" + "a" * 240 + "\n:7090"
        proto.dataReceived(frames.helloFrame(address, NOW, SECRET))
        [event] = self.lines("rejecting inter-pod stream")
        self.assertEqual(event["reason"], frames.ADDRESS_MISMATCH)
        detail = event["detail"]
        self.assertLessEqual(len(detail), 110)
        self.assertTrue(detail.endswith("..."), detail)
        self.assertNotIn("\x1b", detail)
        self.assertNotIn("\n", detail)

    def test_forgedFrameFlood(self):
        """
        Forged and malformed frames on live streams: every one counted,
        lines within the budget.
        """
        owner = makeStreams()
        for i in range(200):
            proto, tr = accept(owner)
            remote = Remote(proto, tr)
            if i % 2:
                proto.dataReceived(frames.whoHasFrame(PEER_A) + b"\x00" * frames.TAG_SIZE)
            else:
                remote.send(frames.encodeFrame(frames.WHO_HAS, b"\x00" * 3))
            self.assertTrue(tr.disconnecting)
            lose(proto)
        self.assertEqual(owner.counters.dropped["frame_auth_mismatch"], 100)
        self.assertEqual(owner.counters.dropped["malformed_frame"], 100)
        self.assertEqual(len(self.lines("cluster: closing")), DEFAULT_BUDGET.burst)
