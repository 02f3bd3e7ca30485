"""
OpenTelemetry instruments of the relay, exposed in the Prometheus format.

Why this module looks the way it does:

  - Grafana dashboards built for the Go relay query its metric names, so every
    name, instrument kind and label key here is the Go one
    (C{relay/metrics/realy.go}, C{relay/server/cluster/metrics.go}). The Go
    code declares no units, and neither do we: the Prometheus exporter then
    appends no unit suffix, and names ending in C{_total} stay as they are.
  - The data path must not pay for metrics. It increments plain integers in
    L{relay.counters}; here observable instruments read them only when
    Prometheus scrapes. The only synchronous instruments are the three
    histograms, recorded once per handshake or lookup, never per packet.
  - Each L{RelayMetrics} owns its own C{prometheus_client.CollectorRegistry}
    and its own C{MeterProvider}, never the process-wide globals, so a test
    can build as many as it likes.

Everything is collected in the thread that serves C{/metrics}; L{relay.web}
serves it from the reactor thread, the one that owns the counters.
"""

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource
from prometheus_client import CollectorRegistry

from relay.cluster import frames

# A connected peer is idle once no Transport message went through it for this
# many seconds (Go: idleTimeout in relay/metrics/realy.go).
IDLE_TIMEOUT = 30.0

# Go: getStandardBucketBoundaries(), in milliseconds. Floats, so that the
# "le" labels read "1.0" as the Go exporter writes them in OpenMetrics.
STANDARD_BUCKETS_MS = (0.1, 0.5, 1.0, 5.0, 10.0, 50.0, 100.0, 500.0, 1000.0, 5000.0, 10000.0)

# Go: relay_cluster_lookup_duration_seconds boundaries, in seconds.
LOOKUP_BUCKETS_SECONDS = (0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 2.0)

# Label values exported at zero before their first event, so that an alert
# on increase() sees the very first one.
FORWARD_RESULTS = ("ok", "peer_not_found", "stream_gone", "send_error")
HELLO_REJECT_REASONS = (
    frames.HMAC_MISMATCH,
    frames.UNSIGNED_BUT_REQUIRED,
    frames.SIGNED_BUT_UNSUPPORTED,
    frames.STALE_TIMESTAMP,
    frames.MALFORMED,
    frames.TIMEOUT,
    frames.FIRST_FRAME_NOT_HELLO,
    frames.ADDRESS_MISMATCH,
    frames.REPLAYED,
    frames.AUTH_MISMATCH,
    frames.NOT_SECURED,
    frames.CONNECTION_LIMIT,
    frames.EVICTED,
)
TRANSPORTS = ("websocket", "quic")

_METER_NAME = "relay"


def splitActiveIdle(lastActivity, now, idleTimeout=IDLE_TIMEOUT):
    """
    Count active and idle peers the way the Go relay does.

    @param lastActivity: for every connected peer, the time (seconds, same
        clock as C{now}) of its last Transport message, or None if it has
        sent none yet: such a peer is idle, as in Go, where a new peer starts
        at the zero time.
    @param now: the current time.
    @return: C{(active, idle)}.
    """
    active = idle = 0
    for last in lastActivity:
        if last is None or now - last > idleTimeout:
            idle += 1
        else:
            active += 1
    return active, idle


def _observeScalar(read):
    def callback(options):
        yield Observation(read())

    return callback


def _observeByLabel(key, read, seeded=()):
    """
    A callback observing one value per label value of a C{Counter}.

    C{read} is called at each collection, so the owner may replace the
    C{Counter} object; the label values in C{seeded} are observed at zero
    until they occur.
    """

    def callback(options):
        counts = read()
        for value in seeded:
            if value not in counts:
                yield Observation(0, {key: value})
        for value, count in list(counts.items()):
            yield Observation(count, {key: value})

    return callback


class _ScrapeMarker:
    """
    A collector without metrics, registered first in a registry, that counts
    the registry's collections: a scrape's observable callbacks all run with
    the same L{generation}.
    """

    def __init__(self):
        self.generation = 0

    def collect(self):
        self.generation += 1
        return ()


def _oncePerScrape(marker, compute):
    """
    C{compute}, called at most once per scrape of C{marker}'s registry: the
    callbacks of one scrape share its result.
    """
    cache = [None, None]

    def cached():
        if cache[0] != marker.generation:
            cache[1] = compute()
            cache[0] = marker.generation
        return cache[1]

    return cached


class RelayMetrics:
    """
    The relay's instruments, wired to a private Prometheus registry.

    @ivar registry: the C{prometheus_client.CollectorRegistry} to serve on
        C{/metrics} (see L{relay.web.makeMetricsSite}).
    """

    def __init__(self, counters, peerStats, clusterCounters=None, clusterStreams=None):
        """
        @param counters: the L{relay.counters.RelayCounters} the peer side
            increments.
        @param peerStats: a callable returning C{(peers, active, idle)}, the
            number of stored peers and how many of them are active and idle
            (see L{splitActiveIdle}). It is called once per scrape.
        @param clusterCounters: the L{relay.counters.ClusterCounters} of the
            inter-pod fabric, or None in single-pod mode, where no
            C{relay_cluster_*} metric is exported (as in Go).
        @param clusterStreams: a callable returning the number of live
            inter-pod streams, or None: C{relay_cluster_streams} is then
            declared but has no sample, as in Go without a stream source.
        """
        self.registry = CollectorRegistry()
        # Before the reader's collector, so that it counts a scrape before
        # the callbacks run.
        marker = _ScrapeMarker()
        self.registry.register(marker)
        self._reader = PrometheusMetricReader(registry=self.registry)
        self._provider = MeterProvider(
            metric_readers=[self._reader],
            resource=Resource.create({"service.name": "relay"}),
            shutdown_on_exit=False,
        )
        meter = self._provider.get_meter(_METER_NAME)
        self._clusterEnabled = clusterCounters is not None

        self._declarePeerSide(meter, counters, _oncePerScrape(marker, peerStats))
        if self._clusterEnabled:
            self._declareCluster(meter, clusterCounters, clusterStreams)

    def _declarePeerSide(self, meter, counters, peerStats):
        meter.create_observable_counter(
            "relay_transfer_sent_bytes_total",
            callbacks=[_observeScalar(lambda: counters.transferSentBytes)],
            description="Total number of bytes sent to peers",
        )
        meter.create_observable_counter(
            "relay_transfer_received_bytes_total",
            callbacks=[_observeScalar(lambda: counters.transferReceivedBytes)],
            description="Total number of bytes received from peers",
        )
        meter.create_observable_up_down_counter(
            "relay_peers",
            callbacks=[_observeScalar(lambda: peerStats()[0])],
            description="Number of connected peers",
        )
        meter.create_observable_gauge(
            "relay_peers_active",
            callbacks=[_observeScalar(lambda: peerStats()[1])],
            description="Number of active connected peers",
        )
        meter.create_observable_gauge(
            "relay_peers_idle",
            callbacks=[_observeScalar(lambda: peerStats()[2])],
            description="Number of idle connected peers",
        )
        self._authenticationTime = meter.create_histogram(
            "relay_peer_authentication_time_milliseconds",
            description="Time taken to authenticate a peer",
            explicit_bucket_boundaries_advisory=STANDARD_BUCKETS_MS,
        )
        self._storeTime = meter.create_histogram(
            "relay_peer_store_time_milliseconds",
            description="Time taken to store a new peer connection",
            explicit_bucket_boundaries_advisory=STANDARD_BUCKETS_MS,
        )
        meter.create_observable_counter(
            "relay_peer_reconnections_total",
            callbacks=[_observeScalar(lambda: counters.reconnections)],
            description="Total number of times peers have reconnected and closed old connections",
        )
        meter.create_observable_counter(
            "relay_handshake_rejects_total",
            callbacks=[_observeByLabel("reason", lambda: counters.handshakeRejects)],
            description="Failed peer handshakes, split by reason",
        )
        meter.create_observable_counter(
            "relay_dropped_messages_total",
            callbacks=[_observeByLabel("reason", lambda: counters.dropped)],
            description="Messages dropped instead of delivered, split by reason",
        )
        meter.create_observable_counter(
            "relay_sender_pauses_total",
            callbacks=[_observeScalar(lambda: counters.senderPauses)],
            description=(
                "Times a sender was left unread because its messages were dropped for a "
                "congested destination"
            ),
        )
        meter.create_observable_up_down_counter(
            "relay_connections",
            callbacks=[_observeByLabel("transport", lambda: counters.connections, TRANSPORTS)],
            description="Open peer connections, authenticated or not, split by transport",
        )
        meter.create_observable_counter(
            "relay_metrics_refusals_total",
            callbacks=[_observeByLabel("reason", lambda: counters.metricsRefusals)],
            description=(
                "Metrics-port connections evicted at its limit and requests refused unread, "
                "split by reason"
            ),
        )
        meter.create_observable_counter(
            "relay_quic_refusals_total",
            callbacks=[_observeByLabel("reason", lambda: counters.quicRefusals)],
            description=(
                "QUIC datagrams and connections refused before reaching a session (unknown "
                "connection id, malformed, failed handshake, Retry sent, ...), split by reason"
            ),
        )
        meter.create_observable_counter(
            "relay_protocol_errors_total",
            callbacks=[_observeByLabel("reason", lambda: counters.protocolErrors)],
            description="Authenticated peers closed for a protocol error, split by reason",
        )

    def _declareCluster(self, meter, clusterCounters, clusterStreams):
        meter.create_observable_counter(
            "relay_cluster_forwards_total",
            callbacks=[
                _observeByLabel("result", lambda: clusterCounters.forwards, FORWARD_RESULTS)
            ],
            description="Cross-pod forward attempts split by outcome",
        )
        self._lookupDuration = meter.create_histogram(
            "relay_cluster_lookup_duration_seconds",
            description="Time spent in a peer locator lookup (broadcast → first I_HAVE)",
            explicit_bucket_boundaries_advisory=LOOKUP_BUCKETS_SECONDS,
        )
        meter.create_observable_counter(
            "relay_cluster_hello_rejects_total",
            callbacks=[
                _observeByLabel(
                    "reason", lambda: clusterCounters.helloRejects, HELLO_REJECT_REASONS
                )
            ],
            description="Inter-pod HELLO frames dropped at handshake, split by reason",
        )
        meter.create_observable_counter(
            "relay_cluster_pings_sent_total",
            callbacks=[_observeScalar(lambda: clusterCounters.pingsSent)],
            description="Inter-pod PING frames the keepalive loop emitted",
        )
        meter.create_observable_counter(
            "relay_cluster_pings_lost_total",
            callbacks=[_observeScalar(lambda: clusterCounters.pingsLost)],
            description="PINGs that didn't get a PONG back inside the keepalive deadline",
        )
        meter.create_observable_counter(
            "relay_cluster_dropped_total",
            callbacks=[_observeByLabel("reason", lambda: clusterCounters.dropped)],
            description="Inter-pod frames or queued packets dropped, split by reason",
        )
        streamCallbacks = []
        if clusterStreams is not None:
            streamCallbacks.append(_observeScalar(clusterStreams))
        meter.create_observable_gauge(
            "relay_cluster_streams",
            callbacks=streamCallbacks,
            description="Number of live inter-pod TCP streams owned by this pod",
        )

    def recordAuthenticationTime(self, milliseconds):
        """
        Record how long one peer handshake took, from the first byte to the
        authenticated peer (Go: RecordAuthenticationTime).
        """
        self._authenticationTime.record(milliseconds)

    def recordStoreTime(self, milliseconds):
        """
        Record how long storing one authenticated peer took (Go:
        RecordPeerStoreTime).
        """
        self._storeTime.record(milliseconds)

    def recordLookupDuration(self, seconds):
        """
        Record one locator lookup, from WHO_HAS broadcast to its outcome (Go:
        ObserveLookup). Ignored in single-pod mode, which has no lookups.
        """
        if self._clusterEnabled:
            self._lookupDuration.record(seconds)

    def shutdown(self):
        """
        Stop collecting and take the exporter out of L{registry}.
        """
        self._provider.shutdown()
