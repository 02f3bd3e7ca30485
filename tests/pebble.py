"""
Debian's pebble ACME test server on loopback, for tests.

Install it with C{apt-get install -y pebble}. Each L{Pebble} gets its own
config and HTTPS certificate in a temporary directory and free ports on
127.0.0.1; nothing listens on other addresses.
"""

import json
import os
import shutil
import signal
import socket

from twisted.internet import defer, protocol

from tests.certs import writeCertificate

PEBBLE = shutil.which("pebble") or ("/usr/bin/pebble" if os.access("/usr/bin/pebble", os.X_OK) else None)

SKIP = None if PEBBLE else "pebble is not installed (apt-get install -y pebble)"

_READY = b"ACME directory available at:"


def freePort():
    """
    @return: a TCP port on 127.0.0.1 that was free a moment ago.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
            self.ready.errback(RuntimeError(f"pebble exited before it was ready: {self.output.decode('utf-8', 'replace')[-2000:]}"))
        self.ended.callback(None)


class Pebble:
    """
    One pebble process.

    @ivar directoryURL: the ACME directory.
    @ivar caBundle: PEM file that verifies pebble's HTTPS listeners.
    @ivar managementURL: base URL of the management interface (C{/roots/0}).
    """

    def __init__(self, directory, alwaysValid=True, httpPort=None, tlsPort=None, validityPeriod=None):
        """
        @param directory: a fresh temporary directory for config and certificate.
        @param alwaysValid: skip challenge validation (C{PEBBLE_VA_ALWAYS_VALID}).
        @param httpPort: the port pebble validates HTTP-01 on (127.0.0.1).
        @param tlsPort: the port pebble validates TLS-ALPN-01 on (127.0.0.1).
        @param validityPeriod: lifetime of issued certificates in seconds
            (pebble's default is five years).
        """
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
        self._process = reactor.spawnProcess(self._protocol, PEBBLE, [PEBBLE, "-config", self.configPath], env=self.environment, path=self.directory)
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
        with urllib.request.urlopen(f"{self.managementURL}/roots/0", context=context, timeout=timeout) as response:
            return response.read()
