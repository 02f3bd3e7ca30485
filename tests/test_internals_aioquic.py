"""
The aioquic internals the relay relies on (relay.internals.aioquic) are in
the installed aioquic, and the relay's QUIC code uses no other.

A failure names the library, the installed version and the missing piece:
an aioquic upgrade that moves one is seen here, not in production.
"""

import ast
import os

from aioquic import tls
from twisted.trial import unittest

import relay
from relay.internals import aioquic as internals
from tests.test_quic import A, EagerClient, _ClockedQuicBase


def _source(module):
    with open(os.path.join(os.path.dirname(relay.__file__), module)) as f:
        return f.read()


class AioquicInternalsTests(_ClockedQuicBase):
    clientClass = EagerClient

    def failMissing(self, gaps):
        if gaps:
            self.fail(
                f"{internals.LIBRARY} {internals.installedVersion()} (tested: "
                f"{internals.TESTED}) lacks what the relay relies on: {', '.join(gaps)}"
            )

    def test_presentOnLiveConnection(self):
        """
        Every attribute, function and class listed is there on an
        established server connection.
        """
        self.connected(A)
        link = self.relay.store.peers[A].link
        self.failMissing(internals.missing(link.quic))
        self.assertIsNotNone(link._lean)

    def test_missingIsReported(self):
        """
        L{internals.missing} names what a connection lacks.
        """
        self.connected(A)
        quic = self.relay.store.peers[A].link.quic
        del quic._datagrams_pending
        del quic._spaces[tls.Epoch.ONE_RTT].ack_queue
        self.assertEqual(
            internals.missing(quic),
            ["QuicConnection._datagrams_pending", "QuicPacketSpace.ack_queue"],
        )

    def test_testedVersion(self):
        """
        The installed aioquic is the tested series (pyproject pins it).
        """
        self.assertTrue(
            internals.installedVersion().startswith(internals.TESTED + "."),
            f"{internals.LIBRARY} {internals.installedVersion()} installed; the lean QUIC path "
            f"mirrors {internals.TESTED}.x "
            "(relay/listener/quiclean.py, relay/internals/aioquic.py)",
        )
        with open(
            os.path.join(os.path.dirname(os.path.dirname(relay.__file__)), "pyproject.toml")
        ) as f:
            self.assertIn(f'"aioquic>={internals.TESTED},<', f.read())


class NoUnlistedInternalsTests(unittest.TestCase):
    """
    The QUIC modules reach aioquic's private state only through names
    listed in relay.internals.aioquic.
    """

    def test_leanPath(self):
        """
        Every private attribute relay/listener/quiclean.py reads or writes on
        something other than itself is listed.
        """
        listed = (
            set(internals.CONNECTION)
            | set(internals.RECOVERY)
            | set(internals.CRYPTO_PAIR)
            | set(internals.CRYPTO_CONTEXT)
            | set(internals.HEADER_PROTECTION)
            | set(internals.RANGE_SET)
        )
        used = set()
        for node in ast.walk(ast.parse(_source("listener/quiclean.py"))):
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                if not (isinstance(node.value, ast.Name) and node.value.id == "self"):
                    used.add(node.attr)
        self.assertGreater(len(used), 20)
        self.assertEqual(used - listed, set())

    def test_quicModule(self):
        """
        relay/listener/quic.py itself reaches aioquic's private state only through
        the accessors (the client class at its end is not the relay's: it
        moves to its own module).
        """
        server = _source("listener/quic.py").split("# The client side, for tests")[0]
        direct = set()
        for node in ast.walk(ast.parse(server)):
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                value = node.value
                if (isinstance(value, ast.Attribute) and value.attr in ("quic", "tls")) or (
                    isinstance(value, ast.Name) and value.id in ("quic", "context", "pair", "space")
                ):
                    direct.add(node.attr)
        self.assertEqual(direct, set())


def unvalidate(path):
    """
    Make C{path} unvalidated, as after a migration, with the credit for the
    anti-amplification limit a path that received much has.
    """
    path.is_validated = False
    path.local_challenge_sent = False
    path.bytes_received = 1 << 20


class IdleQueueTests(_ClockedQuicBase):
    """
    L{internals.shrinkIdleQueues}: the deques aioquic keeps for rare events
    become L{internals.SmallQueue}s that behave the same for what aioquic
    does with them.
    """

    clientClass = EagerClient
    QUEUES = ("_events", "local_challenges", "remote_challenges")

    def test_aioquicKeepsDeques(self):
        """
        What is replaced is what aioquic makes: deques, the sent challenges
        bounded by C{MAX_LOCAL_CHALLENGES}.
        """
        from collections import deque

        from aioquic.quic.connection import QuicConnection, QuicNetworkPath

        path = QuicNetworkPath(("127.0.0.1", 1))
        self.assertIsInstance(path.remote_challenges, deque)
        self.assertIsInstance(path.local_challenges, deque)
        self.assertEqual(path.local_challenges.maxlen, internals.MAX_LOCAL_CHALLENGES)
        self.assertIsNotNone(internals.MAX_LOCAL_CHALLENGES)
        client = self.client(A)
        self.assertIsInstance(client.quic, QuicConnection)
        self.assertIsInstance(client.quic._events, deque)

    def test_aioquicCallsOnlyWhatSmallQueueHas(self):
        """
        aioquic calls no method on these queues but those a SmallQueue has
        as a deque has them (a new aioquic calling another fails here).
        """
        import inspect

        from aioquic.quic import connection

        called = set()
        for node in ast.walk(ast.parse(inspect.getsource(connection))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Attribute)
                and node.func.value.attr in self.QUEUES
            ):
                called.add(node.func.attr)
        self.assertEqual(called, {"append", "popleft", "clear"})

    def test_sameAsDeque(self):
        from collections import deque

        bound = internals.MAX_LOCAL_CHALLENGES
        for small, reference in (
            (internals.SmallQueue(), deque()),
            (internals._SentChallenges(), deque(maxlen=bound)),
        ):
            for i in range(3 * bound):
                small.append(i)
                reference.append(i)
                self.assertEqual(list(small), list(reference))
                self.assertEqual(
                    (len(small), small[0], i in small),
                    (len(reference), reference[0], i in reference),
                )
                if i % 3 == 2:
                    self.assertEqual(small.popleft(), reference.popleft())
            small.clear()
            self.assertFalse(small)
            self.assertRaises(IndexError, small.popleft)

    def test_pathChallengesBothWays(self):
        """
        After the swap a PATH_CHALLENGE from the client is answered, and
        one from the relay is matched to the client's PATH_RESPONSE.
        """
        a = self.connected(A)
        link = self.relay.store.peers[A].link
        [path] = link.quic._network_paths
        self.assertIsInstance(link.quic._events, internals.SmallQueue)
        self.assertIsInstance(path.remote_challenges, internals.SmallQueue)
        self.assertIsInstance(path.local_challenges, internals._SentChallenges)
        [clientPath] = a.quic._network_paths
        unvalidate(clientPath)
        a.send(A, b"probe")
        self.network.pump()
        self.assertTrue(clientPath.is_validated)
        self.assertEqual(list(path.remote_challenges), [])
        unvalidate(path)
        a.send(A, b"again")
        self.network.pump()
        self.assertTrue(path.is_validated)
        self.assertEqual(list(path.local_challenges), [])
        self.assertEqual(
            [self.successResultOf(a.transports.get()) for _ in range(2)],
            [(A, b"probe"), (A, b"again")],
        )
