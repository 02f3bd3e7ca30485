"""
The vectors printed in docs/ are the codec's output, so the documents cannot
drift from the code.
"""

import re
from pathlib import Path

from twisted.trial import unittest

from relay import messages as m
from relay.auth import generateToken
from relay.cluster import frames

DOCS = Path(__file__).resolve().parent.parent / "docs"


def vectors(name):
    """
    The lines of the last fenced block of C{docs/name}, as C{{label: value}}.

    A value is hex, a label defined on an earlier line, or a sequence of
    both separated by spaces; human-readable values (not hex) stay strings.
    """
    text = (DOCS / name).read_text()
    block = re.findall(r"```\n(.*?)```", text, re.S)[-1]
    found = {}
    for line in block.splitlines():
        label, value = re.split(r"\s{2,}", line.strip(), maxsplit=1)
        parts = value.split()
        if all(p in found or re.fullmatch(r"([0-9a-f]{2})+", p) for p in parts):
            found[label] = b"".join(found[p] if p in found else bytes.fromhex(p) for p in parts)
        else:
            found[label] = value
    return found


class PeerProtocolVectorTests(unittest.TestCase):
    """
    docs/protocol.md.
    """

    def setUp(self):
        self.vectors = vectors("protocol.md")
        self.idA, self.idB = m.peerID("peer-a"), m.peerID("peer-b")

    def test_ids(self):
        self.assertEqual(self.vectors["id(peer-a)"], self.idA)
        self.assertEqual(self.vectors["id(peer-b)"], self.idB)
        self.assertEqual(self.vectors["human(peer-a)"], m.humanID(self.idA))

    def test_token(self):
        self.assertEqual(self.vectors["token"], generateToken("relay-secret", 1893456000))

    def test_messages(self):
        expected = {
            "auth(peer-a)": m.encodeAuth(self.idA, generateToken("relay-secret", 1893456000)),
            "authResponse(rel://127.0.0.1:33080)": m.encodeAuthResponse("rel://127.0.0.1:33080"),
            "transport(peer-b, hello)": m.encodeTransport(self.idB, b"hello"),
            "delivered(peer-a, hello)": m.encodeTransport(self.idA, b"hello"),
        }
        self.assertEqual({k: self.vectors[k] for k in expected}, expected)


class ClusterVectorTests(unittest.TestCase):
    """
    docs/cluster.md.
    """

    def setUp(self):
        self.vectors = vectors("cluster.md")
        self.idA, self.idB = m.peerID("peer-a"), m.peerID("peer-b")

    def test_ids(self):
        self.assertEqual(
            (self.vectors["id(peer-a)"], self.vectors["id(peer-b)"]), (self.idA, self.idB)
        )

    def test_frames(self):
        delivered = m.encodeTransport(self.idA, b"hello")
        expected = {
            "hello(signed)": frames.helloFrame("10.0.5.7:7090", 1893456000, "cluster-secret"),
            "hello(unsigned)": frames.helloFrame("10.0.5.7:7090", 1893456000, ""),
            "iHave(peer-a, 42)": frames.iHaveFrame(self.idA, 42),
            "fwd(peer-b, hello)": frames.fwdFrame(self.idB, delivered),
        }
        self.assertEqual({k: self.vectors[k] for k in expected}, expected)
