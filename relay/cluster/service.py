"""
The inter-pod fabric as one Twisted service, ready to hang under the relay's
MultiService.

It assembles the streams (one per pod pair), the locator (WHO_HAS / I_HAVE), the
forwarder (FWD, presence push) and discovery (headless name), listens on the
cluster port, and is itself the relay's L{ICrossPodForwarder}.
"""

from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from relay.addresses import joinAddress
from relay.cluster.discovery import Discovery
from relay.cluster.forwarder import Forwarder
from relay.cluster.locator import Locator
from relay.cluster.streams import ClusterStreams, tcpEndpoint
from relay.endpoints import listenNow, serverEndpoint
from relay.interfaces import ICrossPodForwarder

_log = Logger()


@implementer(ICrossPodForwarder)
class ClusterService(MultiService):
    """
    The inter-pod fabric of one relay pod (ADR-0014; docs/cluster.md).

    @ivar config: the L{relay.config.ClusterConfig} it runs.
    @ivar streams: the L{ClusterStreams}.
    @ivar locator: the L{Locator}.
    @ivar forwarder: the L{Forwarder}.
    @ivar discovery: the L{Discovery}.
    @ivar port: the listening port once started, else None.
    """

    def __init__(
        self,
        config,
        localPeers,
        counters,
        reactor,
        wallClock=None,
        noisyLog=None,
        lookupObserver=None,
    ):
        """
        @param config: the fabric's settings, a L{relay.config.ClusterConfig}:
            this pod's IP (announced, and never dialed), the inter-pod port
            of every pod, the C{(host, port)} to listen on, the pods'
            headless names or IPs, the discovery interval, the secret (empty:
            unsigned HELLO and no protection at all, the operator's explicit
            choice, warned about at start) and whether pods that skip the
            secured handshake (Go pods) are taken, at the Go relay's level
            of trust.
        @param localPeers: the peers connected to this pod, an
            L{relay.interfaces.ILocalPeers} (L{relay.relay.LocalPeers}).
        @param counters: a L{relay.counters.ClusterCounters}.
        @param reactor: provides IReactorTCP, IReactorTime and a
            C{nameResolver}.
        @param wallClock: unix time for HELLO timestamps (L{relay.clocks});
            the reactor by default.
        @param noisyLog: the L{relay.limits.LogBudget} for lines strangers
            cause (the relay's, so one budget covers every port); the
            fabric's own by default.
        @param lookupObserver: called with the duration in seconds of each
            WHO_HAS lookup (the metrics' histogram), or None.
        """
        MultiService.__init__(self)
        self.config = config
        self.reactor = reactor
        self.announceAddress = joinAddress(config.podIP, config.port)
        # Dial from the announced address: the remote checks that the HELLO
        # comes from the host it announces.
        self.streams = ClusterStreams(
            self.announceAddress,
            config.secret,
            reactor,
            counters,
            endpointFactory=lambda address: tcpEndpoint(reactor, address, bindHost=config.podIP),
            compat=config.compat,
            wallClock=wallClock,
            noisyLog=noisyLog,
        )
        self.locator = Locator(self.streams, localPeers, reactor, lookupObserver=lookupObserver)
        self.forwarder = Forwarder(self.streams, self.locator, localPeers, reactor, counters)
        self.streams.handler = self.forwarder
        self.discovery = Discovery(
            config.headless,
            config.port,
            config.podIP,
            self.streams,
            reactor.nameResolver,
            reactor,
            interval=config.discoveryInterval,
        )
        self.port = None

    def startService(self):
        MultiService.startService(self)
        if not self.config.secret:
            _log.warn(
                "cluster: NO CLUSTER SECRET (--cluster-insecure): inter-pod streams are not "
                "authenticated and any host that reaches the cluster port can join the fabric, "
                "read peer ids and inject packets; restrict it with a NetworkPolicy or set a "
                "cluster secret"
            )
        elif self.config.compat:
            _log.warn(
                "cluster: compatibility mode (--cluster-compat): streams with pods that skip "
                "the secured handshake (Go pods) are authenticated by their HELLO only and "
                "their frames are not; turn it off once every pod runs this relay"
            )
        host, port = self.config.listen
        try:
            self.port = listenNow(
                serverEndpoint(self.reactor, host, port), self.streams.serverFactory()
            )
        except Exception as e:
            # Refuse to start rather than run a pod its siblings cannot reach.
            _log.critical(
                "cluster: cannot listen on {listen}: {reason}",
                listen=self._listenText(),
                reason=str(e),
            )
            MultiService.stopService(self)
            raise
        _log.info(
            "cluster: listening on {listen}, announcing {announce}, {mode}",
            listen=self._listenText(),
            announce=self.announceAddress,
            mode="insecure"
            if not self.config.secret
            else ("secured, compatibility mode" if self.config.compat else "secured"),
        )
        self.discovery.start()

    def _listenText(self):
        """
        The listen address for logs, C{host:port}.
        """
        host, port = self.config.listen
        return joinAddress(host or "0.0.0.0", port)

    def stopService(self):
        self.discovery.stop()
        self.forwarder.stop()
        self.locator.stop()
        waits = [defer.maybeDeferred(MultiService.stopService, self)]
        if self.port is not None:
            port, self.port = self.port, None
            waits.append(defer.maybeDeferred(port.stopListening))
        waits.append(self.streams.stop())
        return defer.DeferredList(waits, consumeErrors=True).addCallback(lambda _: None)

    # Metrics and readiness

    def streamCount(self):
        return self.streams.streamCount()

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
