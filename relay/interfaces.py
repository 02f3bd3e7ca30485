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

    registeredAt = Attribute(
        "When the peer was stored, in the relay clock's seconds (float)."
    )

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
