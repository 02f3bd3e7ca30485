"""
The inter-pod fabric as one Twisted service, ready to hang under the relay's
MultiService.

It assembles the transport (streams), the locator (WHO_HAS / I_HAVE), the
forwarder (FWD, presence push) and discovery (headless name), listens on the
cluster port, and is itself the relay's L{ICrossPodForwarder}.
"""

from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from relay.addresses import joinAddress, splitAddress
from relay.cluster.discovery import Discovery
from relay.cluster.forwarder import Forwarder
from relay.cluster.locator import Locator
from relay.cluster.transport import ClusterTransport, tcpEndpoint
from relay.endpoints import serverEndpoint
from relay.interfaces import ICrossPodForwarder

_ENDPOINT_PREFIXES = ("tcp:", "tcp6:", "unix:", "systemd:")

_log = Logger()


def listeningEndpoint(reactor, listenAddress):
    """
    A server endpoint for C{host:port} (empty host: every IPv4 interface;
    C{[v6]:port} for IPv6), a C{(host, port)} tuple, or a Twisted endpoint
    string such as C{tcp:7090}; the first two through the relay's one
    builder (L{serverEndpoint}), with its listen backlog.
    """
    if isinstance(listenAddress, tuple):
        host, port = listenAddress
    elif listenAddress.startswith(_ENDPOINT_PREFIXES):
        return serverFromString(reactor, listenAddress)
    else:
        host, port = splitAddress(listenAddress, listening=True)
    return serverEndpoint(reactor, host, port)


@implementer(ICrossPodForwarder)
class ClusterService(MultiService):
    """
    The inter-pod fabric of one relay pod (ADR-0014; docs/cluster.md).

    @ivar transport: the L{ClusterTransport}.
    @ivar locator: the L{Locator}.
    @ivar forwarder: the L{Forwarder}.
    @ivar discovery: the L{Discovery}.
    @ivar port: the listening port once started, else None.
    """

    def __init__(
        self,
        localPeers,
        podIP,
        clusterPort,
        listenAddress,
        headless,
        secret,
        discoveryInterval,
        counters,
        reactor,
        compat=False,
        wallClock=None,
        noisyLog=None,
        lookupObserver=None,
    ):
        """
        @param localPeers: the peers connected to this pod, an
            L{relay.interfaces.ILocalPeers} (L{relay.server.LocalPeers}).
        @param podIP: this pod's IP (announced, and never dialed).
        @param clusterPort: the inter-pod port of every pod (int).
        @param listenAddress: where to listen: C{host:port}, C{(host, port)}
            or an endpoint string.
        @param headless: comma-separated DNS names and/or IP literals
            listing the pods.
        @param secret: the cluster secret as given (str or bytes); empty
            means unsigned HELLO and no protection at all (the operator's
            explicit choice; a warning is logged at start).
        @param discoveryInterval: seconds between discovery passes.
        @param counters: a L{relay.counters.ClusterCounters}.
        @param reactor: provides IReactorTCP, IReactorTime and a
            C{nameResolver}.
        @param compat: whether pods that skip the secured handshake (Go
            pods) are taken, at the Go relay's level of trust.
        @param wallClock: unix time for HELLO timestamps (L{relay.clocks});
            the reactor by default.
        @param noisyLog: the L{relay.limits.LogBudget} for lines strangers
            cause (the relay's, so one budget covers every port); the
            fabric's own by default.
        @param lookupObserver: called with the duration in seconds of each
            WHO_HAS lookup (the metrics' histogram), or None.
        """
        MultiService.__init__(self)
        self.reactor = reactor
        self.listenAddress = listenAddress
        self.secret = secret
        self.compat = compat
        self.announceAddress = joinAddress(podIP, clusterPort)
        # Dial from the announced address: the remote checks that the HELLO
        # comes from the host it announces.
        self.transport = ClusterTransport(
            self.announceAddress,
            secret,
            reactor,
            counters,
            endpointFactory=lambda address: tcpEndpoint(reactor, address, bindHost=podIP),
            compat=compat,
            wallClock=wallClock,
            noisyLog=noisyLog,
        )
        self.locator = Locator(self.transport, localPeers, reactor, lookupObserver=lookupObserver)
        self.forwarder = Forwarder(self.transport, self.locator, localPeers, reactor, counters)
        self.transport.handler = self.forwarder
        self.discovery = Discovery(
            headless,
            clusterPort,
            podIP,
            self.transport,
            reactor.nameResolver,
            reactor,
            interval=discoveryInterval,
        )
        self.port = None

    def startService(self):
        MultiService.startService(self)
        if not self.secret:
            _log.warn(
                "cluster: NO CLUSTER SECRET (--cluster-insecure): inter-pod streams are not authenticated and "
                "any host that reaches the cluster port can join the fabric, read peer ids and inject "
                "packets; restrict it with a NetworkPolicy or set a cluster secret"
            )
        elif self.compat:
            _log.warn(
                "cluster: compatibility mode (--cluster-compat): streams with pods that skip the secured "
                "handshake (Go pods) are authenticated by their HELLO only and their frames are not; "
                "turn it off once every pod runs this relay"
            )
        outcome = []
        listeningEndpoint(self.reactor, self.listenAddress).listen(self.transport.serverFactory()).addBoth(outcome.append)
        if not outcome or isinstance(outcome[0], Failure):
            # Stream endpoints listen at once: refuse to start rather than
            # run a pod its siblings cannot reach.
            reason = outcome[0].getErrorMessage() if outcome else "listening did not complete"
            _log.critical("cluster: cannot listen on {listen}: {reason}", listen=self._listenText(), reason=reason)
            MultiService.stopService(self)
            if outcome:
                outcome[0].raiseException()
            raise RuntimeError(f"cluster: listening on {self._listenText()} did not complete")
        self.port = outcome[0]
        _log.info(
            "cluster: listening on {listen}, announcing {announce}, {mode}",
            listen=self._listenText(),
            announce=self.announceAddress,
            mode="insecure" if not self.secret else ("secured, compatibility mode" if self.compat else "secured"),
        )
        self.discovery.start()

    def _listenText(self):
        """
        The listen address for logs: C{host:port} also when given as a tuple.
        """
        if isinstance(self.listenAddress, tuple):
            host, port = self.listenAddress
            return joinAddress(host or "0.0.0.0", port)
        return self.listenAddress

    def stopService(self):
        self.discovery.stop()
        self.forwarder.stop()
        self.locator.stop()
        waits = [defer.maybeDeferred(MultiService.stopService, self)]
        if self.port is not None:
            port, self.port = self.port, None
            waits.append(defer.maybeDeferred(port.stopListening))
        waits.append(self.transport.stop())
        return defer.DeferredList(waits, consumeErrors=True).addCallback(lambda _: None)

    # Metrics and readiness

    def streamCount(self):
        return self.transport.streamCount()

    def whenDiscoveryRan(self):
        """
        @return: a L{Deferred} firing once discovery has completed its first
            pass (for readiness).
        """
        return self.discovery.whenRun()

    # ICrossPodForwarder

    def forward(self, destinationID, message):
        self.forwarder.forward(destinationID, message)

    def locate(self, peerID, requester=None):
        return self.forwarder.locate(peerID, requester)

    def peerConnected(self, peer):
        self.forwarder.peerConnected(peer)

    def peerDisconnected(self, peer):
        self.forwarder.peerDisconnected(peer)
