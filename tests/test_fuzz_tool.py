"""
The live fuzzer (tests.fuzz) against a real relay for a few seconds, its
byte-level helpers, and regressions for what it found.

The long runs (10 minutes, one relay and three pods) are manual; this keeps
the tool working and its pass criteria honest in CI.
"""

import json
import os
import random
import socket
import subprocess
import sys
import time

from twisted.trial import unittest

from tests import fuzz
from tests.bench import wire
from tests.bench.relayproc import RelayProcess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Helpers(unittest.SynchronousTestCase):
    def test_wsFrameMatchesReference(self):
        key = b"\x01\x02\x03\x04"
        for n in (0, 1, 125, 126, 65535, 65536):
            payload = bytes(range(256)) * (n // 256) + bytes(range(n % 256))
            self.assertEqual(fuzz.wsFrame(payload, key=key), wire.clientFrame(payload, key))
            self.assertEqual(fuzz.wsFrame(payload), wire.serverFrame(payload))

    def test_wsFrameNonMinimalLength(self):
        frame = fuzz.wsFrame(b"abc", lengthForm=127)
        self.assertEqual(frame, b"\x82\x7f" + (3).to_bytes(8, "big") + b"abc")
        frame = fuzz.wsFrame(b"abc", opcode=1, fin=False, rsv=5, lengthForm=126)
        self.assertEqual(frame, bytes([0x51, 126, 0, 3]) + b"abc")

    def test_mutateChangedAlwaysChanges(self):
        rng = random.Random(3)
        for _ in range(500):
            data = rng.randbytes(rng.randint(1, 20))
            self.assertNotEqual(fuzz.mutateChanged(data, rng), data)

    def test_splitRandomlyKeepsBytes(self):
        rng = random.Random(4)
        for _ in range(200):
            data = rng.randbytes(rng.randint(0, 50))
            pieces = fuzz.splitRandomly(data, rng)
            self.assertEqual(b"".join(pieces), data)
            self.assertTrue(all(pieces) or data == b"")

    def test_goodPayloadsDifferAndCarrySequence(self):
        pair = fuzz.GoodPair(reactor=None, rate=1)
        seen = set()
        for direction in (0, 1):
            for seq in range(200):
                body = pair.payload(direction, seq)
                self.assertEqual(int.from_bytes(body[:8], "big"), seq)
                self.assertLessEqual(len(body), pair.maxSize)
                seen.add(body)
        self.assertEqual(len(seen), 400)


def runFuzz(testCase, args, timeout):
    """
    Run C{python -m tests.fuzz} with C{args} (and a short warm-up and
    settle at 60 connections per second).

    @return: the finished process and its JSON summary.
    """
    command = [
        sys.executable,
        "-m",
        "tests.fuzz",
        *args,
        "--rate",
        "60",
        "--warmup",
        "1",
        "--settle",
        "2",
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, timeout=timeout)
    try:
        return done, json.loads(done.stdout)
    except ValueError:
        testCase.fail(
            f"no JSON summary (exit {done.returncode}):\n"
            f"{done.stderr.decode(errors='replace')[-3000:]}"
        )


class Smoke(unittest.SynchronousTestCase):
    """
    Five seconds of fuzz against a relay started by the tool.
    """

    def test_fiveSeconds(self):
        done, summary = runFuzz(
            self, ["--spawn", "--duration", "5", "--connections", "24", "--seed", "20261127"], 180
        )
        good = summary["good_pair"]
        self.assertGreater(min(good["sent"]), 0)
        self.assertEqual(good["received"], good["sent"])
        self.assertEqual(good["lost_in_sequence"], [0, 0])
        self.assertEqual(good["reordered"], [0, 0])
        self.assertEqual(good["corrupt"], [0, 0])
        self.assertEqual(good["disconnects"], 0)
        [relay] = summary["relays"]
        self.assertTrue(relay["running"])
        self.assertTrue(relay["accepts"])
        self.assertTrue(relay["relays_new_peer"])
        self.assertEqual(relay["exit_code"], 0)
        self.assertEqual(relay["log_tracebacks"], 0, relay["log"])
        self.assertGreater(summary["fuzz"]["connections"], 20)
        self.assertEqual(summary["fuzz"]["anomalies"], {}, summary["fuzz"]["anomaly_examples"])
        self.assertEqual(summary["fuzz"]["fuzzer_errors"], {})
        self.assertEqual(done.returncode, 0 if summary["ok"] else 1)


class ClusterSmoke(unittest.SynchronousTestCase):
    """
    A few seconds of fuzz against three pods started by the tool. Its fuzz
    pods must get past the secured handshake (a live, sealed stream that
    answers PING) and send forged frames, so the stream parser keeps being
    fuzzed after authentication; before this the tool's HELLOs came from
    made-up addresses and every one was refused.
    """

    def test_securedSessions(self):
        done, summary = runFuzz(
            self,
            ["--cluster", "--duration", "10", "--connections", "32", "--seed", "20261202"],
            240,
        )
        fuzzed = summary["fuzz"]
        self.assertEqual(fuzzed["anomalies"], {}, fuzzed["anomaly_examples"])
        self.assertEqual(fuzzed["fuzzer_errors"], {})
        self.assertGreater(fuzzed["by_scenario"].get("cluster_bad_handshake", 0), 0)
        self.assertGreater(fuzzed["fuzz_pod_sessions"], 0)
        self.assertGreater(fuzzed["fuzz_pod_sessions_secured"], fuzzed["fuzz_pod_sessions"] // 2)
        self.assertGreater(fuzzed["fuzz_pod_forged_frames"], 0)
        self.assertEqual([r["log_tracebacks"] for r in summary["relays"]], [0, 0, 0])
        self.assertEqual(summary["good_pair"]["received"], summary["good_pair"]["sent"])
        self.assertEqual(done.returncode, 0 if summary["ok"] else 1)


class SoakSmoke(unittest.SynchronousTestCase):
    """
    tests.soak at a toy size, so the tool keeps working between long runs.
    """

    def test_sixSeconds(self):
        command = [
            sys.executable,
            "-m",
            "tests.soak",
            "--peers",
            "200",
            "--pairs",
            "4",
            "--duration",
            "6",
            "--warmup",
            "2",
            "--window",
            "2",
            "--drain",
            "5",
        ]
        done = subprocess.run(command, cwd=ROOT, capture_output=True, timeout=180)
        try:
            summary = json.loads(done.stdout)
        except ValueError:
            self.fail(
                f"no JSON summary (exit {done.returncode}):\n"
                f"{done.stderr.decode(errors='replace')[-3000:]}"
            )
        self.assertEqual(summary["connect"]["authenticated"], 208)
        self.assertEqual(summary["connect"]["routed_pairs"], 4)
        loss = summary["loss"]
        self.assertGreater(loss["sent"], 0)
        self.assertEqual(loss["received"], loss["sent"])
        self.assertEqual(
            [loss[k] for k in ("lost_in_sequence", "missing_at_end", "reordered", "corrupt")],
            [0, 0, 0, 0],
        )
        self.assertEqual(summary["idle"]["closed_by_relay"], {})
        self.assertGreater(summary["latency_ms"]["start"]["n"], 0)
        self.assertEqual([r["exit_code"] for r in summary["relays"]], [0])
        self.assertEqual(done.returncode, 0 if summary["ok"] else 1)


class RefusedUpgrades(unittest.SynchronousTestCase):
    """
    Found by the fuzzer (21:28 UTC, 2026-11-27, while relay/listener/ws.py had an
    uncommitted failHandshake that called C{reason.startswith} on the None
    reason of Autobahn's ConnectionDeny): a wrong path or a foreign Origin
    got no 404 / 403 at all, only an "Unhandled error in Deferred" in the
    log, and the connection hung until the handshake timeout. Fixed in
    41cd96f; kept as a regression.
    """

    def setUp(self):
        self.relay = RelayProcess("relay-secret", name="refused-upgrades")
        self.relay.start()
        self.addCleanup(self.relay.stop)

    def request(self, path=b"/relay", extra=b""):
        host = f"{self.relay.host}:{self.relay.port}".encode()
        request = (
            b"GET " + path + b" HTTP/1.1\r\nHost: " + host + b"\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n" + extra + b"\r\n"
        )
        with socket.create_connection((self.relay.host, self.relay.port), timeout=5) as s:
            s.sendall(request)
            response = b""
            deadline = time.monotonic() + 5
            while b"\r\n\r\n" not in response and time.monotonic() < deadline:
                chunk = s.recv(4096)
                if not chunk:
                    break
                response += chunk
        return response.split(b"\r\n", 1)[0]

    def logTracebacks(self):
        self.relay.stop()
        with open(self.relay.logPath, "rb") as f:
            text = f.read()
        return text.count(b"Traceback") + text.count(b"Unhandled error")

    def test_wrongPathAnswered404(self):
        for path in (b"/", b"/relay/", b"/RELAY", b"//relay"):
            self.assertTrue(self.request(path).startswith(b"HTTP/1.1 404 "), path)
        self.assertEqual(self.logTracebacks(), 0)

    def test_foreignOriginAnswered403(self):
        for origin in (b"http://evil.example", b"null", b"::::"):
            status = self.request(extra=b"Origin: " + origin + b"\r\n")
            self.assertTrue(status.startswith(b"HTTP/1.1 403"), (origin, status))
        self.assertEqual(self.logTracebacks(), 0)
