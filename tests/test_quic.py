"""
Peers over QUIC (relay.listener.quic): aioquic connections driven by Twisted.

Most tests run the relay's QUIC protocol and aioquic clients over an
in-memory datagram network on a L{Clock}, so timeouts are exact and instant;
the last class runs them over real UDP on 127.0.0.1 beside a WebSocket
listener sharing the same relay.
"""

import errno
import os
import socket
from collections import deque

from aioquic import tls
from aioquic.buffer import Buffer
from aioquic.quic import events
from aioquic.quic.crypto import NoCallback
from aioquic.quic.packet import QuicErrorCode, QuicProtocolVersion, pull_quic_header
from aioquic.tls import AlertDescription
from twisted.internet import defer, error, reactor, task
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.trial import unittest

from relay import client, quicclient
from relay import messages as m
from relay.auth import TokenValidator, generateToken
from relay.limits import Limits
from relay.listener import quic
from relay.listener.ws import PeerWebSocketFactory
from relay.relay import ConfigurationError, Relay
from relay.store import Store
from tests.certs import writeCertificate
from tests.helpers import NOW, SECRET, connect, makeRelay

A, B, C = m.peerID("peer-a"), m.peerID("peer-b"), m.peerID("peer-c")
SERVER = ("127.0.0.1", 4433)
TOKEN = generateToken(SECRET, NOW + 3600)


def assertTLSRefusal(test, errorCode):
    """
    C{errorCode} closes a connection for a TLS alert: no_application_protocol
    from aioquic 1.5 on, handshake_failure before.
    """
    test.assertIn(
        errorCode,
        (
            QuicErrorCode.CRYPTO_ERROR + AlertDescription.no_application_protocol,
            QuicErrorCode.CRYPTO_ERROR + AlertDescription.handshake_failure,
        ),
    )


class FakeUDPTransport:
    """
    One endpoint's socket on a L{Network}.
    """

    def __init__(self, network, addr):
        self.network = network
        self.addr = addr
        self.stopped = False

    def write(self, data, addr):
        self.network.sent.append((self.addr, addr, bytes(data)))

    def stopListening(self):
        self.stopped = True

    def getHost(self):
        return IPv4Address("UDP", *self.addr)


class Network:
    """
    Datagrams between endpoints, delivered when the test pumps.

    @ivar drop: a callable C{(source, destination, data) -> bool}; true
        drops the datagram.
    @ivar views: endpoints given each datagram as the relay's listener
        gives them (L{relay.internals.twisted.BufferedReadPort}): a
        C{memoryview} of one buffer, overwritten with junk after each call,
        so that anything kept of it shows.
    """

    def __init__(self, clock):
        self.clock = clock
        self.sent = deque()
        self.endpoints = {}
        self.views = set()
        self._buffer = bytearray(quic.MAX_READ_SIZE)
        self.drop = lambda source, destination, data: False

    def attach(self, protocol, addr, views=False):
        self.endpoints[addr] = protocol
        if views:
            self.views.add(addr)
        protocol.makeConnection(FakeUDPTransport(self, addr))
        return protocol

    def deliver(self, endpoint, destination, data, source):
        if destination not in self.views:
            endpoint.datagramReceived(data, source)
            return
        size = len(data)
        buffer = self._buffer
        buffer[:size] = data
        try:
            endpoint.datagramReceived(memoryview(buffer)[:size], source)
        finally:
            buffer[:size] = b"\xa5" * size

    def pump(self, seconds=0.2, step=0.002):
        """
        Deliver datagrams and advance the clock for C{seconds}.
        """
        for _ in range(int(round(seconds / step))):
            self.clock.advance(0)
            while self.sent:
                source, destination, data = self.sent.popleft()
                endpoint = self.endpoints.get(destination)
                if (
                    endpoint is not None
                    and not endpoint.transport.stopped
                    and not self.drop(source, destination, data)
                ):
                    self.deliver(endpoint, destination, data, source)
                self.clock.advance(0)
            self.clock.advance(step)


class EagerClient(quicclient.QuicRelayClient):
    """
    An aioquic client that moves to a connection id the relay issued as
    soon as one arrives, as quic-go does once its handshake is complete
    (it "initiates the first change as early as possible"), and again
    whenever L{changeConnectionID} is called.

    @ivar changes: how many times it changed the relay's connection id.
    @ivar usedIDs: every relay connection id it has sent packets to.
    """

    changes = 0

    def startProtocol(self):
        super().startProtocol()
        self.usedIDs = [self.quic._peer_cid.cid]

    def receive(self, data, addr):
        super().receive(data, addr)
        if not self.changes and self.quic._handshake_complete:
            self.changeConnectionID()

    def changeConnectionID(self):
        before = self.quic._peer_cid.cid
        self.quic.change_connection_id()
        if self.quic._peer_cid.cid != before:
            self.changes += 1
            self.usedIDs.append(self.quic._peer_cid.cid)
            self._needFlush()


class _ClockedQuicBase(unittest.TestCase):
    """
    The QUIC listener and aioquic clients on one clock and a fake network.
    """

    clientClass = quicclient.QuicRelayClient

    def setUp(self):
        self.clock = Clock()
        self.relay = makeRelay(self.clock)
        self.cert, self.key, _ = writeCertificate(self.mktemp())
        self.network = Network(self.clock)
        self.protocol = self.makeProtocol()
        self._nextPort = 50000

    def makeProtocol(self, **kwargs):
        protocol = quic.QuicPeerProtocol(
            self.relay, self.clock, quic.serverConfiguration(self.cert, self.key), **kwargs
        )
        return self.network.attach(protocol, SERVER, views=True)

    def client(
        self,
        peerID,
        token=TOKEN,
        authenticate=True,
        versions=None,
        connectionIDLength=None,
        **options,
    ):
        options.setdefault("cafile", self.cert)
        configuration = quicclient.clientConfiguration(**options)
        if versions is not None:
            configuration.supported_versions = versions
        if connectionIDLength is not None:
            configuration.connection_id_length = connectionIDLength
        self._nextPort += 1
        peer = self.clientClass(self.clock, SERVER, peerID, token, configuration)
        peer.autoAuthenticate = authenticate
        peer.addr = ("127.0.0.1", self._nextPort)
        self.network.attach(peer, peer.addr)
        return peer

    def connected(self, peerID, **options):
        peer = self.client(peerID, **options)
        self.network.pump()
        self.assertEqual(self.successResultOf(peer.authenticated), peer)
        return peer


class ClockedQuicTests(_ClockedQuicBase):
    def test_authenticateAndRelay(self):
        """
        Two QUIC peers authenticate, see each other online, and exchange
        Transport messages whose id field the relay rewrote to the sender.
        """
        a = self.connected(A)
        b = self.connected(B)
        self.assertEqual(a.instanceURL, self.relay.instanceURL)
        self.assertEqual(self.relay.counters.connections["quic"], 2)
        a.subscribe([B])
        self.network.pump()
        self.assertEqual(self.successResultOf(a.events.get()), ("online", [B]))
        for i in range(50):
            a.send(B, b"ping %d" % i)
            b.send(A, b"pong %d" % i)
        self.network.pump()
        self.assertEqual(
            [self.successResultOf(b.transports.get()) for _ in range(50)],
            [(A, b"ping %d" % i) for i in range(50)],
        )
        self.assertEqual(
            [self.successResultOf(a.transports.get()) for _ in range(50)],
            [(B, b"pong %d" % i) for i in range(50)],
        )
        self.assertEqual(self.relay.counters.dropped, {})

    def test_idlePeerMemory(self):
        """
        After the handshake a connection keeps small TLS output buffers
        instead of aioquic's three 16 KiB ones, the relay's end drops the
        handshake's secrets, and it still works.
        """
        a = self.connected(A)
        link = self.relay.store.peers[A].link
        self.assertEqual(
            {buf.capacity for buf in link.quic._crypto_buffers.values()},
            {quic.POST_HANDSHAKE_CRYPTO_BUFFER},
        )
        # The server's TLS context keeps no handshake secrets, nor anything
        # but what it reads past its handshake.
        context = link.quic.tls
        self.assertIs(context.state, tls.State.SERVER_POST_HANDSHAKE)
        self.assertEqual(
            set(vars(context)),
            {
                "state",
                "_receive_buffer",
                "alpn_negotiated",
                "early_data_accepted",
                "_session_resumed",
                "_is_client",
                "_Context__logger",
            },
        )
        self.assertIsNotNone(a.quic.tls.key_schedule)
        # The discarded epochs' state is shared, and only the 1-RTT space
        # is iterated by loss recovery.
        other = self.connected(B)
        otherQuic = self.relay.store.peers[B].link.quic
        for epoch in (tls.Epoch.INITIAL, tls.Epoch.HANDSHAKE, tls.Epoch.ZERO_RTT):
            self.assertIs(link.quic._cryptos[epoch], otherQuic._cryptos[epoch])
            self.assertFalse(link.quic._cryptos[epoch].recv.is_valid())
        for epoch in (tls.Epoch.INITIAL, tls.Epoch.HANDSHAKE):
            self.assertIs(link.quic._spaces[epoch], otherQuic._spaces[epoch])
            self.assertTrue(link.quic._spaces[epoch].discarded)
        self.assertEqual(set(link.quic._crypto_streams), {tls.Epoch.ONE_RTT})
        self.assertEqual(set(link.quic._crypto_buffers), {tls.Epoch.ONE_RTT})
        self.assertEqual(link.quic._loss.spaces, [link.quic._spaces[tls.Epoch.ONE_RTT]])
        other.send(A, b"from b")
        self.network.pump()
        self.assertEqual(self.successResultOf(a.transports.get()), (B, b"from b"))
        a.send(A, b"echo")
        self.network.pump()
        self.assertEqual(self.successResultOf(a.transports.get()), (A, b"echo"))

    def test_idlePeerSharesConstantState(self):
        """
        After the handshake two connections share their frame handler
        epochs, and the keys' logging callbacks are aioquic's no-op; a key
        update (which calls them) and messages after it still work.
        """
        a = self.connected(A)
        b = self.connected(B)
        linkA, linkB = self.relay.store.peers[A].link, self.relay.store.peers[B].link
        handlersA = linkA.quic._QuicConnection__frame_handlers
        handlersB = linkB.quic._QuicConnection__frame_handlers
        self.assertEqual(set(handlersA), set(handlersB))
        self.assertGreater(len(handlersA), 20)
        # One shared table, read through a small view per connection.
        self.assertIs(handlersA._shared, handlersB._shared)
        self.assertEqual(type(handlersA).__slots__, ("_quic", "_shared"))
        for frameType, (handler, epochs) in handlersA.items():
            self.assertIs(epochs, handlersB[frameType][1])
            self.assertIsInstance(epochs, frozenset)
            self.assertIs(handler.__self__, linkA.quic)
            self.assertIs(handler.__func__, handlersB[frameType][0].__func__)
        with self.assertRaises(KeyError):
            handlersA[0x99]
        for pair in linkA.quic._cryptos.values():
            for context in (pair.recv, pair.send):
                self.assertIs(context._setup_cb, NoCallback)
                self.assertIs(context._teardown_cb, NoCallback)
        phase = linkA.quic._cryptos[tls.Epoch.ONE_RTT].send.key_phase
        a.quic.request_key_update()
        a.send(B, b"after key update")
        self.network.pump()
        self.assertEqual(self.successResultOf(b.transports.get()), (A, b"after key update"))
        b.send(A, b"answer")
        self.network.pump()
        self.assertEqual(self.successResultOf(a.transports.get()), (B, b"answer"))
        self.assertNotEqual(linkA.quic._cryptos[tls.Epoch.ONE_RTT].send.key_phase, phase)

    def test_acknowledgementsRideOnDatagrams(self):
        """
        A packet received is acknowledged in the next datagram the relay
        sends on that connection, not in a packet of its own 1 ms later:
        a peer echoing through the relay gets one packet per message.
        """
        a = self.connected(A)
        self.network.pump(0.1)
        # The aioquic internals the relay moves the ACK with.
        link = self.relay.store.peers[A].link
        self.assertIn("ack_at", vars(link.quic._spaces[tls.Epoch.ONE_RTT]))
        self.assertIsNone(link.quic._loss._pacer.next_send_time(self.clock.seconds()))
        fromRelay = []

        def record(source, destination, data):
            if source == SERVER and destination == a.addr:
                fromRelay.append(data)
            return False

        self.network.drop = record
        for i in range(50):
            a.send(A, b"echo %d" % i)
            self.network.pump(0.01)
        self.assertEqual(
            [self.successResultOf(a.transports.get()) for _ in range(50)],
            [(A, b"echo %d" % i) for i in range(50)],
        )
        self.assertLessEqual(len(fromRelay), 52)

    def test_quicAndOtherTransport(self):
        """
        A QUIC peer and a peer on another link talk through the relay, and a
        QUIC peer may send the largest relay message (8820 bytes) when its
        packets are large enough.
        """
        a = self.connected(A, maxDatagramSize=9000)
        session, link = connect(self.relay, "peer-b")
        a.send(B, b"x" * (m.MAX_MESSAGE_SIZE - m.TRANSPORT_HEADER_SIZE))
        self.network.pump()
        self.assertEqual(
            link.take(),
            [m.encodeTransport(A, b"x" * (m.MAX_MESSAGE_SIZE - m.TRANSPORT_HEADER_SIZE))],
        )
        session.messageReceived(m.encodeTransport(A, b"back"))
        self.network.pump()
        self.assertEqual(self.successResultOf(a.transports.get()), (B, b"back"))

    def test_oversizedDatagramFrame(self):
        """
        A DATAGRAM frame larger than the advertised maximum (one 8820-byte
        message) is a protocol violation: that connection closes, others
        carry on.
        """
        a = self.connected(A, maxDatagramSize=9100)
        b = self.connected(B)
        a.sendRaw(
            bytes((m.VERSION, m.TRANSPORT))
            + B
            + b"x" * (m.MAX_MESSAGE_SIZE - m.TRANSPORT_HEADER_SIZE + 1)
        )
        self.network.pump()
        self.assertEqual(a.closeEvent.error_code, QuicErrorCode.PROTOCOL_VIOLATION)
        self.assertNotIn(A, self.relay.store.peers)
        self.assertEqual(self.relay.counters.connections["quic"], 1)
        c = self.connected(C)
        c.send(B, b"still here")
        self.network.pump()
        self.assertEqual(self.successResultOf(b.transports.get()), (C, b"still here"))

    def test_tooLargeForDestinationDatagram(self):
        """
        A message that does not fit one datagram to its destination is
        dropped and counted, never truncated: the limit is the smaller of
        the destination's max_datagram_frame_size and a 1452-byte packet.
        """
        a = self.connected(A)
        small = self.connected(B, maxDatagramFrameSize=500)
        session, link = connect(self.relay, "peer-c")
        # The frame (type, 2-byte length, data) must fit in 500 bytes.
        session.messageReceived(m.encodeTransport(B, b"y" * (497 - m.TRANSPORT_HEADER_SIZE)))
        session.messageReceived(m.encodeTransport(B, b"n" * (498 - m.TRANSPORT_HEADER_SIZE)))
        # 1452 - 3 - 8 (aioquic's connection id) - 16 (AEAD tag) - 3 (frame) = 1422.
        session.messageReceived(m.encodeTransport(A, b"y" * (1422 - m.TRANSPORT_HEADER_SIZE)))
        session.messageReceived(m.encodeTransport(A, b"n" * (1423 - m.TRANSPORT_HEADER_SIZE)))
        self.network.pump()
        self.assertEqual(
            self.successResultOf(small.transports.get()),
            (C, b"y" * (497 - m.TRANSPORT_HEADER_SIZE)),
        )
        self.assertEqual(
            self.successResultOf(a.transports.get()), (C, b"y" * (1422 - m.TRANSPORT_HEADER_SIZE))
        )
        self.assertNoResult(small.transports.get())
        self.assertNoResult(a.transports.get())
        self.assertEqual(self.relay.counters.dropped["too_large_for_datagram"], 2)
        self.assertEqual(self.relay.counters.connections["quic"], 2)

    def test_goAgentDatagramSize(self):
        """
        To a peer with quic-go's 4-byte connection ids, messages up to 1426
        bytes fit one 1452-byte packet: every message a Go agent can send
        (at most 1415 bytes) reaches it whole.
        """
        a = self.connected(A, connectionIDLength=4)
        session, link = connect(self.relay, "peer-b")
        for size in (1415, 1426, 1427):
            session.messageReceived(m.encodeTransport(A, b"g" * (size - m.TRANSPORT_HEADER_SIZE)))
        self.network.pump()
        self.assertEqual(
            self.successResultOf(a.transports.get()), (B, b"g" * (1415 - m.TRANSPORT_HEADER_SIZE))
        )
        self.assertEqual(
            self.successResultOf(a.transports.get()), (B, b"g" * (1426 - m.TRANSPORT_HEADER_SIZE))
        )
        self.assertNoResult(a.transports.get())
        self.assertEqual(self.relay.counters.dropped["too_large_for_datagram"], 1)

    def test_slowConsumer(self):
        """
        Messages to a peer that stops acknowledging pile up only to the high
        water mark; the rest are dropped and counted as slow_consumer.
        """
        self.network.endpoints.clear()
        self.protocol = self.makeProtocol(highWater=20000)
        a = self.connected(A)
        b = self.connected(B)
        self.network.drop = lambda source, destination, data: destination == b.addr
        # The list of queued sizes is compacted under this standing queue.
        self.patch(quic, "_QUEUED_COMPACT", 8)
        link = self.relay.store.peers[B].link
        compacted = []
        transmit = link._transmit

        def watched():
            before = link._queuedHead
            transmit()
            if 0 == link._queuedHead < before and link._queued:
                compacted.append(before)
            assertQueueAccounted(self, link)

        link._transmit = watched
        for i in range(2000):
            a.send(B, b"z" * 100)
            if i % 50 == 0:
                self.network.pump(0.01)
        self.network.pump(0.05)
        dropped = self.relay.counters.dropped["slow_consumer"]
        self.assertGreater(dropped, 1000)
        self.assertLessEqual(link._queuedBytes, 20000)
        self.assertTrue(compacted)
        # B acknowledges again: the queue drains and the accounting with it.
        self.network.drop = lambda source, destination, data: False
        self.network.pump(2)
        self.assertEqual((link._queued, link._queuedHead, link._queuedBytes), ([], 0, 0))
        self.assertEqual(len(link._pending), 0)

    def test_neverAuthenticates(self):
        """
        A client that completes the QUIC handshake but sends no Auth is
        closed by the session's 10 s handshake timer, with an error code.
        """
        silent = self.client(A, authenticate=False)
        self.network.pump(1.0)
        self.assertEqual(self.relay.counters.connections["quic"], 1)
        self.network.pump(9.2)
        self.assertEqual(silent.closeEvent.error_code, quic.CLOSE_ERROR)
        self.assertEqual(self.relay.counters.handshakeRejects["timeout"], 1)
        self.assertEqual(self.relay.counters.connections["quic"], 0)
        self.failureResultOf(silent.authenticated, quicclient.QuicHandshakeFailed)
        self.assertEqual(self.protocol.links, {})

    def test_neverFinishesQuicHandshake(self):
        """
        A client whose handshake never completes (only its first Initial
        arrives) is dropped by the same 10 s timer; nothing is left behind.
        """
        peer = self.client(A)
        first = []

        def dropAfterFirst(source, destination, data):
            if source == peer.addr:
                first.append(data)
                return len(first) > 1
            return True

        self.network.drop = dropAfterFirst
        self.network.pump(1.0)
        self.assertEqual(self.relay.counters.connections["quic"], 1)
        self.network.pump(10.0)
        self.assertEqual(self.relay.counters.connections["quic"], 0)
        self.assertEqual(self.relay.counters.handshakeRejects["timeout"], 1)
        self.network.pump(5.0)
        self.assertEqual(self.protocol.links, {})

    def test_wrongALPN(self):
        """
        A client offering another ALPN, or none, fails the TLS handshake
        (no_application_protocol) and never reaches the relay.
        """
        for alpn in ("h3", None):
            peer = self.client(A, alpn=alpn)
            self.network.pump(1.0)
            failure = self.failureResultOf(peer.authenticated, quicclient.QuicHandshakeFailed)
            assertTLSRefusal(self, failure.value.errorCode)
        self.assertEqual(self.protocol.counters["handshake_failed"], 2)
        self.assertEqual(self.relay.counters.connections["quic"], 0)
        self.assertEqual(self.relay.store.peers, {})
        self.network.pump(2.0)
        self.assertEqual(self.protocol.links, {})

    def test_garbage(self):
        """
        Garbage datagrams are dropped and counted without creating state or
        disturbing an established connection.
        """
        a = self.connected(A)
        b = self.connected(B)
        links = dict(self.protocol.links)
        stray = ("127.0.0.1", 40000)
        garbage = [
            b"",
            b"\x00",
            os.urandom(50),
            b"\x40" + os.urandom(1300),
            b"\xc0\x00\x00\x00\x01" + os.urandom(5),
            # Looks like a version 1 Initial of the right size, does not decrypt.
            b"\xc3\x00\x00\x00\x01\x08"
            + os.urandom(8)
            + b"\x08"
            + os.urandom(8)
            + b"\x00\x44\xd0"
            + os.urandom(0x4D0),
            # The same, but not an Initial.
            b"\xe3\x00\x00\x00\x01\x08"
            + os.urandom(8)
            + b"\x08"
            + os.urandom(8)
            + b"\x44\xd0"
            + os.urandom(0x4D0),
            # A short-header packet for a live connection id, not decryptable.
            b"\x40" + next(iter(links)) + os.urandom(60),
            os.urandom(9000),
        ]
        for data in garbage:
            self.protocol.datagramReceived(data, stray)
        self.network.pump()
        self.assertEqual(self.protocol.links, links)
        self.assertEqual(self.protocol.counters["undecryptable_initial"], 1)
        self.assertEqual(self.protocol.counters["not_initial"], 1)
        self.assertGreaterEqual(
            self.protocol.counters["malformed"] + self.protocol.counters["unknown_connection"], 5
        )
        a.send(B, b"after garbage")
        self.network.pump()
        self.assertEqual(self.successResultOf(b.transports.get()), (A, b"after garbage"))
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_failureOnFirstDatagram(self):
        """
        An exception while a new connection handles its first datagram is
        logged, and the connection leaves no state behind.
        """

        class Exploding(quic.QuicConnection):
            def receive_datagram(self, data, addr, now):
                raise RuntimeError("boom")

        self.patch(quic, "QuicConnection", Exploding)
        peer = self.client(A)
        self.network.pump(0.05)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(self.protocol.links, {})
        self.assertEqual(self.relay.counters.connections["quic"], 0)
        self.assertIsNone(peer.instanceURL)

    def test_failingConnectionIsolated(self):
        """
        An exception inside one connection's processing closes that
        connection only; it is logged, and others carry on.
        """
        a = self.connected(A)
        b = self.connected(B)
        c = self.connected(C)
        broken = self.relay.store.peers[A].link

        def explode(*args):
            raise RuntimeError("boom")

        # Whichever path its packets take: aioquic's or the lean one.
        broken.quic.receive_datagram = explode
        broken._lean.receive = explode
        a.send(B, b"lost")
        c.send(B, b"kept")
        self.network.pump()
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertNotIn(A, self.relay.store.peers)
        self.assertEqual(self.successResultOf(b.transports.get()), (C, b"kept"))
        self.network.pump(2.0)
        self.assertEqual(a.closeEvent.error_code, QuicErrorCode.INTERNAL_ERROR)

    def test_versionNegotiation(self):
        """
        A long-header packet of an unknown version, in a datagram of at least
        1200 bytes, is answered with Version Negotiation listing QUIC v1 and
        v2; a shorter one is not answered (no amplification).
        """
        probe = ("127.0.0.1", 40001)
        self.network.endpoints[probe] = None
        packet = b"\xc0\x1a\x2a\x3a\x4a\x08" + b"D" * 8 + b"\x08" + b"S" * 8
        self.protocol.datagramReceived(packet + bytes(1200), probe)
        self.protocol.datagramReceived(packet + bytes(100), probe)
        answers = [data for source, destination, data in self.network.sent if destination == probe]
        self.assertEqual(len(answers), 1)
        header = pull_quic_header(Buffer(data=answers[0]), host_cid_length=8)
        self.assertEqual(header.version, QuicProtocolVersion.NEGOTIATION)
        self.assertEqual(header.destination_cid, b"S" * 8)
        self.assertEqual(header.source_cid, b"D" * 8)
        self.assertEqual(
            header.supported_versions,
            [QuicProtocolVersion.VERSION_1, QuicProtocolVersion.VERSION_2],
        )
        self.assertEqual(self.protocol.links, {})

    def test_clientHelloOverSeveralPackets(self):
        """
        A ClientHello too large for one Initial packet (Go 1.24+ agents send
        a 1216-byte post-quantum key share beside X25519) arrives over
        several datagrams and authenticates: the first datagram, holding
        only part of it, is not mistaken for garbage.
        """

        class PaddedHello(quic.QuicConnection):
            def _initialize(self, peer_cid):
                super()._initialize(peer_cid)
                if self._is_client:
                    self.tls.handshake_extensions.append((0x0A0A, bytes(1600)))

        self.patch(quicclient, "QuicConnection", PaddedHello)
        peer = self.client(A)
        self.clock.advance(0)
        self.assertEqual(len(self.network.sent), 2)
        self.network.pump()
        self.assertEqual(self.successResultOf(peer.authenticated), peer)
        self.assertEqual(self.protocol.counters["undecryptable_initial"], 0)

    def test_quicVersion2(self):
        """
        A client speaking QUIC version 2 (RFC 9369) authenticates too.
        """
        peer = self.client(A, versions=[QuicProtocolVersion.VERSION_2])
        self.network.pump()
        self.successResultOf(peer.authenticated)

    def test_retryUnderLoad(self):
        """
        Once enough handshakes are in flight, a new client is sent a Retry
        first and authenticates on its second Initial; a forged token earns
        nothing.
        """
        self.network.endpoints.clear()
        self.protocol = self.makeProtocol(retryAbove=1)
        stuck = self.client(B)
        self.network.drop = lambda source, destination, data: (
            source == stuck.addr and self.protocol.handshaking
        )
        self.network.pump(0.1)
        self.assertEqual(self.protocol.handshaking, 1)
        self.network.drop = lambda source, destination, data: source == stuck.addr
        a = self.connected(A)
        self.assertEqual(self.protocol.counters["retry_sent"], 1)
        self.assertEqual(self.protocol.handshaking, 1)
        a.send(A, b"self")
        self.network.pump()
        self.assertEqual(self.successResultOf(a.transports.get()), (A, b"self"))
        forged = (
            b"\xc3\x00\x00\x00\x01\x08"
            + os.urandom(8)
            + b"\x08"
            + os.urandom(8)
            + b"\x10"
            + os.urandom(16)
            + b"\x44\xd0"
            + os.urandom(1250)
        )
        self.protocol.datagramReceived(forged, ("127.0.0.1", 40002))
        self.assertEqual(self.protocol.counters["invalid_token"], 1)
        self.network.pump(10.0)
        self.assertEqual(self.protocol.handshaking, 0)
        # The stuck client was closed by the 10 s handshake timer.
        self.failureResultOf(stuck.authenticated, quicclient.QuicHandshakeFailed)

    def test_noRetryNormally(self):
        """
        By default clients get no Retry (no extra round trip), as from the
        Go relay.
        """
        self.connected(A)
        self.connected(B)
        self.assertEqual(self.protocol.counters["retry_sent"], 0)
        self.assertEqual(self.protocol.handshaking, 0)

    def test_streamRefused(self):
        """
        A client that opens a stream is closed: the protocol has none.
        """
        a = self.connected(A)
        a.quic.send_stream_data(0, b"GET / HTTP/1.1\r\n\r\n")
        a.flush()
        self.network.pump()
        self.assertEqual(a.closeEvent.error_code, quic.CLOSE_ERROR)
        self.assertEqual(self.protocol.counters["stream_refused"], 1)
        self.assertNotIn(A, self.relay.store.peers)

    def test_strangersLinesBudgeted(self):
        """
        The lines a QUIC client can cause at will go through the relay's log
        budget, and a client's close reason is quoted and cut.
        """
        budgeted = []
        self.relay.noisyLog = lambda emit, format, **fields: budgeted.append((format, fields))
        a = self.connected(A)
        a.quic.send_stream_data(0, b"GET / HTTP/1.1\r\n\r\n")
        a.flush()
        b = self.connected(B)
        b.quic.close(error_code=7, reason_phrase="\x1b[31m" + "x" * 500)
        b.flush()
        self.network.pump(1.0)
        formats = [format for format, _ in budgeted]
        self.assertIn("{where}: QUIC client opened a stream; closing", formats)
        [reason] = [fields["reason"] for format, fields in budgeted if "connection ended" in format]
        self.assertNotIn("\x1b", reason)
        self.assertLess(len(reason), 120)

    def test_peerClose(self):
        """
        A peer that sends Close leaves the store; its connection ends.
        """
        a = self.connected(A)
        d = a.close()
        self.network.pump(1.0)
        self.successResultOf(d)
        self.assertEqual(self.relay.store.peers, {})
        self.assertEqual(self.relay.counters.connections["quic"], 0)
        self.assertEqual(self.protocol.links, {})

    def test_admission(self):
        """
        QUIC clients go through the relay's admission as WebSocket ones do:
        one over the per-address limit is closed with an application error,
        counted and given no session; an admitted client's slot is released
        when it leaves, and the next one gets in.
        """
        self.relay.admission.limits = Limits(maxPerIP=1)
        a = self.connected(A)
        refused = self.client(B)
        self.network.pump(1.0)
        # Before the handshake is done an application close travels as a
        # transport one (RFC 9000 section 10.2.3).
        self.assertEqual(refused.closeEvent.error_code, QuicErrorCode.APPLICATION_ERROR)
        self.failureResultOf(refused.authenticated, quicclient.QuicHandshakeFailed)
        self.assertEqual(self.relay.counters.handshakeRejects["per_ip_connections"], 1)
        self.assertEqual(self.relay.counters.connections["quic"], 1)
        self.assertEqual(list(self.relay.store.peers), [A])
        d = a.close()
        self.network.pump(1.0)
        self.successResultOf(d)
        self.assertEqual(self.relay.admission._open, {})
        self.connected(B)
        self.assertEqual(list(self.relay.store.peers), [B])

    def test_pendingSlotsPerSource(self):
        """
        A QUIC client waiting for Auth holds a pending slot of its own
        address, so the admission can tell sources apart.
        """
        self.client(A, authenticate=False)
        self.network.pump(1.0)
        self.assertEqual(list(self.relay.admission._bySource), ["127.0.0.1"])
        self.assertEqual(self.relay.admission.pending, 1)

    def test_shutdownSendsCloseThenCode0(self):
        """
        Relay.shutdown reaches QUIC peers: Close, then CONNECTION_CLOSE with
        code 0, and the shutdown waits for it.
        """
        a = self.connected(A)
        b = self.connected(B)
        done = self.relay.shutdown()
        self.network.pump(1.0)
        self.successResultOf(done)
        for peer in (a, b):
            self.assertTrue(peer.closeReceived)
            self.assertEqual(peer.closeEvent.error_code, quic.CLOSE_NORMAL)
        self.assertEqual(self.relay.counters.connections["quic"], 0)
        late = self.client(C)
        self.network.pump(0.5)
        self.assertNoResult(late.authenticated)
        self.assertGreaterEqual(self.protocol.counters["draining"], 1)
        self.assertEqual(self.protocol.links, {})
        # The refused client fails once the test tears the listener down;
        # that expected failure must not surface later as an unhandled
        # error in whichever test happens to collect it.
        late.authenticated.addErrback(lambda failure: failure.trap(quicclient.QuicHandshakeFailed))

    def test_shutdownWithCongestedPeer(self):
        """
        A peer whose Close is held back by congestion is closed with code 0
        after the close timeout; the shutdown does not wait longer.
        """
        a = self.connected(A)
        b = self.connected(B)
        self.network.drop = lambda source, destination, data: destination == b.addr
        for i in range(3000):
            a.send(B, b"q" * 500)
            if i % 100 == 0:
                self.network.pump(0.01)
        self.assertTrue(self.relay.store.peers[B].link._pending)
        done = self.relay.shutdown()
        self.network.pump(2.5, step=0.05)
        self.assertEqual(self.relay.counters.connections["quic"], 1)
        self.network.pump(1.0, step=0.05)
        self.successResultOf(done)
        self.assertEqual(self.relay.counters.connections["quic"], 0)
        self.assertTrue(a.closeReceived)

    def test_healthCheckAndIdleTimeout(self):
        """
        An authenticated client answering health checks stays connected past
        the 30 s idle timeout; one that goes silent is dropped (by the QUIC
        idle timer, restarted by the relay's first unanswered packet, or by
        the health-check window, whichever ends first).
        """
        a = self.connected(A)
        b = self.connected(B)
        self.network.pump(60.0, step=0.05)
        self.assertGreaterEqual(a.healthChecks, 2)
        self.assertIn(A, self.relay.store.peers)
        self.network.drop = lambda source, destination, data: source == b.addr
        self.network.pump(50.0, step=0.05)
        self.assertNotIn(B, self.relay.store.peers)
        self.assertIn(A, self.relay.store.peers)
        self.assertEqual(self.relay.counters.connections["quic"], 1)

    def test_reconnectReplaces(self):
        """
        A peer that authenticates again over QUIC replaces its first
        connection, which is closed with the error code.
        """
        first = self.connected(A)
        second = self.connected(A)
        self.network.pump(1.0)
        self.assertEqual(first.closeEvent.error_code, quic.CLOSE_ERROR)
        self.assertIs(self.relay.store.peers[A].link.session, self.relay.store.peers[A])
        self.assertIsNone(second.closeEvent)
        self.assertEqual(self.relay.counters.connections["quic"], 1)


def assertQueueAccounted(case, link):
    """
    A link's record of the messages it handed to aioquic matches what
    aioquic still holds: one size per pending datagram, their sum in
    C{_queuedBytes}.
    """
    waiting = link._queued[link._queuedHead :]
    case.assertEqual(waiting, [len(data) for data in link._pending])
    case.assertEqual(link._queuedBytes, sum(waiting))


def payloadOf(connection, index, size):
    """
    The deterministic payload of message C{index} on connection
    C{connection} (the Go test client makes the same ones).
    """
    head = ((connection & 0xFFFF) << 16 | index & 0xFFFF).to_bytes(4, "big")
    return (head + bytes((connection * 31 + index * 7 + j) & 0xFF for j in range(4, size)))[:size]


def exchangeSize(connection, index):
    """
    Payload sizes 1 to 1179: the largest Transport that fits the DATAGRAM
    frame of quic-go 0.29 (1220 bytes: type, 2-byte length, 1217).
    """
    return 1 + (index * 7919 + connection * 104729) % 1179


def exchangeWithOtherLink(case):
    """
    In C{case}, a L{_ClockedQuicBase}: QUIC peer A (quic-go 0.29's 1,220-byte
    DATAGRAM frames) and peer B on another link exchange 1,000 messages of 1
    to 1,179 bytes each way, 100 per turn of the clocked network; every
    byte arrives, in order.

    @return: A's client.
    """
    a = case.connected(A, maxDatagramFrameSize=1220)
    session, link = connect(case.relay, "peer-b")
    payloads = [payloadOf(1, k, exchangeSize(1, k)) for k in range(1000)]
    case.assertEqual((min(map(len, payloads)), max(map(len, payloads))), (1, 1179))
    toB, toA = [], []
    for batch in range(10):
        for payload in payloads[batch * 100 : batch * 100 + 100]:
            a.send(B, payload)
            session.messageReceived(m.encodeTransport(A, payload))
        case.network.pump(0.05)
        toB.extend(link.take())
        while a.transports.pending:
            toA.append(case.successResultOf(a.transports.get()))
    case.assertEqual(toB, [m.encodeTransport(A, p) for p in payloads])
    case.assertEqual(toA, [(B, p) for p in payloads])
    return a


class QuicGoLikeClientTests(_ClockedQuicBase):
    """
    The scenarios of issue 11 with a client that, like quic-go, switches to
    a relay-issued connection id right after its handshake: before the fix
    the relay announced ids it had not routed yet and dropped what the
    client sent on them.
    """

    clientClass = EagerClient

    def assertNoStrayPackets(self):
        self.assertEqual(self.protocol.counters["unknown_connection"], 0)

    def test_firstMessagesAfterHandshake(self):
        """
        50 fresh connections each send SubscribePeerState and a Transport
        in the reactor turn their AuthResponse arrives: none is lost.
        """
        session, link = connect(self.relay, "peer-b")
        peers = []
        for i in range(50):
            peer = self.client(m.peerID(f"fresh-{i}"))

            def firstMessages(peer, i=i):
                peer.subscribe([B])
                peer.send(B, b"first %d" % i)

            peer.authenticated.addCallback(firstMessages)
            peers.append(peer)
        self.network.pump(0.5)
        self.assertEqual([peer.changes for peer in peers], [1] * 50)
        online = [self.successResultOf(peer.events.get()) for peer in peers if peer.events.pending]
        received = link.take()
        # Counted first, so that a failure says how many were lost.
        self.assertEqual(
            (50 - len(online), 50 - len(received)), (0, 0), "lost (subscriptions, transports) of 50"
        )
        self.assertEqual(online, [("online", [B])] * 50)
        self.assertEqual(
            sorted(received),
            sorted(m.encodeTransport(m.peerID(f"fresh-{i}"), b"first %d" % i) for i in range(50)),
        )
        self.assertNoStrayPackets()

    def test_exchangeWithOtherTransport(self):
        """
        A QUIC peer advertising quic-go 0.29's 1220-byte DATAGRAM frames and
        a peer on another link exchange 1,000 messages of 1 to 1,179 bytes
        each way: every byte arrives, in order.
        """
        exchangeWithOtherLink(self)
        self.assertEqual(self.relay.counters.dropped, {})
        self.assertNoStrayPackets()

    def test_connectionIDChangesMidSession(self):
        """
        The client changes the relay's connection id ten times while
        messages flow: nothing is lost, and the relay forgets each id the
        client retired.
        """
        a = self.connected(A)
        b = self.connected(B)
        link = self.relay.store.peers[A].link
        for batch in range(10):
            a.changeConnectionID()
            for i in range(100):
                a.send(B, b"%d.%d" % (batch, i))
            self.network.pump(0.05)
        self.assertEqual(a.changes, 11)
        self.assertEqual(
            [self.successResultOf(b.transports.get()) for _ in range(1000)],
            [(A, b"%d.%d" % (batch, i)) for batch in range(10) for i in range(100)],
        )
        self.assertNoStrayPackets()
        retired = set(a.usedIDs[:-1])
        self.assertEqual(retired & set(self.protocol.links), set())
        self.assertIn(a.usedIDs[-1], link.connectionIDs)
        # The current id, the ones on offer (aioquic issues up to the
        # client's limit) and the client's original destination id.
        self.assertLessEqual(len(link.connectionIDs), 1 + 8 + 1)

    def test_datagramFrameSizes(self):
        """
        To clients advertising 1220 bytes (quic-go 0.29) and 16,383 (current
        quic-go), messages that fit arrive whole; a byte more is dropped
        and counted, never truncated.
        """
        small = self.connected(A, maxDatagramFrameSize=1220)
        large = self.connected(C, maxDatagramFrameSize=16383)
        session, link = connect(self.relay, "peer-b")
        # 1220 - 3 (frame type, 2-byte length) = 1217-byte messages; the
        # larger frame is bound by the 1452-byte packet: 1422 (see
        # test_tooLargeForDestinationDatagram).
        for peer, fits in ((A, 1217), (C, 1422)):
            for size in (fits - 1, fits, fits + 1, m.MAX_MESSAGE_SIZE):
                session.messageReceived(
                    m.encodeTransport(peer, b"s" * (size - m.TRANSPORT_HEADER_SIZE))
                )
        self.network.pump()
        for peer, fits in ((small, 1217), (large, 1422)):
            got = []
            while peer.transports.pending:
                got.append(self.successResultOf(peer.transports.get()))
            self.assertEqual(
                got, [(B, b"s" * (size - m.TRANSPORT_HEADER_SIZE)) for size in (fits - 1, fits)]
            )
        self.assertEqual(self.relay.counters.dropped["too_large_for_datagram"], 4)
        self.assertNoStrayPackets()

    def test_badToken(self):
        """
        Clients with a bad token that send a Transport right after their
        Auth are closed with an application error; nothing is relayed.
        """
        session, link = connect(self.relay, "peer-b")

        class Intruder(EagerClient):
            def _event(self, event):
                super()._event(event)
                if type(event) is events.HandshakeCompleted:
                    self.send(B, b"must not arrive")

        self.clientClass = Intruder
        bad = generateToken("another-secret", NOW + 3600)
        peers = [self.client(m.peerID(f"intruder-{i}"), token=bad) for i in range(50)]
        self.network.pump(1.0)
        for peer in peers:
            self.assertEqual(
                (peer.closeEvent.error_code, peer.closeEvent.frame_type), (quic.CLOSE_ERROR, None)
            )
            self.failureResultOf(peer.authenticated, quicclient.QuicHandshakeFailed)
        self.assertEqual(link.take(), [])
        self.assertEqual(self.relay.counters.handshakeRejects["bad_signature"], 50)
        self.assertEqual(self.relay.counters.connections["quic"], 0)

    def test_peerVanishes(self):
        """
        A peer that vanishes without a word goes offline for its
        subscribers once the idle timeout ends its connection; a relay that
        vanishes is noticed by the client's own idle timeout.
        """
        a = self.connected(A)
        b = self.connected(B)
        b.subscribe([A])
        self.network.pump()
        self.assertEqual(self.successResultOf(b.events.get()), ("online", [A]))
        self.network.drop = lambda source, destination, data: a.addr in (source, destination)
        self.network.pump(quic.IDLE_TIMEOUT - 1, step=0.05)
        self.assertIn(A, self.relay.store.peers)
        # The relay's health check, unanswered, restarts its idle timer.
        self.network.pump(30.0, step=0.05)
        self.assertNotIn(A, self.relay.store.peers)
        self.assertEqual(self.successResultOf(b.events.get()), ("offline", [A]))
        self.assertEqual(a.closeEvent.reason_phrase, "Idle timeout")
        self.network.drop = lambda source, destination, data: True
        self.network.pump(quic.IDLE_TIMEOUT + 1, step=0.05)
        self.assertEqual(b.closeEvent.reason_phrase, "Idle timeout")

    def test_peerCloseSeenAtOnce(self):
        """
        A client's CONNECTION_CLOSE takes its peer offline as it arrives,
        not when aioquic's closing period ends three probe timeouts later.
        """
        a = self.connected(A)
        b = self.connected(B)
        b.subscribe([A])
        self.network.pump()
        self.successResultOf(b.events.get())
        a.abort()
        self.network.pump(0.004, step=0.002)
        self.assertNotIn(A, self.relay.store.peers)
        self.assertEqual(self.relay.counters.connections["quic"], 1)


class HelperTests(unittest.TestCase):
    def test_payloadRoom(self):
        """
        The payload room of a DATAGRAM frame accounts for its type byte and
        its variable-length length.
        """
        self.assertEqual(quic._payloadRoom(quic.MAX_DATAGRAM_FRAME_SIZE), m.MAX_MESSAGE_SIZE)
        self.assertEqual(quic._payloadRoom(1452 - 3 - 4 - 16), 1426)
        self.assertEqual(quic._payloadRoom(65), 63)
        self.assertEqual(quic._payloadRoom(66), 63)
        self.assertEqual(quic._payloadRoom(67), 64)

    def test_reactorPacer(self):
        """
        The pacer lets at least L{quic.PACING_BURST} of its rate out per
        wake-up (a reactor sleeps in milliseconds), and keeps aioquic's
        larger bucket on slow paths.
        """
        pacer = quic._ReactorPacer(max_datagram_size=1452)
        pacer.update_rate(congestion_window=1_000_000, smoothed_rtt=0.001)
        self.assertEqual(pacer.bucket_max, quic.PACING_BURST)
        pacer.update_rate(congestion_window=100_000, smoothed_rtt=0.2)
        self.assertAlmostEqual(pacer.bucket_max, 16 * 1452 / (100_000 / 0.2))

    def test_badCertificate(self):
        """
        Unreadable or invalid certificate files are a configuration error.
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("not a certificate")
        self.assertRaises(ConfigurationError, quic.serverConfiguration, path + ".missing", path)
        self.assertRaises(ConfigurationError, quic.serverConfiguration, path, path)

    def test_writeDatagram(self):
        """
        A refused datagram is reported (it is packet loss), one without a
        transport is not.
        """

        class Refusing:
            def write(self, data, addr):
                raise OSError("No buffer space available")

        self.assertFalse(quic.writeDatagram(Refusing(), b"x", ("127.0.0.1", 1)))
        self.assertTrue(quic.writeDatagram(None, b"x", ("127.0.0.1", 1)))
        network = Network(Clock())
        self.assertTrue(
            quic.writeDatagram(FakeUDPTransport(network, ("127.0.0.1", 2)), b"x", ("127.0.0.1", 1))
        )
        self.assertEqual(list(network.sent), [(("127.0.0.1", 2), ("127.0.0.1", 1), b"x")])

    def test_connectQuicBindsAnyAddress(self):
        """
        The client socket is bound to the wildcard address of the server's
        family, not to the server's address (only loopback would work).
        """
        reactor = _UDPRecordingReactor()
        for host, interface in (("192.0.2.1", ""), ("2001:db8::1", "::")):
            quicclient.connectQuic(reactor, host, 443, A, secret=SECRET, timeout=5)
            self.assertEqual(reactor.udp[-1][0], interface)

    def test_connectQuicCannotBind(self):
        """
        No local UDP socket: a failed Deferred, not an exception.
        """
        reactor = _UDPRecordingReactor(refuse=True)
        d = quicclient.connectQuic(reactor, "192.0.2.1", 443, A, secret=SECRET, timeout=5)
        self.failureResultOf(d, error.CannotListenError)


class SocketSenderTests(unittest.TestCase):
    """
    L{quic._SocketSender}: a connection's packets leave in runs of one
    size with UDP segmentation offload and arrive as the same packets.
    """

    def setUp(self):
        self.receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(self.receiver.close)
        self.receiver.bind(("127.0.0.1", 0))
        self.receiver.settimeout(5)
        self.other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(self.other.close)
        self.other.bind(("127.0.0.1", 0))
        self.other.settimeout(5)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(self.sock.close)

    def packets(self):
        to = self.receiver.getsockname()
        there = self.other.getsockname()
        sizes = [1452] * 5 + [700, 1452, 1452, 60, 1200, 1200]
        datagrams = [(bytes([i]) * size, to) for i, size in enumerate(sizes)]
        datagrams.insert(7, (b"elsewhere", there))
        return datagrams

    def received(self, count, sock=None):
        return [(sock or self.receiver).recv(65535) for _ in range(count)]

    def test_runs(self):
        """
        Every packet arrives whole and in order, the runs broken where the
        size grows or the address changes; fewer system calls than packets.
        """
        sender = quic._SocketSender(self.sock)
        calls = []
        real = self.sock

        class Counting:
            def sendto(self, *args):
                calls.append("sendto")
                return real.sendto(*args)

            def sendmsg(self, buffers, ancdata, flags, addr):
                calls.append(len(buffers))
                return real.sendmsg(buffers, ancdata, flags, addr)

        sender._sock = Counting()
        datagrams = self.packets()
        self.assertEqual(sender.send(datagrams), 0)
        mine = [d for d, addr in datagrams if addr == self.receiver.getsockname()]
        self.assertEqual(self.received(len(mine)), mine)
        self.assertEqual(self.received(1, self.other), [b"elsewhere"])
        if sender.gso:
            # 5 x 1452 + 700 | 1452 | elsewhere | 1452 + 60 | 1200 x 2
            self.assertEqual(calls, [6, "sendto", "sendto", 2, 2])

    def test_refused(self):
        """
        A kernel without segmentation offload: the same packets go one by
        one, from then on; a full socket buffer is counted as loss.
        """
        real = self.sock

        class NoGSO:
            def sendto(self, *args):
                return real.sendto(*args)

            def sendmsg(self, *args):
                raise OSError(errno.EIO, "Input/output error")

        sender = quic._SocketSender(self.sock)
        sender._sock = NoGSO()
        datagrams = self.packets()
        self.assertEqual(sender.send(datagrams), 0)
        self.assertFalse(sender.gso)
        mine = [d for d, addr in datagrams if addr == self.receiver.getsockname()]
        self.assertEqual(self.received(len(mine)), mine)

        class Full:
            def sendto(self, *args):
                raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")

            sendmsg = sendto

        for gso in (True, False):
            sender._sock, sender.gso = Full(), gso
            self.assertEqual(sender.send(datagrams), len(datagrams))


class _UDPRecordingReactor(Clock):
    """
    A clock whose C{listenUDP} records the interface, or refuses.
    """

    def __init__(self, refuse=False):
        super().__init__()
        self.refuse = refuse
        self.udp = []

    def listenUDP(self, port, protocol, interface="", maxPacketSize=8192):
        if self.refuse:
            raise error.CannotListenError(interface, port, OSError("Address already in use"))
        self.udp.append((interface, protocol))


class UDPQuicTests(unittest.TestCase):
    """
    The QUIC service over real UDP on 127.0.0.1, with a WebSocket listener
    sharing the relay.
    """

    timeout = 20

    def setUp(self):
        self.cert, self.key, _ = writeCertificate(self.mktemp())
        self.relay = Relay(TokenValidator(SECRET, reactor), "rels://127.0.0.1:1", reactor, Store())
        self.service = quic.QuicService(self.relay, reactor, "127.0.0.1", 0, self.cert, self.key)
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.quicPort = self.service.port.getHost().port
        factory = PeerWebSocketFactory(self.relay, reactor)
        self.tcpPort = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(self.tcpPort.stopListening)
        self.peers = []

    @defer.inlineCallbacks
    def tearDown(self):
        for peer in self.peers:
            yield peer.close()

    @defer.inlineCallbacks
    def quicPeer(self, peerID, **options):
        peer = yield quicclient.connectQuic(
            reactor,
            "127.0.0.1",
            self.quicPort,
            peerID,
            secret=SECRET,
            cafile=self.cert,
            timeout=5,
            **options,
        )
        self.peers.append(peer)
        return peer

    @defer.inlineCallbacks
    def webSocketPeer(self, peerID):
        peer = yield client.connect(
            reactor,
            f"rel://127.0.0.1:{self.tcpPort.getHost().port}",
            peerID,
            secret=SECRET,
            timeout=5,
        )
        self.peers.append(peer)
        return peer

    @defer.inlineCallbacks
    def test_quicAndWebSocketExchange(self):
        """
        A QUIC peer and a WebSocket peer authenticate, subscribe to each
        other and exchange 1,000 Transport messages each way with no loss,
        in order, ids rewritten to the sender.
        """
        q = yield self.quicPeer(A)
        w = yield self.webSocketPeer(B)
        yield q.waitOnline(B)
        yield w.waitOnline(A)
        count = 1000
        received = {A: [], B: []}
        done = {A: defer.Deferred(), B: defer.Deferred()}

        def collector(me):
            def onTransport(message):
                received[me].append(m.decodeTransport(message))
                if len(received[me]) == count:
                    done[me].callback(None)

            return onTransport

        q.onTransport = collector(A)
        w.onTransport = collector(B)
        for i in range(count):
            q.send(B, b"q->w %d " % i + bytes(200))
            w.send(A, b"w->q %d " % i + bytes(200))
            if i % 100 == 99:
                yield task.deferLater(reactor, 0.005, lambda: None)
        yield defer.gatherResults(
            [done[A].addTimeout(10, reactor), done[B].addTimeout(10, reactor)]
        )
        self.assertEqual(received[B], [(A, b"q->w %d " % i + bytes(200)) for i in range(count)])
        self.assertEqual(received[A], [(B, b"w->q %d " % i + bytes(200)) for i in range(count)])
        self.assertEqual(self.relay.counters.dropped, {})
        self.assertEqual(self.relay.counters.connections["quic"], 1)
        self.assertEqual(self.relay.counters.connections["websocket"], 1)

    @defer.inlineCallbacks
    def test_wrongALPN(self):
        """
        Over real UDP, a client offering another ALPN is refused.
        """
        failure = yield self.assertFailure(
            quicclient.connectQuic(
                reactor,
                "127.0.0.1",
                self.quicPort,
                A,
                secret=SECRET,
                cafile=self.cert,
                timeout=5,
                alpn="h3",
            ),
            quicclient.QuicHandshakeFailed,
        )
        assertTLSRefusal(self, failure.errorCode)
        self.assertEqual(self.relay.store.peers, {})

    @defer.inlineCallbacks
    def test_garbageAndOversizedDatagrams(self):
        """
        Garbage and oversized UDP datagrams from a raw socket change nothing
        for a connected QUIC peer; a new one still connects.
        """
        q = yield self.quicPeer(A)
        w = yield self.webSocketPeer(B)
        raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(raw.close)
        for data in (
            os.urandom(100),
            b"\xc3\x00\x00\x00\x01" + os.urandom(1400),
            os.urandom(9000),
            os.urandom(60000),
        ):
            raw.sendto(data, ("127.0.0.1", self.quicPort))
        yield task.deferLater(reactor, 0.1, lambda: None)
        q.send(B, b"still fine")
        self.assertEqual((yield w.transports.get().addTimeout(5, reactor)), (A, b"still fine"))
        c = yield self.quicPeer(C)
        c.send(B, b"new one")
        self.assertEqual((yield w.transports.get().addTimeout(5, reactor)), (C, b"new one"))
        self.assertEqual(self.relay.counters.connections["quic"], 2)

    @defer.inlineCallbacks
    def test_tooLargeForQuicPeer(self):
        """
        A WebSocket peer's message that does not fit one datagram to the
        QUIC peer is dropped and counted; one that fits exactly arrives.
        """
        q = yield self.quicPeer(A)
        w = yield self.webSocketPeer(B)
        w.send(A, b"n" * (1423 - m.TRANSPORT_HEADER_SIZE))
        w.send(A, b"y" * (1422 - m.TRANSPORT_HEADER_SIZE))
        self.assertEqual(
            (yield q.transports.get().addTimeout(5, reactor)),
            (B, b"y" * (1422 - m.TRANSPORT_HEADER_SIZE)),
        )
        self.assertEqual(self.relay.counters.dropped["too_large_for_datagram"], 1)

    @defer.inlineCallbacks
    def test_peersOnlineFitDatagrams(self):
        """
        PeersOnline for 244 ids, 8786 bytes in one message over WebSocket,
        is split to fit the QUIC subscriber's datagrams (issue 12, item 12).
        """
        ids = [m.peerID(f"online-{n}") for n in range(244)]
        for pid in ids:
            self.relay.store.peers[pid] = object()
        # Large datagrams out, small ones in: one Subscribe carries all 244.
        q = yield self.quicPeer(A, maxDatagramSize=9000, maxDatagramFrameSize=1400)
        q.subscribe(ids)
        received = []
        while len(received) < len(ids):
            kind, some = yield q.events.get().addTimeout(5, reactor)
            self.assertEqual(kind, "online")
            received += some
        self.assertEqual(received, ids)
        self.assertEqual(self.relay.counters.dropped["too_large_for_datagram"], 0)

    @defer.inlineCallbacks
    def test_reloadCertificate(self):
        """
        reloadCertificate serves new connections with the new certificate;
        unusable files raise and leave the current one in place.
        """
        newCert, newKey, _ = writeCertificate(self.mktemp())
        broken = self.mktemp()
        with open(broken, "w") as f:
            f.write("not a certificate")
        self.assertRaises(ConfigurationError, self.service.reloadCertificate, broken, broken)
        yield self.quicPeer(A)
        self.service.reloadCertificate(newCert, newKey)
        yield self.assertFailure(
            quicclient.connectQuic(
                reactor, "127.0.0.1", self.quicPort, B, secret=SECRET, cafile=self.cert, timeout=5
            ),
            quicclient.QuicHandshakeFailed,
        )
        peer = yield quicclient.connectQuic(
            reactor, "127.0.0.1", self.quicPort, B, secret=SECRET, cafile=newCert, timeout=5
        )
        self.peers.append(peer)
        self.assertIn(B, self.relay.store.peers)

    @defer.inlineCallbacks
    def test_stopServiceFreesPort(self):
        """
        stopService closes connections (code 0) and frees the UDP port.
        """
        q = yield self.quicPeer(A)
        yield self.service.stopService()
        yield q.whenLost().addTimeout(5, reactor)
        self.assertEqual(q.closeEvent.error_code, quic.CLOSE_NORMAL)
        self.assertEqual(self.relay.counters.connections["quic"], 0)
        port = reactor.listenUDP(
            self.quicPort,
            quic.QuicPeerProtocol(self.relay, reactor, self.service.protocol.configuration),
            interface="127.0.0.1",
        )
        yield port.stopListening()
