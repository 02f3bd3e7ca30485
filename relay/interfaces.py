"""
The seams between the relay's parts.

The peer side (WebSocket or QUIC sessions, the store) and the inter-pod fabric
only know each other through these interfaces, so each can be tested with a
fake of the other and single-pod mode runs no fabric code at all.
"""

from zope.interface import Attribute, Interface


class IPeerConnection(Interface):
    """
    One authenticated peer, whatever carries it (WebSocket or QUIC).
    """

    peerID = Attribute("The peer's 36-byte id (bytes).")

    registeredAt = Attribute("When the peer was stored, in the relay clock's seconds (float).")

    def sendMessage(message):
        """
        Queue one whole relay message (bytes, version byte first) for the peer.

        Never blocks and never raises for a closed or slow peer.

        @return: True if queued, False if dropped (the drop is already counted).
        """

    def close():
        """
        Drop the connection without a Close message.
        """


class ILocalPeers(Interface):
    """
    What the inter-pod fabric needs from this pod's relay.
    """

    def localPeer(peerID):
        """
        @return: the L{IPeerConnection} connected here for C{peerID}, or None.
        """

    def localPeers():
        """
        @return: an iterable of every L{IPeerConnection} connected here (for a
            presence snapshot when a stream comes up).
        """

    def peerOnlineElsewhere(peerID):
        """
        A sibling pod announced (presence push) that C{peerID} connected there:
        local subscribers waiting for it get PeersOnline.
        """

    def peerGoneElsewhere(peerID):
        """
        A sibling pod announced (PEER_GONE) that C{peerID} left it: local
        subscribers get PeersWentOffline unless the peer is connected here.
        """


class ICrossPodForwarder(Interface):
    """
    What the relay needs from the inter-pod fabric.
    """

    def forward(destinationID, message):
        """
        Deliver a Transport message (bytes; its id field already holds the
        source id) to C{destinationID} on whichever pod holds it. Fire and
        forget: never raises; a message that cannot be delivered is dropped and
        counted.
        """

    def locate(peerID, requester=None):
        """
        @param requester: the id of the subscriber asking, whose share of
            lookup slots a broadcast is charged to, or None.
        @return: a L{Deferred} firing with True if some sibling pod holds
            C{peerID}, False otherwise (never errbacks; gives up after 5 s;
            False at once when no lookup slot is free).
        """

    def peerConnected(peer):
        """
        An L{IPeerConnection} was stored here (presence push to siblings).
        """

    def peerDisconnected(peer):
        """
        An L{IPeerConnection} left the store here (PEER_GONE to siblings).
        """


class IRelay(Interface):
    """
    What a L{relay.peer.PeerSession} may use of the relay it belongs to
    (L{relay.relay.Relay}): everything a session asks or tells about other
    peers goes through here, so a session can be driven by a fake of it and
    the relay's store, validator and fabric stay out of the session's reach.

    The carriers' listeners (L{relay.listener.ws}, L{relay.listener.quic}) reach the same
    C{clock}, C{counters}, C{noisyLog} and C{admission}, and QUIC's also
    reads L{relay.relay.Relay.draining}.
    """

    clock = Attribute("The IReactorTime the session's timers and rate bucket run on.")

    counters = Attribute(
        "The L{relay.counters.RelayCounters} the session increments (rejects, "
        "drops, protocol errors, bytes received)."
    )

    noisyLog = Attribute(
        "The L{relay.limits.LogBudget}: C{noisyLog(emit, format, **fields)} "
        "for every line a stranger can cause."
    )

    admission = Attribute(
        "The L{relay.limits.Admission} a session waits in until it is "
        "authenticated or gone: C{enter(session, sourceHost)} once, "
        "C{leave(session)} once; it may call the session's C{evict} to make "
        "room for a newcomer."
    )

    limits = Attribute(
        "The L{relay.limits.Limits}; a session reads C{peerByteRate} (bytes "
        "per second a peer may send, 0 for no limit) once authenticated."
    )

    healthCheckThreshold = Attribute("Health checks a peer may miss in a row (int).")

    authResponse = Attribute("The encoded AuthResponse every authenticated peer is sent (bytes).")

    maxSubscriptions = Attribute("Most peer ids one session may be subscribed to (int).")

    def authenticate(token):
        """
        Check a peer's token.

        @raise relay.auth.AuthError: it is not valid now; its C{reason} is
            the rejection counter's label.
        """

    def refusal(peerID):
        """
        @return: why a peer that authenticated as C{peerID} may not be
            registered now (C{"draining"} or C{"max_peers"}), or None.
        """

    def peerCount():
        """
        @return: how many peers are registered here (int), for log lines.
        """

    def register(session, startedAt):
        """
        Store a freshly authenticated session (C{startedAt}: the clock's
        seconds when its connection began), closing an older connection of
        the same peer. Sets the session's C{registeredAt}.
        """

    def unregister(session):
        """
        A registered session ended: forget it and its subscriptions.
        """

    def route(destinationID, message, dropped=None):
        """
        Deliver a Transport message, already stamped with its source's id, to
        C{destinationID} here or on a sibling pod; count it or its drop.

        @param dropped: the sender's C{dropped(destination, size)}, called
            when a destination here refused the message (C{sendMessage}
            returned False) with that L{IPeerConnection} and the message's
            size, so that a sender flooding a congested peer can be slowed
            down (L{relay.listener.ws.PeerWebSocketProtocol.messageDropped}); None
            for a sender that is never slowed down.
        """

    def admitSubscriptions(session, ids):
        """
        @return: C{(the ids session may subscribe to under the per-session
            limit, how many were refused)}.
        """

    def subscribe(session, ids):
        """
        Tell C{session} when the peers C{ids} come online (at once for those
        online now) and go offline.
        """

    def unsubscribe(session, ids):
        """
        Stop telling C{session} about C{ids}.
        """
