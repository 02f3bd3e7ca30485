"""
Admission against real relay processes with their default limits: many
agents behind one address all get in, a flood of idle connections does not
keep agents out, and running out of descriptors leaves /healthz answering.
"""

import socket
import time
import urllib.request

from twisted.trial import unittest

from tests.bench import peers, wire
from tests.bench.peers import HandshakeRun
from tests.bench.relayproc import RelayProcess, raiseFileLimit
from tests.loopback import freePort
from tests.test_e2e_operability import sample

SECRET = "admission-secret"


def start(testCase, relay, metricsPort=None):
    """
    Start C{relay}; with C{metricsPort}, also wait for its metrics port (it
    opens after the peer port, and a flood's source ports could take it).
    """
    relay.start()
    testCase.addCleanup(relay.stop)
    deadline = time.monotonic() + 10
    while metricsPort is not None:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{metricsPort}/healthz", timeout=5)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    return relay


def handshakes(testCase, port, count, concurrency, prefix, source=None):
    """
    C{count} agents from C{source} (the default source address when None),
    C{concurrency} at a time; they stay connected until the test ends.
    """
    names = [f"{prefix}-{i}" for i in range(count)]
    run = HandshakeRun("127.0.0.1", port, names, wire.token(SECRET), concurrency=concurrency)
    run.distinctSources = source is not None
    if source is not None:
        testCase.patch(peers, "sourceAddress", lambda i: source)
    run.run()
    testCase.addCleanup(run.closeAll)
    return run


def idleConnections(sources, perSecond, seconds, port, into):
    """
    TCP connections that never send a byte, C{perSecond} from each of
    C{sources}, for C{seconds}; appended to C{into} (closed by the caller).
    """
    interval = 1.0 / perSecond
    begin = time.monotonic()
    for tick in range(round(seconds * perSecond)):
        for host in sources:
            sock = socket.socket()
            sock.setblocking(False)
            sock.bind((host, 0))
            sock.connect_ex(("127.0.0.1", port))
            into.append(sock)
        delay = begin + (tick + 1) * interval - time.monotonic()
        if delay > 0:
            time.sleep(delay)


def closeAll(sockets):
    for sock in sockets:
        sock.close()
    del sockets[:]


def metric(port, name, **labels):
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return sample(text, name, **labels) or 0.0


class DefaultsTests(unittest.TestCase):
    def setUp(self):
        raiseFileLimit(None)

    def test_5000AgentsFromOneAddress(self):
        # An office NAT, CGNAT or a Kubernetes node (externalTrafficPolicy:
        # Cluster) puts many agents behind one address; the Go relay takes
        # them all, and so do the default limits. (Before: 1,000 per address
        # and 100 new per second refused most of them.)
        relay = start(self, RelayProcess(SECRET))
        run = handshakes(self, relay.port, 5000, 256, "nat")
        self.assertEqual((len(run.socks), run.errors), (5000, {}))

    def test_reconnectStormFromOneAddress(self):
        # A pod restart: 5,000 agents behind one NAT reconnect at once, more
        # than the 2,048 pending slots for a moment. None is evicted: they
        # are all young (an evict-the-oldest rule without that closed 1,772).
        relay = start(self, RelayProcess(SECRET))
        run = handshakes(self, relay.port, 5000, 5000, "storm")
        self.assertEqual((len(run.socks), run.errors), (5000, {}))

    def test_idleFloodDoesNotStarveAgents(self):
        # Issue 12, item 2: idle connections from three addresses at 90/s
        # each filled the pending slots; from then on every agent was reset.
        # Here with 300 slots (the unit test FloodTests has the default 2,048
        # on a Clock); the table is full of the flood, old enough to be
        # evicted, when the agents come.
        metricsPort = freePort("127.0.0.1")
        relay = start(
            self,
            RelayProcess(
                SECRET,
                extra=[
                    "--max-pending-handshakes",
                    "300",
                    "--metrics-port",
                    str(metricsPort),
                    "--metrics-address",
                    "127.0.0.1",
                ],
            ),
            metricsPort,
        )
        flood = []
        self.addCleanup(closeAll, flood)
        idleConnections(["127.0.0.2", "127.0.0.3", "127.0.0.4"], 90, 4.0, relay.port, flood)
        run = handshakes(self, relay.port, 20, 4, "agent", source="127.0.0.5")
        self.assertEqual((len(run.socks), run.errors), (20, {}))
        self.assertGreaterEqual(
            metric(metricsPort, "relay_handshake_rejects_total", reason="pending_evicted"), 20
        )


class _LowLimitRelay(RelayProcess):
    """
    A relay started with a low descriptor limit (soft, hard).
    """

    def __init__(self, *args, soft, hard, **kwargs):
        super().__init__(*args, **kwargs)
        self.soft = soft
        self.hard = hard

    @property
    def argv(self):
        argv = super().argv
        argv[2] = (
            f"import resource; resource.setrlimit(resource.RLIMIT_NOFILE, ({self.soft}, "
            f"{self.hard})); " + argv[2]
        )
        return argv


class DescriptorTests(unittest.TestCase):
    def test_healthzAnswersWhenDescriptorsRunOut(self):
        metricsPort = freePort("127.0.0.1")
        relay = start(
            self,
            _LowLimitRelay(
                SECRET,
                extra=["--metrics-port", str(metricsPort), "--metrics-address", "127.0.0.1"],
                soft=200,
                hard=300,
            ),
            metricsPort,
        )
        flood = []
        self.addCleanup(closeAll, flood)
        for _ in range(400):
            sock = socket.create_connection(("127.0.0.1", relay.port), timeout=5)
            flood.append(sock)
        try:
            answer = urllib.request.urlopen(f"http://127.0.0.1:{metricsPort}/healthz", timeout=5)
        except OSError as e:
            self.fail(f"{e}\n{relay.logTail(30000)}")
        self.assertEqual((answer.status, answer.read()), (200, b"ok\n"))
        refused = metric(metricsPort, "relay_handshake_rejects_total", reason="descriptors")
        self.assertGreater(refused, 0)
        log = relay.logTail(20000)
        self.assertIn("open file limit raised from 200 to 300 (the hard limit)", log)
        self.assertIn("the open file limit (300) leaves room for", log)
        # Agents from elsewhere still get in: each takes the place of the
        # oldest flood connection.
        run = handshakes(self, relay.port, 10, 2, "agent", source="127.0.0.9")
        self.assertEqual((len(run.socks), run.errors), (10, {}))
        self.assertGreaterEqual(
            metric(metricsPort, "relay_handshake_rejects_total", reason="pending_evicted"), 10
        )
        # Once the flood is gone there is room again.
        closeAll(flood)
        time.sleep(0.5)
        run = handshakes(self, relay.port, 10, 10, "after")
        self.assertEqual((len(run.socks), run.errors), (10, {}))
