"""
The lean QUIC data path (relay.listener.quiclean): DATAGRAM packets received and
built outside aioquic's general code, on aioquic's own state.

The tests prove that aioquic's state stays what it would have been: the
same scenario with the lean path on and off sends the same packets and ends
in the same connection state; key updates, PINGs, loss, migration and
close still go through aioquic; every packet the lean path sends is
acknowledged by the client and leaves loss recovery.
"""

import datetime

from aioquic import tls
from aioquic.buffer import Buffer
from aioquic.quic.packet import QuicPacketType, pull_quic_header
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import NameOID

from relay import quicclient
from relay.listener import quic
from tests.test_quic import (
    SERVER,
    A,
    B,
    EagerClient,
    _ClockedQuicBase,
    exchangeSize,
    exchangeWithOtherLink,
    payloadOf,
)


def applicationSpace(connection):
    return connection._spaces[tls.Epoch.ONE_RTT]


def writeEd25519Certificate(directory):
    """
    A self-signed Ed25519 certificate for localhost: its signatures have one
    length, so two handshakes send packets of the same sizes (an ECDSA
    signature's DER length varies by a byte or two).
    """
    import os

    os.makedirs(directory)
    key = ed25519.Ed25519PrivateKey.generate()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, None)
    )
    certPath, keyPath = os.path.join(directory, "ed.crt"), os.path.join(directory, "ed.key")
    with open(certPath, "wb") as f:
        f.write(certificate.public_bytes(serialization.Encoding.PEM))
    with open(keyPath, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return certPath, keyPath


class LeanPathTests(_ClockedQuicBase):
    clientClass = EagerClient

    def exchange(self, a, b, count, tag=b"", pump=0.02, batch=20):
        """
        C{a} and C{b} send C{count} messages each to the other, C{batch} a
        turn; both get all of them, in order.
        """
        for start in range(0, count, batch):
            for i in range(start, min(count, start + batch)):
                a.send(B, tag + b"a%d" % i + payloadOf(1, i, exchangeSize(1, i) - 10))
                b.send(A, tag + b"b%d" % i + payloadOf(2, i, exchangeSize(2, i) - 10))
            self.network.pump(pump)
        self.network.pump(0.1)
        toB = [self.successResultOf(b.transports.get()) for _ in range(count)]
        toA = [self.successResultOf(a.transports.get()) for _ in range(count)]
        self.assertEqual(
            toB,
            [
                (A, tag + b"a%d" % i + payloadOf(1, i, exchangeSize(1, i) - 10))
                for i in range(count)
            ],
        )
        self.assertEqual(
            toA,
            [
                (B, tag + b"b%d" % i + payloadOf(2, i, exchangeSize(2, i) - 10))
                for i in range(count)
            ],
        )
        self.assertFalse(a.transports.pending or b.transports.pending)

    def links(self):
        return self.relay.store.peers[A].link, self.relay.store.peers[B].link

    def assertAllAcknowledged(self, link, peer):
        """
        Every packet the relay sent on C{link} was acknowledged by C{peer}:
        none is left in loss recovery, nothing is in flight, and the peer
        received every packet number the relay used.
        """
        self.network.pump(0.5)
        space = applicationSpace(link.quic)
        # ACK-only packets are acknowledged only with later ones.
        unacknowledged = [
            packet for packet in space.sent_packets.values() if packet.is_ack_eliciting
        ]
        self.assertEqual(
            (unacknowledged, space.ack_eliciting_in_flight, link.quic._loss.bytes_in_flight),
            ([], 0, 0),
        )
        received = applicationSpace(peer.quic)
        self.assertEqual(received.largest_received_packet, link.quic._packet_number - 1)

    def test_trafficTakesTheLeanPath(self):
        """
        Messages both ways are received and sent by the lean path, nearly
        all of them; aioquic is handed only what is not a DATAGRAM packet.
        """
        a = self.connected(A)
        b = self.connected(B)
        linkA, linkB = self.links()
        self.network.pump(0.5)
        before = (linkA._lean.messages, linkA._lean.built, linkA._lean.handedOver)
        self.exchange(a, b, 500)
        # Every message from A, and packets for those to A (the relay puts
        # several in one packet where they fit).
        self.assertEqual(linkA._lean.messages - before[0], 500)
        self.assertGreaterEqual(linkA._lean.built - before[1], 250)
        self.assertLessEqual(linkA._lean.handedOver - before[2], 2)
        self.assertAllAcknowledged(linkA, a)
        self.assertAllAcknowledged(linkB, b)
        self.assertEqual(self.relay.counters.dropped, {})

    def test_idleTimeoutFollowsRTT(self):
        """
        The idle timeout a lean packet restarts the idle timer with is
        aioquic's C{_idle_timeout()} whenever the RTT estimate changes, also
        when three probe timeouts exceed the configured idle timeout (a slow
        path), and back; and the timer is restarted with it.
        """
        a = self.connected(A)
        b = self.connected(B)
        linkA, _ = self.links()
        lean, loss = linkA._lean, linkA.quic._loss
        self.exchange(a, b, 5)
        for smoothed, variance in ((0.05, 0.01), (15.0, 0.01), (15.0, 2.0), (0.05, 0.01)):
            # New float objects, as loss recovery makes them.
            loss._rtt_smoothed, loss._rtt_variance = float(str(smoothed)), float(str(variance))
            self.assertEqual(lean._currentIdleTimeout(), linkA.quic._idle_timeout())
            if smoothed > 1:
                self.assertGreater(lean._currentIdleTimeout(), quic.IDLE_TIMEOUT)
        loss._rtt_smoothed = float("20.0")
        a.send(B, b"one more")
        a.flush()
        received = linkA._lean.received
        receivedAt = self.clock.seconds()
        self.network.pump(0.002, step=0.002)
        self.assertEqual(linkA._lean.received, received + 1)
        self.assertEqual(linkA.quic._close_at, receivedAt + linkA.quic._idle_timeout())
        self.assertGreater(linkA.quic._idle_timeout(), quic.IDLE_TIMEOUT)

    def test_sameAsAioquic(self):
        """
        One scenario, with the lean path and without: the relay sends
        datagrams of the same sizes in the same order, and both ends'
        packet numbers, ACK ranges, loss recovery and congestion state end
        the same.
        """
        self.assertSameAsAioquic(lambda count, source, destination, data: False)

    def test_sameAsAioquicWithLoss(self):
        """
        As L{test_sameAsAioquic}, with one datagram in nine lost: loss
        detection, congestion control and the ACK ranges (several, so
        ACK-of-ACK PINGs too) evolve the same.
        """
        self.assertSameAsAioquic(lambda count, source, destination, data: count % 9 == 0)

    def test_sameAsAioquicManyAckRanges(self):
        """
        As L{test_sameAsAioquic}, with a client that skips a packet number
        before each of 100 small packets arriving at once: the relay's ACK
        ranges pass aioquic's bound of 64 and the oldest are shifted out,
        the same both ways, and the exchange goes on after.
        """

        def traffic(a, b):
            self.exchangeWithPumps(a, b)
            for i in range(100):
                a.quic._packet_number += 1
                a.send(B, b"gap %d" % i)
                a.flush()
            self.network.pump(0.5)
            self.exchangeWithPumps(a, b)

        self.assertSameAsAioquic(
            lambda count, source, destination, data: False, traffic, minBuilt=600, minMessages=1000
        )

    def test_sameAsAioquicReordered(self):
        """
        As L{test_sameAsAioquic}, with one datagram to the relay in seven
        held back and delivered after the next five: the relay's ACK ranges
        see packets fill a gap, extend the last range and open new ones
        (the lean receive adds the next packet to them itself, anything
        else through RangeSet.add), the same both ways.
        """
        held = []

        def reorder(count, source, destination, data):
            if held and count - held[0][0] >= 5:
                # Delivered after what was sent since (and past this drop
                # hook, which sees them again).
                for _, packet in held:
                    self.network.sent.append(packet)
                    passing.add(id(packet[2]))
                del held[:]
            if id(data) in passing:
                passing.discard(id(data))
                return False
            if destination == SERVER and count % 7 == 0:
                held.append((count, (source, destination, data)))
                reordered[0] += 1
                return True
            return False

        passing = set()
        reordered = [0]
        self.assertSameAsAioquic(reorder)
        self.assertGreater(reordered[0], 100)

    def test_sameAsAioquicMigration(self):
        """
        As L{test_sameAsAioquic}, with the client's address changing mid-way
        (a NAT rebinding): path validation by aioquic, and the lean path on
        the new path, leave the same state both ways.
        """

        def traffic(a, b):
            self.exchangeWithPumps(a, b)
            self.migrate(a, ("127.0.0.2", 40000))
            self.exchangeWithPumps(a, b)

        self.assertSameAsAioquic(
            lambda count, source, destination, data: False, traffic, minBuilt=600, minMessages=1000
        )

    def migrate(self, peer, addr):
        del self.network.endpoints[peer.addr]
        peer.addr = peer.transport.addr = addr
        self.network.endpoints[addr] = peer

    def exchangeWithPumps(self, a, b):
        for i in range(300):
            a.send(B, b"a%d" % i + payloadOf(1, i, exchangeSize(1, i)))
            b.send(A, b"b%d" % i + payloadOf(2, i, exchangeSize(2, i)))
            if i % 30 == 29 or i >= 200:
                self.network.pump(0.004)

    def assertSameAsAioquic(self, lose, traffic=None, minBuilt=300, minMessages=400):
        traffic = traffic or self.exchangeWithPumps

        def run(lean):
            self.setUp()
            self.cert, self.key = writeEd25519Certificate(self.mktemp())
            self.protocol = self.makeProtocol()
            self.protocol.lean = lean
            a = self.connected(A)
            b = self.connected(B)
            sizes = []

            count = [0]

            def record(source, destination, data):
                if source == SERVER:
                    sizes.append((destination == a.addr, len(data)))
                count[0] += 1
                return lose(count[0], source, destination, data)

            self.network.drop = record
            traffic(a, b)
            self.network.pump(1.0)
            linkA, linkB = self.links()
            state = []
            for link, peer in ((linkA, a), (linkB, b)):
                for connection in (link.quic, peer.quic):
                    space = applicationSpace(connection)
                    loss = connection._loss
                    state.append(
                        (
                            connection._packet_number,
                            space.largest_received_packet,
                            space.expected_packet_number,
                            list(space.ack_queue),
                            sorted(space.sent_packets),
                            space.largest_acked_packet,
                            loss.bytes_in_flight,
                            loss.congestion_window,
                            loss._rtt_smoothed,
                            connection._close_at,
                            len(peer.transports.pending),
                            [
                                (path.addr, path.is_validated, path.bytes_sent, path.bytes_received)
                                for path in connection._network_paths
                            ],
                        )
                    )
            return sizes, state, (linkA._lean, linkB._lean)

        leanSizes, leanState, leanPaths = run(True)
        plainSizes, plainState, plainPaths = run(False)
        self.assertEqual(plainPaths, (None, None))
        self.assertGreater(sum(path.built for path in leanPaths), minBuilt)
        self.assertGreater(sum(path.messages for path in leanPaths), minMessages)
        self.assertEqual(leanSizes, plainSizes)
        self.assertEqual(leanState, plainState)

    def test_keyUpdates(self):
        """
        Many messages through the lean path, then a key update by the
        client, then one by the relay: aioquic carries out each (the lean
        path hands over the first packet of a new key phase), and the lean
        path goes on in the new phase.
        """
        a = self.connected(A)
        b = self.connected(B)
        linkA, _ = self.links()
        pair = linkA.quic._cryptos[tls.Epoch.ONE_RTT]
        self.exchange(a, b, 200)
        phase = pair.recv.key_phase
        handed = linkA._lean.handedOver
        a.quic.request_key_update()
        self.exchange(a, b, 200, tag=b"client-update ")
        self.assertNotEqual(pair.recv.key_phase, phase)
        self.assertGreater(linkA._lean.handedOver, handed)
        messages = linkA._lean.messages
        linkA.quic.request_key_update()
        self.exchange(a, b, 200, tag=b"relay-update ")
        self.assertEqual(pair.recv.key_phase, phase)
        self.assertEqual(a.quic._cryptos[tls.Epoch.ONE_RTT].recv.key_phase, phase)
        self.assertGreaterEqual(linkA._lean.messages, messages + 190)
        self.assertAllAcknowledged(linkA, a)

    def test_lossAndRecovery(self):
        """
        One packet in seven lost each way: the relay's loss recovery
        declares its lost packets lost, the rest arrive in order, and once
        the loss stops every message arrives and nothing stays in flight.
        """
        a = self.connected(A)
        b = self.connected(B)
        linkA, _ = self.links()
        count = [0]

        def lossy(source, destination, data):
            if a.addr in (source, destination):
                count[0] += 1
                return count[0] % 7 == 0
            return False

        self.network.drop = lossy
        for i in range(300):
            a.send(B, b"lossy %d" % i)
            b.send(A, b"lossy %d" % i)
            if i % 10 == 9:
                self.network.pump(0.01)
        self.network.pump(1.0)
        toB = [
            self.successResultOf(b.transports.get())[1] for _ in range(len(b.transports.pending))
        ]
        toA = [
            self.successResultOf(a.transports.get())[1] for _ in range(len(a.transports.pending))
        ]
        for got in (toB, toA):
            numbers = [int(message.split()[1]) for message in got]
            self.assertEqual(numbers, sorted(numbers))
            self.assertGreater(len(numbers), 200)
            self.assertLess(len(numbers), 300)
        self.assertGreater(linkA._lean.messages, 200)
        self.network.drop = lambda source, destination, data: False
        self.exchange(a, b, 200, tag=b"after ")
        self.assertAllAcknowledged(linkA, a)

    def test_pingAndAckOnly(self):
        """
        A client's PING goes to aioquic and is acknowledged; its ACK-only
        packets are taken by the lean path.
        """
        a = self.connected(A)
        b = self.connected(B)
        linkA, _ = self.links()
        self.exchange(a, b, 50)
        handed = linkA._lean.handedOver
        a.quic.send_ping(7)
        a._needFlush()
        self.network.pump(0.1)
        self.assertEqual(linkA._lean.handedOver, handed + 1)
        # The relay's answer to an ACK-only packet: nothing but what is due.
        received = linkA._lean.received
        for i in range(20):
            b.send(A, b"to a %d" % i)
        self.network.pump(0.2)
        # A sends nothing but ACKs for these.
        self.assertEqual(linkA._lean.messages, 50)
        self.assertGreater(linkA._lean.received, received)
        self.assertEqual(linkA._lean.handedOver, handed + 1)
        self.assertEqual(
            [self.successResultOf(a.transports.get()) for _ in range(20)],
            [(B, b"to a %d" % i) for i in range(20)],
        )
        self.assertAllAcknowledged(linkA, a)

    def test_migration(self):
        """
        A client whose address changes (a NAT rebinding) is handed to
        aioquic, which validates the new path; messages flow all along and
        the lean path takes them again on the new path.
        """
        a = self.connected(A)
        b = self.connected(B)
        linkA, _ = self.links()
        self.exchange(a, b, 50)
        self.migrate(a, ("127.0.0.2", 40000))
        self.exchange(a, b, 100, tag=b"moved ")
        self.assertEqual(linkA.quic._network_paths[0].addr, a.addr)
        self.assertTrue(linkA.quic._network_paths[0].is_validated)
        messages, built = linkA._lean.messages, linkA._lean.built
        self.exchange(a, b, 100, tag=b"settled ")
        self.assertEqual(linkA._lean.messages, messages + 100)
        # aioquic keeps the former path; it needs no probing, so the lean
        # send goes on too.
        self.assertEqual(len(linkA.quic._network_paths), 2)
        self.assertGreaterEqual(linkA._lean.built, built + 50)
        self.assertAllAcknowledged(linkA, a)

    def test_closeAfterLeanTraffic(self):
        """
        A client's CONNECTION_CLOSE after lean traffic goes to aioquic: the
        peer is offline at once, and the relay's close reaches a client.
        """
        a = self.connected(A)
        b = self.connected(B)
        b.subscribe([A])
        self.network.pump()
        self.successResultOf(b.events.get())
        self.exchange(a, b, 100)
        a.abort()
        self.network.pump(0.01)
        self.assertNotIn(A, self.relay.store.peers)
        self.assertEqual(self.successResultOf(b.events.get()), ("offline", [A]))
        linkB = self.relay.store.peers[B].link
        linkB.closeLink()
        self.network.pump(0.1)
        self.assertEqual(b.closeEvent.error_code, quic.CLOSE_ERROR)

    def test_oversizedDatagramHandedOver(self):
        """
        A DATAGRAM frame larger than the relay advertised is not taken by
        the lean path: aioquic closes the connection for it, as before.
        """
        a = self.connected(A)
        linkA = self.relay.store.peers[A].link
        self.exchange_one(a)
        a.quic._remote_max_datagram_frame_size = 65535
        a.quic._max_datagram_size = 65000
        a.queueDatagram(b"x" * (quic.MAX_DATAGRAM_FRAME_SIZE + 10))
        self.network.pump(0.1)
        self.assertNotIn(A, self.relay.store.peers)
        self.assertTrue(linkA._isClosing())

    def exchange_one(self, a):
        a.send(A, b"echo")
        self.network.pump(0.05)
        self.assertEqual(self.successResultOf(a.transports.get()), (A, b"echo"))

    def test_otherTransport(self):
        """
        A peer on another link and a lean QUIC peer: 1,000 messages of 1 to
        1,179 bytes each way, every byte checked.
        """
        a = exchangeWithOtherLink(self)
        linkA = self.relay.store.peers[A].link
        self.assertGreater(linkA._lean.built, 500)
        self.assertAllAcknowledged(linkA, a)


class TrimmedStateTests(_ClockedQuicBase):
    """
    What aioquic still does with the state an established connection
    shares or drops (relay.internals.aioquic.trimDiscardedEpochs and
    trimServerTLS) works as before.
    """

    clientClass = EagerClient

    def test_lateHandshakePackets(self):
        """
        A client's Initial and Handshake datagrams arriving again after the
        handshake (late duplicates) are dropped: the connection lives.
        """
        early = []

        def record(source, destination, data):
            if destination == SERVER and data[0] & 0x80:
                early.append((source, data))
            return False

        # A client that keeps the relay's first connection id, so that its
        # second flight (an Initial ACK and the Handshake Finished) goes to
        # the connection again.
        self.clientClass = quicclient.QuicRelayClient
        self.network.drop = record
        a = self.connected(A)
        self.network.drop = lambda source, destination, data: False
        link = self.relay.store.peers[A].link
        routed = [
            pull_quic_header(Buffer(data=data), host_cid_length=quic.CONNECTION_ID_LENGTH)
            for source, data in early
        ]
        self.assertIn(
            (QuicPacketType.INITIAL, True),
            [
                (header.packet_type, header.destination_cid in link.connectionIDs)
                for header in routed
            ],
        )
        for source, data in early:
            self.protocol.datagramReceived(data, source)
        self.network.pump()
        self.assertIs(self.relay.store.peers[A].link, link)
        self.assertFalse(link._isClosing())
        a.send(A, b"still here")
        self.network.pump()
        self.assertEqual(self.successResultOf(a.transports.get()), (A, b"still here"))
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_postHandshakeCryptoRefused(self):
        """
        A TLS message in a 1-RTT CRYPTO frame after the handshake closes the
        connection with TLS's unexpected_message alert, as aioquic's full
        context does; a part of one is buffered, and the connection lives.
        """
        a = self.connected(A)
        b = self.connected(B)
        partial = a.quic._crypto_streams[tls.Epoch.ONE_RTT]
        partial.sender.write(b"\x04\x00")
        a._needFlush()
        self.network.pump()
        linkA = self.relay.store.peers[A].link
        self.assertEqual(linkA.quic.tls._receive_buffer, b"\x04\x00")
        a.send(A, b"alive")
        self.network.pump()
        self.assertEqual(self.successResultOf(a.transports.get()), (A, b"alive"))
        b.quic._crypto_streams[tls.Epoch.ONE_RTT].sender.write(b"\x04\x00\x00\x00")
        b._needFlush()
        self.network.pump(1.0)
        self.assertNotIn(B, self.relay.store.peers)
        self.assertEqual(b.closeEvent.error_code, 0x100 + tls.AlertDescription.unexpected_message)
        self.assertEqual(self.flushLoggedErrors(), [])


class ParseTests(_ClockedQuicBase):
    """
    The lean receive's frame parser takes exactly the payloads it can
    handle as aioquic would, and leaves every other one to aioquic.
    """

    def setUp(self):
        super().setUp()
        self.connected(A)
        self.lean = self.relay.store.peers[A].link._lean

    def test_taken(self):
        """
        DATAGRAM frames (1- and 2-byte lengths), PADDING runs, ACK and
        ACK_ECN frames, in any order.
        """
        payload = (
            b"\x31\x03abc"
            + b"\x00" * 5
            + b"\x02\x05\x00\x00\x01"
            + b"\x31\x40\x41"
            + b"x" * 65
            + b"\x03\x09\x01\x00\x00\x01\x02\x03"
            + b"\x00"
        )
        datagrams, acks, eliciting = self.lean._parse(payload)
        self.assertEqual(datagrams, [b"abc", b"x" * 65])
        self.assertEqual(
            [(list(ranges), delay) for ranges, delay in acks],
            [([range(4, 6)], 0), ([range(9, 10)], 1)],
        )
        self.assertTrue(eliciting)
        datagrams, acks, eliciting = self.lean._parse(b"\x02\x05\x00\x00\x00" + b"\x00" * 30)
        self.assertEqual((datagrams, eliciting), ([], False))

    def test_handedOver(self):
        """
        Anything else is left to aioquic: other frames, no frame, a
        DATAGRAM frame cut short or with a 4-byte length or larger than the
        relay advertised, a malformed ACK.
        """
        for payload in [
            b"",
            b"\x01",
            b"\x31\x03ab",
            b"\x31",
            b"\x31\x40",
            b"\x31\x80\x00\x00\x01a",
            b"\x30abc",
            b"\x31\x03abc\x1c\x00\x00\x00",
            b"\x02\x05\x00",
            # Largest acknowledged 1, first range 5: a negative packet number.
            b"\x02\x01\x00\x00\x05",
            b"\x40\x31\x01a",
        ]:
            self.assertIsNone(self.lean._parse(payload), payload)
        limit = quic.MAX_DATAGRAM_FRAME_SIZE
        # aioquic refuses a frame whose length and data reach the limit.
        fits = limit - 3
        self.assertIsNotNone(
            self.lean._parse(b"\x31" + (0x4000 | fits).to_bytes(2, "big") + b"y" * fits)
        )
        self.assertIsNone(
            self.lean._parse(b"\x31" + (0x4000 | fits + 1).to_bytes(2, "big") + b"y" * (fits + 1))
        )


class HandOverTests(_ClockedQuicBase):
    """
    Packets the lean receive cannot take (duplicates, damaged, cut short)
    go to aioquic, which drops them; nothing changes.
    """

    def test_duplicateDamagedShort(self):
        """
        A client packet damaged in transit, then cut short, then whole,
        then again: only the whole one is taken, once.
        """
        a = self.connected(A)
        link = self.relay.store.peers[A].link
        captured = []

        def hold(source, destination, data):
            if destination == SERVER:
                captured.append((source, data))
                return True
            return False

        self.network.drop = hold
        a.send(A, b"once")
        self.network.pump(0.004, step=0.002)
        self.network.drop = lambda source, destination, data: False
        self.assertEqual(len(captured), 1)
        source, data = captured[0]
        space = applicationSpace(link.quic)
        before = (
            link._lean.handedOver,
            link._lean.received,
            list(space.ack_queue),
            space.largest_received_packet,
            space.expected_packet_number,
        )
        damaged = data[:-1] + bytes([data[-1] ^ 1])
        for packet in (damaged, data[:20]):
            self.protocol.datagramReceived(packet, source)
        self.assertEqual(link._lean.handedOver, before[0] + 2)
        self.assertEqual(
            (
                link._lean.received,
                list(space.ack_queue),
                space.largest_received_packet,
                space.expected_packet_number,
            ),
            before[1:],
        )
        self.protocol.datagramReceived(data, source)
        self.assertEqual(
            (link._lean.handedOver, link._lean.received), (before[0] + 2, before[1] + 1)
        )
        self.protocol.datagramReceived(data, source)
        self.assertEqual(
            (link._lean.handedOver, link._lean.received), (before[0] + 3, before[1] + 1)
        )
        self.network.pump(0.1)
        self.assertEqual(self.successResultOf(a.transports.get()), (A, b"once"))
        self.assertFalse(a.transports.pending)
        self.assertFalse(link._isClosing())
