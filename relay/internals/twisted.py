"""
What the relay takes from Twisted beyond its public API (see
L{relay.internals}).
"""

from operator import attrgetter

import twisted
from twisted.protocols.tls import TLSMemoryBIOProtocol

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
    if not transport.dataBuffer and not transport._tempDataLen and transport.connected and not transport.disconnecting:
        sent = transport.writeSomeData(data)
        if isinstance(sent, int):
            if sent == len(data):
                return
            data = data[sent:]
    transport.write(bytes(data))


# Twisted's private hooks of TLSMemoryBIOProtocol and the names of ours a
# TLSProtocol subclass defines instead.
_TLS_HOOKS = (("_write", "encrypt"), ("_flushSendBIO", "sendRecords"), ("_flushReceiveBIO", "receiveRecords"))


class TLSProtocol(TLSMemoryBIOProtocol):
    """
    Twisted's TLS protocol with the private parts L{relay.peer.PeerTLSProtocol}
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
    tlsConnection = property(attrgetter("_tlsConnection"), doc="The C{OpenSSL.SSL.Connection} (C{_tlsConnection}).")
    tlsLost = property(
        attrgetter("_lostTLSConnection"), doc="Whether TLS is over: closed, failed or aborted (C{_lostTLSConnection})."
    )
    aborted = property(
        attrgetter("_aborted"), doc="Whether the connection was aborted (C{_aborted}): nothing more is delivered."
    )
    producer = property(attrgetter("_producer"), doc="The producer registered, or None (C{_producer}).")

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
