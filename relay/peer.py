"""
The peer protocol for one connection, whatever carries it.

A L{PeerSession} is fed whole relay messages by its I{link} (the WebSocket
protocol in L{relay.listener.ws}, or a QUIC connection) and writes whole messages
back through it. Keeping the protocol here, apart from the framing, means
WebSocket and QUIC peers are the same kind of peer to the store, the
subscriptions, the health checks and the fabric.

The session has three states: waiting for Auth, authenticated, ended. The
link calls C{messageReceived} for each message in all of them: the method of
that name is the first state, and each change of state assigns the next
state's handler to the instance attribute C{messageReceived}, which then
hides the method (L{PeerSession.messageReceived}). Not an Automat machine
nor a method that dispatches on a state: the authenticated state is the
per-packet hot path, and a dispatching method is one more Python call per
message: about 5% of the session's own work per relayed message, measured
with a 1400-byte Transport on a fake link (485 against 460 ns).
"""

from twisted.logger import Logger
from zope.interface import implementer

from relay import messages as m
from relay.auth import AuthError
from relay.interfaces import IPeerConnection
from relay.limits import TokenBucket

HANDSHAKE_TIMEOUT = 10.0
HEALTH_CHECK_INTERVAL = 25.0
HEALTH_CHECK_TIMEOUT = 20.0
HEALTH_WINDOW = HEALTH_CHECK_INTERVAL + HEALTH_CHECK_TIMEOUT
# Timer deadlines that coincide (every 225 s) or come a hair early.
_EPSILON = 1e-6


@implementer(IPeerConnection)
class PeerSession:
    """
    One peer's side of the protocol.

    @ivar relay: the relay it belongs to, seen only through
        L{relay.interfaces.IRelay} (authentication, admission, routing,
        subscriptions, counters and the clock).
    @ivar link: the carrier, with C{writeMessage(bytes) -> bool},
        C{closeLink()} (abort), C{closeGracefully()} (Close message, then close),
        C{transportName} and C{peerAddress}; optionally C{maxMessageSize},
        the largest message it can carry now (a QUIC datagram's room), by
        which id lists are split; without it, 8820 bytes (WebSocket);
        optionally C{messageDropped(destination, size)}, told of each
        Transport it carried that a destination refused (L{IRelay.route}).
    @ivar peerID: the authenticated id, or None before Auth.
    @ivar registeredAt: when the peer was stored (unix time).
    @ivar lastTransport: when the peer last sent a Transport message.
    """

    _log = Logger()

    def __init__(self, relay, link):
        self.relay = relay
        self.link = link
        self.peerID = None
        self.registeredAt = None
        self.lastTransport = None
        self.closed = False
        self._startedAt = relay.clock.seconds()
        # One timer for the session's whole life: the handshake deadline,
        # then the health check's next event.
        self._timer = None
        self._nextPing = self._nextWindow = 0.0
        self._acked = False
        self._missed = 0
        self._bucket = None
        self._stampPrefix = None
        # What the link is told when a Transport it carried is dropped for a
        # congested destination (relay.listener.ws pauses such a WebSocket sender);
        # None for links that are never paused (QUIC: one connection, many
        # flows).
        self._dropped = getattr(link, "messageDropped", None)
        relay.admission.enter(self, getattr(link, "sourceHost", None))
        self._pending = True
        self._timer = relay.clock.callLater(HANDSHAKE_TIMEOUT, self._timerFired)

    def __repr__(self):
        who = m.humanID(self.peerID) if self.peerID else "unauthenticated"
        return f"<PeerSession {who} {self.link.transportName} {self.link.peerAddress}>"

    # Handshake

    def messageReceived(self, message):
        """
        One whole message from the link (bytes, version byte first).

        This method is the handshake state: the first message must be a
        valid Auth. Once it is, the session assigns L{_authenticated} to
        its C{messageReceived} attribute, and once the session ends,
        L{_ignore}: the link keeps calling C{session.messageReceived} and
        from then on reaches that handler directly, with no dispatch in
        between (the module docstring says why).
        """
        reason = self._authenticate(message)
        if reason is not None:
            self.relay.counters.handshakeRejects[reason] += 1
            self._close()

    def _authenticate(self, message):
        """
        Check the first message; on success store the peer.

        @return: None on success, else the rejection reason (already logged).
        """
        where = self.link.peerAddress
        if len(message) > m.MAX_HANDSHAKE_SIZE:
            self.relay.noisyLog(
                self._log.warn,
                "{where}: handshake rejected: {size}-byte first message",
                where=where,
                size=len(message),
            )
            return "too_large"
        try:
            kind = m.messageType(message)
            if kind == m.HELLO:
                self.relay.noisyLog(
                    self._log.warn,
                    "{where}: handshake rejected: deprecated Hello from an outdated client",
                    where=where,
                )
                return "legacy_hello"
            if kind != m.AUTH:
                self.relay.noisyLog(
                    self._log.warn,
                    "{where}: handshake rejected: first message is {kind}",
                    where=where,
                    kind=m.NAMES[kind],
                )
                return "not_auth"
            pid, token = m.decodeAuth(message)
            self.relay.authenticate(token)
        except (m.MessageError, AuthError) as e:
            self.relay.noisyLog(
                self._log.warn,
                "{where}: handshake rejected: {reason}",
                where=where,
                reason=e.reason,
            )
            return e.reason
        relay = self.relay
        reason = relay.refusal(pid)
        if reason == "draining":
            self._log.info("{where}: handshake rejected: the relay is shutting down", where=where)
            return reason
        if reason is not None:
            relay.noisyLog(
                self._log.warn,
                "{where}: handshake rejected: {count} peers connected, the limit",
                where=where,
                count=relay.peerCount(),
            )
            return reason
        self._settled()
        rate = relay.limits.peerByteRate
        if rate:
            self._bucket = TokenBucket(rate, max(rate, m.MAX_MESSAGE_SIZE), relay.clock.seconds())
        self.peerID = pid
        # The header of every Transport this peer sends, as relayed: the
        # destination id replaced by the source's.
        self._stampPrefix = bytes((m.VERSION, m.TRANSPORT)) + pid
        # The authenticated state: this instance attribute hides the
        # messageReceived method, so each relayed message costs one call.
        self.messageReceived = self._authenticated
        # AuthResponse and registration in one reactor turn: nothing can reach
        # the peer before its AuthResponse (docs/protocol.md, "The handshake").
        self.link.writeMessage(self.relay.authResponse)
        self.relay.register(self, self._startedAt)
        self._startHealthCheck()
        return None

    def evict(self, reason, pending, source):
        """
        The relay needs this session's pending slot for a newcomer (see
        L{relay.limits.Admission}).
        """
        self._pending = False
        self.relay.noisyLog(
            self._log.warn,
            "{where}: closed before Auth: {pending} connections waiting to authenticate, the "
            "most from {source}",
            where=self.link.peerAddress,
            pending=pending,
            source=source or "unknown sources",
        )
        self.relay.counters.handshakeRejects[reason] += 1
        self._close()

    def _timerFired(self):
        self._timer = None
        if self.peerID is None:
            self._handshakeTimedOut()
        else:
            self._healthTick()

    def _handshakeTimedOut(self):
        self.relay.noisyLog(
            self._log.warn,
            "{where}: handshake rejected: no Auth within {timeout:.0f} s",
            where=self.link.peerAddress,
            timeout=HANDSHAKE_TIMEOUT,
        )
        self.relay.counters.handshakeRejects["timeout"] += 1
        self._close()

    # Authenticated

    def _authenticated(self, message):
        """
        C{messageReceived} once the peer is authenticated: relay Transport
        messages, answer the rest of the protocol.
        """
        size = len(message)
        # The fast path: a well-formed Transport within the size limit. An
        # oversized one falls through to the single size check below, after
        # the header check, so a message both oversized and malformed is
        # still counted by its header error.
        if (
            m.TRANSPORT_HEADER_SIZE <= size <= m.MAX_MESSAGE_SIZE
            and message[1] == m.TRANSPORT
            and message[0] == m.VERSION
        ):
            relay = self.relay
            now = self.lastTransport = relay.clock.seconds()
            if self._bucket is not None and not self._bucket.take(size, now):
                relay.counters.dropped["rate_limited"] += 1
                return
            relay.counters.transferReceivedBytes += size
            relay.route(
                message[m.HEADER_SIZE : m.TRANSPORT_HEADER_SIZE],
                self._stampPrefix + message[m.TRANSPORT_HEADER_SIZE :],
                self._dropped,
            )
            return
        try:
            kind = m.messageType(message)
        except m.MessageError as e:
            self.protocolError(e.reason, str(e))
            return
        if size > m.MAX_MESSAGE_SIZE:
            self.protocolError("too_large", f"{size}-byte message")
        elif kind == m.HEALTH_CHECK:
            self._acked = True
            self._missed = 0
        elif kind == m.TRANSPORT:
            self.relay.noisyLog(
                self._log.warn,
                "{peer}: ignored a {size}-byte transport message",
                peer=self,
                size=size,
            )
            self.relay.counters.dropped["malformed"] += 1
        elif kind == m.SUBSCRIBE_PEER_STATE or kind == m.UNSUBSCRIBE_PEER_STATE:
            try:
                ids = m.decodeIDList(message)
            except m.MessageError as e:
                self.relay.noisyLog(
                    self._log.warn,
                    "{peer}: ignored {kind}: {error}",
                    peer=self,
                    kind=m.NAMES[kind],
                    error=str(e),
                )
                self.relay.counters.dropped["malformed"] += 1
                return
            if kind == m.SUBSCRIBE_PEER_STATE:
                self._subscribe(ids)
            else:
                self.relay.unsubscribe(self, ids)
        elif kind == m.CLOSE:
            self._log.info("{peer}: peer closed the session", peer=self)
            self._close()
        elif kind == m.AUTH:
            self.relay.noisyLog(self._log.warn, "{peer}: ignored a second auth message", peer=self)
        else:
            self.protocolError("bad_type", f"{m.NAMES[kind]} after the handshake")

    def _subscribe(self, ids):
        relay = self.relay
        ids, refused = relay.admitSubscriptions(self, ids)
        if refused:
            # Refused, not fatal: the Go relay takes any number, and an agent
            # over the limit only misses news of the refused ids.
            relay.counters.dropped["subscription_limit"] += refused
            relay.noisyLog(
                self._log.warn,
                "{peer}: refused {count} subscriptions over the limit of {limit} ids",
                peer=self,
                count=refused,
                limit=relay.maxSubscriptions,
            )
        if ids:
            relay.subscribe(self, ids)

    def protocolError(self, reason, detail):
        self.relay.noisyLog(
            self._log.warn, "{peer}: protocol error, closing: {detail}", peer=self, detail=detail
        )
        self.relay.counters.protocolErrors[reason] += 1
        self._close()

    # Health check (docs/protocol.md): a ping every 25 s; a window of 45 s
    # without an answer counts as a miss; OZ_RELAY_HC_ATTEMPT_THRESHOLD
    # consecutive misses close the connection. The same shape as the Go
    # sender, so agents tuned against it behave the same here. Both
    # schedules share one timer (the next of the two events), which halves
    # the timer work per peer: it is a tenth of the cost of a handshake.
    # Like a ticker, a timer that fires late skips what it missed.

    def _startHealthCheck(self):
        if self.closed:
            return
        now = self.relay.clock.seconds()
        self._nextPing = now + HEALTH_CHECK_INTERVAL
        self._nextWindow = now + HEALTH_WINDOW
        # The handshake timer, still pending, moves to the first health
        # event: a reset to a later time costs less than a new timer.
        self._timer.reset(HEALTH_CHECK_INTERVAL)

    def _healthTick(self):
        now = self.relay.clock.seconds()
        due = now + _EPSILON
        if self._nextPing <= due:
            while self._nextPing <= due:
                self._nextPing += HEALTH_CHECK_INTERVAL
            self.link.writeMessage(m.HEALTH_CHECK_MESSAGE)
        if self._nextWindow <= due:
            while self._nextWindow <= due:
                self._nextWindow += HEALTH_WINDOW
            self._healthWindowEnded()
            if self.closed:
                return
        self._timer = self.relay.clock.callLater(
            min(self._nextPing, self._nextWindow) - now, self._timerFired
        )

    def _healthWindowEnded(self):
        if self._acked:
            self._acked = False
            return
        self._missed += 1
        if self._missed < self.relay.healthCheckThreshold:
            self._log.warn(
                "{peer}: health check missed ({missed} of {threshold})",
                peer=self,
                missed=self._missed,
                threshold=self.relay.healthCheckThreshold,
            )
            return
        self._log.warn("{peer}: health check timed out, closing", peer=self)
        self.relay.counters.protocolErrors["health_check_timeout"] += 1
        self._close()

    def _end(self):
        """
        The session is over: no more timers, and later messages are ignored.
        """
        self.closed = True
        self._stopTimers()
        # The ended state (see messageReceived).
        self.messageReceived = _ignore

    def _stopTimers(self):
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    # Store-facing (IPeerConnection and notifications)

    def sendMessage(self, message):
        return self.link.writeMessage(message)

    def peersOnline(self, ids):
        self._writeIDList(m.PEERS_ONLINE, ids)

    def peersWentOffline(self, ids):
        self._writeIDList(m.PEERS_WENT_OFFLINE, ids)

    def _writeIDList(self, kind, ids):
        for message in m.encodeIDList(
            kind, ids, getattr(self.link, "maxMessageSize", m.MAX_MESSAGE_SIZE)
        ):
            self.link.writeMessage(message)

    def close(self):
        """
        Drop the connection (replaced by a newer one, or a protocol error).
        """
        self._close()

    def closeGracefully(self):
        """
        Tell the peer the relay is going away, then close (shutdown).
        """
        if not self.closed:
            self._end()
            self.link.closeGracefully()

    def _close(self):
        if not self.closed:
            self._end()
            self.link.closeLink()

    def linkLost(self):
        """
        The carrier is gone, for whatever reason.
        """
        self._end()
        self._settled()
        if self.peerID is not None:
            self.relay.unregister(self)

    def _settled(self):
        """
        No longer waiting to authenticate (authenticated, or gone).
        """
        if self._pending:
            self._pending = False
            self.relay.admission.leave(self)


def _ignore(message):
    """
    Messages that arrive after the session ended (already-buffered frames).
    """
