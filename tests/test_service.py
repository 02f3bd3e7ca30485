"""
The command line, the environment variables and the service tree.
"""

import io
import json

from twisted.internet.error import ProcessExitedAlready
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import Logger, LogLevel, formatEvent
from twisted.python import usage
from twisted.trial import unittest

from relay.config import Options, variableFor
from relay.endpoints import RequiredPortService
from relay.relay import ConfigurationError, instanceURL
from relay.service import RelayService, makeLogObserver, makeService

REQUIRED = ["--exposed-address", "127.0.0.1:33080", "--auth-secret", "s3cret"]


def parse(argv, environ=None):
    """
    The L{Options} of a command line, parsed (as twistd gives them to
    L{makeService}).
    """
    options = Options(environ or {})
    options.parseOptions(argv)
    return options


def config(argv, environ=None):
    """
    The L{relay.config.RelayConfig} of a command line.
    """
    return parse(argv, environ).config


class InstanceURLTests(unittest.TestCase):
    def test_noScheme(self):
        self.assertEqual(instanceURL("relay.example:443", False), "rel://relay.example:443")
        self.assertEqual(instanceURL("relay.example:443", True), "rels://relay.example:443")

    def test_explicitScheme(self):
        self.assertEqual(instanceURL("rels://relay.example:443", False), "rels://relay.example:443")
        self.assertEqual(instanceURL("rel://10.0.0.1:80", True), "rel://10.0.0.1:80")

    def test_wrongScheme(self):
        self.assertRaises(ConfigurationError, instanceURL, "https://relay.example", False)

    def test_twoSchemes(self):
        self.assertRaises(ConfigurationError, instanceURL, "rel://rel://x", False)

    def test_unparsable(self):
        for bad in ("rel://", "rel://host:port", "rel://ho st:1", ":443x"):
            self.assertRaises(ConfigurationError, instanceURL, bad, False)


class OptionsTests(unittest.TestCase):
    def test_defaults(self):
        c = config(REQUIRED)
        self.assertEqual(c.listen, ("", 443))
        self.assertEqual(c.metricsPort, 9090)
        self.assertEqual(c.logLevel, "info")
        self.assertEqual(c.logFile, "console")
        self.assertEqual(c.instanceURL, "rel://127.0.0.1:33080")
        self.assertEqual(c.healthCheckThreshold, 1)
        self.assertIsNone(c.cluster)
        self.assertFalse(c.tls)

    def test_shortFlags(self):
        c = config(["-e", "relay.example:443", "-s", "x", "-l", "127.0.0.1:8443"])
        self.assertEqual(c.listen, ("127.0.0.1", 8443))
        self.assertEqual(c.instanceURL, "rel://relay.example:443")

    def test_environment(self):
        c = config(
            [],
            {
                "OZ_EXPOSED_ADDRESS": "relay.example:443",
                "OZ_AUTH_SECRET": "x",
                "OZ_LISTEN_ADDRESS": ":33080",
                "OZ_METRICS_PORT": "0",
                "OZ_RELAY_HC_ATTEMPT_THRESHOLD": "3",
            },
        )
        self.assertEqual(c.listen, ("", 33080))
        self.assertEqual(c.metricsPort, 0)
        self.assertEqual(c.healthCheckThreshold, 3)

    def test_flagBeatsVariable(self):
        c = config(REQUIRED + ["--listen-address", ":1"], {"OZ_LISTEN_ADDRESS": ":2"})
        self.assertEqual(c.listen, ("", 1))

    def test_variableNames(self):
        self.assertEqual(variableFor("auth-secret"), "OZ_AUTH_SECRET")
        self.assertEqual(variableFor("cluster-discovery-interval"), "OZ_CLUSTER_DISCOVERY_INTERVAL")

    def assertUsage(self, argv, fragment, environ=None):
        e = self.assertRaises(usage.UsageError, parse, argv, environ)
        self.assertIn(fragment, str(e))

    def test_missingRequired(self):
        self.assertUsage(
            ["--auth-secret", "x"], "--exposed-address (or OZ_EXPOSED_ADDRESS) is required"
        )
        self.assertUsage(
            ["--exposed-address", "a:1"], "--auth-secret (or OZ_AUTH_SECRET) is required"
        )

    def test_invalidValues(self):
        self.assertUsage(
            REQUIRED + ["--listen-address", "443"], "--listen-address must be host:port"
        )
        self.assertUsage(REQUIRED + ["--metrics-port", "x"], "--metrics-port must be an integer")
        self.assertUsage(REQUIRED + ["--log-level", "loud"], "--log-level must be one of")
        self.assertUsage(REQUIRED + ["--log-format", "xml"], "--log-format must be text or json")
        self.assertUsage(
            ["--exposed-address", "ftp://x:1", "--auth-secret", "x"], "scheme must be rel or rels"
        )
        self.assertUsage(
            REQUIRED,
            "OZ_RELAY_HC_ATTEMPT_THRESHOLD must be an integer",
            {"OZ_RELAY_HC_ATTEMPT_THRESHOLD": "many"},
        )

    def test_tlsFilesGoTogether(self):
        self.assertUsage(REQUIRED + ["--tls-cert-file", "/x"], "go together")

    def test_letsEncrypt(self):
        c = config(
            REQUIRED
            + [
                "--letsencrypt-domains",
                "relay.example, relay2.example",
                "--letsencrypt-data-dir",
                "/var/lib/relay",
            ]
        )
        self.assertIsNotNone(c.acme)
        self.assertTrue(c.tls)
        self.assertEqual(c.instanceURL, "rels://127.0.0.1:33080")
        self.assertEqual(c.acme.domains, ("relay.example", "relay2.example"))
        self.assertEqual(c.acme.challenge, "tls-alpn-01")
        # TLS-ALPN-01 whatever the peer port, as the Go relay; HTTP-01 when asked.
        c = config(REQUIRED + ["-a", "relay.example", "-d", "/x", "-l", ":8443"])
        self.assertEqual(c.acme.challenge, "tls-alpn-01")
        c = config(
            REQUIRED + ["-a", "relay.example", "-d", "/x", "--letsencrypt-challenge", "HTTP-01"]
        )
        self.assertEqual(c.acme.challenge, "http-01")

    def test_letsEncryptErrors(self):
        self.assertUsage(REQUIRED + ["--letsencrypt-domains", "relay.example"], "go together")
        self.assertUsage(
            REQUIRED + ["-a", "r.example", "-d", "/x", "--letsencrypt-challenge", "dns-01"],
            "must be tls-alpn-01 or http-01",
        )
        self.assertUsage(
            REQUIRED
            + ["-a", "r.example", "-d", "/x", "--tls-cert-file", "/c", "--tls-key-file", "/k"],
            "not both",
        )
        self.assertUsage(REQUIRED + ["-a", "r.example", "-d", "/x", "--workers", "2"], "do not mix")
        self.assertUsage(
            REQUIRED + ["--letsencrypt-aws-route53"], "Route 53 DNS-01 is not supported"
        )

    def test_clusterNeedsPodIP(self):
        self.assertUsage(REQUIRED + ["--cluster-headless", "relay-headless"], "--pod-ip")

    def test_podIPFromDownwardAPI(self):
        c = config(
            REQUIRED + ["--cluster-headless", "relay-headless", "--cluster-auth-secret", "s"],
            {"POD_IP": "10.0.0.7"},
        )
        self.assertEqual(c.cluster.podIP, "10.0.0.7")
        self.assertEqual(c.cluster.listen, ("10.0.0.7", 7090))
        self.assertFalse(c.cluster.compat)

    def test_clusterNeedsSecret(self):
        """
        A fabric without a secret needs the operator's explicit opt-out.
        """
        cluster = ["--cluster-headless", "relay-headless", "--pod-ip", "10.0.0.7"]
        self.assertUsage(
            REQUIRED + cluster, "--cluster-auth-secret (or OZ_CLUSTER_AUTH_SECRET) is required"
        )
        c = config(REQUIRED + cluster + ["--cluster-insecure"])
        self.assertEqual(c.cluster.secret, "")
        c = config(
            REQUIRED + cluster,
            {
                "OZ_CLUSTER_INSECURE": "true",
                "OZ_CLUSTER_COMPAT": "1",
                "OZ_CLUSTER_AUTH_SECRET": "s",
            },
        )
        self.assertTrue(c.cluster.compat)
        c = config(
            REQUIRED
            + cluster
            + ["--cluster-auth-secret", "s", "--cluster-listen-address", "0.0.0.0:7090"]
        )
        self.assertEqual(c.cluster.listen, ("0.0.0.0", 7090))
        c = config(
            REQUIRED
            + [
                "--cluster-headless",
                "relay-headless",
                "--pod-ip",
                "fd00::7",
                "--cluster-auth-secret",
                "s",
            ]
        )
        self.assertEqual(c.cluster.listen, ("fd00::7", 7090))

    def test_usageQuietAfterBadValue(self):
        options = Options({})
        self.assertRaises(usage.UsageError, options.parseOptions, ["--auth-secret", "x"])
        self.assertEqual(options.getUsage(), "")


class LoggingTests(unittest.TestCase):
    def emit(self, argv, level, **fields):
        stream = io.StringIO()
        observer = makeLogObserver(config(REQUIRED + argv), stream)
        Logger(observer=observer).emit(level, "hello {who}", who="peer", **fields)
        return stream.getvalue()

    def test_levelFilters(self):
        self.assertEqual(self.emit(["--log-level", "warn"], LogLevel.info), "")
        self.assertIn("hello peer", self.emit(["--log-level", "warn"], LogLevel.error))

    def test_traceShowsDebug(self):
        self.assertIn("hello peer", self.emit(["--log-level", "trace"], LogLevel.debug))

    def test_json(self):
        line = self.emit(["--log-format", "json"], LogLevel.info)
        self.assertEqual(json.loads(line.strip("\x1e"))["who"], "peer")


class ServiceTests(unittest.TestCase):
    def test_tree(self):
        clock = Clock()
        top = makeService(parse(REQUIRED + ["--listen-address", "127.0.0.1:0"]), reactor=clock)
        self.assertIsInstance(top, RelayService)
        self.assertEqual(top.relay.instanceURL, "rel://127.0.0.1:33080")
        self.assertIsNone(top.peerPort)
        self.assertFalse(top.readiness()[0])

    def test_logObserverGivenToApplication(self):
        from twisted.application.service import Application
        from twisted.logger import ILogObserver

        application = Application("relay")
        top = makeService(parse(REQUIRED), reactor=Clock())
        top.setServiceParent(application)
        self.assertIs(application.getComponent(ILogObserver), top.logObserver)


class DescriptorTests(unittest.TestCase):
    """
    The descriptor limit at start: raised to the hard limit, a reserve kept
    from the peer port, a warning when the limits cannot all be reached.
    """

    def fit(self, argv, before, soft, inUse=20):
        from relay import service as module

        self.patch(module, "raiseDescriptorLimit", lambda: (before, soft))
        self.patch(module, "descriptorsInUse", lambda: inUse)
        events = []
        top = makeService(parse(REQUIRED + ["--metrics-port", "0"] + argv), reactor=Clock())
        self.patch(top, "_log", Logger(observer=events.append))
        top._fitDescriptors()
        return top.relay.admission.maxConnections, [
            (e["log_level"], formatEvent(e)) for e in events
        ]

    def test_fits(self):
        room, lines = self.fit(["--max-peers", "10000"], 1024, 1048576)
        self.assertEqual(room, 1048576 - 20 - 128)
        self.assertEqual(
            lines, [(LogLevel.info, "open file limit raised from 1024 to 1048576 (the hard limit)")]
        )

    def test_doesNotFit(self):
        room, lines = self.fit([], 20000, 20000)
        self.assertEqual(room, 20000 - 20 - 128)
        [(level, text)] = lines
        self.assertEqual(level, LogLevel.warn)
        self.assertIn(
            "the open file limit (20000) leaves room for 19852 peer connections, fewer than "
            "--max-peers 50000 and --max-pending-handshakes 2048",
            text,
        )
        self.assertIn('reason="descriptors"', text)

    def test_noPeerLimit(self):
        _, lines = self.fit(["--max-peers", "0"], 4096, 4096)
        self.assertIn("--max-peers (no limit)", lines[0][1])

    def test_unknown(self):
        room, lines = self.fit([], None, None)
        self.assertEqual((room, lines), (0, []))


class _FakeProcess:
    def __init__(self, exited=False):
        self.exited = exited
        self.signals = []

    def signalProcess(self, signalName):
        if self.exited:
            raise ProcessExitedAlready()
        self.signals.append(signalName)


class _FakeProtocol:
    def __init__(self, transport):
        self.transport = transport


class _FakeMonitor:
    """
    The part of L{twisted.runner.procmon.ProcessMonitor} the relay uses: its
    running processes' protocols, by name.
    """

    def __init__(self, protocols):
        self.protocols = protocols


class _FakeTLS:
    def __init__(self):
        self.reloads = 0

    def reload(self):
        self.reloads += 1
        return False


class ReloadTests(unittest.TestCase):
    """
    SIGHUP (L{RelayService.reloadTLS}) reloads the certificate here and in
    every running worker process.
    """

    def service(self, supervisor):
        return RelayService(None, None, None, None, tls=_FakeTLS(), supervisor=supervisor)

    def test_withoutWorkers(self):
        top = self.service(None)
        top.reloadTLS()
        self.assertEqual(top.tls.reloads, 1)

    def test_workersSignalled(self):
        one, two, gone = _FakeProcess(), _FakeProcess(), _FakeProcess(exited=True)
        monitor = _FakeMonitor(
            {
                "relay-worker-1": _FakeProtocol(one),
                "relay-worker-2": _FakeProtocol(two),
                "relay-worker-3": _FakeProtocol(gone),
                "relay-worker-4": _FakeProtocol(None),
            }
        )
        top = self.service(monitor)
        top.reloadTLS()
        self.assertEqual(top.tls.reloads, 1)
        self.assertEqual((one.signals, two.signals, gone.signals), (["HUP"], ["HUP"], []))

    def test_supervisorKept(self):
        from twisted.runner.procmon import ProcessMonitor

        reactor = Clock()
        # With --workers, the workers are pods of a fabric on this host.
        reactor.nameResolver = None
        top = makeService(parse(REQUIRED + ["--workers", "2"]), reactor=reactor)
        self.assertIsInstance(top.supervisor, ProcessMonitor)
        self.assertIn(top.supervisor, list(top))
        self.assertIsNone(makeService(parse(REQUIRED), reactor=Clock()).supervisor)


class LimitOptionsTests(unittest.TestCase):
    def test_defaults(self):
        limits = config(REQUIRED).limits
        self.assertEqual(
            (
                limits.maxPeers,
                limits.maxPending,
                limits.maxPerIP,
                limits.ratePerIP,
                limits.peerByteRate,
            ),
            (50000, 2048, 0, 0, 0),
        )
        self.assertEqual(limits.trustedProxies, ())

    def test_fromEnvironment(self):
        limits = config(REQUIRED, {"OZ_MAX_PEERS": "10", "OZ_TRUSTED_PROXIES": "10.0.0.0/8"}).limits
        self.assertEqual(limits.maxPeers, 10)
        self.assertEqual(len(limits.trustedProxies), 1)

    def test_sharedByWorkers(self):
        # Each of N workers enforces its share, so the host as a whole holds
        # the configured limits (rounded up); a peer is on one worker, so its
        # byte rate stays whole.
        argv = REQUIRED + [
            "--workers",
            "3",
            "--max-peers",
            "1000",
            "--max-pending-handshakes",
            "2048",
            "--max-connections-per-ip",
            "10",
            "--connection-rate-per-ip",
            "30",
            "--peer-rate-limit",
            "5000",
        ]
        for index in range(3):
            limits = config(argv + ["--worker-index", str(index)]).limits
            self.assertEqual(
                (
                    limits.maxPeers,
                    limits.maxPending,
                    limits.maxPerIP,
                    limits.ratePerIP,
                    limits.peerByteRate,
                ),
                (334, 683, 4, 10, 5000),
            )
        limits = config(REQUIRED + ["--workers", "3"]).limits
        self.assertEqual((limits.maxPerIP, limits.ratePerIP), (0, 0))
        limits = config(REQUIRED + ["--workers", "3", "--connection-rate-per-ip", "1"]).limits
        self.assertAlmostEqual(limits.ratePerIP, 1 / 3)

    def test_invalid(self):
        e = self.assertRaises(
            usage.UsageError, parse, REQUIRED + ["--trusted-proxies", "10.0.0.0/33"]
        )
        self.assertIn("--trusted-proxies", str(e))
        e = self.assertRaises(usage.UsageError, parse, REQUIRED + ["--max-peers", "-1"])
        self.assertIn("--max-peers must not be negative", str(e))


class ListenerTests(unittest.TestCase):
    def test_backlog(self):
        from relay.endpoints import LISTEN_BACKLOG, serverEndpoint

        self.assertGreaterEqual(LISTEN_BACKLOG, 4096)
        self.assertEqual(serverEndpoint(Clock(), "127.0.0.1", 1)._backlog, LISTEN_BACKLOG)
        self.assertEqual(serverEndpoint(Clock(), "::1", 1)._backlog, LISTEN_BACKLOG)

    def test_metricsAddress(self):
        from twisted.internet.testing import MemoryReactor

        reactor = MemoryReactor()
        top = makeService(
            parse(REQUIRED + ["--metrics-port", "9191", "--metrics-address", "127.0.0.1"]),
            reactor=reactor,
        )
        top.privilegedStartService()
        self.assertIn(
            (9191, "127.0.0.1"), [(port, interface) for port, _, _, interface in reactor.tcpServers]
        )

    def test_metricsPortTaken(self):
        """
        A metrics port that cannot open raises (L{RelayService} turns it
        into an exit naming the reason; C{test_e2e.StartupErrorTests}).
        """
        from twisted.internet.error import CannotListenError
        from twisted.internet.testing import RaisingMemoryReactor

        reactor = RaisingMemoryReactor(
            listenException=CannotListenError("127.0.0.1", 9191, OSError(98, "in use"))
        )
        top = makeService(
            parse(REQUIRED + ["--metrics-port", "9191", "--metrics-address", "127.0.0.1"]),
            reactor=reactor,
        )
        [metrics] = [s for s in top if isinstance(s, RequiredPortService)]
        self.assertRaises(CannotListenError, metrics.privilegedStartService)
        self.assertIsNone(metrics.port)

    def test_listenNowNeverFired(self):
        from twisted.internet import defer

        from relay.endpoints import listenNow

        class Pending:
            def listen(self, factory):
                return defer.Deferred()

        with self.assertRaises(RuntimeError) as raised:
            listenNow(Pending(), None)
        self.assertEqual(str(raised.exception), "listening did not complete")


class WiringTests(unittest.TestCase):
    """
    L{makeService} builds each collaborator before what uses it and hands
    it over at construction; the files are read here, not while parsing.
    """

    def test_collaboratorsGivenToTheRelay(self):
        from relay import service as module

        built = []

        class RecordingMetrics(module.RelayMetrics):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self.lookups = []
                built.append(self)

            def recordLookupDuration(self, seconds):
                self.lookups.append(seconds)

        self.patch(module, "RelayMetrics", RecordingMetrics)
        options = parse(
            REQUIRED
            + [
                "--max-peers",
                "7",
                "--cluster-headless",
                "127.0.0.2",
                "--pod-ip",
                "127.0.0.1",
                "--cluster-auth-secret",
                "c",
            ]
        )
        top = makeService(options, reactor=MemoryReactorClock())
        [metrics] = built
        relay = top.relay
        self.assertIs(relay.forwarder, top.cluster)
        # The fabric is handed its settings as checked, in one object.
        self.assertIs(top.cluster.config, options.config.cluster)
        self.assertEqual(top.cluster.announceAddress, "127.0.0.1:7090")
        self.assertIs(relay.limits, options.config.limits)
        self.assertEqual(relay.limits.maxPeers, 7)
        self.assertIs(top.cluster.streams.noisyLog, relay.noisyLog)
        self.assertEqual(relay.recordAuthenticationTime, metrics.recordAuthenticationTime)
        self.assertEqual(relay.recordStoreTime, metrics.recordStoreTime)
        # The fabric, built before the metrics, reports its lookups to them.
        top.cluster.locator.lookupObserver(0.25)
        self.assertEqual(metrics.lookups, [0.25])
        # The fabric sees the relay's peers through the same store.
        self.assertIs(top.cluster.locator.localPeers.store, relay.store)

    def test_singlePodHasNoForwarder(self):
        top = makeService(parse(REQUIRED), reactor=Clock())
        self.assertIsNone(top.relay.forwarder)
        self.assertIsNone(top.cluster)
        self.assertIsNone(top.quic)

    def test_certificateReadByTheWiring(self):
        """
        A certificate file that cannot be read passes the options (no file
        is opened while parsing) and stops makeService with a message naming
        it.
        """
        options = parse(
            REQUIRED + ["--tls-cert-file", "/nonexistent.crt", "--tls-key-file", "/nonexistent.key"]
        )
        e = self.assertRaises(SystemExit, makeService, options, reactor=Clock())
        self.assertIn("relay: cannot read TLS certificate file", str(e))
        self.assertIn("/nonexistent.crt", str(e))

    def test_certificateFiles(self):
        """
        With certificate files QUIC is served at once from them, and SIGHUP
        re-reads them for both carriers.
        """
        from tests.certs import writeCertificate

        cert, key, _ = writeCertificate(self.mktemp())
        top = makeService(
            parse(REQUIRED + ["--tls-cert-file", cert, "--tls-key-file", key]),
            reactor=MemoryReactorClock(),
        )
        quic = top.quic.quic
        self.assertIn(quic, list(top.quic))
        self.assertEqual((quic.certFile, quic.keyFile), (cert, key))
        before = (top.tls.current, quic.protocol.configuration)
        top.reloadTLS()
        self.assertNotIdentical(top.tls.current, before[0])
        self.assertNotIdentical(quic.protocol.configuration, before[1])

    def test_quicReloadKeepsAUsableCertificate(self):
        """
        SIGHUP with a broken certificate file: QUIC says so and keeps the
        certificate it has.
        """
        from tests.certs import writeCertificate

        cert, key, _ = writeCertificate(self.mktemp())
        top = makeService(
            parse(REQUIRED + ["--tls-cert-file", cert, "--tls-key-file", key]),
            reactor=MemoryReactorClock(),
        )
        configuration = top.quic.quic.protocol.configuration
        with open(cert, "w") as f:
            f.write("not a certificate")
        events = []
        self.patch(top.quic, "_log", Logger(observer=events.append))
        top.quic.reload()
        self.assertIs(top.quic.quic.protocol.configuration, configuration)
        [event] = events
        self.assertEqual(event["log_level"], LogLevel.error)
        self.assertIn(
            "QUIC certificate reload failed, keeping the previous one", formatEvent(event)
        )

    def test_acmeCertificateRenewal(self):
        """
        With ACME, QUIC starts once ACME has a certificate and reloads from
        ACME's files on each new one; readiness waits for the first.
        """
        import os
        import time

        from relay.acme import AcmeCertificateService
        from tests.certs import writeCertificate

        dataDir = os.path.abspath(self.mktemp())
        reactor = MemoryReactorClock()
        reactor.advance(time.time())
        top = makeService(
            parse(REQUIRED + ["-a", "relay.example", "-d", dataDir, "--metrics-port", "0"]),
            reactor=reactor,
        )
        [acme] = [child for child in top if isinstance(child, AcmeCertificateService)]
        self.assertIsNone(top.quic.quic)
        self.assertFalse(top.readiness.certificateReady)
        # A certificate a previous run left: ACME loads it when it starts.
        os.makedirs(dataDir, mode=0o700)
        cert, key, _ = writeCertificate(dataDir + ".old", name="relay.example")
        for source, target in ((cert, acme.certificatePath), (key, acme.keyPath)):
            with open(source, "rb") as f, open(target, "wb") as t:
                t.write(f.read())
            os.chmod(target, 0o600)
        with open(acme.metadataPath, "w") as f:
            json.dump({"directoryURL": acme.directoryURL, "domains": acme.domains}, f)
        acme.startService()
        self.addCleanup(acme.stopService)
        quic = top.quic.quic
        self.assertIsNotNone(quic)
        self.assertEqual((quic.certFile, quic.keyFile), (acme.certificatePath, acme.keyPath))
        self.assertTrue(top.readiness.certificateReady)
        # A renewal: the same QUIC service, its configuration read again.
        configuration = quic.protocol.configuration
        top.quic.certificateRenewed(self.successResultOf(acme.whenReady()))
        self.assertIs(top.quic.quic, quic)
        self.assertNotIdentical(quic.protocol.configuration, configuration)
