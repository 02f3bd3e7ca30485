"""
C{twistd relay}'s command line, read into a L{RelayConfig}.

The options mirror the Go relay's flags so a deployment switches by changing
its image: every option also comes from C{OZ_<OPTION_IN_UPPER_SNAKE>}, and a
flag beats the variable.

Reading is one step, L{configFrom}: it checks every value and raises
L{usage.UsageError} naming the flag (and its variable) at the first bad one,
and returns a frozen L{RelayConfig}. It reads no file and opens no socket:
certificates, log files and listeners belong to the wiring
(L{relay.service.makeService}), which only ever sees checked values.
"""

import os
import secrets
from dataclasses import dataclass, field
from types import MappingProxyType

from twisted.logger import LogLevel
from twisted.python import usage

from relay.addresses import joinAddress, splitAddress, workerAddress, workerAddresses
from relay.limits import Limits, parseNetworks
from relay.listener.ws import DEFAULT_HIGH_WATER
from relay.relay import ConfigurationError, instanceURL

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


@dataclass(frozen=True)
class AcmeConfig:
    """
    C{--letsencrypt-*}: one certificate for C{domains} from an ACME CA.
    """

    domains: tuple
    dataDir: str
    email: str | None
    directoryURL: str | None
    challenge: str
    httpPort: int


@dataclass(frozen=True)
class ClusterConfig:
    """
    The inter-pod fabric (C{--cluster-*}; with C{--workers}, the workers'
    fabric on loopback).

    @ivar headless: comma-separated DNS names and/or IP literals of the pods.
    @ivar listen: C{(host, port)} the inter-pod listener binds.
    @ivar secret: the cluster secret; empty only with C{--cluster-insecure}.
    """

    headless: str
    podIP: str
    port: int
    listen: tuple
    secret: str = field(repr=False)
    discoveryInterval: float
    compat: bool


@dataclass(frozen=True)
class RelayConfig:
    """
    Every setting of one relay process, checked.

    @ivar listen: C{(host, port)} of the peer listener; an empty host is
        every interface.
    @ivar instanceURL: the URL peers are told to reach this instance at.
    @ivar acme: the L{AcmeConfig}, or None without C{--letsencrypt-*}.
    @ivar cluster: the L{ClusterConfig}, or None in single-pod mode.
    @ivar limits: the L{Limits} of this process (with C{--workers}, its
        share of the host's).
    @ivar settings: the option values as given (strings, None when unset),
        with the fabric secret worker 0 made: what the other workers get in
        their environment (L{relay.workers.workerEnvironment}).
    """

    listen: tuple
    instanceURL: str
    authSecret: str = field(repr=False)
    tlsCertFile: str | None
    tlsKeyFile: str | None
    acme: AcmeConfig | None
    metricsPort: int
    metricsAddress: str
    logLevel: str
    logFile: str
    logFormat: str
    peerBufferLimit: int
    limits: Limits
    healthCheckThreshold: int
    cluster: ClusterConfig | None
    workers: int
    workerIndex: int
    settings: MappingProxyType = field(repr=False)

    @property
    def tls(self):
        """
        Whether the peer listener serves TLS (and QUIC beside it).
        """
        return self.tlsCertFile is not None or self.acme is not None

    @property
    def workerTag(self):
        """
        This process's index among C{--workers}, or None when it is the only
        one (log lines then carry no worker mark).
        """
        return self.workerIndex if self.workers > 1 else None


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "A relay for openZro / NetBird agents. Every option can also be set "
        "with the environment variable OZ_<OPTION_IN_UPPER_SNAKE>, e.g. "
        "OZ_AUTH_SECRET; a flag beats the variable."
    )

    optParameters = [
        [
            "listen-address",
            "l",
            ":443",
            "host:port the peer listener (WebSocket, and QUIC with TLS) binds.",
        ],
        [
            "exposed-address",
            "e",
            None,
            "Address peers reach this instance at (host:port, rel://… or rels://…). Required.",
        ],
        ["auth-secret", "s", None, "Secret shared with the management server. Required."],
        ["tls-cert-file", "c", None, "PEM certificate (chain) for TLS on the peer listener."],
        ["tls-key-file", "k", None, "PEM private key for --tls-cert-file."],
        [
            "letsencrypt-data-dir",
            "d",
            None,
            "Directory for the ACME account key and certificates (0700); with "
            "--letsencrypt-domains turns ACME on.",
        ],
        [
            "letsencrypt-domains",
            "a",
            None,
            "Comma-separated domains to obtain one certificate for (with --letsencrypt-data-dir).",
        ],
        ["letsencrypt-email", None, None, "ACME account contact e-mail."],
        [
            "letsencrypt-directory-url",
            None,
            None,
            "ACME directory URL (default: Let's Encrypt production); for staging or a private CA.",
        ],
        [
            "letsencrypt-challenge",
            None,
            "tls-alpn-01",
            "tls-alpn-01 (on the peer port, whatever its number, as the Go relay) or http-01 (on "
            "--letsencrypt-http-port; tls-alpn-01 if that port cannot be bound).",
        ],
        ["letsencrypt-http-port", None, "80", "Port of the HTTP-01 challenge listener."],
        [
            "metrics-port",
            None,
            "9090",
            "Port of the metrics and health HTTP endpoint; 0 turns it off.",
        ],
        [
            "metrics-address",
            None,
            "",
            "Address the metrics endpoint binds (empty: every interface, as the Go relay).",
        ],
        ["log-level", None, "info", "trace, debug, info, warn or error."],
        ["log-file", None, "console", "'console' for standard output, or a file path."],
        ["log-format", None, "text", "text, or json for one JSON object per line."],
        [
            "peer-buffer-limit",
            None,
            str(DEFAULT_HIGH_WATER),
            "Bytes queued for one slow peer before messages to it are dropped.",
        ],
        ["max-peers", None, "50000", "Authenticated peers in all; 0 = no limit."],
        [
            "max-pending-handshakes",
            None,
            "2048",
            "Connections waiting to authenticate; 0 = no limit.",
        ],
        [
            "max-connections-per-ip",
            None,
            "0",
            "Open connections from one source address (an IPv6 /64 counts as one); 0 = no limit, "
            "the default: NAT, CGNAT and load balancers put many agents behind one.",
        ],
        [
            "connection-rate-per-ip",
            None,
            "0",
            "New connections per second from one source address (an IPv6 /64 counts as one), "
            "bursts of twice that; 0 = no limit, the default.",
        ],
        [
            "peer-rate-limit",
            None,
            "0",
            "Inbound transport bytes per second from one peer; excess is dropped; 0 = no limit.",
        ],
        [
            "trusted-proxies",
            None,
            "",
            "Comma-separated addresses/networks of proxies whose X-Real-IP header names the "
            "source address.",
        ],
        [
            "cluster-headless",
            None,
            "",
            "Headless Service name (or comma-separated names/IPs) of the relay pods; empty = "
            "single-pod mode.",
        ],
        ["cluster-port", None, "7090", "Inter-pod TCP port, the same on every pod."],
        [
            "cluster-listen-address",
            None,
            None,
            "host:port the inter-pod listener binds (default <pod-ip>:<cluster-port>).",
        ],
        [
            "pod-ip",
            None,
            None,
            "This pod's IP (default: the POD_IP variable). Required with --cluster-headless.",
        ],
        [
            "cluster-auth-secret",
            None,
            "",
            "Secret authenticating the pods to each other and every inter-pod frame, the same on "
            "every pod. Required with --cluster-headless unless --cluster-insecure.",
        ],
        ["cluster-discovery-interval", None, "10", "Seconds between discovery passes."],
        [
            "workers",
            None,
            "1",
            "Relay processes on this host sharing the peer port (SO_REUSEPORT), joined by the "
            "fabric over 127.0.1.x; keep 1 per pod on Kubernetes.",
        ],
        [
            "worker-index",
            None,
            "0",
            "Internal: which of --workers this process is (set by the first worker for the "
            "others).",
        ],
    ]

    optFlags = [
        ["letsencrypt-aws-route53", None, "Use Route 53 DNS-01 for Let's Encrypt (not supported)."],
        [
            "cluster-insecure",
            None,
            "Run the inter-pod fabric without a cluster secret: anyone reaching the cluster port "
            "joins it.",
        ],
        [
            "cluster-compat",
            None,
            "Also take Go relay pods into the fabric (their HELLO only authenticates them, their "
            "frames are not); for migrating pod by pod.",
        ],
    ]

    def __init__(self, environ=None):
        super().__init__()
        environ = os.environ if environ is None else environ
        self.environ = environ
        self.config = None
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
            self.config = configFrom(self, self.environ)
        except usage.UsageError:
            self._invalidValue = True
            raise


def parseConfig(argv, environ):
    """
    The L{RelayConfig} of a command line and an environment.

    @raise usage.UsageError: naming the first bad value.
    """
    options = Options(environ)
    options.parseOptions(argv)
    return options.config


def _nonNegativeInt(value, what):
    try:
        number = int(value)
    except ValueError:
        raise usage.UsageError(f"--{what} must be an integer, not {value!r}") from None
    if number < 0:
        raise usage.UsageError(f"--{what} must not be negative")
    return number


def _listenAddress(value, what):
    try:
        return splitAddress(value, listening=True)
    except ValueError:
        raise usage.UsageError(f"--{what} must be host:port, not {value!r}") from None


def configFrom(values, environ):
    """
    Check every option and build the L{RelayConfig}: the only place option
    text becomes typed values.

    @param values: the option values by long name (an L{Options} after
        parsing), as given.
    @param environ: the environment, for the variables that are no option
        (C{OZ_RELAY_HC_ATTEMPT_THRESHOLD}, C{POD_IP}).

    @raise usage.UsageError: naming the first bad value.
    """
    for required in ("exposed-address", "auth-secret"):
        if not values[required]:
            raise usage.UsageError(f"--{required} (or {variableFor(required)}) is required")
    if values["letsencrypt-aws-route53"]:
        raise usage.UsageError(
            "--letsencrypt-aws-route53: Route 53 DNS-01 is not supported by this relay"
        )
    certFile, keyFile = values["tls-cert-file"] or None, values["tls-key-file"] or None
    if bool(certFile) != bool(keyFile):
        raise usage.UsageError("--tls-cert-file and --tls-key-file go together")
    listen = _listenAddress(values["listen-address"], "listen-address")
    acme = _acmeConfig(values)
    metricsPort = _nonNegativeInt(values["metrics-port"], "metrics-port")
    if metricsPort > 65535:
        raise usage.UsageError("--metrics-port must be a port number")
    peerBufferLimit = _nonNegativeInt(values["peer-buffer-limit"], "peer-buffer-limit")
    limits = _limits(values)
    level = values["log-level"].lower()
    if level not in LOG_LEVELS:
        raise usage.UsageError(
            "--log-level must be one of trace, debug, info, warn, error, not "
            f"{values['log-level']!r}"
        )
    if values["log-format"] not in ("text", "json"):
        raise usage.UsageError(f"--log-format must be text or json, not {values['log-format']!r}")
    threshold = environ.get(HC_THRESHOLD_VARIABLE, "1")
    try:
        healthCheckThreshold = max(1, int(threshold))
    except ValueError:
        raise usage.UsageError(
            f"{HC_THRESHOLD_VARIABLE} must be an integer, not {threshold!r}"
        ) from None
    try:
        url = instanceURL(values["exposed-address"], certFile is not None or acme is not None)
    except ConfigurationError as e:
        raise usage.UsageError(str(e)) from None
    # As given: what --workers hands to the other workers.
    settings = {name: values[name] for name, *_ in Options.optParameters}
    workers, workerIndex, cluster = _clusterConfig(values, environ, acme, settings)
    if workers > 1:
        limits = limits.shared(workers)
    return RelayConfig(
        listen=listen,
        instanceURL=url,
        authSecret=values["auth-secret"],
        tlsCertFile=certFile,
        tlsKeyFile=keyFile,
        acme=acme,
        metricsPort=metricsPort,
        metricsAddress=values["metrics-address"],
        logLevel=level,
        logFile=values["log-file"],
        logFormat=values["log-format"],
        peerBufferLimit=peerBufferLimit,
        limits=limits,
        healthCheckThreshold=healthCheckThreshold,
        cluster=cluster,
        workers=workers,
        workerIndex=workerIndex,
        settings=MappingProxyType(settings),
    )


def _acmeConfig(values):
    domains = tuple(
        d.strip() for d in (values["letsencrypt-domains"] or "").split(",") if d.strip()
    )
    if not (domains or values["letsencrypt-data-dir"]):
        return None
    if not (domains and values["letsencrypt-data-dir"]):
        raise usage.UsageError("--letsencrypt-domains and --letsencrypt-data-dir go together")
    if values["tls-cert-file"]:
        raise usage.UsageError(
            "use either --tls-cert-file/--tls-key-file or --letsencrypt-*, not both"
        )
    httpPort = _nonNegativeInt(values["letsencrypt-http-port"], "letsencrypt-http-port")
    challenge = (values["letsencrypt-challenge"] or "tls-alpn-01").strip().lower()
    if challenge not in ("tls-alpn-01", "http-01"):
        raise usage.UsageError(
            f"--letsencrypt-challenge must be tls-alpn-01 or http-01, not {challenge!r}"
        )
    return AcmeConfig(
        domains=domains,
        dataDir=values["letsencrypt-data-dir"],
        email=values["letsencrypt-email"],
        directoryURL=values["letsencrypt-directory-url"],
        challenge=challenge,
        httpPort=httpPort,
    )


def _limits(values):
    counts = {}
    for name in (
        "max-peers",
        "max-pending-handshakes",
        "max-connections-per-ip",
        "connection-rate-per-ip",
        "peer-rate-limit",
    ):
        counts[name] = _nonNegativeInt(values[name], name)
    try:
        trusted = parseNetworks(values["trusted-proxies"])
    except ValueError as e:
        raise usage.UsageError(f"--trusted-proxies: {e}") from None
    return Limits(
        maxPeers=counts["max-peers"],
        maxPending=counts["max-pending-handshakes"],
        maxPerIP=counts["max-connections-per-ip"],
        ratePerIP=counts["connection-rate-per-ip"],
        peerByteRate=counts["peer-rate-limit"],
        trustedProxies=trusted,
    )


def _clusterConfig(values, environ, acme, settings):
    """
    C{(workers, workerIndex, ClusterConfig or None)}.

    With C{--workers} the workers are pods of a cluster on loopback
    (L{relay.workers}): the fabric's settings are theirs, whatever the
    C{--cluster-*} options say. The first worker makes the fabric's secret
    (into C{settings}); the others get it in their environment.
    """
    port = _nonNegativeInt(values["cluster-port"], "cluster-port")
    try:
        interval = float(values["cluster-discovery-interval"])
    except ValueError:
        interval = 0
    if not interval > 0:
        raise usage.UsageError("--cluster-discovery-interval must be a positive number of seconds")
    workers = _nonNegativeInt(values["workers"], "workers")
    workerIndex = _nonNegativeInt(values["worker-index"], "worker-index")
    if workers < 1:
        raise usage.UsageError("--workers must be at least 1")
    headless = values["cluster-headless"]
    podIP = values["pod-ip"]
    secret = values["cluster-auth-secret"]
    listenAddress = values["cluster-listen-address"]
    if workers > 1:
        if workerIndex >= workers:
            raise usage.UsageError("--worker-index must be below --workers")
        if headless and workerIndex == 0:
            raise usage.UsageError(
                "--workers and --cluster-headless do not mix: run one worker per pod in a cluster"
            )
        if acme is not None:
            raise usage.UsageError(
                "--workers and --letsencrypt-* do not mix: give the workers certificate files"
            )
        if not secret:
            secret = settings["cluster-auth-secret"] = secrets.token_hex(32)
        headless = workerAddresses(workers)
        podIP = workerAddress(workerIndex)
        listenAddress = joinAddress(podIP, port)
    if not headless:
        return workers, workerIndex, None
    podIP = podIP or environ.get("POD_IP")
    if not podIP:
        raise usage.UsageError(
            "--pod-ip (or OZ_POD_IP or POD_IP) is required with --cluster-headless"
        )
    if not secret and not values["cluster-insecure"]:
        raise usage.UsageError(
            "--cluster-auth-secret (or OZ_CLUSTER_AUTH_SECRET) is required with "
            "--cluster-headless; --cluster-insecure runs the fabric without authentication"
        )
    # Only the pod's own address: the fabric has no business on other
    # interfaces (the Go relay binds every one).
    listen = _listenAddress(listenAddress or joinAddress(podIP, port), "cluster-listen-address")
    return (
        workers,
        workerIndex,
        ClusterConfig(
            headless=headless,
            podIP=podIP,
            port=port,
            listen=listen,
            secret=secret,
            discoveryInterval=interval,
            compat=bool(values["cluster-compat"]),
        ),
    )
