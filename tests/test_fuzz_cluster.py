"""
Property tests over the inter-pod side (relay.cluster): every frame and
payload codec, the reassembly of a stream whose bytes arrive split anywhere,
an accepting ClusterStream fed arbitrary traffic, and a stateful model of the
locator cache (I_HAVE with serial-number seqnos, invalidation, 5-minute
expiry, lookups) on a task.Clock.

The inter-pod port is reachable by anything inside the cluster network, so
its decoders must turn any byte string into a value or a FrameError, never
anything else, and a stream must never hand the layer above a frame it did
not decode exactly.

Bounded and derandomized by default (200 examples); set
HYPOTHESIS_PROFILE=fuzz for a long run (20000 examples).
"""

import hashlib
import hmac
import struct

from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    rule,
    run_state_machine_as_test,
)
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial import unittest
from zope.interface import implementer

from relay.cluster import frames as f
from relay.cluster import locator as loc
from relay.cluster import streams
from relay.counters import ClusterCounters
from relay.interfaces import ILocalPeers
from relay.messages import peerID
from tests.helpers import hypothesisProfile
from tests.test_cluster_frames import buffered

PROFILE = hypothesisProfile()

NOW = 1893456000
SECRET = "cluster-secret"
HELLO_REASONS = {
    f.HMAC_MISMATCH,
    f.UNSIGNED_BUT_REQUIRED,
    f.SIGNED_BUT_UNSUPPORTED,
    f.STALE_TIMESTAMP,
    f.MALFORMED,
}
KNOWN_TYPES = {f.WHO_HAS, f.I_HAVE, f.PEER_GONE, f.FWD, f.PING, f.PONG}

ids = st.binary(min_size=36, max_size=36)
namedIDs = st.integers(0, 50).map(lambda i: peerID(f"peer-{i}"))
anyID = st.one_of(ids, namedIDs)
frameTypes = st.integers(0, 255)
payloads = st.one_of(
    st.binary(max_size=120),
    st.integers(0, 300).map(lambda n: b"\x5a" * n),
    st.sampled_from([b"", b"\x00" * 36, b"\x00" * 40]),
)
frameList = st.lists(st.tuples(frameTypes, payloads), max_size=12)
secrets = st.one_of(
    st.just(""),
    st.just(SECRET),
    st.text(min_size=1, max_size=20),
    st.binary(min_size=1, max_size=20),
)
addresses = st.one_of(
    st.sampled_from(["10.0.5.7:7090", "[fd00::1]:7090", "relay-0.relay:7090"]),
    st.text(min_size=1, max_size=80),
).filter(lambda a: 0 < len(a.encode("utf-8")) <= 255)
seqnos = st.one_of(
    st.sampled_from([0, 1, 2**31 - 1, 2**31, 2**31 + 1, 2**32 - 2, 2**32 - 1]),
    st.integers(0, 2**32 - 1),
)


def _raisesOnly(f_, *args):
    """
    @return: C{(True, result)}, or C{(False, FrameError)}; anything else
        propagates and fails the test.
    """
    try:
        return True, f_(*args)
    except f.FrameError as e:
        return False, e


def _serialGreaterModel(a, b):
    """
    RFC 1982, stated differently from the product: a is after b when the
    forward distance from b to a is in (0, 2**31).
    """
    return 0 < (a - b) % 2**32 < 2**31


# Frames and reassembly


class FrameLayer(unittest.SynchronousTestCase):
    @PROFILE
    @given(frameType=frameTypes, payload=st.binary(max_size=2000))
    def test_encodeFrameHeader(self, frameType, payload):
        frame = f.encodeFrame(frameType, payload)
        self.assertEqual(frame[:3], struct.pack(">BH", frameType, len(payload)))
        self.assertEqual(frame[3:], payload)
        reader = f.FrameReader()
        self.assertEqual(reader.feed(frame), [(frameType, payload)])
        self.assertEqual(buffered(reader), 0)
        self.assertIsNone(reader.nextHeader())

    def test_payloadSizeBoundary(self):
        self.assertEqual(len(f.encodeFrame(f.FWD, b"x" * 65535)), 65538)
        self.assertRaises(f.FrameError, f.encodeFrame, f.FWD, b"x" * 65536)
        reader = f.FrameReader()
        self.assertEqual(reader.feed(f.encodeFrame(0x14, b"y" * 65535)), [(0x14, b"y" * 65535)])

    @PROFILE
    @given(frames=frameList, data=st.data())
    def test_randomChunkings(self, frames, data):
        """
        A concatenation of whole frames cut at any set of boundaries gives
        back the same frames, in order, each as soon as its last byte came.
        """
        stream = b"".join(f.encodeFrame(t, p) for t, p in frames)
        cuts = sorted(set(data.draw(st.lists(st.integers(0, len(stream)), max_size=20))))
        reader = f.FrameReader()
        out = []
        previous = 0
        ends = []
        offset = 0
        for _t, p in frames:
            offset += 3 + len(p)
            ends.append(offset)
        for cut in cuts + [len(stream)]:
            out.extend(reader.feed(stream[previous:cut]))
            previous = cut
            self.assertEqual(len(out), sum(1 for e in ends if e <= cut))
            self.assertEqual(
                buffered(reader), cut - (max([e for e in ends if e <= cut], default=0))
            )
        self.assertEqual(out, list(frames))
        self.assertEqual(buffered(reader), 0)

    def test_everyBoundary(self):
        """
        Every single split point of a stream of every frame kind, and one
        byte at a time.
        """
        a, b = peerID("peer-a"), peerID("peer-b")
        frames = [
            (f.HELLO, f.encodeHello("10.0.5.7:7090", NOW, SECRET)),
            (f.WHO_HAS, a),
            (f.I_HAVE, a + b"\x00\x00\x00\x2a"),
            (f.PEER_GONE, b),
            (f.FWD, b + b"\x01\x03" + a + b"hello"),
            (f.PING, b""),
            (f.PONG, b""),
            (0x7F, b"unknown"),
        ]
        stream = b"".join(f.encodeFrame(t, p) for t, p in frames)
        for i in range(len(stream) + 1):
            reader = f.FrameReader()
            out = reader.feed(stream[:i]) + reader.feed(stream[i:])
            self.assertEqual(out, frames, i)
        reader = f.FrameReader()
        out = []
        for i in range(len(stream)):
            out.extend(reader.feed(stream[i : i + 1]))
            header = reader.nextHeader()
            if buffered(reader) >= 3:
                self.assertIsNotNone(header)
                self.assertEqual(header, (frames[len(out)][0], len(frames[len(out)][1])))
            else:
                self.assertIsNone(header)
        self.assertEqual(out, frames)

    @PROFILE
    @given(data=st.binary(max_size=3000), cut=st.integers(0, 3000))
    def test_arbitraryBytes(self, data, cut):
        """
        Any bytes: the frames out re-encode to a prefix of the input and the
        rest is pending.
        """
        reader = f.FrameReader()
        out = reader.feed(data[:cut]) + reader.feed(data[cut:])
        consumed = b"".join(f.encodeFrame(t, p) for t, p in out)
        self.assertEqual(data[: len(consumed)], consumed)
        self.assertEqual(buffered(reader), len(data) - len(consumed))
        if buffered(reader) >= 3:
            t, n = reader.nextHeader()
            self.assertEqual(data[len(consumed)], t)
            self.assertGreater(3 + n, buffered(reader))


# HELLO


class HelloCodec(unittest.SynchronousTestCase):
    def test_vectors(self):
        signed = bytes.fromhex(
            "000038020d31302e302e352e373a373039300000000070dbd880201bee1d331b5b7c"
            "7437589964feb412360caba9c354c2a163d5c401ba76aa0a27"
        )
        unsigned = bytes.fromhex("000018020d31302e302e352e373a373039300000000070dbd88000")
        self.assertEqual(f.helloFrame("10.0.5.7:7090", 1893456000, "cluster-secret"), signed)
        self.assertEqual(f.helloFrame("10.0.5.7:7090", 1893456000, ""), unsigned)
        self.assertEqual(
            f.decodeHello(signed[3:], "cluster-secret", NOW), f.Hello("10.0.5.7:7090", NOW, True)
        )
        self.assertEqual(f.decodeHello(unsigned[3:], "", NOW), f.Hello("10.0.5.7:7090", NOW, False))

    @PROFILE
    @given(
        address=addresses,
        secret=secrets,
        delta=st.integers(-400, 400),
        fraction=st.sampled_from([0.0, 0.25, 0.5, 0.999]),
    )
    def test_roundTripAroundWindow(self, address, secret, delta, fraction):
        """
        Signed with the receiver's secret (or unsigned when neither has one):
        accepted exactly while |now - timestamp| <= 300 s.
        """
        payload = f.encodeHello(address, NOW, secret)
        now = NOW + delta + fraction
        ok, result = _raisesOnly(f.decodeHello, payload, secret, now)
        self.assertEqual(ok, abs(delta + fraction) <= 300, result)
        if ok:
            self.assertEqual(result, f.Hello(address, NOW, bool(secret)))
        else:
            self.assertEqual(result.reason, f.STALE_TIMESTAMP)

    @PROFILE
    @given(address=addresses, sender=secrets, receiver=secrets, delta=st.integers(-(10**6), 10**6))
    def test_policy(self, address, sender, receiver, delta):
        """
        The signature policy decides before the timestamp (an unauthenticated
        timestamp never picks the reason).
        """
        payload = f.encodeHello(address, NOW + delta, sender)
        ok, result = _raisesOnly(f.decodeHello, payload, receiver, NOW)
        senderKey = sender.encode() if isinstance(sender, str) else sender
        receiverKey = receiver.encode() if isinstance(receiver, str) else receiver
        if receiverKey and not senderKey:
            expected = f.UNSIGNED_BUT_REQUIRED
        elif receiverKey and senderKey != receiverKey:
            expected = f.HMAC_MISMATCH
        elif senderKey and not receiverKey:
            expected = f.SIGNED_BUT_UNSUPPORTED
        elif abs(delta) > 300:
            expected = f.STALE_TIMESTAMP
        else:
            expected = None
        if expected is None:
            self.assertTrue(ok, result)
        else:
            self.assertFalse(ok, result)
            self.assertEqual(result.reason, expected)

    @PROFILE
    @given(
        payload=st.one_of(
            st.binary(max_size=400),
            st.tuples(st.integers(0, 255), st.binary(max_size=300)).map(
                lambda t: b"\x02" + bytes([t[0]]) + t[1]
            ),
            st.tuples(
                addresses,
                st.integers(0, 2**64 - 1),
                secrets,
                st.binary(max_size=4),
                st.integers(0, 60),
            ).map(lambda t: f.encodeHello(t[0], t[1], t[2])[: -t[4] or None] + t[3]),
        ),
        secret=secrets,
        now=st.one_of(st.just(NOW), st.integers(0, 2**64 + 10), st.floats(0, 2**40)),
    )
    def test_arbitraryPayload(self, payload, secret, now):
        """
        Any payload, secret and clock: a Hello or a FrameError with one of
        the HELLO rejection reasons; an accepted one is canonical (encoding
        it again gives the same bytes).
        """
        ok, result = _raisesOnly(f.decodeHello, payload, secret, now)
        if not ok:
            self.assertIn(result.reason, HELLO_REASONS)
            return
        self.assertEqual(
            f.encodeHello(result.address, result.timestamp, secret if result.signed else ""),
            payload,
        )
        self.assertLessEqual(abs(now - result.timestamp), 300)
        self.assertLessEqual(len(payload), f.HELLO_MAX_PAYLOAD)

    @PROFILE
    @given(address=addresses, secret=st.sampled_from([SECRET, ""]), data=st.data())
    def test_mutatedSignedHello(self, address, secret, data):
        """
        Any change to a signed HELLO is refused; a changed unsigned one is
        either refused or decodes to exactly what the bytes now say.
        """
        payload = bytearray(f.encodeHello(address, NOW, secret))
        i = data.draw(st.integers(0, len(payload) - 1))
        payload[i] ^= data.draw(st.integers(1, 255))
        ok, result = _raisesOnly(f.decodeHello, bytes(payload), secret, NOW)
        if secret:
            self.assertFalse(ok)
        elif ok:
            self.assertEqual(f.encodeHello(result.address, result.timestamp, ""), bytes(payload))

    def test_addressBounds(self):
        self.assertRaises(f.FrameError, f.encodeHello, "", NOW, SECRET)
        self.assertRaises(f.FrameError, f.encodeHello, "a" * 256, NOW, SECRET)
        payload = f.encodeHello("a" * 255, NOW, SECRET)
        self.assertEqual(len(payload), f.HELLO_MAX_PAYLOAD)
        self.assertEqual(f.decodeHello(payload, SECRET, NOW).address, "a" * 255)

    def test_hmacCoversEverythingBeforeHmacLen(self):
        payload = f.encodeHello("10.0.5.7:7090", NOW, SECRET)
        body = payload[:-33]
        self.assertEqual(payload[-33], 32)
        self.assertEqual(payload[-32:], hmac.new(SECRET.encode(), body, hashlib.sha256).digest())


# Payloads of the other frames


class PayloadCodecs(unittest.SynchronousTestCase):
    def test_vectors(self):
        a, b = peerID("peer-a"), peerID("peer-b")
        self.assertEqual(
            f.iHaveFrame(a, 42), bytes.fromhex("020028") + a + bytes.fromhex("0000002a")
        )
        transport_ = bytes.fromhex("0103") + a + b"hello"
        self.assertEqual(f.fwdFrame(b, transport_), bytes.fromhex("14004f") + b + transport_)
        self.assertEqual(f.whoHasFrame(a), bytes.fromhex("010024") + a)
        self.assertEqual(f.peerGoneFrame(a), bytes.fromhex("030024") + a)
        self.assertEqual(f.pingFrame(), b"\x20\x00\x00")
        self.assertEqual(f.pongFrame(), b"\x21\x00\x00")

    def _decodeFrame(self, frame):
        [(t, p)] = f.FrameReader().feed(frame)
        return f.decodePayload(t, p)

    @PROFILE
    @given(pid=anyID)
    def test_whoHasAndPeerGoneRoundTrip(self, pid):
        self.assertEqual(self._decodeFrame(f.whoHasFrame(pid)), f.WhoHas(pid))
        self.assertEqual(self._decodeFrame(f.peerGoneFrame(pid)), f.PeerGone(pid))

    @PROFILE
    @given(pid=anyID, seqno=st.one_of(seqnos, st.integers(0, 2**40)))
    def test_iHaveRoundTrip(self, pid, seqno):
        self.assertEqual(self._decodeFrame(f.iHaveFrame(pid, seqno)), f.IHave(pid, seqno % 2**32))

    @PROFILE
    @given(pid=anyID, message=st.one_of(st.binary(max_size=9000), st.just(b"m" * (65535 - 36))))
    def test_fwdRoundTrip(self, pid, message):
        frame = f.fwdFrame(pid, message)
        self.assertEqual(self._decodeFrame(frame), f.Fwd(pid, message))

    def test_fwdTooLong(self):
        self.assertRaises(f.FrameError, f.fwdFrame, peerID("x"), b"m" * (65535 - 35))

    @PROFILE
    @given(bad=st.binary(max_size=80).filter(lambda b: len(b) != 36))
    def test_encodersRejectBadIDs(self, bad):
        for encode in (
            f.whoHasFrame,
            f.peerGoneFrame,
            lambda p: f.iHaveFrame(p, 1),
            lambda p: f.fwdFrame(p, b""),
        ):
            self.assertRaises(f.FrameError, encode, bad)

    @PROFILE
    @given(
        frameType=st.one_of(st.sampled_from(sorted(KNOWN_TYPES | {f.HELLO})), frameTypes),
        payload=payloads,
    )
    def test_arbitraryPayload(self, frameType, payload):
        """
        Any type and payload: exactly the documented malformed cases raise
        FrameError, everything else decodes to what the bytes say.
        """
        ok, result = _raisesOnly(f.decodePayload, frameType, payload)
        n = len(payload)
        valid = {
            f.WHO_HAS: n == 36,
            f.PEER_GONE: n == 36,
            f.I_HAVE: n == 40,
            f.FWD: n >= 36,
            f.PING: n == 0,
            f.PONG: n == 0,
        }.get(frameType, True)
        self.assertEqual(ok, valid, (frameType, n, result))
        if not ok:
            self.assertEqual(result.reason, f.MALFORMED)
            return
        if frameType == f.WHO_HAS:
            self.assertEqual(result, f.WhoHas(payload))
        elif frameType == f.PEER_GONE:
            self.assertEqual(result, f.PeerGone(payload))
        elif frameType == f.I_HAVE:
            self.assertEqual(result, f.IHave(payload[:36], int.from_bytes(payload[36:], "big")))
        elif frameType == f.FWD:
            self.assertEqual(result, f.Fwd(payload[:36], payload[36:]))
        elif frameType == f.PING:
            self.assertEqual(result, f.Ping())
        elif frameType == f.PONG:
            self.assertEqual(result, f.Pong())
        else:
            self.assertEqual(result, f.Unknown(frameType, payload))

    @PROFILE
    @given(message=st.binary(max_size=100))
    def test_isTransportMessage(self, message):
        self.assertEqual(
            f.isTransportMessage(message), len(message) >= 38 and message[:2] == b"\x01\x03"
        )


# A live accepting stream fed arbitrary traffic


class RecordingHandler:
    def __init__(self):
        self.up = []
        self.down = []
        self.frames = []

    def streamUp(self, stream):
        self.up.append(stream)

    def streamDown(self, stream):
        self.down.append(stream)

    def frameReceived(self, stream, frame):
        self.frames.append(frame)


class _NoEndpoints:
    def __call__(self, address):
        raise AssertionError("the fuzzed streams never dial")


helloFrames = st.one_of(
    st.just(f.helloFrame("10.0.9.9:7090", NOW, SECRET)),
    st.integers(-400, 400).map(lambda d: f.helloFrame("10.0.9.9:7090", NOW + d, SECRET)),
    st.just(f.helloFrame("10.0.9.9:7090", NOW, "")),
    st.just(f.helloFrame("10.0.9.9:7090", NOW, "other")),
    st.tuples(frameTypes, payloads).map(lambda t: f.encodeFrame(*t)),
    st.binary(max_size=60),
)
fabricFrames = st.one_of(
    anyID.map(f.whoHasFrame),
    st.tuples(anyID, seqnos).map(lambda t: f.iHaveFrame(*t)),
    anyID.map(f.peerGoneFrame),
    st.tuples(anyID, st.binary(max_size=200)).map(lambda t: f.fwdFrame(*t)),
    st.just(f.pingFrame()),
    st.just(f.pongFrame()),
    st.just(f.helloFrame("10.0.9.9:7090", NOW, SECRET)),
    st.tuples(frameTypes, payloads).map(lambda t: f.encodeFrame(*t)),
)


class AcceptingStreamFuzz(unittest.SynchronousTestCase):
    def stream(self):
        clock = Clock()
        clock.advance(NOW)
        self.counters = ClusterCounters()
        self.handler = RecordingHandler()
        owner = streams.ClusterStreams(
            "10.0.0.1:7090", SECRET, clock, self.counters, _NoEndpoints(), handler=self.handler
        )
        stream = owner.serverFactory().buildProtocol(IPv4Address("TCP", "10.0.9.9", 40000))
        tr = StringTransport(peerAddress=IPv4Address("TCP", "10.0.9.9", 40000))
        stream.makeConnection(tr)
        return stream, tr

    def feed(self, stream, data, cuts):
        previous = 0
        for cut in sorted(set(c for c in cuts if c <= len(data))) + [len(data)]:
            stream.dataReceived(data[previous:cut])
            previous = cut

    @PROFILE
    @given(
        hello=helloFrames,
        rest=st.lists(fabricFrames, max_size=10),
        garbage=st.binary(max_size=20),
        data=st.data(),
    )
    def test_arbitraryTraffic(self, hello, rest, garbage, data):
        """
        An accepting stream gets a first frame (valid HELLO or not), and
        after a valid one the secured handshake, more frames (sealed as a pod
        seals them) and trailing garbage, split at random boundaries. It
        never raises; it refuses a bad HELLO without passing anything up;
        after a good one it passes up exactly the fabric frames before the
        first malformed known-type frame, answers every PING before that
        point, and aborts at a malformed one or at the garbage.
        """
        stream, tr = self.stream()
        handler, counters = self.handler, self.counters
        parsed = f.FrameReader().feed(hello)
        helloOK = False
        if parsed and parsed[0][0] == f.HELLO:
            helloOK = _raisesOnly(f.decodeHello, parsed[0][1], SECRET, NOW)[0]
        if not helloOK:
            wire_ = hello + b"".join(rest) + garbage
            # An empty or partial HELLO completed by the frames after it
            # into a valid one is a valid start, tested below.
            first = f.FrameReader().feed(wire_)[:1]
            assume(
                not (
                    first
                    and first[0][0] == f.HELLO
                    and _raisesOnly(f.decodeHello, first[0][1], SECRET, NOW)[0]
                )
            )
            self.feed(stream, wire_, data.draw(st.lists(st.integers(0, len(wire_)), max_size=8)))
            parsed = f.FrameReader().feed(wire_)
            self.assertEqual(handler.frames, [])
            self.assertEqual(handler.up, [])
            if parsed or (
                len(wire_) >= 3
                and (
                    wire_[0] != f.HELLO or struct.unpack(">H", wire_[1:3])[0] > f.HELLO_MAX_PAYLOAD
                )
            ):
                self.assertTrue(stream.closing)
                self.assertEqual(sum(counters.helloRejects.values()), 1)
            return

        nonce = b"\x11" * 32
        stream.dataReceived(hello + f.challengeFrame(nonce))
        [(authType, auth)] = f.FrameReader().feed(tr.value())
        tr.clear()
        acceptorNonce, mac = f.decodeAuth(auth)
        handshake = f.Handshake(SECRET, parsed[0][1], nonce, acceptorNonce)
        self.assertEqual(mac, handshake.acceptorMAC)
        sealer = f.Sealer(handshake.dialerKey)
        wire_ = (
            f.confirmFrame(handshake.dialerMAC)
            + b"".join(sealer.seal(frame) for frame in rest)
            + garbage
        )
        self.feed(stream, wire_, data.draw(st.lists(st.integers(0, len(wire_)), max_size=8)))

        self.assertEqual(handler.up, [stream])
        expected = []
        pings = 0
        broken = False
        for frame in rest:
            frameType, payload = f.FrameReader().feed(frame)[0]
            if frameType == f.HELLO:
                continue
            ok, decoded = _raisesOnly(f.decodePayload, frameType, payload)
            if not ok:
                broken = True
                break
            if isinstance(decoded, f.Ping):
                pings += 1
            elif not isinstance(decoded, (f.Pong, f.Unknown)):
                expected.append(decoded)
        self.assertEqual(handler.frames, expected)
        opener = f.Opener(handshake.acceptorKey)
        written = [(t, opener.open(t, p)) for t, p in f.FrameReader().feed(tr.value())]
        self.assertEqual(written, [(f.PONG, b"")] * pings)
        unsealedGarbage = (
            len(garbage) >= 3 and len(garbage) - 3 >= struct.unpack(">H", garbage[1:3])[0]
        )
        self.assertEqual(stream.closing, broken or unsealedGarbage)
        if broken:
            self.assertEqual(counters.dropped["malformed_frame"], 1)
        elif unsealedGarbage:
            self.assertEqual(counters.dropped["frame_auth_mismatch"], 1)

    @PROFILE
    @given(
        hello=st.just(f.helloFrame("10.0.9.9:7090", NOW, SECRET)),
        rest=st.lists(fabricFrames, min_size=1, max_size=5),
    )
    def test_unsecuredFramesRefused(self, hello, rest):
        """
        With a secret and without compatibility mode, whatever follows a
        valid HELLO but the secured handshake closes the stream before
        anything reaches the fabric.
        """
        stream, tr = self.stream()
        stream.dataReceived(hello + b"".join(rest))
        firstType = f.FrameReader().feed(rest[0])[0][0]
        self.assertEqual(self.handler.frames, [])
        self.assertEqual(self.handler.up, [])
        if firstType != f.CHALLENGE:
            self.assertTrue(stream.closing)
            self.assertEqual(dict(self.counters.helloRejects), {f.NOT_SECURED: 1})


# The serial-number order and the locator cache


class SerialNumbers(unittest.SynchronousTestCase):
    @PROFILE
    @given(a=seqnos, b=seqnos)
    def test_matchesRFC1982(self, a, b):
        self.assertEqual(loc.serialGreater(a, b), _serialGreaterModel(a, b))
        self.assertFalse(loc.serialGreater(a, b) and loc.serialGreater(b, a))
        self.assertFalse(loc.serialGreater(a, a))
        if (a - b) % 2**32 == 2**31:
            self.assertFalse(loc.serialGreater(a, b) or loc.serialGreater(b, a))

    @PROFILE
    @given(t=st.floats(0, 2**40, allow_nan=False), later=st.floats(0.01, 2**31 / 100 - 1))
    def test_laterRegistrationWins(self, t, later):
        """
        A registration up to ~248 days after another has the greater seqno,
        across the 32-bit wrap.
        """
        a, b = loc.seqnoOf(t), loc.seqnoOf(t + later)
        assume(a != b)
        self.assertTrue(0 <= a < 2**32 and 0 <= b < 2**32)
        self.assertTrue(loc.serialGreater(b, a))


class FakeStream:
    def __init__(self, address):
        self.address = address
        self.sent = []
        self.closing = False

    def send(self, data, droppable=False):
        self.sent.append(data)
        return streams.SENT


class FakeStreams:
    def __init__(self, addresses):
        self.streams = {a: FakeStream(a) for a in addresses}
        self.up = set(addresses)

    def liveStreams(self):
        return [self.streams[a] for a in sorted(self.up)]


@implementer(ILocalPeers)
class NoLocalPeers:
    def localPeer(self, peerID):
        return None

    def localPeers(self):
        return []

    def peerOnlineElsewhere(self, peerID):
        pass

    def peerGoneElsewhere(self, peerID):
        pass


PODS = ["10.0.0.2:7090", "10.0.0.3:7090", "10.0.0.4:7090"]
PEERS = [peerID(f"peer-{i}") for i in range(4)]
STEPS = [0.0, 0.05, 0.1999, 0.2, 0.5, 1.0, 60.0, 299.9, 300.0, 301.0]


class LocatorMachine(RuleBasedStateMachine):
    """
    The locator against a model of PROTOCOL.md 3 (with the Beyond seqno):

      - I_HAVE(id, seqno) from pod P: unless a live entry for id holds a
        seqno serially greater, id -> (P, seqno), expiring 300 s later;
        "changed" when there was no live entry or it named another pod;
        an I_HAVE no lookup asked for marks P as announcing presence;
      - reading a live entry naming an announcing pod renews it for 300 s;
      - an entry is live while now < its expiry;
      - invalidate(id[, P]) drops the entry (only if it names P);
        invalidatePod(P) drops every entry naming P and P's mark;
      - lookup(id): a live entry answers at once; no live stream answers
        None at once; otherwise one WHO_HAS per live stream, shared by
        every concurrent lookup of id, answered by the next I_HAVE for id
        (with whatever the cache then holds) or None 200 ms after it began.
    """

    def __init__(self):
        super().__init__()
        self.clock = Clock()
        self.clock.advance(NOW)
        self.streams = FakeStreams(PODS)
        self.locator = loc.Locator(self.streams, NoLocalPeers(), self.clock)
        self.model = {}  # id -> (address, seqno, expiresAt)
        self.announcing = set()
        self.pending = {}  # id -> (deadline, [result lists])
        self.whoHasSent = {a: 0 for a in PODS}
        self.whoHasExpected = {a: 0 for a in PODS}

    def _live(self, pid):
        entry = self.model.get(pid)
        if entry is not None and self.clock.seconds() >= entry[2]:
            del self.model[pid]
            return None
        return entry

    def _touch(self, pid):
        entry = self._live(pid)
        if entry is not None and entry[0] in self.announcing:
            self.model[pid] = (entry[0], entry[1], self.clock.seconds() + loc.CACHE_TTL)

    def _settle(self, pid, address):
        deadline, results = self.pending.pop(pid)
        for r in results:
            assert r == [address], (r, address)

    @rule(pod=st.sampled_from(PODS), i=st.integers(0, len(PEERS) - 1), seqno=seqnos)
    def iHave(self, pod, i, seqno):
        pid = PEERS[i]
        self._touch(pid)
        entry = self._live(pid)
        if entry is not None and _serialGreaterModel(entry[1], seqno):
            expectedChanged = False
        else:
            expectedChanged = entry is None or entry[0] != pod
            self.model[pid] = (pod, seqno, self.clock.seconds() + loc.CACHE_TTL)
        solicitedExpected = pid in self.pending
        changed, solicited = self.locator.iHaveReceived(pod, pid, seqno)
        assert changed == expectedChanged, (changed, expectedChanged)
        assert solicited == solicitedExpected
        if solicitedExpected:
            live = self._live(pid)
            self._settle(pid, live[0] if live else None)
            self._touch(pid)
        else:
            self.announcing.add(pod)

    @rule(i=st.integers(0, len(PEERS) - 1), pod=st.one_of(st.none(), st.sampled_from(PODS)))
    def invalidate(self, i, pod):
        pid = PEERS[i]
        entry = self._live(pid)
        expected = entry is not None and (pod is None or entry[0] == pod)
        # The product also drops an expired, unswept entry; only live ones
        # are observable.
        dropped = self.locator.invalidate(pid, pod)
        if entry is not None:
            assert dropped == expected, (dropped, expected)
        if expected:
            del self.model[pid]

    @rule(pod=st.sampled_from(PODS))
    def invalidatePod(self, pod):
        self.locator.invalidatePod(pod)
        self.announcing.discard(pod)
        for pid in [p for p, e in self.model.items() if e[0] == pod]:
            del self.model[pid]

    @rule(step=st.sampled_from(STEPS))
    def advance(self, step):
        self.clock.advance(step)
        now = self.clock.seconds()
        for pid in [p for p, (deadline, _) in self.pending.items() if now >= deadline]:
            self._settle(pid, None)

    @rule(pod=st.sampled_from(PODS))
    def toggleStream(self, pod):
        if pod in self.streams.up:
            self.streams.up.discard(pod)
        else:
            self.streams.up.add(pod)

    @rule(i=st.integers(0, len(PEERS) - 1))
    def lookup(self, i):
        pid = PEERS[i]
        result = []
        d = self.locator.lookup(pid)
        d.addCallback(result.append)
        self._touch(pid)
        entry = self._live(pid)
        if entry is not None:
            assert result == [entry[0]], (result, entry)
            return
        if pid in self.pending:
            self.pending[pid][1].append(result)
        elif not self.streams.up:
            assert result == [None], result
            return
        else:
            self.pending[pid] = (self.clock.seconds() + loc.LOOKUP_TIMEOUT, [result])
            for a in self.streams.up:
                self.whoHasExpected[a] += 1
        assert result == [], result

    @invariant()
    def cacheMatches(self):
        for pid in PEERS:
            entry = self._live(pid)
            assert self.locator.cached(pid) == (entry[0] if entry else None), (pid[-4:], entry)
            cached = self.locator.cachedEntry(pid)
            if entry is not None:
                assert (cached.address, cached.seqno) == entry[:2]
            self._touch(pid)

    @invariant()
    def lookupsMatch(self):
        for pid in PEERS:
            assert self.locator.pending(pid) == (pid in self.pending), pid[-4:]
        for a, stream in self.streams.streams.items():
            whoHas = [frame for frame in stream.sent if frame[0] == f.WHO_HAS]
            assert len(whoHas) == self.whoHasExpected[a], (a, len(whoHas), self.whoHasExpected[a])
            assert len(whoHas) == len(stream.sent)

    @invariant()
    def cacheBounded(self):
        assert len(self.locator._cache) <= len(PEERS)


class LocatorModelTests(unittest.SynchronousTestCase):
    def test_locatorMatchesModel(self):
        run_state_machine_as_test(
            LocatorMachine, settings=settings(PROFILE, stateful_step_count=50)
        )
