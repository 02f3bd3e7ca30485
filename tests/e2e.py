"""
Real C{twistd relay} processes on loopback for end-to-end tests.
"""

import os
import sys

from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ProcessDone, ProcessTerminated

from tests.loopback import freePort

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START_TIMEOUT = 20.0
STOP_TIMEOUT = 35.0


class RawClient(protocol.Protocol):
    """
    A raw TCP client, for what a stranger, an attacker or a Go pod sends:
    records what it receives, and C{closed} fires when it is closed.
    """

    def __init__(self):
        self.received = b""
        self.closed = defer.Deferred()

    def dataReceived(self, data):
        self.received += data

    def connectionLost(self, reason):
        self.closed.callback(None)


def rawConnect(port, host="127.0.0.1", source=None):
    """
    A L{RawClient} connected to C{host}:C{port}, from C{source} if given
    (loopback lets a test pick any 127/8 address, as an attacker spoofing
    one would).
    """
    bindAddress = None if source is None else (source, 0)
    return connectProtocol(
        TCP4ClientEndpoint(reactor, host, port, timeout=5, bindAddress=bindAddress), RawClient()
    )


def sleep(seconds):
    d = defer.Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


class RelayProcess(protocol.ProcessProtocol):
    """
    One C{twistd -n relay} child process.

    @ivar output: everything it wrote to stdout and stderr.
    @ivar exitCode: its exit code once it ended, else None.
    """

    def __init__(self, args, host="127.0.0.1", port=None, env=None):
        self.host = host
        self.port = port or freePort(host)
        self.args = args
        self.env = env
        self.output = b""
        self.exitCode = None
        self._waiters = []

    @property
    def url(self):
        return f"rel://{self.host}:{self.port}"

    def outReceived(self, data):
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason):
        if isinstance(reason.value, ProcessDone):
            self.exitCode = 0
        elif isinstance(reason.value, ProcessTerminated):
            self.exitCode = (
                reason.value.exitCode if reason.value.exitCode is not None else -reason.value.signal
            )
        for d in self._waiters:
            d.callback(self.exitCode)

    def spawn(self):
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        argv = [
            sys.executable,
            "-c",
            "from twisted.scripts.twistd import run; run()",
            "-n",
            "--pidfile=",
            "relay",
        ] + self.args
        self.transport = reactor.spawnProcess(self, sys.executable, argv, env=env, path=ROOT)

    @defer.inlineCallbacks
    def start(self):
        """
        Spawn the process and wait until its peer port accepts connections.
        """
        self.spawn()
        deadline = reactor.seconds() + START_TIMEOUT
        while True:
            if self.exitCode is not None:
                raise RuntimeError(
                    f"relay exited with {self.exitCode}:\n{self.output.decode(errors='replace')}"
                )
            try:
                p = yield connectProtocol(
                    TCP4ClientEndpoint(reactor, self.host, self.port, timeout=1),
                    protocol.Protocol(),
                )
                p.transport.abortConnection()
                return self
            except Exception:
                if reactor.seconds() > deadline:
                    self.signal("KILL")
                    raise RuntimeError(
                        f"relay did not listen within {START_TIMEOUT} s:\n"
                        f"{self.output.decode(errors='replace')}"
                    ) from None
                yield sleep(0.05)

    def signal(self, name):
        if self.exitCode is None:
            self.transport.signalProcess(name)

    def ended(self, timeout=STOP_TIMEOUT):
        """
        @return: a Deferred firing with the exit code (SIGKILL after C{timeout}).
        """
        if self.exitCode is not None:
            return defer.succeed(self.exitCode)
        timer = reactor.callLater(timeout, self.signal, "KILL")

        def cancelTimer(code):
            if timer.active():
                timer.cancel()
            return code

        d = defer.Deferred()
        self._waiters.append(d)
        return d.addBoth(cancelTimer)

    def stop(self):
        """
        SIGTERM, then wait for the exit code.
        """
        self.signal("TERM")
        return self.ended()


def relayArgs(process, secret="relay-secret", *extra):
    return [
        "--listen-address",
        f"{process.host}:{process.port}",
        "--exposed-address",
        f"{process.host}:{process.port}",
        "--auth-secret",
        secret,
        "--metrics-port",
        "0",
        *extra,
    ]


@defer.inlineCallbacks
def startRelay(testCase, *extra, host="127.0.0.1", secret="relay-secret", env=None):
    """
    Start a relay for C{testCase}, stopped (SIGTERM, else SIGKILL) at cleanup.
    """
    process = RelayProcess([], host=host, env=env)
    process.args = relayArgs(process, secret, *extra)
    testCase.addCleanup(process.stop)
    yield process.start()
    return process
