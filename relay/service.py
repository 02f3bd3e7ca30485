"""
C{twistd relay}: the service tree of one relay process.

L{makeService} is what twistd calls with the parsed L{Options}. The options
are read and checked in L{relay.config} (into a L{RelayConfig}); everything
here is wiring and the I/O that goes with it: the certificate files are
read, the log file opened, the listeners, the fabric, ACME and the workers
hung under one L{RelayService}. Each collaborator is built before what uses
it and given to it at construction.
"""

import gc
import signal
import sys

from twisted.application import service
from twisted.internet import defer
from twisted.internet.error import ProcessExitedAlready
from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    Logger,
    LogLevelFilterPredicate,
)
from twisted.python.components import Componentized

from relay import clocks
from relay.auth import TokenValidator
from relay.clocks import useMonotonicTime

# twistd's plugin (twisted/plugins/relay_plugin.py) finds Options here.
from relay.config import LOG_LEVELS, Options  # noqa: F401
from relay.counters import ClusterCounters, RelayCounters
from relay.endpoints import RequiredPortService, listenNow, serverEndpoint
from relay.internals.twisted import forgetExitSignal
from relay.limits import DESCRIPTOR_RESERVE, LogBudget, descriptorsInUse, raiseDescriptorLimit
from relay.listener.ws import PeerWebSocketFactory
from relay.logfilter import StrangerLines
from relay.logjson import jsonLinesFileLogObserver
from relay.logtext import classicFileLogObserver
from relay.metrics import RelayMetrics, splitActiveIdle
from relay.relay import ConfigurationError, LocalPeers, Relay
from relay.store import Store
from relay.tls import ReloadableTLS, loadCertificateOptions
from relay.web import Readiness, makeMetricsSite


def makeLogObserver(config, stream=None, budget=None, counters=None):
    """
    The observer for C{--log-file}, C{--log-format} and C{--log-level}.

    With C{--workers} every process writes its own lines to the same output
    (L{relay.workers}), each marked with its worker index. With C{budget}
    (the relay's L{relay.limits.LogBudget}), the lines Autobahn and
    Twisted write about peer traffic are under it too (L{StrangerLines}).
    """
    if stream is None:
        stream = (
            sys.stdout
            if config.logFile == "console"
            else open(config.logFile, "a", encoding="utf-8")
        )
    index = config.workerTag
    if config.logFormat == "json":
        observer = jsonLinesFileLogObserver(stream, None if index is None else {"worker": index})
    else:
        observer = classicFileLogObserver(stream, None if index is None else f"worker-{index}")
    predicates = [LogLevelFilterPredicate(defaultLogLevel=LOG_LEVELS[config.logLevel])]
    if budget is not None:
        stranger = StrangerLines(budget, counters)
        predicates = [stranger.count, *predicates, stranger]
    return FilteringLogObserver(observer, predicates)


def _freezeStartupObjects():
    """
    Keep what exists once the relay is up out of every later garbage
    collection.

    Each connection leaves a few reference cycles (Autobahn's futures hold
    their protocol), so the cyclic collector runs all through a burst of
    handshakes, and each full pass walked the ~65,000 objects of the loaded
    libraries: a third of the CPU of a handshake. Those live as long as the
    process, so they are moved out of the collector's sight (C{gc.freeze}).
    """
    gc.collect()
    gc.freeze()


class RelayService(service.MultiService):
    """
    The whole relay process: the peer listener, the metrics endpoint (a
    child service) and, in cluster mode, the fabric.

    Start: the fabric, then the peer listener (bound in
    C{privilegedStartService}, before twistd drops privileges).
    Stop: readiness goes 503, the fabric stops, the peer listener closes,
    every peer is told Close, then the children stop.
    """

    _log = Logger()

    def __init__(
        self,
        relay,
        peerEndpoint,
        peerFactory,
        readiness,
        logObserver=None,
        reactor=None,
        cluster=None,
        tls=None,
        quic=None,
        supervisor=None,
    ):
        """
        @param tls: the L{ReloadableTLS} of C{--tls-cert-file}, which SIGHUP
            re-reads, or None (no TLS, or ACME's certificates).
        @param quic: the L{QuicCarrier}, or None without TLS.
        @param supervisor: with C{--workers}, worker 0's L{ProcessMonitor}
            running the others (SIGHUP is passed on to them), else None.
        """
        super().__init__()
        self.tls = tls
        self.quic = quic
        self.relay = relay
        self.peerEndpoint = peerEndpoint
        self.peerFactory = peerFactory
        self.readiness = readiness
        self.logObserver = logObserver
        self.reactor = reactor
        self.cluster = cluster
        self.supervisor = supervisor
        self.peerPort = None

    def setServiceParent(self, parent):
        # twistd's AppLogger uses an ILogObserver component of the
        # application when there is one: the documented way for an
        # application to choose its logging.
        if self.logObserver is not None and isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, self.logObserver)
        super().setServiceParent(parent)

    def privilegedStartService(self):
        try:
            self.peerPort = listenNow(self.peerEndpoint, self.peerFactory)
        except Exception as e:
            self._log.critical("cannot start the peer listener: {reason}", reason=str(e))
            raise SystemExit(f"relay: cannot start the peer listener: {e}") from None
        try:
            super().privilegedStartService()
        except Exception as e:
            self._log.critical("cannot start: {error}", error=str(e))
            raise SystemExit(f"relay: cannot start: {e}") from None

    def startService(self):
        if self.peerPort is None:
            self.privilegedStartService()
        if self.cluster is not None:
            try:
                self.cluster.startService()
            except Exception as e:
                raise SystemExit(f"relay: cannot start the inter-pod fabric: {e}") from None
        self._fitDescriptors()
        self.relay.admission.start()
        if self.tls is not None:
            # SIGHUP re-reads the certificate files; established connections
            # keep theirs, new ones get the new one.
            signal.signal(
                signal.SIGHUP, lambda number, frame: self.reactor.callFromThread(self.reloadTLS)
            )
        self.readiness.listenerUp = True
        self._log.info(
            "relay listening on {address}, instance URL {url}",
            address=_describe(self.peerPort.getHost()),
            url=self.relay.instanceURL,
        )
        super().startService()
        _freezeStartupObjects()

    def _fitDescriptors(self):
        """
        Raise the descriptor limit, keep L{DESCRIPTOR_RESERVE} of it out of
        the peer port's reach, and say if the limits cannot all be reached.
        """
        before, soft = raiseDescriptorLimit()
        if soft is None:
            return
        if soft != before:
            self._log.info(
                "open file limit raised from {before} to {soft} (the hard limit)",
                before=before,
                soft=soft,
            )
        room = max(1, soft - descriptorsInUse() - DESCRIPTOR_RESERVE)
        self.relay.admission.maxConnections = room
        limits = self.relay.limits
        if limits.maxPeers and limits.maxPeers + limits.maxPending <= room:
            return
        self._log.warn(
            "the open file limit ({soft}) leaves room for {room} peer connections, fewer than "
            "--max-peers {peers} and --max-pending-handshakes {pending}: "
            "beyond that a new connection replaces one still waiting for Auth or is refused "
            '(relay_handshake_rejects_total{{reason="descriptors"}}); raise the hard limit '
            "(ulimit -Hn, systemd LimitNOFILE, the container runtime's nofile) or lower "
            "--max-peers",
            soft=soft,
            room=room,
            peers=limits.maxPeers or "(no limit)",
            pending=limits.maxPending or "(no limit)",
        )

    def reloadTLS(self):
        """
        Re-read the certificate files for new WebSocket and QUIC connections,
        here and (with --workers) in the worker processes this one
        supervises: SIGHUP reaches only the process it is sent to.
        """
        self._signalWorkers("HUP")
        if self.tls.reload() and self.quic is not None:
            self.quic.reload()

    def _signalWorkers(self, signalName):
        """
        Send C{signalName} to each running worker process, if this process
        supervises any.
        """
        if self.supervisor is None:
            return
        for _name, protocol in sorted(self.supervisor.protocols.items()):
            if protocol.transport is None:
                continue
            try:
                protocol.transport.signalProcess(signalName)
            except ProcessExitedAlready:
                pass

    @defer.inlineCallbacks
    def stopService(self):
        self.readiness.draining = True
        if self.tls is not None:
            signal.signal(signal.SIGHUP, signal.SIG_DFL)
        if self.cluster is not None:
            yield self.cluster.stopService()
        if self.peerPort is not None:
            yield self.peerPort.stopListening()
        self.relay.admission.stop()
        yield self.relay.shutdown()
        yield super().stopService()
        if self.supervisor is not None:
            # Imported here as in _makeWorkers: procmon imports the reactor.
            from relay.workers import workersEnded

            running = yield workersEnded(self.supervisor, self.reactor)
            if running:
                self._log.warn(
                    "stopping: workers {names} still running after SIGKILL",
                    names=", ".join(running),
                )
        # A drained relay exits normally: 0 is what Kubernetes and systemd
        # should record for a planned stop.
        forgetExitSignal(self.reactor)


def _describe(address):
    return f"{getattr(address, 'host', '?')}:{getattr(address, 'port', '?')}"


def _peerStats(store, clock):
    def stats():
        active, idle = splitActiveIdle(
            (peer.lastTransport for peer in store.peers.values()), clock.seconds()
        )
        return len(store), active, idle

    return stats


class _Observers:
    """
    The callables told of each new value from one source, added after the
    source exists: for a source that must be built before its observer
    (the fabric before the metrics that read its stream count; ACME before
    QUIC, which reloads from ACME's files). Hand-written: Twisted has no
    public fan-out callable, and this is five lines.
    """

    def __init__(self):
        self._observers = []

    def add(self, observer):
        self._observers.append(observer)

    def __call__(self, value):
        for observer in self._observers:
            observer(value)


class QuicCarrier(service.MultiService):
    """
    QUIC beside WebSocket on the peer port (UDP, same host and port),
    whenever there is a certificate: from the files at once, or from ACME
    once it has one (and again after each renewal). Its one child, once
    there is a certificate, is the L{relay.listener.quic.QuicService}.

    aioquic reads PEM files, so QUIC is told of files, not of the
    L{CertificateOptions} the TLS listener uses.

    @ivar quic: the L{relay.listener.quic.QuicService}, or None before a certificate.
    """

    _log = Logger()

    def __init__(self, relay, reactor, host, port, highWater, certFile, keyFile, renewals=None):
        """
        @param renewals: an L{_Observers} ACME calls on each new
            certificate, or None when the files are there from the start
            (C{--tls-cert-file}).
        """
        super().__init__()
        self.relay = relay
        self.reactor = reactor
        self.host = host
        self.port = port
        self.highWater = highWater
        self.certFile = certFile
        self.keyFile = keyFile
        self.quic = None
        if renewals is None:
            self._serve()
        else:
            renewals.add(self.certificateRenewed)

    def _serve(self):
        from relay.listener.quic import QuicService

        self.quic = QuicService(
            self.relay,
            self.reactor,
            self.host,
            self.port,
            self.certFile,
            self.keyFile,
            highWater=self.highWater,
        )
        self.quic.setServiceParent(self)

    def certificateRenewed(self, certificateOptions):
        """
        ACME has a (new) certificate in its files: start QUIC with it, or
        have QUIC's new connections use it.
        """
        if self.quic is None:
            self._serve()
        else:
            self.quic.reloadCertificate(self.certFile, self.keyFile)

    def reload(self):
        """
        SIGHUP: re-read the certificate files, keeping the previous
        certificate if they are not usable.
        """
        if self.quic is None:
            return
        try:
            self.quic.reloadCertificate()
        except ConfigurationError as e:
            self._log.error(
                "QUIC certificate reload failed, keeping the previous one: {error}", error=str(e)
            )


def _loadTLS(config):
    """
    The certificate of C{--tls-cert-file}, read now, as a L{ReloadableTLS}
    (SIGHUP re-reads it), or None without the option.

    @raise SystemExit: the files are not usable; the message names them.
    """
    if config.tlsCertFile is None:
        return None
    try:
        options = loadCertificateOptions(config.tlsCertFile, config.tlsKeyFile)
    except ConfigurationError as e:
        raise SystemExit(f"relay: {e}") from None
    return ReloadableTLS(options, config.tlsCertFile, config.tlsKeyFile)


def _makeCluster(cluster, store, reactor, wallClock, noisyLog, counters, lookups):
    """
    The inter-pod fabric of C{cluster} (a L{relay.config.ClusterConfig}),
    or None in single-pod mode.
    """
    if cluster is None:
        return None
    from relay.cluster.service import ClusterService

    return ClusterService(
        cluster,
        LocalPeers(store),
        counters,
        reactor,
        wallClock=wallClock,
        noisyLog=noisyLog,
        lookupObserver=lookups,
    )


def _makeAcme(acme, reactor, wallClock, counters, renewals):
    """
    The ACME certificate service of C{acme} (a L{relay.config.AcmeConfig}),
    or None without C{--letsencrypt-*}.
    """
    if acme is None:
        return None
    from relay.acme import AcmeCertificateService

    return AcmeCertificateService(
        list(acme.domains),
        acme.dataDir,
        acme.email,
        acme.directoryURL,
        reactor,
        challenge=acme.challenge,
        http01Port=acme.httpPort,
        onCertificate=renewals,
        counters=counters,
        now=wallClock.seconds,
    )


def _makeWorkers(config, reactor):
    """
    With C{--workers}: in the first worker the L{ProcessMonitor} running the
    others, in the others the watch that stops them with the first. C{(None,
    None)} for a single process.

    @return: C{(supervisor or None, service to hang or None)}.
    """
    if config.workers == 1:
        return None, None
    from relay.workers import SupervisorWatch, makeSupervisor

    if config.workerIndex == 0:
        supervisor = makeSupervisor(config, reactor)
        return supervisor, supervisor
    return None, SupervisorWatch(reactor)


def makeService(options, reactor=None, wallClock=None):
    """
    The relay's service tree, for the options twistd parsed.

    @param reactor: the reactor; by default the global one, which is then
        switched to monotonic time (L{relay.clocks}).
    @param wallClock: unix time for token expiry, HELLO timestamps and
        certificates; by default L{relay.clocks.wallClock} with the global
        reactor, else C{reactor}.
    """
    if reactor is None:
        from twisted.internet import reactor

        useMonotonicTime(reactor)
        if wallClock is None:
            wallClock = clocks.wallClock
    return buildRelay(options.config, reactor, reactor if wallClock is None else wallClock)


def buildRelay(config, reactor, wallClock):
    """
    The service tree of C{config} (a L{RelayConfig}) on C{reactor}.
    """
    tls = _loadTLS(config)
    store = Store()
    counters = RelayCounters()
    # One budget for every line strangers can cause, on every port.
    noisyLog = LogBudget(reactor)
    readiness = Readiness(clusterMode=config.cluster is not None)

    clusterCounters = ClusterCounters() if config.cluster is not None else None
    lookups = _Observers()
    cluster = _makeCluster(
        config.cluster, store, reactor, wallClock, noisyLog, clusterCounters, lookups
    )
    metrics = RelayMetrics(
        counters,
        _peerStats(store, reactor),
        clusterCounters,
        cluster.streamCount if cluster is not None else None,
    )
    lookups.add(metrics.recordLookupDuration)

    relay = Relay(
        validator=TokenValidator(config.authSecret, wallClock),
        instanceURL=config.instanceURL,
        clock=reactor,
        wallClock=wallClock,
        store=store,
        healthCheckThreshold=config.healthCheckThreshold,
        counters=counters,
        limits=config.limits,
        forwarder=cluster,
        noisyLog=noisyLog,
        recordAuthenticationTime=metrics.recordAuthenticationTime,
        recordStoreTime=metrics.recordStoreTime,
    )

    renewals = _Observers()
    acme = _makeAcme(config.acme, reactor, wallClock, counters, renewals)
    host, port = config.listen
    quic = None
    # With several workers only the first serves QUIC: a QUIC connection
    # must stay with one process, and UDP has no accept() to hand it over.
    if config.workerIndex == 0 and (acme is not None or tls is not None):
        if acme is not None:
            files, renewed = (acme.certificatePath, acme.keyPath), renewals
        else:
            files, renewed = (config.tlsCertFile, config.tlsKeyFile), None
        quic = QuicCarrier(relay, reactor, host, port, config.peerBufferLimit, *files, renewed)
    supervisor, workers = _makeWorkers(config, reactor)

    top = RelayService(
        relay,
        serverEndpoint(
            reactor,
            host,
            port,
            tls=acme.serverConnectionCreator() if acme is not None else tls,
            reusePort=config.workers > 1,
        ),
        PeerWebSocketFactory(relay, reactor, highWater=config.peerBufferLimit),
        readiness,
        logObserver=makeLogObserver(config, budget=noisyLog, counters=counters),
        reactor=reactor,
        cluster=cluster,
        tls=tls,
        quic=quic,
        supervisor=supervisor,
    )
    if config.metricsPort:
        site = makeMetricsSite(
            metrics.registry, readiness, reactor=reactor, refusals=counters.metricsRefusals
        )
        RequiredPortService(
            serverEndpoint(reactor, config.metricsAddress, config.metricsPort), site
        ).setServiceParent(top)
    if acme is not None:
        readiness.certificateReady = False
        acme.whenReady().addCallback(lambda _: setattr(readiness, "certificateReady", True))
        acme.setServiceParent(top)
    if cluster is not None:
        cluster.whenDiscoveryRan().addCallback(lambda _: setattr(readiness, "discoveryDone", True))
    for child in (quic, workers):
        if child is not None:
            child.setServiceParent(top)
    return top
