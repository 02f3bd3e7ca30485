"""
Peers over WebSocket: the Autobahn protocol and factory at path C{/relay}.

Autobahn does the RFC 6455 work (opening handshake, framing, masking,
fragmentation, control frames, close handshake, size limits); this module
only adapts it to a L{PeerSession}: binary messages in, binary messages out,
and the connection's life and death.
"""

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from zope.interface import implementer

from relay import messages as m
from relay.session import PeerSession

PATH = "/relay"
DEFAULT_HIGH_WATER = 1024 * 1024
CLOSE_TIMEOUT = 3.0


@implementer(IPushProducer)
class _Congestion:
    """
    Watches one transport's write buffer through the producer API.

    Twisted pauses its producer when the socket's send buffer and its own
    write buffer are full (64 KiB); from then on the messages queued are
    counted, and once they pass the high-water mark more are dropped: a slow
    receiver never makes the relay's memory grow without bound, and never
    slows the senders (dropping, not pausing them, is what a packet relay
    should do: WireGuard recovers from loss, not from a stalled tunnel).
    """

    __slots__ = ("paused", "backlog")

    def __init__(self):
        self.paused = False
        self.backlog = 0

    def pauseProducing(self):
        self.paused = True

    def resumeProducing(self):
        self.paused = False
        self.backlog = 0

    def stopProducing(self):
        self.paused = True


class PeerWebSocketProtocol(WebSocketServerProtocol):
    """
    One peer's WebSocket connection, the link of its L{PeerSession}.
    """

    _log = Logger()
    transportName = "websocket"
    session = None
    _closeTimeout = None

    def connectionMade(self):
        super().connectionMade()
        address = self.transport.getPeer()
        self.peerAddress = f"{getattr(address, 'host', '?')}:{getattr(address, 'port', '?')}"
        self._congestion = _Congestion()
        self.transport.registerProducer(self._congestion, True)
        self._closeWaiters = []
        self.factory.relay.counters.connections[self.transportName] += 1
        # The session starts at TCP accept, so its handshake timeout covers
        # the WebSocket upgrade as well as the wait for Auth.
        self.session = PeerSession(self.factory.relay, self)

    def connectionLost(self, reason):
        super().connectionLost(reason)
        if self._closeTimeout is not None and self._closeTimeout.active():
            self._closeTimeout.cancel()
        self.factory.relay.counters.connections[self.transportName] -= 1
        self.session.linkLost()
        waiters, self._closeWaiters = self._closeWaiters, None
        for d in waiters:
            d.callback(None)

    def onConnect(self, request):
        if request.path != PATH:
            self._log.info("{where}: refused WebSocket upgrade for path {path!r}", where=self.peerAddress, path=request.path)
            raise ConnectionDeny(ConnectionDeny.NOT_FOUND)
        origin = request.headers.get("origin")
        if origin and _originHost(origin) != request.headers.get("host", "").strip().lower():
            self._log.info("{where}: refused WebSocket upgrade from origin {origin!r}", where=self.peerAddress, origin=origin)
            raise ConnectionDeny(ConnectionDeny.FORBIDDEN)
        return None

    def onMessage(self, payload, isBinary):
        if not isBinary:
            self.session._protocolError("text_message", "text message")
            return
        self.session.messageReceived(payload)

    def onClose(self, wasClean, code, reason):
        if code is not None and code != 1000 and self.session is not None and not self.session.closed:
            self._log.warn("{peer}: WebSocket closed with code {code}: {reason}", peer=self.session, code=code, reason=reason)
            if code == 1009:
                self.factory.relay.counters.protocolErrors["too_large"] += 1

    # The link interface of PeerSession

    def writeMessage(self, message):
        if self.state != self.STATE_OPEN:
            return False
        congestion = self._congestion
        if congestion.paused:
            if congestion.backlog + len(message) > self.factory.highWater:
                self.factory.relay.counters.dropped["slow_consumer"] += 1
                return False
            congestion.backlog += len(message)
        self.sendMessage(message, isBinary=True)
        return True

    def closeLink(self):
        self.dropConnection(abort=True)

    def closeGracefully(self):
        self.writeMessage(m.CLOSE_MESSAGE)
        self.sendClose(1000)
        self._closeTimeout = self.factory.relay.clock.callLater(CLOSE_TIMEOUT, self.dropConnection, abort=True)

    def whenClosed(self):
        """
        @return: a Deferred that fires once the connection is gone.
        """
        if self._closeWaiters is None:
            return succeed(None)
        d = Deferred()
        self._closeWaiters.append(d)
        return d


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

    @ivar relay: the L{relay.server.Relay} sessions talk to.
    @ivar highWater: bytes queued for a slow peer beyond Twisted's own buffer
        before further messages to it are dropped.
    """

    protocol = PeerWebSocketProtocol
    noisy = False

    def __init__(self, relay, reactor, highWater=DEFAULT_HIGH_WATER):
        super().__init__(server="relay", reactor=reactor)
        self.relay = relay
        self.highWater = highWater
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
