"""
L{relay.config}: the one step from option text to a checked, frozen
L{RelayConfig}. Every bad value is refused there with a message naming the
flag (and the variable that can also set it), before anything is opened.
"""

import dataclasses

from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from relay.config import Options, RelayConfig, configFrom, parseConfig, variableFor

REQUIRED = ["--exposed-address", "127.0.0.1:33080", "--auth-secret", "s3cret"]
CLUSTER = [
    "--cluster-headless",
    "relay-headless",
    "--pod-ip",
    "10.0.0.7",
    "--cluster-auth-secret",
    "c",
]

# (command line after REQUIRED, environment, what the message must say)
BAD_VALUES = [
    (["--listen-address", "443"], {}, "--listen-address must be host:port, not '443'"),
    (["--listen-address", "h:65536"], {}, "--listen-address must be host:port"),
    (["--metrics-port", "x"], {}, "--metrics-port must be an integer, not 'x'"),
    (["--metrics-port", "-1"], {}, "--metrics-port must not be negative"),
    (["--metrics-port", "65536"], {}, "--metrics-port must be a port number"),
    (["--peer-buffer-limit", "lots"], {}, "--peer-buffer-limit must be an integer"),
    (["--max-peers", "-1"], {}, "--max-peers must not be negative"),
    (["--max-pending-handshakes", "x"], {}, "--max-pending-handshakes must be an integer"),
    (["--max-connections-per-ip", "1.5"], {}, "--max-connections-per-ip must be an integer"),
    (["--connection-rate-per-ip", "-3"], {}, "--connection-rate-per-ip must not be negative"),
    (["--peer-rate-limit", "fast"], {}, "--peer-rate-limit must be an integer"),
    (["--trusted-proxies", "10.0.0.0/33"], {}, "--trusted-proxies: "),
    (
        ["--log-level", "loud"],
        {},
        "--log-level must be one of trace, debug, info, warn, error, not 'loud'",
    ),
    (["--log-format", "xml"], {}, "--log-format must be text or json, not 'xml'"),
    (
        [],
        {"OZ_RELAY_HC_ATTEMPT_THRESHOLD": "many"},
        "OZ_RELAY_HC_ATTEMPT_THRESHOLD must be an integer, not 'many'",
    ),
    (["--tls-cert-file", "/c"], {}, "--tls-cert-file and --tls-key-file go together"),
    (["--tls-key-file", "/k"], {}, "--tls-cert-file and --tls-key-file go together"),
    (
        ["--letsencrypt-aws-route53"],
        {},
        "--letsencrypt-aws-route53: Route 53 DNS-01 is not supported",
    ),
    (
        ["--letsencrypt-domains", "r.example"],
        {},
        "--letsencrypt-domains and --letsencrypt-data-dir go together",
    ),
    (
        ["--letsencrypt-data-dir", "/d"],
        {},
        "--letsencrypt-domains and --letsencrypt-data-dir go together",
    ),
    (
        ["-a", "r.example", "-d", "/d", "--tls-cert-file", "/c", "--tls-key-file", "/k"],
        {},
        "use either --tls-cert-file/--tls-key-file or --letsencrypt-*, not both",
    ),
    (
        ["-a", "r.example", "-d", "/d", "--letsencrypt-challenge", "dns-01"],
        {},
        "--letsencrypt-challenge must be tls-alpn-01 or http-01, not 'dns-01'",
    ),
    (
        ["-a", "r.example", "-d", "/d", "--letsencrypt-http-port", "x"],
        {},
        "--letsencrypt-http-port must be an integer",
    ),
    (["--cluster-port", "x"], {}, "--cluster-port must be an integer"),
    (
        ["--cluster-discovery-interval", "0"],
        {},
        "--cluster-discovery-interval must be a positive number of seconds",
    ),
    (
        ["--cluster-discovery-interval", "soon"],
        {},
        "--cluster-discovery-interval must be a positive number of seconds",
    ),
    (
        ["--cluster-headless", "relay-headless"],
        {},
        "--pod-ip (or OZ_POD_IP or POD_IP) is required with --cluster-headless",
    ),
    (
        ["--cluster-headless", "relay-headless", "--pod-ip", "10.0.0.7"],
        {},
        "--cluster-auth-secret (or OZ_CLUSTER_AUTH_SECRET) is required with --cluster-headless",
    ),
    (
        CLUSTER + ["--cluster-listen-address", "7090"],
        {},
        "--cluster-listen-address must be host:port, not '7090'",
    ),
    (["--workers", "0"], {}, "--workers must be at least 1"),
    (["--workers", "x"], {}, "--workers must be an integer"),
    (["--workers", "2", "--worker-index", "2"], {}, "--worker-index must be below --workers"),
    (
        ["--workers", "2", "--cluster-headless", "x", "--pod-ip", "10.0.0.1"],
        {},
        "--workers and --cluster-headless do not mix",
    ),
    (
        ["--workers", "2", "-a", "r.example", "-d", "/d"],
        {},
        "--workers and --letsencrypt-* do not mix",
    ),
    (
        ["--exposed-address", "ftp://x:1"],
        {},
        "invalid exposed address 'ftp://x:1': scheme must be rel or rels",
    ),
]


class ValidationTests(SynchronousTestCase):
    def assertRefused(self, argv, environ, message):
        e = self.assertRaises(usage.UsageError, parseConfig, REQUIRED + argv, environ)
        self.assertIn(message, str(e), (argv, environ))

    def test_eachBadValue(self):
        for argv, environ, message in BAD_VALUES:
            self.assertRefused(argv, environ, message)

    def test_eachBadValueFromItsVariable(self):
        """
        A bad value set by a variable is refused with the same message (the
        flag names the setting; its variable is OZ_ and the flag).
        """
        for argv, _environ, message in BAD_VALUES:
            if len(argv) != 2 or not argv[0].startswith("--") or argv[0] in REQUIRED:
                continue
            option = argv[0][2:]
            self.assertRefused([], {variableFor(option): argv[1]}, message)

    def test_required(self):
        for missing, present in (
            ("exposed-address", "auth-secret"),
            ("auth-secret", "exposed-address"),
        ):
            e = self.assertRaises(usage.UsageError, parseConfig, [f"--{present}", "rel://x:1"], {})
            self.assertEqual(str(e), f"--{missing} (or {variableFor(missing)}) is required")

    def test_badValueSilencesTheUsage(self):
        options = Options({})
        self.assertRaises(usage.UsageError, options.parseOptions, REQUIRED + ["--workers", "0"])
        self.assertEqual(options.getUsage(), "")
        self.assertIsNone(options.config)


class ConfigTests(SynchronousTestCase):
    def test_frozen(self):
        config = parseConfig(REQUIRED, {})
        self.assertIsInstance(config, RelayConfig)
        self.assertRaises(dataclasses.FrozenInstanceError, setattr, config, "listen", ("", 1))

        def change():
            config.settings["auth-secret"] = "x"

        self.assertRaises(TypeError, change)

    def test_secretsNotInRepr(self):
        config = parseConfig(REQUIRED + CLUSTER[:-1] + ["cluster-s3cret"], {})
        self.assertNotIn("s3cret", repr(config))

    def test_noFileRead(self):
        """
        Certificate files are the wiring's to read (L{relay.service}): a
        path that does not exist is a valid setting here.
        """
        config = parseConfig(
            REQUIRED
            + ["--tls-cert-file", "/nonexistent.crt", "--tls-key-file", "/nonexistent.key"],
            {},
        )
        self.assertEqual(
            (config.tlsCertFile, config.tlsKeyFile), ("/nonexistent.crt", "/nonexistent.key")
        )
        self.assertTrue(config.tls)
        self.assertEqual(config.instanceURL, "rels://127.0.0.1:33080")

    def test_optionsLeftAsGiven(self):
        """
        Checking does not rewrite the options: the workers are handed the
        values as given (and the fabric secret the first one made).
        """
        options = Options({})
        options.parseOptions(
            REQUIRED + ["--listen-address", ":8443", "--workers", "2", "--max-peers", "10"]
        )
        self.assertEqual((options["listen-address"], options["max-peers"]), (":8443", "10"))
        settings = options.config.settings
        self.assertEqual((settings["listen-address"], settings["max-peers"]), (":8443", "10"))
        self.assertEqual(settings["cluster-auth-secret"], options.config.cluster.secret)
        self.assertEqual(options["cluster-auth-secret"], "")

    def test_configFromMapping(self):
        """
        The check needs only the values by name, not an L{Options}.
        """
        options = Options({})
        options.parseOptions(REQUIRED)
        config = configFrom(dict(options), {})
        self.assertEqual(
            dataclasses.replace(config, limits=None),
            dataclasses.replace(options.config, limits=None),
        )

    def test_singlePod(self):
        config = parseConfig(REQUIRED, {})
        self.assertIsNone(config.cluster)
        self.assertIsNone(config.acme)
        self.assertIsNone(config.workerTag)
        self.assertEqual((config.workers, config.workerIndex), (1, 0))

    def test_cluster(self):
        cluster = parseConfig(
            REQUIRED + CLUSTER + ["--cluster-discovery-interval", "2.5", "--cluster-port", "7091"],
            {},
        ).cluster
        self.assertEqual(
            (cluster.headless, cluster.podIP, cluster.port, cluster.listen),
            ("relay-headless", "10.0.0.7", 7091, ("10.0.0.7", 7091)),
        )
        self.assertEqual(
            (cluster.secret, cluster.discoveryInterval, cluster.compat), ("c", 2.5, False)
        )
