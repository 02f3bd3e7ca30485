"""
A Twisted client for peer protocol v1, as an agent would speak it.

The tests, the benchmark and C{python -m relay.probe} use it to drive a relay
over a real socket: connect, authenticate with a token, subscribe to peers,
exchange Transport messages, answer health checks, close.
"""

import time
from urllib.parse import urlsplit

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol, connectWS
from twisted.internet import defer, ssl
from twisted.logger import Logger

from relay import messages as m
from relay.auth import generateToken
from relay.tcp import noDelay

CLOSE_TIMEOUT = 3.0


class HandshakeRefused(Exception):
    """
    The relay did not authenticate us; it never says why (docs/protocol.md, "The handshake").
    """


class PeerClient:
    """
    The peer protocol as an agent speaks it, over any carrier: subclasses
    provide C{sendRaw(message)} and C{clock}, and hand every message after the
    AuthResponse to L{messageReceived}.

    @ivar transports: a L{defer.DeferredQueue} of C{(source id, payload)}.
    @ivar events: a L{defer.DeferredQueue} of C{("online" | "offline", ids)}.
    @ivar onTransport: if set, called with each whole Transport message
        instead of queueing it.
    @ivar closeReceived: True once the relay sent Close.
    @ivar healthChecks: how many health checks the relay sent (all answered
        unless C{answerHealthChecks} is False).
    """

    def _initPeerClient(self):
        self.transports = defer.DeferredQueue()
        self.events = defer.DeferredQueue()
        self.onTransport = None
        self.closeReceived = False
        self.healthChecks = 0
        self.answerHealthChecks = True

    def messageReceived(self, payload):
        kind = payload[1] if len(payload) >= 2 else None
        if kind == m.TRANSPORT:
            if self.onTransport is not None:
                self.onTransport(payload)
            else:
                self.transports.put(m.decodeTransport(payload))
        elif kind == m.HEALTH_CHECK:
            self.healthChecks += 1
            if self.answerHealthChecks:
                self.sendRaw(m.HEALTH_CHECK_MESSAGE)
        elif kind == m.PEERS_ONLINE:
            self.events.put(("online", m.decodeIDList(payload)))
        elif kind == m.PEERS_WENT_OFFLINE:
            self.events.put(("offline", m.decodeIDList(payload)))
        elif kind == m.CLOSE:
            self.closeReceived = True

    def send(self, destinationID, payload):
        self.sendRaw(m.encodeTransport(destinationID, payload))

    def subscribe(self, ids):
        for message in m.encodeIDList(m.SUBSCRIBE_PEER_STATE, ids):
            self.sendRaw(message)

    def unsubscribe(self, ids):
        for message in m.encodeIDList(m.UNSUBSCRIBE_PEER_STATE, ids):
            self.sendRaw(message)

    @defer.inlineCallbacks
    def waitOnline(self, peerID, timeout=10.0):
        """
        Subscribe to C{peerID} and wait for the relay to report it online.
        """
        self.subscribe([peerID])
        while True:
            kind, ids = yield self.events.get().addTimeout(timeout, self.clock)
            if kind == "online" and peerID in ids:
                return


class RelayClientProtocol(PeerClient, WebSocketClientProtocol):
    """
    One peer's connection to a relay over WebSocket.

    @ivar instanceURL: the relay's AuthResponse, once authenticated.
    """

    _log = Logger()

    def __init__(self):
        super().__init__()
        self.instanceURL = None
        self._initPeerClient()
        self._lostWaiters = []

    def connectionMade(self):
        super().connectionMade()
        noDelay(self.transport)

    def onOpen(self):
        self.sendMessage(m.encodeAuth(self.factory.peerID, self.factory.token), isBinary=True)

    def onMessage(self, payload, isBinary):
        kind = payload[1] if len(payload) >= 2 else None
        if self.instanceURL is None:
            if kind == m.AUTH_RESPONSE:
                self.instanceURL = m.decodeAuthResponse(payload)
                self.factory.authenticated.callback(self)
            else:
                self.factory.authenticated.errback(
                    ValueError(f"unexpected first message {payload[:2].hex()}")
                )
                self.dropConnection(abort=True)
            return
        self.messageReceived(payload)

    def connectionLost(self, reason):
        super().connectionLost(reason)
        if not self.factory.authenticated.called:
            self.factory.authenticated.errback(
                HandshakeRefused(
                    "the relay closed the connection without an AuthResponse (wrong secret, "
                    "expired token or not a relay?)"
                )
            )
        waiters, self._lostWaiters = self._lostWaiters, None
        for d in waiters:
            d.callback(None)

    def whenLost(self):
        """
        @return: a Deferred firing once the connection is gone.
        """
        if self._lostWaiters is None:
            return defer.succeed(None)
        d = defer.Deferred()
        self._lostWaiters.append(d)
        return d

    @property
    def clock(self):
        return self.factory.reactor

    def sendRaw(self, message):
        self.sendMessage(message, isBinary=True)

    def close(self):
        """
        Leave: send Close, then close the WebSocket.
        """
        self.sendMessage(m.CLOSE_MESSAGE, isBinary=True)
        self.sendClose(1000)
        timer = self.factory.reactor.callLater(CLOSE_TIMEOUT, self.dropConnection, abort=True)

        def lost(result):
            if timer.active():
                timer.cancel()
            return result

        return self.whenLost().addBoth(lost)


class RelayClientFactory(WebSocketClientFactory):
    protocol = RelayClientProtocol
    noisy = False

    def __init__(self, url, peerID, token, reactor):
        super().__init__(url, reactor=reactor)
        self.peerID = peerID
        self.token = token
        self.authenticated = defer.Deferred()
        # Timeouts run on our reactor (connect() and close()), not on
        # Autobahn's txaio timers, so a test's reactor is left clean.
        self.setProtocolOptions(openHandshakeTimeout=0, closeHandshakeTimeout=0, failByDrop=True)

    def clientConnectionFailed(self, connector, reason):
        if not self.authenticated.called:
            self.authenticated.errback(reason)


def websocketURL(relayURL):
    """
    The WebSocket URL of a relay: C{rel://h:p} → C{ws://h:p/relay}
    (C{rels} → C{wss}); C{ws://} and C{wss://} URLs get the path.
    """
    split = urlsplit(relayURL)
    scheme = {"rel": "ws", "rels": "wss", "ws": "ws", "wss": "wss"}.get(split.scheme)
    if scheme is None:
        raise ValueError(f"not a relay URL: {relayURL!r}")
    return f"{scheme}://{split.netloc}/relay"


def connect(reactor, relayURL, peerID, token=None, secret=None, timeout=10.0, trustRoot=None):
    """
    Connect and authenticate one peer.

    @param token: the HMAC v2 token, or None to make one from C{secret}.
    @return: a Deferred firing with the authenticated L{RelayClientProtocol}.
    """
    if token is None:
        token = generateToken(secret, time.time() + 3600)
    url = websocketURL(relayURL)
    factory = RelayClientFactory(url, peerID, token, reactor)
    contextFactory = None
    if url.startswith("wss:"):
        contextFactory = ssl.optionsForClientTLS(urlsplit(url).hostname, trustRoot=trustRoot)
    connector = connectWS(factory, contextFactory, timeout=timeout)

    def timedOut(failure):
        connector.disconnect()
        return failure

    return factory.authenticated.addTimeout(timeout, reactor).addErrback(timedOut)
