"""
The listening endpoints of the relay: the peer port, the metrics port and
the fabric's cluster port are all built by L{serverEndpoint}, so that each
gets the same listen backlog and the same reading of an empty host.
"""

import socket

from twisted.application import service
from twisted.internet import defer
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.python.failure import Failure
from zope.interface import implementer

from relay.listener.ws import RefusableTLSFactory

# Twisted's default listen queue is 50: a burst of reconnecting agents (a
# pod restart, a network blip) overflows it and every dropped SYN costs its
# agent a one-second retransmit. The kernel caps this at somaxconn, as Go's
# listener asks for.
LISTEN_BACKLOG = max(socket.SOMAXCONN, 4096)


def serverEndpoint(reactor, host, port, tls=None, reusePort=False):
    """
    A TCP server endpoint on C{host:port} with L{LISTEN_BACKLOG}.

    @param host: an IPv4 or IPv6 literal; empty for every IPv4 interface.
    @param tls: an C{IOpenSSLServerConnectionCreator} (or context factory)
        to serve TLS with, or None for plain TCP.
    @param reusePort: whether other processes may bind the same port
        (C{--workers}, L{ReusePortEndpoint}).
    """
    host = host or "0.0.0.0"
    if reusePort:
        endpoint = ReusePortEndpoint(reactor, host, port, backlog=LISTEN_BACKLOG)
    elif ":" in host:
        endpoint = TCP6ServerEndpoint(reactor, port, backlog=LISTEN_BACKLOG, interface=host)
    else:
        endpoint = TCP4ServerEndpoint(reactor, port, backlog=LISTEN_BACKLOG, interface=host)
    if tls is not None:
        endpoint = TLSEndpoint(endpoint, tls)
    return endpoint


def listenNow(endpoint, factory):
    """
    Listen on C{endpoint} at once.

    The relay's endpoints all listen synchronously; a port that cannot open
    must stop the start rather than leave a relay running without it.

    @return: the listening port.
    @raise Exception: why it could not listen (C{CannotListenError} for a
        port in use), or C{RuntimeError} if listening did not complete.
    """
    outcome = []
    endpoint.listen(factory).addBoth(outcome.append)
    if not outcome:
        raise RuntimeError("listening did not complete")
    if isinstance(outcome[0], Failure):
        outcome[0].raiseException()
    return outcome[0]


class RequiredPortService(service.Service):
    """
    A listening port the relay does not run without (the metrics port):
    opened in C{privilegedStartService}, before twistd drops privileges, and
    a failure raised there. Twisted's C{StreamServerEndpointService} only logs
    it, which left a relay serving peers with no C{/metrics} or
    C{/readyz} for its probes.
    """

    def __init__(self, endpoint, factory):
        self.endpoint = endpoint
        self.factory = factory
        self.port = None

    def privilegedStartService(self):
        super().privilegedStartService()
        self.port = listenNow(self.endpoint, self.factory)

    def startService(self):
        if self.port is None:
            self.privilegedStartService()
        super().startService()

    def stopService(self):
        super().stopService()
        port, self.port = self.port, None
        return port.stopListening() if port is not None else None


@implementer(IStreamServerEndpoint)
class TLSEndpoint:
    """
    TLS over a TCP endpoint, as C{reactor.listenSSL} does it, but with a
    L{RefusableTLSFactory}: a connection the admission refuses is
    closed before any TLS work.
    """

    def __init__(self, endpoint, contextFactory):
        self.endpoint = endpoint
        self.contextFactory = contextFactory

    def listen(self, factory):
        return self.endpoint.listen(RefusableTLSFactory(self.contextFactory, False, factory))


@implementer(IStreamServerEndpoint)
class ReusePortEndpoint:
    """
    A TCP listener several processes can bind at once (C{SO_REUSEPORT}), for
    C{--workers} (L{relay.workers}).

    Twisted's own TCP endpoints do not set the option, so the socket is made
    here and adopted by the reactor.
    """

    def __init__(self, reactor, host, port, backlog=LISTEN_BACKLOG):
        self.reactor = reactor
        self.host = host or "0.0.0.0"
        self.port = port
        self.backlog = backlog

    def listen(self, factory):
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((self.host, self.port))
            sock.listen(self.backlog)
            sock.setblocking(False)
            port = self.reactor.adoptStreamPort(sock.fileno(), family, factory)
        except OSError as e:
            return defer.fail(e)
        finally:
            sock.close()
        return defer.succeed(port)
