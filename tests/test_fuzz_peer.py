"""
Property tests over the peer-side codecs (relay.messages, relay.auth) and a
stateful model of relay.store.Store against PROTOCOL.md 2.2.

Bounded and derandomized by default (200 examples); set
HYPOTHESIS_PROFILE=fuzz for a long run (20000 examples).
"""

import hashlib
import hmac
import re

from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from twisted.internet.task import Clock
from twisted.trial import unittest

from relay import messages as m
from relay.auth import AuthError, TokenValidator, generateToken
from relay.store import Store
from tests.helpers import connect, hypothesisProfile, makeRelay

PROFILE = hypothesisProfile()

SECRET = "relay-secret"
NOW = 1_800_000_000

ids = st.binary(min_size=36, max_size=36)
wellFormedIDs = st.binary(min_size=32, max_size=32).map(lambda d: b"sha-" + d)
anyID = st.one_of(ids, wellFormedIDs)
notIDs = st.binary(max_size=80).filter(lambda b: len(b) != 36)
idListKinds = st.sampled_from(
    [
        m.SUBSCRIBE_PEER_STATE,
        m.UNSUBSCRIBE_PEER_STATE,
        m.PEERS_ONLINE,
        m.PEERS_WENT_OFFLINE,
    ]
)
CLIENT_TYPES = {1, 3, 4, 5, 6, 8, 9}  # PROTOCOL.md 2


def _raisesOnly(testcase, allowed, f, *args):
    """
    Call f; return (True, result) or (False, exception) if it raised one of
    C{allowed}; any other exception fails the test.
    """
    try:
        return True, f(*args)
    except allowed as e:
        return False, e


class CodecRoundTrips(unittest.SynchronousTestCase):
    @PROFILE
    @given(pid=anyID, token=st.binary(max_size=300))
    def test_authRoundTrip(self, pid, token):
        message = m.encodeAuth(pid, token)
        self.assertEqual(message, b"\x01\x06\x21\x12\xa4\x42" + pid + token)
        self.assertEqual(m.messageType(message), m.AUTH)
        self.assertEqual(m.decodeAuth(message), (pid, token))

    @PROFILE
    @given(pid=notIDs, token=st.binary(max_size=50))
    def test_authRejectsBadID(self, pid, token):
        self.assertRaises(m.MessageError, m.encodeAuth, pid, token)

    @PROFILE
    @given(pid=anyID, payload=st.binary(max_size=m.MAX_MESSAGE_SIZE - 38))
    def test_transportRoundTrip(self, pid, payload):
        message = m.encodeTransport(pid, payload)
        self.assertEqual(message, b"\x01\x03" + pid + payload)
        self.assertLessEqual(len(message), 8820)
        self.assertEqual(m.messageType(message), m.TRANSPORT)
        self.assertEqual(m.decodeTransport(message), (pid, payload))

    @PROFILE
    @given(pid=anyID, extra=st.integers(min_value=1, max_value=2000))
    def test_transportTooLarge(self, pid, extra):
        payload = b"\x00" * (8820 - 38 + extra)
        self.assertRaises(m.MessageError, m.encodeTransport, pid, payload)

    def test_transportSizeBoundary(self):
        pid = m.peerID("peer-b")
        self.assertEqual(len(m.encodeTransport(pid, b"x" * (8820 - 38))), 8820)
        self.assertRaises(m.MessageError, m.encodeTransport, pid, b"x" * (8820 - 37))

    @PROFILE
    @given(
        pid=st.one_of(
            anyID,
            st.binary(max_size=200),
            st.binary(min_size=32, max_size=32).map(lambda d: b"sha-" + d),
        )
    )
    def test_humanIDOfAnyBytes(self, pid):
        """
        Whatever bytes a stranger sends as an id, its log form is printable
        ASCII without spaces, at most 80 characters, and the base64 form
        exactly for a well-formed id.
        """
        human = m.humanID(pid)
        self.assertTrue(human.isascii() and human.isprintable() and " " not in human, human)
        self.assertLessEqual(len(human), 8 + 2 * m.ID_SIZE)
        wellFormed = len(pid) == m.ID_SIZE and pid.startswith(b"sha-")
        self.assertEqual(human.startswith("sha-"), wellFormed)
        if wellFormed:
            self.assertEqual(len(human), 4 + 44)

    @PROFILE
    @given(payload=st.binary(max_size=m.MAX_MESSAGE_SIZE - 38))
    def test_relayStampsTransport(self, payload):
        """
        The relay delivers any payload byte for byte, the destination's id
        replaced by the sender's.
        """
        relay = makeRelay(Clock())
        (a, _), (b, linkB) = connect(relay, "peer-a"), connect(relay, "peer-b")
        sent = m.encodeTransport(b.peerID, payload)
        a.messageReceived(sent)
        [delivered] = linkB.take()
        self.assertEqual(delivered, m.encodeTransport(a.peerID, payload))
        self.assertEqual(len(delivered), len(sent))
        self.assertEqual(m.decodeTransport(delivered), (a.peerID, payload))

    def test_helloVector(self):
        """
        PROTOCOL.md 4: "hello" from peer-a to peer-b, as sent and delivered.
        """
        a, b = m.peerID("peer-a"), m.peerID("peer-b")
        self.assertEqual(
            a.hex(),
            "7368612dbdb94c73d53c44023a715a2970a10c4d54fa9550b70fd9d34cc4b0a2de5ddcbe",
        )
        self.assertEqual(m.humanID(a), "sha-vblMc9U8RAI6cVopcKEMTVT6lVC3D9nTTMSwot5d3L4=")
        sent = m.encodeTransport(b, b"hello")
        self.assertEqual(sent, bytes.fromhex("0103") + b + bytes.fromhex("68656c6c6f"))
        self.assertEqual(
            m.encodeTransport(a, b"hello"),
            bytes.fromhex("0103") + a + bytes.fromhex("68656c6c6f"),
        )

    def test_authVectors(self):
        token = generateToken("relay-secret", 1893456000)
        self.assertEqual(
            token.hex(),
            "01171b78c230f8924ea423b2db791f90effa360b02a58889d318e4aba5bdfb2eff"
            "31383933343536303030",
        )
        auth = m.encodeAuth(m.peerID("peer-a"), token)
        self.assertEqual(len(auth), 85)
        self.assertEqual(
            m.encodeAuthResponse("rel://127.0.0.1:33080").hex(),
            "010772656c3a2f2f3132372e302e302e313a3333303830",
        )

    @PROFILE
    @given(kind=idListKinds, pids=st.lists(anyID, max_size=800))
    def test_idListChunking(self, kind, pids):
        messages = m.encodeIDList(kind, pids)
        expectedCount = -(-len(pids) // 244)
        self.assertEqual(len(messages), expectedCount)
        decoded = []
        for i, message in enumerate(messages):
            self.assertEqual(message[:2], bytes([1, kind]))
            self.assertLessEqual(len(message), 8820)
            count = (len(message) - 2) // 36
            self.assertEqual(len(message), 2 + 36 * count)
            if i < len(messages) - 1:
                self.assertEqual(count, 244)
            else:
                self.assertTrue(1 <= count <= 244)
            part = m.decodeIDList(message)
            self.assertEqual(len(part), count)
            decoded.extend(part)
        self.assertEqual(decoded, list(pids))

    def test_idListChunkBoundaries(self):
        pid = m.peerID("x")
        for n, sizes in [
            (0, []),
            (1, [1]),
            (244, [244]),
            (245, [244, 1]),
            (488, [244, 244]),
            (489, [244, 244, 1]),
        ]:
            messages = m.encodeIDList(m.PEERS_ONLINE, [pid] * n)
            self.assertEqual([(len(x) - 2) // 36 for x in messages], sizes, n)
            self.assertTrue(all(len(x) <= 8820 for x in messages))
        self.assertEqual(len(m.encodeIDList(m.PEERS_ONLINE, [pid] * 244)[0]), 8786)

    @PROFILE
    @given(kind=idListKinds, pids=st.lists(anyID, min_size=1, max_size=10), bad=notIDs)
    def test_idListRejectsBadID(self, kind, pids, bad):
        self.assertRaises(m.MessageError, m.encodeIDList, kind, pids + [bad])

    @PROFILE
    @given(url=st.text(max_size=200))
    def test_authResponseRoundTrip(self, url):
        message = m.encodeAuthResponse(url)
        self.assertEqual(message, b"\x01\x07" + url.encode("utf-8"))
        self.assertEqual(m.decodeAuthResponse(message), url)


@st.composite
def _maybeDamaged(draw, messages):
    """
    A message from C{messages}, left as it is or with one byte changed, a
    tail cut off or bytes appended.
    """
    data = bytearray(draw(messages))
    damage = draw(st.sampled_from(["none", "flip", "truncate", "extend"]))
    if damage == "flip" and data:
        data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
    elif damage == "truncate":
        del data[draw(st.integers(0, len(data))) :]
    elif damage == "extend":
        data += draw(st.binary(min_size=1, max_size=40))
    return bytes(data)


AUTH_EXAMPLE = m.encodeAuth(m.peerID("peer-a"), b"\x01" + b"\x00" * 40)
TRANSPORT_EXAMPLE = m.encodeTransport(m.peerID("peer-b"), b"hello")
AUTH_RESPONSE_EXAMPLE = m.encodeAuthResponse("rel://127.0.0.1:33080")


class NeverRaisesAnythingElse(unittest.SynchronousTestCase):
    """
    Arbitrary bytes into the decoders: a value or MessageError/AuthError,
    never anything else; and the answer agrees with PROTOCOL.md.
    """

    anyBytes = st.one_of(
        st.binary(max_size=400),
        # Mostly well-formed prefixes, so the checks past the header run too.
        st.tuples(
            st.sampled_from([0, 1, 2, 255]),
            st.integers(0, 255),
            st.binary(max_size=400),
        ).map(lambda t: bytes([t[0], t[1]]) + t[2]),
        st.tuples(st.sampled_from([3, 6, 8, 9, 10, 11]), st.binary(max_size=400)).map(
            lambda t: bytes([1, t[0]]) + t[1]
        ),
        st.binary(max_size=400).map(lambda b: b"\x01\x06\x21\x12\xa4\x42" + b),
        # Messages the encoders built, as sent or slightly damaged, so the
        # accept paths of the decoders run as well as the reject paths.
        _maybeDamaged(st.builds(m.encodeAuth, anyID, st.binary(max_size=200))),
        _maybeDamaged(st.builds(m.encodeTransport, anyID, st.binary(max_size=400))),
        _maybeDamaged(st.text(max_size=120).map(m.encodeAuthResponse)),
    )

    @PROFILE
    @given(data=anyBytes)
    def test_messageType(self, data):
        ok, result = _raisesOnly(self, m.MessageError, m.messageType, data)
        valid = len(data) >= 2 and data[0] == 1 and data[1] in CLIENT_TYPES
        self.assertEqual(ok, valid, (data[:4], result))
        if ok:
            self.assertEqual(result, data[1])

    @PROFILE
    @given(data=anyBytes)
    @example(data=AUTH_EXAMPLE)
    @example(data=m.encodeAuth(b"\x00" * 36, b""))  # the shortest: no token
    @example(data=TRANSPORT_EXAMPLE[:2] + m.MAGIC + m.peerID("peer-c"))  # any header bytes
    def test_decodeAuth(self, data):
        ok, result = _raisesOnly(self, m.MessageError, m.decodeAuth, data)
        valid = len(data) >= 42 and data[2:6] == b"\x21\x12\xa4\x42"
        self.assertEqual(ok, valid, (data[:8], result))
        if ok:
            pid, token = result
            self.assertEqual(len(pid), 36)
            self.assertEqual(data[:2] + b"\x21\x12\xa4\x42" + pid + token, data)

    @PROFILE
    @given(data=anyBytes)
    @example(data=TRANSPORT_EXAMPLE)
    @example(data=m.encodeTransport(m.peerID("peer-b"), b""))  # the shortest: no payload
    @example(data=AUTH_EXAMPLE)  # 38 bytes or more is all it takes
    def test_decodeTransport(self, data):
        ok, result = _raisesOnly(self, m.MessageError, m.decodeTransport, data)
        self.assertEqual(ok, len(data) >= 38, result)
        if ok:
            pid, payload = result
            self.assertEqual(data[:2] + pid + payload, data)

    @PROFILE
    @given(data=anyBytes)
    def test_decodeIDList(self, data):
        ok, result = _raisesOnly(self, m.MessageError, m.decodeIDList, data)
        body = data[2:]
        self.assertEqual(ok, len(body) % 36 == 0, result)
        if ok:
            self.assertTrue(all(len(p) == 36 for p in result))
            self.assertEqual(b"".join(result), body)

    @PROFILE
    @given(data=anyBytes)
    @example(data=AUTH_RESPONSE_EXAMPLE)
    @example(data=m.encodeAuthResponse(""))  # the shortest: an empty URL
    @example(data=m.encodeAuthResponse("rel://relé.example:443"))  # non-ASCII UTF-8
    def test_decodeAuthResponse(self, data):
        ok, result = _raisesOnly(self, m.MessageError, m.decodeAuthResponse, data)
        try:
            utf8 = data[2:].decode("utf-8") is not None
        except UnicodeDecodeError:
            utf8 = False
        self.assertEqual(ok, data[:2] == b"\x01\x07" and utf8, (data[:8], result))
        if ok:
            self.assertEqual(data[:2], b"\x01\x07")
            self.assertEqual(result.encode("utf-8"), data[2:])

    @PROFILE
    @given(
        token=st.one_of(
            st.binary(max_size=300),
            st.binary(max_size=300).map(lambda b: b"\x01" + b),
            st.tuples(st.binary(min_size=32, max_size=32), st.binary(max_size=40)).map(
                lambda t: b"\x01" + t[0] + t[1]
            ),
        ),
        now=st.integers(min_value=0, max_value=2**40),
    )
    def test_validateArbitrary(self, token, now):
        clock = Clock()
        clock.advance(now)
        validator = TokenValidator(SECRET, clock)
        ok, result = _raisesOnly(self, AuthError, validator.validate, token)
        if ok:
            # Only a correctly signed token can get in.
            payload = token[33:]
            key = hashlib.sha256(SECRET.encode()).digest()
            self.assertEqual(token[0], 1)
            self.assertEqual(token[1:33], hmac.new(key, payload, hashlib.sha256).digest())
        else:
            self.assertIn(result.reason, {"malformed", "unknown_algo", "bad_signature", "expired"})

    @PROFILE
    @given(
        payload=st.one_of(
            st.binary(max_size=200),
            st.from_regex(rb"\A[+-]?[0-9]{1,30}\Z"),
            st.integers(min_value=-(2**64), max_value=2**64).map(lambda i: str(i).encode()),
            st.tuples(st.integers(0, 150), st.integers(0, 2**41)).map(
                lambda t: b"0" * t[0] + str(t[1]).encode()
            ),
        ),
        now=st.integers(min_value=0, max_value=2**41),
    )
    def test_validateSignedArbitraryPayload(self, payload, now):
        """
        Correctly signed tokens with any payload: accepted exactly when the
        payload is an unexpired decimal time of at least 10 characters, as
        Go's strconv.ParseInt(payload, 10, 64) reads it (optional sign,
        leading zeros, int64 range).
        """
        key = hashlib.sha256(SECRET.encode()).digest()
        token = b"\x01" + hmac.new(key, payload, hashlib.sha256).digest() + payload
        clock = Clock()
        clock.advance(now)
        ok, result = _raisesOnly(self, AuthError, TokenValidator(SECRET, clock).validate, token)
        parses = (
            re.fullmatch(rb"[+-]?[0-9]+", payload) is not None
            and -(2**63) <= int(payload) <= 2**63 - 1
        )
        valid = len(payload) >= 10 and parses and now <= int(payload)
        self.assertEqual(ok, valid, (payload, now, result))
        if not ok:
            self.assertIn(result.reason, {"malformed", "expired"})

    @PROFILE
    @given(
        expiry=st.integers(min_value=10**9, max_value=2**33),
        fraction=st.floats(min_value=0.001, max_value=0.999),
    )
    def test_validateWithinExpirySecond(self, expiry, fraction):
        """
        "Valid when ... now <= expiry" in whole unix seconds: the Go
        validator compares time.Now().Unix() (truncated) with the expiry, so
        a token is still valid during its expiry second.
        """
        clock = Clock()
        clock.advance(expiry + fraction)
        TokenValidator(SECRET, clock).validate(generateToken(SECRET, expiry))

    @PROFILE
    @given(
        # Clock.seconds() is a float: keep to times it holds exactly.
        expiry=st.integers(min_value=10**9, max_value=2**52),
        delta=st.integers(min_value=-(10**6), max_value=10**6),
        algo=st.integers(0, 255),
    )
    def test_validateGenerated(self, expiry, delta, algo):
        """
        A generated token is valid exactly while now <= expiry, and only with
        algo 1 and the right secret.
        """
        clock = Clock()
        now = max(0, expiry + delta)
        clock.advance(now)
        token = generateToken(SECRET, expiry)
        validator = TokenValidator(SECRET, clock)
        if now <= expiry:
            validator.validate(token)
        else:
            self.assertEqual(
                self.assertRaises(AuthError, validator.validate, token).reason, "expired"
            )
        self.assertRaises(AuthError, TokenValidator("other-secret", clock).validate, token)
        if algo != 1:
            self.assertRaises(AuthError, validator.validate, bytes([algo]) + token[1:])

    @PROFILE
    @given(
        zeros=st.integers(min_value=1, max_value=212 - 75 - 10),
        expiry=st.integers(min_value=NOW, max_value=9_999_999_999),
    )
    def test_validateZeroPaddedExpiry(self, zeros, expiry):
        """
        PROTOCOL.md 2.1: the payload is the ASCII decimal expiry, at least 10
        characters, no upper bound but the 212-byte handshake.  A correctly
        signed, zero-padded, unexpired expiry is valid (the Go validator
        parses it with strconv.ParseInt).
        """
        payload = b"0" * zeros + str(expiry).encode()
        key = hashlib.sha256(SECRET.encode()).digest()
        token = b"\x01" + hmac.new(key, payload, hashlib.sha256).digest() + payload
        self.assertLessEqual(len(m.encodeAuth(m.peerID("p"), token)), 212)
        clock = Clock()
        clock.advance(NOW)
        TokenValidator(SECRET, clock).validate(token)


# -- Store: a stateful model of PROTOCOL.md 2.2 ------------------------------------


class FakePeer:
    """
    A connection as the store sees it: an id and two notification methods
    that record what they are told.
    """

    serial = 0

    def __init__(self, pid):
        FakePeer.serial += 1
        self.serial = FakePeer.serial
        self.peerID = pid
        self.received = []

    def peersOnline(self, pids):
        self.received.append(("online", tuple(pids)))

    def peersWentOffline(self, pids):
        self.received.append(("offline", tuple(pids)))

    def __repr__(self):
        return f"<FakePeer #{self.serial} {self.peerID[-2:].hex()}>"


NAMES = ["a", "b", "c", "d"]
PIDS = [m.peerID(n) for n in NAMES]


class StoreMachine(RuleBasedStateMachine):
    """
    Drives a Store the way the relay does with a peer's life cycle, and a
    model of PROTOCOL.md 2.2 next to it:

      - connect(id): stored (replacing any older connection of that id, which
        stays open until it disconnects); everyone with online interest in
        the id hears PeersOnline once and loses that online interest.
      - disconnect(conn): its subscriptions go; if it is still the stored
        connection of its id, the id goes offline and everyone with offline
        interest in it hears PeersWentOffline (interest kept).  A replaced
        connection's disconnect notifies nobody.
      - subscribe(conn, ids): online and offline interest in each; the reply
        lists the subscribed ids that are online, in order.
      - unsubscribe(conn, ids): both interests dropped.
    """

    def __init__(self):
        super().__init__()
        self.store = Store()
        self.live = []  # open connections, stored or replaced
        self.stored = {}  # model: id -> connection
        self.onlineInterest = {}  # conn -> set of ids
        self.offlineInterest = {}
        self.expected = {}  # conn -> expected notifications, in order

    def _expect(self, conn, event):
        self.expected[conn].append(event)

    @rule(i=st.integers(0, len(PIDS) - 1))
    def connect(self, i):
        pid = PIDS[i]
        conn = FakePeer(pid)
        self.expected[conn] = []
        self.onlineInterest[conn] = set()
        self.offlineInterest[conn] = set()
        old = self.store.add(conn)
        assert old is self.stored.get(pid), (old, self.stored.get(pid))
        self.store.cameOnline(pid)
        self.live.append(conn)
        self.stored[pid] = conn
        for sub in self.live:
            if pid in self.onlineInterest[sub]:
                self.onlineInterest[sub].discard(pid)
                self._expect(sub, ("online", (pid,)))

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def disconnect(self, data):
        conn = data.draw(st.sampled_from(self.live))
        self.live.remove(conn)
        removed = self.store.remove(conn)
        self.store.dropSubscriber(conn)
        wasStored = self.stored.get(conn.peerID) is conn
        assert removed == wasStored, (removed, wasStored)
        self.onlineInterest[conn].clear()
        self.offlineInterest[conn].clear()
        if wasStored:
            del self.stored[conn.peerID]
            self.store.wentOffline(conn.peerID)
            for sub in self.live:
                if conn.peerID in self.offlineInterest[sub]:
                    self._expect(sub, ("offline", (conn.peerID,)))

    @precondition(lambda self: self.live)
    @rule(data=st.data(), picks=st.lists(st.integers(0, len(PIDS) - 1), unique=True))
    def subscribe(self, data, picks):
        conn = data.draw(st.sampled_from(self.live))
        pids = [PIDS[i] for i in picks]
        reply = self.store.subscribe(conn, pids)
        assert list(reply) == [p for p in pids if p in self.stored], (reply, pids)
        self.onlineInterest[conn].update(pids)
        self.offlineInterest[conn].update(pids)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), picks=st.lists(st.integers(0, len(PIDS) - 1), unique=True))
    def unsubscribe(self, data, picks):
        conn = data.draw(st.sampled_from(self.live))
        pids = [PIDS[i] for i in picks]
        self.store.unsubscribe(conn, pids)
        self.onlineInterest[conn].difference_update(pids)
        self.offlineInterest[conn].difference_update(pids)

    @invariant()
    def notificationsMatch(self):
        for conn, expected in self.expected.items():
            assert conn.received == expected, (conn, conn.received, expected)

    @invariant()
    def storedMatches(self):
        assert len(self.store) == len(self.stored)
        for pid in PIDS:
            assert self.store.peers.get(pid) is self.stored.get(pid), pid


class StoreModelTests(unittest.SynchronousTestCase):
    def test_storeMatchesModel(self):
        run_state_machine_as_test(StoreMachine, settings=settings(PROFILE, stateful_step_count=40))
