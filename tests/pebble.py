"""
Debian's pebble ACME test server on loopback, for tests.

Install it with C{apt-get install -y pebble}. Each L{Pebble} gets its own
config and HTTPS certificate in a temporary directory and free ports on
127.0.0.1; nothing listens on other addresses. Without pebble the tests that
need it skip, except in CI (the C{CI} variable set), where they fail: a CI
run that silently tested no ACME would look green.

L{HostsDNS} answers pebble's lookups (C{-dnsserver}) with loopback addresses
of our choosing, so that relays on different addresses of one host can each
be validated for their own name.
"""

import json
import os
import shutil
import signal

from twisted.internet import defer, protocol
from twisted.internet.error import CannotListenError
from twisted.names import dns, error, server
from twisted.names.common import ResolverBase

from tests.certs import writeCertificate
from tests.loopback import freePort

PEBBLE = shutil.which("pebble") or (
    "/usr/bin/pebble" if os.access("/usr/bin/pebble", os.X_OK) else None
)

_MISSING = "pebble is not installed (apt-get install -y pebble)"

SKIP = None if PEBBLE or os.environ.get("CI") else _MISSING

_READY = b"ACME directory available at:"


class _PebbleProcess(protocol.ProcessProtocol):
    def __init__(self):
        self.output = b""
        self.ready = defer.Deferred()
        self.ended = defer.Deferred()

    def outReceived(self, data):
        self.output += data
        if not self.ready.called and _READY in self.output:
            self.ready.callback(None)

    errReceived = outReceived

    def processEnded(self, reason):
        if not self.ready.called:
            self.ready.errback(
                RuntimeError(
                    "pebble exited before it was ready: "
                    f"{self.output.decode('utf-8', 'replace')[-2000:]}"
                )
            )
        self.ended.callback(None)


class Pebble:
    """
    One pebble process.

    @ivar directoryURL: the ACME directory.
    @ivar caBundle: PEM file that verifies pebble's HTTPS listeners.
    @ivar managementURL: base URL of the management interface (C{/roots/0}).
    """

    def __init__(
        self,
        directory,
        alwaysValid=True,
        httpPort=None,
        tlsPort=None,
        validityPeriod=None,
        dnsServer=None,
    ):
        """
        @param directory: a fresh temporary directory for config and certificate.
        @param alwaysValid: skip challenge validation (C{PEBBLE_VA_ALWAYS_VALID}).
        @param httpPort: the port pebble validates HTTP-01 on (127.0.0.1).
        @param tlsPort: the port pebble validates TLS-ALPN-01 on (127.0.0.1).
        @param validityPeriod: lifetime of issued certificates in seconds
            (pebble's default is five years).
        @param dnsServer: C{host:port} of the DNS server pebble resolves
            names with (see L{HostsDNS}); the system's by default.
        @raise RuntimeError: pebble is not installed (only reached in CI;
            elsewhere the tests skip).
        """
        if PEBBLE is None:
            raise RuntimeError(f"{_MISSING}; CI is set, so the ACME tests fail instead of skipping")
        self.dnsServer = dnsServer
        directory = os.path.abspath(directory)
        os.makedirs(directory, exist_ok=True)
        self.directory = directory
        self.caBundle, key, _ = writeCertificate(directory, name="localhost", days=2)
        self.port, self.managementPort = freePort(), freePort()
        self.directoryURL = f"https://127.0.0.1:{self.port}/dir"
        self.managementURL = f"https://127.0.0.1:{self.managementPort}"
        config = {
            "pebble": {
                "listenAddress": f"127.0.0.1:{self.port}",
                "managementListenAddress": f"127.0.0.1:{self.managementPort}",
                "certificate": self.caBundle,
                "privateKey": key,
                "httpPort": httpPort or freePort(),
                "tlsPort": tlsPort or freePort(),
                "ocspResponderURL": "",
                "externalAccountBindingRequired": False,
            }
        }
        if validityPeriod is not None:
            config["pebble"]["certificateValidityPeriod"] = validityPeriod
        self.configPath = os.path.join(directory, "pebble-config.json")
        with open(self.configPath, "w") as f:
            json.dump(config, f)
        self.environment = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PEBBLE_VA_NOSLEEP": "1",
            "PEBBLE_WFE_NONCEREJECT": "0",
            "PEBBLE_VA_ALWAYS_VALID": "1" if alwaysValid else "0",
        }
        self._process = None
        self._protocol = None

    def start(self, reactor, timeout=15):
        """
        @return: a L{Deferred} firing when the directory is served.
        """
        self._protocol = _PebbleProcess()
        argv = [PEBBLE, "-config", self.configPath]
        if self.dnsServer is not None:
            argv += ["-dnsserver", self.dnsServer]
        self._process = reactor.spawnProcess(
            self._protocol, PEBBLE, argv, env=self.environment, path=self.directory
        )
        return self._protocol.ready.addTimeout(timeout, reactor)

    def stop(self, reactor, timeout=10):
        """
        @return: a L{Deferred} firing when the process has exited.
        """
        if self._protocol is None or self._protocol.ended.called:
            return defer.succeed(None)
        ended = self._protocol.ended
        try:
            self._process.signalProcess("TERM")
        except OSError:
            pass

        def kill(failure):
            failure.trap(defer.TimeoutError)
            os.kill(self._process.pid, signal.SIGKILL)

        return ended.addTimeout(timeout, reactor).addErrback(kill)

    @property
    def output(self):
        return b"" if self._protocol is None else self._protocol.output

    def rootPEM(self, timeout=10):
        """
        Blocking: the root that issued pebble's certificates (run in a thread).
        """
        import ssl
        import urllib.request

        context = ssl.create_default_context(cafile=self.caBundle)
        with urllib.request.urlopen(
            f"{self.managementURL}/roots/0", context=context, timeout=timeout
        ) as response:
            return response.read()


class _Hosts(ResolverBase):
    """
    A resolver that knows only C{addresses} (name → IPv4 address): an A
    record for each, no other records, and NXDOMAIN for anything else.
    """

    def __init__(self, addresses):
        super().__init__()
        self.addresses = {name.lower(): address for name, address in addresses.items()}

    def _lookup(self, name, cls, type, timeout):
        key = name.decode("ascii").lower().rstrip(".")
        if key not in self.addresses:
            return defer.fail(error.DomainError(name))
        answers = []
        if type in (dns.A, dns.ALL_RECORDS):
            answers.append(
                dns.RRHeader(
                    name, dns.A, dns.IN, 60, dns.Record_A(self.addresses[key], 60), auth=True
                )
            )
        return defer.succeed((answers, [], []))


class HostsDNS:
    """
    A DNS server on 127.0.0.1 (UDP and TCP on one free port) answering for
    a fixed set of names.

    @ivar address: C{"127.0.0.1:<port>"}, for pebble's C{-dnsserver}.
    """

    def __init__(self, addresses):
        self._factory = server.DNSServerFactory(authorities=[_Hosts(addresses)])
        self._ports = []
        self.address = None

    def start(self, reactor):
        while True:
            port = freePort()
            tcp = reactor.listenTCP(port, self._factory, interface="127.0.0.1")
            try:
                udp = reactor.listenUDP(
                    port, dns.DNSDatagramProtocol(self._factory), interface="127.0.0.1"
                )
            except CannotListenError:
                tcp.stopListening()
                continue
            self._ports = [udp, tcp]
            self.address = f"127.0.0.1:{port}"
            return

    def stop(self):
        return defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in self._ports])
