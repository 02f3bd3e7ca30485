"""
What the relay takes from Twisted beyond its public API (see
L{relay.internals}).
"""

import socket

from twisted.internet import udp
from twisted.internet.posixbase import PosixReactorBase
from twisted.python import log


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
