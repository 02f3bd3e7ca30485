"""
What the relay takes from aioquic beyond its public API (L{relay.listener.quic} and
its lean data path L{relay.listener.quiclean}).

aioquic's public API is a sans-I/O L{QuicConnection}: datagrams in, events
out, datagrams to send. A relay needs more: some state aioquic keeps private
(the peer's datagram limit, whether the connection is closing), control
over its pacer and its memory, and for the packet that is nearly all of its
traffic (a 1-RTT packet of DATAGRAM frames) a lean receive and send on
aioquic's own keys, packet spaces and loss recovery (L{relay.listener.quiclean}).

Each name below says what it relies on and why. What they are worth,
measured with C{python -m tests.bench quic --runs 3 --quic-pairs 10
--quic-latency-pairs 1} (relay CPU per delivered message, py-spy for the
split) and 400 idle quic-go peers (relay RSS), see the README's
performance section:
  - the lean path (everything it reads and writes, L{CONNECTION} from
    C{_close_pending} on, L{SPACE}, L{RECOVERY}, L{CRYPTO_PAIR},
    L{CRYPTO_CONTEXT}, L{HEADER_PROTECTION}, L{NETWORK_PATH}, L{RANGE_SET},
    L{FUNCTIONS}): receiving a DATAGRAM packet 14.0 -> 5.6 us, building
    and registering one 10.1 -> 3.3 us, timers 1.9 -> 0.2 us; in all 38.3
    -> 16.5 us per message in the profiled run (header protection on the
    header alone is 0.9 us of that);
  - the frame handler view (C{_QuicConnection__frame_handlers}): 5 KiB of
    Python objects per idle peer (12 KiB against aioquic's own table);
  - the discarded epochs' stand-ins (C{_cryptos}, C{_cryptos_initial},
    C{_spaces}, C{_crypto_streams}, C{_crypto_buffers}, C{spaces}): 6.9
    KiB; the trimmed TLS context (L{TLS_CONTEXT}): 2.5 KiB; with the rest
    of this change an idle peer was 37.6 -> 23.0 KiB of relay RSS (a
    first batch of 400 on a fresh relay; 26.4 KiB at steady state, 23.4
    with the idle queues below);
  - the pacer (C{_loss._pacer}): without it a connection sent at most a
    few thousand packets a second (a reactor sleeps at least 1 ms);
  - C{ack_at}: an ACK rides on the turn's datagrams instead of a packet
    and a timer wake-up of its own 1 ms later;
  - the idle queues (C{_events}, a path's C{local_challenges} and
    C{remote_challenges}): 0.65 KiB of RSS each per idle peer;
  - the TLS output buffers (C{_crypto_buffers}, three of 16 KiB), the
    handshake secrets and the keys' callbacks: 51 -> 36 KiB of RSS per
    idle peer when they were added (commits 9ab936a, 648a7e8).
L{missing} lists what an installed aioquic lacks;
tests/test_internals_aioquic.py runs it on live connections and checks
that relay/listener/quiclean.py and relay/listener/quic.py use no unlisted internal.

Supported: aioquic 1.7 (pyproject pins >=1.7,<1.8; tests/test_quic*.py and
tests/test_internals_aioquic.py pass on 1.7.0, 1.7.1 and 1.7.2): the lean
path mirrors the receive and packet-building code of that series line by
line, so a new minor version is adopted only after these tests pass on it.
(The relay's QUIC tests fail on 1.6.1 with or without the lean path: the
former range >=1.4,<2 was not what was tested.)
"""

from importlib.metadata import version as _version

import aioquic
from aioquic.quic import connection as _connection
from aioquic.quic import packet as _packet
from aioquic.quic import packet_builder as _packet_builder
from aioquic.quic import recovery as _recovery
from aioquic.quic.crypto import NoCallback

LIBRARY = "aioquic"
TESTED = "1.7"

# The number of ACK ranges aioquic keeps (receive_datagram shifts the oldest
# one out past it); the lean receive does the same.
MAX_ACK_RANGES = getattr(_recovery, "MAX_ACK_RANGES", None)
# The room aioquic's ACK writer asks of a packet (before ranges).
ACK_FRAME_CAPACITY = getattr(_connection, "ACK_FRAME_CAPACITY", None)
# The PATH_CHALLENGE data a path remembers (its deque's maxlen).
MAX_LOCAL_CHALLENGES = getattr(_connection, "MAX_LOCAL_CHALLENGES", None)


def installedVersion():
    try:
        return _version(LIBRARY)
    except Exception:
        return getattr(aioquic, "__version__", "unknown")


# Attributes of a QuicConnection, each with why the relay uses it.
CONNECTION = {
    # Used by relay.listener.quic (the driver of every connection).
    "_loss": (
        "its loss recovery: the pacer is replaced by one sized for a reactor's timers (a "
        "reactor sleeps >= 1 ms; aioquic's capped a connection at a few thousand packets a "
        "second); the lean path registers sent packets and ACKs with it"
    ),
    "_max_datagram_size": "the UDP payload limit, for the pacer and the room of one DATAGRAM frame",
    "_datagrams_pending": (
        "the DATAGRAM send queue: its length tells which relay messages have left (for the "
        "write high-water mark); the lean send drains it"
    ),
    "_close_event": (
        "whether the connection is closing: aioquic raises ConnectionTerminated only when the "
        "closing period ends, the session must learn at once"
    ),
    "_remote_max_datagram_frame_size": (
        "the client's datagram limit (its transport parameter), which caps relay messages to it"
    ),
    "_peer_cid": (
        "the peer's connection id: its length sets the room of a DATAGRAM frame in a packet; "
        "the lean send writes it"
    ),
    "_crypto_buffers": (
        "three 16 KiB TLS output buffers kept for life: made small after the handshake (idle "
        "peer memory)"
    ),
    "_QuicConnection__frame_handlers": (
        "the frame handler table, whose per-connection epoch frozensets are replaced by shared "
        "ones (idle peer memory, 7 KiB)"
    ),
    "_quic_logger": (
        "None for the relay: then the keys' qlog callbacks are dropped, and the lean path "
        "(which logs nothing) may run"
    ),
    "_cryptos": (
        "the keys per epoch: qlog callbacks dropped; the lean path decrypts and encrypts with "
        "the 1-RTT pair"
    ),
    "_state": "FIRSTFLIGHT tells an undecryptable Initial; CONNECTED gates the lean path",
    "_spaces": (
        "the packet spaces: ack_at of the 1-RTT one is made due so ACKs ride on the same turn's "
        "datagrams; the lean path keeps its ranges"
    ),
    # Read or written by the lean path (relay.listener.quiclean), as receive_datagram,
    # _write_application and _flush_builder do.
    "_close_pending": "a close not sent yet: lean path off",
    "_network_paths": (
        "the current path (address, validation, challenges, bytes sent) and former ones: lean "
        "only on the validated current path, and while no other needs probing; their idle "
        "queues shrinkIdleQueues replaces"
    ),
    "_spin_highest_pn": "spin bit bookkeeping of a received packet",
    "_spin_bit": "spin bit of received and sent packets",
    "_close_at": (
        "the idle timer, restarted by a received packet and the first ack-eliciting packet sent"
        " after it"
    ),
    "_idle_timeout": "the idle timeout to restart the idle timer with",
    "_ack_eliciting_sent_since_receipt": "the idle timer's restart rule (RFC 9000 section 10.1)",
    "_handshake_confirmed": "lean send only once no INITIAL/HANDSHAKE packet can be due",
    "_probe_pending": "a PTO probe is due: aioquic builds it",
    "_handshake_done_pending": "a HANDSHAKE_DONE is due: aioquic builds it",
    "_ping_pending": "a PING is due: aioquic builds it",
    "_streams": "streams (a client that opens one is closed): aioquic builds their frames",
    "_streams_queue": "as _streams",
    "_retire_connection_ids": "RETIRE_CONNECTION_ID frames due: aioquic builds them",
    "_streams_blocked_pending": "STREAMS_BLOCKED due: aioquic builds it",
    "_host_cids": "a NEW_CONNECTION_ID not sent yet: aioquic builds it",
    "_crypto_streams": "1-RTT CRYPTO data pending: aioquic builds it",
    "_local_max_data": "a MAX_DATA due: aioquic builds it",
    "_local_max_streams_bidi": "a MAX_STREAMS due: aioquic builds it",
    "_local_max_streams_uni": "a MAX_STREAMS due: aioquic builds it",
    "_packet_number": "the next packet number, used and advanced by the lean send",
    "_pacing_at": "the pacing timer the lean send sets as aioquic's writer does",
    "_remote_ack_delay_exponent": "to decode a received ACK frame's delay",
    "_local_ack_delay_exponent": "to encode a sent ACK frame's delay",
    "_ack_delay": "the delay of an ACK timer armed by a received packet",
    "_on_ack_delivery": "the delivery handler of a sent ACK frame (drops acknowledged ranges)",
    "_on_ping_delivery": "the delivery handler of an ACK-of-ACK PING",
    "_is_client": "the trims apply to the server end only",
    "_cryptos_initial": (
        "INITIAL keys per QUIC version, replaced by a shared key-less pair once discarded"
    ),
    "_events": (
        "whether a lean receive raised events (delivery handlers of acknowledged PINGs), so they "
        "are handled; an empty deque (0.65 KiB of an idle peer) replaced by a SmallQueue"
    ),
}

# Attributes of a QuicPacketSpace (the 1-RTT one).
SPACE = {
    "ack_at": "ACK timer: made due in the turn's datagrams; set and cleared by the lean path",
    "ack_queue": "received packet ranges to acknowledge",
    "discarded": (
        "receive_datagram records nothing in a discarded space; trimDiscardedEpochs checks it"
    ),
    "expected_packet_number": "decoding truncated packet numbers",
    "largest_received_packet": "largest packet received, for the ACK frame",
    "largest_received_time": "its time, for the ACK delay",
    "received_packets": "duplicate detection window",
}

# Attributes of QuicPacketRecovery.
RECOVERY = {
    "spaces": (
        "the packet spaces loss recovery iterates: only the 1-RTT one once the others are discarded"
    ),
    "_pacer": "the pacer (replaced; consulted by the lean send)",
    "peer_completed_address_validation": "set by an ACK frame, as aioquic's ACK handler does",
    "on_ack_received": "loss recovery of received ACK frames",
    "on_packet_sent": "loss recovery and congestion control of sent packets",
    "congestion_window": "the builder's room in flight",
    "bytes_in_flight": "the builder's room in flight",
    "_rtt_smoothed": (
        "read (never written) by the lean path: the idle timeout is computed again only when it"
        " or _rtt_variance changes"
    ),
    "_rtt_variance": "as _rtt_smoothed",
}

# Attributes of CryptoPair and CryptoContext.
CRYPTO_PAIR = {
    "recv": "the receive keys",
    "send": "the send keys",
    "key_phase": "the key phase bit of a sent packet (with a requested update)",
    "encrypt_packet": "encryption, which also carries out a requested key update",
    "_update_key_requested": (
        "a key update requested: the lean send leaves that packet's encryption to encrypt_packet"
    ),
}
# HeaderProtection (aioquic._crypto): the lean path applies and removes
# header protection on the header alone (aioquic's apply and remove copy the
# whole packet two or three times: 0.5 us of a packet's 4).
HEADER_PROTECTION = {
    "_mask": "the header protection mask of a sample",
}
CRYPTO_CONTEXT = {
    "aead": "payload protection (None: no keys)",
    "hp": "header protection",
    "key_phase": "the current receive key phase: another one goes to aioquic",
    "_setup_cb": "qlog callback, dropped for an idle peer's memory",
    "_teardown_cb": "qlog callback, dropped for an idle peer's memory",
}

# Attributes of a QuicNetworkPath.
NETWORK_PATH = {
    "addr": "the peer's address",
    "is_validated": "lean only on a validated path",
    "remote_challenges": (
        "PATH_RESPONSE due: aioquic builds it; an empty deque (0.65 KiB of an idle peer) "
        "replaced by a SmallQueue"
    ),
    "local_challenges": (
        "PATH_CHALLENGE data sent on the path, at most MAX_LOCAL_CHALLENGES: an empty deque "
        "replaced by a SmallQueue"
    ),
    "local_challenge_sent": "a PATH_CHALLENGE due on another path: aioquic builds it",
    "bytes_sent": "counted per datagram, as _flush_builder does",
}

# A server TLS context after its handshake: the state dropped from it.
TLS_CONTEXT = {
    "state": "only a server past its handshake drops its secrets",
    "key_schedule": "the handshake's running transcript hash",
    "received_extensions": "the client's extensions",
    "_certificate_request": "unused by a server after the handshake",
    "_enc_key": "handshake traffic key",
    "_dec_key": "handshake traffic key",
    "_ec_private_keys": "key exchange private keys",
    "_x25519_private_key": "key exchange private key",
    "_x448_private_key": "key exchange private key",
    "_receive_buffer": "TLS input buffer",
    "alpn_negotiated": "kept past the handshake",
    "early_data_accepted": "kept past the handshake",
    "_session_resumed": "kept past the handshake",
    "_is_client": "kept past the handshake",
    "_Context__logger": "kept past the handshake",
}

# Module-level functions and classes.
FUNCTIONS = {
    (_packet, "decode_packet_number"): "packet number decoding, as in receive_datagram",
    (_packet, "pull_ack_frame"): "ACK frame parsing, as in the ACK handler",
    (_packet, "push_ack_frame"): "ACK frame writing, as in _write_ack_frame",
    (_packet_builder, "QuicSentPacket"): "the record of a sent packet that loss recovery keeps",
    (_recovery, "QuicPacketPacer"): "the pacer the relay's one derives from",
    (_recovery, "MAX_ACK_RANGES"): "the bound on kept ACK ranges",
    (_connection, "ACK_FRAME_CAPACITY"): "the room an ACK frame needs",
    (_connection, "MAX_LOCAL_CHALLENGES"): "the bound of a path's sent PATH_CHALLENGE data",
    (_recovery, "QuicPacketSpace"): "the shared discarded space",
    (
        _connection.QuicConnection,
        "_write_application",
    ): "the writer onlyDatagrams() mirrors (checked by name only)",
    (
        _connection.QuicConnection,
        "_flush_builder",
    ): "the registration transmit() mirrors (checked by name only)",
}

# The fields of QuicSentPacket, in order: the lean send passes them by
# position (a keyword call costs twice as much, 0.2 us of a packet).
SENT_PACKET_FIELDS = (
    "epoch",
    "in_flight",
    "is_ack_eliciting",
    "is_crypto_packet",
    "packet_number",
    "packet_type",
    "sent_time",
    "sent_bytes",
    "delivery_handlers",
    "quic_logger_frames",
)

# Attributes of a RangeSet (a packet space's ack_queue).
RANGE_SET = {
    "_RangeSet__ranges": (
        "its sorted list of disjoint, non-touching ranges, changed in place only: the lean "
        "receive extends or appends the last one for the next packet as RangeSet.add would (add "
        "walks every range: 0.3 us of a packet)"
    ),
}


def missing(quic):
    """
    What this aioquic lacks of what the relay relies on, checked on an
    established server connection C{quic} (1-RTT keys, handshake done).

    @return: a list of descriptions, empty if nothing is missing.
    """
    gaps = []

    def need(obj, names, what):
        for name in names:
            if not hasattr(obj, name):
                gaps.append(f"{what}.{name}")

    need(quic, CONNECTION, "QuicConnection")
    from aioquic.tls import Epoch

    spaces = getattr(quic, "_spaces", {})
    if Epoch.ONE_RTT in spaces:
        need(spaces[Epoch.ONE_RTT], SPACE, "QuicPacketSpace")
    else:
        gaps.append("QuicConnection._spaces[ONE_RTT]")
    if hasattr(quic, "_loss"):
        need(quic._loss, RECOVERY, "QuicPacketRecovery")
    cryptos = getattr(quic, "_cryptos", {})
    if Epoch.ONE_RTT in cryptos:
        pair = cryptos[Epoch.ONE_RTT]
        need(pair, CRYPTO_PAIR, "CryptoPair")
        for side in ("recv", "send"):
            if hasattr(pair, side):
                context = getattr(pair, side)
                need(context, CRYPTO_CONTEXT, f"CryptoContext({side})")
                need(getattr(context, "hp", None), HEADER_PROTECTION, f"HeaderProtection({side})")
    else:
        gaps.append("QuicConnection._cryptos[ONE_RTT]")
    for path in getattr(quic, "_network_paths", [])[:1]:
        need(path, NETWORK_PATH, "QuicNetworkPath")
    # A live server's context keeps only these (trimServerTLS); the rest
    # is checked on a new one.
    from aioquic import tls as _tls

    need(quic.tls, _POST_HANDSHAKE_TLS, "tls.Context")
    need(_tls.Context(is_client=False), TLS_CONTEXT, "tls.Context")
    if not hasattr(_tls.State, "SERVER_POST_HANDSHAKE"):
        gaps.append("tls.State.SERVER_POST_HANDSHAKE")
    for (owner, name), _why in FUNCTIONS.items():
        if not hasattr(owner, name):
            gaps.append(f"{getattr(owner, '__name__', owner)}.{name}")
    fields = tuple(getattr(_packet_builder.QuicSentPacket, "__dataclass_fields__", {}))
    if fields != SENT_PACKET_FIELDS:
        gaps.append(f"QuicSentPacket fields {SENT_PACKET_FIELDS} in this order (it has {fields})")
    if Epoch.ONE_RTT in spaces:
        queue = getattr(spaces[Epoch.ONE_RTT], "ack_queue", None)
        if queue is not None:
            need(queue, RANGE_SET, "RangeSet")
    return gaps


# Accessors the relay uses off the hot path.


def pacer(quic):
    return quic._loss._pacer


def setPacer(quic, pacer):
    quic._loss._pacer = pacer


def maxDatagramSize(quic):
    return quic._max_datagram_size


def pendingDatagrams(quic):
    return quic._datagrams_pending


def isClosing(quic):
    return quic._close_event is not None


def remoteMaxDatagramFrameSize(quic):
    return quic._remote_max_datagram_frame_size


def peerConnectionID(quic):
    return quic._peer_cid.cid


def isFirstFlight(quic):
    return quic._state is _connection.QuicConnectionState.FIRSTFLIGHT


def packetSpace(quic, epoch):
    return quic._spaces.get(epoch)


def recovery(quic):
    return quic._loss


def cryptoPair(quic, epoch):
    return quic._cryptos[epoch]


def cryptoStream(quic, epoch):
    return quic._crypto_streams[epoch]


def connectionLimits(quic):
    return (quic._local_max_data, quic._local_max_streams_bidi, quic._local_max_streams_uni)


def remoteAckDelayExponent(quic):
    return quic._remote_ack_delay_exponent


def localAckDelayExponent(quic):
    return quic._local_ack_delay_exponent


def ackDelay(quic):
    return quic._ack_delay


def ackDeliveryHandler(quic):
    return quic._on_ack_delivery


def hasEvents(quic):
    return bool(quic._events)


def pingDeliveryHandler(quic):
    return quic._on_ping_delivery


def shrinkCryptoBuffers(quic, capacity):
    """
    Replace the TLS output buffers (aioquic keeps three of 16 KiB for a
    connection's whole life) with ones of C{capacity} bytes.
    """
    from aioquic.buffer import Buffer

    quic._crypto_buffers = {epoch: Buffer(capacity=capacity) for epoch in quic._crypto_buffers}


class SmallQueue(list):
    """
    The part of C{collections.deque} aioquic uses of the queues a
    connection keeps for rare events (C{append}, C{popleft}, C{[0]},
    C{len}, C{in}, C{clear}), as a list: an empty deque holds a block of 64
    slots, 0.65 KiB of relay RSS per queue of an idle peer (measured), an
    empty list none. For queues that stay short: C{popleft} moves the rest.
    """

    __slots__ = ()

    def popleft(self):
        return self.pop(0)


class _SentChallenges(SmallQueue):
    """
    A path's C{deque(maxlen=MAX_LOCAL_CHALLENGES)} of PATH_CHALLENGE data:
    the oldest goes once it is full.
    """

    __slots__ = ()

    def append(self, item):
        list.append(self, item)
        if len(self) > MAX_LOCAL_CHALLENGES:
            del self[0]


def shrinkIdleQueues(quic):
    """
    Replace the deques a connection keeps for rare events (its events
    queue, drained at once; each network path's PATH_CHALLENGE and
    PATH_RESPONSE data) with L{SmallQueue}s holding the same items. Paths
    aioquic adds later (a migration) keep deques.
    """
    for path in quic._network_paths:
        path.local_challenges = _SentChallenges(path.local_challenges)
        path.remote_challenges = SmallQueue(path.remote_challenges)
    quic._events = SmallQueue(quic._events)


class _FrameHandlers:
    """
    aioquic's table of frame handlers (frame type to bound method and
    allowed epochs), built on demand from one table shared by every
    connection: aioquic keeps a dict of 33 bound methods and tuples per
    connection (5 KiB of an idle peer), and only reads it with
    C{table[frameType]} (a KeyError for an unknown type), now only for
    the rare packets the lean path hands over.
    """

    __slots__ = ("_quic", "_shared")

    def __init__(self, quic, shared):
        self._quic = quic
        self._shared = shared

    def __getitem__(self, frameType):
        name, epochs = self._shared[frameType]
        return getattr(self._quic, name), epochs

    def __len__(self):
        return len(self._shared)

    def __iter__(self):
        return iter(self._shared)

    def items(self):
        return [(frameType, self[frameType]) for frameType in self._shared]


def shareFrameHandlers(quic, shared):
    """
    Replace a connection's frame handler table with a L{_FrameHandlers}
    reading C{shared}, a dict the caller keeps across connections (filled
    from the first connection's table: method names and epoch sets).
    """
    handlers = quic._QuicConnection__frame_handlers
    if isinstance(handlers, _FrameHandlers):
        return
    if not shared:
        for frameType, (handler, epochs) in handlers.items():
            shared[frameType] = (handler.__func__.__name__, epochs)
    quic._QuicConnection__frame_handlers = _FrameHandlers(quic, shared)


# Discarded epochs' state, one of each for every connection (see
# trimDiscardedEpochs).
_DEAD_CRYPTO_PAIR = None
_DISCARDED_SPACE = None


def trimDiscardedEpochs(quic):
    """
    Once a server's handshake is confirmed its INITIAL and HANDSHAKE epochs
    are discarded for good (their keys torn down, their packet spaces
    marked discarded), yet aioquic keeps their crypto pairs (one per QUIC
    version for INITIAL), packet spaces, CRYPTO streams and TLS output
    buffers: 5 KiB of an idle peer. What aioquic still does with them is
    look them up for a late long-header packet, fail to decrypt it (no
    keys) and drop it, and skip them as discarded when the connection ends.
    So: one shared key-less crypto pair and one shared discarded space
    stand in for them, loss recovery iterates only the 1-RTT space, and the
    CRYPTO streams and buffers of those epochs go (aioquic writes to them
    only before the handshake is confirmed).

    @return: False if the connection is not in that state (nothing done).
    """
    global _DEAD_CRYPTO_PAIR, _DISCARDED_SPACE
    from aioquic.quic.crypto import CryptoPair
    from aioquic.quic.recovery import QuicPacketSpace
    from aioquic.tls import Epoch

    if quic._is_client or not quic._handshake_confirmed:
        return False
    spaces = quic._spaces
    early = (Epoch.INITIAL, Epoch.HANDSHAKE)
    if not all(spaces[epoch].discarded for epoch in early):
        return False
    if any(
        pair.recv.is_valid() or pair.send.is_valid()
        for pair in [quic._cryptos[epoch] for epoch in early] + list(quic._cryptos_initial.values())
    ):
        return False
    if _DEAD_CRYPTO_PAIR is None:
        _DEAD_CRYPTO_PAIR = CryptoPair()
        _DISCARDED_SPACE = QuicPacketSpace()
        _DISCARDED_SPACE.discarded = True
    for epoch in early:
        quic._cryptos[epoch] = _DEAD_CRYPTO_PAIR
        spaces[epoch] = _DISCARDED_SPACE
        quic._crypto_streams.pop(epoch, None)
        quic._crypto_buffers.pop(epoch, None)
    if (
        not quic._cryptos[Epoch.ZERO_RTT].recv.is_valid()
        and not quic._cryptos[Epoch.ZERO_RTT].send.is_valid()
    ):
        quic._cryptos[Epoch.ZERO_RTT] = _DEAD_CRYPTO_PAIR
    quic._cryptos_initial = {version: _DEAD_CRYPTO_PAIR for version in quic._cryptos_initial}
    quic._loss.spaces = [spaces[Epoch.ONE_RTT]]
    return True


# What a server's TLS context past its handshake still reads: it refuses
# every message in that state (tls.Context._handle_reassembled_message).
_POST_HANDSHAKE_TLS = (
    "state",
    "_receive_buffer",
    "alpn_negotiated",
    "early_data_accepted",
    "_session_resumed",
    "_is_client",
    "_Context__logger",
)


def trimServerTLS(context, postHandshakeState):
    """
    Keep of a server's TLS context past its handshake only what it reads
    in that state (C{handle_message} appends to its receive buffer and
    refuses each whole message by its state) and what the connection reads
    of it: its per-connection copies of the configuration's lists and the
    handshake's leftovers go (1.5 KiB of an idle peer).
    """
    if context.state is not postHandshakeState or context._is_client:
        return
    context.__dict__ = {name: context.__dict__[name] for name in _POST_HANDSHAKE_TLS}


def dropKeyCallbacks(quic):
    """
    Drop the qlog callbacks of every key when there is no qlog.
    """
    if quic._quic_logger is None:
        for pair in quic._cryptos.values():
            for context in (pair.recv, pair.send):
                context._setup_cb = context._teardown_cb = NoCallback


def dropServerHandshakeState(context, postHandshakeState):
    """
    Free what a server's TLS context keeps of its handshake, once past it.
    """
    if context.state is not postHandshakeState:
        return
    context.key_schedule = None
    context.received_extensions = None
    context._certificate_request = None
    context._enc_key = context._dec_key = None
    context._ec_private_keys = []
    context._x25519_private_key = context._x448_private_key = None
    context._receive_buffer = b""
