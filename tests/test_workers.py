"""
C{--workers N}: several relay processes on one host sharing the peer port.
"""

import json
import os
import re
import socket

from twisted.internet import defer, reactor
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.python import usage
from twisted.runner.procmon import ProcessMonitor
from twisted.trial import unittest

from relay import client
from relay import messages as m
from relay.addresses import workerAddresses
from relay.endpoints import ReusePortEndpoint
from relay.workers import WORKER_EXIT_GRACE, workerEnvironment, workersEnded
from tests.e2e import sleep, startRelay
from tests.test_service import REQUIRED, config

TIMESTAMP = re.compile(rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} ")


class OptionTests(unittest.TestCase):
    def test_oneWorkerIsPlain(self):
        c = config(REQUIRED)
        self.assertEqual(c.workers, 1)
        self.assertIsNone(c.cluster)

    def test_firstWorker(self):
        cluster = config(REQUIRED + ["--workers", "3"]).cluster
        self.assertEqual(cluster.headless, "127.0.1.1,127.0.1.2,127.0.1.3")
        self.assertEqual(cluster.podIP, "127.0.1.1")
        self.assertEqual(cluster.listen, ("127.0.1.1", 7090))
        self.assertEqual(len(cluster.secret), 64)

    def test_otherWorkerFromEnvironment(self):
        first = config(REQUIRED + ["--workers", "2", "--metrics-port", "9100"])
        env = workerEnvironment(first, 1)
        self.assertEqual(env["OZ_METRICS_PORT"], "9101")
        self.assertEqual(env["OZ_AUTH_SECRET"], "s3cret")
        second = config([], env)
        self.assertEqual(second.workerIndex, 1)
        self.assertEqual(second.cluster.podIP, "127.0.1.2")
        self.assertEqual(second.cluster.secret, first.cluster.secret)
        self.assertEqual(second.listen, first.listen)

    def test_noMetricsStaysOff(self):
        first = config(REQUIRED + ["--workers", "2", "--metrics-port", "0"])
        self.assertEqual(workerEnvironment(first, 1)["OZ_METRICS_PORT"], "0")

    def test_notWithACluster(self):
        e = self.assertRaises(
            usage.UsageError,
            config,
            REQUIRED + ["--workers", "2", "--cluster-headless", "x", "--pod-ip", "10.0.0.1"],
        )
        self.assertIn("do not mix", str(e))

    def test_atLeastOne(self):
        self.assertRaises(usage.UsageError, config, REQUIRED + ["--workers", "0"])

    def test_addresses(self):
        self.assertEqual(workerAddresses(2), "127.0.1.1,127.0.1.2")


class ReusePortTests(unittest.TestCase):
    def test_twoListenersOnePort(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        first = self.successResultOf(
            ReusePortEndpoint(reactor, "127.0.0.1", port).listen(Factory())
        )
        self.addCleanup(first.stopListening)
        second = self.successResultOf(
            ReusePortEndpoint(reactor, "127.0.0.1", port).listen(Factory())
        )
        self.addCleanup(second.stopListening)
        self.assertEqual(first.getHost().port, second.getHost().port)

    def test_bindErrorIsAFailure(self):
        self.failureResultOf(ReusePortEndpoint(reactor, "192.0.2.1", 1).listen(Factory()), OSError)


def childrenOf(pid):
    """
    The process ids of C{pid}'s children (Linux).
    """
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(child) for child in f.read().split()]


class WorkersEndedTests(unittest.TestCase):
    """
    L{workersEnded}: worker 0 stops after the workers it supervises.
    """

    def monitor(self, *names):
        monitor = ProcessMonitor(reactor=Clock())
        monitor.killTime = 35
        monitor.protocols = dict.fromkeys(names)
        return monitor

    def test_waits(self):
        clock, monitor = Clock(), self.monitor("relay-worker-1", "relay-worker-2")
        ended = workersEnded(monitor, clock)
        clock.advance(10)
        self.assertNoResult(ended)
        del monitor.protocols["relay-worker-2"]
        clock.advance(10)
        self.assertNoResult(ended)
        del monitor.protocols["relay-worker-1"]
        clock.advance(0.1)
        self.assertEqual(self.successResultOf(ended), [])

    def test_nothingRunning(self):
        self.assertEqual(self.successResultOf(workersEnded(self.monitor(), Clock())), [])

    def test_givesUp(self):
        """
        The wait ends a little after the monitor's SIGKILL, naming who is
        left.
        """
        clock, monitor = Clock(), self.monitor("relay-worker-1")
        ended = workersEnded(monitor, clock)
        clock.pump([0.1] * int((monitor.killTime + WORKER_EXIT_GRACE) / 0.1 - 1))
        self.assertNoResult(ended)
        clock.advance(0.2)
        self.assertEqual(self.successResultOf(ended), ["relay-worker-1"])


class WorkersEndToEndTests(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def test_pairsAcrossWorkers(self):
        relay = yield startRelay(self, "--workers", "2", "--connection-rate-per-ip", "0")
        for _ in range(300):
            if b"[worker-1 " in relay.output and relay.output.count(b"relay listening on") >= 2:
                break
            yield sleep(0.05)
        self.assertEqual(relay.output.count(b"relay listening on"), 2, relay.output.decode())
        peers = []
        for i in range(20):
            peer = yield client.connect(
                reactor, relay.url, m.peerID(f"p{i}"), secret="relay-secret"
            )
            self.addCleanup(
                lambda p=peer: p.transport.abortConnection() if p.transport.connected else None
            )
            peers.append(peer)
        for i in range(0, 20, 2):
            yield peers[i].waitOnline(peers[i + 1].factory.peerID)
        for i in range(0, 20, 2):
            for n in range(50):
                peers[i].send(peers[i + 1].factory.peerID, b"%d:%d" % (i, n))
        for i in range(0, 20, 2):
            got = []
            for _ in range(50):
                got.append((yield peers[i + 1].transports.get().addTimeout(10, reactor)))
            self.assertEqual(got, [(peers[i].factory.peerID, b"%d:%d" % (i, n)) for n in range(50)])
        lines = relay.output.splitlines()
        onSecond = [line for line in lines if b"[worker-1 " in line and b": connected" in line]
        onFirst = [line for line in lines if b"[worker-0 " in line and b": connected" in line]
        # The kernel spread the 20 connections over both workers (all on
        # one would have a 2-in-a-million chance).
        self.assertTrue(onSecond and onFirst, (len(onFirst), len(onSecond)))
        self.assertEqual(len(onFirst) + len(onSecond), 20)
        [worker] = childrenOf(relay.transport.pid)
        self.assertEqual((yield relay.stop()), 0)
        # Worker 0 exits after the others, not while they still drain.
        self.assertFalse(os.path.exists(f"/proc/{worker}"), f"worker 1 ({worker}) still running")
        # Each line once, with one timestamp: the second worker writes its
        # own lines, nobody logs them again.
        for line in relay.output.splitlines():
            self.assertEqual(len(TIMESTAMP.findall(line)), 1, line)

    @defer.inlineCallbacks
    def test_jsonLinesOnce(self):
        """
        With --log-format json every line of every worker is one JSON
        object naming its worker, and each event is logged once.
        """
        relay = yield startRelay(
            self,
            "--workers",
            "2",
            "--connection-rate-per-ip",
            "0",
            "--log-format",
            "json",
            "--log-level",
            "debug",
        )
        for _ in range(300):
            if (
                relay.output.count(b"relay listening on") >= 2
                and b"cluster: stream up" in relay.output
            ):
                break
            yield sleep(0.05)
        peers = []
        for i in range(20):
            peer = yield client.connect(
                reactor, relay.url, m.peerID(f"p{i}"), secret="relay-secret"
            )
            self.addCleanup(
                lambda p=peer: p.transport.abortConnection() if p.transport.connected else None
            )
            peers.append(peer)
        for peer in peers:
            yield peer.close()
        self.assertEqual((yield relay.stop()), 0)
        lines = [json.loads(line) for line in relay.output.splitlines()]
        self.assertEqual({line["worker"] for line in lines}, {0, 1})
        listening = [
            line["worker"] for line in lines if line["msg"].startswith("relay listening on")
        ]
        self.assertEqual(sorted(listening), [0, 1])
        connected = [line for line in lines if line["msg"].endswith(": connected")]
        self.assertEqual(len(connected), 20)
        self.assertEqual(len({line["peer"] for line in connected}), 20)
        self.assertEqual({line["worker"] for line in connected}, {0, 1})
        for line in lines:
            self.assertNotIn("{", line["msg"][:1])
