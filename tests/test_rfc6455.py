"""
The WebSocket side against an independent client: the C{websockets}
library's threaded client, run in a thread against a relay listening in
this process. Covers what the lean frame path must leave to Autobahn or get
exactly right: random masks, fragmented messages, ping/pong, close codes,
size limits.
"""

from twisted.internet import reactor, threads
from twisted.trial import unittest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from relay import messages as m
from relay.auth import TokenValidator
from relay.listener.ws import MAX_UPGRADE_REQUEST, PeerWebSocketFactory
from relay.relay import Relay
from relay.store import Store
from tests.helpers import SECRET, authMessage

A, B = m.peerID("peer-a"), m.peerID("peer-b")
TIMEOUT = 10


def closedByRelay(ws):
    """
    True if the relay closes C{ws} before sending it anything else.
    """
    try:
        ws.recv(timeout=TIMEOUT)
    except ConnectionClosed:
        return True
    return False


class IndependentClientTests(unittest.TestCase):
    timeout = 60

    def setUp(self):
        self.relay = Relay(TokenValidator(SECRET, reactor), "rel://127.0.0.1:1", reactor, Store())
        self.port = reactor.listenTCP(
            0, PeerWebSocketFactory(self.relay, reactor), interface="127.0.0.1"
        )
        self.addCleanup(self.port.stopListening)
        self.addCleanup(lambda: self.relay.shutdown())
        self.url = f"ws://127.0.0.1:{self.port.getHost().port}/relay"

    def peer(self, name):
        ws = connect(
            self.url, open_timeout=TIMEOUT, close_timeout=TIMEOUT, max_size=None, compression=None
        )
        ws.send(authMessage(name))
        assert ws.recv(timeout=TIMEOUT) == self.relay.authResponse
        return ws

    def inThread(self, scenario):
        return threads.deferToThread(scenario)

    def test_exchangeWithRandomMasks(self):
        def scenario():
            a, b = self.peer("peer-a"), self.peer("peer-b")
            for i in range(200):
                a.send(m.encodeTransport(B, b"%d" % i * 100))
            got = [b.recv(timeout=TIMEOUT) for _ in range(200)]
            a.close()
            b.close()
            return got

        def check(got):
            self.assertEqual(got, [m.encodeTransport(A, b"%d" % i * 100) for i in range(200)])

        return self.inThread(scenario).addCallback(check)

    def test_fragmentedMessage(self):
        def scenario():
            a, b = self.peer("peer-a"), self.peer("peer-b")
            message = m.encodeTransport(B, b"f" * 3000)
            a.send([message[:7], message[7:1000], message[1000:]])
            a.send(m.encodeTransport(B, b"after"))
            got = [b.recv(timeout=TIMEOUT), b.recv(timeout=TIMEOUT)]
            a.close()
            b.close()
            return got

        def check(got):
            self.assertEqual(
                got, [m.encodeTransport(A, b"f" * 3000), m.encodeTransport(A, b"after")]
            )

        return self.inThread(scenario).addCallback(check)

    def test_pingPong(self):
        def scenario():
            a, b = self.peer("peer-a"), self.peer("peer-b")
            a.send(m.encodeTransport(B, b"one"))
            answered = a.ping(b"probe").wait(TIMEOUT)
            a.send(m.encodeTransport(B, b"two"))
            got = [b.recv(timeout=TIMEOUT), b.recv(timeout=TIMEOUT)]
            a.close()
            b.close()
            return answered, got

        def check(result):
            answered, got = result
            self.assertTrue(answered)
            self.assertEqual(got, [m.encodeTransport(A, b"one"), m.encodeTransport(A, b"two")])

        return self.inThread(scenario).addCallback(check)

    def test_manyPingsAcknowledged(self):
        """
        The relay answers only the latest PING of each read (RFC 6455
        5.5.3); a client that waits for every one of many PINGs sees them
        all acknowledged.
        """

        def scenario():
            a = self.peer("peer-a")
            waiters = [a.ping(b"%d" % i) for i in range(300)]
            answered = all(w.wait(TIMEOUT) for w in waiters)
            a.close()
            return answered

        return self.inThread(scenario).addCallback(self.assertTrue)

    def test_oversizedUpgradeRequest(self):
        def scenario():
            try:
                connect(
                    self.url,
                    open_timeout=TIMEOUT,
                    additional_headers={"X-Pad": "p" * MAX_UPGRADE_REQUEST},
                )
            except InvalidStatus as e:
                return e.response.status_code
            except OSError:
                # The refusal overtook the end of the request: a reset.
                return "reset"
            return None

        def check(status):
            self.assertIn(status, (431, "reset"))
            self.assertEqual(self.relay.counters.handshakeRejects["request_too_large"], 1)

        return self.inThread(scenario).addCallback(check)

    def test_cleanClose(self):
        def scenario():
            a = self.peer("peer-a")
            a.close(1000, "bye")
            return a.close_code, a.close_reason

        return self.inThread(scenario).addCallback(self.assertEqual, (1000, ""))

    def test_oversizedMessageDropsOnlyThatPeer(self):
        def scenario():
            a, b = self.peer("peer-a"), self.peer("peer-b")
            a.send(m.encodeTransport(B, b"") + b"x" * (8821 - 38))
            closedA = closedByRelay(a)
            b.send(m.encodeTransport(B, b"self"))
            got = b.recv(timeout=TIMEOUT)
            b.close()
            return closedA, got

        def check(result):
            self.assertEqual(result, (True, m.encodeTransport(B, b"self")))
            self.assertEqual(self.relay.counters.protocolErrors["too_large"], 1)

        return self.inThread(scenario).addCallback(check)

    def test_oversizedFragmentedMessage(self):
        def scenario():
            a = self.peer("peer-a")
            try:
                # websockets ends a fragmented message with an empty final
                # frame; the relay may already have closed the connection
                # once the second fragment put the message over the limit.
                a.send([m.encodeTransport(B, b"x" * 5000), b"y" * 5000])
            except ConnectionClosed:
                return True
            return closedByRelay(a)

        return self.inThread(scenario).addCallback(self.assertTrue)

    def test_textMessageCloses(self):
        def scenario():
            a = self.peer("peer-a")
            a.send("\x01\x05")
            return closedByRelay(a)

        return self.inThread(scenario).addCallback(self.assertTrue)

    def test_noDelayOnServerSide(self):
        def scenario():
            a = self.peer("peer-a")
            return a

        def check(a):
            (session,) = self.relay.store.peers.values()
            self.assertTrue(session.link.transport.getTcpNoDelay())
            return threads.deferToThread(a.close)

        return self.inThread(scenario).addCallback(check)
