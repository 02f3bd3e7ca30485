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
