"""
What the relay takes from Twisted beyond its public API (see
L{relay.internals}).
"""

import socket
from operator import attrgetter

from twisted.internet import udp
from twisted.internet.posixbase import PosixReactorBase
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python import log

import twisted

VERSION = twisted.__version__


def forgetExitSignal(reactor):
    """
    Let a relay that drained after SIGTERM or SIGINT exit with status 0.

    Relies on: C{ReactorBase._exitSignal}, where the reactor keeps the
    number of the signal that stopped it (C{ReactorBase.sigTerm}), and twistd
    reading it once the reactor is done (C{ApplicationRunner.startReactor},
    then C{twistd.runApp}) to kill itself with the same signal: exit status
    143 for SIGTERM.

    Why not the public API: twistd has no option for it, and the signal
    handlers that record the number are the reactor's own (replacing them
    would lose what they also do: stopping the reactor from a signal
    safely).

    Worth: Kubernetes and systemd record a planned stop (the relay told
    every peer Close and drained) as a success instead of a failure; an
    alert on non-zero exit then means a crash.

    A reactor that never recorded a signal (tests, a stop from inside the
    process) is left alone.
    """
    if getattr(reactor, "_exitSignal", None) is not None:
        reactor._exitSignal = None


def listenUDPIntoBuffer(reactor, port, protocol, interface="", maxPacketSize=8192):
    """
    Like C{reactor.listenUDP}, but the port reads every datagram into one
    buffer it keeps (L{BufferedReadPort}) and hands the protocol's
    C{datagramReceived} a C{memoryview} of it, valid only during that call:
    the protocol copies what it keeps.

    Relies on: C{twisted.internet.udp.Port}, built and started as
    C{PosixReactorBase.listenUDP} does; L{BufferedReadPort.doRead} mirrors
    C{Port.doRead} line by line (see there).

    Why not the public API: C{Port.doRead} reads with
    C{recvfrom(maxPacketSize)}, which allocates a bytes object of
    C{maxPacketSize} (64 KiB for QUIC, whose datagrams may be that large)
    for every datagram and shrinks it to size; C{recvfrom_into} one buffer
    allocates nothing, and the QUIC lean receive decrypts straight from the
    view.

    Worth: relay CPU per QUIC message, see L{BufferedReadPort}.

    A reactor that is not a POSIX one (a test clock) gets C{listenUDP}.
    """
    if not isinstance(reactor, PosixReactorBase):
        return reactor.listenUDP(port, protocol, interface=interface, maxPacketSize=maxPacketSize)
    p = BufferedReadPort(port, protocol, interface, maxPacketSize, reactor)
    p.startListening()
    return p


class BufferedReadPort(udp.Port):
    """
    A UDP port whose C{doRead} is C{udp.Port.doRead} reading with
    C{recvfrom_into} one buffer kept for the port's life, and handing on a
    C{memoryview} of it.

    Relies on, as C{udp.Port.doRead} uses them: the port's C{socket},
    C{maxThroughput}, C{maxPacketSize}, C{addressFamily}, C{_connectedAddr}
    and C{protocol}, and the module's C{_sockErrReadIgnore} and
    C{_sockErrReadRefuse} (tests/test_internals_twisted.py checks them and
    that C{udp.Port.doRead} still reads with C{recvfrom(self.maxPacketSize)}).

    Worth: relay CPU per QUIC message, 10 pairs of 1,179-byte messages
    (C{python -m tests.bench quic --runs 3 --quic-pairs 10
    --quic-latency-pairs 1}, medians of 3): 17.4 -> 17.7 us, within the
    bench's noise; alone, a loopback read of a 1,250-byte datagram is 0.2 us
    cheaper (1.3-1.8 us with C{recvfrom(65535)}), and the lean receive
    decrypts from the view without copying the packet (1.2 KiB).
    """

    _readBuffer = None

    def doRead(self):
        buffer = self._readBuffer
        if buffer is None or len(buffer) != self.maxPacketSize:
            buffer = self._readBuffer = bytearray(self.maxPacketSize)
            self._readView = memoryview(buffer)
        view = self._readView
        receive = self.socket.recvfrom_into
        protocol = self.protocol
        inet6 = self.addressFamily == socket.AF_INET6
        read = 0
        while read < self.maxThroughput:
            try:
                size, addr = receive(buffer)
            except OSError as se:
                no = se.args[0]
                if no in udp._sockErrReadIgnore:
                    return
                if no in udp._sockErrReadRefuse:
                    if self._connectedAddr:
                        self.protocol.connectionRefused()
                    return
                raise
            read += size
            if inet6:
                # As udp.Port.doRead: (host, port) without flow and scope.
                addr = addr[:2]
            try:
                protocol.datagramReceived(view[:size], addr)
            except BaseException:
                log.err()


def writeNow(transport, data):
    """
    Write C{data} to a plain TCP transport (a C{twisted.internet.tcp.Server}),
    straight to the socket if nothing is queued ahead of it.

    Relies on: C{FileDescriptor.dataBuffer} and C{_tempDataLen}, the two
    buffers of what C{write} queued, and C{writeSomeData}, the one send
    call C{doWrite} makes (returning the bytes taken, or an exception
    instance that C{doWrite} would act on).

    Why not the public API: C{write} always waits for the next reactor turn
    (two C{epoll_ctl} calls and a wake-up per destination per read); a relay
    has nothing else to do with the message meanwhile.

    Worth: about a fifth of the relay's CPU under load. Whatever the socket
    does not take (or an error, which Twisted then finds and reports the
    usual way) goes through C{write}, so order and producer pauses stay
    Twisted's.

    C{data} may be a memoryview of a buffer that is reused: what C{write}
    keeps is a copy.
    """
    if (
        not transport.dataBuffer
        and not transport._tempDataLen
        and transport.connected
        and not transport.disconnecting
    ):
        sent = transport.writeSomeData(data)
        if isinstance(sent, int):
            if sent == len(data):
                return
            data = data[sent:]
    transport.write(bytes(data))


# Twisted's private hooks of TLSMemoryBIOProtocol and the names of ours a
# TLSProtocol subclass defines instead.
_TLS_HOOKS = (
    ("_write", "encrypt"),
    ("_flushSendBIO", "sendRecords"),
    ("_flushReceiveBIO", "receiveRecords"),
)


class TLSProtocol(TLSMemoryBIOProtocol):
    """
    Twisted's TLS protocol with the private parts L{relay.listener.ws.PeerTLSProtocol}
    uses under names of ours.

    Why not the public API: Twisted's default (C{BufferingTLSTransport})
    keeps every write until the next reactor turn and encrypts in 16 KiB
    slices, and delivers one C{dataReceived} per TLS record; the relay
    encrypts a read's batch at once and decrypts a whole read before
    delivering it. Worth: over TLS a relayed message waited a turn more than
    over plain TCP, and the TLS 1-pair round-trip p99 was 1.8 times the
    plain one (README, performance).

    A subclass provides the hooks Twisted calls under private names:
    C{encrypt(data)} for C{_write} (application data once the handshake is
    done), C{sendRecords()} for C{_flushSendBIO} (write out what the send
    BIO holds), C{receiveRecords()} for C{_flushReceiveBIO} (decrypt and
    deliver what came in). They are installed under Twisted's names when the
    subclass is made, so Twisted calls them with no call in between.
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for private, ours in _TLS_HOOKS:
            if ours in cls.__dict__:
                setattr(cls, private, cls.__dict__[ours])

    # Twisted's state, read through attrgetter: no Python frame per read
    # (a PeerTLSProtocol reads them several times per message).
    tlsConnection = property(
        attrgetter("_tlsConnection"), doc="The C{OpenSSL.SSL.Connection} (C{_tlsConnection})."
    )
    tlsLost = property(
        attrgetter("_lostTLSConnection"),
        doc="Whether TLS is over: closed, failed or aborted (C{_lostTLSConnection}).",
    )
    aborted = property(
        attrgetter("_aborted"),
        doc="Whether the connection was aborted (C{_aborted}): nothing more is delivered.",
    )
    producer = property(
        attrgetter("_producer"), doc="The producer registered, or None (C{_producer})."
    )
    handshakeDone = property(
        attrgetter("_handshakeDone"), doc="Whether the handshake is over (C{_handshakeDone})."
    )
    cleartextWaiting = property(
        attrgetter("_appSendBuffer"),
        doc="The list of writes waiting for TLS to take them (C{_appSendBuffer}).",
    )

    def bufferCleartext(self, data):
        """
        Keep C{data} until TLS can take it (C{_bufferedWrite}): what is left
        of a write when OpenSSL wants to read first.
        """
        self._bufferedWrite(data)

    def tlsEnded(self):
        """
        The peer ended TLS (close_notify): answer it and close
        (C{_shutdownTLS}, C{_tlsShutdownFinished}).
        """
        self._shutdownTLS()
        self._tlsShutdownFinished(None)

    def tlsFailed(self, reason):
        """
        TLS failed with C{reason} (a Failure): close
        (C{_tlsShutdownFinished}).
        """
        self._tlsShutdownFinished(reason)
