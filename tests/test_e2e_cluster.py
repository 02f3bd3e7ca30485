"""
End to end: three real relay pods on 127.0.0.2-4 joined by the inter-pod
fabric, and the ADR-0014 failure table. In every test, every message a peer
receives is checked for its source id and content: nothing may ever reach
the wrong peer.
"""

import signal
import time

from twisted.internet import defer, reactor
from twisted.trial import unittest

from relay import client
from relay import messages as m
from relay.cluster import frames
from relay.cluster.locator import seqnoOf
from tests.e2e import RelayProcess, rawConnect, relayArgs, sleep
from tests.loopback import commonPort

PODS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
HEADLESS = ",".join(PODS)
A, B, C = m.peerID("peer-a"), m.peerID("peer-b"), m.peerID("peer-c")
TIMEOUT = 10
SECRET = "cluster-secret"


class ClusterTestCase(unittest.TestCase):
    timeout = 120

    def setUp(self):
        self.clusterPort = commonPort(PODS)
        self.peerPort = commonPort(PODS)
        self.pods = {}

    @defer.inlineCallbacks
    def startPod(self, host, secret=SECRET, *extra, headless=HEADLESS):
        process = RelayProcess([], host=host, port=self.peerPort)
        process.args = relayArgs(
            process,
            "relay-secret",
            "--cluster-headless",
            headless,
            "--pod-ip",
            host,
            "--cluster-port",
            str(self.clusterPort),
            "--cluster-listen-address",
            f"{host}:{self.clusterPort}",
            "--cluster-auth-secret",
            secret,
            "--cluster-discovery-interval",
            "1",
            *extra,
        )
        self.addCleanup(process.stop)
        yield process.start()
        self.pods[host] = process
        return process

    def startPods(self, *hosts):
        return defer.gatherResults([self.startPod(host) for host in hosts])

    @defer.inlineCallbacks
    def connect(self, name, host):
        peer = yield client.connect(
            reactor, f"rel://{host}:{self.peerPort}", m.peerID(name), secret="relay-secret"
        )
        peer.received = []
        peer.onTransport = lambda message: peer.received.append(
            (bytes(message[2:38]), bytes(message[38:]))
        )
        self.addCleanup(
            lambda: peer.transport.abortConnection() if peer.transport.connected else None
        )
        return peer

    @defer.inlineCallbacks
    def waitFor(self, predicate, timeout=TIMEOUT, poke=None):
        """
        Poll C{predicate} every 20 ms, calling C{poke} before each check.

        @return: the seconds it took.
        """
        started = reactor.seconds()
        while True:
            if poke is not None:
                poke()
            if predicate():
                return reactor.seconds() - started
            if reactor.seconds() - started > timeout:
                self.fail(f"not within {timeout} s")
            yield sleep(0.02)

    def assertOnlyFrom(self, peer, source, prefix):
        for src, payload in peer.received:
            self.assertEqual(src, source)
            self.assertTrue(payload.startswith(prefix), payload)


class CrossPodTests(ClusterTestCase):
    @defer.inlineCallbacks
    def test_exchangeAndPresence(self):
        yield self.startPods(*PODS)
        a = yield self.connect("peer-a", PODS[0])
        b = yield self.connect("peer-b", PODS[1])
        yield a.waitOnline(B)
        yield b.waitOnline(A)
        for i in range(1000):
            a.send(B, b"a->b %d" % i)
            b.send(A, b"b->a %d" % i)
        yield self.waitFor(lambda: len(a.received) == 1000 and len(b.received) == 1000)
        self.assertEqual(b.received, [(A, b"a->b %d" % i) for i in range(1000)])
        self.assertEqual(a.received, [(B, b"b->a %d" % i) for i in range(1000)])
        yield b.close()
        kind, ids = yield a.events.get().addTimeout(TIMEOUT, reactor)
        self.assertEqual((kind, ids), ("offline", [B]))

    @defer.inlineCallbacks
    def test_podKilledAndPeerMoves(self):
        yield self.startPods(*PODS)
        a = yield self.connect("peer-a", PODS[0])
        b = yield self.connect("peer-b", PODS[1])
        yield a.waitOnline(B)
        a.send(B, b"before")
        yield self.waitFor(lambda: b.received)
        self.pods[PODS[1]].signal("KILL")
        yield b.whenLost()
        # Pod 2 keeps serving its own peers.
        c = yield self.connect("peer-c", PODS[0])
        a.send(C, b"still serving")
        yield self.waitFor(lambda: c.received == [(A, b"still serving")])
        b2 = yield self.connect("peer-b", PODS[2])
        took = yield self.waitFor(lambda: b2.received, poke=lambda: a.send(B, b"after"))
        self.assertLess(took, 3.0)
        self.assertOnlyFrom(b2, A, b"after")
        self.assertOnlyFrom(c, A, b"still serving")

    @defer.inlineCallbacks
    def test_lateJoin(self):
        yield self.startPods(*PODS[:2])
        a = yield self.connect("peer-a", PODS[0])
        yield self.startPod(PODS[2])
        b = yield self.connect("peer-b", PODS[2])
        yield a.waitOnline(B)
        yield self.waitFor(lambda: b.received, poke=lambda: a.send(B, b"found you"))
        self.assertOnlyFrom(b, A, b"found you")

    @defer.inlineCallbacks
    def test_wrongSecretRefused(self):
        yield defer.gatherResults(
            [
                self.startPod(PODS[0]),
                self.startPod(PODS[1]),
                self.startPod(PODS[2], secret="another"),
            ]
        )
        a = yield self.connect("peer-a", PODS[0])
        b = yield self.connect("peer-b", PODS[1])
        intruder = yield self.connect("peer-c", PODS[2])
        yield a.waitOnline(B)
        for _ in range(50):
            a.send(C, b"not for the outsider")
            a.send(B, b"inside")
            yield sleep(0.04)
        yield self.waitFor(lambda: b.received)
        self.assertEqual(intruder.received, [])
        self.assertOnlyFrom(b, A, b"inside")
        self.assertIn(b"hmac_mismatch", self.pods[PODS[0]].output + self.pods[PODS[2]].output)


class FailureTableTests(ClusterTestCase):
    @defer.inlineCallbacks
    def pairAcross(self):
        yield self.startPods(*PODS)
        a = yield self.connect("peer-a", PODS[0])
        b = yield self.connect("peer-b", PODS[1])
        yield a.waitOnline(B)
        return a, b

    @defer.inlineCallbacks
    def test_podRestart(self):
        a, b = yield self.pairAcross()
        self.pods[PODS[1]].signal("KILL")
        yield b.whenLost()
        yield self.pods[PODS[1]].ended()
        yield self.startPod(PODS[1])
        b2 = yield self.connect("peer-b", PODS[1])
        yield self.waitFor(lambda: b2.received, poke=lambda: a.send(B, b"welcome back"))
        self.assertOnlyFrom(b2, A, b"welcome back")

    @defer.inlineCallbacks
    def test_partition(self):
        a, b = yield self.pairAcross()
        pod = self.pods[PODS[1]]
        pod.signal(signal.SIGSTOP)
        for i in range(20):
            a.send(B, b"during %d" % i)
            yield sleep(0.05)
        pod.signal(signal.SIGCONT)
        yield self.waitFor(
            lambda: any(p.startswith(b"after") for _, p in b.received),
            poke=lambda: a.send(B, b"after"),
        )
        self.assertOnlyFrom(b, A, b"")
        delivered = [p for _, p in b.received if p.startswith(b"during")]
        self.assertEqual(delivered, sorted(delivered, key=lambda p: int(p.split()[1])))

    @defer.inlineCallbacks
    def test_staleCacheAfterMove(self):
        a, b = yield self.pairAcross()
        a.send(B, b"cached route")
        yield self.waitFor(lambda: b.received)
        yield b.close()
        b2 = yield self.connect("peer-b", PODS[2])
        took = yield self.waitFor(lambda: b2.received, poke=lambda: a.send(B, b"moved"))
        self.assertLess(took, 3.0)
        self.assertOnlyFrom(b2, A, b"moved")

    @defer.inlineCallbacks
    def test_twoPodsClaimOnePeer(self):
        a, b = yield self.pairAcross()
        c = yield self.connect("peer-c", PODS[1])
        yield sleep(0.05)
        newer = yield self.connect("peer-b", PODS[2])
        took = yield self.waitFor(lambda: newer.received, poke=lambda: a.send(B, b"to b"))
        self.assertLess(took, 3.0)
        count = len(b.received)
        for _ in range(20):
            a.send(B, b"to b")
        yield self.waitFor(lambda: len(newer.received) >= 21)
        self.assertEqual(len(b.received), count)
        self.assertOnlyFrom(newer, A, b"to b")
        self.assertOnlyFrom(b, A, b"to b")
        self.assertEqual(c.received, [])


class TrustTests(ClusterTestCase):
    """
    The fabric trusts only its pods (issue 12, item 8), against real pods:
    a signed HELLO of listed pod .4 (as captured on the wire, within its
    window) sent by someone else to pod .3, then a FWD with a spoofed source
    for a local agent and a forged I_HAVE to divert that agent's traffic.
    Before: the stranger got the stream for .4 (locking the real .4 out),
    the snapshot of .3's peer ids, its FWD delivered and the traffic.
    """

    def attack(self, source, target, pod):
        hello = frames.helloFrame(f"{pod}:{self.clusterPort}", int(time.time()), SECRET)
        spoofed = frames.fwdFrame(B, m.encodeTransport(A, b"spoofed source"))
        forged = frames.iHaveFrame(A, seqnoOf(time.time() + 60))
        d = rawConnect(self.clusterPort, target, source=source)
        d.addCallback(lambda raw: (raw.transport.write(hello + spoofed + forged), raw)[1])
        return d

    @defer.inlineCallbacks
    def test_replayedHelloAndForgedFrames(self):
        yield self.startPods(PODS[0], PODS[1])
        a = yield self.connect("peer-a", PODS[0])
        b = yield self.connect("peer-b", PODS[1])
        yield b.waitOnline(A)
        # From a stranger's address, then from pod .4's own (spoofed).
        for source in ("127.0.0.9", PODS[2]):
            raw = yield self.attack(source, PODS[1], PODS[2])
            yield raw.closed.addTimeout(TIMEOUT, reactor)
            # Nothing for the attacker: no snapshot of the pod's peers.
            self.assertEqual(raw.received, b"")
        yield sleep(0.2)
        self.assertEqual(b.received, [])
        # peer-b's traffic to peer-a still goes to pod .2, not the attacker.
        yield self.waitFor(lambda: a.received, poke=lambda: b.send(A, b"back"))
        self.assertOnlyFrom(a, B, b"back")
        # The real pod .4 is not locked out.
        yield self.startPod(PODS[2])
        c = yield self.connect("peer-c", PODS[2])
        yield self.waitFor(lambda: c.received, poke=lambda: b.send(C, b"to c"))
        self.assertOnlyFrom(c, B, b"to c")
        output = self.pods[PODS[1]].output
        self.assertIn(b"address_mismatch", output)
        self.assertIn(b"not_secured", output)
        self.assertNotIn(SECRET.encode(), output)


class CompatibilityTests(ClusterTestCase):
    """
    A pod in compatibility mode takes a Go pod (played here from raw
    frames: a v2 HELLO, no handshake, plain frames); a pod without it
    refuses the same.
    """

    @defer.inlineCallbacks
    def test_goPod(self):
        compat = PODS[0]
        strict = PODS[1]
        goPod = "127.0.0.5"
        yield self.startPod(compat, SECRET, "--cluster-compat", headless=compat)
        yield self.startPod(strict, SECRET, headless=strict)
        b = yield self.connect("peer-b", compat)
        hello = frames.helloFrame(f"{goPod}:{self.clusterPort}", int(time.time()), SECRET)
        fwd = frames.fwdFrame(B, m.encodeTransport(A, b"from a Go pod"))
        raw = yield rawConnect(self.clusterPort, compat, source=goPod)
        raw.transport.write(hello + fwd + frames.whoHasFrame(B))
        yield self.waitFor(lambda: b.received and len(raw.received) >= 43)
        self.assertEqual(b.received, [(A, b"from a Go pod")])
        # The answer is plain, as a Go pod reads it: the snapshot I_HAVE and
        # the answer to WHO_HAS.
        got = frames.FrameReader().feed(raw.received)
        self.assertEqual({frameType for frameType, _ in got}, {frames.I_HAVE})
        self.assertEqual({payload[:36] for _, payload in got}, {B})

        refused = yield rawConnect(self.clusterPort, strict, source=goPod)
        refused.transport.write(hello + fwd)
        yield refused.closed.addTimeout(TIMEOUT, reactor)
        self.assertEqual(refused.received, b"")
        # The pod's line reaches us through its stdout pipe, maybe after the
        # close does.
        yield self.waitFor(lambda: b"not_secured" in self.pods[strict].output)
        raw.transport.loseConnection()
