"""
What L{relay.internals.autobahn} relies on, checked against the installed
Autobahn: each test fails with the library, its version and the missing
piece, so that an upgrade that takes one away shows here rather than as a
slower or misbehaving relay.
"""

import os

import autobahn.websocket.protocol
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from relay.internals import autobahn as internals

UPGRADE = (
    b"GET /relay HTTP/1.1\r\n"
    b"Host: relay.example:443\r\n"
    b"Upgrade: websocket\r\n"
    b"Connection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n"
)


def _missing(what):
    return f"autobahn {internals.VERSION}: {what}; relay.internals.autobahn relies on it"


def _frame(payload, opcode=2, fin=True):
    mask = os.urandom(4)
    n = len(payload)
    header = (
        bytes((0x80 * fin | opcode, 0x80 | n))
        if n < 126
        else bytes((0x80 * fin | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    )
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


class _Recorder(internals.ServerProtocol):
    def __init__(self):
        super().__init__()
        self.events = []

    def opened(self):
        self.events.append("opened")

    def onMessage(self, payload, isBinary):
        self.events.append(("message", payload))

    def messageTooLarge(self, size, limit, reason):
        self.events.append(("too large", size, limit))

    def failHandshake(self, reason, code=400, responseHeaders=None):
        self.events.append(("failed", reason))
        return super().failHandshake(reason, code, responseHeaders)


class _Transport(StringTransport):
    # Autobahn unregisters a producer when it drops a connection, whether
    # one was registered or not; StringTransport would raise.
    def unregisterProducer(self):
        self.producer = None


def _connected(headers=b"", **options):
    """
    A L{_Recorder} over a StringTransport, its upgrade request sent.
    """
    factory = WebSocketServerFactory(reactor=Clock())
    factory.protocol = _Recorder
    factory.setProtocolOptions(
        openHandshakeTimeout=0,
        closeHandshakeTimeout=0,
        autoPingInterval=0,
        failByDrop=True,
        **options,
    )
    transport = _Transport(peerAddress=IPv4Address("TCP", "192.0.2.1", 1))
    protocol = factory.buildProtocol(transport.getPeer())
    protocol.makeConnection(transport)
    protocol.dataReceived(UPGRADE + headers + b"\r\n")
    return protocol, transport


class AutobahnInternalsTests(unittest.SynchronousTestCase):
    def test_pformatIsTheModulesGlobal(self):
        """
        Autobahn formats the arguments of its debug lines with the
        C{pformat} its protocol module imported: replacing that global is
        what keeps a connection from paying for them.
        """
        self.assertTrue(
            hasattr(autobahn.websocket.protocol, "pformat"),
            _missing("autobahn.websocket.protocol.pformat"),
        )
        calls = []
        self.patch(autobahn.websocket.protocol, "pformat", lambda value: calls.append(value) or "")
        _connected()
        self.assertTrue(calls, _missing("a pformat call for the debug lines of a new connection"))

    def test_formatOnlyForDebug(self):
        self.patch(autobahn.websocket.protocol, "pformat", None)
        internals.formatOnlyForDebug()
        self.assertEqual(autobahn.websocket.protocol.pformat([("option", 1)]), "")

    def test_openedBeforeWhatFollowsTheRequest(self):
        """
        C{opened} (from Autobahn's C{_onOpen}) is called once, after the 101
        is written and before a frame that came with the request is parsed.
        """
        self.assertTrue(
            callable(getattr(WebSocketServerProtocol, "_onOpen", None)),
            _missing("WebSocketServerProtocol._onOpen"),
        )
        factory = WebSocketServerFactory(reactor=Clock())
        factory.protocol = _Recorder
        factory.setProtocolOptions(
            openHandshakeTimeout=0, closeHandshakeTimeout=0, autoPingInterval=0
        )
        transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.1", 1))
        protocol = factory.buildProtocol(transport.getPeer())
        protocol.makeConnection(transport)
        protocol.dataReceived(UPGRADE + b"\r\n" + _frame(b"with the request"))
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 101 "))
        self.assertEqual(
            protocol.events,
            ["opened", ("message", b"with the request")],
            _missing("_onOpen before the frames after the request"),
        )

    def test_parserState(self):
        """
        C{betweenFrames} follows Autobahn's C{current_frame} and
        C{inside_message}; C{takeBuffered} takes its buffer C{data}.
        """
        protocol, _ = _connected()
        for name in ("current_frame", "inside_message", "data"):
            self.assertTrue(hasattr(protocol, name), _missing(f"WebSocketServerProtocol.{name}"))
        self.assertTrue(protocol.betweenFrames())
        frame = _frame(b"x" * 100)
        protocol.dataReceived(frame[:20])
        self.assertFalse(
            protocol.betweenFrames(),
            _missing("current_frame set while a frame's payload is awaited"),
        )
        protocol.dataReceived(frame[20:])
        self.assertTrue(
            protocol.betweenFrames(), _missing("current_frame None after a whole frame")
        )
        protocol.dataReceived(_frame(b"first", fin=False))
        self.assertTrue(
            protocol.insideMessage(), _missing("inside_message within a fragmented message")
        )
        self.assertFalse(protocol.betweenFrames())
        protocol.dataReceived(_frame(b" and last", opcode=0))
        self.assertFalse(
            protocol.insideMessage(), _missing("inside_message cleared after the last fragment")
        )
        protocol.dataReceived(b"\x82")
        self.assertTrue(protocol.betweenFrames())
        self.assertEqual(
            protocol.takeBuffered(), b"\x82", _missing("an incomplete frame header kept in data")
        )
        self.assertEqual(protocol.data, b"")
        self.assertEqual(
            protocol.events[1:], [("message", b"x" * 100), ("message", b"first and last")]
        )

    def test_stopParsing(self):
        protocol, _ = _connected()
        protocol.stopParsing()
        protocol.dataReceived(_frame(b"ignored"))
        self.assertEqual(
            protocol.events, ["opened"], _missing("nothing parsed once state is STATE_CLOSED")
        )

    def test_messageTooLarge(self):
        """
        C{messageTooLarge} (from Autobahn's C{_max_message_size_exceeded})
        is called for a frame over C{maxFramePayloadSize}.
        """
        self.assertTrue(
            callable(getattr(WebSocketServerProtocol, "_max_message_size_exceeded", None)),
            _missing("WebSocketServerProtocol._max_message_size_exceeded"),
        )
        protocol, _ = _connected(maxFramePayloadSize=100, maxMessagePayloadSize=100)
        protocol.dataReceived(_frame(b"x" * 101))
        self.assertEqual(
            protocol.events[1:2],
            [("too large", 101, 100)],
            _missing("_max_message_size_exceeded for an oversized frame"),
        )

    def test_originRefusals(self):
        """
        Autobahn refuses a "null" Origin itself, with a reason that begins
        with one of L{ORIGIN_REFUSALS} (relay.listener.ws answers those 403, as Go).
        """
        protocol, _ = _connected(b"Origin: null\r\n")
        failures = [event[1] for event in protocol.events if event[0] == "failed"]
        self.assertEqual(len(failures), 1, _missing("a handshake failure for Origin: null"))
        self.assertTrue(
            failures[0].startswith(internals.ORIGIN_REFUSALS),
            _missing(f"the reason {failures[0]!r} for Origin: null"),
        )
