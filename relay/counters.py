"""
Plain integer counters owned by the data path.

The per-message path only does C{counter += n} on these; the metrics module
reads them through OpenTelemetry observable instruments at scrape time. An
OpenTelemetry C{Counter.add()} per relayed packet would cost more than the
relaying itself.
"""

from collections import Counter


class RelayCounters:
    """
    Counters of the peer side of one relay process.

    @ivar transferReceivedBytes: bytes of Transport messages received from
        peers (Go: relay_transfer_received_bytes_total).
    @ivar transferSentBytes: bytes of Transport messages written to peers or
        handed to the fabric (Go: relay_transfer_sent_bytes_total).
    @ivar reconnections: peers that authenticated while an older connection
        with the same id was stored (Go: relay_peer_reconnections_total).
    @ivar dropped: messages dropped, by reason (C{unknown_peer},
        C{slow_consumer}, C{too_large_for_datagram}, C{rate_limited},
        C{malformed}: a short Transport or an id list that is not a
        multiple of 36 bytes), and C{subscription_limit}: subscribed ids
        refused, one per id.
    @ivar handshakeRejects: failed or refused handshakes, by reason: the
        first message (C{too_large}, C{malformed}, C{bad_version},
        C{bad_type}, C{not_auth}, C{legacy_hello}, C{bad_magic}), the token
        (C{unknown_algo}, C{bad_signature}, C{expired}, C{malformed}), the
        relay's state and limits (C{draining}, C{max_peers},
        C{pending_evicted}, C{descriptors}, C{no_descriptors} (closed by
        Twisted's accept loop for want of descriptors), C{per_ip_connections},
        C{per_ip_rate}), the WebSocket layer's bounds (C{request_too_large},
        C{control_frames}, C{fragments}), C{timeout} (no Auth in time) and
        C{no_certificate} (TLS before ACME's first certificate).
    @ivar protocolErrors: authenticated peers closed for a protocol error,
        by reason.
    @ivar connections: open connections (authenticated or not), by transport
        (C{websocket}, C{quic}).
    @ivar senderPauses: times a WebSocket sender was left unread because
        its messages were being dropped for a congested destination.
    @ivar metricsRefusals: on the metrics port, connections evicted at its
        connection limit (C{connections}) and requests refused unread
        (C{method}, C{body}).
    @ivar quicRefusals: QUIC datagrams and connections the listener
        refused before any session saw them, by reason (see
        L{relay.listener.quic.QuicPeerProtocol}).
    """

    def __init__(self):
        self.transferReceivedBytes = 0
        self.transferSentBytes = 0
        self.reconnections = 0
        self.dropped = Counter()
        self.handshakeRejects = Counter()
        self.protocolErrors = Counter()
        self.connections = Counter()
        self.senderPauses = 0
        self.metricsRefusals = Counter()
        self.quicRefusals = Counter()


class ClusterCounters:
    """
    Counters of the inter-pod fabric.

    @ivar forwards: FWD attempts by result (C{ok}, C{peer_not_found},
        C{stream_gone}, C{send_error}).
    @ivar helloRejects: refused inter-pod streams by reason (docs/cluster.md, "Failures").
    @ivar pingsSent: PING frames sent.
    @ivar pingsLost: PINGs whose PONG did not arrive in time.
    @ivar dropped: frames or queued packets dropped, by reason: the
        stream's (C{malformed_frame}, C{frame_auth_mismatch},
        C{slow_stream}, C{stream_overflow}), incoming FWD
        (C{fwd_not_transport}, C{fwd_too_large}, C{fwd_peer_not_here}),
        lookups (C{lookup_queue_full}, C{lookup_share_full}, the same with
        C{subscription_} before them for subscriptions) and C{shutdown}.
    """

    def __init__(self):
        self.forwards = Counter()
        self.helloRejects = Counter()
        self.pingsSent = 0
        self.pingsLost = 0
        self.dropped = Counter()
