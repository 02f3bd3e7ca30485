"""
The inter-pod TCP streams: one long-lived stream per pod pair (ADR-0014).

A L{ClusterStreams} owns every stream of this pod, keyed by the remote pod's
announced address (C{host:port} of its inter-pod listener): the dialer's HELLO
tells the acceptor that address, since the connection's ephemeral source port
cannot be dialed back. L{ClusterStream} is the Twisted protocol of one stream;
it parses frames, answers PING, and hands the frames the fabric cares about
(WHO_HAS, I_HAVE, PEER_GONE, FWD) to a handler (the forwarder).

Rules kept here (PROTOCOL.md 3): the dialer sends HELLO first; the acceptor
drops a stream whose first frame is not a valid HELLO or that sends none within
10 s, counting the reason; unknown frame types are ignored; a known type with a
malformed payload closes the stream.

Trust (beyond the Go original, whose HELLO can be replayed from anywhere for
five minutes and whose later frames anyone on the path can forge):
  - A HELLO must come from the host it announces: the TCP peer's address is
    the announced one (dialers bind their source to their announced address).
  - With a cluster secret, both ends prove they hold it on this connection:
    the dialer follows its HELLO with CHALLENGE (a fresh nonce), the acceptor
    answers AUTH (its own nonce and a MAC over both nonces and the HELLO),
    the dialer CONFIRM (its MAC). Only then is the stream live, and every
    later frame carries a tag under a key of that handshake and a sequence
    number (L{frames.Sealer}), so frames cannot be forged, replayed,
    reordered or dropped unnoticed.
  - Compatibility mode (for migrating from Go pods): a peer that answers
    with anything but the handshake, or nothing within C{upgradeWait}, is
    taken as an original pod: its signed HELLO is accepted once (a replayed
    one is refused) and its frames are not authenticated.
  - A new stream replaces a live one to the same pod only with as much proof:
    a stream without a fresh handshake (compatibility mode) never replaces
    another; a secured one replaces an unsecured one.

Beyond the Go original, also:
  - Two pods dialing each other at once keep the same one stream: the one
    dialed by the lower announce address (both pods compare the same two
    strings). A second stream dialed from the same side as the live one is
    closed, as in Go.
  - PING/PONG keepalive: a stream whose remote has answered a PING before and
    then misses a PONG deadline is closed; a remote that never answered (an
    original pod ignores PING) is never closed for it.
  - Writes are bounded: the stream is a streaming producer of its TCP
    transport; while the transport is paused, frames wait in a queue, and a
    FWD that would take that queue over the high-water mark is dropped.
"""

import hmac
import ipaddress
import os
import socket
from collections import OrderedDict, deque
from dataclasses import dataclass

from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from relay.addresses import splitAddress
from relay.cluster import frames
from relay.limits import LogBudget
from relay.logtext import quoted

HELLO_TIMEOUT = 10.0
DIAL_TIMEOUT = 5.0
PING_INTERVAL = 15.0
PONG_TIMEOUT = 10.0
HIGH_WATER = 4 * 1024 * 1024
CLOSE_TIMEOUT = 3.0
# How long a pod in compatibility mode waits for the other side's handshake
# before taking it for an original pod (ours answers within one round trip).
UPGRADE_WAIT = 2.0
MAX_PENDING = 64
MAX_PENDING_PER_HOST = 4
MAX_CONNECTIONS = 512
REPLAY_MEMORY = 4096
# Kernel keepalive of inter-pod sockets: a vanished host is noticed within
# about a minute instead of the default two hours.
KEEPALIVE_IDLE = 30
KEEPALIVE_INTERVAL = 10
KEEPALIVE_COUNT = 3

# Handshake states of a stream (None once live).
AWAIT_HELLO = "hello"
AWAIT_CHALLENGE = "challenge"
AWAIT_CONFIRM = "confirm"
AWAIT_AUTH = "auth"

# Results of ClusterStream.send.
SENT = "sent"
SLOW = "slow"
GONE = "gone"

_log = Logger()


class IStreamHandler(Interface):
    """
    What L{ClusterStreams} tells the layer above it (the forwarder).
    """

    def streamUp(stream):
        """
        C{stream} became the live stream to C{stream.address}.
        """

    def streamDown(stream):
        """
        The live stream C{stream} ended.
        """

    def frameReceived(stream, frame):
        """
        A decoded L{frames.WhoHas}, L{frames.IHave}, L{frames.PeerGone} or
        L{frames.Fwd} arrived on a live stream.
        """


def ipOf(host):
    """
    The L{ipaddress} object of an IP literal (an IPv4-mapped IPv6 address as
    its IPv4 address), or None for anything else.
    """
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    mapped = getattr(ip, "ipv4_mapped", None)
    return mapped if mapped is not None else ip


def tcpEndpoint(reactor, address, bindHost=None):
    """
    A client endpoint for C{host:port}: plain TCP for IP literals, a
    L{HostnameEndpoint} for names.

    The dial deadline is not the endpoint's: L{ClusterStreams} bounds the
    whole dial (name resolution included) with its C{dialTimeout}.

    @param bindHost: the source address to dial from (this pod's announced
        IP, which the remote checks), used when of the same family.
    """
    host, port = splitAddress(address)
    ip = ipOf(host)
    bindIP = ipOf(bindHost) if bindHost else None
    if ip is None:
        return HostnameEndpoint(
            reactor, host, port, bindAddress=(bindHost, 0) if bindIP is not None else None
        )
    bindAddress = (bindHost, 0) if bindIP is not None and bindIP.version == ip.version else None
    if ip.version == 6:
        return TCP6ClientEndpoint(reactor, host, port, bindAddress=bindAddress)
    return TCP4ClientEndpoint(reactor, host, port, bindAddress=bindAddress)


def _shortenKeepalive(transport):
    """
    Tune the kernel keepalive of a real TCP socket (Linux option names; other
    systems keep their defaults): an original pod answers no PING, so for its
    streams the kernel is the only one to notice a vanished host.
    """
    getHandle = getattr(transport, "getHandle", None)
    if getHandle is None:
        return
    try:
        sock = getHandle()
        for name, value in (
            ("TCP_KEEPIDLE", KEEPALIVE_IDLE),
            ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL),
            ("TCP_KEEPCNT", KEEPALIVE_COUNT),
        ):
            option = getattr(socket, name, None)
            if option is not None:
                sock.setsockopt(socket.IPPROTO_TCP, option, value)
    except (OSError, AttributeError, TypeError):
        pass


@implementer(IPushProducer)
class ClusterStream(Protocol):
    """
    One inter-pod TCP stream.

    @ivar address: the remote pod's announced address (the registry key);
        known at once for a stream we dialed, after HELLO for an accepted one.
    @ivar dialedByUs: whether this pod dialed the stream.
    @ivar established: whether the stream may carry fabric frames (its
        handshake is over).
    @ivar secured: whether the stream passed the secured handshake (its
        frames are sealed).
    @ivar answersPing: whether the remote has answered a PING (a secured
        remote is one of ours and answers from the start).
    """

    def __init__(self, owner, dialedAddress=None):
        self.owner = owner
        self.address = dialedAddress
        self.dialedByUs = dialedAddress is not None
        self.established = False
        self.secured = False
        self.answersPing = False
        self._state = None
        self._hello = None
        self._nonce = None
        self._handshake = None
        self._sealer = None
        self._opener = None
        self.closing = False
        self.connected = False
        self._reader = frames.FrameReader()
        self._queue = deque()
        self._queued = 0
        self._paused = False
        self._helloTimer = None
        self._pinger = None
        self._pongTimer = None
        self._whenClosed = []

    def __repr__(self):
        side = "dialed" if self.dialedByUs else "accepted"
        return f"<ClusterStream {side} {self.address or self._peerName()}>"

    def _peerName(self):
        try:
            peer = self.transport.getPeer()
            return f"{peer.host}:{peer.port}"
        except Exception:
            return "?"

    # Connection life

    def connectionMade(self):
        self.connected = True
        self.owner._connections.add(self)
        # Relayed WireGuard packets are small and latency-bound (Go's
        # net.Conn has no Nagle either); keepalive finds dead peers that
        # never answer PING.
        for option in ("setTcpNoDelay", "setTcpKeepAlive"):
            setter = getattr(self.transport, option, None)
            if setter is not None:
                setter(True)
        _shortenKeepalive(self.transport)
        self.transport.registerProducer(self, True)
        owner = self.owner
        if self.dialedByUs:
            hello = frames.encodeHello(
                owner.announceAddress, int(owner.wallClock.seconds()), owner.secret
            )
            self.send(frames.encodeFrame(frames.HELLO, hello))
            if not owner.secret:
                self._establish()
                return
            self._hello = hello
            self._nonce = os.urandom(frames.NONCE_SIZE)
            self.send(frames.challengeFrame(self._nonce))
            self._state = AWAIT_AUTH
            wait = owner.settings.upgradeWait if owner.compat else owner.settings.helloTimeout
        else:
            self._state = AWAIT_HELLO
            wait = owner.settings.helloTimeout
        self._helloTimer = owner.clock.callLater(wait, self._helloTimedOut)

    def connectionLost(self, reason):
        self.connected = False
        self.closing = True
        self._dropQueue()
        self._helloCancelTimer()
        if self._pongTimer is not None and self._pongTimer.active():
            self._pongTimer.cancel()
        self._pongTimer = None
        if self._pinger is not None and self._pinger.running:
            self._pinger.stop()
        self._pinger = None
        self.owner._pending.pop(self, None)
        self.owner._connectionEnded(self)
        waiters, self._whenClosed = self._whenClosed, []
        for d in waiters:
            d.callback(None)

    def whenClosed(self):
        """
        @return: a L{Deferred} firing when the connection is gone.
        """
        if not self.connected:
            return defer.succeed(None)
        d = defer.Deferred()
        self._whenClosed.append(d)
        return d

    def close(self):
        """
        End the stream, dropping whatever is still queued.
        """
        if self.closing or not self.connected:
            return
        self.closing = True
        self._dropQueue()
        self.transport.unregisterProducer()
        self.transport.loseConnection()

    def abort(self):
        """
        End the stream at once (the remote is not reading or not answering).
        """
        self.closing = True
        self._dropQueue()
        if self.connected:
            self.transport.abortConnection()

    def _establish(self):
        self._state = None
        self._helloCancelTimer()
        self.established = True
        self.owner._pending.pop(self, None)
        if not self.owner._register(self):
            return
        self._pinger = LoopingCall(self._ping)
        self._pinger.clock = self.owner.clock
        self._pinger.start(self.owner.settings.pingInterval, now=False).addErrback(
            lambda failure: _log.failure(
                "cluster: keepalive of {stream} stopped", failure, stream=self
            )
        )

    # Handshake

    def _helloTimedOut(self):
        self._helloTimer = None
        if self.owner.compat and self._state in (AWAIT_CHALLENGE, AWAIT_AUTH):
            self._notSecured(None, None)
            return
        self._rejectHello(
            frames.TIMEOUT,
            f"handshake not done within {self.owner.settings.helloTimeout:g} s ({self._state})",
        )

    def _rejectHello(self, reason, detail):
        self._helloCancelTimer()
        self.owner.counters.helloRejects[reason] += 1
        self.owner.noisyLog(
            _log.warn,
            "cluster: rejecting inter-pod stream {side} {peer}: {reason} ({detail})",
            side="to" if self.dialedByUs else "from",
            peer=self._peerName(),
            reason=reason,
            detail=quoted(detail),
        )
        self.close()

    def _helloCancelTimer(self):
        if self._helloTimer is not None and self._helloTimer.active():
            self._helloTimer.cancel()
        self._helloTimer = None

    def _restartTimer(self, seconds):
        self._helloCancelTimer()
        self._helloTimer = self.owner.clock.callLater(seconds, self._helloTimedOut)

    def _handshakeFrame(self, frameType, payload):
        state = self._state
        if state == AWAIT_HELLO:
            self._acceptHello(frameType, payload)
        elif state == AWAIT_CHALLENGE and frameType == frames.CHALLENGE:
            self._challengeReceived(payload)
        elif (state, frameType) in ((AWAIT_AUTH, frames.AUTH), (AWAIT_CONFIRM, frames.CONFIRM)):
            self._proofReceived(frameType, payload)
        else:
            self._notSecured(frameType, payload)

    def _acceptHello(self, frameType, payload):
        if frameType != frames.HELLO:
            self._rejectHello(
                frames.FIRST_FRAME_NOT_HELLO, f"first frame was {frames.frameName(frameType)}"
            )
            return
        owner = self.owner
        try:
            hello = frames.decodeHello(payload, owner.secret, owner.wallClock.seconds())
        except frames.FrameError as e:
            self._rejectHello(e.reason, e.detail)
            return
        if not self._fromAnnouncedHost(hello.address):
            self._rejectHello(frames.ADDRESS_MISMATCH, f"HELLO announces {hello.address!r}")
            return
        self.address = hello.address
        _log.debug(
            "cluster: HELLO from {peer} announcing {address}",
            peer=self._peerName(),
            address=hello.address,
        )
        if not owner.secret:
            self._establish()
            return
        self._hello = bytes(payload)
        self._state = AWAIT_CHALLENGE
        if owner.compat:
            self._restartTimer(owner.settings.upgradeWait)

    def _fromAnnouncedHost(self, address):
        """
        Whether the TCP peer is the host C{address} names (both IP literals).
        """
        try:
            host, _ = splitAddress(address)
            peer = self.transport.getPeer().host
        except (ValueError, AttributeError):
            return False
        announced = ipOf(host)
        return announced is not None and announced == ipOf(peer)

    def _challengeReceived(self, payload):
        try:
            dialerNonce = frames.decodeChallenge(payload)
        except frames.FrameError as e:
            self._rejectHello(e.reason, e.detail)
            return
        nonce = os.urandom(frames.NONCE_SIZE)
        self._handshake = frames.Handshake(self.owner.secret, self._hello, dialerNonce, nonce)
        self.send(frames.authFrame(nonce, self._handshake.acceptorMAC))
        self._state = AWAIT_CONFIRM
        self._restartTimer(self.owner.settings.helloTimeout)

    def _proofReceived(self, frameType, payload):
        """
        The remote's proof that it holds the cluster secret: AUTH at the
        dialer (the acceptor's nonce and MAC), CONFIRM at the acceptor (the
        dialer's MAC). Each side checks the other's MAC over the same
        exchange and seals with its own key; the dialer, which learns the
        acceptor's nonce only now, proves itself in turn with CONFIRM.
        """
        dialer = self.dialedByUs
        try:
            if dialer:
                nonce, mac = frames.decodeAuth(payload)
                self._handshake = frames.Handshake(
                    self.owner.secret, self._hello, self._nonce, nonce
                )
            else:
                mac = frames.decodeConfirm(payload)
        except frames.FrameError as e:
            self._rejectHello(e.reason, e.detail)
            return
        side = self._handshake.side(dialer)
        if not hmac.compare_digest(mac, side.remoteMAC):
            self._rejectHello(
                frames.AUTH_MISMATCH,
                f"{frames.frameName(frameType)} does not prove the cluster secret",
            )
            return
        if dialer:
            self.send(frames.confirmFrame(side.ownMAC))
        self._secure(side.sendKey, side.receiveKey)

    def _secure(self, send, receive):
        self._hello = self._nonce = self._handshake = None
        self._sealer = frames.Sealer(send)
        self._opener = frames.Opener(receive)
        self.secured = True
        self.answersPing = True
        self._establish()

    def _notSecured(self, frameType, payload):
        """
        The remote skipped the secured handshake (C{frameType} is what it
        sent instead, None if nothing came in time): an original pod, taken
        only in compatibility mode, and its HELLO only once.
        """
        expected = {AWAIT_CHALLENGE: "CHALLENGE", AWAIT_CONFIRM: "CONFIRM", AWAIT_AUTH: "AUTH"}[
            self._state
        ]
        got = "nothing" if frameType is None else frames.frameName(frameType)
        owner = self.owner
        if not owner.compat:
            self._rejectHello(
                frames.NOT_SECURED,
                f"{got} instead of {expected}; an original pod needs --cluster-compat",
            )
            return
        if not self.dialedByUs and not owner._firstSight(self._hello):
            self._rejectHello(frames.REPLAYED, "this HELLO was already used")
            return
        _log.info(
            "cluster: {stream} is not secured (an original pod?): {got} instead of {expected}",
            stream=self,
            got=got,
            expected=expected,
        )
        self._hello = self._nonce = self._handshake = None
        self._establish()
        if frameType is not None and not self.closing:
            self._frameReceived(frameType, payload)

    # Reading

    def dataReceived(self, data):
        for frameType, payload in self._reader.feed(data):
            if self.closing:
                return
            if self._state is not None:
                self._handshakeFrame(frameType, payload)
                continue
            self._frameReceived(frameType, payload)
        if self._state == AWAIT_HELLO and not self.closing:
            self._checkHelloHeader()

    def _checkHelloHeader(self):
        """
        Refuse a stranger's first frame from its header alone, rather than
        buffer up to 64 KiB of something that cannot be a HELLO.
        """
        header = self._reader.nextHeader()
        if header is None:
            return
        frameType, length = header
        if frameType != frames.HELLO:
            self._acceptHello(frameType, b"")
        elif length > frames.HELLO_MAX_PAYLOAD:
            self._rejectHello(frames.MALFORMED, f"HELLO of {length} bytes")

    def _frameReceived(self, frameType, payload):
        if self._opener is not None:
            try:
                payload = self._opener.open(frameType, payload)
            except frames.FrameError as e:
                self.owner.counters.dropped["frame_auth_mismatch"] += 1
                self.owner.noisyLog(
                    _log.warn,
                    "cluster: closing {stream}: {error}",
                    stream=self,
                    error=quoted(str(e)),
                )
                self.abort()
                return
        if frameType == frames.HELLO:
            _log.debug("cluster: ignoring a repeated HELLO on {stream}", stream=self)
            return
        try:
            frame = frames.decodePayload(frameType, payload)
        except frames.FrameError as e:
            self.owner.counters.dropped["malformed_frame"] += 1
            self.owner.noisyLog(
                _log.warn, "cluster: closing {stream}: {error}", stream=self, error=quoted(str(e))
            )
            self.abort()
            return
        if isinstance(frame, frames.Unknown):
            return
        if isinstance(frame, frames.Ping):
            self.send(frames.pongFrame())
            return
        if isinstance(frame, frames.Pong):
            self._pongReceived()
            return
        handler = self.owner.handler
        if handler is None:
            return
        try:
            handler.frameReceived(self, frame)
        except Exception:
            _log.failure(
                "cluster: handling {name} from {stream}",
                name=frames.frameName(frameType),
                stream=self,
            )

    # Keepalive

    def _ping(self):
        if self._pongTimer is not None or self.closing:
            return
        if self.send(frames.pingFrame()) != SENT:
            return
        self.owner.counters.pingsSent += 1
        self._pongTimer = self.owner.clock.callLater(
            self.owner.settings.pongTimeout, self._pongMissed
        )

    def _pongReceived(self):
        self.answersPing = True
        if self._pongTimer is not None:
            self._pongTimer.cancel()
            self._pongTimer = None

    def _pongMissed(self):
        self._pongTimer = None
        self.owner.counters.pingsLost += 1
        if self.answersPing:
            _log.warn(
                "cluster: closing {stream}: no PONG within {timeout:g} s",
                stream=self,
                timeout=self.owner.settings.pongTimeout,
            )
            self.abort()

    # Writing

    def send(self, data, droppable=False):
        """
        Write one encoded frame.

        @param droppable: whether the frame may be dropped when the stream
            is slow (FWD); control frames always queue, and a stream whose
            queue reaches twice the high-water mark is aborted as stuck.
        @return: L{SENT}, L{SLOW} (dropped, counted) or L{GONE}.
        """
        if self.closing or not self.connected:
            return GONE
        if not self._paused and not self._queue:
            if self._sealer is not None:
                data = self._sealer.seal(data)
            self.transport.write(data)
            return SENT
        size = len(data)
        highWater = self.owner.settings.highWater
        if droppable and self._queued + size > highWater:
            self.owner.counters.dropped["slow_stream"] += 1
            return SLOW
        if self._sealer is not None:
            data = self._sealer.seal(data)
            size = len(data)
        if self._queued + size > 2 * highWater:
            self.owner.counters.dropped["stream_overflow"] += 1
            _log.warn(
                "cluster: closing {stream}: it has not drained {size} queued bytes",
                stream=self,
                size=self._queued,
            )
            self.abort()
            return GONE
        self._queue.append(data)
        self._queued += size
        return SENT

    def _dropQueue(self):
        self._queue.clear()
        self._queued = 0

    # IPushProducer, driven by our own TCP transport's write buffer

    def pauseProducing(self):
        self._paused = True

    def resumeProducing(self):
        self._paused = False
        queue = self._queue
        while queue and not self._paused and self.connected:
            data = queue.popleft()
            self._queued -= len(data)
            self.transport.write(data)

    def stopProducing(self):
        self._dropQueue()


class _AcceptingFactory(Factory):
    """
    Builds accepted streams within L{ClusterStreams}' caps: a host with
    C{maxPendingPerHost} connections in handshake, or C{maxConnections}
    connections in all, is refused (Twisted closes the connection at once);
    when C{maxPending} handshakes are under way the oldest is dropped for the
    new one, so idle strangers cannot keep a pod's reconnection out: a real
    handshake takes one round trip.
    """

    noisy = False

    def __init__(self, owner):
        self.owner = owner

    def buildProtocol(self, addr):
        owner = self.owner
        host = getattr(addr, "host", None)
        pending = owner._pending
        if (
            len(owner._connections) >= owner.settings.maxConnections
            or sum(1 for h in pending.values() if h == host) >= owner.settings.maxPendingPerHost
        ):
            owner.counters.helloRejects[frames.CONNECTION_LIMIT] += 1
            self._logCap(host)
            return None
        if len(pending) >= owner.settings.maxPending:
            oldest = next(iter(pending))
            pending.pop(oldest)
            owner.counters.helloRejects[frames.EVICTED] += 1
            self._logCap(host)
            oldest.abort()
        stream = ClusterStream(owner)
        pending[stream] = host
        return stream

    def _logCap(self, host):
        owner = self.owner
        now = owner.clock.seconds()
        if now >= owner._capLoggedAt + 10:
            owner._capLoggedAt = now
            _log.warn(
                "cluster: inter-pod connections at their caps (from {peer}, among others): "
                "{pending} handshakes pending, {connections} connections",
                peer=host or "?",
                pending=len(owner._pending),
                connections=len(owner._connections),
            )


class _DialingFactory(Factory):
    """
    Builds the one stream of one dial (L{connectProtocol} without the
    start/stop log lines every re-dial would print).
    """

    noisy = False

    def __init__(self, stream):
        self.stream = stream

    def buildProtocol(self, addr):
        return self.stream


@dataclass(frozen=True)
class FabricSettings:
    """
    The timings and caps of one pod's inter-pod streams. The defaults are
    the production values; tests shorten or lower them.

    @ivar helloTimeout: seconds an accepted stream has to complete its
        handshake.
    @ivar dialTimeout: seconds a dial may take, name resolution included.
    @ivar pingInterval: seconds between PINGs on a live stream;
        C{pongTimeout}: seconds its PONG may take.
    @ivar highWater: bytes queued on a paused stream beyond which a FWD is
        dropped.
    @ivar upgradeWait: in compatibility mode, seconds to wait for the other
        side's secured handshake before taking it for an original pod.
    @ivar maxPending: most accepted connections still in their handshake
        (the oldest makes room for a new one); C{maxPendingPerHost}: most of
        those from one address; C{maxConnections}: most connections in all.
    """

    helloTimeout: float = HELLO_TIMEOUT
    dialTimeout: float = DIAL_TIMEOUT
    pingInterval: float = PING_INTERVAL
    pongTimeout: float = PONG_TIMEOUT
    highWater: int = HIGH_WATER
    upgradeWait: float = UPGRADE_WAIT
    maxPending: int = MAX_PENDING
    maxPendingPerHost: int = MAX_PENDING_PER_HOST
    maxConnections: int = MAX_CONNECTIONS


class ClusterStreams:
    """
    Every inter-pod stream of this pod, keyed by announced address.

    @ivar handler: the L{IStreamHandler} told about streams and frames (set
        after construction: the forwarder needs the streams first).
    @ivar settings: the L{FabricSettings}.
    """

    def __init__(
        self,
        announceAddress,
        secret,
        clock,
        counters,
        endpointFactory,
        *,
        handler=None,
        settings=FabricSettings(),
        compat=False,
        wallClock=None,
        noisyLog=None,
    ):
        """
        @param announceAddress: C{host:port} this pod sends in its HELLO.
        @param secret: the cluster secret as given (str or bytes), may be
            empty (unsigned HELLO, no secured handshake: no protection).
        @param compat: whether to take pods that skip the secured handshake
            (original pods) at the original's level of trust.
        @param settings: the L{FabricSettings} (timings and caps).
        @param clock: the L{IReactorTime} timers run on.
        @param wallClock: whose C{seconds()} is unix time, for HELLO
            timestamps and their replay memory (L{relay.clocks}); C{clock}
            by default.
        @param counters: a L{relay.counters.ClusterCounters}.
        @param noisyLog: the L{LogBudget} for lines anyone who reaches the
            fabric port can cause (refused handshakes, malformed or forged
            frames); one of its own on C{clock} by default.
        @param endpointFactory: called with C{host:port}, returns an
            L{IStreamClientEndpoint} to dial it.
        """
        self.announceAddress = announceAddress
        self.secret = secret
        self.clock = clock
        self.wallClock = clock if wallClock is None else wallClock
        self.counters = counters
        self.endpointFactory = endpointFactory
        self.handler = handler
        self.settings = settings
        self.compat = compat
        self.noisyLog = LogBudget(clock) if noisyLog is None else noisyLog
        self._streams = {}
        self._connections = set()
        self._pending = {}
        self._capLoggedAt = float("-inf")
        self._seenHellos = OrderedDict()
        self._dialing = {}
        self._attempts = {}
        self._stopped = False

    def serverFactory(self):
        """
        @return: the L{Factory} to listen with.
        """
        return _AcceptingFactory(self)

    # Lookups

    def stream(self, address):
        """
        @return: the live stream to C{address}, or None.
        """
        stream = self._streams.get(address)
        if stream is None or stream.closing:
            return None
        return stream

    def liveStreams(self):
        return [s for s in self._streams.values() if not s.closing]

    def streamCount(self):
        return len(self.liveStreams())

    def isDialing(self, address):
        return address in self._dialing

    # Dialing

    def dial(self, address):
        """
        Open a stream to C{address} unless one is live or being dialed.

        @return: a L{Deferred} firing with the L{ClusterStream} once connected
            (HELLO sent), or failing if the dial fails or times out.
        """
        live = self.stream(address)
        if live is not None:
            return defer.succeed(live)
        if self._stopped:
            return defer.fail(RuntimeError("cluster streams stopped"))
        d = defer.Deferred()
        waiters = self._dialing.get(address)
        if waiters is not None:
            waiters.append(d)
        else:
            self._dialing[address] = [d]
            self._startDial(address)
        return d

    def _startDial(self, address):
        stream = ClusterStream(self, dialedAddress=address)
        try:
            connecting = self.endpointFactory(address).connect(_DialingFactory(stream))
        except Exception as e:
            connecting = defer.fail(e)
        self._attempts[address] = connecting
        connecting.addTimeout(self.settings.dialTimeout, self.clock)
        connecting.addBoth(self._dialFinished, address)

    def _dialFinished(self, result, address):
        self._attempts.pop(address, None)
        for d in self._dialing.pop(address, []):
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)

    # Replay memory

    def _firstSight(self, hello):
        """
        Remember a signed HELLO (payload) accepted without the secured
        handshake.

        @return: False if the same HELLO was accepted before within its
            validity window (a replay).
        """
        now = self.wallClock.seconds()
        seen = self._seenHellos
        while seen and (len(seen) >= REPLAY_MEMORY or next(iter(seen.values())) < now):
            seen.popitem(last=False)
        mac = bytes(hello[-frames.HELLO_HMAC_SIZE :])
        if mac in seen:
            return False
        seen[mac] = now + 2 * frames.HELLO_WINDOW
        return True

    # Registry

    def _proof(self, stream):
        """
        How much a stream proves about its remote: 2 for the secured
        handshake, 1 for a signed HELLO alone, 0 without a secret.
        """
        if stream.secured:
            return 2
        return 1 if self.secret else 0

    def _preferred(self, existing, new):
        """
        Which of two streams to the same pod to keep: the better proven;
        between equally proven ones (secured, or both unsigned) whoever
        dialed, one stream per pod pair, chosen the same way on both pods.
        A signed HELLO without the handshake proves nothing fresh, so such a
        stream never replaces a live one.
        """
        existingProof, newProof = self._proof(existing), self._proof(new)
        if newProof != existingProof:
            return new if newProof > existingProof else existing
        if newProof == 1 or existing.dialedByUs == new.dialedByUs:
            return existing
        lowerIsUs = self.announceAddress < new.address
        if lowerIsUs == new.dialedByUs:
            return new
        return existing

    def _register(self, stream):
        """
        A stream finished its handshake: make it the live stream to its
        address, or close it as a duplicate.

        @return: whether C{stream} is now the live stream.
        """
        if self._stopped:
            stream.close()
            return False
        existing = self.stream(stream.address)
        if existing is not None and existing is not stream:
            keep = self._preferred(existing, stream)
            drop = stream if keep is existing else existing
            _log.info(
                "cluster: two streams to {address}: keeping {keep}, closing {drop}",
                address=stream.address,
                keep=keep,
                drop=drop,
            )
            drop.close()
            if keep is existing:
                return False
        else:
            _log.info("cluster: stream up: {stream}", stream=stream)
        self._streams[stream.address] = stream
        if self.handler is not None:
            try:
                self.handler.streamUp(stream)
            except Exception:
                _log.failure("cluster: handling stream up of {stream}, closing it", stream=stream)
                stream.close()
                return False
        return True

    def _connectionEnded(self, stream):
        self._connections.discard(stream)
        if stream.address is not None and self._streams.get(stream.address) is stream:
            del self._streams[stream.address]
            _log.info("cluster: stream down: {stream}", stream=stream)
            if self.handler is not None:
                self.handler.streamDown(stream)

    # Shutdown

    def stop(self):
        """
        Cancel dials and close every stream.

        @return: a L{Deferred} firing once every connection is gone (streams
            still open after L{CLOSE_TIMEOUT} are aborted).
        """
        self._stopped = True
        for connecting in list(self._attempts.values()):
            connecting.cancel()
        connections = list(self._connections)
        waits = [c.whenClosed() for c in connections]
        for c in connections:
            c.close()
        timer = self.clock.callLater(
            CLOSE_TIMEOUT, lambda: [c.abort() for c in connections if c.connected]
        )
        done = defer.DeferredList(waits, consumeErrors=True)

        def cancelTimer(result):
            if timer.active():
                timer.cancel()
            return None

        return done.addBoth(cancelTimer)
