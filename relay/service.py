"""
C{twistd relay}: the command line and the service tree it builds.

The options mirror the Go relay's flags so a deployment switches by changing
its image: every option also comes from C{OZ_<OPTION_IN_UPPER_SNAKE>}, and a
flag beats the variable.
"""

import gc
import os
import secrets
import signal
import socket
import sys

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import defer
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    Logger,
)
from twisted.python import usage
from twisted.python.components import Componentized
from twisted.python.failure import Failure
from zope.interface import implementer

from relay import clocks
from relay.auth import TokenValidator
from relay.clocks import useMonotonicTime
from relay.counters import ClusterCounters
from relay.limits import DESCRIPTOR_RESERVE, Limits, descriptorsInUse, parseNetworks, raiseDescriptorLimit
from relay.logfilter import StrangerLines
from relay.logjson import jsonLinesFileLogObserver
from relay.logtext import classicFileLogObserver
from relay.metrics import RelayMetrics, splitActiveIdle
from relay.peer import DEFAULT_HIGH_WATER, PeerWebSocketFactory, RefusableTLSFactory
from relay.server import ConfigurationError, Relay, instanceURL
from relay.store import Store
from relay.tls import ReloadableTLS, loadCertificateOptions
from relay.web import Readiness, makeMetricsSite

ENV_PREFIX = "OZ_"
HC_THRESHOLD_VARIABLE = "OZ_RELAY_HC_ATTEMPT_THRESHOLD"

LOG_LEVELS = {
    "trace": LogLevel.debug,
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "warning": LogLevel.warn,
    "error": LogLevel.error,
    "fatal": LogLevel.critical,
    "panic": LogLevel.critical,
}


def variableFor(option):
    """
    The environment variable that sets C{option}: C{auth-secret} is
    C{OZ_AUTH_SECRET}.
    """
    return ENV_PREFIX + option.upper().replace("-", "_")


def parseHostPort(value, what):
    """
    C{host:port}, C{:port} or C{[v6]:port} into C{(host, port)}; an empty host
    means every interface.
    """
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise usage.UsageError(f"--{what} must be host:port, not {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def _nonNegativeInt(value, what):
    try:
        number = int(value)
    except ValueError:
        raise usage.UsageError(f"--{what} must be an integer, not {value!r}") from None
    if number < 0:
        raise usage.UsageError(f"--{what} must not be negative")
    return number


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "A relay for openZro / NetBird agents. Every option can also be set "
        "with the environment variable OZ_<OPTION_IN_UPPER_SNAKE>, e.g. "
        "OZ_AUTH_SECRET; a flag beats the variable."
    )

    optParameters = [
        ["listen-address", "l", ":443", "host:port the peer listener (WebSocket, and QUIC with TLS) binds."],
        ["exposed-address", "e", None, "Address peers reach this instance at (host:port, rel://… or rels://…). Required."],
        ["auth-secret", "s", None, "Secret shared with the management server. Required."],
        ["tls-cert-file", "c", None, "PEM certificate (chain) for TLS on the peer listener."],
        ["tls-key-file", "k", None, "PEM private key for --tls-cert-file."],
        ["letsencrypt-data-dir", "d", None, "Directory for the ACME account key and certificates (0700); with --letsencrypt-domains turns ACME on."],
        ["letsencrypt-domains", "a", None, "Comma-separated domains to obtain one certificate for (with --letsencrypt-data-dir)."],
        ["letsencrypt-email", None, None, "ACME account contact e-mail."],
        ["letsencrypt-directory-url", None, None, "ACME directory URL (default: Let's Encrypt production); for staging or a private CA."],
        ["letsencrypt-challenge", None, "tls-alpn-01", "tls-alpn-01 (on the peer port, whatever its number, as the Go relay) or http-01 (on --letsencrypt-http-port; tls-alpn-01 if that port cannot be bound)."],
        ["letsencrypt-http-port", None, "80", "Port of the HTTP-01 challenge listener."],
        ["metrics-port", None, "9090", "Port of the metrics and health HTTP endpoint; 0 turns it off."],
        ["metrics-address", None, "", "Address the metrics endpoint binds (empty: every interface, as the Go relay)."],
        ["log-level", None, "info", "trace, debug, info, warn or error."],
        ["log-file", None, "console", "'console' for standard output, or a file path."],
        ["log-format", None, "text", "text, or json for one JSON object per line."],
        ["peer-buffer-limit", None, str(DEFAULT_HIGH_WATER), "Bytes queued for one slow peer before messages to it are dropped."],
        ["max-peers", None, "50000", "Authenticated peers in all; 0 = no limit."],
        ["max-pending-handshakes", None, "2048", "Connections waiting to authenticate; 0 = no limit."],
        ["max-connections-per-ip", None, "0", "Open connections from one source address (an IPv6 /64 counts as one); 0 = no limit, the default: NAT, CGNAT and load balancers put many agents behind one."],
        ["connection-rate-per-ip", None, "0", "New connections per second from one source address (an IPv6 /64 counts as one), bursts of twice that; 0 = no limit, the default."],
        ["peer-rate-limit", None, "0", "Inbound transport bytes per second from one peer; excess is dropped; 0 = no limit."],
        ["trusted-proxies", None, "", "Comma-separated addresses/networks of proxies whose X-Real-IP header names the source address."],
        ["cluster-headless", None, "", "Headless Service name (or comma-separated names/IPs) of the relay pods; empty = single-pod mode."],
        ["cluster-port", None, "7090", "Inter-pod TCP port, the same on every pod."],
        ["cluster-listen-address", None, None, "host:port the inter-pod listener binds (default <pod-ip>:<cluster-port>)."],
        ["pod-ip", None, None, "This pod's IP (default: the POD_IP variable). Required with --cluster-headless."],
        ["cluster-auth-secret", None, "", "Secret authenticating the pods to each other and every inter-pod frame, the same on every pod. Required with --cluster-headless unless --cluster-insecure."],
        ["cluster-discovery-interval", None, "10", "Seconds between discovery passes."],
        ["workers", None, "1", "Relay processes on this host sharing the peer port (SO_REUSEPORT), joined by the fabric over 127.0.1.x; keep 1 per pod on Kubernetes."],
        ["worker-index", None, "0", "Internal: which of --workers this process is (set by the first worker for the others)."],
    ]

    optFlags = [
        ["letsencrypt-aws-route53", None, "Use Route 53 DNS-01 for Let's Encrypt (not supported)."],
        ["cluster-insecure", None, "Run the inter-pod fabric without a cluster secret: anyone reaching the cluster port joins it."],
        ["cluster-compat", None, "Also take Go relay pods into the fabric (their HELLO only authenticates them, their frames are not); for migrating pod by pod."],
    ]

    def __init__(self, environ=None):
        super().__init__()
        environ = os.environ if environ is None else environ
        self._environ = environ
        self._invalidValue = False
        # Variables become defaults; the command line, parsed afterwards,
        # overrides them.
        for name, *_ in self.optParameters:
            value = environ.get(variableFor(name))
            if value is not None:
                self[name] = value
        for name, *_ in self.optFlags:
            value = environ.get(variableFor(name))
            if value is not None:
                self[name] = value.strip().lower() in ("1", "true", "yes", "on")

    def getUsage(self, width=None):
        # After a bad value the one line naming it is the message; twistd
        # would print the whole usage above it.
        return "" if self._invalidValue else super().getUsage(width)

    def postOptions(self):
        try:
            self._checkValues()
        except usage.UsageError:
            self._invalidValue = True
            raise

    def _checkValues(self):
        # As given, before parsing: what --workers hands to the other workers.
        self.settings = {name: self[name] for name, *_ in self.optParameters}
        for required in ("exposed-address", "auth-secret"):
            if not self[required]:
                raise usage.UsageError(f"--{required} (or {variableFor(required)}) is required")
        if self["letsencrypt-aws-route53"]:
            raise usage.UsageError("--letsencrypt-aws-route53: Route 53 DNS-01 is not supported by this relay")
        if bool(self["tls-cert-file"]) != bool(self["tls-key-file"]):
            raise usage.UsageError("--tls-cert-file and --tls-key-file go together")
        self["listen"] = parseHostPort(self["listen-address"], "listen-address")
        self._acmeOptions()
        self["tls"] = bool(self["tls-cert-file"]) or self["acme"]
        self["tls-options"] = None
        if self["tls-cert-file"]:
            try:
                self["tls-options"] = ReloadableTLS(loadCertificateOptions(self["tls-cert-file"], self["tls-key-file"]), self["tls-cert-file"], self["tls-key-file"])
            except ConfigurationError as e:
                raise usage.UsageError(str(e)) from None
        self["metrics-port"] = _nonNegativeInt(self["metrics-port"], "metrics-port")
        if self["metrics-port"] > 65535:
            raise usage.UsageError("--metrics-port must be a port number")
        self["peer-buffer-limit"] = _nonNegativeInt(self["peer-buffer-limit"], "peer-buffer-limit")
        for name in ("max-peers", "max-pending-handshakes", "max-connections-per-ip", "connection-rate-per-ip", "peer-rate-limit"):
            self[name] = _nonNegativeInt(self[name], name)
        try:
            trusted = parseNetworks(self["trusted-proxies"])
        except ValueError as e:
            raise usage.UsageError(f"--trusted-proxies: {e}") from None
        self["limits"] = Limits(
            maxPeers=self["max-peers"],
            maxPending=self["max-pending-handshakes"],
            maxPerIP=self["max-connections-per-ip"],
            ratePerIP=self["connection-rate-per-ip"],
            peerByteRate=self["peer-rate-limit"],
            trustedProxies=trusted,
        )
        level = self["log-level"].lower()
        if level not in LOG_LEVELS:
            raise usage.UsageError(f"--log-level must be one of trace, debug, info, warn, error, not {self['log-level']!r}")
        self["log-level"] = level
        if self["log-format"] not in ("text", "json"):
            raise usage.UsageError(f"--log-format must be text or json, not {self['log-format']!r}")
        threshold = self._environ.get(HC_THRESHOLD_VARIABLE, "1")
        try:
            self["hc-attempt-threshold"] = max(1, int(threshold))
        except ValueError:
            raise usage.UsageError(f"{HC_THRESHOLD_VARIABLE} must be an integer, not {threshold!r}") from None
        try:
            self["instance-url"] = instanceURL(self["exposed-address"], self["tls"])
        except ConfigurationError as e:
            raise usage.UsageError(str(e)) from None
        self._clusterOptions()

    def _acmeOptions(self):
        domains = [d.strip() for d in (self["letsencrypt-domains"] or "").split(",") if d.strip()]
        self["acme"] = bool(domains or self["letsencrypt-data-dir"])
        if not self["acme"]:
            return
        if not (domains and self["letsencrypt-data-dir"]):
            raise usage.UsageError("--letsencrypt-domains and --letsencrypt-data-dir go together")
        if self["tls-cert-file"]:
            raise usage.UsageError("use either --tls-cert-file/--tls-key-file or --letsencrypt-*, not both")
        self["letsencrypt-domains"] = domains
        self["letsencrypt-http-port"] = _nonNegativeInt(self["letsencrypt-http-port"], "letsencrypt-http-port")
        challenge = (self["letsencrypt-challenge"] or "tls-alpn-01").strip().lower()
        if challenge not in ("tls-alpn-01", "http-01"):
            raise usage.UsageError(f"--letsencrypt-challenge must be tls-alpn-01 or http-01, not {challenge!r}")
        self["letsencrypt-challenge"] = challenge

    def _clusterOptions(self):
        self["cluster-port"] = _nonNegativeInt(self["cluster-port"], "cluster-port")
        try:
            interval = float(self["cluster-discovery-interval"])
        except ValueError:
            interval = 0
        if not interval > 0:
            raise usage.UsageError("--cluster-discovery-interval must be a positive number of seconds")
        self["cluster-discovery-interval"] = interval
        self._workerOptions()
        if not self["cluster-headless"]:
            return
        self["pod-ip"] = self["pod-ip"] or self._environ.get("POD_IP")
        if not self["pod-ip"]:
            raise usage.UsageError("--pod-ip (or OZ_POD_IP or POD_IP) is required with --cluster-headless")
        if not self["cluster-auth-secret"] and not self["cluster-insecure"]:
            raise usage.UsageError(
                "--cluster-auth-secret (or OZ_CLUSTER_AUTH_SECRET) is required with --cluster-headless; "
                "--cluster-insecure runs the fabric without authentication"
            )
        from relay.cluster.transport import joinAddress

        # Only the pod's own address: the fabric has no business on other
        # interfaces (the Go relay binds every one).
        address = self["cluster-listen-address"] or joinAddress(self["pod-ip"], self["cluster-port"])
        self["cluster-listen"] = parseHostPort(address, "cluster-listen-address")

    def _workerOptions(self):
        self["workers"] = _nonNegativeInt(self["workers"], "workers")
        self["worker-index"] = _nonNegativeInt(self["worker-index"], "worker-index")
        if self["workers"] < 1:
            raise usage.UsageError("--workers must be at least 1")
        if self["workers"] == 1:
            return
        if self["worker-index"] >= self["workers"]:
            raise usage.UsageError("--worker-index must be below --workers")
        self["limits"] = self["limits"].shared(self["workers"])
        if self["cluster-headless"] and self["worker-index"] == 0:
            raise usage.UsageError("--workers and --cluster-headless do not mix: run one worker per pod in a cluster")
        if self["acme"]:
            raise usage.UsageError("--workers and --letsencrypt-* do not mix: give the workers certificate files")
        from relay.workers import workerAddress, workerAddresses

        # The workers are pods of a cluster on loopback. The first one makes
        # the fabric's secret; the others get it in their environment.
        if not self["cluster-auth-secret"]:
            self["cluster-auth-secret"] = self.settings["cluster-auth-secret"] = secrets.token_hex(32)
        self["cluster-headless"] = workerAddresses(self["workers"])
        self["pod-ip"] = workerAddress(self["worker-index"])
        self["cluster-listen-address"] = f"{self['pod-ip']}:{self['cluster-port']}"


# Twisted's default listen queue is 50: a burst of reconnecting agents (a
# pod restart, a network blip) overflows it and every dropped SYN costs its
# agent a one-second retransmit. The kernel caps this at somaxconn, as Go's
# listener asks for.
LISTEN_BACKLOG = max(socket.SOMAXCONN, 4096)


@implementer(IStreamServerEndpoint)
class _TLSEndpoint:
    """
    TLS over a TCP endpoint, as C{reactor.listenSSL} does it, but with a
    L{RefusableTLSFactory}: a connection the admission refuses is closed
    before any TLS work.
    """

    def __init__(self, endpoint, contextFactory):
        self.endpoint = endpoint
        self.contextFactory = contextFactory

    def listen(self, factory):
        return self.endpoint.listen(RefusableTLSFactory(self.contextFactory, False, factory))


def _serverEndpoint(reactor, host, port, contextFactory=None):
    if contextFactory is not None:
        return _TLSEndpoint(_serverEndpoint(reactor, host, port), contextFactory)
    if ":" in host:
        return TCP6ServerEndpoint(reactor, port, backlog=LISTEN_BACKLOG, interface=host)
    return TCP4ServerEndpoint(reactor, port, backlog=LISTEN_BACKLOG, interface=host)


def makeLogObserver(options, stream=None, budget=None, counters=None):
    """
    The observer for C{--log-file}, C{--log-format} and C{--log-level}.

    With C{--workers} every process writes its own lines to the same output
    (L{relay.workers}), each marked with its worker index. With C{budget}
    (the relay's L{relay.limits.LogBudget}), the lines Autobahn and
    Twisted write about peer traffic are under it too (L{StrangerLines}).
    """
    if stream is None:
        stream = sys.stdout if options["log-file"] == "console" else open(options["log-file"], "a", encoding="utf-8")
    index = options["worker-index"] if options["workers"] > 1 else None
    if options["log-format"] == "json":
        observer = jsonLinesFileLogObserver(stream, None if index is None else {"worker": index})
    else:
        observer = classicFileLogObserver(stream, None if index is None else f"worker-{index}")
    predicates = [LogLevelFilterPredicate(defaultLogLevel=LOG_LEVELS[options["log-level"]])]
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

    def __init__(self, relay, peerEndpoint, peerFactory, readiness, logObserver=None, reactor=None, cluster=None, tls=None):
        super().__init__()
        self.tls = tls
        self.quic = None
        self.relay = relay
        self.peerEndpoint = peerEndpoint
        self.peerFactory = peerFactory
        self.readiness = readiness
        self.logObserver = logObserver
        self.reactor = reactor
        self.cluster = cluster
        self.peerPort = None
        # With --workers, worker 0's ProcessMonitor running the others.
        self.supervisor = None

    def setServiceParent(self, parent):
        # twistd's AppLogger uses an ILogObserver component of the
        # application when there is one: the documented way for an
        # application to choose its logging.
        if self.logObserver is not None and isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, self.logObserver)
        super().setServiceParent(parent)

    def privilegedStartService(self):
        outcome = []
        self.peerEndpoint.listen(self.peerFactory).addBoth(outcome.append)
        if not outcome or isinstance(outcome[0], Failure):
            reason = outcome[0].getErrorMessage() if outcome else "listening did not complete"
            self._log.critical("cannot start the peer listener: {reason}", reason=reason)
            raise SystemExit(f"relay: cannot start the peer listener: {reason}")
        self.peerPort = outcome[0]
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
            signal.signal(signal.SIGHUP, lambda number, frame: self.reactor.callFromThread(self.reloadTLS))
        self.readiness.listenerUp = True
        self._log.info("relay listening on {address}, instance URL {url}", address=_describe(self.peerPort.getHost()), url=self.relay.instanceURL)
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
            self._log.info("open file limit raised from {before} to {soft} (the hard limit)", before=before, soft=soft)
        room = max(1, soft - descriptorsInUse() - DESCRIPTOR_RESERVE)
        self.relay.admission.maxConnections = room
        limits = self.relay.limits
        if limits.maxPeers and limits.maxPeers + limits.maxPending <= room:
            return
        self._log.warn(
            "the open file limit ({soft}) leaves room for {room} peer connections, fewer than --max-peers {peers} and --max-pending-handshakes {pending}: "
            "beyond that a new connection replaces one still waiting for Auth or is refused (relay_handshake_rejects_total{{reason=\"descriptors\"}}); raise the hard limit (ulimit -Hn, systemd LimitNOFILE, the container runtime's nofile) or lower --max-peers",
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
            try:
                self.quic.reloadCertificate()
            except ConfigurationError as e:
                self._log.error("QUIC certificate reload failed, keeping the previous one: {error}", error=str(e))

    def _signalWorkers(self, signalName):
        """
        Send C{signalName} to each running worker process, if this process
        supervises any.
        """
        if self.supervisor is None:
            return
        for name, protocol in sorted(self.supervisor.protocols.items()):
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
        # twistd re-raises the signal that stopped it once the reactor is
        # done (exit status 143 for SIGTERM). A drained relay exits normally:
        # 0 is what Kubernetes and systemd should record for a planned stop.
        if getattr(self.reactor, "_exitSignal", None) is not None:
            self.reactor._exitSignal = None


def _describe(address):
    return f"{getattr(address, 'host', '?')}:{getattr(address, 'port', '?')}"


def _peerStats(store, clock):
    def stats():
        active, idle = splitActiveIdle((peer.lastTransport for peer in store.peers.values()), clock.seconds())
        return len(store), active, idle

    return stats


def _addQuic(top, relay, reactor, host, port, options, acme):
    """
    QUIC beside WebSocket on the same host:port (UDP), whenever there is a
    certificate: from the files now, or from ACME once it has one. With
    several workers only the first serves QUIC: a QUIC connection must stay
    with one process, and UDP has no accept() to hand it over.
    """
    from relay.quic import QuicService

    def add(certFile, keyFile):
        quic = QuicService(relay, reactor, host, port, certFile, keyFile, highWater=options["peer-buffer-limit"])
        quic.setServiceParent(top)
        top.quic = quic
        return quic

    if acme is None:
        add(options["tls-cert-file"], options["tls-key-file"])
    else:
        acme.whenReady().addCallback(lambda _: add(acme.certificatePath, acme.keyPath))


def _makeCluster(options, relay, readiness, reactor):
    """
    The inter-pod fabric, or C{(None, None)} in single-pod mode.
    """
    if not options["cluster-headless"]:
        return None, None
    from relay.cluster.service import ClusterService

    counters = ClusterCounters()
    cluster = ClusterService(
        relay,
        options["pod-ip"],
        options["cluster-port"],
        options["cluster-listen"],
        options["cluster-headless"],
        options["cluster-auth-secret"],
        options["cluster-discovery-interval"],
        counters,
        reactor,
        compat=options["cluster-compat"],
        wallClock=relay.wallClock,
        noisyLog=relay.noisyLog,
    )
    relay.forwarder = cluster
    cluster.whenDiscoveryRan().addCallback(lambda _: setattr(readiness, "discoveryDone", True))
    return cluster, counters


def _makeAcme(options, readiness, reactor, onCertificate, counters, wallClock):
    """
    The ACME certificate service, or None without C{--letsencrypt-*}.
    """
    if not options["acme"]:
        return None
    from relay.acme import AcmeCertificateService

    acme = AcmeCertificateService(
        options["letsencrypt-domains"],
        options["letsencrypt-data-dir"],
        options["letsencrypt-email"],
        options["letsencrypt-directory-url"],
        reactor,
        challenge=options["letsencrypt-challenge"],
        http01Port=options["letsencrypt-http-port"],
        onCertificate=onCertificate,
        counters=counters,
        now=wallClock.seconds,
    )
    readiness.certificateReady = False
    acme.whenReady().addCallback(lambda _: setattr(readiness, "certificateReady", True))
    return acme


def makeService(options, reactor=None, wallClock=None):
    """
    The relay's service tree.

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
    if wallClock is None:
        wallClock = reactor
    store = Store()
    relay = Relay(
        validator=TokenValidator(options["auth-secret"], wallClock),
        instanceURL=options["instance-url"],
        clock=reactor,
        wallClock=wallClock,
        store=store,
        healthCheckThreshold=options["hc-attempt-threshold"],
    )
    relay.limits = options["limits"]
    readiness = Readiness(clusterMode=bool(options["cluster-headless"]))
    cluster, clusterCounters = _makeCluster(options, relay, readiness, reactor)
    metrics = RelayMetrics(
        relay.counters,
        _peerStats(store, reactor),
        clusterCounters,
        cluster.streamCount if cluster is not None else None,
    )
    if cluster is not None:
        cluster.locator.lookupObserver = metrics.recordLookupDuration
    relay.recordAuthenticationTime = metrics.recordAuthenticationTime
    relay.recordStoreTime = metrics.recordStoreTime

    def certificateRenewed(certificateOptions):
        # QUIC reads PEM files; WebSocket already asks ACME per connection.
        if top.quic is not None:
            top.quic.reloadCertificate(acme.certificatePath, acme.keyPath)

    acme = _makeAcme(options, readiness, reactor, certificateRenewed, relay.counters, wallClock)
    tls = acme.serverConnectionCreator() if acme is not None else options["tls-options"]
    host, port = options["listen"]
    if options["workers"] > 1:
        from relay.workers import ReusePortEndpoint

        peerEndpoint = ReusePortEndpoint(reactor, host, port, tls, backlog=LISTEN_BACKLOG)
    else:
        peerEndpoint = _serverEndpoint(reactor, host, port, tls)
    top = RelayService(
        relay,
        peerEndpoint,
        PeerWebSocketFactory(relay, reactor, highWater=options["peer-buffer-limit"]),
        readiness,
        logObserver=makeLogObserver(options, budget=relay.noisyLog, counters=relay.counters),
        reactor=reactor,
        cluster=cluster,
        tls=options["tls-options"],
    )
    if options["metrics-port"]:
        site = makeMetricsSite(metrics.registry, readiness, reactor=reactor, refusals=relay.counters.metricsRefusals)
        StreamServerEndpointService(_serverEndpoint(reactor, options["metrics-address"], options["metrics-port"]), site).setServiceParent(top)
    if acme is not None:
        acme.setServiceParent(top)
    if options["tls"] and options["worker-index"] == 0:
        _addQuic(top, relay, reactor, host, port, options, acme)
    if options["workers"] > 1:
        from relay.workers import SupervisorWatch, makeSupervisor

        if options["worker-index"] == 0:
            top.supervisor = makeSupervisor(options, reactor, variableFor)
            top.supervisor.setServiceParent(top)
        else:
            SupervisorWatch(reactor).setServiceParent(top)
    return top
