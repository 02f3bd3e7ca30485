"""
A peer's QUIC connection to a relay, as a Go agent makes it: the client side
of L{relay.listener.quic}.

C{python -m relay.probe --transport quic} checks a deployed relay with it,
and the tests and the benchmark drive the relay with it. It lives apart
from L{relay.listener.quic} so that the relay's server imports no client code; it
shares the server's sans-I/O driver (L{relay.listener.quic.QuicDriver}) and sizes,
so both ends batch, pace and bound packets the same way.
"""

import ssl
import time

from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import QuicErrorCode
from twisted.internet import defer, error
from twisted.internet.protocol import DatagramProtocol

from relay import messages as m
from relay.auth import generateToken
from relay.client import PeerClient
from relay.listener.quic import (
    AGENT_MAX_DATAGRAM_FRAME_SIZE,
    ALPN,
    CLIENT_IDLE_TIMEOUT,
    CLIENT_KEEPALIVE,
    CLOSE_ERROR,
    CLOSE_NORMAL,
    MAX_READ_SIZE,
    MAX_UDP_PAYLOAD,
    QuicDriver,
    enlargeBuffers,
    writeDatagram,
)


class QuicHandshakeFailed(Exception):
    """
    The QUIC connection ended before the relay authenticated us.

    @ivar errorCode: the CONNECTION_CLOSE error code.
    @ivar reason: its reason phrase.
    """

    def __init__(self, errorCode, reason):
        super().__init__(
            f"QUIC connection closed before AuthResponse: code {errorCode:#x} {reason!r}"
        )
        self.errorCode = errorCode
        self.reason = reason


class QuicRelayClient(PeerClient, QuicDriver, DatagramProtocol):
    """
    One peer's QUIC connection to a relay, as a Go agent makes it.

    The peer protocol comes from L{relay.client.PeerClient}, as for the
    WebSocket client; this class carries it over QUIC datagrams.

    @ivar authenticated: fires with this client after the AuthResponse, or
        fails with L{QuicHandshakeFailed}.
    @ivar closeEvent: the aioquic C{ConnectionTerminated}, once ended.
    @ivar autoAuthenticate: send Auth once the QUIC handshake completes
        (tests turn it off to play a client that never authenticates).
    """

    noisy = False
    autoAuthenticate = True

    def __init__(self, clock, serverAddress, peerID, token, configuration):
        QuicDriver.__init__(self, QuicConnection(configuration=configuration), clock)
        self.serverAddress = serverAddress
        self.peerID = peerID
        self.token = token
        self.instanceURL = None
        self.authenticated = defer.Deferred()
        self._initPeerClient()
        self.closeEvent = None
        self._keepalive = None
        self._lostWaiters = []
        self._portStopped = None
        self._flushCall = None

    def startProtocol(self):
        enlargeBuffers(self.transport)
        self.quic.connect(self.serverAddress, self._clock.seconds())
        self._needFlush()

    def datagramReceived(self, data, addr):
        self.receive(data, addr)

    def _event(self, event):
        kind = type(event)
        if kind is events.DatagramFrameReceived:
            self._message(event.data)
        elif kind is events.HandshakeCompleted:
            self._shrinkCryptoBuffers()
            if self.autoAuthenticate:
                self.queueDatagram(m.encodeAuth(self.peerID, self.token))
            self._keepalive = self._clock.callLater(CLIENT_KEEPALIVE, self._ping)
        elif kind is events.ConnectionTerminated:
            self._lost(event)

    def _message(self, payload):
        kind = payload[1] if len(payload) >= 2 else None
        if self.instanceURL is None:
            if kind == m.AUTH_RESPONSE:
                self.instanceURL = m.decodeAuthResponse(payload)
                self.authenticated.callback(self)
            return
        self.messageReceived(payload)

    def _ping(self):
        self._keepalive = None
        if not self._isClosing():
            self.quic.send_ping(0)
            self._needFlush()
            self._keepalive = self._clock.callLater(CLIENT_KEEPALIVE, self._ping)

    def _lost(self, event):
        if self._lostWaiters is None:
            return
        self.closeEvent = event
        self._stopTimer()
        for call in (self._keepalive, self._flushCall):
            if call is not None and call.active():
                call.cancel()
        self._keepalive = self._flushCall = None
        waiters, self._lostWaiters = self._lostWaiters, None
        if not self.authenticated.called:
            self.authenticated.errback(QuicHandshakeFailed(event.error_code, event.reason_phrase))
        stopped = (
            defer.maybeDeferred(self.transport.stopListening)
            if self.transport is not None
            else defer.succeed(None)
        )

        def fire(result):
            self._portStopped = None
            for d in waiters:
                d.callback(None)

        self._portStopped = stopped.addBoth(fire)

    def _failed(self):
        self._lost(
            events.ConnectionTerminated(
                error_code=QuicErrorCode.INTERNAL_ERROR,
                frame_type=None,
                reason_phrase="client failure",
            )
        )

    def _scheduleFlush(self):
        if self._flushCall is None:
            self._flushCall = self._clock.callLater(0, self._flushNow)

    def _flushNow(self):
        self._flushCall = None
        if self._lostWaiters is not None:
            self.flush()

    def _sendDatagrams(self, datagrams):
        for data, addr in datagrams:
            writeDatagram(self.transport, data, addr)

    # The peer protocol

    def sendRaw(self, message):
        if self._lostWaiters is not None and not self._isClosing():
            self.queueDatagram(message)

    @property
    def clock(self):
        return self._clock

    def whenLost(self):
        """
        @return: a Deferred firing once the connection has ended and the
            client's UDP port is closed.
        """
        d = defer.Deferred()
        if self._lostWaiters is not None:
            self._lostWaiters.append(d)
        elif self._portStopped is not None:
            self._portStopped.addBoth(lambda result: d.callback(None))
        else:
            d.callback(None)
        return d

    def abort(self, code=CLOSE_ERROR, reason="aborted"):
        """
        Close the QUIC connection at once, without a Close message.
        """
        if self._lostWaiters is not None and not self._isClosing():
            self.quic.close(error_code=code, reason_phrase=reason)
            self.flush()
        return self.whenLost()

    def close(self):
        """
        Leave: send Close (a datagram, so best effort, as from a Go agent),
        then close the connection with code 0.
        """
        if self._lostWaiters is None or self._isClosing():
            return self.whenLost()
        self.sendRaw(m.CLOSE_MESSAGE)
        self.flush()
        self.quic.close(error_code=CLOSE_NORMAL, reason_phrase="normal closure")
        self.flush()
        return self.whenLost()


def clientConfiguration(
    alpn=ALPN,
    cafile=None,
    serverName="localhost",
    maxDatagramSize=MAX_UDP_PAYLOAD,
    maxDatagramFrameSize=AGENT_MAX_DATAGRAM_FRAME_SIZE,
):
    """
    An aioquic client configuration shaped like a Go agent's: ALPN
    C{nb-quic}, 1452-byte packets, datagrams on, 4 min idle timeout.

    @param cafile: the certificate to trust, or None to skip verification.
    @param alpn: one protocol name or a list (None offers no ALPN).
    """
    configuration = QuicConfiguration(
        alpn_protocols=[alpn] if isinstance(alpn, str) else alpn,
        is_client=True,
        idle_timeout=CLIENT_IDLE_TIMEOUT,
        max_datagram_size=maxDatagramSize,
        max_datagram_frame_size=maxDatagramFrameSize,
        server_name=serverName,
    )
    if cafile is None:
        configuration.verify_mode = ssl.CERT_NONE
    else:
        configuration.load_verify_locations(cafile=cafile)
    return configuration


def connectQuic(
    reactor,
    host,
    port,
    peerID,
    token=None,
    secret=None,
    timeout=10.0,
    configuration=None,
    **options,
):
    """
    Connect and authenticate one peer over QUIC.

    @param token: the HMAC v2 token, or None to make one from C{secret}.
    @param configuration: an aioquic client configuration, else one from
        L{clientConfiguration} with C{options}.
    @param host: the relay's IP address (IPv4 or IPv6 literal).
    @return: a Deferred firing with the authenticated L{QuicRelayClient}, or
        failing (also with L{CannotListenError} if no local UDP socket).
    """
    if token is None:
        token = generateToken(secret, time.time() + 3600)
    if configuration is None:
        configuration = clientConfiguration(**options)
    client = QuicRelayClient(reactor, (host, port), peerID, token, configuration)
    # Any local address of the server's family: the route picks the source.
    try:
        reactor.listenUDP(
            0, client, interface="::" if ":" in host else "", maxPacketSize=MAX_READ_SIZE
        )
    except error.CannotListenError:
        return defer.fail()

    def timedOut(failure):
        client.abort(CLOSE_ERROR, "timed out")
        return failure

    return client.authenticated.addTimeout(timeout, reactor).addErrback(timedOut)
