"""
The benchmark harness (tests.bench): the pieces that can silently lie (frame
building, frame parsing, percentiles) checked against PROTOCOL.md and RFC 6455,
and one tiny real run against a real relay process.
"""

import os
import select
import shutil
import socket

from twisted.trial import unittest

from tests.bench import cases, wire
from tests.bench.__main__ import parseArgs
from tests.bench.loads import Flow, PairLoop
from tests.bench.peers import Peer
from tests.bench.relayproc import RelayProcess, raiseFileLimit, writeCertificate

PEER_A = bytes.fromhex("7368612dbdb94c73d53c44023a715a2970a10c4d54fa9550b70fd9d34cc4b0a2de5ddcbe")
TOKEN = bytes.fromhex(
    "01171b78c230f8924ea423b2db791f90effa360b02a58889d318e4aba5bdfb2eff31383933343536303030"
)


def unmaskClientFrames(data):
    """
    Parse masked client frames independently of tests.bench: list of
    (fin, opcode, unmasked payload).
    """
    out = []
    pos = 0
    while pos < len(data):
        b0, b1 = data[pos], data[pos + 1]
        assert b1 & 0x80, "client frames must be masked"
        n = b1 & 0x7F
        pos += 2
        if n == 126:
            n = int.from_bytes(data[pos : pos + 2], "big")
            pos += 2
        elif n == 127:
            n = int.from_bytes(data[pos : pos + 8], "big")
            pos += 8
        key = data[pos : pos + 4]
        pos += 4
        payload = bytes(c ^ key[i % 4] for i, c in enumerate(data[pos : pos + n]))
        pos += n
        out.append((bool(b0 & 0x80), b0 & 0x0F, payload))
    return out


class FakeRelay:
    """
    A relay the bench's turn-taking tests start and stop: its TLS flag only.
    """

    pid = 0

    def __init__(self, tls):
        self.tls = tls

    def running(self):
        return True


class VectorTests(unittest.TestCase):
    def test_peerId(self):
        self.assertEqual(wire.peerId("peer-a"), PEER_A)

    def test_token(self):
        self.assertEqual(wire.token("relay-secret", ttl=0, now=1893456000), TOKEN)

    def test_auth(self):
        self.assertEqual(
            wire.authMessage(PEER_A, TOKEN), bytes.fromhex("01062112a442") + PEER_A + TOKEN
        )
        self.assertEqual(len(wire.authMessage(PEER_A, TOKEN)), 85)

    def test_upgradeAccept(self):
        # RFC 6455 section 1.3
        self.assertEqual(
            wire.acceptFor(b"dGhlIHNhbXBsZSBub25jZQ=="), b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        )
        req, accept = wire.upgradeRequest("127.0.0.1", 1234)
        self.assertTrue(req.startswith(b"GET /relay HTTP/1.1\r\nHost: 127.0.0.1:1234\r\n"))
        key = [
            line.split(b": ")[1]
            for line in req.split(b"\r\n")
            if line.startswith(b"Sec-WebSocket-Key")
        ][0]
        self.assertEqual(accept, wire.acceptFor(key))
        self.assertIsNone(
            wire.checkUpgradeResponse(
                b"HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: " + accept, accept
            )
        )
        self.assertRaises(ValueError, wire.checkUpgradeResponse, b"HTTP/1.1 403 Forbidden", accept)
        self.assertRaises(
            ValueError,
            wire.checkUpgradeResponse,
            b"HTTP/1.1 101 OK\r\nSec-WebSocket-Accept: x",
            accept,
        )


class FrameTests(unittest.TestCase):
    def test_sendTemplateMatchesFramesBuiltOneByOne(self):
        """
        Pre-built masked frames unmask to exactly the transport messages with
        sequence numbers a..b-1, for 7-bit and 16-bit lengths.
        """
        dst = wire.peerId("b")
        for size in (8, 9, 50, 87, 88, 1400, wire.MAX_SIZE):
            tail = wire.payloadTail(3, size)
            key = os.urandom(4)
            t = wire.SendTemplate(dst, tail, key)
            data = t.frames(5, 9)
            self.assertEqual(len(data), 4 * t.frameLen)
            frames = unmaskClientFrames(data)
            self.assertEqual(len(frames), 4)
            for k, (fin, op, payload) in enumerate(frames):
                self.assertTrue(fin)
                self.assertEqual(op, wire.OP_BINARY)
                self.assertEqual(payload, b"\x01\x03" + dst + (5 + k).to_bytes(8, "big") + tail)
            self.assertEqual(t.frame(7), data[2 * t.frameLen : 3 * t.frameLen])
            self.assertEqual(t.frames(3, 3), t.head + t.tail)  # callers never ask for none

    def test_bigSequenceNumbers(self):
        t = wire.SendTemplate(wire.peerId("b"), b"", b"\xff\xff\xff\xff")
        [(_, _, payload)] = unmaskClientFrames(t.frame(2**64 - 1))
        self.assertEqual(payload[38:], b"\xff" * 8)

    def test_expectTemplate(self):
        src = wire.peerId("a")
        tail = wire.payloadTail(1, 1400)
        e = wire.ExpectTemplate(src, tail)
        want = b"".join(
            wire.serverFrame(b"\x01\x03" + src + s.to_bytes(8, "big") + tail) for s in range(10, 13)
        )
        self.assertEqual(e.frames(10, 13), want)
        self.assertEqual(want[:4], b"\x82\x7e" + (1438).to_bytes(2, "big"))

    def test_readerHeaderSizes(self):
        r = wire.ServerFrameReader()
        msgs = [b"\x01\x05", b"x" * 125, b"y" * 126, b"z" * 65535, b"w" * 65536]
        data = b"".join(wire.serverFrame(m) for m in msgs)
        got = []
        for i in range(0, len(data), 1000):  # byte stream split anywhere
            got.extend(r.feed(data[i : i + 1000]))
        self.assertEqual(got, [(wire.OP_BINARY, m) for m in msgs])
        self.assertEqual(r.buf, b"")

    def test_readerOneByteAtATime(self):
        r = wire.ServerFrameReader()
        data = (
            wire.serverFrame(b"abc", fin=False)
            + wire.serverFrame(b"ping", opcode=wire.OP_PING)
            + wire.serverFrame(b"def", opcode=wire.OP_CONT)
        )
        got = []
        for i in range(len(data)):
            got.extend(r.feed(data[i : i + 1]))
        self.assertEqual(got, [(wire.OP_PING, b"ping"), (wire.OP_BINARY, b"abcdef")])

    def test_readerRejects(self):
        self.assertRaises(
            ValueError, wire.ServerFrameReader().feed, wire.clientFrame(b"x", b"abcd")
        )
        self.assertRaises(ValueError, wire.ServerFrameReader().feed, b"\xc2\x00")  # RSV1
        self.assertRaises(
            ValueError, wire.ServerFrameReader().feed, b"\x80\x00"
        )  # continuation first
        self.assertRaises(ValueError, wire.ServerFrameReader().feed, b"\x83\x00")  # reserved opcode


class ReceiverAccountingTests(unittest.TestCase):
    """
    The receiver's verdicts: in-order traffic on the fast path, and loss,
    damage, reordering and health checks on the slow path.
    """

    def setUp(self):
        self.loop = PairLoop({})
        self.loop.ep = select.epoll()
        self.addCleanup(self.loop.ep.close)
        ends = []
        for name in ("s", "r"):
            mine, theirs = socket.socketpair()
            self.addCleanup(mine.close)
            self.addCleanup(theirs.close)
            ends.append((Peer(name, mine, os.urandom(4), b""), theirs))
        (sp, _), (rp, self.relaySide) = ends
        self.recv = self.loop._conn(rp)
        self.loop.ep.register(self.recv.fd, select.EPOLLIN)
        self.flow = Flow(0, "window", self.loop._conn(sp), self.recv, 100, 64)
        self.loop._flow(self.flow)
        self.flow.built = 1000
        self.tail = wire.payloadTail(0, 100)

    def frame(self, seq, src=None, tail=None):
        src = src or self.flow.sender.peer.id
        return wire.serverFrame(
            b"\x01\x03" + src + seq.to_bytes(8, "big") + (self.tail if tail is None else tail)
        )

    def feed(self, data, cut=7):
        for i in range(0, len(data), cut):
            self.loop._read(self.recv, data[i : i + cut], 0.0, [])

    def test_inOrder(self):
        self.feed(b"".join(self.frame(s) for s in range(50)), cut=333)
        f = self.flow
        self.assertEqual(
            (f.got, f.nseq, f.gaps, f.reordered, f.idErrors, f.dataErrors), (50, 50, 0, 0, 0, 0)
        )

    def test_lossDamageReorderAndHealthCheck(self):
        damaged = bytearray(self.tail)
        damaged[50] ^= 1
        data = (
            self.frame(0)
            + self.frame(1)
            + self.frame(4)  # 2 and 3 lost
            + wire.serverFrame(wire.HEALTHCHECK)
            + self.frame(3)  # late
            + self.frame(5, tail=bytes(damaged))
            + self.frame(6, src=wire.peerId("stranger"))
            + self.frame(7)
        )
        self.feed(data)
        f = self.flow
        self.assertEqual(f.got, 7)
        self.assertEqual(
            (f.gaps, f.gapEvents, f.reordered, f.dataErrors, f.idErrors), (2, 1, 1, 1, 1)
        )
        self.assertEqual(f.nseq, 8)
        self.assertEqual(f.summary()["lost"], 1000 - 7)
        # the health check was answered with a masked [1][5]
        self.relaySide.settimeout(1)
        [(fin, op, payload)] = unmaskClientFrames(self.relaySide.recv(100))
        self.assertEqual((fin, op, payload), (True, wire.OP_BINARY, wire.HEALTHCHECK))


class StatisticsTests(unittest.TestCase):
    def test_percentileNearestRank(self):
        values = list(range(1, 101))
        self.assertEqual(wire.percentile(values, 0.5), 50)
        self.assertEqual(wire.percentile(values, 0.9), 90)
        self.assertEqual(wire.percentile(values, 0.99), 99)
        self.assertEqual(wire.percentile(values, 0.999), 100)
        self.assertEqual(wire.percentile(values, 0.0), 1)
        self.assertEqual(wire.percentile([7], 0.999), 7)
        self.assertIsNone(wire.percentile([], 0.5))
        self.assertEqual(wire.percentile(list(range(1, 1001)), 0.999), 999)

    def test_median(self):
        self.assertEqual(wire.median([3, 1, 2]), 2)
        self.assertEqual(wire.median([4, 1, 2, 3]), 2.5)
        self.assertEqual(wire.median([None, 5]), 5)
        self.assertIsNone(wire.median([]))


class TinyRunTests(unittest.TestCase):
    """
    One short run of each cheap case against a real relay process.
    """

    timeout = 30

    def setUp(self):
        raiseFileLimit(4096)
        self.o = parseArgs(
            [
                "--duration",
                "0.3",
                "--warmup",
                "0.1",
                "--window",
                "8",
                "--batch",
                "4",
                "--connections",
                "40",
                "--idle-peers",
                "40",
                "--idle-settle",
                "0.2",
                "--settle",
                "0",
            ]
        )
        self.relay = RelayProcess(self.o.secret).start()
        self.addCleanup(self.relay.stop)

    def test_runs(self):
        t = cases.throughputRun(self.relay, self.o, 2, 0)
        self.assertTrue(t["ok"], t)
        self.assertGreater(t["received"], 100)
        self.assertEqual(t["received"], t["sent"])

        lat = cases.latencyRun(self.relay, self.o, 1, 0)
        self.assertTrue(lat["ok"], lat)
        self.assertGreater(lat["samples"], 10)
        self.assertLessEqual(lat["p50_us"], lat["p99_us"])

        hs = cases.handshakeRun(self.relay, self.o, 0)
        self.assertTrue(hs["ok"], hs)
        self.assertEqual(hs["ok_conns"], 40)

        self.assertTrue(self.relay.running())


class QuicTinyRunTests(unittest.TestCase):
    """
    One tiny run of the quic case (QUIC only, a few hundred messages) against
    a real relay process with a throwaway certificate.
    """

    timeout = 30

    def test_quicThroughput(self):
        raiseFileLimit(4096)
        o = parseArgs(
            [
                "quic",
                "--duration",
                "0.2",
                "--warmup",
                "0.1",
                "--quic-window",
                "8",
                "--quic-batch",
                "4",
            ]
        )
        cert, key = writeCertificate(os.path.abspath(self.mktemp()))
        relay = RelayProcess(
            o.secret, extra=["--tls-cert-file", cert, "--tls-key-file", key]
        ).start()
        self.addCleanup(relay.stop)
        t = cases.quicThroughputRun(relay, o, "quic", 1, 0, cert)
        self.assertTrue(t["ok"], t)
        self.assertGreater(t["received"], 50)
        self.assertLessEqual(t["received"], t["sent"])
        self.assertEqual((t["id_errors"], t["payload_errors"], t["closed_conns"]), (0, 0, 0))
        self.assertGreater(t["msgs_per_s"], 0)
        self.assertTrue(relay.running())


class QuicGoLoadTests(unittest.TestCase):
    """
    The Go load of the quic case (tests/goquic -scenario load): one tiny run
    per transport against a real relay; its figures come from the load's
    own counts and the relay's CPU time.
    """

    timeout = 120

    def setUp(self):
        try:
            self.binary = cases.buildGoLoad()
        except cases.Skip as e:
            if os.environ.get("CI"):
                raise
            raise unittest.SkipTest(str(e)) from None
        cert, key = writeCertificate(os.path.abspath(self.mktemp()))
        self.cert = cert
        self.relay = RelayProcess(
            "relay-secret", extra=["--tls-cert-file", cert, "--tls-key-file", key]
        ).start()
        self.addCleanup(self.relay.stop)
        self.o = parseArgs(
            [
                "quic",
                "--duration",
                "0.5",
                "--warmup",
                "0.2",
                "--quic-window",
                "8",
                "--quic-batch",
                "4",
            ]
        )

    def test_eachTransport(self):
        self.assertEqual(self.o.quic_size, 1179)
        for transport in ("quic", "wss"):
            for window in (8, 1):
                r = cases.quicGoRun(
                    self.relay, self.o, transport, 2, window, 0, self.cert, self.binary
                )
                self.assertTrue(r["ok"], r)
                self.assertEqual(
                    (r["load"], r["transport"], r["window"], r["failures"]),
                    ("go", transport, window, []),
                )
                self.assertGreater(r["echoed"], 50)
                self.assertEqual((r["sent"], r["lost"], r["late"]), (r["echoed"], 0, 0))
                self.assertGreater(r["msgs_per_s"], 0)
                self.assertGreater(r["relay_us_per_msg"], 0)
                self.assertLessEqual(r["p50_us"], r["p99_us"])
        self.assertTrue(self.relay.running())

    def test_plainWebSocket(self):
        """
        ws: plain WebSocket, against a relay without a certificate (the one
        with a certificate speaks only TLS on its peer port).
        """
        plain = RelayProcess("relay-secret").start()
        self.addCleanup(plain.stop)
        for window in (8, 1):
            r = cases.quicGoRun(plain, self.o, "ws", 2, window, 0, self.cert, self.binary)
            self.assertTrue(r["ok"], r)
            self.assertEqual((r["transport"], r["window"], r["failures"]), ("ws", window, []))
            self.assertGreater(r["echoed"], 50)
            self.assertEqual((r["sent"], r["lost"], r["late"]), (r["echoed"], 0, 0))
            self.assertGreater(r["relay_us_per_msg"], 0)
        self.assertTrue(plain.running())


class QuicTransportsTests(unittest.TestCase):
    """
    --quic-transports ws,wss,quic: plain WebSocket on a relay of its own,
    TLS WebSocket and QUIC on the relay with a certificate, taking turns run
    by run, and the TLS / plain ratios taken run by run.
    """

    def test_options(self):
        o = parseArgs(["quic", "--quic-transports", " ws, wss,quic"])
        self.assertEqual((o.quic_load, o.quic_transports), ("go", " ws, wss,quic"))
        for bad in (["--quic-transports", "ws,tcp"], ["--quic-transports", ","]):
            self.assertRaises(SystemExit, parseArgs, ["quic"] + bad)
        # the python load has no plain WebSocket peers
        self.assertRaises(
            SystemExit, parseArgs, ["quic", "--quic-load", "python", "--quic-transports", "ws"]
        )
        parseArgs(["quic", "--quic-load", "python", "--quic-transports", "quic,wss"])

    def test_ratios(self):
        from tests.bench.__main__ import _quicTLSRatios

        def entry(*runs):
            return {"runs": [dict(r, run=i) for i, r in enumerate(runs)]}

        ratios = _quicTLSRatios(
            {
                "ws-tput-p10-1179": entry(
                    {"ok": True, "msgs_per_s": 1000.0, "relay_us_per_msg": 5.0},
                    {"ok": True, "msgs_per_s": 800.0, "relay_us_per_msg": 4.0},
                ),
                "wss-tput-p10-1179": entry(
                    {"ok": True, "msgs_per_s": 900.0, "relay_us_per_msg": 6.0},
                    {"ok": True, "msgs_per_s": 400.0, "relay_us_per_msg": 6.0},
                ),
                "quic-tput-p10-1179": entry({"ok": True, "msgs_per_s": 1.0}),
                "wss-lat-p1-1179": entry({"ok": True, "p99_us": 300.0}),
            }
        )
        # only the wss series with a ws twin
        self.assertEqual(list(ratios), ["wss-tput-p10-1179-tls-ratio"])
        r = ratios["wss-tput-p10-1179-tls-ratio"]
        self.assertEqual(
            [(x["run"], x["msgs_per_s"], x["relay_us_per_msg"]) for x in r["runs"]],
            [(0, 0.9, 1.2), (1, 0.5, 1.5)],
        )
        self.assertEqual((r["median"]["msgs_per_s"], r["ok"]), (0.7, True))

    def test_turnsAndRelays(self):
        from tests.bench import __main__ as bench_main

        bench = bench_main.Bench(
            parseArgs(
                [
                    "quic",
                    "--runs",
                    "2",
                    "--quic-pairs",
                    "10",
                    "--quic-latency-pairs",
                    "1",
                    "--quic-transports",
                    "ws,wss,quic",
                ]
            )
        )
        self.addCleanup(shutil.rmtree, bench.logDir, True)
        events = []

        def relay(tls=False):
            events.append(("start", tls))
            return FakeRelay(tls)

        def quicRelay(cert, key):
            self.assertTrue(os.path.exists(cert) and os.path.exists(key))
            events.append(("start", True))
            return FakeRelay(True)

        def quicGoRun(target, o, transport, pairs, window, run, cafile, binary):
            events.append((transport, pairs, window, run, target.tls))
            # TLS WebSocket: 0.8 of plain's rate, 1.5 times its p99
            slow = 1 + 0.25 * (transport == "wss")
            return {
                "ok": True,
                "msgs_per_s": 1000.0 / slow,
                "p99_us": 100.0 * (1 + 0.5 * (transport == "wss")),
            }

        def quicIdleRun(target, o, peers, run, cafile, binary):
            events.append(("idle", peers, run, target.tls))
            return {"ok": True, "kib_per_peer": 23.0 + run}

        self.patch(bench_main.C, "buildGoLoad", lambda: "goquic")
        self.patch(bench_main.C, "quicGoRun", quicGoRun)
        self.patch(bench_main.C, "quicIdleRun", quicIdleRun)
        bench.relay = relay
        bench.quicRelay = quicRelay
        bench.done = lambda target: events.append(("stop", target.tls))
        bench.quic()
        turn = [
            ("ws", 10, 64, 0, False),
            ("wss", 10, 64, 0, True),
            ("quic", 10, 64, 0, True),
            ("ws", 1, 1, 0, False),
            ("wss", 1, 1, 0, True),
            ("quic", 1, 1, 0, True),
        ]
        # The idle peers' relay is started and stopped for each run.
        idle = [[("start", True), ("idle", 400, run, True), ("stop", True)] for run in (0, 1)]
        self.assertEqual(
            events,
            [("start", False), turn[0], ("start", True)]
            + turn[1:]
            + idle[0]
            + [t[:3] + (1,) + t[4:] for t in turn]
            + idle[1]
            + [("stop", False), ("stop", True)],
        )
        self.assertEqual(bench.results["quic-idle-400"]["median"]["kib_per_peer"], 23.5)
        tput = bench.results["wss-tput-p10-1179-tls-ratio"]
        lat = bench.results["wss-lat-p1-1179-tls-ratio"]
        self.assertEqual([r["msgs_per_s"] for r in tput["runs"]], [0.8, 0.8])
        self.assertEqual((lat["median"]["p99_us"], lat["ok"]), (1.5, True))
        self.assertNotIn("quic-tput-p10-1179-tls-ratio", bench.results)
        self.assertIn("wss-lat-p1-1179-tls-ratio", bench.summary())


class TLSTinyRunTests(unittest.TestCase):
    """
    One short throughput and latency run over TLS WebSocket (--tls) against
    a real relay process with a throwaway certificate: every message checked
    as over plain WebSocket.
    """

    timeout = 30

    def test_runs(self):
        raiseFileLimit(4096)
        o = parseArgs(
            [
                "--tls",
                "yes",
                "--duration",
                "0.3",
                "--warmup",
                "0.1",
                "--window",
                "8",
                "--batch",
                "4",
            ]
        )
        cert, key = writeCertificate(os.path.abspath(self.mktemp()))
        relay = RelayProcess(
            o.secret, extra=["--tls-cert-file", cert, "--tls-key-file", key]
        ).start()
        self.addCleanup(relay.stop)
        relay.tls = True
        t = cases.throughputRun(relay, o, 2, 0)
        self.assertTrue(t["ok"], t)
        self.assertGreater(t["received"], 100)
        self.assertEqual(t["received"], t["sent"])
        lat = cases.latencyRun(relay, o, 1, 0)
        self.assertTrue(lat["ok"], lat)
        self.assertGreater(lat["samples"], 10)
        self.assertTrue(relay.running())

    def test_plainLoadRefused(self):
        """
        The TLS relay does not answer a plain upgrade: the loads really
        connect over TLS when asked to.
        """
        o = parseArgs(["--tls", "yes"])
        cert, key = writeCertificate(os.path.abspath(self.mktemp()))
        relay = RelayProcess(
            o.secret, extra=["--tls-cert-file", cert, "--tls-key-file", key]
        ).start()
        self.addCleanup(relay.stop)
        from tests.bench.peers import BenchError, connectPeer

        self.assertRaises(
            (BenchError, OSError),
            connectPeer,
            relay.host,
            relay.port,
            "plain",
            wire.token(o.secret),
            timeout=2,
        )
        peer = connectPeer(relay.host, relay.port, "tls", wire.token(o.secret), tls=True)
        peer.close()

    def test_tlsNeedsARelayStartedHere(self):
        self.assertRaises(
            SystemExit,
            parseArgs,
            ["--tls", "yes", "--url", "ws://127.0.0.1:1/relay", "--secret", "x"],
        )


class TLSSocketTests(unittest.TestCase):
    """
    L{TLSSocket} hands the loads everything OpenSSL has decrypted, not one
    record per recv, and turns "would block" into C{BlockingIOError}.
    """

    def test_allPendingRecords(self):
        import ssl

        from tests.bench.peers import TLSSocket

        class FakeSSL:
            def __init__(self, records):
                self.records = records

            def recv(self, size):
                if not self.records:
                    raise ssl.SSLWantReadError()
                return self.records.pop(0)

            def pending(self):
                return len(self.records[0]) if self.records else 0

            def send(self, data):
                raise ssl.SSLWantWriteError()

        s = TLSSocket(FakeSSL([b"one", b"two", b"three"]))
        self.assertEqual(s.recv(65536), b"onetwothree")
        self.assertRaises(BlockingIOError, s.recv, 65536)
        self.assertRaises(BlockingIOError, s.send, b"x")


class InterleavedTests(unittest.TestCase):
    """
    --tls both: plain and TLS runs take turns, each variant on a relay of its
    own kept for all its runs, and the TLS / plain ratios are taken run by
    run.
    """

    def test_turnsAndRatios(self):
        from tests.bench.__main__ import Bench

        bench = Bench(parseArgs(["--tls", "both", "--runs", "3"]))
        events = []

        def relay(tls=False):
            events.append(("start", tls))
            return FakeRelay(tls)

        def runOnce(target, run):
            events.append(("run", run, target.tls))
            # TLS: half the rate and twice the p99 of plain, in run 0;
            # run 1 fails over TLS; run 2 a quarter of the rate.
            rate = 1000.0 / (1 + target.tls * (1 + 2 * (run == 2)))
            return {
                "ok": not (target.tls and run == 1),
                "msgs_per_s": rate,
                "p99_us": 100.0 * (1 + target.tls),
            }

        bench.relay = relay
        bench.done = lambda target: events.append(("stop", target.tls))
        bench.overTLSSeries("throughput-p1-10", {"pairs": 1}, runOnce)
        self.assertEqual(
            events,
            [
                ("start", False),
                ("run", 0, False),
                ("start", True),
                ("run", 0, True),
                ("run", 1, False),
                ("run", 1, True),
                ("run", 2, False),
                ("run", 2, True),
                ("stop", False),
                ("stop", True),
            ],
        )
        ratio = bench.results["throughput-p1-10-tls-ratio"]
        self.assertEqual(
            [(r["run"], r["ok"], r["msgs_per_s"], r["p99_us"]) for r in ratio["runs"]],
            [(0, True, 0.5, 2.0), (1, False, 0.5, 2.0), (2, True, 0.25, 2.0)],
        )
        self.assertEqual((ratio["median"]["msgs_per_s"], ratio["ok"]), (0.5, False))
        self.assertEqual(bench.results["throughput-p1-10-tls"]["params"], {"pairs": 1, "tls": True})
        self.assertIn("throughput-p1-10-tls-ratio", bench.summary())
