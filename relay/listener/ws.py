"""
Peers over WebSocket: the Autobahn protocol and factory at path C{/relay}.

Autobahn does the RFC 6455 work: the opening handshake, control frames,
fragmentation, text frames, the close handshake and size limits. The one
frame that makes up nearly all traffic, a whole masked binary frame carrying
one relay message, takes a lean path instead: Autobahn's per-frame path costs
15-25 us (a masker object per frame, log arguments built at debug level
off, futures per message, the receive buffer re-sliced per frame), more than
all the relaying work. The lean path parses the header, unmasks with the C
routine of the C{websockets} library and hands the payload to the session;
anything else in the stream (and everything from there on, until Autobahn is
between frames again) goes through Autobahn unchanged. Outgoing messages are
always whole binary frames.

Messages relayed while one read is being taken apart are queued per
destination and written once the read is done: one write per destination per
read, straight to the socket when nothing is queued ahead
(L{relay.internals.twisted.writeNow}); over TLS, one TLS write per
destination per read whose records go out the same way
(L{PeerTLSProtocol}).

A sender most of whose read was dropped because the destinations were over
their high-water mark stops being read until one of them drains, or for
L{SENDER_PAUSE} at most (see L{PeerWebSocketProtocol.writeMessage}).

What a client sends outside whole binary frames is bounded too: the upgrade
request (L{MAX_UPGRADE_REQUEST} bytes, searched once, not once per read),
control frames before Auth (L{MAX_CONTROL_FRAMES_BEFORE_AUTH}), frames in
one fragmented message (L{MAX_FRAMES_PER_MESSAGE}), and PONG answers, which
wait while the peer's write buffer is full (only the latest PING is owed one,
as RFC 6455 5.5.3 allows). PING and PONG frames take the lean path.
"""

import re

from autobahn.twisted.websocket import WebSocketServerFactory
from autobahn.websocket.types import ConnectionDeny
from OpenSSL.SSL import Error as TLSError
from OpenSSL.SSL import WantReadError, ZeroReturnError
from twisted.internet import tcp
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from relay import messages as m
from relay.internals import autobahn as _autobahn
from relay.internals import openssl as _openssl
from relay.internals import twisted as _twisted
from relay.internals.twisted import writeNow as _writeNow
from relay.logtext import quoted
from relay.peer import PeerSession
from relay.tcp import noDelay

_autobahn.formatOnlyForDebug()

try:
    from websockets.speedups import apply_mask
except ImportError:  # a platform without the websockets C extension

    def apply_mask(data, mask):
        n = len(data)
        key = int.from_bytes((mask * ((n >> 2) + 1))[:n], "little")
        return (int.from_bytes(data, "little") ^ key).to_bytes(n, "little")


PATH = "/relay"
DEFAULT_HIGH_WATER = 1024 * 1024
CLOSE_TIMEOUT = 3.0
# Characters of a Close frame's reason put in the log line.
CLOSE_REASON_SHOWN = 100
CLOSE_LINE = "{peer}: WebSocket closed with code {code}: {reason}"
# Longest a sender is left unread after most of one read was dropped for
# congested destinations; it is read again sooner if one of them drains.
# Short enough that its other flows keep moving (a WireGuard keepalive or
# handshake is never held noticeably), long enough that reading and
# dropping a flood costs the relay next to nothing (one 64 KiB read per
# pause).
SENDER_PAUSE = 0.01
# Bytes of the HTTP upgrade request, up to its blank line. A Go agent's is
# about 250 bytes; with a proxy's X-Forwarded-* / X-Real-IP headers well
# under 1 KiB. 16 KiB is what Node.js accepts by default and Twisted's web
# server reads (HTTPChannel.totalHeadersSize); Go's net/http accepts 1 MiB,
# but no relay client needs a hundredth of that, and 2,048 pending
# connections may hold this much each (32 MiB in all). Larger requests are
# answered 431, as Go answers over its limit.
MAX_UPGRADE_REQUEST = 16 * 1024
# Control frames a client may send before its Auth; agents send none.
MAX_CONTROL_FRAMES_BEFORE_AUTH = 16
# Frames (fragments and control frames) within one fragmented message, the
# path Autobahn takes frame by frame (Go agents never fragment): beyond it
# the message costs the relay more than a whole frame per byte.
MAX_FRAMES_PER_MESSAGE = 64
# Messages the lean path delivers from one connection per reactor turn.
# Twisted gives every readable connection one read (up to 64 KiB) per turn:
# fair in bytes, but a read of 40-byte messages costs the relay 35 times one
# of 1,400-byte messages (46), so one agent sending tiny ones could take
# most of every turn. The rest of its read waits for the next turn, its
# socket unread meanwhile.
MESSAGES_PER_TURN = 128

# A whole (FIN) binary frame, as the first header byte.
_FIN_BINARY = 0x82
_FIN_PING = 0x89
_FIN_PONG = 0x8A
_MASKED = 0x80
_MAX_CONTROL_PAYLOAD = 125
_EMPTY_CONTROL_RUN = re.compile(rb"(?:[\x89\x8a]\x80....)+", re.DOTALL)
_END_OF_HEAD = b"\r\n\r\n"
_HEADER_TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\nConnection: close\r\nContent-Length: 0\r\n"
    b"\r\n"
)
# Server frame headers for payloads under 126 bytes, built once.
_SHORT_HEADERS = [bytes((_FIN_BINARY, n)) for n in range(126)]
_HEADER_16 = bytes((_FIN_BINARY, 126))


@implementer(IPushProducer)
class _Congestion:
    """
    Watches one transport's write buffer through the producer API.

    Twisted pauses its producer when the socket's send buffer and its own
    write buffer are full (64 KiB); from then on the messages queued are
    counted, and once they pass the high-water mark more are dropped: a slow
    receiver never makes the relay's memory grow without bound.

    The WebSocket senders whose messages were dropped wait in C{senders}
    until the transport drains (or goes away); see
    L{PeerWebSocketProtocol.writeMessage}.
    """

    __slots__ = ("paused", "backlog", "senders", "drained")

    def __init__(self, drained):
        """
        @param drained: called when the transport has room again.
        """
        self.paused = False
        self.backlog = 0
        self.senders = set()
        self.drained = drained

    def pauseProducing(self):
        self.paused = True

    def resumeProducing(self):
        self.paused = False
        self.backlog = 0
        self._wakeSenders()
        self.drained()

    def stopProducing(self):
        self.paused = True
        self._wakeSenders()

    def _wakeSenders(self):
        if self.senders:
            senders, self.senders = self.senders, set()
            for sender in senders:
                sender.resumeReading()


class PeerWebSocketProtocol(_autobahn.ServerProtocol):
    """
    One peer's WebSocket connection, the link of its L{PeerSession}.
    """

    _log = Logger()
    transportName = "websocket"
    session = None
    _closeTimeout = None
    _fast = False
    _pending = b""
    _direct = False
    _readPause = None
    _droppedBytes = 0
    # The call that goes on with a read cut short by MESSAGES_PER_TURN.
    _turn = None
    # The upgrade request so far (a bytearray), until it is whole.
    _head = None
    # The payload of the latest PING not answered yet, or None.
    _pong = None
    # Control frames before Auth, and frames in the current fragmented
    # message.
    _controlFrames = 0
    _messageFrames = 0
    # An HTTP answer to write before closing, instead of aborting.
    _answer = None

    def connectionMade(self):
        super().connectionMade()
        # Autobahn means to set TCP_NODELAY but reads its option before it
        # has copied it from the factory, so the attempt silently fails; a
        # packet relay must never wait for Nagle.
        noDelay(self.transport)
        address = self.transport.getPeer()
        host = getattr(address, "host", "?")
        self.peerAddress = f"{host}:{getattr(address, 'port', '?')}"
        self._congestion = _Congestion(self._writePong)
        self.transport.registerProducer(self._congestion, True)
        self._batch = []
        # Only a plain TCP transport is written to directly (writeNow); over
        # TLS, PeerTLSProtocol.writeNow does the same with the records.
        self._direct = type(self.transport) is tcp.Server
        self._tls = isinstance(self.transport, PeerTLSProtocol)
        self._closeWaiters = []
        self.factory.relay.counters.connections[self.transportName] += 1
        self.sourceHost = host
        # The session starts at TCP accept, so its handshake timeout covers
        # the WebSocket upgrade as well as the wait for Auth.
        self.session = PeerSession(self.factory.relay, self)

    def _admit(self, address):
        reason = self.factory.relay.admission.admit(address)
        if reason is not None:
            self.factory.refused(self.peerAddress, reason)
            return False
        self._ticket = address
        return True

    def connectionLost(self, reason):
        super().connectionLost(reason)
        if self._closeTimeout is not None and self._closeTimeout.active():
            self._closeTimeout.cancel()
        if self._readPause is not None:
            self._readPause.cancel()
            self._readPause = None
        if self._turn is not None:
            self._turn.cancel()
            self._turn = None
        self.factory.relay.counters.connections[self.transportName] -= 1
        admission = self.factory.relay.admission
        admission.closed()
        if self._ticket is not None:
            admission.release(self._ticket)
        if self.session is not None:
            self.session.linkLost()
        waiters, self._closeWaiters = self._closeWaiters, None
        for d in waiters:
            d.callback(None)

    def onConnect(self, request):
        if self.session is None:
            raise ConnectionDeny(ConnectionDeny.SERVICE_UNAVAILABLE, "Service Unavailable")
        if self._ticket is None:
            realIP = request.headers.get("x-real-ip", "").strip()
            if realIP:
                self.peerAddress = (
                    f"{realIP}:{request.headers.get('x-real-port', '?').strip()} via "
                    f"{self.peerAddress}"
                )
            if not self._admit(realIP or self.transport.getPeer().host):
                raise ConnectionDeny(429, "Too Many Requests")
            if realIP:
                self.sourceHost = realIP
                self.factory.relay.admission.move(self.session, realIP)
        if request.path != PATH:
            self.factory.relay.noisyLog(
                self._log.info,
                "{where}: refused WebSocket upgrade for path {path!r}",
                where=self.peerAddress,
                path=request.path,
            )
            raise ConnectionDeny(ConnectionDeny.NOT_FOUND, "Not Found")
        origin = request.headers.get("origin")
        if origin and _originHost(origin) != request.headers.get("host", "").strip().lower():
            self.factory.relay.noisyLog(
                self._log.info,
                "{where}: refused WebSocket upgrade from origin {origin!r}",
                where=self.peerAddress,
                origin=origin,
            )
            raise ConnectionDeny(ConnectionDeny.FORBIDDEN, "Forbidden")
        return None

    def opened(self):
        self._fast = True

    def dataReceived(self, data):
        if self.session is None:
            return
        if self._fast:
            factory = self.factory
            factory.batching = True
            size = len(data) + len(self._pending)
            try:
                rest = self._leanFrames(data)
            finally:
                factory.batching = False
                factory.flush()
            if self._droppedBytes:
                if self._droppedBytes * 2 > size:
                    self.pauseReading()
                self._droppedBytes = 0
            if not rest:
                return
            data = rest
            self._fast = False
        elif self.state == self.STATE_CONNECTING:
            data = self._upgradeRequest(data)
            if data is None:
                return
        super().dataReceived(data)
        # Only a lean read pauses its sender for what it had dropped.
        self._droppedBytes = 0
        # Back to the lean path as soon as Autobahn is between frames; an
        # incomplete frame header it holds moves along with it.
        # (_pending is empty here: the lean path handed it to Autobahn.)
        self._fast = self.betweenFrames()
        if self._fast:
            self._pending = self.takeBuffered()

    def _upgradeRequest(self, data):
        """
        Collect the upgrade request up to its blank line.

        Autobahn appends every read to its buffer and searches all of it for
        the blank line, which is quadratic in the request's size; here each
        read is searched once and Autobahn sees the request only when it is
        whole, within L{MAX_UPGRADE_REQUEST}.

        @return: the request and whatever followed it, or None while it is
            incomplete or once it was refused.
        """
        head = self._head
        if head is None:
            head = self._head = bytearray()
        start = max(0, len(head) - 3)
        head += data
        end = head.find(_END_OF_HEAD, start)
        if 0 <= end <= MAX_UPGRADE_REQUEST - 4:
            self._head = None
            return bytes(head)
        if end >= 0 or len(head) > MAX_UPGRADE_REQUEST:
            self._head = None
            self._refuse(
                "request_too_large",
                f"upgrade request over {MAX_UPGRADE_REQUEST} bytes",
                _HEADER_TOO_LARGE,
            )
        return None

    def _refuse(self, reason, detail, answer=None):
        """
        Close a connection that has not authenticated, counted as a
        handshake rejection for C{reason}; C{answer} (an HTTP response) is
        written first.
        """
        if self.session.closed:
            return
        relay = self.factory.relay
        relay.noisyLog(
            self._log.warn,
            "{where}: handshake rejected: {detail}",
            where=self.peerAddress,
            detail=detail,
        )
        relay.counters.handshakeRejects[reason] += 1
        self._answer = answer
        # After the answer Autobahn must not parse anything more.
        self.stopParsing()
        self.session.close()

    def _violation(self, reason, detail):
        """
        A client broke a bound of the WebSocket layer: a handshake rejection
        before Auth, a protocol error after it.
        """
        if self.session.closed:
            return
        if self.session.peerID is None:
            self._refuse(reason, detail)
        else:
            self.session.protocolError(reason, detail)

    def _leanFrames(self, data):
        """
        Deliver every whole masked binary frame at the start of C{data}, and
        take the PING and PONG frames between them.

        @return: the bytes from the first frame the lean path does not take
            (close, text, fragmented, unmasked, oversized), for Autobahn;
            empty when all was taken or an incomplete frame was kept for the
            next read.
        """
        if self._pending:
            data = self._pending + data
            self._pending = b""
        end = len(data)
        pos = 0
        session = self.session
        ping = None
        controls = 0
        whole = True
        budget = MESSAGES_PER_TURN
        while end - pos >= 6:
            first = data[pos]
            size = data[pos + 1] - _MASKED
            if first != _FIN_BINARY:
                if (
                    first != _FIN_PING and first != _FIN_PONG
                ) or not 0 <= size <= _MAX_CONTROL_PAYLOAD:
                    whole = False
                    break
                # Only the latest PING is answered, once the read is done.
                if size == 0:
                    # A run of empty ones, what a flood is made of, in one
                    # match: a loop turn per 6-byte frame would cost 15
                    # times the CPU per byte of relayed data.
                    stop = _EMPTY_CONTROL_RUN.match(data, pos).end()
                    kinds = data[pos:stop:6]
                    last = kinds.rfind(b"\x89")
                    if last >= 0:
                        ping = pos + 6 * last
                    controls += len(kinds)
                    pos = stop
                    continue
                stop = pos + 6 + size
                if stop > end:
                    break
                if first == _FIN_PING:
                    ping = pos
                controls += 1
                pos = stop
                continue
            if size < 0:
                whole = False
                break
            if size < 126:
                start = pos + 6
            elif size == 126:
                if end - pos < 8:
                    break
                size = (data[pos + 2] << 8) | data[pos + 3]
                if size > m.MAX_MESSAGE_SIZE:
                    whole = False
                    break
                start = pos + 8
            else:
                whole = False
                break
            stop = start + size
            if stop > end:
                break
            session.messageReceived(apply_mask(data[start:stop], data[start - 4 : start]))
            pos = stop
            if session.closed:
                return b""
            budget -= 1
            if not budget and pos < end:
                self._yieldTurn()
                break
        if controls and self._controlFramesSeen(controls, ping, data):
            return b""
        if not whole:
            return data[pos:]
        if pos < end:
            self._pending = data[pos:]
        return b""

    def _yieldTurn(self):
        """
        Leave the rest of this read for the next reactor turn, and stop
        reading until it is done.
        """
        if self._turn is None:
            self.transport.pauseProducing()
            self._turn = self.factory.relay.clock.callLater(0, self._nextTurn)

    def _nextTurn(self):
        self._turn = None
        self.dataReceived(b"")
        if self._turn is None and self._readPause is None:
            self.transport.resumeProducing()

    def _controlFramesSeen(self, count, ping, data):
        """
        Account for C{count} PING / PONG frames taken by the lean path and
        answer the latest PING, at C{ping} in C{data} (None if there was
        none).

        @return: whether the connection was closed for them.
        """
        if self.session.peerID is None:
            self._controlFrames += count
            if self._controlFrames > MAX_CONTROL_FRAMES_BEFORE_AUTH:
                self._refuse("control_frames", f"{self._controlFrames} control frames before Auth")
                return True
        if ping is not None:
            self._answerPing(
                apply_mask(
                    data[ping + 6 : ping + 6 + data[ping + 1] - _MASKED], data[ping + 2 : ping + 6]
                )
            )
        return False

    def _answerPing(self, payload):
        """
        Owe C{payload} a PONG: written now, or once the peer's write buffer
        has room (a client that sends PINGs and never reads must not make
        the relay buffer its PONGs).
        """
        self._pong = payload
        if not self._congestion.paused:
            self._writePong()

    def _writePong(self):
        payload, self._pong = self._pong, None
        if payload is not None and self.state == self.STATE_OPEN:
            self.transport.write(bytes((_FIN_PONG, len(payload))) + payload)

    # Frames Autobahn takes (fragmented messages, and the rest of a read
    # from there on)

    def onMessageBegin(self, isBinary):
        self._messageFrames = 0
        super().onMessageBegin(isBinary)

    def onMessageFrameBegin(self, length):
        self._countMessageFrame()
        super().onMessageFrameBegin(length)

    def onPing(self, payload):
        if self._countControlFrame():
            self._answerPing(payload)

    def onPong(self, payload):
        self._countControlFrame()

    def _countMessageFrame(self):
        self._messageFrames += 1
        if self._messageFrames > MAX_FRAMES_PER_MESSAGE:
            self._violation(
                "fragments", f"more than {MAX_FRAMES_PER_MESSAGE} frames in one message"
            )
            return False
        return True

    def _countControlFrame(self):
        if self.session.closed:
            return False
        if self.insideMessage() and not self._countMessageFrame():
            return False
        if self.session.peerID is None:
            self._controlFrames += 1
            if self._controlFrames > MAX_CONTROL_FRAMES_BEFORE_AUTH:
                self._refuse("control_frames", f"{self._controlFrames} control frames before Auth")
                return False
        return True

    def messageTooLarge(self, size, limit, reason):
        # With failByDrop Autobahn would close without a close frame, so
        # onClose never sees code 1009: count it here.
        self._violation("too_large", f"{size}-byte message")

    def failHandshake(self, reason, code=400, responseHeaders=None):
        # Go answers 403 to any Origin that is not the Host, parsable or not;
        # Autobahn refuses an unparsable or "null" one itself, with 400.
        if reason and reason.startswith(_autobahn.ORIGIN_REFUSALS):
            code = 403
        return super().failHandshake(reason, code, responseHeaders)

    def onMessage(self, payload, isBinary):
        if not isBinary:
            self.session.protocolError("text_message", "text message")
            return
        self.session.messageReceived(payload)

    def onClose(self, wasClean, code, reason):
        session = self.session
        if code is not None and code != 1000 and session is not None and not session.closed:
            if code == 1009:
                self.factory.relay.counters.protocolErrors["too_large"] += 1
            # 1006 (the TCP connection just went away) is how most agents
            # leave: it is news, not a warning, and one line per agent.
            # Anything else, and a stranger's 1006, is what the other end
            # chose to cause (a Close frame carries up to 123 bytes of its
            # own text), as often as it likes: under the log budget.
            fields = {"peer": session, "code": code, "reason": quoted(reason, CLOSE_REASON_SHOWN)}
            if code == 1006 and session.peerID is not None:
                self._log.info(CLOSE_LINE, **fields)
            else:
                self.factory.relay.noisyLog(
                    self._log.info if code == 1006 else self._log.warn, CLOSE_LINE, **fields
                )

    # The link interface of PeerSession

    def writeMessage(self, message):
        """
        Queue C{message} as one binary frame, or drop it if this peer's
        backlog is over the high-water mark.

        A WebSocket sender more than half of whose read was dropped is also
        paused (see L{pauseReading}; the relay tells the sender of each drop
        through L{messageDropped}). Dropping alone would leave the relay
        reading and discarding a flood at full speed: as much CPU as
        relaying it, taken from every healthy pair. Paused, the flood backs
        up in the sender's own TCP window instead. The price is head-of-line
        blocking of that sender's other flows for up to L{SENDER_PAUSE} per
        such read, which is why a sender that mostly reaches healthy peers
        is never paused for the odd drop; the Go relay blocks a sender for
        as long as its destination's write takes (up to 10 s). Senders over
        QUIC or the inter-pod fabric are never paused: one of those streams
        carries many peers.

        @return: whether the message was queued.
        """
        if self.state != self.STATE_OPEN:
            return False
        congestion = self._congestion
        size = len(message)
        factory = self.factory
        if congestion.paused:
            if congestion.backlog + size > factory.highWater:
                factory.relay.counters.dropped["slow_consumer"] += 1
                return False
            congestion.backlog += size
        header = _SHORT_HEADERS[size] if size < 126 else _HEADER_16 + size.to_bytes(2, "big")
        if factory.batching:
            if not self._batch:
                factory.batched.append(self)
            self._batch += (header, message)
        else:
            self.transport.write(header + message)
        return True

    def messageDropped(self, destination, size):
        """
        A message of C{size} bytes this peer sent was refused by
        C{destination} (an L{IPeerConnection}; see L{IRelay.route}).

        A refusal by a WebSocket peer over its high-water mark counts
        towards pausing this sender once its read is done (see
        L{writeMessage}), and puts this sender among those the destination
        wakes when it drains. Other refusals (a destination closing, a QUIC
        one) do not.
        """
        link = getattr(destination, "link", None)
        if isinstance(link, PeerWebSocketProtocol):
            congestion = link._congestion
            if congestion.paused and link is not self and link.state == link.STATE_OPEN:
                self._droppedBytes += size
                congestion.senders.add(self)

    def flush(self):
        """
        Write the frames queued while a read was being taken apart.
        """
        data = b"".join(self._batch)
        self._batch.clear()
        if self._direct:
            _writeNow(self.transport, data)
        elif self._tls:
            self.transport.writeNow(data)
        else:
            self.transport.write(data)

    def pauseReading(self):
        """
        Stop reading this peer for L{SENDER_PAUSE} or until L{resumeReading}.
        """
        if self._readPause is None and self.transport.connected:
            self.factory.relay.counters.senderPauses += 1
            self.transport.pauseProducing()
            self._readPause = self.factory.relay.clock.callLater(SENDER_PAUSE, self.resumeReading)

    def resumeReading(self):
        pause, self._readPause = self._readPause, None
        if pause is not None:
            if pause.active():
                pause.cancel()
            if self._turn is None:
                self.transport.resumeProducing()

    def closeLink(self):
        # Straight to the transport: Autobahn's dropConnection() would log a
        # warning of its own for every peer that leaves; the session has
        # already logged why at the right level.
        if self._answer is not None:
            self.transport.write(self._answer)
            self.transport.loseConnection()
        else:
            self.transport.abortConnection()

    def closeGracefully(self):
        self.writeMessage(m.CLOSE_MESSAGE)
        self.sendClose(1000)
        # A peer that does not answer the Close in time is aborted quietly,
        # as in closeLink: one dropConnection() warning per peer would flood
        # the log of a relay shutting down.
        self._closeTimeout = self.factory.relay.clock.callLater(CLOSE_TIMEOUT, self.closeLink)

    def whenClosed(self):
        """
        @return: a Deferred that fires once the connection is gone.
        """
        if self._closeWaiters is None:
            return succeed(None)
        d = Deferred()
        self._closeWaiters.append(d)
        return d


# Bytes asked of OpenSSL at once: a record read, or the send BIO when the size
# of what is in it is not known (handshake flights, alerts; a full read asks
# again).
_BIO_READ = 2**15
# TLS 1.3 adds 22 bytes to each record of at most 16 KiB (header, content
# type, AEAD tag); TLS 1.2 with AES-GCM 29.
_RECORD_OVERHEAD = 64
_RECORD_SIZE = 2**14


class PeerTLSProtocol(_twisted.TLSProtocol):
    """
    TLS for peers without the extra reactor turn and without copies per
    message.

    Twisted's default (C{BufferingTLSTransport}) keeps every write until the
    next reactor turn (a copy per write, then a join) and then encrypts in
    16 KiB slices (a copy each), each slice's records written to a TCP
    transport that itself waits for the next turn: over TLS a relayed
    message waited a turn more than over plain TCP, and the TLS 1-pair round
    trip p99 was 1.8 times the plain one (see README, performance).

    Here L{writeNow}, which L{PeerWebSocketProtocol.flush} calls once per
    destination per read, encrypts the whole batch (one C{SSL_write} per 16
    KiB record, straight from the batch), reads all the records out of the
    send BIO in one piece (into a buffer shared by all connections) and
    writes them as L{writeNow<relay.internals.twisted.writeNow>} does for
    plain TCP: straight to the socket when nothing is queued, else behind
    what is, so order and Twisted's producer pauses stay as they were. Any
    other write (the upgrade answer, messages relayed outside a read, PONGs)
    is encrypted at once and left to the TCP transport's own buffering:
    several such writes in one turn still make one C{send}.

    A read is decrypted whole before it is delivered: C{SSL_read} returns one
    record at a time, and a Go agent sends one record per message, so
    Twisted's one delivery per record would cost the lean path its batching
    per read (one write per destination per message).

    What this takes from Twisted beyond its public API is named in
    L{relay.internals.twisted.TLSProtocol}, what it takes from pyOpenSSL in
    L{relay.internals.openssl} (with what each is worth); without the
    latter it goes through pyOpenSSL's public API.
    """

    # Whether the records now leaving the send BIO go straight to the socket.
    _now = False
    _direct = False
    # The OpenSSL handles of the TLS connection (L{relay.internals.openssl}),
    # taken on first use: the connection is made inside Twisted's
    # makeConnection, which may already send.
    _ssl = _receiveBIO = _sendBIO = None

    def _takeHandles(self):
        connection = self.tlsConnection
        self._ssl = _openssl.sslOf(connection)
        self._receiveBIO = _openssl.receiveBIOOf(connection)
        self._sendBIO = _openssl.sendBIOOf(connection)

    def makeConnection(self, transport):
        self._direct = type(transport) is tcp.Server
        super().makeConnection(transport)

    def dataReceived(self, data):
        # As Twisted's once the handshake is done and no write waits for
        # TLS, with the records written into the receive BIO by BIO_write
        # (L{relay.internals.openssl}); anything else, or a BIO_write that
        # failed (it wrote nothing: pyOpenSSL's bio_write tries again and
        # raises its own error), is Twisted's.
        bioWrite = _openssl.bioWrite
        if (
            bioWrite is None
            or not self.handshakeDone
            or self.cleartextWaiting
            or type(data) is not bytes
        ):
            super().dataReceived(data)
            return
        bio = self._receiveBIO
        if bio is None:
            self._takeHandles()
            bio = self._receiveBIO
        if bioWrite(bio, data, len(data)) < len(data):
            super().dataReceived(data)
            return
        self.receiveRecords()

    def writeNow(self, data):
        """
        Encrypt C{data} and write the records straight to the socket if
        nothing is queued ahead of them (as
        L{relay.internals.twisted.writeNow}).
        """
        if self.disconnecting and self.producer is None:
            return
        self._now = True
        try:
            self.encrypt(data)
        finally:
            self._now = False

    def encrypt(self, data):
        # As Twisted's, but without copying 16 KiB slices, and the send BIO
        # read once for the whole write instead of once per slice. pyOpenSSL
        # sets SSL_MODE_ENABLE_PARTIAL_WRITE: one SSL_write takes one record.
        size = len(data)
        if self.tlsLost or not size:
            return
        sslWrite = _openssl.sslWrite
        if sslWrite is None:
            self._encryptBySend(data, size)
            return
        ssl = self._ssl
        if ssl is None:
            self._takeHandles()
            ssl = self._ssl
        sent = 0
        if size <= _RECORD_SIZE and type(data) is bytes:
            # One record, from the bytes object's own buffer (cffi passes
            # it to a C{void *}): no C{from_buffer} and its context. A
            # record is written whole or not at all.
            n = sslWrite(ssl, data, size)
            if n > 0:
                sent = n
        else:
            with _openssl.cleartextOf(data) as cleartext:
                while sent < size:
                    n = sslWrite(ssl, cleartext + sent, size - sent)
                    if n <= 0:
                        break
                    sent += n
        if sent == size:
            self.sendRecords(size)
            return
        # pyOpenSSL's own exception, as its send would raise it.
        try:
            _openssl.raiseError(self.tlsConnection, ssl, n)
        except WantReadError:
            self.sendRecords(sent)
            self.bufferCleartext(data[sent:])
            return
        except TLSError:
            self.sendRecords(sent)
            self.tlsFailed(Failure())
            return
        # Not an error after all (SSL_ERROR_NONE): what is left waits for
        # the next write, as after a WantReadError.
        self.sendRecords(sent)
        self.bufferCleartext(data[sent:])

    def _encryptBySend(self, data, size):
        """
        L{encrypt} through pyOpenSSL's C{send}, for a pyOpenSSL without the
        binding it uses.
        """
        connection = self.tlsConnection
        sent = 0
        try:
            if size <= _RECORD_SIZE:
                sent = connection.send(data)
            if sent < size:
                view = memoryview(data)
                while sent < size:
                    sent += connection.send(view[sent:])
        except WantReadError:
            self.sendRecords(sent)
            self.bufferCleartext(data[sent:])
            return
        except TLSError:
            self.sendRecords(sent)
            self.tlsFailed(Failure())
            return
        self.sendRecords(size)

    def sendRecords(self, hint=0):
        """
        Write out all the records in the send BIO.

        @param hint: bytes of cleartext just encrypted (0 if not known), for
            the size of the read.
        """
        memoryBIOLength = _openssl.memoryBIOLength
        if memoryBIOLength is not None:
            bio = self._sendBIO
            if bio is None:
                self._takeHandles()
                bio = self._sendBIO
            ask = memoryBIOLength(bio, _openssl.MEMORY_BIO_DATA)
            if ask <= 0:
                return
            if _openssl.sslWrite is not None and ask <= _openssl.SEND_BUFFER_SIZE:
                got = _openssl.bioRead(bio, _openssl.sendBuffer, ask)
                if got <= 0:
                    return
                if self._now and self._direct:
                    _writeNow(self.transport, _openssl.sendView[:got])
                else:
                    self.transport.write(_openssl.sendView[:got].tobytes())
                return
        else:
            ask = hint + (hint // _RECORD_SIZE + 1) * _RECORD_OVERHEAD if hint else _BIO_READ
        connection = self.tlsConnection
        try:
            data = connection.bio_read(ask)
        except WantReadError:
            return
        if len(data) == ask and memoryBIOLength is None:
            chunks = [data]
            while True:
                try:
                    chunks.append(connection.bio_read(_BIO_READ))
                except WantReadError:
                    break
            data = b"".join(chunks)
        if self._now and self._direct:
            _writeNow(self.transport, data)
        else:
            self.transport.write(data)

    def receiveRecords(self):
        # As Twisted's, but the cleartext of all the records is delivered in
        # one dataReceived, before the end of TLS or an error is acted on.
        sslRead = _openssl.sslRead
        if sslRead is None or self.tlsLost:
            self._receiveByRecord()
            return
        ssl = self._ssl
        if ssl is None:
            self._takeHandles()
            ssl = self._ssl
        buf = _openssl.receiveBuffer
        room = _openssl.RECEIVE_BUFFER_SIZE
        memoryBIOLength = _openssl.memoryBIOLength
        sslPending = _openssl.sslPending
        bio = self._receiveBIO
        chunks = []
        got = 0
        ended = failure = None
        while True:
            n = sslRead(ssl, buf + got, room - got)
            if n > 0:
                got += n
                if got == room:
                    chunks.append(_openssl.bufferOf(buf, got)[:])
                    got = 0
                elif (
                    sslPending is not None
                    and memoryBIOLength(bio, _openssl.MEMORY_BIO_DATA) <= 0
                    and sslPending(ssl) <= 0
                ):
                    # All decrypted: nothing of this record kept for a next
                    # SSL_read and no byte of another in the BIO. An
                    # SSL_read that would say so (WANT_READ) costs more
                    # (relay.internals.openssl).
                    break
                continue
            error = _openssl.sslGetError(ssl, n)
            if error == _openssl.SSL_ERROR_WANT_READ:
                break
            if error == _openssl.SSL_ERROR_ZERO_RETURN:
                ended = True
                break
            # pyOpenSSL's own exception for anything else, as its recv
            # would raise it.
            try:
                _openssl.raiseError(self.tlsConnection, ssl, n)
            except TLSError:
                failure = Failure()
            break
        if got:
            chunks.append(_openssl.bufferOf(buf, got)[:])
        self._delivered(chunks, ended, failure)

    def _receiveByRecord(self):
        """
        L{receiveRecords} through pyOpenSSL's C{recv}, one record per call,
        for a pyOpenSSL without the binding it uses.
        """
        connection = self.tlsConnection
        memoryBIOLength = _openssl.memoryBIOLength
        chunks = []
        ended = failure = None
        while not self.tlsLost:
            try:
                chunks.append(connection.recv(_BIO_READ))
            except WantReadError:
                break
            except ZeroReturnError:
                ended = True
                break
            except TLSError:
                failure = Failure()
                break
            if (
                memoryBIOLength is not None
                and not connection.pending()
                and memoryBIOLength(_openssl.receiveBIOOf(connection), _openssl.MEMORY_BIO_DATA)
                <= 0
            ):
                break
        self._delivered(chunks, ended, failure)

    def _delivered(self, chunks, ended, failure):
        """
        Deliver the cleartext C{chunks} of a read in one C{dataReceived},
        then act on the end of TLS (C{ended}) or an error (C{failure}).
        """
        if chunks and not self.aborted:
            ProtocolWrapper.dataReceived(self, chunks[0] if len(chunks) == 1 else b"".join(chunks))
        if ended:
            self.tlsEnded()
        elif failure is not None:
            self.tlsFailed(failure)
        self.sendRecords()


class RefusableTLSFactory(TLSMemoryBIOFactory):
    """
    TLS over a factory that may refuse a connection (C{buildProtocol}
    returns None, as L{PeerWebSocketFactory} does): the refusal reaches the
    listening port, which closes the socket before any TLS work. Its
    connections are L{PeerTLSProtocol}s.
    """

    protocol = PeerTLSProtocol

    def buildProtocol(self, addr):
        protocol = self.wrappedFactory.buildProtocol(addr)
        if protocol is None:
            return None
        return self.protocol(self, protocol)


def _originHost(origin):
    """
    The host[:port] of an Origin header value, as the Go server compares it
    with the Host header.
    """
    _, sep, rest = origin.partition("://")
    return (rest if sep else origin).split("/", 1)[0].lower()


class PeerWebSocketFactory(WebSocketServerFactory):
    """
    Serves peers at C{/relay} with the protocol's size limits.

    @ivar relay: the L{relay.relay.Relay} sessions talk to.
    @ivar highWater: bytes queued for a slow peer beyond Twisted's own buffer
        before further messages to it are dropped.
    """

    protocol = PeerWebSocketProtocol
    noisy = False
    _log = Logger()

    def __init__(self, relay, reactor, highWater=DEFAULT_HIGH_WATER):
        super().__init__(server="relay", reactor=reactor)
        self.relay = relay
        self.highWater = highWater
        # Whether a lean read is being taken apart (its messages are then
        # queued per destination, and written by flush once it is done),
        # and the peers with frames queued meanwhile
        # (PeerWebSocketProtocol.flush). The reactor runs one read at a
        # time, so this is the factory's, not any one peer's.
        self.batching = False
        self.batched = []
        # Both handshake timeouts run on the relay's clock instead of
        # Autobahn's (txaio's global loop): the session's 10 s limit starts at
        # TCP accept and covers the upgrade, and closeGracefully bounds the
        # close handshake.
        self.setProtocolOptions(
            maxFramePayloadSize=m.MAX_MESSAGE_SIZE,
            maxMessagePayloadSize=m.MAX_MESSAGE_SIZE,
            openHandshakeTimeout=0,
            closeHandshakeTimeout=0,
            failByDrop=True,
            autoPingInterval=0,
            requireMaskedClientFrames=True,
        )

    def buildProtocol(self, addr):
        """
        A protocol for a new connection, or None to refuse it: the listening
        port then closes the socket at once (L{twisted.internet.tcp.Port}),
        before Autobahn or TLS spend anything on it, and before a flood of
        refused connections can pile up descriptors within one accept loop.
        Behind a trusted proxy the source address is only known from the
        upgrade request's X-Real-IP (L{PeerWebSocketProtocol.onConnect}).
        """
        admission = self.relay.admission
        host = getattr(addr, "host", "?")
        reason = admission.accept()
        ticket = None
        if reason is None and not admission.isTrustedProxy(host):
            reason = admission.admit(host)
            if reason is None:
                ticket = host
            else:
                admission.closed()
        if reason is not None:
            self.refused(f"{host}:{getattr(addr, 'port', '?')}", reason)
            return None
        protocol = super().buildProtocol(addr)
        protocol._ticket = ticket
        return protocol

    def refused(self, where, reason):
        self.relay.noisyLog(
            self._log.warn, "{where}: connection refused: {reason}", where=where, reason=reason
        )
        self.relay.counters.handshakeRejects[reason] += 1

    def flush(self):
        batched, self.batched = self.batched, []
        for protocol in batched:
            protocol.flush()
