"""
Peers over WebSocket: the Autobahn protocol and factory, driven through
string transports with hand-made RFC 6455 frames.
"""

import os

import autobahn.websocket.protocol
import txaio
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest

from relay import messages as m
from relay.internals.twisted import writeNow as _writeNow
from relay.listener.ws import (
    MAX_CONTROL_FRAMES_BEFORE_AUTH,
    MAX_FRAMES_PER_MESSAGE,
    MAX_UPGRADE_REQUEST,
    MESSAGES_PER_TURN,
    SENDER_PAUSE,
    PeerWebSocketFactory,
)
from tests.helpers import authMessage, makeRelay, stamped

A, B = m.peerID("peer-a"), m.peerID("peer-b")

UPGRADE = (
    "GET {path} HTTP/1.1\r\n"
    "Host: relay.example:443\r\n"
    "Upgrade: websocket\r\n"
    "Connection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    "Sec-WebSocket-Version: 13\r\n"
    "{extra}\r\n"
)


def clientFrame(payload, opcode=2, fin=True, mask=None):
    """
    A masked client frame (RFC 6455 section 5.2).
    """
    mask = os.urandom(4) if mask is None else mask
    n = len(payload)
    if n < 126:
        header = bytes((0x80 * fin | opcode, 0x80 | n))
    elif n < 65536:
        header = bytes((0x80 * fin | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        header = bytes((0x80 * fin | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def serverFrames(data):
    """
    C{(opcode, payload)} of every whole unmasked frame in C{data}.
    """
    frames = []
    while len(data) >= 2:
        opcode, n = data[0] & 0x0F, data[1] & 0x7F
        offset = 2
        if n == 126:
            n, offset = int.from_bytes(data[2:4], "big"), 4
        elif n == 127:
            n, offset = int.from_bytes(data[2:10], "big"), 10
        assert not data[1] & 0x80, "server frames are not masked"
        frames.append((opcode, data[offset : offset + n]))
        data = data[offset + n :]
    return frames


class Peer:
    """
    One client connection to the factory under test.
    """

    def __init__(self, factory, port):
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.1", port))
        self.protocol = factory.buildProtocol(self.transport.getPeer())
        self.protocol.makeConnection(self.transport)

    def upgrade(self, path="/relay", extra=""):
        self.protocol.dataReceived(UPGRADE.format(path=path, extra=extra).encode())
        response, _, rest = self.transport.value().partition(b"\r\n\r\n")
        self.transport.clear()
        self.pending = rest
        return response.split(b"\r\n")[0]

    def send(self, message, **kw):
        self.protocol.dataReceived(clientFrame(message, **kw))

    def received(self):
        data, self.pending = self.pending + self.transport.value(), b""
        self.transport.clear()
        return serverFrames(data)

    def messages(self):
        return [payload for opcode, payload in self.received() if opcode == 2]

    @property
    def closed(self):
        return self.transport.disconnecting or self.transport.disconnected


class PeerTestCase(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.relay = makeRelay(self.clock)
        self.factory = PeerWebSocketFactory(self.relay, self.clock, highWater=20000)
        self.ports = iter(range(40000, 50000))

    def peer(self):
        return Peer(self.factory, next(self.ports))

    def authenticated(self, name):
        peer = self.peer()
        self.assertIn(b"101", peer.upgrade())
        peer.send(authMessage(name))
        self.assertEqual(peer.messages(), [self.relay.authResponse])
        return peer

    def pair(self):
        return self.authenticated("peer-a"), self.authenticated("peer-b")

    def transports(self, count, size=100):
        return [m.encodeTransport(B, (b"%05d" % i) * (size // 5)) for i in range(count)]

    def expected(self, sent):
        return [stamped(x, A) for x in sent]

    def assertOnlyAClosed(self, a, b):
        self.assertTrue(a.closed)
        self.assertFalse(b.closed)
        b.send(m.encodeTransport(B, b"self"))
        self.assertEqual(b.messages(), [b"\x01\x03" + B + b"self"])


class WebSocketTests(PeerTestCase):
    def test_wrongPathRefused(self):
        peer = self.peer()
        status = peer.upgrade(path="/relay/x")
        self.assertEqual(status, b"HTTP/1.1 404 Not Found")
        self.assertTrue(peer.closed)

    def test_rootPathRefused(self):
        self.assertIn(b"404", self.peer().upgrade(path="/"))

    def test_foreignOriginRefused(self):
        status = self.peer().upgrade(extra="Origin: https://evil.example\r\n")
        self.assertEqual(status, b"HTTP/1.1 403 Forbidden")

    def test_sameOriginAccepted(self):
        status = self.peer().upgrade(extra="Origin: https://relay.example:443\r\n")
        self.assertIn(b"101", status)

    def test_exchange(self):
        a, b = self.authenticated("peer-a"), self.authenticated("peer-b")
        a.send(m.encodeTransport(B, b"hello"))
        self.assertEqual(b.messages(), [b"\x01\x03" + A + b"hello"])
        b.send(m.encodeTransport(A, b"x" * 1400))
        self.assertEqual(a.messages(), [b"\x01\x03" + B + b"x" * 1400])
        self.assertEqual(self.relay.counters.connections["websocket"], 2)

    def test_fragmentedMessage(self):
        a, b = self.authenticated("peer-a"), self.authenticated("peer-b")
        message = m.encodeTransport(B, b"fragmented")
        a.send(message[:10], fin=False)
        a.send(message[10:], opcode=0)
        self.assertEqual(b.messages(), [b"\x01\x03" + A + b"fragmented"])

    def test_pingAnswered(self):
        a = self.authenticated("peer-a")
        a.send(b"are you there", opcode=9)
        self.assertEqual(a.received(), [(10, b"are you there")])

    def test_textMessageCloses(self):
        a, b = self.authenticated("peer-a"), self.authenticated("peer-b")
        a.send(b"\x01\x05", opcode=1)
        self.assertOnlyAClosed(a, b)
        self.assertEqual(self.relay.counters.protocolErrors["text_message"], 1)

    def test_oversizedFrameCloses(self):
        a, b = self.authenticated("peer-a"), self.authenticated("peer-b")
        a.send(m.encodeTransport(B, b"")[:38] + b"x" * (8821 - 38))
        self.assertOnlyAClosed(a, b)
        self.assertEqual(b.messages(), [])
        self.assertEqual(self.relay.counters.protocolErrors["too_large"], 1)

    def test_oversizedFragmentedMessageCloses(self):
        a, b = self.authenticated("peer-a"), self.authenticated("peer-b")
        a.send(m.encodeTransport(B, b"x" * 5000), fin=False)
        a.send(b"y" * 5000, opcode=0)
        self.assertOnlyAClosed(a, b)
        self.assertEqual(self.relay.counters.protocolErrors["too_large"], 1)

    def test_oversizedFirstMessageIsAHandshakeReject(self):
        a = self.peer()
        a.upgrade()
        a.send(b"x" * 9000)
        self.assertTrue(a.closed)
        self.assertEqual(self.relay.counters.handshakeRejects["too_large"], 1)
        self.assertEqual(self.relay.counters.protocolErrors, {})

    def test_handshakeFailureSendsNothing(self):
        a = self.peer()
        a.upgrade()
        a.send(authMessage("peer-a", secret="wrong"))
        self.assertEqual(a.received(), [])
        self.assertTrue(a.closed)

    def test_handshakeTimeoutCoversUpgrade(self):
        a = self.peer()
        self.clock.advance(10)
        self.assertTrue(a.closed)
        self.assertEqual(self.relay.counters.handshakeRejects["timeout"], 1)

    def test_connectionLostUnregisters(self):
        a = self.authenticated("peer-a")
        a.protocol.connectionLost(Failure(ConnectionLost("gone")))
        self.assertIsNone(self.relay.store.peers.get(A))
        self.assertEqual(self.relay.counters.connections["websocket"], 0)

    def test_slowConsumerDropsAndCounts(self):
        a, b = self.authenticated("peer-a"), self.authenticated("peer-b")
        b.transport.producer.pauseProducing()
        message = m.encodeTransport(B, b"x" * 1400)
        for _ in range(20):
            a.send(message)
        # 20000 bytes of backlog hold 13 frames of 1442 bytes; the rest drop.
        self.assertEqual(len(b.messages()), 13)
        self.assertEqual(self.relay.counters.dropped["slow_consumer"], 7)
        b.transport.producer.resumeProducing()
        a.send(message)
        self.assertEqual(len(b.messages()), 1)

    def test_slowConsumerDoesNotAffectOthers(self):
        a, b, c = (
            self.authenticated("peer-a"),
            self.authenticated("peer-b"),
            self.authenticated("peer-c"),
        )
        b.transport.producer.pauseProducing()
        for _ in range(30):
            a.send(m.encodeTransport(B, b"x" * 1400))
            a.send(m.encodeTransport(m.peerID("peer-c"), b"y"))
        self.assertEqual(len(c.messages()), 30)

    def test_gracefulShutdown(self):
        a = self.authenticated("peer-a")
        self.relay.shutdown()
        frames = a.received()
        self.assertEqual(frames[0], (2, b"\x01\x04"))
        self.assertEqual(frames[1][0], 8)
        self.assertEqual(frames[1][1][:2], (1000).to_bytes(2, "big"))

    def test_gracefulShutdownBoundedByTimeout(self):
        a = self.authenticated("peer-a")
        self.relay.shutdown()
        self.assertFalse(a.transport.disconnected)
        self.clock.advance(2.9)
        self.assertFalse(a.transport.disconnecting)
        self.clock.advance(0.1)
        self.assertTrue(a.closed)


class UpgradeRequestTests(PeerTestCase):
    """
    The upgrade request is bounded and searched once per read.
    """

    def request(self, padding):
        head = UPGRADE.format(path="/relay", extra="")
        return (head[:-2] + "X-Pad: " + "p" * padding + "\r\n\r\n").encode()

    def test_largestAccepted(self):
        request = self.request(0)
        request = self.request(MAX_UPGRADE_REQUEST - len(request))
        self.assertEqual(len(request), MAX_UPGRADE_REQUEST)
        peer = self.peer()
        peer.protocol.dataReceived(request)
        self.assertTrue(peer.transport.value().startswith(b"HTTP/1.1 101 "))

    def test_oneByteMoreRefused(self):
        request = self.request(0)
        request = self.request(MAX_UPGRADE_REQUEST - len(request) + 1)
        peer = self.peer()
        peer.protocol.dataReceived(request)
        self.assertTrue(peer.transport.value().startswith(b"HTTP/1.1 431 "))
        self.assertTrue(peer.transport.disconnecting)
        self.assertEqual(self.relay.counters.handshakeRejects["request_too_large"], 1)

    def test_endlessRequestRefusedAtTheLimit(self):
        """
        A request that never ends is refused once it passes the limit, and
        nothing it sends later is read.
        """
        peer = self.peer()
        peer.protocol.dataReceived(b"GET /relay HTTP/1.1\r\nX-Pad: ")
        for _ in range(MAX_UPGRADE_REQUEST // 1000):
            peer.protocol.dataReceived(b"p" * 1000)
        self.assertFalse(peer.closed)
        peer.protocol.dataReceived(b"p" * 1000)
        self.assertTrue(peer.transport.value().startswith(b"HTTP/1.1 431 "))
        self.assertTrue(peer.transport.disconnecting)
        self.assertFalse(peer.transport.disconnected, "the answer is written before the close")
        peer.protocol.dataReceived(b"p" * 100000 + b"\r\n\r\n")
        self.assertEqual(self.relay.counters.handshakeRejects["request_too_large"], 1)
        self.assertEqual(self.relay.admission.pending, 1)
        peer.protocol.connectionLost(Failure(ConnectionLost("gone")))
        self.assertEqual(self.relay.admission.pending, 0)

    def test_searchedOncePerRead(self):
        """
        Autobahn is handed the request once, whole: searching its buffer
        from the start on every read made a large request quadratic.
        """
        peer = self.peer()
        calls = []
        handshake = peer.protocol.processHandshake
        peer.protocol.processHandshake = lambda: (
            calls.append(len(peer.protocol.data)),
            handshake(),
        )
        request = self.request(8000)
        for i in range(0, len(request), 10):
            peer.protocol.dataReceived(request[i : i + 10])
        self.assertTrue(peer.transport.value().startswith(b"HTTP/1.1 101 "))
        self.assertEqual(calls, [len(request)])

    def test_endSplitAcrossReads(self):
        request = UPGRADE.format(path="/relay", extra="").encode()
        for cut in range(1, 4):
            peer = self.peer()
            peer.protocol.dataReceived(request[:-cut])
            self.assertEqual(peer.transport.value(), b"")
            peer.protocol.dataReceived(request[-cut:] + clientFrame(authMessage(f"peer-{cut}")))
            frames = serverFrames(peer.transport.value().partition(b"\r\n\r\n")[2])
            self.assertEqual(frames, [(2, self.relay.authResponse)])


class ControlFrameTests(PeerTestCase):
    """
    PING and PONG frames: bounded before Auth, cheap after, and PONG answers
    never queue up behind a client that does not read.
    """

    def test_fewBeforeAuthAnswered(self):
        a = self.peer()
        a.upgrade()
        for i in range(MAX_CONTROL_FRAMES_BEFORE_AUTH):
            a.send(b"%d" % i, opcode=9)
        self.assertEqual(len(a.received()), MAX_CONTROL_FRAMES_BEFORE_AUTH)
        a.send(authMessage("peer-a"))
        self.assertEqual(a.messages(), [self.relay.authResponse])

    def test_runBeforeAuthCounted(self):
        a = self.peer()
        a.upgrade()
        a.protocol.dataReceived(
            b"".join(clientFrame(b"", opcode=9) for _ in range(MAX_CONTROL_FRAMES_BEFORE_AUTH - 1))
            + clientFrame(b"x", opcode=9)
        )
        self.assertEqual(a.received(), [(10, b"x")])
        a.protocol.dataReceived(clientFrame(b"", opcode=9))
        self.assertTrue(a.closed)
        self.assertEqual(self.relay.counters.handshakeRejects["control_frames"], 1)

    def test_tooManyBeforeAuthRefused(self):
        a = self.peer()
        a.upgrade()
        a.protocol.dataReceived(
            b"".join(clientFrame(b"", opcode=10) for _ in range(MAX_CONTROL_FRAMES_BEFORE_AUTH + 1))
        )
        self.assertTrue(a.closed)
        self.assertEqual(self.relay.counters.handshakeRejects["control_frames"], 1)
        self.assertEqual(self.relay.admission.pending, 1)
        a.protocol.connectionLost(Failure(ConnectionLost("gone")))
        self.assertEqual(self.relay.admission.pending, 0)

    def test_tooManyBeforeAuthInsideAMessageRefused(self):
        a = self.peer()
        a.upgrade()
        a.send(b"\x01", fin=False)
        for _ in range(MAX_CONTROL_FRAMES_BEFORE_AUTH + 1):
            a.send(b"", opcode=9)
        self.assertTrue(a.closed)
        self.assertEqual(self.relay.counters.handshakeRejects["control_frames"], 1)

    def test_manyAfterAuthAllowed(self):
        a = self.authenticated("peer-a")
        for _ in range(10):
            a.protocol.dataReceived(b"".join(clientFrame(b"", opcode=10) for _ in range(1000)))
        self.assertFalse(a.closed)
        self.assertEqual(a.received(), [])

    def test_latestPingOfAReadAnswered(self):
        a, b = self.pair()
        sent = self.transports(2)
        pings = b"".join(clientFrame(b"%d" % i, opcode=9) for i in range(500))
        a.protocol.dataReceived(clientFrame(sent[0]) + pings + clientFrame(sent[1]))
        self.assertEqual(a.received(), [(10, b"499")])
        self.assertEqual(b.messages(), self.expected(sent))

    def test_runOfEmptyControlFrames(self):
        """
        Empty PINGs and PONGs in a row, split anywhere: the latest PING of
        each read is answered, and frames around the run are delivered.
        """
        a, b = self.pair()
        sent = self.transports(2)
        run = b"".join(clientFrame(b"", opcode=op) for op in (9, 10, 10, 9, 10))
        stream = clientFrame(sent[0]) + run + clientFrame(b"last", opcode=9) + clientFrame(sent[1])
        for cut in range(len(stream)):
            a.protocol.dataReceived(stream[:cut])
            a.protocol.dataReceived(stream[cut:])
            self.assertEqual(b.messages(), self.expected(sent))
            self.assertEqual(a.received()[-1], (10, b"last"))
        self.assertFalse(a.closed)

    def test_pongsWaitForACongestedPeer(self):
        """
        A client that sends PINGs and never reads is owed one PONG, the
        latest, written once its buffer drains: the relay does not grow.
        """
        a = self.authenticated("peer-a")
        a.transport.producer.pauseProducing()
        for i in range(1000):
            a.send(b"ping %d" % i, opcode=9)
        self.assertEqual(a.transport.value(), b"")
        a.transport.producer.resumeProducing()
        self.assertEqual(a.received(), [(10, b"ping 999")])
        a.transport.producer.resumeProducing()
        self.assertEqual(a.received(), [])

    def test_pongsWaitInsideAFragmentedMessage(self):
        a = self.authenticated("peer-a")
        a.transport.producer.pauseProducing()
        a.send(b"\x01", fin=False)
        for i in range(MAX_FRAMES_PER_MESSAGE - 1):
            a.send(b"ping %d" % i, opcode=9)
        self.assertEqual(a.transport.value(), b"")
        a.transport.producer.resumeProducing()
        self.assertEqual(a.received(), [(10, b"ping %d" % (MAX_FRAMES_PER_MESSAGE - 2))])

    def test_controlFramesInsideAMessageBounded(self):
        a, b = self.pair()
        a.send(b"\x01", fin=False)
        for _ in range(MAX_FRAMES_PER_MESSAGE):
            a.send(b"", opcode=10)
        self.assertOnlyAClosed(a, b)
        self.assertEqual(self.relay.counters.protocolErrors["fragments"], 1)

    def test_emptyFragmentsBounded(self):
        a, b = self.pair()
        a.send(b"\x01", fin=False)
        a.protocol.dataReceived(
            b"".join(clientFrame(b"", opcode=0, fin=False) for _ in range(MAX_FRAMES_PER_MESSAGE))
        )
        self.assertOnlyAClosed(a, b)
        self.assertEqual(self.relay.counters.protocolErrors["fragments"], 1)

    def test_fragmentedMessageWithinTheBound(self):
        a, b = self.pair()
        message = m.encodeTransport(B, b"x" * (MAX_FRAMES_PER_MESSAGE - 38))
        a.send(message[:1], fin=False)
        for i in range(1, MAX_FRAMES_PER_MESSAGE - 1):
            a.send(message[i : i + 1], opcode=0, fin=False)
        a.send(message[MAX_FRAMES_PER_MESSAGE - 1 :], opcode=0)
        self.assertEqual(b.messages(), [stamped(message, A)])

    def test_leanPathTakesOverAfterAFragmentedMessage(self):
        """
        Once Autobahn is between frames again, an incomplete frame header it
        holds goes back to the lean path with the rest of the stream.
        """
        a, b = self.pair()
        sent = self.transports(2)
        ping = clientFrame(b"", opcode=9)
        a.protocol.dataReceived(
            clientFrame(sent[0][:20], fin=False) + clientFrame(sent[0][20:], opcode=0) + ping[:3]
        )
        self.assertTrue(a.protocol._fast)
        a.protocol.dataReceived(ping[3:] + clientFrame(sent[1]))
        self.assertEqual(b.messages(), self.expected(sent))
        self.assertEqual(a.received(), [(10, b"")])


class LeanPathTests(PeerTestCase):
    """
    The lean frame path against the RFC 6455 cases it must leave to
    Autobahn or get exactly right itself.
    """

    def test_manyFramesInOneRead(self):
        a, b = self.pair()
        sent = self.transports(50, size=1400)
        a.protocol.dataReceived(b"".join(clientFrame(x) for x in sent))
        self.assertEqual(b.messages(), self.expected(sent))

    def test_splitAtEveryBoundary(self):
        a, b = self.pair()
        sent = self.transports(3, size=200) + [m.encodeTransport(B, b"")]
        stream = b"".join(clientFrame(x) for x in sent)
        for cut in range(1, len(stream)):
            a.protocol.dataReceived(stream[:cut])
            a.protocol.dataReceived(stream[cut:])
            self.assertEqual(b.messages(), self.expected(sent), f"cut at {cut}")

    def test_byteByByte(self):
        a, b = self.pair()
        sent = self.transports(3, size=300)
        for byte in b"".join(clientFrame(x) for x in sent):
            a.protocol.dataReceived(bytes((byte,)))
        self.assertEqual(b.messages(), self.expected(sent))

    def test_controlFrameBetween(self):
        a, b = self.pair()
        sent = self.transports(4)
        a.protocol.dataReceived(
            clientFrame(sent[0])
            + clientFrame(sent[1])
            + clientFrame(b"ping!", opcode=9)
            + clientFrame(sent[2])
        )
        a.protocol.dataReceived(clientFrame(sent[3]))
        self.assertEqual(b.messages(), self.expected(sent))
        self.assertEqual(a.received(), [(10, b"ping!")])

    def test_fragmentedBetween(self):
        a, b = self.pair()
        sent = self.transports(3)
        a.protocol.dataReceived(
            clientFrame(sent[0])
            + clientFrame(sent[1][:20], fin=False)
            + clientFrame(sent[1][20:], opcode=0)
            + clientFrame(sent[2])
        )
        self.assertEqual(b.messages(), self.expected(sent))

    def test_sixteenBitLength(self):
        a, b = self.pair()
        sent = [m.encodeTransport(B, b"z" * (8820 - 38))]
        a.send(sent[0])
        self.assertEqual(b.messages(), self.expected(sent))

    def test_unmaskedFrameFails(self):
        a, b = self.pair()
        a.protocol.dataReceived(bytes((0x82, 40)) + m.encodeTransport(B, b"xx"))
        self.assertOnlyAClosed(a, b)

    def test_reservedBitFails(self):
        a, b = self.pair()
        frame = bytearray(clientFrame(m.encodeTransport(B, b"xx")))
        frame[0] |= 0x40
        a.protocol.dataReceived(bytes(frame))
        self.assertOnlyAClosed(a, b)

    def test_framesAfterProtocolErrorIgnored(self):
        a, b = self.pair()
        sent = self.transports(2)
        a.protocol.dataReceived(
            clientFrame(sent[0]) + clientFrame(b"\x02\x03" + B) + clientFrame(sent[1])
        )
        self.assertEqual(b.messages(), self.expected(sent[:1]))
        self.assertTrue(a.closed)

    def test_closeFrameAnswered(self):
        a, b = self.pair()
        a.send((1000).to_bytes(2, "big") + b"bye", opcode=8)
        frames = a.received()
        self.assertEqual(frames[0][0], 8)
        self.assertTrue(a.closed)
        self.assertFalse(b.closed)

    def test_autobahnDebugArgumentsOnlyWhenDebugging(self):
        """
        The options Autobahn pretty-prints for a debug line on every
        connection are only formatted when txaio passes debug lines on.
        """
        level = txaio.get_global_log_level()
        self.addCleanup(txaio.set_global_log_level, level)
        self.assertEqual(autobahn.websocket.protocol.pformat([("a", 1)]), "")
        txaio.set_global_log_level("debug")
        self.assertEqual(autobahn.websocket.protocol.pformat([("a", 1)]), "[('a', 1)]")

    def test_serverFramesUnmaskedWithMinimalHeader(self):
        a, b = self.pair()
        a.send(m.encodeTransport(B, b"x" * 87))
        raw = b.transport.value()
        self.assertEqual(raw[:2], bytes((0x82, 125)))
        a.send(m.encodeTransport(B, b"x" * 88))
        self.assertEqual(b.transport.value()[127:131], bytes((0x82, 126, 0, 126)))


class CountingTransport(StringTransport):
    """
    A string transport that counts its writes.
    """

    writes = 0

    def write(self, data):
        self.writes += 1
        super().write(data)


class BatchTests(PeerTestCase):
    """
    Frames relayed while one read is taken apart are written once per
    destination, after the read, in order.
    """

    def test_oneWritePerDestinationPerRead(self):
        a, b = self.pair()
        c = self.authenticated("peer-c")
        for peer in (b, c):
            counting = CountingTransport(peerAddress=peer.transport.getPeer())
            peer.protocol.transport = counting
            peer.transport = counting
        C = m.peerID("peer-c")
        toB, toC = self.transports(5), [m.encodeTransport(C, b"c%d" % i) for i in range(5)]
        interleaved = [x for both in zip(toB, toC) for x in both]
        a.protocol.dataReceived(b"".join(clientFrame(x) for x in interleaved))
        self.assertEqual((b.transport.writes, c.transport.writes), (1, 1))
        self.assertEqual(b.messages(), self.expected(toB))
        self.assertEqual(c.messages(), [stamped(x, A) for x in toC])
        self.assertEqual(self.factory.batched, [])
        self.assertFalse(self.factory.batching)

    def test_writesOutsideAReadAreImmediate(self):
        """
        A message that does not come from a WebSocket read (the fabric, a
        QUIC peer, a health check) is written at once.
        """
        a, b = self.pair()
        self.relay.route(B, stamped(m.encodeTransport(B, b"from elsewhere"), A))
        self.assertEqual(b.messages(), [stamped(m.encodeTransport(B, b"from elsewhere"), A)])
        self.assertEqual(self.factory.batched, [])

    def test_batchFlushedWhenSenderFails(self):
        """
        Frames taken before a protocol error in the same read are still
        delivered.
        """
        a, b = self.pair()
        sent = self.transports(3)
        a.protocol.dataReceived(b"".join(clientFrame(x) for x in sent) + clientFrame(b"\x02\x7f"))
        self.assertTrue(a.closed)
        self.assertEqual(b.messages(), self.expected(sent))


class _FakeTCP:
    """
    The parts of L{twisted.internet.tcp.Connection} that L{relay.internals.twisted.writeNow} uses;
    the socket takes C{accept} bytes, or fails with C{error}.
    """

    def __init__(self, accept=None, error=None):
        self.dataBuffer = b""
        self._tempDataLen = 0
        self.connected = True
        self.disconnecting = False
        self.accept = accept
        self.error = error
        self.sent = []
        self.written = []

    def writeSomeData(self, data):
        if self.error is not None:
            return self.error
        n = len(data) if self.accept is None else min(self.accept, len(data))
        self.sent.append(bytes(data[:n]))
        return n

    def write(self, data):
        self.written.append(data)


class WriteNowTests(unittest.SynchronousTestCase):
    def test_straightToTheSocket(self):
        t = _FakeTCP()
        _writeNow(t, b"abc")
        self.assertEqual((t.sent, t.written), ([b"abc"], []))

    def test_restQueued(self):
        t = _FakeTCP(accept=2)
        _writeNow(t, b"abcde")
        self.assertEqual((t.sent, t.written), ([b"ab"], [b"cde"]))

    def test_nothingJumpsTheQueue(self):
        for queued in ({"dataBuffer": b"x"}, {"_tempDataLen": 1}):
            t = _FakeTCP()
            t.__dict__.update(queued)
            _writeNow(t, b"abc")
            self.assertEqual((t.sent, t.written), ([], [b"abc"]), queued)

    def test_closingConnectionLeftToTwisted(self):
        for state in ({"connected": False}, {"disconnecting": True}):
            t = _FakeTCP()
            t.__dict__.update(state)
            _writeNow(t, b"abc")
            self.assertEqual((t.sent, t.written), ([], [b"abc"]), state)

    def test_errorLeftToTwisted(self):
        """
        A send error is not handled here: the data goes to C{write}, and
        Twisted finds the error on its next attempt and closes the
        connection the usual way.
        """
        t = _FakeTCP(error=ConnectionLost())
        _writeNow(t, b"abc")
        self.assertEqual(t.written, [b"abc"])


class TurnTests(PeerTestCase):
    """
    A read holding many messages is delivered MESSAGES_PER_TURN at a time,
    one batch per reactor turn, the socket unread meanwhile.
    """

    def test_readSpreadOverTurns(self):
        a, b = self.pair()
        sent = [m.encodeTransport(B, b"%04d" % i) for i in range(MESSAGES_PER_TURN * 3 + 5)]
        a.protocol.dataReceived(b"".join(clientFrame(x) for x in sent))
        delivered = b.messages()
        self.assertEqual(delivered, self.expected(sent[:MESSAGES_PER_TURN]))
        self.assertEqual(a.transport.producerState, "paused")
        for _turn in range(3):
            self.clock.advance(0)
            delivered += b.messages()
        self.assertEqual(delivered, self.expected(sent))
        self.assertEqual(a.transport.producerState, "producing")
        self.assertEqual(
            [c for c in self.clock.getDelayedCalls() if c.getTime() <= self.clock.seconds()], []
        )

    def test_wholeTurnNotPaused(self):
        a, b = self.pair()
        sent = self.transports(MESSAGES_PER_TURN, size=10)
        a.protocol.dataReceived(b"".join(clientFrame(x) for x in sent))
        self.assertEqual(b.messages(), self.expected(sent))
        self.assertEqual(a.transport.producerState, "producing")

    def test_senderPauseOutlastsTheTurn(self):
        a, b = self.pair()
        a.protocol.dataReceived(
            b"".join(clientFrame(x) for x in self.transports(MESSAGES_PER_TURN + 1, size=10))
        )
        a.protocol.pauseReading()
        a.protocol.resumeReading()
        self.assertEqual(a.transport.producerState, "paused", "the turn is not done")
        a.protocol.pauseReading()
        self.clock.advance(0)
        self.assertEqual(len(b.messages()), MESSAGES_PER_TURN + 1)
        self.assertEqual(a.transport.producerState, "paused", "the sender pause is not over")
        self.clock.advance(SENDER_PAUSE)
        self.assertEqual(a.transport.producerState, "producing")

    def test_connectionLostCancelsTheTurn(self):
        a, b = self.pair()
        a.protocol.dataReceived(
            b"".join(clientFrame(x) for x in self.transports(MESSAGES_PER_TURN + 1, size=10))
        )
        a.protocol.connectionLost(Failure(ConnectionLost("gone")))
        self.clock.advance(0)
        self.assertEqual(len(b.messages()), MESSAGES_PER_TURN)


class SenderPauseTests(PeerTestCase):
    """
    A WebSocket sender whose message was dropped for a congested
    destination is left unread until the destination drains, or for
    SENDER_PAUSE.
    """

    def congested(self):
        a, b, c = (
            self.authenticated("peer-a"),
            self.authenticated("peer-b"),
            self.authenticated("peer-c"),
        )
        b.transport.producer.pauseProducing()
        for _ in range(14):
            a.send(m.encodeTransport(B, b"x" * 1400))
        self.assertEqual(self.relay.counters.dropped["slow_consumer"], 1)
        return a, b, c

    def test_pausedAfterADrop(self):
        a, b, c = self.congested()
        self.assertEqual(a.transport.producerState, "paused")
        self.assertEqual(c.transport.producerState, "producing")
        self.assertEqual(self.relay.counters.senderPauses, 1)

    def test_resumedAfterThePause(self):
        a, b, c = self.congested()
        self.clock.advance(SENDER_PAUSE * 0.99)
        self.assertEqual(a.transport.producerState, "paused")
        self.clock.advance(SENDER_PAUSE * 0.01)
        self.assertEqual(a.transport.producerState, "producing")

    def test_resumedWhenTheDestinationDrains(self):
        a, b, c = self.congested()
        pending = len(self.clock.getDelayedCalls())
        b.transport.producer.resumeProducing()
        self.assertEqual(a.transport.producerState, "producing")
        self.assertEqual(len(self.clock.getDelayedCalls()), pending - 1)
        self.clock.advance(SENDER_PAUSE)
        self.assertEqual(a.transport.producerState, "producing")

    def test_resumedWhenTheDestinationLeaves(self):
        a, b, c = self.congested()
        b.transport.producer.stopProducing()
        self.assertEqual(a.transport.producerState, "producing")

    def test_morePausesWhileTheFloodGoesOn(self):
        a, b, c = self.congested()
        a.send(m.encodeTransport(B, b"x" * 1400))
        self.assertEqual(self.relay.counters.senderPauses, 1, "already paused")
        self.clock.advance(SENDER_PAUSE)
        a.send(m.encodeTransport(B, b"x" * 1400))
        self.assertEqual(a.transport.producerState, "paused")
        self.assertEqual(self.relay.counters.senderPauses, 2)
        self.assertEqual(self.relay.counters.dropped["slow_consumer"], 3)

    def test_mostlyHealthyReadNotPaused(self):
        """
        A sender whose read mostly reaches healthy peers is not paused for
        the odd drop; one whose read is mostly dropped is.
        """
        a, b, c = self.congested()
        self.clock.advance(SENDER_PAUSE)
        C = m.peerID("peer-c")
        toB, toC = m.encodeTransport(B, b"x" * 1400), m.encodeTransport(C, b"y" * 1400)
        a.protocol.dataReceived(clientFrame(toB) + clientFrame(toC) + clientFrame(toC))
        self.assertEqual(self.relay.counters.dropped["slow_consumer"], 2)
        self.assertEqual(a.transport.producerState, "producing")
        self.assertEqual(self.relay.counters.senderPauses, 1)
        a.protocol.dataReceived(clientFrame(toB) + clientFrame(toB) + clientFrame(toC))
        self.assertEqual(a.transport.producerState, "paused")
        self.assertEqual(self.relay.counters.senderPauses, 2)
        self.assertEqual(len(c.messages()), 3)

    def test_otherSendersUntouched(self):
        a, b, c = self.congested()
        c.send(m.encodeTransport(A, b"hello"))
        self.assertEqual(
            a.messages(), [stamped(m.encodeTransport(A, b"hello"), m.peerID("peer-c"))]
        )
        self.assertEqual(c.transport.producerState, "producing")

    def test_senderGoneWhilePaused(self):
        a, b, c = self.congested()
        a.protocol.connectionLost(Failure(ConnectionLost("gone")))
        self.assertEqual(
            [
                call
                for call in self.clock.getDelayedCalls()
                if call.func == a.protocol.resumeReading
            ],
            [],
        )
        b.transport.producer.resumeProducing()

    def test_dropsOutsideAReadPauseNobody(self):
        """
        Messages from the fabric or QUIC are dropped but nobody is paused:
        one of those streams carries many peers.
        """
        a, b, c = self.congested()
        self.clock.advance(SENDER_PAUSE)
        self.relay.route(B, stamped(m.encodeTransport(B, b"x" * 1400), A))
        self.assertEqual(self.relay.counters.dropped["slow_consumer"], 2)
        self.assertEqual(self.relay.counters.senderPauses, 1)
        self.assertEqual(a.transport.producerState, "producing")

    def test_dropsOnTheAutobahnPathPauseNobody(self):
        """
        A drop of a fragmented message (Autobahn's path) neither pauses its
        sender nor counts towards the pause of its next lean read.
        """
        a, b, c = self.congested()
        self.clock.advance(SENDER_PAUSE)
        message = m.encodeTransport(B, b"x" * 1400)
        a.protocol.dataReceived(
            clientFrame(message[:700], fin=False) + clientFrame(message[700:], opcode=0)
        )
        self.assertEqual(self.relay.counters.dropped["slow_consumer"], 2)
        self.assertEqual(a.transport.producerState, "producing")
        a.send(m.encodeTransport(m.peerID("peer-c"), b"y" * 1400))
        self.assertEqual(len(c.messages()), 1)
        self.assertEqual(a.transport.producerState, "producing")
        self.assertEqual(self.relay.counters.senderPauses, 1)


class BatchPropertyTests(PeerTestCase):
    """
    Whatever the mix of destinations, frame sizes and read boundaries, every
    destination gets exactly its messages, in the order sent.
    """

    @settings(derandomize=True, max_examples=150, deadline=None, database=None)
    @given(
        st.lists(st.tuples(st.integers(0, 2), st.integers(0, 400)), min_size=1, max_size=40),
        st.lists(st.integers(1, 3000), max_size=20),
    )
    def test_everyDestinationInOrder(self, plan, cuts):
        self.setUp()
        a = self.authenticated("peer-a")
        names = ["peer-b", "peer-c", "peer-d"]
        receivers = [self.authenticated(name) for name in names]
        sent = [
            m.encodeTransport(m.peerID(names[d]), b"%04d" % i + b"z" * size)
            for i, (d, size) in enumerate(plan)
        ]
        stream = b"".join(clientFrame(x) for x in sent)
        position = 0
        for cut in cuts + [len(stream)]:
            a.protocol.dataReceived(stream[position : position + cut])
            position += cut
        for d, receiver in enumerate(receivers):
            mine = [stamped(x, A) for x, (dest, _) in zip(sent, plan) if dest == d]
            self.assertEqual(receiver.messages(), mine)
        self.assertEqual(self.factory.batched, [])
