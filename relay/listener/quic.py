"""
Peers over QUIC: relay messages in RFC 9221 DATAGRAM frames (docs/protocol.md, "Carriers").

Agents race QUIC against WebSocket and keep the winner, so a relay that only
speaks WebSocket is slower for every agent that would have won with QUIC. This
module serves the QUIC side on the UDP twin of the peer port: TLS 1.3 with ALPN
C{nb-quic}, one relay message per DATAGRAM frame, no streams, and every QUIC
connection is the link of an ordinary L{PeerSession}, so a QUIC peer and a
WebSocket peer are the same kind of peer to the store and to each other.

aioquic does the QUIC work sans I/O: a L{QuicConnection} per client is fed the
UDP datagrams for its connection ids and the reactor's timers, and hands back
datagrams to send. One Twisted L{DatagramProtocol} owns the socket and
dispatches by destination connection id; there is no asyncio loop and no
thread. Sending is batched: a write marks its connection dirty and one
C{callLater(0)} flushes every dirty connection after the current reactor turn,
so a burst of messages read in one C{doRead} leaves in as few packets as
congestion control allows.

Sizes follow quic-go as the Go agents configure it: UDP payloads of at most
1452 bytes (the agents' initial packet size and their read buffer), so a
message travels only if it fits one packet to that peer; one that does not is
dropped and counted, never truncated. The advertised C{max_datagram_frame_size}
admits an 8820-byte relay message; a larger DATAGRAM frame is a protocol
violation that closes that connection. The idle timeout is quic-go's server
default (30 s); quic-go agents ask for 4 min and keep alive every
min(30 s, idle/2), so they ping every 15 s, and the relay's own health check
(every 25 s) keeps other clients alive.

When aioquic's events are handled, and why then:
  - C{ConnectionIdIssued}: aioquic raises it while C{datagrams_to_send()}
    builds the NEW_CONNECTION_ID frame, and quic-go moves to a new id as
    soon as one arrives (its first change is "as early as possible"), so
    the id is routed after the packets are built and before any of them is
    written. Handled later, what the client sent next on that id (its
    Auth, or the SubscribePeerState it sends on the AuthResponse) reached
    no connection and, being datagrams, was never resent: 20 to 30 of 50
    fresh quic-go connections lost a message that way.
  - C{ConnectionIdRetired}: after the C{receive} of the RETIRE_CONNECTION_ID
    frame; the id routes nothing more. The id the client made up for its
    first Initial is dropped at handshake completion, as quic-go's server
    does: from then on the client sends only to ids the relay chose.
  - C{HandshakeCompleted}: in the C{receive} of the client's Finished. The
    relay can decrypt 1-RTT packets only from that Finished on, so no
    DATAGRAM frame is handled before it; the client's
    C{max_datagram_frame_size} (a transport parameter of its ClientHello)
    is read then.
  - C{DatagramFrameReceived}: in the C{receive} that decrypted it.
  - Closing: a CONNECTION_CLOSE received, or an error aioquic closes for,
    raises C{ConnectionTerminated} only when the closing period ends (three
    probe timeouts later); the session is ended after the C{receive},
    timer or transmission that began the closing, and the ids keep routing
    to the closing connection until C{ConnectionTerminated}.
  - The idle timeout: C{ConnectionTerminated} from the timer.

Streams: a client that opens one is closed at once (an agent never does, and
closing frees what aioquic would buffer for it). Retry: sent only while many
handshakes are in flight, as quic-go's server does. Stateless resets: not
sent (aioquic draws reset tokens at random, so a forgotten connection cannot
be reset); packets for unknown connections are dropped and the client's idle
timeout ends it.

aioquic keeps some state private that a relay needs: the peer's
C{max_datagram_frame_size} and connection id, the pending-datagram queue,
whether the connection is closing, its pacer and its TLS output buffers;
for speed, the application space's C{ack_at} (an ACK rides on the
datagrams of the same turn); for an idle peer's memory, the frame handler
table, the keys' callbacks and the server TLS context's handshake state.
All of it is reached through L{relay.internals.aioquic}, which names each
piece with its reason and is tested against the installed aioquic (the
1.7 series, which pyproject pins).

The data path: once a connection is established, its DATAGRAM packets are
received and built by L{relay.listener.quiclean.LeanPath} on aioquic's own keys and
state, and everything else (handshake, key update, PING, loss probes,
migration, close) goes through aioquic unchanged. Packets leave straight
from the socket, a connection's run of one size as one C{sendmsg} with UDP
GSO (L{_SocketSender}).
"""

import errno
import logging
import os
import socket
import struct
import sys

from aioquic import tls
from aioquic.buffer import Buffer, size_uint_var
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import (
    QuicErrorCode,
    QuicFrameType,
    QuicPacketType,
    encode_quic_retry,
    encode_quic_version_negotiation,
    pull_quic_header,
)
from aioquic.quic.recovery import QuicPacketPacer
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from twisted.application import service
from twisted.internet import defer, error
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from relay import messages as m
from relay.addresses import joinAddress
from relay.internals import aioquic as internals
from relay.internals.twisted import listenUDPIntoBuffer
from relay.listener.quiclean import LeanPath
from relay.listener.ws import CLOSE_REASON_SHOWN
from relay.logtext import quoted
from relay.peer import PeerSession
from relay.relay import ConfigurationError

# aioquic reports every refused handshake through the standard library's
# logging; without a handler those lines would reach stderr through Python's
# last-resort handler, bypassing the relay's log. An application that
# configures logging still gets them.
logging.getLogger("quic").addHandler(logging.NullHandler())

ALPN = "nb-quic"

# quic-go's InitialPacketSize as both Go ends set it, and the size of the
# buffer a Go peer reads each UDP packet into: no packet of ours is larger.
MAX_UDP_PAYLOAD = 1452
# RFC 9000 section 14.1: the smallest datagram that may carry a client Initial
# or earn a Version Negotiation or Retry answer.
MIN_INITIAL_SIZE = 1200
# The largest UDP datagram read from the socket (Twisted's default of 8192
# would cut off a DATAGRAM frame holding an 8820-byte message).
MAX_READ_SIZE = 65535
SOCKET_BUFFER_SIZE = 4 * 1024 * 1024
# UDP generic segmentation offload (linux/udp.h; not in Python's socket
# module): at most 64 segments (UDP_MAX_SEGMENTS before Linux 6.9) and one
# UDP datagram's worth of bytes per call.
UDP_SEGMENT = getattr(socket, "UDP_SEGMENT", 103)
GSO_MAX_SEGMENTS = 64
GSO_MAX_BYTES = 65000
# What a kernel or device without segmentation offload answers.
GSO_REFUSED = (errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP, errno.EIO)

# A DATAGRAM frame (type 0x31, a length, the data) that carries one
# 8820-byte message: the transport parameter counts the whole frame.
MAX_DATAGRAM_FRAME_SIZE = 1 + size_uint_var(m.MAX_MESSAGE_SIZE) + m.MAX_MESSAGE_SIZE
# What quic-go advertises (protocol.MaxDatagramFrameSize); the client helper
# advertises the same so tests see the relay through an agent's eyes.
AGENT_MAX_DATAGRAM_FRAME_SIZE = 16383

IDLE_TIMEOUT = 30.0
CLIENT_IDLE_TIMEOUT = 240.0
CLIENT_KEEPALIVE = 15.0

CONNECTION_ID_LENGTH = 8
AEAD_TAG_SIZE = 16
# A 1-RTT packet's header as aioquic builds it: first byte, the peer's
# connection id, a 2-byte packet number.
SHORT_HEADER_SIZE = 3

DEFAULT_HIGH_WATER = 1024 * 1024
CLOSE_TIMEOUT = 3.0
RETRY_TOKEN_LIFETIME = 10.0
# Like quic-go's server, validate client addresses with a Retry only once
# this many handshakes are in flight: no extra round trip normally, and no
# TLS work for spoofed addresses under a flood.
RETRY_ABOVE_HANDSHAKES = 128

# Pacing credit (seconds of the pacing rate) a connection may spend per
# wake-up; see L{_ReactorPacer}.
PACING_BURST = 0.002

# How many sent messages' sizes a connection with a standing queue keeps
# before it drops them from its list (QuicDriver._transmit).
_QUEUED_COMPACT = 64

# The TLS output buffers a connection keeps after its handshake (see
# L{QuicDriver._shrinkCryptoBuffers}).
POST_HANDSHAKE_CRYPTO_BUFFER = 64

# Application error codes in CONNECTION_CLOSE. Go agents read 0 as "closed
# by the server" (relay/client/dialer/quic/conn.go) and anything else as an
# error; both make them reconnect.
CLOSE_NORMAL = 0x0
CLOSE_ERROR = 0x1


# aioquic's frame handler table, by method name, shared by every connection.
_SHARED_FRAME_HANDLERS = {}


def _payloadRoom(frameSpace):
    """
    The largest datagram payload whose DATAGRAM frame (type, varint length,
    data) fits in C{frameSpace} bytes.
    """
    best = 0
    for lengthSize in (1, 2, 4):
        room = frameSpace - 1 - lengthSize
        if room > best and size_uint_var(room) <= lengthSize:
            best = room
    return best


def enlargeBuffers(transport):
    """
    Ask for larger socket buffers (the kernel caps them at rmem_max and
    wmem_max): a burst that overflows the receive buffer is packet loss,
    and lost DATAGRAM frames are never retransmitted.
    """
    sock = getattr(transport, "socket", None)
    if sock is not None:
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            try:
                sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER_SIZE)
            except OSError:
                pass


def writeDatagram(transport, data, addr):
    """
    Send one datagram on C{transport}, if there is one (still).

    @return: False if the socket refused it, True otherwise.
    """
    if transport is None:
        return True
    try:
        transport.write(data, addr)
    except (OSError, error.MessageLengthError):
        # A full socket buffer is packet loss; QUIC recovers from it.
        return False
    return True


class _SocketSender:
    """
    Writes a connection's packets to the listening socket itself, not
    through Twisted's C{Port.write} (an address check per packet), and
    consecutive ones to the same address as one C{sendmsg} with UDP
    generic segmentation offload (Linux's C{UDP_SEGMENT}): the kernel cuts
    the buffer into packets of the first one's size, so a run is packets of
    one size with at most the last shorter. Python has no C{sendmmsg}; a
    flush of one connection is nearly always such a run (full DATAGRAM
    packets, then maybe an ACK). Where the kernel or the device refuses
    segmentation, packets go one per C{sendto} from then on.

    @ivar gso: whether runs are still sent with segmentation offload.
    """

    def __init__(self, sock):
        self._sock = sock
        self.gso = sys.platform.startswith("linux")

    def send(self, datagrams):
        """
        @return: how many packets the socket refused (packet loss).
        """
        sock = self._sock
        failed = 0
        i = 0
        n = len(datagrams)
        while i < n:
            data, addr = datagrams[i]
            size = len(data)
            j = i + 1
            if self.gso:
                total = size
                while j < n and j - i < GSO_MAX_SEGMENTS:
                    more, to = datagrams[j]
                    if to != addr or len(more) > size or total + len(more) > GSO_MAX_BYTES:
                        break
                    total += len(more)
                    j += 1
                    if len(more) < size:
                        break
            try:
                if j - i == 1:
                    sock.sendto(data, addr)
                else:
                    sock.sendmsg(
                        [d for d, _ in datagrams[i:j]],
                        [(socket.SOL_UDP, UDP_SEGMENT, struct.pack("=H", size))],
                        0,
                        addr,
                    )
            except OSError as e:
                if j - i > 1 and e.errno in GSO_REFUSED:
                    self.gso = False
                    continue
                # A full socket buffer is packet loss; QUIC recovers from it.
                failed += j - i
            i = j
        return failed


def serverConfiguration(certFile, keyFile):
    """
    The aioquic configuration of the relay's QUIC listener.

    @raise ConfigurationError: unreadable or invalid certificate or key.
    """
    configuration = QuicConfiguration(
        alpn_protocols=[ALPN],
        is_client=False,
        connection_id_length=CONNECTION_ID_LENGTH,
        idle_timeout=IDLE_TIMEOUT,
        max_datagram_size=MAX_UDP_PAYLOAD,
        max_datagram_frame_size=MAX_DATAGRAM_FRAME_SIZE,
    )
    try:
        configuration.load_cert_chain(certFile, keyFile)
    except OSError as e:
        raise ConfigurationError(
            f"cannot read TLS files {certFile!r} / {keyFile!r} for QUIC: {e.strerror}"
        ) from None
    except (ValueError, TypeError, IndexError) as e:
        raise ConfigurationError(
            f"invalid TLS certificate or key for QUIC in {certFile!r} / {keyFile!r}: {e}"
        ) from None
    return configuration


class _ReactorPacer(QuicPacketPacer):
    """
    aioquic's pacer, with a burst sized for a reactor's timers.

    aioquic lets a connection send at most min(cwnd / 4, 16 packets) per
    wake-up and asks to be woken microseconds later; a reactor sleeps at
    least a millisecond (epoll's resolution), so on a fast path the pacer,
    not congestion control, capped a connection at a few thousand packets a
    second. Here the bucket holds L{PACING_BURST} of the pacing rate: paced
    at the reactor's resolution, still smooth on WAN round trips.
    """

    def update_rate(self, congestion_window, smoothed_rtt):
        super().update_rate(congestion_window, smoothed_rtt)
        if self.bucket_max < PACING_BURST:
            self.bucket_max = PACING_BURST


class QuicDriver:
    """
    Drives one aioquic L{QuicConnection} from Twisted: datagrams in, events
    out, datagrams to send, and its one timer on the injected clock.

    Subclasses implement C{_event(event)}, C{_scheduleFlush()},
    C{_sendDatagrams(datagrams)} and C{_failed()}: the relay's
    L{QuicPeerLink} and the client's L{relay.quicclient.QuicRelayClient}.
    """

    _log = Logger()

    def __init__(self, quic, clock):
        self.quic = quic
        self._clock = clock
        self._timer = None
        self._dirty = False
        self._gone = False
        internals.setPacer(quic, _ReactorPacer(max_datagram_size=internals.maxDatagramSize(quic)))
        self._pending = internals.pendingDatagrams(quic)
        # The sizes of the messages handed to aioquic and not yet sent, from
        # index _queuedHead on: a list and an index rather than a deque, which
        # holds 0.65 KiB of an idle peer.
        self._queued = []
        self._queuedHead = 0
        self._queuedBytes = 0
        self._applicationSpace = None
        # The lean data path (relay.listener.quiclean), once the connection is
        # established.
        self._lean = None

    def _isClosing(self):
        return internals.isClosing(self.quic)

    def _remoteMaxDatagramFrameSize(self):
        return internals.remoteMaxDatagramFrameSize(self.quic)

    def _packetRoom(self):
        """
        The largest payload of one DATAGRAM frame in a packet to the peer now.
        """
        quic = self.quic
        return _payloadRoom(
            internals.maxDatagramSize(quic)
            - SHORT_HEADER_SIZE
            - len(internals.peerConnectionID(quic))
            - AEAD_TAG_SIZE
        )

    def _shrinkCryptoBuffers(self):
        """
        aioquic keeps three 16 KiB TLS output buffers for a connection's
        whole life, most of an idle peer's memory. After the handshake
        neither end writes a TLS message here (the relay issues no session
        tickets, and QUIC forbids TLS KeyUpdate), so small ones do.
        """
        internals.shrinkCryptoBuffers(self.quic, POST_HANDSHAKE_CRYPTO_BUFFER)

    def _shareConnectionState(self):
        """
        Replace per-connection copies of constant state with shared ones
        (an idle peer's memory; guarded by tests/test_quic.py):
          - aioquic's table of frame handlers (33 bound methods, tuples and
            epoch sets, 5 KiB) becomes a view of one shared table;
          - every key of every epoch keeps two callbacks that only log to
            a qlog the relay never has: the library's no-op instead;
          - the discarded INITIAL and HANDSHAKE epochs' keys, packet spaces,
            CRYPTO streams and buffers become shared key-less stand-ins;
          - the queues kept for rare events (aioquic's events, a path's
            PATH_CHALLENGE and PATH_RESPONSE data) become lists: an empty
            deque holds 0.65 KiB.
        """
        internals.shareFrameHandlers(self.quic, _SHARED_FRAME_HANDLERS)
        internals.dropKeyCallbacks(self.quic)
        internals.trimDiscardedEpochs(self.quic)
        internals.shrinkIdleQueues(self.quic)

    def _dropHandshakeSecrets(self):
        """
        A server's TLS context past its handshake refuses every message
        before reading any of its state (RFC 9001 forbids TLS KeyUpdate; 1-RTT
        keys are updated by the QUIC layer from its own secrets), yet aioquic
        keeps the handshake's key schedule (a running transcript hash), the
        client's extensions, the traffic keys and its own copies of the
        configuration's lists: it keeps only what it reads in that state.
        """
        internals.dropServerHandshakeState(self.quic.tls, tls.State.SERVER_POST_HANDSHAKE)
        internals.trimServerTLS(self.quic.tls, tls.State.SERVER_POST_HANDSHAKE)

    def _receivedNothing(self):
        """
        True while no packet of this connection has decrypted.
        """
        return internals.isFirstFlight(self.quic)

    # Driving

    def receive(self, data, addr):
        try:
            self.quic.receive_datagram(data, addr, self._clock.seconds())
            self._events()
        except Exception:
            self._noisy(
                self._log.failure,
                "QUIC connection from {where}: failed handling a datagram",
                where=joinAddress(addr[0], addr[1]),
            )
            self._failed()
        self._needFlush()

    def _noisy(self, log, format, **fields):
        """
        Log a line the other end can cause at will (a relay's links put it
        under the log budget).
        """
        log(format, **fields)

    def _events(self):
        nextEvent = self.quic.next_event
        event = nextEvent()
        while event is not None:
            self._event(event)
            event = nextEvent()
        self._eventsHandled()

    def _eventsHandled(self):
        pass

    def _needFlush(self):
        if not self._dirty:
            self._dirty = True
            self._scheduleFlush()

    def queueDatagram(self, message):
        self.quic.send_datagram_frame(message)
        self._queued.append(len(message))
        self._queuedBytes += len(message)
        self._needFlush()

    def flush(self):
        """
        Send what aioquic has ready and re-arm the timer.
        """
        self._dirty = False
        if self._gone:
            return
        try:
            self._transmit()
        except Exception:
            self._log.failure("QUIC connection: failed sending")
            self._failed()
        self._armTimer()

    def _transmit(self):
        now = self._clock.seconds()
        if self._pending:
            self._ackNow(now)
        lean = self._lean
        datagrams = lean.transmit(now) if lean is not None else None
        if datagrams is None:
            datagrams = self.quic.datagrams_to_send(now)
            # aioquic issues connection ids (ConnectionIdIssued) while it
            # builds the packets that announce them, and quic-go switches to
            # a new one as soon as it arrives: route them before those
            # packets leave.
            self._events()
        if datagrams:
            self._sendDatagrams(datagrams)
        pending = self._pending
        queued = self._queued
        head = self._queuedHead
        sent = len(queued) - len(pending)
        while head < sent:
            self._queuedBytes -= queued[head]
            head += 1
        if pending and len(pending[0]) > self._packetRoom():
            # The peer's connection id grew since this message was accepted:
            # aioquic would retry it forever and hold back the rest.
            pending.popleft()
            self._queuedBytes -= queued[head]
            head += 1
            self._droppedTooLarge()
        if head == len(queued):
            queued.clear()
            head = 0
        elif head >= _QUEUED_COMPACT:
            del queued[:head]
            head = 0
        self._queuedHead = head

    def _ackNow(self, now):
        """
        Acknowledge in the packets about to leave what would otherwise be
        acknowledged later. aioquic delays an ACK by 1 ms and then sends it
        alone, a packet (and a timer wake-up) for every few received, even
        while it sends datagrams to the same peer in between.
        """
        space = self._applicationSpace
        if space is None:
            space = self._applicationSpace = internals.packetSpace(self.quic, tls.Epoch.ONE_RTT)
            if space is None:
                return
        # Only when the pacer lets a packet leave now: aioquic does not pace
        # a due ACK, and one held back would be due again at once, forever.
        if (
            space.ack_at is not None
            and space.ack_at > now
            and internals.pacer(self.quic).next_send_time(now) is None
        ):
            space.ack_at = now

    def _droppedTooLarge(self):
        pass

    def _armTimer(self):
        at = self.quic.get_timer()
        timer = self._timer
        if at is None:
            if timer is not None:
                timer.cancel()
                self._timer = None
            return
        delay = max(0.0, at - self._clock.seconds())
        if timer is None:
            self._timer = self._clock.callLater(delay, self._timerFired)
        elif at < timer.getTime():
            # The reactor moves a call sooner by scanning its whole heap;
            # cancelling is lazy and a new call is a heap push.
            timer.cancel()
            self._timer = self._clock.callLater(delay, self._timerFired)
        elif at > timer.getTime():
            timer.reset(delay)

    def _timerFired(self):
        self._timer = None
        try:
            self.quic.handle_timer(self._clock.seconds())
            self._events()
        except Exception:
            self._log.failure("QUIC connection: failed handling its timer")
            self._failed()
        self.flush()

    def _stopTimer(self):
        self._gone = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class QuicPeerLink(QuicDriver):
    """
    One client's QUIC connection, the link of its L{PeerSession}.

    @ivar session: the L{PeerSession}, from the first valid Initial packet on
        (its 10 s handshake limit covers the QUIC and TLS handshake too).
    @ivar connectionIDs: this connection's ids in the protocol's table.
    """

    transportName = "quic"

    def __init__(self, protocol, quic, addr):
        super().__init__(quic, protocol.clock)
        self._protocol = protocol
        self._relay = protocol.relay
        self.peerAddress = joinAddress(addr[0], addr[1])
        self.sourceHost = addr[0]
        self._admitted = False
        self.session = None
        self.connectionIDs = set()
        self._open = False
        self._down = False
        self._graceful = False
        self._gracefulTimer = None
        self._frameRoom = 0
        self._room = 0
        self._cidLength = None
        self._closedHere = False
        self._handshaking = False
        self._closeWaiters = []
        self._initialCID = None

    def __repr__(self):
        return f"<QuicPeerLink {self.peerAddress}>"

    def start(self):
        """
        A new client, through the same admission as a WebSocket one (UDP
        holds no descriptor per connection, so only the per-address limits
        and the pending slots apply).
        """
        relay = self._relay
        reason = relay.admission.admit(self.sourceHost)
        if reason is not None:
            relay.counters.handshakeRejects[reason] += 1
            relay.noisyLog(
                self._log.warn,
                "{where}: QUIC connection refused: {reason}",
                where=self.peerAddress,
                reason=reason,
            )
            self._close(CLOSE_ERROR, "refused")
            return
        self._admitted = True
        self._handshaking = True
        self._protocol.handshaking += 1
        relay.counters.connections[self.transportName] += 1
        self.session = PeerSession(relay, self)

    def _noisy(self, log, format, **fields):
        self._relay.noisyLog(log, format, **fields)

    def receive(self, data, addr):
        lean = self._lean
        if lean is not None:
            try:
                payloads = lean.receive(data, addr, self._clock.seconds())
                if payloads is not None:
                    if internals.hasEvents(self.quic):
                        # Delivery handlers of acknowledged packets.
                        self._events()
                    session = self.session
                    for payload in payloads:
                        if self._open:
                            session.messageReceived(payload)
            except Exception:
                self._noisy(
                    self._log.failure,
                    "QUIC connection from {where}: failed handling a datagram",
                    where=self.peerAddress,
                )
                self._failed()
                return
            if payloads is not None:
                self._needFlush()
                return
        # aioquic keeps parts of what it is given (a memoryview of the
        # listener's read buffer would change under it).
        super().receive(bytes(data), addr)

    def _handshakeEnded(self):
        if self._handshaking:
            self._handshaking = False
            self._protocol.handshaking -= 1

    # Events from aioquic

    def _event(self, event):
        kind = type(event)
        if kind is events.DatagramFrameReceived:
            if self._open:
                self.session.messageReceived(event.data)
        elif kind is events.HandshakeCompleted:
            self._handshakeCompleted()
        elif kind is events.ConnectionIdIssued:
            self._protocol.addConnectionID(event.connection_id, self)
        elif kind is events.ConnectionIdRetired:
            self._protocol.removeConnectionID(event.connection_id, self)
        elif kind is events.ConnectionTerminated:
            self._terminated(event)
        elif kind in (events.StreamDataReceived, events.StreamReset, events.StopSendingReceived):
            # The protocol has no streams. A client that opens one is not an
            # agent; closing at once frees what aioquic would buffer for it.
            self._protocol.counters["stream_refused"] += 1
            self._noisy(
                self._log.info,
                "{where}: QUIC client opened a stream; closing",
                where=self.peerAddress,
            )
            self._close(CLOSE_ERROR, "streams are not supported")

    def _eventsHandled(self):
        # A CONNECTION_CLOSE received, or a protocol error aioquic closes
        # for, raises no event until the closing period ends (three probe
        # timeouts later); the session learns it now.
        if not self._down and self._isClosing():
            self._linkDown()

    def _handshakeCompleted(self):
        self._handshakeEnded()
        remote = self._remoteMaxDatagramFrameSize()
        if not remote:
            self._protocol.counters["no_datagrams"] += 1
            self._noisy(
                self._log.info,
                "{where}: QUIC client did not enable datagrams; closing",
                where=self.peerAddress,
            )
            self._close(CLOSE_ERROR, "datagrams are required")
            return
        self._frameRoom = _payloadRoom(remote)
        self._shrinkCryptoBuffers()
        self._shareConnectionState()
        self._dropHandshakeSecrets()
        # The client now sends only to ids the relay chose; the one it made
        # up for its first Initial routes nothing more.
        if self._initialCID is not None:
            self._protocol.removeConnectionID(self._initialCID, self)
        self._open = True
        if self._protocol.lean:
            self._lean = LeanPath(self.quic)

    def _terminated(self, event):
        if not self._closedHere and (
            event.error_code != CLOSE_NORMAL or event.reason_phrase == "Idle timeout"
        ):
            # The reason phrase is the client's text, up to a datagram long.
            self._noisy(
                self._log.info,
                "{where}: QUIC connection ended: code {code:#x} {reason}",
                where=self.peerAddress,
                code=event.error_code,
                reason=quoted(event.reason_phrase, CLOSE_REASON_SHOWN),
            )
        self._forget()

    # The link interface of PeerSession

    @property
    def maxMessageSize(self):
        """
        The largest relay message one datagram to this peer carries now
        (L{relay.peer.PeerSession} splits id lists by it).
        """
        cidLength = len(internals.peerConnectionID(self.quic))
        if cidLength != self._cidLength:
            self._cidLength = cidLength
            self._room = min(self._frameRoom, self._packetRoom())
        return self._room

    def writeMessage(self, message):
        if not self._open:
            return False
        size = len(message)
        if size > self.maxMessageSize:
            self._relay.counters.dropped["too_large_for_datagram"] += 1
            return False
        if self._queuedBytes + size > self._protocol.highWater:
            self._relay.counters.dropped["slow_consumer"] += 1
            return False
        self.queueDatagram(message)
        return True

    def closeLink(self):
        self._close(CLOSE_ERROR, "closed by the relay")

    def closeGracefully(self):
        """
        Send Close, then close with code 0 once it has left (or after
        L{CLOSE_TIMEOUT} if congestion holds it back).
        """
        if self._down:
            return
        if not self._open:
            self._close(CLOSE_NORMAL, "relay shutting down")
            return
        self._open = False
        self._graceful = True
        self.queueDatagram(m.CLOSE_MESSAGE)
        self._gracefulTimer = self._clock.callLater(
            CLOSE_TIMEOUT, self._close, CLOSE_NORMAL, "relay shutting down"
        )

    def whenClosed(self):
        """
        @return: a Deferred that fires once the connection is closed.
        """
        if self._closeWaiters is None:
            return defer.succeed(None)
        d = defer.Deferred()
        self._closeWaiters.append(d)
        return d

    # Life and death

    def flush(self):
        super().flush()
        if self._graceful and not self._pending:
            self._close(CLOSE_NORMAL, "relay shutting down")

    def _droppedTooLarge(self):
        self._relay.counters.dropped["too_large_for_datagram"] += 1

    def _scheduleFlush(self):
        self._protocol.scheduleFlush(self)

    def _sendDatagrams(self, datagrams):
        self._protocol.sendDatagrams(datagrams)

    def _close(self, code, reason, frameType=None):
        """
        Close with an application error C{code}, or a transport error when
        C{frameType} is given.
        """
        self._open = False
        self._stopGraceful()
        if not self._isClosing():
            self._closedHere = True
            self.quic.close(error_code=code, frame_type=frameType, reason_phrase=reason)
            self._needFlush()
        self._linkDown()

    def _stopGraceful(self):
        self._graceful = False
        if self._gracefulTimer is not None:
            if self._gracefulTimer.active():
                self._gracefulTimer.cancel()
            self._gracefulTimer = None

    def _failed(self):
        """
        aioquic raised: send CONNECTION_CLOSE if it still can, and forget the
        connection, whose state can no longer be trusted.
        """
        try:
            self._close(
                QuicErrorCode.INTERNAL_ERROR, "internal error", frameType=QuicFrameType.PADDING
            )
            self._sendDatagrams(self.quic.datagrams_to_send(self._clock.seconds()))
        except Exception as e:
            self._noisy(
                self._log.warn,
                "QUIC connection from {where}: no CONNECTION_CLOSE sent ({error!r})",
                where=self.peerAddress,
                error=e,
            )
        self._forget()

    def _linkDown(self):
        if self._down or self.session is None:
            return
        self._handshakeEnded()
        self._down = True
        self._open = False
        self._relay.counters.connections[self.transportName] -= 1
        if self._admitted:
            self._admitted = False
            self._relay.admission.release(self.sourceHost)
        self.session.linkLost()
        waiters, self._closeWaiters = self._closeWaiters, None
        for d in waiters:
            d.callback(None)

    def _forget(self):
        self._stopTimer()
        self._stopGraceful()
        self._protocol.forget(self)
        self._linkDown()


class _RetryTokens:
    """
    Address-validation tokens for Retry packets (RFC 9000 section 8.1.2):
    the client's address, its original destination id, our Retry source id
    and the time, sealed with a per-process key.
    """

    def __init__(self, clock):
        self._clock = clock
        self._aead = AESGCM(AESGCM.generate_key(bit_length=128))

    def create(self, addr, originalCID, retryCID):
        plain = (
            _addressBytes(addr)
            + bytes([len(originalCID)])
            + originalCID
            + bytes([len(retryCID)])
            + retryCID
            + struct.pack("!d", self._clock.seconds())
        )
        nonce = os.urandom(12)
        return nonce + self._aead.encrypt(nonce, plain, None)

    def validate(self, addr, destinationCID, token):
        """
        @return: the original destination connection id.
        @raise ValueError: forged, for another address or id, or expired.
        """
        try:
            plain = self._aead.decrypt(token[:12], token[12:], None)
        except (InvalidTag, ValueError):
            raise ValueError("invalid token") from None
        address = _addressBytes(addr)
        if not plain.startswith(address):
            raise ValueError("address mismatch")
        rest = plain[len(address) :]
        originalCID = rest[1 : 1 + rest[0]]
        rest = rest[1 + rest[0] :]
        retryCID = rest[1 : 1 + rest[0]]
        (issued,) = struct.unpack("!d", rest[1 + rest[0] :])
        if retryCID != destinationCID:
            raise ValueError("connection id mismatch")
        if not 0 <= self._clock.seconds() - issued <= RETRY_TOKEN_LIFETIME:
            raise ValueError("expired")
        return originalCID


def _addressBytes(addr):
    host = addr[0].encode("ascii")
    return bytes([len(host)]) + host + struct.pack("!H", addr[1])


class QuicPeerProtocol(DatagramProtocol):
    """
    The UDP socket of the QUIC listener: demultiplexes datagrams to
    connections by destination connection id, and accepts new connections.

    @ivar links: connection id to L{QuicPeerLink}.
    @ivar counters: packets and connections refused, by reason
        (C{malformed}, C{unknown_connection}, C{version_negotiation},
        C{not_initial}, C{initial_too_small}, C{undecryptable_initial},
        C{handshake_failed}, C{retry_sent}, C{invalid_token},
        C{stream_refused}, C{no_datagrams}, C{send_failed}, C{draining}).
    @ivar handshaking: connections accepted whose QUIC handshake is not done.
    @ivar retryAbove: send Retry to new clients while at least this many
        handshakes are in flight (0: always; None: never).
    """

    _log = Logger()
    noisy = False
    # Established connections take the lean data path (relay.listener.quiclean);
    # tests turn it off to compare with aioquic's own.
    lean = True

    def __init__(
        self,
        relay,
        clock,
        configuration,
        highWater=DEFAULT_HIGH_WATER,
        retryAbove=RETRY_ABOVE_HANDSHAKES,
    ):
        self.relay = relay
        self.clock = clock
        self.configuration = configuration
        self.highWater = highWater
        self.retryAbove = retryAbove
        self.handshaking = 0
        self.links = {}
        self.counters = relay.counters.quicRefusals
        self._tokens = _RetryTokens(clock)
        self._dirty = []
        self._flushCall = None
        self._sender = None

    def startProtocol(self):
        enlargeBuffers(self.transport)
        sock = getattr(self.transport, "socket", None)
        self._sender = _SocketSender(sock) if isinstance(sock, socket.socket) else None

    def datagramReceived(self, data, addr):
        """
        @param data: the datagram, as C{bytes} or (from the listener's
            L{listenUDPIntoBuffer} port) a C{memoryview} valid only during
            this call: a short-header packet goes to its connection's lean
            receive as it is, everything else is copied first.
        """
        try:
            self._dispatch(data, addr)
        except Exception:
            self.counters["malformed"] += 1
            self.relay.noisyLog(
                self._log.failure,
                "QUIC: dropped a datagram from {where}",
                where=joinAddress(addr[0], addr[1]),
            )

    def _dispatch(self, data, addr):
        if not data:
            self.counters["malformed"] += 1
            return
        if not data[0] & 0x80:
            link = self.links.get(bytes(data[1 : 1 + CONNECTION_ID_LENGTH]))
            if link is None:
                # No stateless reset: aioquic draws its reset tokens at
                # random per connection, so a forgotten connection cannot
                # be reset; the client's idle timeout ends it.
                self.counters["unknown_connection"] += 1
            else:
                link.receive(data, addr)
            return
        data = bytes(data)
        try:
            header = pull_quic_header(Buffer(data=data), host_cid_length=CONNECTION_ID_LENGTH)
        except ValueError:
            self.counters["malformed"] += 1
            return
        if header.packet_type == QuicPacketType.VERSION_NEGOTIATION:
            self.counters["malformed"] += 1
            return
        if header.version not in self.configuration.supported_versions:
            if len(data) >= MIN_INITIAL_SIZE:
                self.counters["version_negotiation"] += 1
                self.sendDatagram(
                    encode_quic_version_negotiation(
                        source_cid=header.destination_cid,
                        destination_cid=header.source_cid,
                        supported_versions=self.configuration.supported_versions,
                    ),
                    addr,
                )
            else:
                self.counters["malformed"] += 1
            return
        link = self.links.get(header.destination_cid)
        if link is not None:
            link.receive(data, addr)
            return
        if header.packet_type != QuicPacketType.INITIAL:
            self.counters["not_initial"] += 1
            return
        if len(data) < MIN_INITIAL_SIZE:
            self.counters["initial_too_small"] += 1
            return
        self._accept(header, data, addr)

    def _accept(self, header, data, addr):
        if self.relay.draining:
            # Shutting down: the WebSocket listener is closed already; the
            # UDP port stays open only to close existing connections.
            self.counters["draining"] += 1
            return
        originalCID = header.destination_cid
        retryCID = None
        if header.token:
            # Only Retry tokens exist here (no NEW_TOKEN is ever sent); one
            # that fails is forged, replayed from elsewhere or stale.
            try:
                originalCID = self._tokens.validate(addr, header.destination_cid, header.token)
            except ValueError:
                self.counters["invalid_token"] += 1
                return
            retryCID = header.destination_cid
        elif self.retryAbove is not None and self.handshaking >= self.retryAbove:
            retryCID = os.urandom(CONNECTION_ID_LENGTH)
            self.counters["retry_sent"] += 1
            self.sendDatagram(
                encode_quic_retry(
                    version=header.version,
                    source_cid=retryCID,
                    destination_cid=header.source_cid,
                    original_destination_cid=header.destination_cid,
                    retry_token=self._tokens.create(addr, header.destination_cid, retryCID),
                ),
                addr,
            )
            return
        quic = QuicConnection(
            configuration=self.configuration,
            original_destination_connection_id=originalCID,
            retry_source_connection_id=retryCID,
        )
        link = QuicPeerLink(self, quic, addr)
        link.receive(data, addr)
        if link._gone or link._receivedNothing():
            # Looked like an Initial, did not decrypt: garbage, or a packet
            # for a connection this process forgot. Keep no state for it.
            self.counters["undecryptable_initial"] += 1
            link._forget()
            return
        self.addConnectionID(header.destination_cid, link)
        self.addConnectionID(quic.host_cid, link)
        link._initialCID = header.destination_cid
        if link._isClosing():
            # Refused in its first flight (no common ALPN, bad TLS): the
            # connection stays only to repeat its CONNECTION_CLOSE.
            self.counters["handshake_failed"] += 1
            return
        link.start()

    # For the links

    def addConnectionID(self, cid, link):
        self.links[cid] = link
        link.connectionIDs.add(cid)

    def removeConnectionID(self, cid, link):
        if self.links.get(cid) is link:
            del self.links[cid]
        link.connectionIDs.discard(cid)

    def forget(self, link):
        for cid in link.connectionIDs:
            if self.links.get(cid) is link:
                del self.links[cid]
        link.connectionIDs.clear()

    def scheduleFlush(self, link):
        self._dirty.append(link)
        if self._flushCall is None:
            self._flushCall = self.clock.callLater(0, self.flush)

    def flush(self):
        self._flushCall = None
        dirty, self._dirty = self._dirty, []
        for link in dirty:
            try:
                link.flush()
            except Exception:
                self._log.failure("QUIC: failed flushing {link}", link=link)
                link._failed()

    def sendDatagram(self, data, addr):
        if not writeDatagram(self.transport, data, addr):
            self.counters["send_failed"] += 1

    def sendDatagrams(self, datagrams):
        """
        Send one connection's packets, several per system call where the
        socket allows.
        """
        if self._sender is not None:
            failed = self._sender.send(datagrams)
            if failed:
                self.counters["send_failed"] += failed
            return
        for data, addr in datagrams:
            self.sendDatagram(data, addr)

    def closeAll(self):
        """
        Close every connection now (code 0) and send the CONNECTION_CLOSE
        frames; forget them all.
        """
        for link in set(self.links.values()):
            try:
                link._close(CLOSE_NORMAL, "relay shutting down")
                link.flush()
            except Exception:
                self._log.failure("QUIC: failed closing {link}", link=link)
            link._forget()
        if self._flushCall is not None and self._flushCall.active():
            self._flushCall.cancel()
        self._flushCall = None
        self._dirty = []


class QuicService(service.Service):
    """
    The QUIC listener of the peer port (UDP, same host and port as the
    WebSocket listener), for a L{relay.relay.Relay}.

    Stop it after L{relay.relay.Relay.shutdown}, so QUIC peers receive their
    Close message first; stopping closes whatever is left and frees the port.

    @ivar protocol: the L{QuicPeerProtocol}.
    @ivar port: the listening UDP port while running.
    """

    _log = Logger()

    def __init__(
        self,
        relay,
        reactor,
        host,
        port,
        certFile,
        keyFile,
        highWater=DEFAULT_HIGH_WATER,
        retryAbove=RETRY_ABOVE_HANDSHAKES,
    ):
        self.relay = relay
        self.reactor = reactor
        self.host = host
        self.portNumber = port
        self.certFile = certFile
        self.keyFile = keyFile
        self.protocol = QuicPeerProtocol(
            relay,
            reactor,
            serverConfiguration(certFile, keyFile),
            highWater=highWater,
            retryAbove=retryAbove,
        )
        self.port = None

    def privilegedStartService(self):
        self._listen()
        super().privilegedStartService()

    def startService(self):
        if self.port is None:
            self._listen()
        super().startService()

    def _listen(self):
        """
        @raise twisted.internet.error.CannotListenError: the UDP port is taken.
        """
        self.port = listenUDPIntoBuffer(
            self.reactor,
            self.portNumber,
            self.protocol,
            interface=self.host,
            maxPacketSize=MAX_READ_SIZE,
        )
        address = self.port.getHost()
        self._log.info(
            "QUIC listening on udp {address}", address=joinAddress(address.host, address.port)
        )

    def stopService(self):
        super().stopService()
        self.protocol.closeAll()
        port, self.port = self.port, None
        if port is None:
            return defer.succeed(None)
        return defer.maybeDeferred(port.stopListening)

    def reloadCertificate(self, certFile=None, keyFile=None):
        """
        Serve new connections with the certificate now in the files (or in
        new ones); existing connections keep theirs.

        @raise ConfigurationError: the files are not usable; the old
            certificate stays in use.
        """
        certFile = certFile or self.certFile
        keyFile = keyFile or self.keyFile
        self.protocol.configuration = serverConfiguration(certFile, keyFile)
        self.certFile, self.keyFile = certFile, keyFile
