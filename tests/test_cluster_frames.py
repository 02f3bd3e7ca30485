"""
Tests for L{relay.cluster.frames}: the PROTOCOL.md section 4 vectors byte for
byte, reassembly at every split, every HELLO rejection reason, and malformed
payloads.
"""

import hashlib
import hmac
import struct

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from relay.cluster import frames
from relay.messages import peerID
from tests.helpers import hypothesisProfile

PEER_A = bytes.fromhex("7368612dbdb94c73d53c44023a715a2970a10c4d54fa9550b70fd9d34cc4b0a2de5ddcbe")
PEER_B = peerID("peer-b")
HELLO_SIGNED = bytes.fromhex(
    "000038020d31302e302e352e373a373039300000000070dbd880201bee1d331b5b7c7437589964feb412360caba9"
    "c354c2a163d5c401ba76aa0a27"
)
HELLO_UNSIGNED = bytes.fromhex("000018020d31302e302e352e373a373039300000000070dbd88000")
TS = 1893456000
TRANSPORT_AS_DELIVERED = b"\x01\x03" + PEER_A + b"hello"


def buffered(reader):
    """
    How many bytes of an incomplete frame C{reader} holds.
    """
    return len(reader._buffer)


class VectorTests(SynchronousTestCase):
    def test_helloSigned(self):
        self.assertEqual(frames.helloFrame("10.0.5.7:7090", TS, "cluster-secret"), HELLO_SIGNED)
        self.assertEqual(frames.helloFrame("10.0.5.7:7090", TS, b"cluster-secret"), HELLO_SIGNED)

    def test_helloUnsigned(self):
        self.assertEqual(frames.helloFrame("10.0.5.7:7090", TS, ""), HELLO_UNSIGNED)
        self.assertEqual(frames.helloFrame("10.0.5.7:7090", TS, None), HELLO_UNSIGNED)

    def test_iHave(self):
        self.assertEqual(
            frames.iHaveFrame(PEER_A, 42),
            bytes.fromhex("020028") + PEER_A + bytes.fromhex("0000002a"),
        )

    def test_fwd(self):
        expected = (
            bytes.fromhex("14004f")
            + PEER_B
            + bytes.fromhex("0103")
            + PEER_A
            + bytes.fromhex("68656c6c6f")
        )
        self.assertEqual(frames.fwdFrame(PEER_B, TRANSPORT_AS_DELIVERED), expected)

    def test_decodeVectors(self):
        [(t, payload)] = frames.FrameReader().feed(HELLO_SIGNED)
        self.assertEqual(t, frames.HELLO)
        hello = frames.decodeHello(payload, "cluster-secret", TS)
        self.assertEqual(hello, frames.Hello("10.0.5.7:7090", TS, True))
        [(t, payload)] = frames.FrameReader().feed(HELLO_UNSIGNED)
        self.assertEqual(
            frames.decodeHello(payload, "", TS), frames.Hello("10.0.5.7:7090", TS, False)
        )
        [(t, payload)] = frames.FrameReader().feed(frames.iHaveFrame(PEER_A, 42))
        self.assertEqual(frames.decodePayload(t, payload), frames.IHave(PEER_A, 42))
        [(t, payload)] = frames.FrameReader().feed(frames.fwdFrame(PEER_B, TRANSPORT_AS_DELIVERED))
        self.assertEqual(
            frames.decodePayload(t, payload), frames.Fwd(PEER_B, TRANSPORT_AS_DELIVERED)
        )

    def test_otherFrames(self):
        self.assertEqual(frames.whoHasFrame(PEER_A), b"\x01\x00\x24" + PEER_A)
        self.assertEqual(frames.peerGoneFrame(PEER_A), b"\x03\x00\x24" + PEER_A)
        self.assertEqual(frames.pingFrame(), b"\x20\x00\x00")
        self.assertEqual(frames.pongFrame(), b"\x21\x00\x00")
        self.assertEqual(frames.decodePayload(frames.WHO_HAS, PEER_A), frames.WhoHas(PEER_A))
        self.assertEqual(frames.decodePayload(frames.PEER_GONE, PEER_A), frames.PeerGone(PEER_A))
        self.assertEqual(frames.decodePayload(frames.PING, b""), frames.Ping())
        self.assertEqual(frames.decodePayload(frames.PONG, b""), frames.Pong())

    def test_seqnoWraps(self):
        self.assertEqual(frames.iHaveFrame(PEER_A, 2**32 + 5)[-4:], b"\x00\x00\x00\x05")
        self.assertEqual(
            frames.decodePayload(frames.I_HAVE, PEER_A + b"\xff\xff\xff\xff").seqno, 2**32 - 1
        )


class FrameReaderTests(SynchronousTestCase):
    def test_everySplit(self):
        """
        Three frames split at every pair of boundaries come out whole and in
        order.
        """
        stream = HELLO_SIGNED + frames.pingFrame() + frames.fwdFrame(PEER_B, TRANSPORT_AS_DELIVERED)
        expected = [
            (frames.HELLO, HELLO_SIGNED[3:]),
            (frames.PING, b""),
            (frames.FWD, PEER_B + TRANSPORT_AS_DELIVERED),
        ]
        for i in range(len(stream) + 1):
            for j in range(i, len(stream) + 1, 7):
                reader = frames.FrameReader()
                out = reader.feed(stream[:i]) + reader.feed(stream[i:j]) + reader.feed(stream[j:])
                self.assertEqual(out, expected)
                self.assertEqual(buffered(reader), 0)

    def test_byteByByte(self):
        stream = frames.iHaveFrame(PEER_A, 1) * 3
        reader = frames.FrameReader()
        out = []
        for i in range(len(stream)):
            out += reader.feed(stream[i : i + 1])
        self.assertEqual(out, [(frames.I_HAVE, PEER_A + b"\x00\x00\x00\x01")] * 3)

    def test_largestFrame(self):
        payload = b"x" * frames.MAX_PAYLOAD
        data = frames.encodeFrame(0x7F, payload)
        self.assertEqual(data[:3], b"\x7f\xff\xff")
        reader = frames.FrameReader()
        self.assertEqual(reader.feed(data[:-1]), [])
        self.assertEqual(buffered(reader), 3 + frames.MAX_PAYLOAD - 1)
        self.assertEqual(reader.feed(data[-1:]), [(0x7F, payload)])

    def test_tooLarge(self):
        e = self.assertRaises(frames.FrameError, frames.encodeFrame, frames.FWD, b"x" * 65536)
        self.assertEqual(e.reason, frames.MALFORMED)

    def test_nextHeader(self):
        reader = frames.FrameReader()
        self.assertIsNone(reader.nextHeader())
        reader.feed(b"\x02\x00")
        self.assertIsNone(reader.nextHeader())
        reader.feed(b"\x28")
        self.assertEqual(reader.nextHeader(), (frames.I_HAVE, 40))

    def test_emptyPayload(self):
        self.assertEqual(frames.FrameReader().feed(b"\x20\x00\x00\x21\x00"), [(frames.PING, b"")])


def _hello(
    address=b"10.0.5.7:7090", ts=TS, secret=b"", version=2, hmacLen=None, sig=None, addrLen=None
):
    body = (
        bytes((version, len(address) if addrLen is None else addrLen))
        + address
        + struct.pack(">Q", ts)
    )
    if sig is None and secret:
        sig = hmac.new(secret, body, hashlib.sha256).digest()
    sig = sig or b""
    return body + bytes((len(sig) if hmacLen is None else hmacLen,)) + sig


class HelloTests(SynchronousTestCase):
    def assertRejected(self, payload, secret, now, reason):
        e = self.assertRaises(frames.FrameError, frames.decodeHello, payload, secret, now)
        self.assertEqual(e.reason, reason)
        return e

    def test_roundTrip(self):
        payload = frames.encodeHello("[fd00::1]:7090", TS, "s")
        self.assertEqual(
            frames.decodeHello(payload, "s", TS), frames.Hello("[fd00::1]:7090", TS, True)
        )

    def test_secretAsGiven(self):
        """
        The HMAC key is the cluster secret itself, not a hash of it.
        """
        self.assertEqual(
            frames.decodeHello(_hello(secret=b"cluster-secret"), "cluster-secret", TS).signed, True
        )
        hashed = hashlib.sha256(b"cluster-secret").digest()
        self.assertRejected(_hello(secret=hashed), "cluster-secret", TS, frames.HMAC_MISMATCH)

    def test_hmacMismatch(self):
        self.assertRejected(
            _hello(secret=b"other-secret"), "cluster-secret", TS, frames.HMAC_MISMATCH
        )
        tampered = bytearray(HELLO_SIGNED[3:])
        tampered[5] ^= 1
        self.assertRejected(bytes(tampered), "cluster-secret", TS, frames.HMAC_MISMATCH)

    def test_unsignedButRequired(self):
        self.assertRejected(HELLO_UNSIGNED[3:], "cluster-secret", TS, frames.UNSIGNED_BUT_REQUIRED)

    def test_signedButUnsupported(self):
        self.assertRejected(HELLO_SIGNED[3:], "", TS, frames.SIGNED_BUT_UNSUPPORTED)
        self.assertRejected(HELLO_SIGNED[3:], None, TS, frames.SIGNED_BUT_UNSUPPORTED)

    def test_window(self):
        """
        Exactly 5 minutes off either way is accepted; one second more is stale.
        """
        for now in (TS - 300, TS + 300, TS + 300.0):
            frames.decodeHello(HELLO_SIGNED[3:], "cluster-secret", now)
            frames.decodeHello(HELLO_UNSIGNED[3:], "", now)
        for now in (TS - 301, TS + 301, TS + 300.5, 0):
            self.assertRejected(HELLO_SIGNED[3:], "cluster-secret", now, frames.STALE_TIMESTAMP)
            self.assertRejected(HELLO_UNSIGNED[3:], "", now, frames.STALE_TIMESTAMP)

    def test_authenticationBeforeTimestamp(self):
        """
        A forged HELLO is counted as a forgery even when also stale.
        """
        self.assertRejected(
            _hello(secret=b"wrong", ts=5), "cluster-secret", TS, frames.HMAC_MISMATCH
        )

    def test_malformed(self):
        good = _hello()
        cases = [
            b"",
            b"\x02",
            good[:-1],
            good + b"\x00",
            _hello(version=1),
            _hello(version=3),
            _hello(address=b""),
            _hello(addrLen=200),
            _hello(addrLen=3),
            _hello(sig=b"x" * 16),
            _hello(sig=b"x" * 32, hmacLen=31),
            _hello(secret=b"s")[:-1],
            _hello(address=b"\xff\xfe:1"),
        ]
        for payload in cases:
            for secret in ("", "s"):
                self.assertRejected(payload, secret, TS, frames.MALFORMED)

    def test_encodeBadAddress(self):
        self.assertRaises(frames.FrameError, frames.encodeHello, "", TS, "")
        self.assertRaises(frames.FrameError, frames.encodeHello, "x" * 256, TS, "")
        self.assertEqual(len(frames.encodeHello("x" * 255, TS, "")), 2 + 255 + 8 + 1)


class PayloadTests(SynchronousTestCase):
    def assertMalformed(self, frameType, payload):
        e = self.assertRaises(frames.FrameError, frames.decodePayload, frameType, payload)
        self.assertEqual(e.reason, frames.MALFORMED)

    def test_wrongLengths(self):
        for size in (0, 35, 37, 40):
            self.assertMalformed(frames.WHO_HAS, b"x" * size)
            self.assertMalformed(frames.PEER_GONE, b"x" * size)
        for size in (0, 36, 39, 41):
            self.assertMalformed(frames.I_HAVE, b"x" * size)
        for size in (0, 1, 35):
            self.assertMalformed(frames.FWD, b"x" * size)
        self.assertMalformed(frames.PING, b"x")
        self.assertMalformed(frames.PONG, b"x")

    def test_fwdJustAnID(self):
        self.assertEqual(frames.decodePayload(frames.FWD, PEER_B), frames.Fwd(PEER_B, b""))

    def test_unknownTypes(self):
        """
        Unknown and reserved types decode to L{frames.Unknown}, whatever the
        payload; HELLO is not decoded here.
        """
        for frameType in (0x04, 0x10, 0x11, 0x12, 0x13, 0x15, 0x22, 0xFF, frames.HELLO):
            self.assertEqual(
                frames.decodePayload(frameType, b"\x00abc"), frames.Unknown(frameType, b"\x00abc")
            )

    def test_badIDOnEncode(self):
        self.assertRaises(frames.FrameError, frames.whoHasFrame, b"short")
        self.assertRaises(frames.FrameError, frames.fwdFrame, b"short", b"")

    def test_isTransportMessage(self):
        self.assertTrue(frames.isTransportMessage(TRANSPORT_AS_DELIVERED))
        self.assertTrue(frames.isTransportMessage(b"\x01\x03" + PEER_A))
        self.assertFalse(frames.isTransportMessage(b"\x01\x03" + PEER_A[:-1]))
        self.assertFalse(frames.isTransportMessage(b"\x01\x04" + PEER_A))
        self.assertFalse(frames.isTransportMessage(b""))

    def test_frameError(self):
        e = frames.FrameError(frames.MALFORMED, "why")
        self.assertEqual(str(e), "malformed: why")
        self.assertEqual(str(frames.FrameError(frames.TIMEOUT)), "timeout")


class PropertyTests(SynchronousTestCase):
    """
    Decoders raise L{frames.FrameError} and nothing else, whatever the bytes;
    reassembly does not depend on how the bytes are split.
    """

    @hypothesisProfile(examples=300)
    @given(
        st.binary(max_size=400), st.sampled_from(["", "cluster-secret"]), st.integers(0, 2**64 - 1)
    )
    def test_decodeHelloOnlyFrameError(self, payload, secret, now):
        try:
            hello = frames.decodeHello(payload, secret, now)
        except frames.FrameError as e:
            self.assertIn(e.reason, _HELLO_REASONS)
        else:
            self.assertEqual(frames.encodeHello(hello.address, hello.timestamp, secret), payload)

    @hypothesisProfile(examples=300)
    @given(st.integers(0, 255), st.binary(max_size=100))
    def test_decodePayloadOnlyFrameError(self, frameType, payload):
        try:
            frames.decodePayload(frameType, payload)
        except frames.FrameError as e:
            self.assertEqual(e.reason, frames.MALFORMED)

    @hypothesisProfile()
    @given(
        st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=300)), max_size=8),
        st.lists(st.integers(0, 3000), max_size=10),
    )
    def test_anySplit(self, frameList, cuts):
        data = b"".join(frames.encodeFrame(t, p) for t, p in frameList)
        reader = frames.FrameReader()
        out = []
        previous = 0
        for cut in sorted(c for c in cuts if c <= len(data)) + [len(data)]:
            out += reader.feed(data[previous:cut])
            previous = cut
        self.assertEqual(out, frameList)
        self.assertEqual(buffered(reader), 0)


_HELLO_REASONS = {
    frames.HMAC_MISMATCH,
    frames.UNSIGNED_BUT_REQUIRED,
    frames.SIGNED_BUT_UNSUPPORTED,
    frames.STALE_TIMESTAMP,
    frames.MALFORMED,
}


class SecuredHandshakeTests(SynchronousTestCase):
    """
    The secured handshake (v3) codecs, its keys and sealed frames.
    """

    def setUp(self):
        self.hello = frames.encodeHello("10.0.0.2:7090", TS, "cluster-secret")
        self.handshake = frames.Handshake("cluster-secret", self.hello, b"\x01" * 32, b"\x02" * 32)

    def test_codecs(self):
        self.assertEqual(frames.challengeFrame(b"\x01" * 32), b"\x04\x00\x21\x03" + b"\x01" * 32)
        self.assertEqual(frames.decodeChallenge(b"\x03" + b"\x01" * 32), b"\x01" * 32)
        self.assertEqual(
            frames.authFrame(b"\x01" * 32, b"\x02" * 32),
            b"\x05\x00\x40" + b"\x01" * 32 + b"\x02" * 32,
        )
        self.assertEqual(
            frames.decodeAuth(b"\x01" * 32 + b"\x02" * 32), (b"\x01" * 32, b"\x02" * 32)
        )
        self.assertEqual(frames.confirmFrame(b"\x02" * 32), b"\x06\x00\x20" + b"\x02" * 32)
        self.assertEqual(frames.decodeConfirm(b"\x02" * 32), b"\x02" * 32)
        for bad in (b"", b"\x02" + b"\x01" * 32, b"\x03" + b"\x01" * 31):
            self.assertRaises(frames.FrameError, frames.decodeChallenge, bad)
        self.assertRaises(frames.FrameError, frames.decodeAuth, b"\x01" * 63)
        self.assertRaises(frames.FrameError, frames.decodeConfirm, b"\x01" * 33)
        self.assertRaises(frames.FrameError, frames.challengeFrame, b"\x01" * 31)

    def test_keysBindEverything(self):
        """
        Another secret, HELLO or nonce of either side gives other proofs and
        keys; the four values of one handshake differ from each other and
        from the HELLO's own HMAC.
        """
        h = self.handshake
        values = {h.acceptorMAC, h.dialerMAC, h.dialerKey, h.acceptorKey, self.hello[-32:]}
        self.assertEqual(len(values), 5)
        for other in (
            frames.Handshake("another", self.hello, b"\x01" * 32, b"\x02" * 32),
            frames.Handshake(
                "cluster-secret",
                frames.encodeHello("10.0.0.9:7090", TS, "cluster-secret"),
                b"\x01" * 32,
                b"\x02" * 32,
            ),
            frames.Handshake("cluster-secret", self.hello, b"\x03" * 32, b"\x02" * 32),
            frames.Handshake("cluster-secret", self.hello, b"\x01" * 32, b"\x03" * 32),
        ):
            self.assertEqual(
                {other.acceptorMAC, other.dialerMAC, other.dialerKey, other.acceptorKey} & values,
                set(),
            )

    def test_sides(self):
        """
        Each end proves itself with its own MAC and expects the other's, and
        seals with the key the other end opens with.
        """
        h = self.handshake
        dialer, acceptor = h.side(dialer=True), h.side(dialer=False)
        self.assertEqual(
            (dialer.ownMAC, dialer.remoteMAC, dialer.sendKey, dialer.receiveKey),
            (h.dialerMAC, h.acceptorMAC, h.dialerKey, h.acceptorKey),
        )
        self.assertEqual((acceptor.ownMAC, acceptor.remoteMAC), (dialer.remoteMAC, dialer.ownMAC))
        self.assertEqual(
            (acceptor.sendKey, acceptor.receiveKey), (dialer.receiveKey, dialer.sendKey)
        )

    def test_sealOpen(self):
        sealer = frames.Sealer(self.handshake.dialerKey)
        opener = frames.Opener(self.handshake.dialerKey)
        sent = [
            frames.whoHasFrame(PEER_A),
            frames.pingFrame(),
            frames.fwdFrame(PEER_B, TRANSPORT_AS_DELIVERED),
        ]
        reader = frames.FrameReader()
        received = reader.feed(b"".join(sealer.seal(f) for f in sent))
        self.assertEqual([frames.encodeFrame(t, opener.open(t, p)) for t, p in received], sent)
        sealed = sealer.seal(frames.whoHasFrame(PEER_A))
        self.assertEqual(len(sealed), len(frames.whoHasFrame(PEER_A)) + frames.TAG_SIZE)
        self.assertEqual(struct.unpack(">H", sealed[1:3])[0], 36 + 16)

    def test_sealedTag(self):
        """
        The tag is HMAC-SHA256(direction key, [seqno u64][the unsealed
        frame]) cut to 16 bytes (the module docstring's formula), computed
        here without the codec.
        """
        sealer = frames.Sealer(self.handshake.dialerKey)
        for seqno, frame in enumerate((frames.whoHasFrame(PEER_A), frames.pingFrame())):
            expected = hmac.new(
                self.handshake.dialerKey, struct.pack(">Q", seqno) + frame, hashlib.sha256
            ).digest()[:16]
            self.assertEqual(sealer.seal(frame)[-16:], expected)

    def test_openRefuses(self):
        """
        A wrong key, a tampered type, payload or tag, a frame out of order
        or replayed, and a frame without a tag are all refused.
        """
        sealer = frames.Sealer(self.handshake.dialerKey)
        first = frames.FrameReader().feed(sealer.seal(frames.whoHasFrame(PEER_A)))[0]
        second = frames.FrameReader().feed(sealer.seal(frames.whoHasFrame(PEER_B)))[0]

        def refused(key, frameType, payload, before=()):
            opener = frames.Opener(key)
            for t, p in before:
                opener.open(t, p)
            with self.assertRaises(frames.FrameError) as caught:
                opener.open(frameType, payload)
            self.assertEqual(caught.exception.reason, frames.AUTH_MISMATCH)

        key = self.handshake.dialerKey
        refused(self.handshake.acceptorKey, *first)
        refused(key, frames.I_HAVE, first[1])
        refused(key, first[0], b"\x00" + first[1][1:])
        refused(key, first[0], first[1][:-1] + bytes((first[1][-1] ^ 1,)))
        refused(key, *second)
        refused(key, *first, before=[first])
        refused(key, frames.PING, b"\x00" * 15)

    def test_sealTooLarge(self):
        sealer = frames.Sealer(self.handshake.dialerKey)
        self.assertRaises(
            frames.FrameError,
            sealer.seal,
            frames.encodeFrame(frames.FWD, b"x" * (frames.MAX_PAYLOAD - 15)),
        )


class SecuredVectorTests(SynchronousTestCase):
    """
    The secured handshake's values for fixed inputs (the HELLO of the
    PROTOCOL.md vector, nonces 01.. and 02..), computed here from the
    documented construction, and pinned so a change of format is noticed.
    """

    def test_vector(self):
        secret = b"cluster-secret"
        hello = HELLO_SIGNED[3:]
        base = hmac.new(secret, b"relay cluster v3", hashlib.sha256).digest()
        transcript = hashlib.sha256(
            struct.pack(">I", len(hello)) + hello + b"\x01" * 32 + b"\x02" * 32
        ).digest()

        def derive(label):
            return hmac.new(base, label + transcript, hashlib.sha256).digest()

        h = frames.Handshake("cluster-secret", hello, b"\x01" * 32, b"\x02" * 32)
        self.assertEqual(h.acceptorMAC, derive(b"acceptor proof"))
        self.assertEqual(h.dialerMAC, derive(b"dialer proof"))
        self.assertEqual(h.dialerKey, derive(b"dialer frames"))
        self.assertEqual(h.acceptorKey, derive(b"acceptor frames"))
        self.assertEqual(
            h.acceptorMAC.hex(), "8fdb9c6e430ab943f78576f0ed2eea48f7440c8e3b858cdedbaf12a03409badf"
        )
        self.assertEqual(
            h.dialerMAC.hex(), "98e4495a6c8da18e03049fb8eeaa9446ded021d091d2036af8ff57fa915f5764"
        )
        sealer = frames.Sealer(h.dialerKey)
        first, second = sealer.seal(frames.pingFrame()), sealer.seal(frames.pingFrame())
        for seqno, sealed in enumerate((first, second)):
            tag = hmac.new(
                h.dialerKey, struct.pack(">Q", seqno) + b"\x20\x00\x00", hashlib.sha256
            ).digest()[:16]
            self.assertEqual(sealed, b"\x20\x00\x10" + tag)
        self.assertEqual(first.hex(), "2000105b8aec90f33ecd533cebb8dd9225d2d6")
