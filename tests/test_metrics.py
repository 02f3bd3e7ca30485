"""
Tests for L{relay.metrics}: the exported Prometheus text must carry exactly
the Go relay's metric names, kinds, labels and buckets, and must follow the
plain counters of L{relay.counters} at scrape time.
"""

from prometheus_client import generate_latest
from prometheus_client.openmetrics.exposition import (
    generate_latest as generateOpenMetrics,
)
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parseOpenMetrics,
)
from prometheus_client.parser import text_string_to_metric_families
from twisted.trial import unittest

from relay.counters import ClusterCounters, RelayCounters
from relay.metrics import (
    LOOKUP_BUCKETS_SECONDS,
    STANDARD_BUCKETS_MS,
    RelayMetrics,
    splitActiveIdle,
)

PEER_SIDE = {
    "relay_transfer_sent_bytes_total": "counter",
    "relay_transfer_received_bytes_total": "counter",
    "relay_peers": "gauge",
    "relay_peers_active": "gauge",
    "relay_peers_idle": "gauge",
    "relay_peer_authentication_time_milliseconds": "histogram",
    "relay_peer_store_time_milliseconds": "histogram",
    "relay_peer_reconnections_total": "counter",
    "relay_handshake_rejects_total": "counter",
    "relay_dropped_messages_total": "counter",
    "relay_connections": "gauge",
    "relay_protocol_errors_total": "counter",
    "relay_sender_pauses_total": "counter",
}

CLUSTER = {
    "relay_cluster_forwards_total": "counter",
    "relay_cluster_lookup_duration_seconds": "histogram",
    "relay_cluster_hello_rejects_total": "counter",
    "relay_cluster_pings_sent_total": "counter",
    "relay_cluster_pings_lost_total": "counter",
    "relay_cluster_dropped_total": "counter",
    "relay_cluster_streams": "gauge",
}

SCOPE_LABELS = {"otel_scope_name", "otel_scope_version", "otel_scope_schema_url"}


def declaredTypes(text):
    """
    The C{# TYPE} lines of a text exposition, as {name: type}.
    """
    types = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            types[name] = kind
    return types


def samples(text):
    """
    Every sample of a text 0.0.4 exposition, keyed by (sample name,
    frozenset of its labels without the OpenTelemetry scope labels).
    """
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = frozenset((k, v) for k, v in sample.labels.items() if k not in SCOPE_LABELS)
            found[(sample.name, labels)] = sample.value
    return found


def exercise(fixture):
    """
    Give every metric of C{fixture} a sample: a histogram never recorded and
    a labelled counter with no key yet export nothing, as in Go.
    """
    fixture.metrics.recordAuthenticationTime(1)
    fixture.metrics.recordStoreTime(1)
    fixture.metrics.recordLookupDuration(0.01)
    fixture.counters.handshakeRejects["bad_token"] += 1
    fixture.counters.dropped["unknown_peer"] += 1
    fixture.counters.protocolErrors["malformed"] += 1
    if fixture.cluster is not None:
        fixture.cluster.dropped["queue_full"] += 1


class Fixture:
    """
    A RelayMetrics over fresh counters, with settable peer stats.
    """

    def __init__(self, cluster=False, streams=None):
        self.counters = RelayCounters()
        self.cluster = ClusterCounters() if cluster else None
        self.stats = (0, 0, 0)
        self.metrics = RelayMetrics(self.counters, lambda: self.stats, self.cluster, streams)

    def text(self):
        return generate_latest(self.metrics.registry).decode("utf-8")

    def samples(self):
        return samples(self.text())


class NamesTests(unittest.TestCase):
    """
    The exported names are exactly the Go relay's.
    """

    def test_singlePodNames(self):
        """
        In single-pod mode the peer-side metrics are exported with the Go
        kinds, and no relay_cluster_* metric is.
        """
        fixture = Fixture()
        self.addCleanup(fixture.metrics.shutdown)
        exercise(fixture)
        types = declaredTypes(fixture.text())
        types.pop("target_info")
        self.assertEqual(types, PEER_SIDE)

    def test_clusterNames(self):
        """
        With cluster counters, the relay_cluster_* metrics are exported too.
        """
        fixture = Fixture(cluster=True, streams=lambda: 2)
        self.addCleanup(fixture.metrics.shutdown)
        exercise(fixture)
        types = declaredTypes(fixture.text())
        types.pop("target_info")
        self.assertEqual(types, {**PEER_SIDE, **CLUSTER})

    def test_noSuffixAdded(self):
        """
        No unit or _total suffix is appended to a name that already carries
        it, in the text format or in OpenMetrics.
        """
        fixture = Fixture(cluster=True, streams=lambda: 1)
        self.addCleanup(fixture.metrics.shutdown)
        fixture.metrics.recordAuthenticationTime(1)
        fixture.metrics.recordStoreTime(1)
        fixture.metrics.recordLookupDuration(0.01)
        for text in (
            fixture.text(),
            generateOpenMetrics(fixture.metrics.registry).decode("utf-8"),
        ):
            for doubled in (
                "_total_total",
                "_milliseconds_milliseconds",
                "_seconds_seconds",
                "_bytes_total_bytes",
            ):
                self.assertNotIn(doubled, text)
            self.assertNotIn("# UNIT", text)

    def test_openMetricsSampleNames(self):
        """
        A scraper asking for OpenMetrics gets the same sample names.
        """
        fixture = Fixture(cluster=True, streams=lambda: 1)
        self.addCleanup(fixture.metrics.shutdown)
        exercise(fixture)
        text = generateOpenMetrics(fixture.metrics.registry).decode("utf-8")
        names = {sample.name for family in parseOpenMetrics(text) for sample in family.samples}
        expected = {"target_info"}
        for name, kind in {**PEER_SIDE, **CLUSTER}.items():
            if kind == "histogram":
                expected.update(name + s for s in ("_bucket", "_count", "_sum"))
            else:
                expected.add(name)
        self.assertEqual(names, expected)

    def test_labelKeys(self):
        """
        Besides the OpenTelemetry scope labels, each metric carries only the
        label key the Go relay (or this relay's additions) declares.
        """
        fixture = Fixture(cluster=True, streams=lambda: 1)
        self.addCleanup(fixture.metrics.shutdown)
        fixture.counters.handshakeRejects["bad_token"] += 1
        fixture.counters.dropped["unknown_peer"] += 1
        fixture.counters.protocolErrors["malformed"] += 1
        fixture.cluster.dropped["queue_full"] += 1
        expected = {
            "relay_handshake_rejects_total": {"reason"},
            "relay_dropped_messages_total": {"reason"},
            "relay_protocol_errors_total": {"reason"},
            "relay_connections": {"transport"},
            "relay_cluster_forwards_total": {"result"},
            "relay_cluster_hello_rejects_total": {"reason"},
            "relay_cluster_dropped_total": {"reason"},
            "relay_transfer_sent_bytes_total": set(),
            "relay_peers": set(),
            "relay_cluster_streams": set(),
        }
        keys = {}
        for (name, labels), _ in fixture.samples().items():
            keys.setdefault(name, set()).update(k for k, _ in labels)
        for name, labelKeys in expected.items():
            self.assertEqual(keys[name], labelKeys, name)


class CounterTests(unittest.TestCase):
    """
    Scrapes follow the plain counters by exact amounts.
    """

    def setUp(self):
        self.fixture = Fixture(cluster=True, streams=lambda: 0)
        self.addCleanup(self.fixture.metrics.shutdown)

    def test_transferBytes(self):
        """
        The transfer counters report what the data path added since the
        previous scrape.
        """
        counters = self.fixture.counters
        counters.transferSentBytes += 100
        counters.transferReceivedBytes += 40
        before = self.fixture.samples()
        counters.transferSentBytes += 1234
        counters.transferReceivedBytes += 56
        after = self.fixture.samples()
        sent = ("relay_transfer_sent_bytes_total", frozenset())
        received = ("relay_transfer_received_bytes_total", frozenset())
        self.assertEqual(before[sent], 100)
        self.assertEqual(after[sent] - before[sent], 1234)
        self.assertEqual(after[received] - before[received], 56)

    def test_reconnectionsAndPings(self):
        """
        Unlabelled counters are exported as they stand.
        """
        self.fixture.counters.reconnections = 3
        self.fixture.cluster.pingsSent = 9
        self.fixture.cluster.pingsLost = 2
        found = self.fixture.samples()
        self.assertEqual(found[("relay_peer_reconnections_total", frozenset())], 3)
        self.assertEqual(found[("relay_cluster_pings_sent_total", frozenset())], 9)
        self.assertEqual(found[("relay_cluster_pings_lost_total", frozenset())], 2)

    def test_labelledCounters(self):
        """
        Each key of a labelled counter becomes one series with that label
        value.
        """
        counters = self.fixture.counters
        counters.dropped["unknown_peer"] += 2
        counters.dropped["slow_consumer"] += 5
        counters.handshakeRejects["bad_token"] += 1
        counters.protocolErrors["unexpected_message"] += 4
        counters.senderPauses += 9
        counters.quicRefusals["unknown_connection"] += 7
        self.fixture.cluster.forwards["ok"] += 11
        self.fixture.cluster.forwards["stream_gone"] += 1
        self.fixture.cluster.helloRejects["hmac_mismatch"] += 3
        self.fixture.cluster.dropped["queue_full"] += 6
        found = self.fixture.samples()

        def value(name, key, label):
            return found[(name, frozenset({(key, label)}))]

        self.assertEqual(value("relay_dropped_messages_total", "reason", "unknown_peer"), 2)
        self.assertEqual(value("relay_dropped_messages_total", "reason", "slow_consumer"), 5)
        self.assertEqual(value("relay_handshake_rejects_total", "reason", "bad_token"), 1)
        self.assertEqual(value("relay_protocol_errors_total", "reason", "unexpected_message"), 4)
        self.assertEqual(found[("relay_sender_pauses_total", frozenset())], 9)
        self.assertEqual(value("relay_quic_refusals_total", "reason", "unknown_connection"), 7)
        self.assertEqual(value("relay_cluster_forwards_total", "result", "ok"), 11)
        self.assertEqual(value("relay_cluster_forwards_total", "result", "stream_gone"), 1)
        self.assertEqual(value("relay_cluster_hello_rejects_total", "reason", "hmac_mismatch"), 3)
        self.assertEqual(value("relay_cluster_dropped_total", "reason", "queue_full"), 6)

        counters.dropped["unknown_peer"] += 1
        again = self.fixture.samples()
        self.assertEqual(
            again[
                (
                    "relay_dropped_messages_total",
                    frozenset({("reason", "unknown_peer")}),
                )
            ],
            3,
        )

    def test_seededLabels(self):
        """
        Forward results, HELLO reject reasons and transports are exported at
        zero before their first event.
        """
        found = self.fixture.samples()
        for result in ("ok", "peer_not_found", "stream_gone", "send_error"):
            key = ("relay_cluster_forwards_total", frozenset({("result", result)}))
            self.assertEqual(found[key], 0, result)
        for reason in (
            "hmac_mismatch",
            "unsigned_but_required",
            "signed_but_unsupported",
            "stale_timestamp",
            "malformed",
            "timeout",
            "first_frame_not_hello",
            "address_mismatch",
            "replayed",
            "auth_mismatch",
            "not_secured",
            "connection_limit",
            "evicted",
        ):
            key = ("relay_cluster_hello_rejects_total", frozenset({("reason", reason)}))
            self.assertEqual(found[key], 0, reason)
        for transport in ("websocket", "quic"):
            key = ("relay_connections", frozenset({("transport", transport)}))
            self.assertEqual(found[key], 0, transport)

    def test_connectionsGoDown(self):
        """
        relay_connections follows open connections up and down.
        """
        self.fixture.counters.connections["websocket"] += 3
        self.fixture.counters.connections["quic"] += 1
        first = self.fixture.samples()
        self.fixture.counters.connections["websocket"] -= 2
        second = self.fixture.samples()
        ws = ("relay_connections", frozenset({("transport", "websocket")}))
        quic = ("relay_connections", frozenset({("transport", "quic")}))
        self.assertEqual((first[ws], first[quic]), (3, 1))
        self.assertEqual((second[ws], second[quic]), (1, 1))

    def test_peerStats(self):
        """
        relay_peers, relay_peers_active and relay_peers_idle come from the
        peer stats callable at each scrape.
        """
        self.fixture.stats = (5, 3, 2)
        first = self.fixture.samples()
        self.fixture.stats = (4, 1, 3)
        second = self.fixture.samples()
        names = ("relay_peers", "relay_peers_active", "relay_peers_idle")
        self.assertEqual([first[(n, frozenset())] for n in names], [5, 3, 2])
        self.assertEqual([second[(n, frozenset())] for n in names], [4, 1, 3])

    def test_peerStatsOncePerScrape(self):
        """
        The peer stats callable, O(peers), is called once per scrape though
        three metrics come from it.
        """
        calls = []

        def stats():
            calls.append(None)
            return (len(calls) + 4, len(calls), 4)

        metrics = RelayMetrics(RelayCounters(), stats)
        self.addCleanup(metrics.shutdown)
        first = samples(generate_latest(metrics.registry).decode("utf-8"))
        self.assertEqual(len(calls), 1)
        second = samples(generate_latest(metrics.registry).decode("utf-8"))
        self.assertEqual(len(calls), 2)
        names = ("relay_peers", "relay_peers_active", "relay_peers_idle")
        self.assertEqual([first[(n, frozenset())] for n in names], [5, 1, 4])
        self.assertEqual([second[(n, frozenset())] for n in names], [6, 2, 4])

    def test_clusterStreams(self):
        """
        relay_cluster_streams reports the stream source at each scrape.
        """
        streams = [3]
        fixture = Fixture(cluster=True, streams=lambda: streams[0])
        self.addCleanup(fixture.metrics.shutdown)
        self.assertEqual(fixture.samples()[("relay_cluster_streams", frozenset())], 3)
        streams[0] = 1
        self.assertEqual(fixture.samples()[("relay_cluster_streams", frozenset())], 1)

    def test_clusterStreamsWithoutSource(self):
        """
        Without a stream source, relay_cluster_streams has no sample.
        """
        fixture = Fixture(cluster=True)
        self.addCleanup(fixture.metrics.shutdown)
        self.assertNotIn(("relay_cluster_streams", frozenset()), fixture.samples())


class HistogramTests(unittest.TestCase):
    """
    Histograms use the Go bucket boundaries and count what is recorded.
    """

    def setUp(self):
        self.fixture = Fixture(cluster=True, streams=lambda: 0)
        self.addCleanup(self.fixture.metrics.shutdown)

    def buckets(self, name):
        return {
            dict(labels)["le"]: value
            for (sampleName, labels), value in self.fixture.samples().items()
            if sampleName == name + "_bucket"
        }

    def test_standardBoundaries(self):
        """
        The authentication and store histograms have the Go boundaries
        0.1 ... 10000 (milliseconds).
        """
        self.assertEqual(
            STANDARD_BUCKETS_MS,
            (0.1, 0.5, 1, 5, 10, 50, 100, 500, 1000, 5000, 10000),
        )
        self.fixture.metrics.recordAuthenticationTime(1)
        self.fixture.metrics.recordStoreTime(1)
        expected = [
            "0.1",
            "0.5",
            "1.0",
            "5.0",
            "10.0",
            "50.0",
            "100.0",
            "500.0",
            "1000.0",
            "5000.0",
            "10000.0",
            "+Inf",
        ]
        for name in (
            "relay_peer_authentication_time_milliseconds",
            "relay_peer_store_time_milliseconds",
        ):
            self.assertEqual(sorted(self.buckets(name), key=float), expected, name)

    def test_lookupBoundaries(self):
        """
        The lookup histogram has the Go boundaries 0.0005 ... 2.0 (seconds).
        """
        self.assertEqual(
            LOOKUP_BUCKETS_SECONDS,
            (0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 2.0),
        )
        self.fixture.metrics.recordLookupDuration(0.2)
        expected = ["0.0005", "0.001", "0.005", "0.01", "0.05", "0.1", "0.5", "1.0", "2.0", "+Inf"]
        self.assertEqual(
            sorted(self.buckets("relay_cluster_lookup_duration_seconds"), key=float),
            expected,
        )

    def test_authenticationCounts(self):
        """
        Recorded durations land in the right cumulative buckets, count and
        sum.
        """
        metrics = self.fixture.metrics
        for ms in (0.05, 0.3, 7, 20000):
            metrics.recordAuthenticationTime(ms)
        name = "relay_peer_authentication_time_milliseconds"
        buckets = self.buckets(name)
        self.assertEqual(buckets["0.1"], 1)
        self.assertEqual(buckets["0.5"], 2)
        self.assertEqual(buckets["5.0"], 2)
        self.assertEqual(buckets["10.0"], 3)
        self.assertEqual(buckets["10000.0"], 3)
        self.assertEqual(buckets["+Inf"], 4)
        found = self.fixture.samples()
        self.assertEqual(found[(name + "_count", frozenset())], 4)
        self.assertAlmostEqual(found[(name + "_sum", frozenset())], 20007.35)

    def test_storeAndLookupCounts(self):
        """
        The store and lookup histograms count their own records only.
        """
        self.fixture.metrics.recordStoreTime(0.2)
        self.fixture.metrics.recordLookupDuration(0.003)
        self.fixture.metrics.recordLookupDuration(3.0)
        store = self.buckets("relay_peer_store_time_milliseconds")
        lookup = self.buckets("relay_cluster_lookup_duration_seconds")
        self.assertEqual((store["0.1"], store["0.5"], store["+Inf"]), (0, 1, 1))
        self.assertEqual(
            (lookup["0.001"], lookup["0.005"], lookup["2.0"], lookup["+Inf"]),
            (0, 1, 1, 2),
        )
        self.assertEqual(self.buckets("relay_peer_authentication_time_milliseconds"), {})

    def test_lookupIgnoredInSinglePod(self):
        """
        Without the fabric, a lookup record exports nothing.
        """
        fixture = Fixture()
        self.addCleanup(fixture.metrics.shutdown)
        fixture.metrics.recordLookupDuration(0.1)
        self.assertNotIn("relay_cluster_lookup_duration_seconds", fixture.text())


class LifecycleTests(unittest.TestCase):
    """
    Each RelayMetrics is independent of the others and of global state.
    """

    def test_independentRegistries(self):
        """
        Two instances export their own counters only.
        """
        one, two = Fixture(), Fixture()
        self.addCleanup(one.metrics.shutdown)
        self.addCleanup(two.metrics.shutdown)
        one.counters.transferSentBytes = 10
        two.counters.transferSentBytes = 20
        key = ("relay_transfer_sent_bytes_total", frozenset())
        self.assertEqual(one.samples()[key], 10)
        self.assertEqual(two.samples()[key], 20)

    def test_shutdown(self):
        """
        After shutdown the registry exports nothing.
        """
        fixture = Fixture()
        fixture.metrics.shutdown()
        self.assertEqual(fixture.text(), "")


class SplitActiveIdleTests(unittest.TestCase):
    """
    L{splitActiveIdle} counts peers as the Go relay does.
    """

    def test_split(self):
        """
        A peer is idle once more than 30 s passed since its last Transport
        message, or if it never sent one.
        """
        now = 1000.0
        self.assertEqual(splitActiveIdle([now, now - 30, now - 30.5, None, now - 5], now), (3, 2))

    def test_empty(self):
        """
        No peers, no counts.
        """
        self.assertEqual(splitActiveIdle([], 5.0), (0, 0))

    def test_timeout(self):
        """
        The timeout can be chosen.
        """
        self.assertEqual(splitActiveIdle([0.0, 9.0], 10.0, idleTimeout=5), (1, 1))
