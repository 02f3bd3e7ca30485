"""
The log budget covers every line a stranger can cause: the relay's own,
Autobahn's, Twisted's accept loop's (EMFILE) and the WebSocket close line.
A flood makes a bounded number of lines, and every event is still counted.
"""

import io

from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial import unittest

from relay.limits import LogBudget
from relay.listener.ws import PeerWebSocketFactory
from relay.logfilter import EMFILE_CLOSED, StrangerLines
from relay.service import makeLogObserver
from tests.helpers import authMessage, makeRelay
from tests.test_listener_ws import Peer
from tests.test_service import REQUIRED, config

FLOOD = 500


class LogCapture:
    """
    The relay's log observer, as twistd installs it, writing to a string.
    """

    def __init__(self, testCase, relay, argv=()):
        self.stream = io.StringIO()
        observer = makeLogObserver(
            config(REQUIRED + list(argv)),
            self.stream,
            budget=relay.noisyLog,
            counters=relay.counters,
        )
        globalLogPublisher.addObserver(observer)
        testCase.addCleanup(globalLogPublisher.removeObserver, observer)

    @property
    def lines(self):
        return self.stream.getvalue().splitlines()


class StrangerLinesTests(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.budget = LogBudget(self.clock, burst=50, window=10.0)
        self.lines = []

        from relay.counters import RelayCounters

        self.counters = RelayCounters()
        stranger = StrangerLines(self.budget, self.counters)
        self.predicates = [stranger.count, stranger]

    def emit(self, namespace, fmt="x", level=LogLevel.info):
        from twisted.logger import FilteringLogObserver, LogLevelFilterPredicate

        observer = FilteringLogObserver(
            self.lines.append,
            [
                self.predicates[0],
                LogLevelFilterPredicate(defaultLogLevel=self.level),
                self.predicates[1],
            ],
        )
        Logger(namespace=namespace, observer=observer).emit(level, fmt, address=("192.0.2.1", 1))

    level = LogLevel.info

    def test_autobahnFlood(self):
        for _ in range(FLOOD):
            self.emit("autobahn.websocket.protocol.WebSocketProtocol")
        self.assertEqual(len(self.lines), 50)
        self.assertEqual(self.budget.suppressed, FLOOD - 50)

    def test_ownLinesPass(self):
        """
        Lines of other namespaces are not this predicate's business (the
        relay's own noisy lines call the budget themselves).
        """
        for _ in range(FLOOD):
            self.emit("relay.relay.Relay")
        self.assertEqual(len(self.lines), FLOOD)
        self.assertEqual(self.budget.suppressed, 0)

    def test_emfileFloodCounted(self):
        """
        Twisted's EMFILE recovery lines are budgeted, and each connection
        it closed counts, even when info lines are not logged at all.
        """
        for _ in range(FLOOD):
            self.emit(
                "twisted.internet.tcp.Port",
                "EMFILE encountered; releasing reserved file descriptor.",
            )
            self.emit("twisted.internet.tcp.Port", EMFILE_CLOSED)
        self.assertEqual(len(self.lines), 50)
        self.assertEqual(self.budget.suppressed, 2 * FLOOD - 50)
        self.assertEqual(self.counters.handshakeRejects["no_descriptors"], FLOOD)
        self.level = LogLevel.warn
        self.emit("twisted.internet.tcp.Port", EMFILE_CLOSED)
        self.assertEqual(self.counters.handshakeRejects["no_descriptors"], FLOOD + 1)
        self.assertEqual(len(self.lines), 50)


class _Peer(Peer):
    def lost(self, reason=None):
        """
        The TCP connection ends (StringTransport never says so itself).
        """
        self.protocol.connectionLost(Failure(reason or ConnectionLost()))


class PeerFloodTests(unittest.TestCase):
    """
    Floods against the WebSocket factory, through the relay's log observer.
    """

    def setUp(self):
        self.clock = Clock()
        self.relay = makeRelay(self.clock)
        self.factory = PeerWebSocketFactory(self.relay, self.clock)
        self.ports = iter(range(40000, 60000))
        self.log = LogCapture(self, self.relay)

    def peer(self):
        return _Peer(self.factory, next(self.ports))

    def test_badUpgradeFlood(self):
        """
        Upgrade requests Autobahn refuses (here: no Upgrade header) make
        Autobahn lines, within the budget.
        """
        for _ in range(FLOOD):
            peer = self.peer()
            self.assertIn(b"400", peer.upgrade(extra="Sec-WebSocket-Version: 99\r\n"))
            peer.lost()
        self.assertTrue(
            any("failing WebSocket opening handshake" in line for line in self.log.lines),
            self.log.lines[:3],
        )
        self.assertLessEqual(len(self.log.lines), 50)
        self.assertGreaterEqual(self.relay.noisyLog.suppressed, FLOOD - 50)
        suppressed = self.relay.noisyLog.suppressed
        self.clock.advance(10)
        self.assertIn(
            f"{suppressed} more lines about refused or ignored traffic were not logged",
            self.log.lines[-1],
        )

    def test_closeLineFlood(self):
        """
        Close frames with a code and 123 bytes of text make at most the
        budget's lines, the text escaped and cut.
        """
        reason = "\n\x1b[2Jevil " + "x" * 111
        for _ in range(FLOOD):
            peer = self.peer()
            self.assertIn(b"101", peer.upgrade())
            peer.send((4000).to_bytes(2, "big") + reason.encode(), opcode=8)
            peer.lost(ConnectionDone())
        self.assertEqual(len(self.log.lines), 50)
        self.assertTrue(all("WebSocket closed with code 4000" in line for line in self.log.lines))
        self.assertIn(
            r"WebSocket closed with code 4000: '\n\x1b[2Jevil " + "x" * 90 + "'...",
            self.log.lines[0],
        )
        self.assertEqual(self.relay.noisyLog.suppressed, FLOOD - 50)

    def test_authenticatedCloseLineFlood(self):
        """
        An authenticated agent's Close is under the budget too (its
        "connected" lines are not: one per agent, as the Go relay logs).
        """
        reason = "bye " * 30
        for i in range(FLOOD):
            peer = self.peer()
            self.assertIn(b"101", peer.upgrade())
            peer.send(authMessage(f"peer-{i}"))
            peer.send((4001).to_bytes(2, "big") + reason.encode(), opcode=8)
            peer.lost(ConnectionDone())
        closes = [line for line in self.log.lines if "WebSocket closed with code 4001" in line]
        self.assertEqual(
            len([line for line in self.log.lines if line.endswith(": connected")]), FLOOD
        )
        self.assertEqual(len(closes), 50)
        self.assertEqual(self.relay.noisyLog.suppressed, FLOOD - 50)

    def test_agentLeavingIsNotBudgeted(self):
        """
        An authenticated agent whose TCP connection just went away (1006) is
        logged every time, outside the budget.
        """
        for i in range(FLOOD // 5):
            peer = self.peer()
            self.assertIn(b"101", peer.upgrade())
            peer.send(authMessage(f"peer-{i}"))
            peer.lost()
        self.assertEqual(
            len([line for line in self.log.lines if "WebSocket closed with code 1006" in line]),
            FLOOD // 5,
        )
        self.assertEqual(self.relay.noisyLog.suppressed, 0)
