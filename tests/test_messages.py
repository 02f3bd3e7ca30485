"""
Peer protocol v1 codec, against the test vectors of PROTOCOL.md section 4.
"""

from twisted.trial import unittest

from relay import messages as m
from relay.auth import generateToken

ID_A = bytes.fromhex("7368612dbdb94c73d53c44023a715a2970a10c4d54fa9550b70fd9d34cc4b0a2de5ddcbe")
TOKEN = bytes.fromhex(
    "01171b78c230f8924ea423b2db791f90effa360b02a58889d318e4aba5bdfb2eff31383933343536303030"
)


class VectorTests(unittest.TestCase):
    def test_peerID(self):
        self.assertEqual(m.peerID("peer-a"), ID_A)

    def test_humanID(self):
        self.assertEqual(m.humanID(ID_A), "sha-vblMc9U8RAI6cVopcKEMTVT6lVC3D9nTTMSwot5d3L4=")

    def test_humanIDOfGarbage(self):
        self.assertEqual(m.humanID(b"\x00\xff"), "invalid:00ff")


class HumanIDTests(unittest.TestCase):
    """
    L{m.humanID} is how the peer side and the cluster fabric both put ids
    that strangers chose into log lines.
    """

    def test_controlCharacters(self):
        """
        A 36-byte id with the right prefix is base64 (which has no control
        characters whatever the digest); without the prefix it is hex, so a
        newline or a terminal escape never reaches a log line.
        """
        hostile = b"\n\r\x1b[31m\x00" + b"\x7f" * 28
        self.assertEqual(len(hostile), m.ID_SIZE)
        self.assertEqual(m.humanID(hostile), "invalid:" + hostile.hex())
        self.assertEqual(m.humanID(b"sha-" + b"\n" * 32), "sha-" + "CgoK" * 10 + "Cgo=")

    def test_overLong(self):
        """
        However long the input, the form is at most 8 + 72 characters: the
        hex of its first 36 bytes.
        """
        self.assertEqual(m.humanID(ID_A + b"\n" * 1_000_000), "invalid:" + ID_A.hex())
        self.assertEqual(m.humanID(b"x" * 37), "invalid:" + (b"x" * 36).hex())

    def test_shortAndEmpty(self):
        self.assertEqual(m.humanID(b""), "invalid:")
        self.assertEqual(m.humanID(b"sha-"), "invalid:" + b"sha-".hex())
        self.assertEqual(m.humanID(ID_A[:-1]), "invalid:" + ID_A[:-1].hex())

    def test_bytesLike(self):
        """
        Ids cut out of a buffer (memoryview, bytearray) get the same form.
        """
        expected = m.humanID(ID_A)
        self.assertEqual(m.humanID(memoryview(b"..." + ID_A)[3:]), expected)
        self.assertEqual(m.humanID(bytearray(ID_A)), expected)
        self.assertEqual(m.humanID(memoryview(b"\n" * 40)), "invalid:" + "0a" * 36)

    def test_token(self):
        self.assertEqual(generateToken("relay-secret", 1893456000), TOKEN)

    def test_auth(self):
        message = m.encodeAuth(ID_A, TOKEN)
        self.assertEqual(message, bytes.fromhex("01062112a442") + ID_A + TOKEN)
        self.assertEqual(len(message), 85)
        self.assertEqual(m.decodeAuth(message), (ID_A, TOKEN))

    def test_authResponse(self):
        message = m.encodeAuthResponse("rel://127.0.0.1:33080")
        self.assertEqual(message, bytes.fromhex("010772656c3a2f2f3132372e302e302e313a3333303830"))
        self.assertEqual(m.decodeAuthResponse(message), "rel://127.0.0.1:33080")

    def test_transport(self):
        idB = m.peerID("peer-b")
        sent = m.encodeTransport(idB, b"hello")
        self.assertEqual(sent, bytes.fromhex("0103") + idB + b"hello")
        self.assertEqual(
            m.encodeTransport(ID_A, b"hello"),
            bytes.fromhex("0103") + ID_A + bytes.fromhex("68656c6c6f"),
        )
        self.assertEqual(m.decodeTransport(sent), (idB, b"hello"))


class HeaderTests(unittest.TestCase):
    def test_clientTypes(self):
        for kind in (1, 3, 4, 5, 6, 8, 9):
            self.assertEqual(m.messageType(bytes((1, kind))), kind)

    def test_serverOnlyTypes(self):
        for kind in (0, 2, 7, 10, 11, 12, 255):
            e = self.assertRaises(m.MessageError, m.messageType, bytes((1, kind)))
            self.assertEqual(e.reason, "bad_type")

    def test_badVersion(self):
        e = self.assertRaises(m.MessageError, m.messageType, b"\x02\x03")
        self.assertEqual(e.reason, "bad_version")

    def test_short(self):
        for message in (b"", b"\x01"):
            e = self.assertRaises(m.MessageError, m.messageType, message)
            self.assertEqual(e.reason, "malformed")

    def test_authShort(self):
        e = self.assertRaises(
            m.MessageError, m.decodeAuth, bytes.fromhex("01062112a442") + ID_A[:35]
        )
        self.assertEqual(e.reason, "malformed")

    def test_authBadMagic(self):
        e = self.assertRaises(
            m.MessageError, m.decodeAuth, bytes.fromhex("01062112a443") + ID_A + TOKEN
        )
        self.assertEqual(e.reason, "bad_magic")

    def test_transportShort(self):
        self.assertRaises(m.MessageError, m.decodeTransport, b"\x01\x03" + ID_A[:35])

    def test_transportTooLarge(self):
        m.encodeTransport(ID_A, b"x" * (8820 - 38))
        e = self.assertRaises(m.MessageError, m.encodeTransport, ID_A, b"x" * (8820 - 37))
        self.assertEqual(e.reason, "too_large")

    def test_authResponseTooLarge(self):
        self.assertRaises(m.MessageError, m.encodeAuthResponse, "rel://" + "a" * 8190)


class IDListTests(unittest.TestCase):
    def ids(self, count):
        return [m.peerID(f"peer-{i}") for i in range(count)]

    def test_empty(self):
        self.assertEqual(m.encodeIDList(m.PEERS_ONLINE, []), [])

    def test_one(self):
        self.assertEqual(m.encodeIDList(m.PEERS_ONLINE, [ID_A]), [b"\x01\x0a" + ID_A])

    def test_chunking(self):
        ids = self.ids(489)
        messages = m.encodeIDList(m.PEERS_WENT_OFFLINE, ids)
        self.assertEqual([len(x) for x in messages], [2 + 244 * 36, 2 + 244 * 36, 2 + 36])
        self.assertEqual(len(messages[0]), 8786)
        self.assertTrue(all(x[:2] == b"\x01\x0b" for x in messages))
        self.assertEqual(sum((m.decodeIDList(x) for x in messages), []), ids)

    def test_chunkingToFit(self):
        """
        A smaller message size (a QUIC datagram's 1415 bytes) gives smaller
        messages; the bound is inclusive; at least one id per message.
        """
        ids = self.ids(100)
        messages = m.encodeIDList(m.PEERS_ONLINE, ids, 1415)
        self.assertEqual([len(x) for x in messages], [2 + 39 * 36, 2 + 39 * 36, 2 + 22 * 36])
        self.assertEqual(sum((m.decodeIDList(x) for x in messages), []), ids)
        self.assertEqual(
            [len(x) for x in m.encodeIDList(m.PEERS_ONLINE, ids[:3], 2 + 36 * 2)], [74, 38]
        )
        self.assertEqual([len(x) for x in m.encodeIDList(m.PEERS_ONLINE, ids[:2], 10)], [38, 38])
        self.assertEqual(len(m.encodeIDList(m.PEERS_ONLINE, self.ids(489), 100000)[0]), 8786)

    def test_maxFits(self):
        self.assertLessEqual(2 + m.MAX_IDS_PER_MESSAGE * m.ID_SIZE, m.MAX_MESSAGE_SIZE)

    def test_malformed(self):
        e = self.assertRaises(m.MessageError, m.decodeIDList, b"\x01\x08" + ID_A + b"x")
        self.assertEqual(e.reason, "malformed")

    def test_badID(self):
        self.assertRaises(m.MessageError, m.encodeIDList, m.PEERS_ONLINE, [b"short"])
