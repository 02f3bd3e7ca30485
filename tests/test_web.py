"""
Tests for L{relay.web}: the metrics port's resources, driven through a real
L{twisted.web.server.Site} over an in-memory transport.
"""

import gzip

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial import unittest

from relay.counters import RelayCounters
from relay.metrics import RelayMetrics
from relay.web import IDLE_TIMEOUT, MAX_CONNECTIONS, Readiness, makeMetricsSite


def request(site, path, headers=(), method=b"GET"):
    """
    Send one HTTP/1.0 request to C{site} and parse what it wrote.

    @return: C{(status code, {lower-case header name: value}, body)}.
    """
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    lines = [method + b" " + path + b" HTTP/1.0", b"Host: relay"]
    lines.extend(name + b": " + value for name, value in headers)
    channel.dataReceived(b"\r\n".join(lines) + b"\r\n\r\n")
    head, _, body = transport.value().partition(b"\r\n\r\n")
    statusLine, *headerLines = head.split(b"\r\n")
    parsed = {}
    for line in headerLines:
        name, _, value = line.partition(b":")
        parsed[name.strip().lower()] = value.strip()
    channel.connectionLost(None)
    return int(statusLine.split(b" ")[1]), parsed, body


class WebFixture(unittest.TestCase):
    def setUp(self):
        self.counters = RelayCounters()
        self.metrics = RelayMetrics(self.counters, lambda: (2, 1, 1))
        self.addCleanup(self.metrics.shutdown)
        self.readiness = Readiness()
        self.clock = Clock()
        self.site = makeMetricsSite(
            self.metrics.registry,
            self.readiness,
            reactor=self.clock,
            refusals=self.counters.metricsRefusals,
        )


class MetricsTests(WebFixture):
    """
    /metrics serves the registry.
    """

    def test_scrape(self):
        """
        A plain scrape gets the text format with the relay's series.
        """
        self.counters.transferSentBytes = 4096
        code, headers, body = request(self.site, b"/metrics")
        self.assertEqual(code, 200)
        self.assertTrue(headers[b"content-type"].startswith(b"text/plain"))
        values = {
            sample.name: sample.value
            for family in text_string_to_metric_families(body.decode("utf-8"))
            for sample in family.samples
        }
        self.assertEqual(values["relay_transfer_sent_bytes_total"], 4096)
        self.assertEqual(values["relay_peers"], 2)

    def test_scrapeFollowsCounters(self):
        """
        Each scrape reads the counters anew.
        """

        def received():
            body = request(self.site, b"/metrics")[2].decode("utf-8")
            return {
                sample.name: sample.value
                for family in text_string_to_metric_families(body)
                for sample in family.samples
            }["relay_transfer_received_bytes_total"]

        self.counters.transferReceivedBytes = 10
        self.assertEqual(received(), 10)
        self.counters.transferReceivedBytes += 5
        self.assertEqual(received(), 15)

    def test_openMetrics(self):
        """
        A scraper asking for OpenMetrics gets it.
        """
        code, headers, body = request(
            self.site,
            b"/metrics",
            [(b"Accept", b"application/openmetrics-text; version=1.0.0")],
        )
        self.assertEqual(code, 200)
        self.assertTrue(headers[b"content-type"].startswith(b"application/openmetrics-text"))
        self.assertTrue(body.endswith(b"# EOF\n"))

    def test_gzip(self):
        """
        Prometheus asks for gzip and gets it.
        """
        code, headers, body = request(self.site, b"/metrics", [(b"Accept-Encoding", b"gzip")])
        self.assertEqual(code, 200)
        self.assertEqual(headers[b"content-encoding"], b"gzip")
        self.assertIn(b"relay_peers_idle", gzip.decompress(body))

    def test_postRefused(self):
        """
        Only GET (and HEAD) are served.
        """
        self.assertEqual(request(self.site, b"/metrics", method=b"POST")[0], 405)

    def test_unknownPath(self):
        """
        Other paths are not found.
        """
        self.assertEqual(request(self.site, b"/nothing")[0], 404)


class HealthTests(WebFixture):
    """
    /healthz answers while the process runs, whatever the readiness.
    """

    def test_healthz(self):
        """
        200 and "ok", even while draining.
        """
        self.readiness.draining = True
        code, headers, body = request(self.site, b"/healthz")
        self.assertEqual((code, body), (200, b"ok\n"))
        self.assertTrue(headers[b"content-type"].startswith(b"text/plain"))


class ReadinessTests(WebFixture):
    """
    /readyz follows the readiness flags.
    """

    def test_notReadyBeforeListener(self):
        """
        503 until the peer listener is up.
        """
        code, _, body = request(self.site, b"/readyz")
        self.assertEqual((code, body), (503, b"peer listener not up\n"))

    def test_readySinglePod(self):
        """
        In single-pod mode, the listener being up is enough.
        """
        self.readiness.listenerUp = True
        code, headers, body = request(self.site, b"/readyz")
        self.assertEqual((code, body), (200, b"ok\n"))
        self.assertEqual(headers[b"cache-control"], b"no-store")

    def test_clusterWaitsForDiscovery(self):
        """
        In cluster mode, readiness also waits for the first discovery pass.
        """
        readiness = Readiness(clusterMode=True)
        site = makeMetricsSite(self.metrics.registry, readiness, reactor=self.clock)
        readiness.listenerUp = True
        code, _, body = request(site, b"/readyz")
        self.assertEqual((code, body), (503, b"cluster discovery has not completed a pass\n"))
        readiness.discoveryDone = True
        self.assertEqual(request(site, b"/readyz")[0], 200)

    def test_draining(self):
        """
        A draining pod is unready even with everything up.
        """
        self.readiness.listenerUp = True
        self.readiness.draining = True
        code, _, body = request(self.site, b"/readyz")
        self.assertEqual((code, body), (503, b"draining\n"))

    def test_plainCallable(self):
        """
        Any callable returning a bool can stand for the readiness.
        """
        answers = [False]
        site = makeMetricsSite(self.metrics.registry, lambda: answers[0], reactor=self.clock)
        self.assertEqual(request(site, b"/readyz")[:3:2], (503, b"not ready\n"))
        answers[0] = True
        self.assertEqual(request(site, b"/readyz")[:3:2], (200, b"ok\n"))


class QuietLogTests(WebFixture):
    """
    Scrapes and probes leave no log line above debug.
    """

    def test_noInfoLines(self):
        """
        The site started as a listening port starts it, then served a scrape
        and both probes: only debug events, one per request.
        """
        self.site.doStart()
        self.addCleanup(self.site.doStop)
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.readiness.listenerUp = True
        for path in (b"/metrics", b"/healthz", b"/readyz"):
            request(self.site, path)
        self.assertEqual(
            [e for e in events if e.get("log_level", LogLevel.info) > LogLevel.debug],
            [],
        )
        self.assertEqual(
            [e["uri"] for e in events if e.get("log_namespace") == "relay.web"],
            ["/metrics", "/healthz", "/readyz"],
        )


def connection(site):
    """
    One connection to C{site} over a string transport.
    """
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    return channel, transport


class StrangerTests(WebFixture):
    """
    The metrics port listens on every interface by default: what strangers
    send it is bounded.
    """

    def test_bodyNotRead(self):
        """
        A POST with a large body is answered 405 once its headers are in,
        and the connection closed without the body being read: it used to be
        spooled to a temporary file.
        """
        channel, transport = connection(self.site)
        channel.dataReceived(
            b"POST /metrics HTTP/1.1\r\nHost: relay\r\nContent-Length: 41943040\r\n\r\n"
        )
        channel.dataReceived(b"z" * 65536)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 405 "))
        self.assertIn(b"\r\nAllow: GET, HEAD\r\n", transport.value())
        self.assertTrue(transport.disconnecting)
        self.assertIsNone(channel.wrappedProtocol.requests[0].content)
        self.assertEqual(self.counters.metricsRefusals["method"], 1)

    def test_getWithBodyRefused(self):
        for framing in (b"Content-Length: 10", b"Transfer-Encoding: chunked"):
            channel, transport = connection(self.site)
            channel.dataReceived(
                b"GET /healthz HTTP/1.1\r\nHost: relay\r\n" + framing + b"\r\n\r\n" + b"0123456789"
            )
            self.assertTrue(transport.value().startswith(b"HTTP/1.1 413 "), transport.value())
            self.assertTrue(transport.disconnecting)
        self.assertEqual(self.counters.metricsRefusals["body"], 2)

    def test_nothingServedAfterARefusal(self):
        channel, transport = connection(self.site)
        channel.dataReceived(
            b"DELETE /metrics HTTP/1.1\r\nHost: relay\r\n\r\n"
            b"GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n"
        )
        self.assertEqual(transport.value().count(b"HTTP/1.1 "), 1)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 405 "))

    def test_emptyGetServed(self):
        channel, transport = connection(self.site)
        channel.dataReceived(b"GET /healthz HTTP/1.1\r\nHost: relay\r\nContent-Length: 0\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 "))
        self.assertTrue(transport.value().endswith(b"ok\n"))

    def test_idleConnectionsEvicted(self):
        """
        Idle connections fill the port's limit: the next connection evicts
        the oldest, and a health probe still gets its answer.
        """
        idle = [connection(self.site) for _ in range(MAX_CONNECTIONS)]
        for _, transport in idle:
            self.assertFalse(transport.disconnecting)
        self.assertEqual(request(self.site, b"/healthz")[::2], (200, b"ok\n"))
        self.assertTrue(idle[0][1].disconnecting)
        self.assertEqual([t.disconnecting for _, t in idle[1:]], [False] * (MAX_CONNECTIONS - 1))
        self.assertEqual(self.counters.metricsRefusals["connections"], 1)
        # The probe's connection is gone: one more fits, the next evicts.
        connection(self.site)
        self.assertFalse(idle[1][1].disconnecting)
        connection(self.site)
        self.assertTrue(idle[1][1].disconnecting)
        self.assertEqual(len(self.site.protocols), MAX_CONNECTIONS)

    def test_idleTimeout(self):
        channel, transport = connection(self.site)
        self.clock.advance(IDLE_TIMEOUT - 1)
        channel.dataReceived(b"GET /heal")
        self.clock.advance(IDLE_TIMEOUT - 1)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(1)
        self.assertTrue(transport.disconnecting)
