"""
The HTTP side of the metrics port: C{/metrics}, C{/healthz} and C{/readyz}.

Why it is written this way:

  - C{/metrics} renders in the reactor thread. The counters it reads are plain
    integers and C{collections.Counter}s that only the reactor thread writes;
    C{prometheus_client.twisted.MetricsResource} would collect in a thread pool
    and could iterate a C{Counter} while the data path adds a key to it. A
    collection is a few dozen small series, far cheaper than the thread hop.
  - Kubernetes needs two different answers. C{/healthz} (liveness) says the
    process and its reactor still answer: failing it gets the pod killed.
    C{/readyz} (readiness) says the pod should receive new peers: the peer
    listener is up, cluster discovery ran once, and the pod is not draining.
  - A scrape every few seconds must not write an access-log line each time:
    requests are logged at debug level only.
  - The port listens on every interface by default, so strangers reach it:
    it holds at most L{MAX_CONNECTIONS} connections (a new one evicts the
    oldest, so idle connections never lock out the kubelet's probes), drops
    connections idle for L{IDLE_TIMEOUT} seconds, and answers any method but
    GET / HEAD and any request body with 405 / 413 before reading a byte of
    the body (Twisted would otherwise spool a body over 100 kB to a
    temporary file, whatever the resource). Each refusal is counted.
"""

from collections import Counter

from prometheus_client.exposition import choose_encoder
from twisted.logger import Logger
from twisted.protocols import policies
from twisted.web import http, resource, server
from twisted.web.resource import EncodingResourceWrapper
from twisted.web.server import GzipEncoderFactory

_log = Logger()

_TEXT_PLAIN = b"text/plain; charset=utf-8"

# Connections held at once: a scraper or two, the kubelet's probes and an
# operator's curl need a handful; each one costs a file descriptor.
MAX_CONNECTIONS = 32
# Seconds a connection may stay silent (Twisted's HTTPChannel timeout): a
# scrape or a probe takes milliseconds, and a scraper reconnects at its next
# interval.
IDLE_TIMEOUT = 30
_SERVED_METHODS = (b"GET", b"HEAD")
_METHOD_NOT_ALLOWED = (
    b"HTTP/1.1 405 Method Not Allowed\r\nAllow: GET, HEAD\r\nConnection: close\r\n"
    b"Content-Length: 0\r\n\r\n"
)
_CONTENT_TOO_LARGE = (
    b"HTTP/1.1 413 Content Too Large\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
)


class Readiness:
    """
    Whether this pod should be sent new peers, from three flags the service
    sets as it starts and stops.

    @ivar listenerUp: the peer listener is accepting connections.
    @ivar discoveryDone: cluster discovery completed its first pass (always
        True in single-pod mode).
    @ivar draining: the process is shutting down; once set, the pod stays
        unready.
    @ivar certificateReady: the TLS certificate is available (False only
        while an ACME certificate is being obtained).
    """

    def __init__(self, clusterMode=False):
        """
        @param clusterMode: True when the inter-pod fabric runs, so readiness
            also waits for the first discovery pass.
        """
        self.listenerUp = False
        self.discoveryDone = not clusterMode
        self.draining = False
        self.certificateReady = True

    def __call__(self):
        """
        @return: C{(ready, reason)}, reason being C{"ok"} when ready.
        """
        if self.draining:
            return False, "draining"
        if not self.listenerUp:
            return False, "peer listener not up"
        if not self.discoveryDone:
            return False, "cluster discovery has not completed a pass"
        if not self.certificateReady:
            return False, "no TLS certificate yet"
        return True, "ok"


class MetricsResource(resource.Resource):
    """
    The Prometheus exposition of one registry, in the format the scraper's
    C{Accept} header asks for (text 0.0.4 or OpenMetrics).
    """

    isLeaf = True

    def __init__(self, registry):
        super().__init__()
        self._registry = registry

    def render_GET(self, request):
        encoder, contentType = choose_encoder(request.getHeader("accept"))
        request.setHeader(b"content-type", contentType.encode("ascii"))
        return encoder(self._registry)


class HealthResource(resource.Resource):
    """
    Liveness: answers 200 as long as the reactor turns.
    """

    isLeaf = True

    def render_GET(self, request):
        request.setHeader(b"content-type", _TEXT_PLAIN)
        return b"ok\n"


class ReadinessResource(resource.Resource):
    """
    Readiness: 200 when the readiness callable says so, 503 with its reason
    otherwise.
    """

    isLeaf = True

    def __init__(self, readiness):
        """
        @param readiness: a callable returning a bool or C{(bool, reason)},
            such as a L{Readiness}.
        """
        super().__init__()
        self._readiness = readiness

    def render_GET(self, request):
        answer = self._readiness()
        if isinstance(answer, tuple):
            ready, reason = answer
        else:
            ready, reason = bool(answer), "ok" if answer else "not ready"
        request.setHeader(b"content-type", _TEXT_PLAIN)
        request.setHeader(b"cache-control", b"no-store")
        if not ready:
            request.setResponseCode(503)
        return reason.encode("utf-8") + b"\n"


class _BodilessChannel(http.HTTPChannel):
    """
    An HTTP channel for GET and HEAD requests without a body: anything else
    is answered 405 or 413 as soon as its headers are in, and the connection
    is closed without reading the body.
    """

    _refused = False

    def allHeadersReceived(self):
        # The request line and the framing headers (Content-Length or
        # Transfer-Encoding, which set length to > 0 or None) are known here,
        # before the first byte of a body is read.
        if self._command not in _SERVED_METHODS:
            reason, answer = "method", _METHOD_NOT_ALLOWED
        elif self.length != 0:
            reason, answer = "body", _CONTENT_TOO_LARGE
        else:
            super().allHeadersReceived()
            return
        self._refused = True
        self.site.refusals[reason] += 1
        self.transport.write(answer)
        self.loseConnection()
        # Whatever else this read holds goes to rawDataReceived, unread.
        self.setRawMode()

    def allContentReceived(self):
        if not self._refused:
            super().allContentReceived()

    def rawDataReceived(self, data):
        if not self._refused:
            super().rawDataReceived(data)


class QuietSite(server.Site):
    """
    A Site for a port that strangers reach (the metrics port, ACME's port
    80): it writes no access-log line above debug, so that scrapes, probes
    and scanners never fill the log.

    @ivar refusals: connections and requests refused, by reason (the
        channel counts its own refusals here).
    """

    noisy = False

    def __init__(self, root, channel, refusals, logLabel=None, **kwargs):
        """
        @param channel: the C{HTTPChannel} subclass to serve with, with the
            bounds this port needs.
        @param logLabel: what a debug line per request starts with; None
            for no line at all.
        @param kwargs: for C{Site} (C{requestFactory}, C{timeout},
            C{reactor}).
        """
        super().__init__(root, **kwargs)
        self.protocol = channel
        self.refusals = refusals
        self.logLabel = logLabel

    def log(self, request):
        if self.logLabel is None:
            return
        _log.debug(
            "{label}: {method} {uri} {code}",
            label=self.logLabel,
            method=request.method.decode("ascii", "replace"),
            uri=request.uri.decode("ascii", "replace"),
            code=request.code,
        )


def makeMetricsRoot(registry, readiness):
    """
    The resource tree of the metrics port.

    @param registry: the C{prometheus_client.CollectorRegistry} to expose
        (L{relay.metrics.RelayMetrics.registry}).
    @param readiness: see L{ReadinessResource}.
    """
    root = resource.Resource()
    root.putChild(
        b"metrics",
        EncodingResourceWrapper(MetricsResource(registry), [GzipEncoderFactory()]),
    )
    root.putChild(b"healthz", HealthResource())
    root.putChild(b"readyz", ReadinessResource(readiness))
    return root


class _Lifetime(policies.ProtocolWrapper, policies.TimeoutMixin):
    """
    A connection aborted after its factory's C{lifetime} seconds, however
    it trickles: a channel's own timeout only measures idle time.
    """

    def makeConnection(self, transport):
        self.callLater = self.factory.reactor.callLater
        self.setTimeout(self.factory.lifetime)
        super().makeConnection(transport)

    def connectionLost(self, reason):
        self.setTimeout(None)
        super().connectionLost(reason)

    def timeoutConnection(self):
        self.transport.abortConnection()


class ConnectionCap(policies.WrappingFactory):
    """
    Holds at most C{limit} connections of the wrapped factory, counting
    each one turned away at the limit as C{refusals["connections"]}.

    At the limit a new connection either evicts the oldest (C{evict}) or is
    closed at once. Evicting suits a port that must stay reachable for a
    few known clients (the metrics port: refusing would let whoever holds
    C{limit} idle connections lock out the kubelet's C{/healthz} probe and
    get the pod restarted; scrapes and probes last milliseconds, so the
    oldest connection is nearly always one that sits idle or trickles);
    ACME's port 80 closes new ones instead, each held connection living at
    most C{lifetime}. Twisted's policies have no cap that wraps a C{Site}:
    C{LimitTotalConnectionsFactory} refuses only, and builds its protocol
    itself, bypassing C{Site.buildProtocol}; C{ThrottlingFactory} logs
    every refusal, which a flood would turn into a flood of log lines.
    """

    noisy = False

    def __init__(self, wrappedFactory, limit, refusals, evict=True, lifetime=None, reactor=None):
        """
        @param lifetime: seconds after which any connection is aborted, or
            None for no bound.
        @param reactor: the L{IReactorTime} for C{lifetime}.
        """
        super().__init__(wrappedFactory)
        self.limit = limit
        self.refusals = refusals
        self.evict = evict
        self.lifetime = lifetime
        self.reactor = reactor
        if lifetime is not None:
            self.protocol = _Lifetime

    def buildProtocol(self, addr):
        if len(self.protocols) >= self.limit:
            self.refusals["connections"] += 1
            if not self.evict:
                return None
            oldest = next(iter(self.protocols))
            # Forgotten now: its connectionLost comes a reactor turn later.
            del self.protocols[oldest]
            oldest.transport.abortConnection()
        return super().buildProtocol(addr)

    def unregisterProtocol(self, p):
        self.protocols.pop(p, None)


def makeMetricsSite(registry, readiness, reactor=None, refusals=None):
    """
    The C{twisted.web} factory to listen with on the metrics port, e.g.
    C{strports.service("tcp:9090", makeMetricsSite(...))}.

    @param registry: see L{makeMetricsRoot}.
    @param readiness: see L{ReadinessResource}.
    @param reactor: the L{IReactorTime} for connection timeouts; the global
        reactor when None.
    @param refusals: the C{Counter} to count evicted connections
        (C{connections}) and refused requests (C{method}, C{body}) in,
        such as L{relay.counters.RelayCounters.metricsRefusals}.
    """
    refusals = Counter() if refusals is None else refusals
    site = QuietSite(
        makeMetricsRoot(registry, readiness),
        _BodilessChannel,
        refusals,
        logLabel="metrics port",
        timeout=IDLE_TIMEOUT,
        reactor=reactor,
    )
    return ConnectionCap(site, MAX_CONNECTIONS, refusals)
