"""
End to end (issue 12, item 5): one agent's subscriptions are bounded, and in
a cluster the lookups they cause are bounded too; real C{twistd relay}
processes on loopback, counted through their metrics.
"""

from twisted.internet import defer, reactor
from twisted.trial import unittest

from relay import client
from relay import messages as m
from relay.cluster.forwarder import LOOKUPS_PER_PEER, SUBSCRIPTION_LOOKUPS
from relay.store import MAX_SUBSCRIPTIONS
from tests.e2e import RelayProcess, freePort, relayArgs, sleep, startRelay
from tests.loopback import commonPort
from tests.test_e2e_operability import get, sample

SECRET = "relay-secret"
TIMEOUT = 10
PODS = ("127.0.0.5", "127.0.0.6")


def randomIDs(tag, count):
    return [m.peerID(f"{tag}-{n}") for n in range(count)]


class SubscriptionLimitTests(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def connect(self, url, name):
        peer = yield client.connect(reactor, url, m.peerID(name), secret=SECRET)
        self.addCleanup(
            lambda: peer.transport.abortConnection() if peer.transport.connected else None
        )
        return peer

    @defer.inlineCallbacks
    def waitForSample(self, port, name, value, **labels):
        deadline = reactor.seconds() + TIMEOUT
        while True:
            _, text = yield get(port, "/metrics")
            found = sample(text, name, **labels)
            if found == value or reactor.seconds() > deadline:
                return found
            yield sleep(0.05)

    @defer.inlineCallbacks
    def test_excessRefusedConnectionKept(self):
        """
        5,000 ids from one agent: the first 4,096 are kept, the rest refused
        and counted; the agent stays connected and hears of a kept id.
        """
        metricsPort = freePort()
        relay = yield startRelay(
            self, "--metrics-port", str(metricsPort), "--metrics-address", "127.0.0.1"
        )
        a = yield self.connect(relay.url, "peer-a")
        a.subscribe([m.peerID("peer-b")] + randomIDs("x", 4999))
        refused = yield self.waitForSample(
            metricsPort,
            "relay_dropped_messages_total",
            5000 - MAX_SUBSCRIPTIONS,
            reason="subscription_limit",
        )
        self.assertEqual(refused, 5000 - MAX_SUBSCRIPTIONS)
        b = yield self.connect(relay.url, "peer-b")
        kind, ids = yield a.events.get().addTimeout(TIMEOUT, reactor)
        self.assertEqual((kind, ids), ("online", [m.peerID("peer-b")]))
        b.send(m.peerID("peer-a"), b"still here")
        source, payload = yield a.transports.get().addTimeout(TIMEOUT, reactor)
        self.assertEqual((source, payload), (m.peerID("peer-b"), b"still here"))

    @defer.inlineCallbacks
    def test_clusterLookupsBounded(self):
        """
        40 Subscribe messages of ids nobody has (9,760) started 9,760 WHO_HAS
        broadcasts; now the kept 4,096 start at most SUBSCRIPTION_LOOKUPS
        at once.
        """
        clusterPort, peerPort = commonPort(PODS), commonPort(PODS)
        metricsPorts = {}
        for host in PODS:
            process = RelayProcess([], host=host, port=peerPort)
            metricsPorts[host] = freePort()
            process.args = relayArgs(
                process,
                SECRET,
                "--cluster-headless",
                ",".join(PODS),
                "--pod-ip",
                host,
                "--cluster-port",
                str(clusterPort),
                "--cluster-listen-address",
                f"{host}:{clusterPort}",
                "--cluster-auth-secret",
                "cluster-secret",
                "--cluster-discovery-interval",
                "1",
                "--metrics-port",
                str(metricsPorts[host]),
                "--metrics-address",
                "127.0.0.1",
            )
            self.addCleanup(process.stop)
            yield process.start()
        first = metricsPorts[PODS[0]]
        deadline = reactor.seconds() + TIMEOUT
        while True:
            code, _ = yield get(first, "/readyz")
            _, text = yield get(first, "/metrics")
            if code == 200 and sample(text, "relay_cluster_streams") == 1:
                break
            self.assertLess(reactor.seconds(), deadline, "the pods did not join")
            yield sleep(0.1)
        a = yield self.connect(f"rel://{PODS[0]}:{peerPort}", "peer-a")
        a.subscribe(randomIDs("w", 40 * 244))
        refused = yield self.waitForSample(
            first,
            "relay_dropped_messages_total",
            40 * 244 - MAX_SUBSCRIPTIONS,
            reason="subscription_limit",
        )
        self.assertEqual(refused, 40 * 244 - MAX_SUBSCRIPTIONS)
        yield sleep(0.5)
        _, text = yield get(first, "/metrics")
        lookups = sample(text, "relay_cluster_lookup_duration_seconds_count")
        # The subscriptions' pool, or the subscriber's own smaller share
        # once the relay says who asks.
        self.assertIn(lookups, (SUBSCRIPTION_LOOKUPS, LOOKUPS_PER_PEER))
        self.assertEqual(
            sample(text, "relay_cluster_dropped_total", reason="subscription_lookup_share_full"),
            MAX_SUBSCRIPTIONS - lookups,
        )
