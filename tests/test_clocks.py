"""
Timers on monotonic time, dates on the wall clock (relay.clocks).
"""

import time

from twisted.internet.selectreactor import SelectReactor
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial import unittest

from relay import clocks
from relay import service as servicemodule
from relay.auth import AuthError, generateToken
from relay.clocks import useMonotonicTime, wallClock
from relay.cluster import frames
from relay.service import makeService
from tests.test_cluster_streams import NOW, SECRET, dialedStream, makeStreams
from tests.test_service import REQUIRED, parse


def assertNear(testCase, value, expected):
    testCase.assertTrue(abs(value - expected) < 1, f"{value} is not within 1 of {expected}")


def assertExpiryOn(testCase, relay, clock):
    """
    C{relay} judges token expiry on C{clock}: a token that expired a second
    before C{clock}'s now is refused, one that expires a minute after it is
    taken. The secret is L{REQUIRED}'s; C{clock} must be years from the
    real time (L{NOW}) for this to tell the two apart.
    """
    now = int(clock.seconds())
    relay.authenticate(generateToken("s3cret", now + 60))
    error = testCase.assertRaises(AuthError, relay.authenticate, generateToken("s3cret", now - 1))
    testCase.assertEqual(error.reason, "expired")


class WallStep:
    """
    C{time.time} that can be stepped, as an NTP step or C{date -s} does.
    """

    def __init__(self, testCase):
        self.offset = 0.0
        real = time.time
        testCase.patch(time, "time", lambda: real() + self.offset)


class MonotonicReactorTests(unittest.TestCase):
    """
    L{useMonotonicTime} on a real reactor (not the one running the tests).
    """

    def setUp(self):
        self.reactor = SelectReactor()
        self.step = WallStep(self)
        # The stock reactor reads time.time through a reference taken at
        # import; this one reads the stepped one.
        self.reactor.seconds = lambda: time.time()
        self.addCleanup(self.closeReactor)

    def closeReactor(self):
        for call in self.reactor.getDelayedCalls():
            call.cancel()

    def test_wallStepsMoveNoDeadline(self):
        """
        After the switch, a backward step of an hour or a forward one of a
        minute leaves a 10 s timer due in 10 s. (On the stock reactor the
        first puts it an hour away, the second makes it due at once.)
        """
        useMonotonicTime(self.reactor)
        self.reactor.callLater(10, lambda: None)
        for offset in (-3600, 60):
            self.step.offset = offset
            assertNear(self, self.reactor.timeout(), 10)

    def test_stockReactorFollowsTheWallClock(self):
        """
        The reason for the switch: the stock reactor's deadlines move with
        the wall clock.
        """
        self.reactor.callLater(10, lambda: None)
        self.step.offset = -3600
        self.assertGreater(self.reactor.timeout(), 3000)

    def test_scheduledCallsKeepTheirDelay(self):
        """
        Calls scheduled before the switch move onto monotonic time with the
        delay they had left.
        """
        call = self.reactor.callLater(30, lambda: None)
        useMonotonicTime(self.reactor)
        assertNear(self, call.getTime() - time.monotonic(), 30)
        self.step.offset = -3600
        assertNear(self, self.reactor.timeout(), 30)
        call.reset(5)
        assertNear(self, call.getTime() - time.monotonic(), 5)

    def test_twice(self):
        """
        A second switch changes nothing.
        """
        call = self.reactor.callLater(30, lambda: None)
        useMonotonicTime(self.reactor)
        before = call.getTime()
        useMonotonicTime(self.reactor)
        self.assertEqual(call.getTime(), before)


class WallClockTests(unittest.TestCase):
    def test_unixTime(self):
        step = WallStep(self)
        step.offset = 1000
        assertNear(self, wallClock.seconds(), time.time())


class ServiceClockTests(unittest.TestCase):
    """
    makeService with the global reactor switches it to monotonic time and
    gives every date-reader the wall clock.
    """

    def test_globalReactor(self):
        from twisted.internet import reactor

        switched = []
        self.patch(servicemodule, "useMonotonicTime", switched.append)
        # A wall clock apart from the reactor's time, to tell which one
        # judges token expiry.
        dates = Clock()
        dates.advance(NOW)
        self.patch(clocks, "wallClock", dates)
        top = makeService(parse(REQUIRED + ["--metrics-port", "0"]))
        self.assertEqual(switched, [reactor])
        self.assertIs(top.relay.clock, reactor)
        self.assertIs(top.relay.wallClock, dates)
        assertExpiryOn(self, top.relay, dates)

    def test_givenReactor(self):
        """
        Tests that pass a clock get it for dates too.
        """
        clock = Clock()
        clock.advance(NOW)
        top = makeService(parse(REQUIRED + ["--metrics-port", "0"]), reactor=clock)
        self.assertIs(top.relay.wallClock, clock)
        assertExpiryOn(self, top.relay, clock)

    def test_clusterOnWallClock(self):
        """
        The cluster transport is given the wall clock for its HELLOs.
        """
        dates = Clock()
        top = makeService(
            parse(
                REQUIRED
                + [
                    "--metrics-port",
                    "0",
                    "--cluster-headless",
                    "127.0.0.2",
                    "--pod-ip",
                    "127.0.0.1",
                ]
                + ["--cluster-auth-secret", "cluster-secret"]
            ),
            reactor=MemoryReactorClock(),
            wallClock=dates,
        )
        self.assertIs(top.cluster.streams.wallClock, dates)
        # One log budget for every line strangers cause, the fabric's too.
        self.assertIs(top.cluster.streams.noisyLog, top.relay.noisyLog)


class ClusterHelloTimeTests(unittest.TestCase):
    def test_helloStampedWithWallClock(self):
        """
        A dialed stream's HELLO carries the wall clock's unix time, not the
        reactor's (monotonic) seconds.
        """
        reactor = Clock()
        reactor.advance(5)
        dates = Clock()
        dates.advance(NOW)
        owner = makeStreams(clock=reactor, wallClock=dates)
        stream, _, _ = dialedStream(owner, "10.0.0.2:7090")
        tr = StringTransport()
        stream.makeConnection(tr)
        hello = frames.helloFrame("10.0.0.1:7090", NOW, SECRET)
        self.assertEqual(tr.value()[: len(hello)], hello)
