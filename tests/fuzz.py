"""
Live fuzzing of real relay processes: C{python -m tests.fuzz}.

A relay is internet-facing: anyone can open a socket to its peer port, and
in a cluster anything that reaches the inter-pod port can talk to it. Unit
properties check the decoders one call at a time; this tool checks the
running process the way an attacker or a broken client meets it: many
connections at once, each sending random or mutated-valid traffic (garbage
TCP, broken HTTP upgrades, random WebSocket frames, mutated Auth, Transport
and Subscribe messages, oversized, text and fragmented frames, pings,
slowloris-style partial frames; on the cluster port bad HELLOs, secured
handshakes gone wrong, and fuzz pods that pass the handshake as a pod does
(dialing from the address they announce, proving the cluster secret) and
then send sealed frames with bad payloads, hostile bursts, forged, untagged
and replayed frames), while two well-behaved peers exchange
sequence-numbered messages through the relay and check every byte.

Pass means:
  - every relay process is still running and its peer port still accepts and
    authenticates a new peer (and relays a message for it);
  - the good pair lost nothing: every message arrived once, in order, intact,
    from the right source;
  - each relay's RSS came back near its baseline once the fuzz connections
    closed (the numbers are in the report);
  - the relay never did what it must not: answer an invalid Auth with an
    AuthResponse, keep an unauthenticated connection past its handshake
    timeout, keep an inter-pod stream whose HELLO or handshake was refused
    or that carried a forged, untagged or replayed frame, send a frame
    before the handshake is complete or one whose tag does not check, or
    send a malformed WebSocket frame; and (for relays started here) its log
    holds no traceback and it exits 0 on SIGTERM.

Targets: C{--spawn} starts one relay on 127.0.0.1, C{--cluster} three pods on
127.0.0.2-4 with the good pair split across pods, C{--url} (and optionally
C{--pid}, C{--cluster-target}, C{--cluster-secret}) points at relays started
elsewhere (pods without C{--cluster-compat}). Fuzz connections come from
random source addresses in 127.0.0.0/8, so the relay's per-address limits do
not turn the run into a test of those limits alone; loopback only.

The summary is one JSON object on stdout; progress goes to stderr; the exit
status is 0 on pass, 1 on failure, 2 on a usage or start-up error. Secrets
are never printed.
"""

import argparse
import base64
import hmac
import json
import os
import random
import struct
import sys
import tempfile
import time
from urllib.parse import urlsplit

from twisted.internet import defer, protocol, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

from relay import client
from relay import messages as m
from relay.auth import generateToken
from relay.cluster import frames as cf
from tests.bench import wire
from tests.bench.relayproc import alive, raiseFileLimit, rssKiB, startRelays

MAGIC = m.MAGIC
GOOD_NAMES = ("fuzz-good-a", "fuzz-good-b")
HANDSHAKE_LIMIT = 20.0  # the relay's is 10 s; slack for a loaded machine
HELLO_LIMIT = 20.0  # likewise for the inter-pod HELLO
REFUSED_LIMIT = 5.0  # a refused HELLO or Auth closes at once; slack
BLOCK = random.Random(7).randbytes(1 << 16)


def log(message):
    sys.stderr.write(f"[fuzz {time.strftime('%H:%M:%S')}] {message}\n")
    sys.stderr.flush()


def sleep(reactor, seconds):
    return task.deferLater(reactor, seconds, lambda: None)


def countTracebacks(path):
    if not path:
        return None
    try:
        with open(path, "rb") as f:
            text = f.read()
    except OSError:
        return None
    return text.count(b"Traceback (most recent call last)") + text.count(b"Unhandled Error")


# Byte-level building blocks


def wsFrame(payload, opcode=wire.OP_BINARY, fin=True, key=None, rsv=0, lengthForm=None):
    """
    One WebSocket frame; masked when C{key} (4 bytes) is given.

    @param lengthForm: None (minimal), 126 or 127 to force a longer length
        encoding (not minimal: RFC 6455 forbids it, the relay must cope).
    """
    n = len(payload)
    first = (0x80 if fin else 0) | (rsv & 0x7) << 4 | (opcode & 0xF)
    bit = 0x80 if key is not None else 0
    if lengthForm is None:
        lengthForm = 0 if n < 126 else (126 if n < 0x10000 else 127)
    if lengthForm == 126 and n < 0x10000:
        header = bytes([first, bit | 126]) + n.to_bytes(2, "big")
    elif lengthForm == 127 or n >= 0x10000:
        header = bytes([first, bit | 127]) + n.to_bytes(8, "big")
    else:
        header = bytes([first, bit | n])
    if key is None:
        return header + payload
    return header + key + wire.applyMask(payload, key)


def mutate(data, rng, count=None):
    """
    C{data} with 1-4 random edits: bit flips, byte sets, inserts, deletes,
    truncation, duplication, garbage appended.
    """
    data = bytearray(data)
    for _ in range(count or rng.randint(1, 4)):
        op = rng.randrange(7)
        if op == 0 and data:
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
        elif op == 1 and data:
            data[rng.randrange(len(data))] = rng.choice(
                (0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256))
            )
        elif op == 2:
            i = rng.randint(0, len(data))
            data[i:i] = rng.randbytes(rng.randint(1, 16))
        elif op == 3 and data:
            i = rng.randrange(len(data))
            del data[i : i + rng.randint(1, 16)]
        elif op == 4 and data:
            del data[rng.randrange(len(data)) :]
        elif op == 5 and data:
            i = rng.randrange(len(data))
            data[i:i] = data[i : i + rng.randint(1, 64)]
        else:
            data += rng.randbytes(rng.randint(1, 64))
    return bytes(data)


def mutateChanged(data, rng, count=None):
    """
    L{mutate} until the result differs from C{data}.
    """
    while True:
        mutated = mutate(data, rng, count)
        if mutated != data:
            return mutated


def splitRandomly(data, rng):
    """
    C{data} cut into random pieces (often one, sometimes single bytes).
    """
    if len(data) <= 1 or rng.random() < 0.6:
        return [data]
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(1, 12))))
    return [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)])]


def upgradeRequest(host, port):
    """
    A valid WebSocket upgrade request (the bytes of L{wire.upgradeRequest}).
    """
    return wire.upgradeRequest(host, port)[0]


# Connections


class FuzzConnection(protocol.Protocol):
    """
    A raw TCP connection that records what comes back and lets a scenario
    wait for a condition on it.

    After L{upgraded} the bytes are parsed as server WebSocket frames; a
    frame the relay must never send (masked, reserved bits, unknown opcode)
    is recorded in C{badFrame}.
    """

    def __init__(self, stats):
        self.stats = stats
        self.buf = b""
        self.received = 0
        self.closed = False
        self.reader = None
        self.messages = []
        self.badFrame = None
        self.clusterReader = None
        self.clusterOpener = None
        self.clusterFrames = []
        self.badClusterTag = None
        self.source = None
        self._waiters = []
        self.openedAt = None

    def connectionMade(self):
        self.openedAt = time.monotonic()

    def dataReceived(self, data):
        self.received += len(data)
        self.stats.bytesReceived += len(data)
        if self.clusterReader is not None:
            for frameType, payload in self.clusterReader.feed(data):
                if self.clusterOpener is not None and self.badClusterTag is None:
                    # Opened as they arrive, so the sequence numbers stay in
                    # step even when the scenario keeps only the first frames.
                    try:
                        payload = self.clusterOpener.open(frameType, payload)
                    except cf.FrameError as e:
                        self.badClusterTag = str(e)
                if len(self.clusterFrames) < 256:
                    self.clusterFrames.append((frameType, payload))
        elif self.reader is not None and self.badFrame is None:
            try:
                for message in self.reader.feed(data):
                    if len(self.messages) < 64:
                        self.messages.append(message)
            except ValueError as e:
                self.badFrame = str(e)
        elif len(self.buf) < 1 << 16:
            self.buf += data
        self._poke()

    def connectionLost(self, reason):
        self.closed = True
        self._poke()

    def upgraded(self):
        """
        Treat what follows the HTTP response head as WebSocket frames.
        """
        head, _, rest = self.buf.partition(b"\r\n\r\n")
        self.buf = head
        self.reader = wire.ServerFrameReader()
        if rest:
            try:
                self.messages.extend(self.reader.feed(rest))
            except ValueError as e:
                self.badFrame = str(e)

    def _poke(self):
        for waiter in list(self._waiters):
            predicate, d, timer = waiter
            if predicate(self) or self.closed:
                self._waiters.remove(waiter)
                if timer.active():
                    timer.cancel()
                d.callback(bool(predicate(self)))

    def waitUntil(self, reactor, predicate, timeout):
        """
        @return: a Deferred firing True once C{predicate(self)} holds, False
            when the connection closed or C{timeout} passed first.
        """
        if predicate(self) or self.closed:
            return defer.succeed(bool(predicate(self)))
        d = defer.Deferred()
        waiter = [predicate, d, None]

        def expire():
            if waiter in self._waiters:
                self._waiters.remove(waiter)
                d.callback(False)

        waiter[2] = reactor.callLater(timeout, expire)
        self._waiters.append(waiter)
        return d

    def whenClosed(self, reactor, timeout):
        return self.waitUntil(reactor, lambda c: c.closed, timeout)

    def send(self, data):
        if not self.closed and data:
            self.transport.write(data)
            self.stats.bytesSent += len(data)

    @defer.inlineCallbacks
    def sendPieces(self, reactor, data, rng, maxDelay=0.05):
        for piece in splitRandomly(data, rng):
            if self.closed:
                return
            self.send(piece)
            if rng.random() < 0.3:
                yield sleep(reactor, rng.random() * maxDelay)

    def finish(self, rng):
        if self.closed:
            return
        if rng.random() < 0.5:
            self.transport.abortConnection()
        else:
            self.transport.loseConnection()


class Stats:
    def __init__(self):
        self.started = 0
        self.finished = 0
        self.connectErrors = 0
        self.bytesSent = 0
        self.bytesReceived = 0
        self.byScenario = {}
        self.anomalies = {}
        self.anomalyExamples = []
        self.fuzzerErrors = {}
        self.acceptedAuth = 0
        self.podSessions = 0
        self.podSessionsAnswered = 0
        self.podSessionsSecured = 0
        self.podForgedFrames = 0

    def anomaly(self, name, detail):
        self.anomalies[name] = self.anomalies.get(name, 0) + 1
        if len(self.anomalyExamples) < 20:
            self.anomalyExamples.append({"anomaly": name, "detail": detail})
        log(f"ANOMALY {name}: {detail}")

    def summary(self):
        return {
            "connections": self.started,
            "connect_errors": self.connectErrors,
            "bytes_sent": self.bytesSent,
            "bytes_received": self.bytesReceived,
            "by_scenario": dict(sorted(self.byScenario.items())),
            "fuzz_peers_authenticated": self.acceptedAuth,
            "fuzz_pod_sessions": self.podSessions,
            "fuzz_pod_sessions_answered": self.podSessionsAnswered,
            "fuzz_pod_sessions_secured": self.podSessionsSecured,
            "fuzz_pod_forged_frames": self.podForgedFrames,
            "anomalies": self.anomalies,
            "anomaly_examples": self.anomalyExamples,
            "fuzzer_errors": self.fuzzerErrors,
        }


class Target:
    """
    One relay: its peer port, optionally its cluster port and pid.
    """

    def __init__(self, host, port, clusterPort=None, pid=None, process=None):
        self.host = host
        self.port = port
        self.clusterPort = clusterPort
        self._pid = pid
        self.process = process
        self.rss = {}
        self.acceptFailures = 0
        self.probes = 0

    @property
    def pid(self):
        if self.process is not None:
            return self.process.pid
        return self._pid

    @property
    def url(self):
        return f"rel://{self.host}:{self.port}"

    @property
    def announce(self):
        return f"{self.host}:{self.clusterPort}"

    def running(self):
        if self.process is not None:
            return self.process.running()
        return self._pid is None or alive(self._pid)

    def rssKiB(self):
        pid = self.pid
        if pid is None:
            return None
        try:
            return rssKiB(pid)
        except (OSError, RuntimeError):
            return None


# The fuzz scenarios. Each gets a connected FuzzConnection and returns when
# done; the caller closes the connection.


class Fuzzer:
    """
    Keeps C{connections} fuzz connections open against the targets, starting
    at most C{rate} new ones a second, each running one random scenario.
    """

    def __init__(self, reactor, targets, secret, clusterSecret, rng, connections, rate, goodIDs):
        self.reactor = reactor
        self.targets = targets
        self.secret = secret
        self.clusterSecret = clusterSecret
        self.rng = rng
        self.connections = connections
        self.rate = rate
        self.goodIDs = set(goodIDs)
        self.stats = Stats()
        self.active = set()
        self.fuzzPeerIDs = []
        self.lastConfirm = None
        self.serial = 0
        self._tokens = 0.0
        self._last = None
        self._loop = None
        self.stopping = False
        peerScenarios = [
            ("peer_garbage", 2, self.peerGarbage),
            ("peer_bad_http", 3, self.peerBadHTTP),
            ("peer_random_frames", 3, self.peerRandomFrames),
            ("peer_mutated_auth", 4, self.peerMutatedAuth),
            ("peer_session", 8, self.peerSession),
            ("peer_oversized", 2, self.peerOversized),
            ("peer_slowloris", 1, self.peerSlowloris),
        ]
        clusterScenarios = [
            ("cluster_garbage", 2, self.clusterGarbage),
            ("cluster_bad_hello", 3, self.clusterBadHello),
            ("cluster_no_hello", 1, self.clusterNoHello),
            ("cluster_bad_handshake", 2, self.clusterBadHandshake),
            ("cluster_session", 4, self.clusterSession),
        ]
        self.scenarios = list(peerScenarios)
        if any(t.clusterPort for t in targets):
            self.scenarios += clusterScenarios
        self.weights = [w for _, w, _ in self.scenarios]

    # Scheduling

    def start(self):
        self.stopping = False
        self._last = self.reactor.seconds()
        self._loop = task.LoopingCall(self._tick)
        self._loop.clock = self.reactor
        self._loop.start(0.01)

    @defer.inlineCallbacks
    def stop(self):
        self.stopping = True
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        for conn in list(self.active):
            if not conn.closed:
                conn.transport.abortConnection()
        deadline = self.reactor.seconds() + 10
        while self.active and self.reactor.seconds() < deadline:
            yield sleep(self.reactor, 0.05)

    def _tick(self):
        now = self.reactor.seconds()
        self._tokens = min(self.rate, self._tokens + (now - self._last) * self.rate)
        self._last = now
        while self._tokens >= 1 and self.stats.started - self.stats.finished < self.connections:
            self._tokens -= 1
            self._launch()

    def _launch(self):
        rng = random.Random(self.rng.getrandbits(64))
        name, _, scenario = rng.choices(self.scenarios, weights=self.weights)[0]
        cluster = name.startswith("cluster_")
        candidates = [t for t in self.targets if t.clusterPort] if cluster else self.targets
        target = rng.choice(candidates)
        port = target.clusterPort if cluster else target.port
        self.stats.started += 1
        self.stats.byScenario[name] = self.stats.byScenario.get(name, 0) + 1
        self._run(name, scenario, target, port, rng).addBoth(self._finished)

    def _finished(self, result):
        self.stats.finished += 1

    @defer.inlineCallbacks
    def _run(self, name, scenario, target, port, rng):
        source = f"127.{rng.randint(10, 250)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"
        endpoint = TCP4ClientEndpoint(
            self.reactor, target.host, port, timeout=5, bindAddress=(source, 0)
        )
        try:
            conn = yield connectProtocol(endpoint, FuzzConnection(self.stats))
        except Exception:
            self.stats.connectErrors += 1
            return
        conn.source = source
        self.active.add(conn)
        try:
            yield scenario(conn, target, rng)
        except Exception as e:
            key = f"{name}: {type(e).__name__}"
            self.stats.fuzzerErrors[key] = self.stats.fuzzerErrors.get(key, 0) + 1
        finally:
            if conn.badFrame is not None:
                self.stats.anomaly("bad_server_frame", f"{name}: {conn.badFrame}")
            if conn.badClusterTag is not None:
                self.stats.anomaly("cluster_bad_tag_from_pod", f"{name}: {conn.badClusterTag}")
            conn.finish(rng)
            yield conn.whenClosed(self.reactor, 5)
            self.active.discard(conn)

    def sleep(self, seconds):
        return sleep(self.reactor, seconds)

    # Helpers shared by scenarios

    def key(self, rng):
        return rng.randbytes(4)

    def randomID(self, rng, allowGood=False):
        r = rng.random()
        if r < 0.4 and self.fuzzPeerIDs:
            return rng.choice(self.fuzzPeerIDs)
        if allowGood and r < 0.45:
            return rng.choice(sorted(self.goodIDs))
        if r < 0.8:
            return m.peerID(f"fuzz-random-{rng.randrange(1000)}")
        return rng.randbytes(36)

    def newFuzzID(self):
        self.serial += 1
        pid = m.peerID(f"fuzz-peer-{self.serial}-{os.getpid()}")
        if len(self.fuzzPeerIDs) < 256:
            self.fuzzPeerIDs.append(pid)
        else:
            self.fuzzPeerIDs[self.serial % 256] = pid
        return pid

    def token(self, rng):
        return generateToken(self.secret, time.time() + 3600)

    @defer.inlineCallbacks
    def upgrade(self, conn, target, rng):
        """
        A valid WebSocket upgrade, split randomly.

        @return: whether the relay answered 101.
        """
        yield conn.sendPieces(self.reactor, upgradeRequest(target.host, target.port), rng)
        ok = yield conn.waitUntil(self.reactor, lambda c: b"\r\n\r\n" in c.buf, 5)
        if not ok or not conn.buf.startswith(b"HTTP/1.1 101"):
            return False
        conn.upgraded()
        return True

    def authResponded(self, conn):
        return any(op == wire.OP_BINARY and p[:2] == b"\x01\x07" for op, p in conn.messages)

    @defer.inlineCallbacks
    def authenticate(self, conn, target, rng):
        """
        Upgrade and authenticate with a fresh fuzz id.

        @return: the mask key, or None if the relay did not let us in.
        """
        if not (yield self.upgrade(conn, target, rng)):
            return None
        key = self.key(rng)
        auth = m.encodeAuth(self.newFuzzID(), self.token(rng))
        yield conn.sendPieces(self.reactor, wsFrame(auth, key=key), rng)
        ok = yield conn.waitUntil(self.reactor, self.authResponded, 5)
        if ok:
            self.stats.acceptedAuth += 1
            return key
        return None

    @defer.inlineCallbacks
    def checkHandshakeTimeout(self, conn, what):
        """
        An unauthenticated connection must be closed by the relay within its
        10 s handshake timeout (HANDSHAKE_LIMIT here, for slack).
        """
        left = HANDSHAKE_LIMIT - (time.monotonic() - conn.openedAt)
        closed = yield conn.whenClosed(self.reactor, max(0.1, left))
        if not closed and not self.stopping:
            self.stats.anomaly(
                "handshake_timeout_not_enforced",
                f"{what}: still open {HANDSHAKE_LIMIT:g} s after accept",
            )

    # Peer port scenarios

    @defer.inlineCallbacks
    def peerGarbage(self, conn, target, rng):
        prefix = rng.choice(
            [
                b"",
                b"",
                b"GET ",
                b"GET /relay HTTP/1.1\r\n",
                b"\x16\x03\x01",
                b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            ]
        )
        data = prefix + rng.randbytes(rng.choice([1, 16, 200, 1500, 8000, 70000]))
        yield conn.sendPieces(self.reactor, data, rng)
        yield conn.whenClosed(self.reactor, rng.random() * 2)

    def _badRequests(self, target, rng):
        """
        C{(request, status)} pairs: a broken or refused upgrade request and
        the HTTP status the relay must answer it with (None: any answer, or
        none, as long as the connection ends).
        """
        host = f"{target.host}:{target.port}".encode()
        key = base64.b64encode(os.urandom(16))
        good = upgradeRequest(target.host, target.port)
        goodKey = good.split(b"Sec-WebSocket-Key: ")[1].split(b"\r\n")[0]
        return [
            (mutate(good, rng), None),
            (mutate(good, rng, 8), None),
            (
                good.replace(
                    b"/relay",
                    rng.choice([b"/", b"/relay/", b"/RELAY", b"//relay", b"/" + b"a" * 5000]),
                ),
                b"404",
            ),
            (
                good.replace(
                    b"Sec-WebSocket-Version: 13",
                    b"Sec-WebSocket-Version: " + rng.choice([b"8", b"", b"999999999999", b"13, 8"]),
                ),
                None,
            ),
            (
                good.replace(
                    b"Sec-WebSocket-Key: " + goodKey,
                    b"Sec-WebSocket-Key: " + rng.choice([b"", b"x", b"A" * 500]),
                ),
                None,
            ),
            (good.replace(b"Upgrade: websocket\r\n", b""), None),
            (good.replace(b"Connection: Upgrade", b"Connection: close"), None),
            (
                good.replace(
                    b"HTTP/1.1",
                    rng.choice([b"HTTP/1.0", b"HTTP/2.0", b"HTTP/9.9", b"HTTP/1.1 extra"]),
                ),
                None,
            ),
            (
                good.replace(b"GET", rng.choice([b"POST", b"PUT", b"CONNECT", b"G\x00T", b"get"])),
                None,
            ),
            (good[:-2] + b"Origin: http://evil.example\r\n\r\n", b"403"),
            (
                good[:-2]
                + b"X-Real-IP: "
                + rng.choice([b"10.0.0.1", b"::1", b"not-an-ip", b"1" * 300])
                + b"\r\n\r\n",
                None,
            ),
            (good[:-2] + b"X-Big: " + b"z" * rng.choice([8000, 70000]) + b"\r\n\r\n", None),
            (
                good[:-2]
                + b"".join(b"H%d: v\r\n" % i for i in range(rng.choice([100, 2000])))
                + b"\r\n",
                None,
            ),
            (b"GET /relay HTTP/1.1\r\nHost: " + host + b"\r\n\r\n", None),
            (
                b"GET /relay HTTP/1.1\r\n"
                + b"Host: "
                + host
                + b"\r\nContent-Length: 100000\r\n\r\n"
                + rng.randbytes(1000),
                None,
            ),
            (
                b"GET /relay HTTP/1.1\r\nHost: "
                + host
                + b"\r\nTransfer-Encoding: chunked\r\n\r\nffffffff\r\n"
                + rng.randbytes(100),
                None,
            ),
            (b"GET /metrics HTTP/1.1\r\nHost: " + host + b"\r\n\r\n", None),
            (good + good, None),
            (b"\r\n" * rng.randint(1, 5000), None),
            (
                b"GET /relay HTTP/1.1\r\nSec-WebSocket-Key: "
                + key
                + (
                    b"\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                    b"Sec-WebSocket-Version: 13\r\n\r\n"
                ),
                None,
            ),
        ]

    @defer.inlineCallbacks
    def peerBadHTTP(self, conn, target, rng):
        request, status = rng.choice(self._badRequests(target, rng))
        yield conn.sendPieces(self.reactor, request, rng)
        answered = yield conn.waitUntil(self.reactor, lambda c: b"\r\n\r\n" in c.buf, REFUSED_LIMIT)
        if status is not None and not self.stopping:
            got = conn.buf.split(b"\r\n", 1)[0]
            if not answered or got.split(b" ")[1:2] != [status]:
                self.stats.anomaly(
                    "http_refusal_not_answered",
                    f"expected {status.decode()}, got {got[:60]!r} to {request[:40]!r}",
                )
        if conn.buf.startswith(b"HTTP/1.1 101") and not conn.closed:
            # Accepted after all (a benign mutation): throw frames at it, it
            # must still close us by its handshake timeout.
            conn.upgraded()
            key = self.key(rng)
            for _ in range(rng.randint(0, 5)):
                conn.send(
                    wsFrame(
                        rng.randbytes(rng.randint(0, 300)), opcode=rng.choice([1, 2, 9]), key=key
                    )
                )
            if rng.random() < 0.1:
                yield self.checkHandshakeTimeout(conn, "upgraded, never authenticated")
        elif not conn.closed and rng.random() < 0.1:
            yield self.checkHandshakeTimeout(conn, "refused upgrade")

    def randomFrame(self, rng, key):
        payload = rng.randbytes(rng.choice([0, 1, 2, 10, 125, 126, 200, 8820, 9000]))
        return wsFrame(
            payload,
            opcode=rng.choice([0, 1, 2, 2, 2, 3, 7, 8, 9, 10, 11, 15]),
            fin=rng.random() < 0.8,
            key=key if rng.random() < 0.9 else None,
            rsv=rng.choice([0, 0, 0, 1, 2, 4, 7]),
            lengthForm=rng.choice([None, None, 126, 127]),
        )

    @defer.inlineCallbacks
    def peerRandomFrames(self, conn, target, rng):
        if not (yield self.upgrade(conn, target, rng)):
            return
        key = self.key(rng)
        data = b"".join(self.randomFrame(rng, key) for _ in range(rng.randint(1, 8)))
        if rng.random() < 0.3:
            data = mutate(data, rng)
        yield conn.sendPieces(self.reactor, data, rng)
        yield conn.whenClosed(self.reactor, rng.random() * 2)
        if self.authResponded(conn):
            self.stats.anomaly(
                "accepted_invalid_auth", "random frames were answered with an AuthResponse"
            )

    @defer.inlineCallbacks
    def peerMutatedAuth(self, conn, target, rng):
        """
        An Auth that must fail (mutated token, magic or header, wrong secret,
        expired, legacy Hello, oversized): the relay closes without a word.
        """
        if not (yield self.upgrade(conn, target, rng)):
            return
        key = self.key(rng)
        pid = self.newFuzzID()
        token = self.token(rng)
        variant = rng.randrange(9)
        if variant == 0:
            message = m.encodeAuth(pid, mutateChanged(token, rng))
        elif variant == 1:
            magic = rng.randbytes(4)
            message = b"\x01\x06" + (magic if magic != MAGIC else b"\x00" * 4) + pid + token
        elif variant == 2:
            message = m.encodeAuth(pid, generateToken("not-the-" + self.secret, time.time() + 3600))
        elif variant == 3:
            message = m.encodeAuth(
                pid, generateToken(self.secret, time.time() - rng.choice([2, 60, 10**6]))
            )
        elif variant == 4:
            message = b"\x01\x01" + MAGIC + pid + rng.randbytes(rng.randint(0, 150))
        elif variant == 5:
            message = m.encodeAuth(pid, token + rng.randbytes(rng.randint(1, 200)))
        elif variant == 6:
            message = bytes([rng.choice([0, 2, 255]), 6]) + MAGIC + pid + token
        elif variant == 7:
            message = (
                bytes([1, rng.choice([0, 3, 4, 5, 7, 8, 9, 10, 11, 200])]) + MAGIC + pid + token
            )
        else:
            message = m.encodeAuth(pid, token)[: rng.randint(0, 84)]
        framing = rng.randrange(4)
        if framing == 0:
            data = wsFrame(message, key=key)
        elif framing == 1:
            data = wsFrame(message, opcode=wire.OP_TEXT, key=key)
        elif framing == 2 and len(message) > 2:
            cut = rng.randint(1, len(message) - 1)
            data = (
                wsFrame(message[:cut], fin=False, key=key)
                + wsFrame(b"", opcode=wire.OP_PING, key=key)
                + wsFrame(message[cut:], opcode=0, key=key)
            )
        else:
            data = wsFrame(message, key=key, lengthForm=rng.choice([126, 127]))
        yield conn.sendPieces(self.reactor, data, rng)
        yield conn.waitUntil(self.reactor, self.authResponded, 2)
        if self.authResponded(conn):
            self.stats.anomaly(
                "accepted_invalid_auth",
                f"variant {variant} framing {framing}: {message[:8].hex()}... ({len(message)} "
                "bytes)",
            )
        yield self.checkHandshakeTimeout(conn, f"refused auth variant {variant}")

    def randomMessage(self, rng):
        """
        One post-handshake peer message, valid or not.
        """
        r = rng.randrange(16)
        if r < 5:
            size = rng.choice([0, 1, 8, 60, 200, 1300, 1400, 8782])
            return m.encodeTransport(
                self.randomID(rng, allowGood=rng.random() < 0.05),
                rng.randbytes(rng.randint(0, min(size, 64) if rng.random() < 0.5 else size)),
            )
        if r == 5:
            return b"\x01\x03" + rng.randbytes(rng.randint(0, 37))
        if r in (6, 7):
            ids = [
                self.randomID(rng, allowGood=True)
                for _ in range(rng.choice([0, 1, 3, 244, 245, 300]))
            ]
            body = b"".join(ids)
            if rng.random() < 0.3:
                body = body[: rng.randint(0, len(body))] if body else rng.randbytes(5)
            return bytes([1, rng.choice([8, 9])]) + body
        if r == 8:
            return m.HEALTH_CHECK_MESSAGE
        if r == 9:
            return m.encodeAuth(self.randomID(rng), self.token(rng))
        if r == 10:
            return bytes([rng.choice([0, 2, 255]), rng.randrange(256)]) + rng.randbytes(
                rng.randint(0, 50)
            )
        if r == 11:
            return bytes([1, rng.choice([0, 2, 7, 10, 11, 12, 100, 255])]) + rng.randbytes(
                rng.randint(0, 50)
            )
        if r == 12:
            return rng.choice([b"", b"\x01"])
        if r == 13:
            return b"\x01\x03" + self.randomID(rng) + rng.randbytes(rng.randint(8783, 20000))
        if r == 14:
            return m.CLOSE_MESSAGE
        return rng.randbytes(rng.randint(0, 100))

    def frameMessage(self, message, rng, key):
        """
        C{message} as one or more frames: mostly plain masked binary (the
        relay's lean path), else non-minimal lengths, fragments with control
        frames between them, text, unmasked.
        """
        r = rng.randrange(10)
        if r < 5:
            return wsFrame(message, key=key)
        if r == 5:
            return wsFrame(message, key=key, lengthForm=rng.choice([126, 127]))
        if r in (6, 7) and len(message) > 1:
            pieces = splitRandomly(message, random.Random(rng.random())) or [message]
            if len(pieces) == 1:
                pieces = [message[:1], message[1:]]
            out = []
            for i, piece in enumerate(pieces):
                out.append(
                    wsFrame(
                        piece,
                        opcode=wire.OP_BINARY if i == 0 else wire.OP_CONT,
                        fin=i == len(pieces) - 1,
                        key=key,
                    )
                )
                if rng.random() < 0.3:
                    out.append(
                        wsFrame(rng.randbytes(rng.randint(0, 125)), opcode=wire.OP_PING, key=key)
                    )
            return b"".join(out)
        if r == 8:
            return wsFrame(message, opcode=wire.OP_TEXT, key=key)
        return wsFrame(message, key=None)

    @defer.inlineCallbacks
    def peerSession(self, conn, target, rng):
        """
        A real authenticated peer that then misbehaves: valid and mutated
        messages of every type, in every framing, split across writes.
        """
        key = yield self.authenticate(conn, target, rng)
        if key is None:
            return
        end = self.reactor.seconds() + rng.choice([0.2, 1, 3, 8])
        while not conn.closed and self.reactor.seconds() < end and not self.stopping:
            message = self.randomMessage(rng)
            if rng.random() < 0.25:
                message = mutate(message, rng)
            data = self.frameMessage(message, rng, key)
            if rng.random() < 0.05:
                data = mutate(data, rng)
            yield conn.sendPieces(self.reactor, data, rng)
            if rng.random() < 0.2:
                conn.send(
                    wsFrame(
                        rng.randbytes(rng.randint(0, 125)),
                        opcode=rng.choice([wire.OP_PING, wire.OP_PONG]),
                        key=key,
                    )
                )
            yield self.sleep(rng.random() * 0.1)
        if not conn.closed and rng.random() < 0.3:
            conn.send(
                wsFrame(
                    struct.pack(">H", rng.choice([1000, 1001, 1002, 999, 5000]))
                    + rng.randbytes(rng.randint(0, 40)),
                    opcode=wire.OP_CLOSE,
                    key=key,
                )
            )
            yield conn.whenClosed(self.reactor, 4)

    @defer.inlineCallbacks
    def peerOversized(self, conn, target, rng):
        key = yield self.authenticate(conn, target, rng)
        if key is None:
            return
        r = rng.randrange(6)
        if r == 0:
            data = wsFrame(
                b"\x01\x03" + self.randomID(rng) + rng.randbytes(rng.randint(8783, 70000)), key=key
            )
        elif r == 1:
            data = (
                bytes([0x82, 0xFF])
                + rng.choice([2**63 - 1, 2**63, 2**64 - 1, 2**32, 10**9]).to_bytes(8, "big")
                + key
                + rng.randbytes(rng.randint(0, 4096))
            )
        elif r == 2:
            data = bytes([0x82, 0xFE, 0xFF, 0xFF]) + key + rng.randbytes(rng.randint(0, 65535))
        elif r == 3:
            pieces = [
                wsFrame(
                    rng.randbytes(4000),
                    opcode=wire.OP_BINARY if i == 0 else wire.OP_CONT,
                    fin=False,
                    key=key,
                )
                for i in range(rng.randint(3, 40))
            ]
            data = b"".join(pieces)
        elif r == 4:
            data = wsFrame(
                rng.randbytes(rng.randint(126, 70000)),
                opcode=rng.choice([wire.OP_PING, wire.OP_PONG, wire.OP_CLOSE]),
                key=key,
            )
        else:
            data = wsFrame(rng.randbytes(rng.randint(8821, 200000)), opcode=wire.OP_TEXT, key=key)
        yield conn.sendPieces(self.reactor, data, rng)
        yield conn.whenClosed(self.reactor, rng.random() * 3)

    @defer.inlineCallbacks
    def peerSlowloris(self, conn, target, rng):
        """
        Trickle a handshake or a frame a few bytes at a time; before Auth the
        relay must cut us off at its handshake timeout.
        """
        r = rng.randrange(3)
        if r == 0:
            data = upgradeRequest(target.host, target.port)
            preAuth = True
        elif r == 1:
            if not (yield self.upgrade(conn, target, rng)):
                return
            data = wsFrame(m.encodeAuth(self.newFuzzID(), self.token(rng)), key=self.key(rng))
            preAuth = True
        else:
            key = yield self.authenticate(conn, target, rng)
            if key is None:
                return
            data = wsFrame(m.encodeTransport(self.randomID(rng), rng.randbytes(3000)), key=key)
            preAuth = False
        limit = time.monotonic() + (HANDSHAKE_LIMIT if preAuth else rng.choice([3, 12]))
        pos = 0
        while (
            not conn.closed
            and pos < len(data) - 1
            and time.monotonic() < limit
            and not self.stopping
        ):
            step = rng.randint(1, 3)
            conn.send(data[pos : pos + step])
            pos += step
            yield self.sleep(rng.choice([0.2, 0.5, 1.0]))
        if preAuth and not conn.closed and not self.stopping:
            yield self.checkHandshakeTimeout(conn, f"slowloris variant {r}")

    # Cluster port scenarios

    @defer.inlineCallbacks
    def clusterGarbage(self, conn, target, rng):
        r = rng.randrange(3)
        if r == 0:
            data = rng.randbytes(rng.choice([1, 2, 3, 100, 5000]))
        elif r == 1:
            data = bytes([rng.choice([1, 2, 3, 0x14, 0x20, 0x21, 0x10, 0xFF])]) + rng.randbytes(
                rng.randint(2, 200)
            )
        else:
            data = upgradeRequest(target.host, target.clusterPort)
        yield conn.sendPieces(self.reactor, data, rng)
        closed = yield conn.whenClosed(self.reactor, REFUSED_LIMIT)
        if not closed and len(data) >= 3 and data[0] != cf.HELLO and not self.stopping:
            self.stats.anomaly(
                "cluster_first_frame_not_hello_kept", f"first header {data[:3].hex()}"
            )

    def ownAnnounce(self, conn, target):
        """
        The announce address of a fuzz pod: its own source address (the
        pod checks that a HELLO comes from the host it names).
        """
        return f"{conn.source}:{target.clusterPort}"

    def helloVariants(self, target, rng, source):
        """
        C{(payload-bearing frame, must be refused)} pairs.
        """
        now = int(time.time())
        secret = self.clusterSecret
        stranger = f"127.{rng.randint(100, 250)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"
        address = rng.choice(
            [
                f"{stranger}:{target.clusterPort}",
                target.announce,
                f"{source}:{target.clusterPort}",
            ]
            + [t.announce for t in self.targets if t.clusterPort]
        )
        other = "wrong-" + (secret or "secret")
        variants = [
            (cf.encodeFrame(cf.HELLO, cf.encodeHello(address, now, other)), True),
            (
                cf.encodeFrame(
                    cf.HELLO,
                    cf.encodeHello(
                        address,
                        now + rng.choice([-1, 1]) * rng.choice([301, 400, 10**6, 10**9]),
                        secret,
                    ),
                ),
                True,
            ),
            (
                cf.encodeFrame(cf.HELLO, mutateChanged(cf.encodeHello(address, now, secret), rng)),
                bool(secret),
            ),
            (
                cf.encodeFrame(
                    cf.HELLO,
                    bytes([rng.choice([0, 1, 3, 255])]) + cf.encodeHello(address, now, secret)[1:],
                ),
                True,
            ),
            (cf.encodeFrame(cf.HELLO, b"\x02\x00" + struct.pack(">Q", now) + b"\x00"), True),
            (cf.encodeFrame(cf.HELLO, cf.encodeHello(address, now, secret)[:-1]), True),
            (cf.encodeFrame(cf.HELLO, cf.encodeHello(address, now, secret) + b"\x00"), True),
            (cf.encodeFrame(cf.HELLO, rng.randbytes(rng.randint(0, 300))), True),
            (
                cf.encodeFrame(
                    cf.HELLO, b"\x02\x05\xff\xfe\xfd\xfc\xfb" + struct.pack(">Q", now) + b"\x00"
                ),
                True,
            ),
            (
                bytes([0])
                + struct.pack(">H", rng.randint(cf.HELLO_MAX_PAYLOAD + 1, 65535))
                + rng.randbytes(100),
                True,
            ),
            (
                cf.encodeFrame(
                    rng.choice([1, 2, 3, 0x14, 0x20, 0x21, 0x7F]), rng.randbytes(rng.randint(0, 60))
                ),
                True,
            ),
        ]
        if secret:
            variants.append((cf.encodeFrame(cf.HELLO, cf.encodeHello(address, now, "")), True))
        else:
            variants.append(
                (cf.encodeFrame(cf.HELLO, cf.encodeHello(address, now, "some-secret")), True)
            )
        return variants

    @defer.inlineCallbacks
    def clusterBadHello(self, conn, target, rng):
        """
        A broken HELLO, or a valid one from a host it does not name, or a
        valid one from its own host followed by anything but CHALLENGE (the
        pod then waits for CHALLENGE until its handshake timeout): each is
        refused.
        """
        frame, refused = rng.choice(self.helloVariants(target, rng, conn.source))
        tail = b"".join(
            cf.encodeFrame(rng.choice([1, 2, 3, 0x14, 0x20]), rng.randbytes(rng.randint(0, 80)))
            for _ in range(rng.randint(0, 4))
        )
        limit = REFUSED_LIMIT
        if frame[0] == cf.HELLO and len(frame) > 3:
            try:
                hello = cf.decodeHello(frame[3:], self.clusterSecret, time.time())
            except cf.FrameError:
                pass
            else:
                fromNamedHost = hello.address.rpartition(":")[0] == conn.source
                if fromNamedHost and not self.clusterSecret:
                    refused = False
                elif fromNamedHost:
                    refused = True
                    limit = REFUSED_LIMIT if tail else HELLO_LIMIT
        yield conn.sendPieces(self.reactor, frame + tail, rng)
        closed = yield conn.whenClosed(self.reactor, limit)
        if refused and not closed and not self.stopping:
            self.stats.anomaly(
                "cluster_bad_hello_kept",
                f"stream still open {limit:g} s after HELLO {frame[:12].hex()}... ({len(frame)} "
                "bytes)",
            )

    @defer.inlineCallbacks
    def clusterNoHello(self, conn, target, rng):
        conn.send(rng.choice([b"", b"\x00", b"\x00\x00", b"\x00\x00\x30" + b"\x02"]))
        closed = yield conn.whenClosed(self.reactor, HELLO_LIMIT)
        if not closed and not self.stopping:
            self.stats.anomaly(
                "cluster_hello_timeout_not_enforced",
                f"still open {HELLO_LIMIT:g} s without a HELLO",
            )

    def randomClusterFrame(self, rng, room=0):
        """
        A frame from a pod that passed the handshake but sends nonsense:
        malformed payloads of known types (which close the stream), FWDs of
        random messages to random and fuzz peers, unknown types (the
        handshake's among them), PING/PONG, repeated HELLO. Never about the
        good pair's ids: an authenticated pod is trusted to name owners, so
        claiming the good peers would be a test of trust, not of parsing.

        @param room: bytes to leave free in the payload (for the tag).
        """
        r = rng.randrange(12)
        pid = self.randomID(rng)
        if r == 0:
            return cf.whoHasFrame(self.randomID(rng, allowGood=True))
        if r == 1:
            return cf.iHaveFrame(pid, rng.getrandbits(32))
        if r == 2:
            return cf.peerGoneFrame(pid)
        if r in (3, 4):
            message = rng.choice(
                [
                    m.encodeTransport(self.randomID(rng), rng.randbytes(rng.randint(0, 1400))),
                    rng.randbytes(rng.randint(0, 100)),
                    b"\x01\x03",
                    b"",
                ]
            )
            return cf.fwdFrame(pid, message)
        if r == 5:
            return cf.pingFrame()
        if r == 6:
            return cf.pongFrame()
        if r == 7:
            return cf.encodeFrame(
                rng.choice(
                    [cf.CHALLENGE, cf.AUTH, cf.CONFIRM, 0x10, 0x11, 0x12, 0x13, 0x15, 0x22, 0xFF]
                ),
                rng.randbytes(rng.randint(0, 2000)),
            )
        if r == 8:
            return cf.helloFrame("127.1.2.3:1", int(time.time()), self.clusterSecret)
        if r == 9:
            kind = rng.choice([cf.WHO_HAS, cf.I_HAVE, cf.PEER_GONE, cf.FWD, cf.PING, cf.PONG])
            return cf.encodeFrame(kind, rng.randbytes(rng.choice([0, 1, 35, 37, 39, 41, 100])))
        if r == 10:
            return cf.encodeFrame(
                cf.FWD, pid + rng.randbytes(rng.choice([0, 100, cf.MAX_PAYLOAD - 36 - room]))
            )
        return cf.encodeFrame(
            cf.I_HAVE, mutate(cf.iHaveFrame(pid, 1)[cf.HEADER_SIZE :], rng)[: cf.MAX_PAYLOAD - room]
        )

    @defer.inlineCallbacks
    def podHandshake(self, conn, target, rng):
        """
        Dial as a pod does: a HELLO announcing our own source address, a
        CHALLENGE with a fresh nonce and, once the pod's AUTH proves the
        cluster secret, CONFIRM. From then on the pod's frames are opened as
        they arrive (a bad tag is an anomaly).

        @return: the L{cf.Handshake}, or None if the pod did not let us in.
        """
        hello = cf.encodeHello(self.ownAnnounce(conn, target), int(time.time()), self.clusterSecret)
        nonce = rng.randbytes(cf.NONCE_SIZE)
        conn.clusterReader = cf.FrameReader()
        self.stats.podSessions += 1
        yield conn.sendPieces(
            self.reactor, cf.encodeFrame(cf.HELLO, hello) + cf.challengeFrame(nonce), rng
        )
        handshake = yield self.awaitAuth(conn, hello, nonce, HELLO_LIMIT)
        if handshake is None:
            return None
        self.stats.podSessionsAnswered += 1
        conn.clusterOpener = cf.Opener(handshake.acceptorKey)
        conn.send(cf.confirmFrame(handshake.dialerMAC))
        return handshake

    @defer.inlineCallbacks
    def awaitAuth(self, conn, hello, nonce, timeout):
        """
        Wait for the pod's AUTH and check its proof.

        @return: the L{cf.Handshake}, or None (closed, or an anomaly).
        """
        answered = yield conn.waitUntil(self.reactor, lambda c: c.clusterFrames, timeout)
        if not answered:
            if not conn.closed and not self.stopping:
                self.stats.anomaly(
                    "cluster_handshake_stalled",
                    f"no AUTH {timeout:g} s after HELLO and CHALLENGE, connection kept",
                )
            return None
        frameType, payload = conn.clusterFrames.pop(0)
        try:
            if frameType != cf.AUTH:
                raise cf.FrameError(cf.MALFORMED, f"{cf.frameName(frameType)} instead of AUTH")
            acceptorNonce, mac = cf.decodeAuth(payload)
        except cf.FrameError as e:
            self.stats.anomaly("cluster_bad_auth_from_pod", str(e))
            return None
        handshake = cf.Handshake(self.clusterSecret, hello, nonce, acceptorNonce)
        handshake.acceptorNonce = acceptorNonce
        if not hmac.compare_digest(mac, handshake.acceptorMAC):
            self.stats.anomaly(
                "cluster_bad_auth_from_pod", "AUTH does not prove the cluster secret"
            )
            return None
        return handshake

    @defer.inlineCallbacks
    def clusterBadHandshake(self, conn, target, rng):
        """
        A valid HELLO from its own host, then a secured handshake gone wrong:
        the pod closes the connection and never sends a frame beyond AUTH.
        """
        if not self.clusterSecret:
            return (yield self.clusterBadHello(conn, target, rng))
        conn.clusterReader = cf.FrameReader()
        secret = self.clusterSecret
        announce = self.ownAnnounce(conn, target)
        variant = rng.randrange(10)
        if variant == 5:
            # A HELLO naming another host (a real pod's, or anyone's).
            announce = rng.choice(
                [target.announce, f"127.{rng.randint(100, 250)}.0.1:{target.clusterPort}"]
            )
        hello = cf.encodeHello(announce, int(time.time()), secret)
        nonce = rng.randbytes(cf.NONCE_SIZE)
        helloFrame = cf.encodeFrame(cf.HELLO, hello)
        limit = REFUSED_LIMIT
        answered = variant in (1, 2, 3, 6, 7, 9)
        if variant == 0:
            challenge = rng.choice(
                [
                    b"",
                    bytes([3]) + nonce[:-1],
                    bytes([3]) + nonce + b"\x00",
                    bytes([2]) + nonce,
                    bytes([4]) + nonce,
                ]
            )
            yield conn.sendPieces(
                self.reactor, helloFrame + cf.encodeFrame(cf.CHALLENGE, challenge), rng
            )
        elif variant == 4:
            yield conn.sendPieces(
                self.reactor, helloFrame + cf.confirmFrame(rng.randbytes(cf.MAC_SIZE)), rng
            )
        elif variant == 5:
            yield conn.sendPieces(self.reactor, helloFrame + cf.challengeFrame(nonce), rng)
        elif variant == 8:
            yield conn.sendPieces(
                self.reactor, helloFrame + cf.authFrame(nonce, rng.randbytes(cf.MAC_SIZE)), rng
            )
        else:
            yield conn.sendPieces(self.reactor, helloFrame + cf.challengeFrame(nonce), rng)
            handshake = yield self.awaitAuth(conn, hello, nonce, REFUSED_LIMIT)
            if handshake is None:
                return
            if variant == 1:
                conn.send(cf.confirmFrame(rng.randbytes(cf.MAC_SIZE)))
            elif variant == 2:
                conn.send(
                    cf.confirmFrame(
                        cf.Handshake(
                            "wrong-" + secret, hello, nonce, handshake.acceptorNonce
                        ).dialerMAC
                    )
                )
            elif variant == 3:
                frame = self.randomClusterFrame(rng, room=cf.TAG_SIZE)
                conn.send(
                    cf.Sealer(handshake.dialerKey).seal(frame) if rng.random() < 0.5 else frame
                )
            elif variant == 6:
                limit = HELLO_LIMIT
            elif variant == 7:
                conn.send(self.lastConfirm or cf.confirmFrame(rng.randbytes(cf.MAC_SIZE)))
            else:
                conn.send(cf.challengeFrame(rng.randbytes(cf.NONCE_SIZE)))
        closed = yield conn.whenClosed(self.reactor, limit)
        if self.stopping:
            return
        if not closed:
            self.stats.anomaly(
                "cluster_bad_handshake_kept", f"variant {variant}: still open {limit:g} s later"
            )
        if conn.clusterFrames:
            kinds = [cf.frameName(t) for t, _ in conn.clusterFrames[:4]]
            what = "after AUTH" if answered else "to a handshake it refused"
            self.stats.anomaly("cluster_frames_before_auth", f"variant {variant}: {kinds} {what}")

    @defer.inlineCallbacks
    def clusterSession(self, conn, target, rng):
        """
        Pass the secured handshake as a pod (when we know the cluster
        secret), check the stream is live (a sealed PING is answered), then
        send random sealed frames, answering the pod's WHO_HAS for non-good
        ids now and then, and its PINGs sometimes. Now and then a frame is
        forged (a bit of a sealed frame flipped), sent without its tag, or
        replayed: the pod must close the stream.
        """
        if self.clusterSecret is None:
            return (yield self.clusterBadHello(conn, target, rng))
        handshake = yield self.podHandshake(conn, target, rng)
        if handshake is None:
            return
        sealer = cf.Sealer(handshake.dialerKey)
        conn.send(sealer.seal(cf.pingFrame()))
        live = yield conn.waitUntil(
            self.reactor, lambda c: any(t == cf.PONG for t, _ in c.clusterFrames), REFUSED_LIMIT
        )
        if not live:
            if not conn.closed and not self.stopping:
                self.stats.anomaly(
                    "cluster_secured_ping_unanswered",
                    f"no PONG {REFUSED_LIMIT:g} s after CONFIRM and a sealed PING",
                )
            return
        self.stats.podSessionsSecured += 1
        self.lastConfirm = cf.confirmFrame(handshake.dialerMAC)
        answersPings = rng.random() < 0.5
        end = self.reactor.seconds() + rng.choice([0.5, 2, 6])
        sent = []
        inStep = True  # whether the pod's frame boundaries are still ours
        while not conn.closed and self.reactor.seconds() < end and not self.stopping:
            incoming, conn.clusterFrames = conn.clusterFrames, []
            for frameType, payload in incoming:
                if frameType == cf.PING and answersPings:
                    conn.send(sealer.seal(cf.pongFrame()))
                elif (
                    frameType == cf.WHO_HAS
                    and len(payload) == 36
                    and payload not in self.goodIDs
                    and rng.random() < 0.3
                ):
                    conn.send(sealer.seal(cf.iHaveFrame(payload, rng.getrandbits(32))))
            frame = self.randomClusterFrame(rng, room=cf.TAG_SIZE)
            r = rng.random()
            if r < 0.06 and inStep:
                if r < 0.02:
                    kind, data = "forged", bytearray(sealer.seal(frame))
                    data[rng.randrange(cf.HEADER_SIZE, len(data))] ^= 1 << rng.randrange(8)
                elif r < 0.04 or not sent:
                    kind, data = "untagged", frame
                else:
                    kind, data = "replayed", rng.choice(sent)
                self.stats.podForgedFrames += 1
                yield conn.sendPieces(self.reactor, bytes(data), rng)
                closed = yield conn.whenClosed(self.reactor, REFUSED_LIMIT)
                if not closed and not self.stopping:
                    self.stats.anomaly(
                        "cluster_forged_frame_kept",
                        f"a {kind} {cf.frameName(data[0])} frame of {len(data)} bytes",
                    )
                return
            if r < 0.09:
                data, inStep = mutate(sealer.seal(frame), rng), False
            elif r < 0.15:
                # Valid but hostile: a burst of claims, lookups and goodbyes
                # for ids that are nobody's.
                burst = [
                    rng.choice(
                        (
                            cf.iHaveFrame(pid, rng.getrandbits(32)),
                            cf.whoHasFrame(pid),
                            cf.peerGoneFrame(pid),
                        )
                    )
                    for pid in (self.randomID(rng) for _ in range(rng.randint(2, 200)))
                ]
                data = b"".join(sealer.seal(f) for f in burst)
            else:
                data = sealer.seal(frame)
                sent = (sent + [data])[-8:]
            yield conn.sendPieces(self.reactor, data, rng)
            yield self.sleep(rng.random() * 0.1)


# The good pair


class GoodPair:
    """
    Two well-behaved peers sending each other sequence-numbered messages
    whose content is a function of the sequence number, so the receiver
    checks source, order and every byte.
    """

    def __init__(self, reactor, rate, maxSize=1300):
        self.reactor = reactor
        self.rate = rate
        self.maxSize = maxSize
        self.peers = []
        self.sent = [0, 0]
        self.received = [0, 0]
        self.lost = [0, 0]
        self.reordered = [0, 0]
        self.corrupt = [0, 0]
        self.foreign = [0, 0]
        self.disconnects = 0
        self._loop = None
        self._credit = 0.0
        self.closing = False

    def payload(self, direction, seq):
        size = 8 + (seq * 7919 + direction * 104729) % (self.maxSize - 8)
        offset = (seq * 131 + direction * 977) % (len(BLOCK) - size)
        return struct.pack(">Q", seq) + BLOCK[offset : offset + size - 8]

    @defer.inlineCallbacks
    def connect(self, urlA, urlB, secret, timeout=30.0):
        ids = [m.peerID(n) for n in GOOD_NAMES]
        a = yield client.connect(self.reactor, urlA, ids[0], secret=secret)
        b = yield client.connect(self.reactor, urlB, ids[1], secret=secret)
        self.peers = [a, b]
        self.ids = ids
        for index, peer in enumerate(self.peers):
            peer.onTransport = self._receiver(index)
            peer.whenLost().addCallback(self._lost, index)
        deadline = self.reactor.seconds() + timeout
        for me, other in ((a, ids[1]), (b, ids[0])):
            while True:
                try:
                    yield me.waitOnline(other, timeout=2)
                    break
                except defer.TimeoutError:
                    if self.reactor.seconds() > deadline:
                        raise RuntimeError("the good peers never saw each other online") from None

    def _lost(self, _, index):
        if not self.closing:
            self.disconnects += 1
            log(f"good peer {GOOD_NAMES[index]} was disconnected")

    def _receiver(self, index):
        direction = 1 - index  # messages to peer 0 come from peer 1: direction 1
        source = m.peerID(GOOD_NAMES[1 - index])

        def onTransport(message):
            message = bytes(message)
            if message[2:38] != source:
                self.foreign[direction] += 1
                return
            body = message[38:]
            if len(body) < 8:
                self.corrupt[direction] += 1
                return
            (seq,) = struct.unpack_from(">Q", body)
            expected = self.received[direction]
            if seq != expected:
                if seq > expected:
                    self.lost[direction] += seq - expected
                    self.received[direction] = seq
                else:
                    self.reordered[direction] += 1
                    return
            if body != self.payload(direction, seq):
                self.corrupt[direction] += 1
            self.received[direction] += 1

        return onTransport

    def start(self):
        self._loop = task.LoopingCall(self._tick)
        self._loop.clock = self.reactor
        self._last = self.reactor.seconds()
        self._loop.start(0.02)

    def _tick(self):
        now = self.reactor.seconds()
        self._credit += (now - self._last) * self.rate
        self._last = now
        count = int(self._credit)
        self._credit -= count
        for direction in (0, 1):
            sender = self.peers[direction]
            if not sender.transport.connected:
                continue
            destination = self.ids[1 - direction]
            for _ in range(count):
                sender.send(destination, self.payload(direction, self.sent[direction]))
                self.sent[direction] += 1

    def stopSending(self):
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def complete(self):
        return all(self.received[d] + 0 >= self.sent[d] for d in (0, 1))

    @defer.inlineCallbacks
    def drain(self, timeout=30.0):
        deadline = self.reactor.seconds() + timeout
        while not self.complete() and self.reactor.seconds() < deadline:
            yield sleep(self.reactor, 0.1)

    def summary(self):
        missing = [max(0, self.sent[d] - self.received[d]) for d in (0, 1)]
        return {
            "sent": self.sent,
            "received": self.received,
            "lost_in_sequence": self.lost,
            "missing_at_end": missing,
            "reordered": self.reordered,
            "corrupt": self.corrupt,
            "foreign_sources": self.foreign,
            "disconnects": self.disconnects,
        }

    def ok(self):
        return (
            self.complete()
            and not any(self.lost)
            and not any(self.reordered)
            and not any(self.corrupt)
            and self.disconnects == 0
        )

    @defer.inlineCallbacks
    def close(self):
        self.closing = True
        for peer in self.peers:
            if peer.transport.connected:
                yield peer.close()


# Liveness


@defer.inlineCallbacks
def probeAccept(reactor, host, port):
    try:
        p = yield connectProtocol(
            TCP4ClientEndpoint(reactor, host, port, timeout=3), protocol.Protocol()
        )
    except Exception:
        return False
    p.transport.abortConnection()
    return True


@defer.inlineCallbacks
def probeRelay(reactor, target, secret, serial):
    """
    A new peer pair authenticates on C{target} and one message goes through.
    """
    ids = [m.peerID(f"fuzz-probe-{serial}-{i}") for i in (0, 1)]
    peers = []
    try:
        for pid in ids:
            peers.append(
                (yield client.connect(reactor, target.url, pid, secret=secret, timeout=10))
            )
        peers[0].send(ids[1], b"probe")
        source, payload = yield peers[1].transports.get().addTimeout(10, reactor)
        return source == ids[0] and payload == b"probe"
    except Exception:
        return False
    finally:
        for peer in peers:
            if peer.transport.connected:
                peer.transport.abortConnection()


class Monitor:
    """
    Every second: each target's RSS and whether its process runs; every 5 s
    whether its ports accept.
    """

    def __init__(self, reactor, targets):
        self.reactor = reactor
        self.targets = targets
        self.ticks = 0
        self._loop = None
        self.phase = "baseline"

    def start(self):
        self._loop = task.LoopingCall(self._tick)
        self._loop.clock = self.reactor
        self._loop.start(1.0)

    def stop(self):
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def _tick(self):
        self.ticks += 1
        for target in self.targets:
            rss = target.rssKiB()
            if rss is not None:
                target.rss.setdefault(self.phase, []).append(rss)
            if self.ticks % 5 == 0:
                for port in (target.port, target.clusterPort):
                    if port:
                        target.probes += 1
                        probeAccept(self.reactor, target.host, port).addCallback(
                            self._accepted, target, port
                        )

    def _accepted(self, ok, target, port):
        if not ok:
            target.acceptFailures += 1
            log(f"{target.host}:{port} did not accept a connection")


# Orchestration


def spawnRelays(options, logDir):
    """
    Start the relay (or three pods) this run fuzzes.

    @return: a list of L{Target}.
    """
    processes, clusterPort = startRelays(
        options.secret,
        list(options.relay_arg or []),
        logDir,
        "fuzz",
        cluster=options.cluster,
        clusterSecret=options.cluster_secret,
    )
    return [Target(p.host, p.port, clusterPort=clusterPort, process=p) for p in processes]


def externalTargets(options):
    targets = []
    pids = list(options.pid or [])
    clusterTargets = list(options.cluster_target or [])
    for i, url in enumerate(options.url):
        split = urlsplit(url if "://" in url else "rel://" + url)
        if split.hostname is None or split.port is None:
            raise SystemExit(f"--url needs host:port: {url!r}")
        if not split.hostname.startswith("127."):
            raise SystemExit(f"loopback only: {url!r}")
        clusterPort = None
        for ct in clusterTargets:
            host, _, port = ct.rpartition(":")
            if host == split.hostname:
                clusterPort = int(port)
        targets.append(
            Target(
                split.hostname,
                split.port,
                clusterPort=clusterPort,
                pid=pids[i] if i < len(pids) else None,
            )
        )
    return targets


def rssSummary(target, options):
    def stat(values, f):
        return f(values) if values else None

    baseline = stat(target.rss.get("baseline"), lambda v: v[-1])
    peak = stat(target.rss.get("fuzz"), max)
    rounds = [stat(target.rss.get(f"after-{k}"), min) for k in range(options.rounds)]
    rounds = [r for r in rounds if r is not None]
    after = rounds[-1] if rounds else None
    summary = {
        "baseline_kib": baseline,
        "peak_kib": peak,
        "after_kib": after,
        "after_by_round_kib": rounds,
    }
    if baseline is None or after is None:
        summary["ok"] = None
        return summary
    slack = max(options.rss_slack_mib * 1024, options.rss_slack_ratio * baseline)
    summary["limit_kib"] = int(baseline + slack)
    summary["growth_kib"] = after - baseline
    if peak is not None and peak > baseline:
        summary["returned_fraction"] = round((peak - after) / (peak - baseline), 3)
    summary["ok"] = after <= baseline + slack
    return summary


@defer.inlineCallbacks
def run(reactor, options, targets):
    failures = []
    rng = random.Random(options.seed)
    good = GoodPair(reactor, options.good_rate)
    urlA = targets[0].url
    urlB = targets[1 % len(targets)].url
    log(f"good pair: {GOOD_NAMES[0]} on {urlA}, {GOOD_NAMES[1]} on {urlB}")
    yield good.connect(urlA, urlB, options.secret)
    monitor = Monitor(reactor, targets)
    monitor.start()
    good.start()
    yield sleep(reactor, options.warmup)
    fuzzer = Fuzzer(
        reactor,
        targets,
        options.secret,
        options.cluster_secret,
        rng,
        options.connections,
        options.rate,
        good.ids,
    )
    for round_ in range(options.rounds):
        monitor.phase = "fuzz"
        log(
            f"round {round_ + 1} of {options.rounds}: fuzzing for {options.duration:g} s with "
            f"{options.connections} connections at up to {options.rate:g} new/s"
        )
        fuzzer.start()
        started = reactor.seconds()
        while reactor.seconds() - started < options.duration:
            yield sleep(reactor, min(10, options.duration - (reactor.seconds() - started)))
            s = fuzzer.stats
            log(
                f"{reactor.seconds() - started:5.0f} s: {s.started} connections, "
                f"{s.connectErrors} connect errors, {len(fuzzer.active)} open, good "
                f"{good.received} of {good.sent}, anomalies {sum(s.anomalies.values())}, rss "
                f"{[t.rssKiB() for t in targets]} KiB"
            )
            if not all(t.running() for t in targets):
                failures.append("a relay process exited during the fuzz")
                break
        yield fuzzer.stop()
        log(f"fuzz connections closed; settling {options.settle:g} s for RSS")
        monitor.phase = f"after-{round_}"
        yield sleep(reactor, options.settle)
        if failures:
            break
    monitor.phase = "drain"
    good.stopSending()
    yield good.drain()
    monitor.stop()
    yield good.close()

    relays = []
    for i, target in enumerate(targets):
        running = target.running()
        accepts = running and (yield probeAccept(reactor, target.host, target.port))
        relays.append(
            {
                "address": f"{target.host}:{target.port}",
                "cluster_port": target.clusterPort,
                "pid": target.pid,
                "running": running,
                "accepts": accepts,
                "relays_new_peer": running
                and (yield probeRelay(reactor, target, options.secret, i)),
                "accept_probe_failures": target.acceptFailures,
                "accept_probes": target.probes,
                "rss": rssSummary(target, options),
            }
        )
    for relay in relays:
        where = relay["address"]
        if not relay["running"]:
            failures.append(f"{where}: process not running")
        if not relay["accepts"]:
            failures.append(f"{where}: peer port does not accept")
        if not relay["relays_new_peer"]:
            failures.append(
                f"{where}: a new peer pair could not authenticate and exchange a message"
            )
        if relay["rss"]["ok"] is False:
            failures.append(
                f"{where}: RSS {relay['rss']['after_kib']} KiB after the fuzz, baseline "
                f"{relay['rss']['baseline_kib']} KiB"
            )
    if not good.ok():
        failures.append("the good pair lost, reordered or corrupted messages, or was disconnected")
    for name, count in fuzzer.stats.anomalies.items():
        failures.append(f"anomaly {name} x{count}")
    return {
        "relays": relays,
        "good_pair": good.summary(),
        "fuzz": fuzzer.stats.summary(),
        "failures": failures,
    }


def parseArgs(argv):
    parser = argparse.ArgumentParser(
        prog="python -m tests.fuzz", description=__doc__.split("\n\n")[0]
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--spawn", action="store_true", help="start one relay on 127.0.0.1")
    where.add_argument("--cluster", action="store_true", help="start three pods on 127.0.0.2-4")
    where.add_argument(
        "--url", action="append", help="rel://127.x.y.z:port of a running relay (repeat for pods)"
    )
    parser.add_argument(
        "--secret", help="the relays' auth secret (default: $OZ_AUTH_SECRET; random when spawning)"
    )
    parser.add_argument(
        "--pid",
        type=int,
        action="append",
        help="pid of the --url relay, same order, for RSS and liveness",
    )
    parser.add_argument(
        "--cluster-target", action="append", help="host:port of a --url relay's inter-pod listener"
    )
    parser.add_argument(
        "--cluster-secret",
        help=(
            "inter-pod secret, to fuzz past HELLO (default: $OZ_CLUSTER_AUTH_SECRET; random when "
            "spawning)"
        ),
    )
    parser.add_argument(
        "--duration", type=float, default=60.0, help="seconds of fuzzing (default 60)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="fuzz rounds of --duration, RSS read after each (default 1)",
    )
    parser.add_argument(
        "--connections", type=int, default=64, help="fuzz connections open at once (default 64)"
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=100.0,
        help="new fuzz connections per second at most (default 100)",
    )
    parser.add_argument(
        "--good-rate",
        type=float,
        default=200.0,
        help="good-pair messages per second each way (default 200)",
    )
    parser.add_argument("--seed", type=int, help="random seed (default: random, reported)")
    parser.add_argument(
        "--warmup",
        type=float,
        default=5.0,
        help="seconds of good traffic before the fuzz (RSS baseline)",
    )
    parser.add_argument(
        "--settle", type=float, default=15.0, help="seconds after the fuzz before RSS is read again"
    )
    parser.add_argument(
        "--rss-slack-mib",
        type=float,
        default=16.0,
        help="RSS may end this much above baseline (MiB)",
    )
    parser.add_argument(
        "--rss-slack-ratio",
        type=float,
        default=0.2,
        help="... or this fraction of it, whichever is larger",
    )
    parser.add_argument(
        "--relay-arg", action="append", help="extra argument for spawned relays (repeat)"
    )
    parser.add_argument(
        "--log-dir", help="where spawned relays log (default: a new temporary directory)"
    )
    options = parser.parse_args(argv)
    spawning = options.spawn or options.cluster
    if options.secret is None:
        options.secret = os.environ.get("OZ_AUTH_SECRET") or (
            os.urandom(16).hex() if spawning else None
        )
    if options.secret is None:
        parser.error("--secret (or OZ_AUTH_SECRET) is needed with --url")
    if options.cluster_secret is None:
        options.cluster_secret = os.environ.get("OZ_CLUSTER_AUTH_SECRET") or (
            os.urandom(16).hex() if options.cluster else None
        )
    if options.seed is None:
        options.seed = random.randrange(2**32)
    return options


def main(argv=None, reactor=None):
    options = parseArgs(sys.argv[1:] if argv is None else argv)
    if reactor is None:
        from twisted.internet import reactor
    fdLimit = raiseFileLimit(None)
    logDir = options.log_dir or tempfile.mkdtemp(prefix="relay-fuzz-")
    os.makedirs(logDir, exist_ok=True)
    try:
        targets = (
            spawnRelays(options, logDir)
            if (options.spawn or options.cluster)
            else externalTargets(options)
        )
    except RuntimeError as e:
        log(f"could not start the relays: {e}")
        return 2
    mode = "cluster" if options.cluster else ("spawn" if options.spawn else "external")
    log(f"mode {mode}, seed {options.seed}, relays {[t.url for t in targets]}, logs in {logDir}")
    outcome = {}

    def done(result):
        outcome["result"] = result
        reactor.stop()

    def failed(failure):
        outcome["error"] = failure.getErrorMessage() or repr(failure.value)
        log(f"run failed: {failure.getTraceback()}")
        reactor.stop()

    startedAt = time.time()
    reactor.callWhenRunning(lambda: run(reactor, options, targets).addCallbacks(done, failed))
    reactor.run()

    result = outcome.get("result") or {
        "relays": [],
        "failures": [f"the run did not complete: {outcome.get('error')}"],
    }
    for target in targets:
        if target.process is None:
            continue
        code = target.process.stop()
        tracebacks = countTracebacks(target.process.logPath)
        for relay in result["relays"]:
            if relay["address"] == f"{target.host}:{target.port}" and relay["pid"] == target.pid:
                relay["exit_code"] = code
                relay["log_tracebacks"] = tracebacks
                relay["log"] = target.process.logPath
        if code != 0:
            result["failures"].append(f"{target.host}:{target.port}: exit status {code} on SIGTERM")
        if tracebacks:
            result["failures"].append(
                f"{target.host}:{target.port}: {tracebacks} tracebacks in {target.process.logPath}"
            )
    result.update(
        {
            "ok": not result["failures"],
            "mode": mode,
            "seed": options.seed,
            "duration_s": options.duration,
            "rounds": options.rounds,
            "wall_s": round(time.time() - startedAt, 1),
            "connections_at_once": options.connections,
            "rate_per_s": options.rate,
            "good_rate_per_s": options.good_rate,
            "fd_limit": fdLimit,
        }
    )
    sys.stdout.write(json.dumps(result, indent=2, sort_keys=True) + "\n")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
