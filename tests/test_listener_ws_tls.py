"""
TLS for peers (L{relay.listener.ws.PeerTLSProtocol}): records written in the same
turn, one read delivered whole, order and backpressure kept; checked against
an independent TLS client (pyOpenSSL in memory for the unit tests, the
C{websockets} library's asyncio client over a real socket end to end), the
upgrade over TLS 1.3 whatever the order of the client's bytes, and the Twisted
internals it relies on guarded.
"""

import asyncio
import os
import socket
import ssl

from OpenSSL import SSL
from twisted.internet import reactor, tcp, threads
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import BufferingTLSTransport
from twisted.trial import unittest
from websockets.asyncio.client import connect

from relay import messages as m
from relay.auth import TokenValidator
from relay.internals import openssl
from relay.listener.ws import (
    PeerWebSocketFactory,
    PeerWebSocketProtocol,
    RefusableTLSFactory,
)
from relay.relay import Relay
from relay.store import Store
from relay.tls import loadCertificateOptions
from tests.certs import writeCertificate
from tests.helpers import SECRET, authMessage, makeRelay

TIMEOUT = 10
A, B = m.peerID("peer-a"), m.peerID("peer-b")
UPGRADE = (
    b"GET /relay HTTP/1.1\r\n"
    b"Host: relay.example:443\r\n"
    b"Upgrade: websocket\r\n"
    b"Connection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n\r\n"
)


def _certificate(case):
    path = case.mktemp()
    os.makedirs(path)
    cert, key, _ = writeCertificate(path)
    return cert, key


def _fakeTCP(accept=None):
    """
    A L{tcp.Server} (the exact type PeerTLSProtocol writes to directly)
    without a socket: C{writeSomeData} takes C{accept} bytes at most and
    records them in C{sent}; C{write} queues in C{written} and counts the
    bytes in C{_tempDataLen}, as Twisted's does.
    """
    t = tcp.Server.__new__(tcp.Server)
    t.dataBuffer = b""
    t._tempDataLen = 0
    t.connected = True
    t.disconnecting = False
    t.producer = None
    t.sent = []
    t.written = []
    t.lost = []

    def writeSomeData(data):
        n = len(data) if accept is None else min(accept, len(data))
        t.sent.append(bytes(data[:n]))
        return n

    def write(data):
        t.written.append(bytes(data))
        t._tempDataLen += len(data)

    t.writeSomeData = writeSomeData
    t.write = write
    t.loseConnection = lambda: t.lost.append("lose")
    t.abortConnection = lambda: t.lost.append("abort")
    t.registerProducer = lambda producer, streaming: None
    t.unregisterProducer = lambda: None
    t.getPeer = lambda: IPv4Address("TCP", "192.0.2.1", 1)
    t.getHost = lambda: IPv4Address("TCP", "127.0.0.1", 443)
    return t


class _Recorder(Protocol):
    def connectionMade(self):
        self.received = []
        self.lost = None

    def dataReceived(self, data):
        self.received.append(data)

    def connectionLost(self, reason):
        self.lost = reason


class _InMemory:
    """
    A L{PeerTLSProtocol} server over C{transport} and a pyOpenSSL client in
    memory, pumped by hand.
    """

    def __init__(self, case, transport, wrapped=None, tlsProtocol=None, maxVersion=None):
        """
        @param tlsProtocol: the server's TLS protocol class, if not
            L{PeerTLSProtocol}.
        @param maxVersion: the newest TLS version the client offers (an
            C{OpenSSL.SSL.TLS1_*_VERSION}), if not the newest there is.
        """
        cert, key = _certificate(case)
        wrapped = wrapped or Factory.forProtocol(_Recorder)
        # The clock of Twisted's BufferingTLSTransport, which holds writes
        # until the next turn.
        self.clock = Clock()
        self.factory = RefusableTLSFactory(
            loadCertificateOptions(cert, key), False, wrapped, clock=self.clock
        )
        if tlsProtocol is not None:
            self.factory.protocol = tlsProtocol
        self.server = self.factory.buildProtocol(IPv4Address("TCP", "192.0.2.1", 1))
        self.transport = transport
        context = SSL.Context(SSL.TLS_METHOD)
        if maxVersion is not None:
            context.set_max_proto_version(maxVersion)
        self.client = SSL.Connection(context, None)
        self.client.set_connect_state()
        self.server.makeConnection(transport)
        self.app = self.server.wrappedProtocol

    def wire(self):
        """
        Everything the server put out so far (sent straight or queued), taken.
        """
        t = self.transport
        if isinstance(t, StringTransport):
            data = t.value()
            t.clear()
            return data
        data = b"".join(t.sent + t.written)
        del t.sent[:], t.written[:]
        t._tempDataLen = 0
        return data

    def toClient(self):
        data = self.wire()
        if data:
            self.client.bio_write(data)

    def toServer(self):
        try:
            data = self.client.bio_read(2**20)
        except SSL.WantReadError:
            return
        self.server.dataReceived(data)

    def handshake(self):
        for _ in range(10):
            try:
                self.client.do_handshake()
            except SSL.WantReadError:
                pass
            self.toServer()
            self.toClient()
            if self.server._handshakeDone and self.client.get_state_string().endswith(
                b"SSL negotiation finished successfully"
            ):
                break
        # The client reads the session tickets TLS 1.3 servers send (and
        # any data already there, returned).
        return self.clientReceived()

    def clientReceived(self):
        out = []
        while True:
            try:
                out.append(self.client.recv(2**16))
            except SSL.WantReadError:
                return b"".join(out)


class WriteNowTests(unittest.SynchronousTestCase):
    """
    L{PeerTLSProtocol.writeNow}: records straight to the socket when nothing
    is queued, else behind what is.
    """

    def connected(self, accept=None):
        pair = _InMemory(self, _fakeTCP(accept))
        pair.handshake()
        pair.wire()
        return pair

    def test_straightToTheSocketInOneSend(self):
        """
        A write of several records (more than one SSL_write) goes to the
        socket in one send, nothing left queued.
        """
        pair = self.connected()
        data = os.urandom(100_000)
        pair.server.writeNow(data)
        t = pair.transport
        self.assertEqual((len(t.sent), t.written), (1, []))
        pair.toClient()
        self.assertEqual(pair.clientReceived(), data)

    def test_oneRecordFromTheBytes(self):
        """
        A write of bytes that fits one record is encrypted straight from the
        bytes object; a larger one, or one that is not bytes, through
        C{from_buffer}.
        """
        viewed = []

        def cleartextOf(data):
            viewed.append(len(data))
            return openssl._ffi.from_buffer(data)

        self.patch(openssl, "cleartextOf", cleartextOf)
        pair = self.connected()
        small, large = os.urandom(2**14), os.urandom(2**14 + 1)
        for data in (small, large, bytearray(b"not bytes")):
            pair.server.writeNow(data)
        self.assertEqual(viewed, [2**14 + 1, 9])
        pair.toClient()
        self.assertEqual(pair.clientReceived(), small + large + b"not bytes")

    def test_restQueuedAfterPartialSend(self):
        pair = self.connected(accept=1000)
        data = os.urandom(20_000)
        pair.server.writeNow(data)
        t = pair.transport
        self.assertEqual([len(x) for x in t.sent], [1000])
        self.assertEqual(len(t.written), 1)
        pair.toClient()
        self.assertEqual(pair.clientReceived(), data)

    def test_queuedRestIsACopy(self):
        """
        The records are sent from a buffer shared by all connections: what a
        partial send leaves to Twisted's buffer is a copy, unchanged by the
        writes that come after it.
        """
        pair = self.connected(accept=1000)
        t = pair.transport
        kept = []

        def write(data):
            kept.append(data)
            t._tempDataLen += len(data)

        t.write = write
        first = os.urandom(20_000)
        pair.server.writeNow(first)
        self.assertIsInstance(kept[0], bytes)
        snapshot = bytes(kept[0])
        t._tempDataLen = 0
        pair.server.writeNow(os.urandom(20_000))
        self.assertEqual(kept[0], snapshot)
        pair.client.bio_write(t.sent[0] + kept[0])
        self.assertEqual(pair.clientReceived(), first)

    def test_writeLargerThanTheBuffer(self):
        """
        More records than the shared send buffer holds go out as pyOpenSSL
        reads them, still in one send.
        """
        pair = self.connected()
        data = os.urandom(openssl.SEND_BUFFER_SIZE + 50_000)
        pair.server.writeNow(data)
        self.assertEqual((len(pair.transport.sent), pair.transport.written), (1, []))
        pair.toClient()
        self.assertEqual(pair.clientReceived(), data)

    def test_bySendWithoutSSLWrite(self):
        """
        Without SSL_write and BIO_read from pyOpenSSL's binding, pyOpenSSL's
        send and bio_read do the work.
        """
        self.patch(openssl, "sslWrite", None)
        pair = self.connected(accept=1000)
        data = os.urandom(100_000)
        pair.server.writeNow(data)
        self.assertEqual([len(x) for x in pair.transport.sent], [1000])
        pair.toClient()
        self.assertEqual(pair.clientReceived(), data)

    def test_nothingJumpsTheQueue(self):
        """
        Records queued in the TCP transport (by a plain write, or a partial
        send) keep their place: a later writeNow queues behind them.
        """
        pair = self.connected()
        pair.server.write(b"first ")
        t = pair.transport
        self.assertEqual(
            (t.sent, len(t.written)), ([], 1), "a plain write is left to Twisted's buffering"
        )
        pair.server.writeNow(b"second")
        self.assertEqual((t.sent, len(t.written)), ([], 2))
        pair.toClient()
        self.assertEqual(pair.clientReceived(), b"first second")

    def test_notPlainTCPWrittenAsUsual(self):
        """
        Over any other transport (here a StringTransport) the records go to
        its C{write}.
        """
        pair = _InMemory(self, StringTransport())
        pair.handshake()
        pair.server.writeNow(b"hello")
        pair.toClient()
        self.assertEqual(pair.clientReceived(), b"hello")

    def test_beforeHandshakeBuffered(self):
        """
        A write before the handshake is done waits in Twisted's buffer, and
        comes out once it is.
        """
        pair = _InMemory(self, _fakeTCP())
        pair.server.writeNow(b"early")
        self.assertEqual(pair.server._appSendBuffer, [b"early"])
        early = pair.handshake()
        self.assertEqual(pair.server._appSendBuffer, [])
        pair.toClient()
        self.assertEqual(early + pair.clientReceived(), b"early")

    def test_emptyWrite(self):
        pair = self.connected()
        pair.server.writeNow(b"")
        self.assertEqual((pair.transport.sent, pair.transport.written), ([], []))
        self.assertIsNone(pair.app.lost)

    def test_afterLoseConnectionDropped(self):
        pair = self.connected()
        pair.server.loseConnection()
        pair.wire()
        pair.server.writeNow(b"late")
        self.assertEqual((pair.transport.sent, pair.transport.written), ([], []))


class WebSocketOverTLSTests(unittest.SynchronousTestCase):
    """
    The peer protocol over PeerTLSProtocol writes its per-read batches
    with writeNow.
    """

    def test_batchWrittenNow(self):
        clock = Clock()
        relay = makeRelay(clock)
        pair = _InMemory(self, _fakeTCP(), PeerWebSocketFactory(relay, clock))
        ws = pair.app
        self.assertTrue(ws._tls)
        pair.handshake()
        pair.wire()
        ws._batch += [b"one", b"two"]
        ws.flush()
        self.assertEqual((len(pair.transport.sent), pair.transport.written), (1, []))
        pair.toClient()
        self.assertEqual(pair.clientReceived(), b"onetwo")
        ws.session.linkLost()


class _UpgradeOverTLS:
    """
    The WebSocket upgrade over TLS 1.3, with the client's bytes reaching the
    relay in each order they can: its Finished and its request in one read
    (a client that writes at once after its handshake), the request only
    after the client took in the session tickets the server sends after the
    handshake, or a byte per read. Each time the request is answered (101)
    and the connection is open.

    An end-to-end test once waited for that answer in vain (the relay never
    got the request: the client had lost it, see L{IndependentClientTests});
    these pin the relay's side of the sequence seen there, deterministically.
    """

    tlsProtocol = None

    def connected(self):
        clock = Clock()
        pair = _InMemory(
            self, _fakeTCP(), PeerWebSocketFactory(makeRelay(clock), clock), self.tlsProtocol
        )
        self.addCleanup(pair.app.session.linkLost)
        # The handshake up to the client's Finished, which waits in the
        # client's send BIO.
        for _ in range(10):
            try:
                pair.client.do_handshake()
                break
            except SSL.WantReadError:
                pass
            pair.toServer()
            self.flushToClient(pair)
        else:
            self.fail("the client's handshake did not finish")
        self.assertEqual(pair.client.get_protocol_version_name(), "TLSv1.3")
        self.assertFalse(pair.server._handshakeDone)
        return pair

    def flushToClient(self, pair):
        pair.clock.advance(0)
        pair.toClient()

    def assertUpgraded(self, pair):
        self.flushToClient(pair)
        answer = pair.clientReceived()
        self.assertTrue(answer.startswith(b"HTTP/1.1 101 "), answer[:200])
        self.assertEqual(pair.app.state, pair.app.STATE_OPEN)

    def test_finishedAndRequestInOneRead(self):
        pair = self.connected()
        pair.client.send(UPGRADE)
        pair.toServer()
        self.assertUpgraded(pair)

    def test_requestAfterSessionTickets(self):
        pair = self.connected()
        pair.toServer()
        self.assertTrue(pair.server._handshakeDone)
        pair.clock.advance(0)
        tickets = pair.wire()
        self.assertTrue(tickets, "no session tickets after the handshake")
        pair.client.bio_write(tickets)
        self.assertEqual(pair.clientReceived(), b"")
        self.assertEqual(pair.app.state, pair.app.STATE_CONNECTING)
        pair.client.send(UPGRADE)
        pair.toServer()
        self.assertUpgraded(pair)

    def test_byteAtATime(self):
        pair = self.connected()
        pair.client.send(UPGRADE)
        wire = pair.client.bio_read(2**16)
        for i in range(len(wire)):
            pair.server.dataReceived(wire[i : i + 1])
        self.assertUpgraded(pair)


class UpgradeOverPeerTLSTests(_UpgradeOverTLS, unittest.SynchronousTestCase):
    """
    L{_UpgradeOverTLS} over L{PeerTLSProtocol}.
    """


class UpgradeOverTwistedTLSTests(_UpgradeOverTLS, unittest.SynchronousTestCase):
    """
    L{_UpgradeOverTLS} over Twisted's own TLS protocol, the one the relay
    used before L{PeerTLSProtocol}.
    """

    tlsProtocol = BufferingTLSTransport


class ReadTests(unittest.SynchronousTestCase):
    """
    One read of many records is delivered in one dataReceived, so that the
    lean path batches per read as over plain TCP.
    """

    def test_incompleteRecordKept(self):
        """
        A record split across reads is delivered once whole.
        """
        pair = self.connected()
        pair.client.send(b"split record")
        data = pair.client.bio_read(2**16)
        pair.server.dataReceived(data[:10])
        self.assertEqual(pair.app.received, [])
        pair.server.dataReceived(data[10:])
        self.assertEqual(pair.app.received, [b"split record"])

    def test_everyRecordDeliveredWhateverTheSplits(self):
        """
        Records of many sizes cut into reads at random places: in order, and
        all of it once the last byte is in. The read loop stops
        when the receive BIO is empty instead of on a WantReadError; this
        fails if OpenSSL ever keeps a whole record it has taken from the BIO
        undecrypted (read-ahead).
        """
        import random

        rnd = random.Random(13)
        for attempt in range(20):
            pair = self.connected()
            sent = []
            for _ in range(rnd.randint(1, 60)):
                msg = os.urandom(rnd.choice([1, 10, 500, 1500, 9000, 20000]))
                pair.client.sendall(msg)
                sent.append(msg)
            wire = pair.client.bio_read(2**22)
            fed = 0
            while fed < len(wire):
                step = min(len(wire), fed + rnd.randint(1, 40000))
                pair.server.dataReceived(wire[fed:step])
                fed = step
                self.assertTrue(b"".join(sent).startswith(b"".join(pair.app.received)))
            self.assertEqual(
                b"".join(pair.app.received),
                b"".join(sent),
                f"attempt {attempt}: records left undelivered",
            )

    def test_readLargerThanTheBuffer(self):
        """
        A read of more records than the shared receive buffer holds is
        delivered whole, in order, in one piece.
        """
        pair = self.connected()
        messages = [os.urandom(9000) for _ in range(openssl.RECEIVE_BUFFER_SIZE // 9000 * 2 + 3)]
        for msg in messages:
            pair.client.sendall(msg)
        pair.toServer()
        self.assertEqual(len(pair.app.received), 1)
        self.assertEqual(pair.app.received[0], b"".join(messages))

    def test_byRecordWithoutSSLRead(self):
        """
        Without SSL_read from pyOpenSSL's binding the records are read with
        pyOpenSSL's recv, and still delivered in one piece.
        """
        self.patch(openssl, "sslRead", None)
        pair = self.connected()
        messages = [b"%04d" % i * 300 for i in range(50)]
        for msg in messages:
            pair.client.send(msg)
        pair.client.shutdown()
        pair.toServer()
        self.assertEqual(pair.app.received, [b"".join(messages)])
        self.assertIn("lose", pair.transport.lost)

    def test_withoutMemoryBIOLength(self):
        """
        Without the private binding (a changed pyOpenSSL) reads and writes
        work as before, on Twisted's exceptions.
        """
        self.patch(openssl, "memoryBIOLength", None)
        self.patch(openssl, "sslRead", None)
        self.patch(openssl, "sslWrite", None)
        pair = self.connected()
        messages = [b"%04d" % i * 300 for i in range(50)]
        for msg in messages:
            pair.client.send(msg)
        pair.toServer()
        self.assertEqual(pair.app.received, [b"".join(messages)])
        data = os.urandom(100_000)
        pair.server.writeNow(data)
        self.assertEqual(len(pair.transport.sent), 1)
        pair.toClient()
        self.assertEqual(pair.clientReceived(), data)

    def connected(self):
        pair = _InMemory(self, _fakeTCP())
        pair.handshake()
        pair.wire()
        return pair

    def test_manyRecordsOneDelivery(self):
        pair = self.connected()
        messages = [b"%04d" % i * 300 for i in range(50)]
        for msg in messages:
            pair.client.send(msg)
        pair.toServer()
        self.assertEqual(pair.app.received, [b"".join(messages)])

    def countBIOWrites(self):
        """
        Count the calls of pyOpenSSL's C{bio_write}, which the handshake
        uses and a read of records after it does not.
        """
        calls = []
        bioWrite = SSL.Connection.bio_write

        def counted(connection, data):
            calls.append(len(data))
            return bioWrite(connection, data)

        self.patch(SSL.Connection, "bio_write", counted)
        return calls

    def test_recordsIntoTheBIOWithBIOWrite(self):
        """
        After the handshake a read of bytes goes into the receive BIO by
        BIO_write, not pyOpenSSL's bio_write; a read that is not bytes, or
        without the binding, by bio_write. All are delivered.
        """
        pair = self.connected()
        calls = self.countBIOWrites()
        pair.client.send(b"one")
        pair.toServer()
        self.assertEqual((pair.app.received, calls), ([b"one"], []))
        pair.client.send(b"two")
        pair.server.dataReceived(bytearray(pair.client.bio_read(2**16)))
        self.patch(openssl, "bioWrite", None)
        pair.client.send(b"three")
        pair.toServer()
        self.assertEqual(pair.app.received, [b"one", b"two", b"three"])
        self.assertEqual(len(calls), 2)

    def test_oneSSLReadPerRecord(self):
        """
        A read of whole records is decrypted with one SSL_read per record,
        none more to be told it is over (WANT_READ); a record split across
        reads, or a record's cleartext larger than the room left in the
        buffer, asks once more.
        """
        calls = []
        sslRead = openssl.sslRead

        def counted(ssl, buf, room):
            n = sslRead(ssl, buf, room)
            calls.append(n)
            return n

        self.patch(openssl, "sslRead", counted)
        pair = self.connected()
        del calls[:]
        pair.client.send(b"one")
        pair.toServer()
        self.assertEqual(calls, [3])
        pair.client.send(b"two")
        pair.client.send(b"three")
        pair.toServer()
        self.assertEqual(calls, [3, 3, 5])
        pair.client.send(b"split")
        data = pair.client.bio_read(2**16)
        pair.server.dataReceived(data[:-1])
        pair.server.dataReceived(data[-1:])
        self.assertEqual(calls[3:], [-1, 5])
        self.patch(openssl, "RECEIVE_BUFFER_SIZE", 4)
        pair.client.send(b"fill")
        pair.toServer()
        self.assertEqual(calls[5:], [4, -1])
        self.assertEqual(pair.app.received, [b"one", b"twothree", b"split", b"fill"])

    def test_writesWaitingForTheHandshake(self):
        """
        The reads of the handshake go through Twisted's dataReceived, which
        sends the writes that waited for it once it is done.
        """
        pair = _InMemory(self, _fakeTCP())
        pair.server.write(b"early")
        self.assertEqual(pair.server.cleartextWaiting, [b"early"])
        received = pair.handshake()
        pair.toClient()
        self.assertEqual(received + pair.clientReceived(), b"early")
        self.assertEqual(pair.server.cleartextWaiting, [])

    def test_dataBeforeCloseNotify(self):
        pair = self.connected()
        pair.client.send(b"last words")
        pair.client.shutdown()
        pair.toServer()
        self.assertEqual(pair.app.received, [b"last words"])
        self.assertIn("lose", pair.transport.lost)

    def test_dataBeforeError(self):
        """
        A record that fails to decrypt after good ones: the good ones are
        delivered, then the connection is given up.
        """
        pair = self.connected()
        pair.client.send(b"good")
        good = pair.client.bio_read(2**16)
        pair.client.send(b"bad!")
        bad = bytearray(pair.client.bio_read(2**16))
        bad[-1] ^= 1
        pair.server.dataReceived(good + bytes(bad))
        self.assertEqual(pair.app.received, [b"good"])
        self.assertTrue(pair.transport.lost)


class TLS12Tests(unittest.SynchronousTestCase):
    """
    Reads and writes over TLS 1.2 (the oldest the relay accepts; other
    record sizes and no session tickets after the handshake).
    """

    def connected(self, accept=None):
        pair = _InMemory(self, _fakeTCP(accept), maxVersion=SSL.TLS1_2_VERSION)
        pair.handshake()
        pair.wire()
        self.assertEqual(pair.client.get_protocol_version_name(), "TLSv1.2")
        return pair

    def test_manyRecordsOneDelivery(self):
        pair = self.connected()
        messages = [os.urandom(1400) for _ in range(50)]
        for msg in messages:
            pair.client.send(msg)
        pair.toServer()
        self.assertEqual(pair.app.received, [b"".join(messages)])

    def test_writeNowPartialSend(self):
        pair = self.connected(accept=1000)
        data = os.urandom(50_000)
        pair.server.writeNow(data)
        self.assertEqual([len(x) for x in pair.transport.sent], [1000])
        pair.toClient()
        self.assertEqual(pair.clientReceived(), data)

    def test_closeNotify(self):
        pair = self.connected()
        pair.client.send(b"last words")
        pair.client.shutdown()
        pair.toServer()
        self.assertEqual(pair.app.received, [b"last words"])
        self.assertIn("lose", pair.transport.lost)


class IndependentClientTests(unittest.TestCase):
    """
    Real TLS WebSocket end to end: the C{websockets} library's asyncio
    client, in a thread with its own event loop, over a relay listening in
    this process through L{RefusableTLSFactory}.

    Not its sync client: that one reads in a thread of its own while the
    caller writes, so two threads use one OpenSSL C{SSL} object at once,
    which OpenSSL does not allow. The request it writes while its reader
    takes in the NewSessionTicket of TLS 1.3 is now and then lost inside the
    client (never sent, the relay waits for it until its handshake timeout),
    or the write fails or the process crashes; seen with websockets' own
    server as well, and never with no ticket sent (see the commit that made
    this change). asyncio's TLS is one memory-BIO object per connection,
    used from the loop's thread alone.
    """

    timeout = 60

    def setUp(self):
        cert, key = _certificate(self)
        self.relay = Relay(TokenValidator(SECRET, reactor), "rels://127.0.0.1:1", reactor, Store())
        self.wsFactory = PeerWebSocketFactory(self.relay, reactor)
        tls = RefusableTLSFactory(loadCertificateOptions(cert, key), False, self.wsFactory)
        self.port = reactor.listenTCP(0, tls, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.addCleanup(lambda: self.relay.shutdown())
        self.url = f"wss://127.0.0.1:{self.port.getHost().port}/relay"
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.context.check_hostname = False
        self.context.verify_mode = ssl.CERT_NONE

    def inClientThread(self, scenario):
        """
        Run the coroutine C{scenario} in a thread, on an event loop of its
        own (the reactor stays free to serve it).

        @return: a Deferred with its result.
        """
        return threads.deferToThread(asyncio.run, scenario)

    async def peer(self, name, receiveBuffer=None):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if receiveBuffer is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receiveBuffer)
        sock.setblocking(False)
        await asyncio.wait_for(
            asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", self.port.getHost().port)),
            TIMEOUT,
        )
        ws = await connect(
            self.url,
            sock=sock,
            ssl=self.context,
            open_timeout=TIMEOUT,
            close_timeout=TIMEOUT,
            max_size=None,
            compression=None,
            ping_interval=None,
        )
        await ws.send(authMessage(name))
        assert await asyncio.wait_for(ws.recv(), TIMEOUT) == self.relay.authResponse
        return ws

    def test_manyMessagesInOrder(self):
        sizes = [1 + (i * 397) % 8000 for i in range(3000)]
        sent = [m.encodeTransport(B, (b"%06d" % i) + os.urandom(n)) for i, n in enumerate(sizes)]

        async def scenario():
            # A window of 100 messages: a sender much faster than the
            # receiver is dropped from (slow_consumer), by design.
            a, b = await self.peer("peer-a"), await self.peer("peer-b")
            got = []
            for start in range(0, len(sent), 100):
                window = sent[start : start + 100]
                for msg in window:
                    await a.send(msg)
                for _ in window:
                    got.append(await asyncio.wait_for(b.recv(), TIMEOUT))
            await a.close()
            await b.close()
            return got

        def check(got):
            self.assertEqual((len(got), dict(self.relay.counters.dropped)), (len(sent), {}))
            for i, (mine, theirs) in enumerate(zip(sent, got)):
                self.assertEqual(
                    m.decodeTransport(theirs), (A, m.decodeTransport(mine)[1]), f"message {i}"
                )
            self.assertEqual(sum(self.relay.counters.dropped.values()), 0)

        return self.inClientThread(scenario()).addCallback(check)

    def test_slowReceiverPartialSends(self):
        """
        A receiver with a small socket buffer that reads only once the
        sender is done: the relay's sends to it are partial and the rest
        waits in Twisted's buffer (seen while the receiver is stalled), and
        yet every message arrives, in order.
        """
        count = 400
        sent = [m.encodeTransport(B, (b"%06d" % i) + os.urandom(2000)) for i in range(count)]

        def queuedForReceiver():
            tcpTransport = self.receiverTransport()
            return len(tcpTransport.dataBuffer) + tcpTransport._tempDataLen

        async def scenario():
            a, b = await self.peer("peer-a"), await self.peer("peer-b", receiveBuffer=4096)
            # A small send buffer on the relay's side too: what the
            # receiver does not read soon stops fitting in the kernel.
            threads.blockingCallFromThread(
                reactor,
                lambda: self.receiverTransport().socket.setsockopt(
                    socket.SOL_SOCKET, socket.SO_SNDBUF, 4096
                ),
            )
            for msg in sent:
                await a.send(msg)
            # Give the relay time to route all of it, then look at the
            # receiver's TCP transport from the reactor thread.
            await asyncio.sleep(0.5)
            queued = threads.blockingCallFromThread(reactor, queuedForReceiver)
            got = [await asyncio.wait_for(b.recv(), TIMEOUT) for _ in sent]
            await a.close()
            await b.close()
            return queued, got

        def check(result):
            queued, got = result
            self.assertGreater(
                queued, 0, "the relay's sends to the stalled receiver were never partial"
            )
            self.assertEqual(got, [m.encodeTransport(A, m.decodeTransport(x)[1]) for x in sent])
            self.assertEqual(sum(self.relay.counters.dropped.values()), 0)

        return self.inClientThread(scenario()).addCallback(check)

    def receiverTransport(self):
        """
        The TCP transport under peer B's TLS connection.
        """
        for proto in self.port.factory.protocols:
            ws = proto.wrappedProtocol
            if (
                isinstance(ws, PeerWebSocketProtocol)
                and ws.session is not None
                and ws.session.peerID == B
            ):
                return proto.transport
        raise AssertionError("peer B's connection not found")
