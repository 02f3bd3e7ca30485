"""
Frame and payload codecs of the inter-pod protocol (ADR-0014; docs/cluster.md).

Pure functions over C{bytes}: no I/O, no clock of their own (the caller passes
"now"), so every byte layout can be checked against the test vectors without a
reactor. Every decoding failure is a L{FrameError} whose C{reason} is a metric
label; decoders raise nothing else.

Frame: C{[type u8][length u16][payload]}, all integers big-endian.

HELLO v2 body: C{[version=2][addr_len u8][announce addr][unix seconds u64]
[hmac_len u8 = 0 or 32][hmac]}, hmac = HMAC-SHA256(cluster secret as given,
everything before hmac_len).

Beyond the original, the secured handshake (v3) and sealed frames: after its
HELLO the dialer sends CHALLENGE C{[version=3][nonce 32]}, the acceptor answers
AUTH C{[nonce 32][mac 32]}, the dialer CONFIRM C{[mac 32]}. Both MACs and the
two per-direction frame keys come from the cluster secret and a hash of the
whole exchange (both nonces included), so each side proves it holds the
secret on this connection, now. Every later frame is sealed: its payload is
followed by a 16-byte tag, HMAC-SHA256(direction key, [seqno u64][type u8]
[length u16][payload]) truncated, seqno counting the frames sent in that
direction from 0. Original pods ignore the three new types, and never see
them unless they dial or are dialed by a pod in compatibility mode (see
L{relay.cluster.streams}).
"""

import hashlib
import hmac
import struct
from dataclasses import dataclass

from relay import messages

HELLO = 0x00
WHO_HAS = 0x01
I_HAVE = 0x02
# Beyond: presence push. Original pods ignore unknown types.
PEER_GONE = 0x03
# Beyond: the secured handshake (v3). Original pods ignore these types.
CHALLENGE = 0x04
AUTH = 0x05
CONFIRM = 0x06
FWD = 0x14
PING = 0x20
PONG = 0x21

FRAME_NAMES = {
    HELLO: "HELLO",
    WHO_HAS: "WHO_HAS",
    I_HAVE: "I_HAVE",
    PEER_GONE: "PEER_GONE",
    CHALLENGE: "CHALLENGE",
    AUTH: "AUTH",
    CONFIRM: "CONFIRM",
    FWD: "FWD",
    PING: "PING",
    PONG: "PONG",
}

HEADER_SIZE = 3
MAX_PAYLOAD = 0xFFFF
PEER_ID_SIZE = messages.ID_SIZE

HELLO_VERSION = 2
HELLO_HMAC_SIZE = 32
HELLO_MAX_ADDRESS = 255
HELLO_WINDOW = 300
HELLO_MAX_PAYLOAD = 2 + HELLO_MAX_ADDRESS + 8 + 1 + HELLO_HMAC_SIZE

SECURE_VERSION = 3
NONCE_SIZE = 32
MAC_SIZE = 32
TAG_SIZE = 16
CHALLENGE_SIZE = 1 + NONCE_SIZE
AUTH_SIZE = NONCE_SIZE + MAC_SIZE

# Transport message header of the peer protocol: version 1, type 3.
TRANSPORT_HEADER = bytes((messages.VERSION, messages.TRANSPORT))
TRANSPORT_MIN_SIZE = messages.TRANSPORT_HEADER_SIZE

# HELLO rejection reasons (docs/cluster.md); relay.cluster.streams adds the last two.
HMAC_MISMATCH = "hmac_mismatch"
UNSIGNED_BUT_REQUIRED = "unsigned_but_required"
SIGNED_BUT_UNSUPPORTED = "signed_but_unsupported"
STALE_TIMESTAMP = "stale_timestamp"
MALFORMED = "malformed"
TIMEOUT = "timeout"
FIRST_FRAME_NOT_HELLO = "first_frame_not_hello"
# Beyond: stream rejections the original does not have.
ADDRESS_MISMATCH = "address_mismatch"
REPLAYED = "replayed"
AUTH_MISMATCH = "auth_mismatch"
NOT_SECURED = "not_secured"
CONNECTION_LIMIT = "connection_limit"
EVICTED = "evicted"

_HEADER = struct.Struct(">BH")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")


class FrameError(Exception):
    """
    A frame or payload that cannot be accepted.

    @ivar reason: a short label (a HELLO rejection reason, or C{malformed}).
    """

    def __init__(self, reason, detail=""):
        Exception.__init__(self, reason, detail)
        self.reason = reason
        self.detail = detail

    def __str__(self):
        if self.detail:
            return f"{self.reason}: {self.detail}"
        return self.reason


def frameName(frameType):
    return FRAME_NAMES.get(frameType, f"0x{frameType:02x}")


# Frame layer


def encodeFrame(frameType, payload=b""):
    """
    One whole frame.

    @raise FrameError: (C{malformed}) if the payload does not fit a frame.
    """
    if len(payload) > MAX_PAYLOAD:
        raise FrameError(MALFORMED, f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    return _HEADER.pack(frameType, len(payload)) + payload


class FrameReader:
    """
    Reassemble whole frames from byte chunks split at any boundary.

    The buffer never holds more than one incomplete frame (at most
    C{HEADER_SIZE + MAX_PAYLOAD} bytes), because every complete frame is
    handed out at once.
    """

    def __init__(self):
        self._buffer = bytearray()

    def feed(self, data):
        """
        @return: a list of C{(frameType, payload)} for every frame completed
            by C{data}, in order.
        """
        buffer = self._buffer
        buffer += data
        frames = []
        offset = 0
        available = len(buffer)
        while available - offset >= HEADER_SIZE:
            frameType, length = _HEADER.unpack_from(buffer, offset)
            end = offset + HEADER_SIZE + length
            if end > available:
                break
            frames.append((frameType, bytes(buffer[offset + HEADER_SIZE : end])))
            offset = end
        if offset:
            del buffer[:offset]
        return frames

    def nextHeader(self):
        """
        @return: C{(frameType, length)} of the frame being reassembled, or
            None while fewer than C{HEADER_SIZE} bytes are buffered.
        """
        if len(self._buffer) < HEADER_SIZE:
            return None
        return _HEADER.unpack_from(self._buffer, 0)


# Payloads


@dataclass(frozen=True)
class Hello:
    address: str
    timestamp: int
    signed: bool


@dataclass(frozen=True)
class WhoHas:
    peerID: bytes


@dataclass(frozen=True)
class IHave:
    peerID: bytes
    seqno: int


@dataclass(frozen=True)
class PeerGone:
    peerID: bytes


@dataclass(frozen=True)
class Fwd:
    destinationID: bytes
    message: bytes


@dataclass(frozen=True)
class Ping:
    pass


@dataclass(frozen=True)
class Pong:
    pass


@dataclass(frozen=True)
class Unknown:
    """
    A frame type this pod does not know (or the reserved OPEN..CLOSE):
    callers ignore it, for forward compatibility.
    """

    frameType: int
    payload: bytes


def _asBytes(secret):
    if secret is None:
        return b""
    if isinstance(secret, str):
        return secret.encode("utf-8")
    return bytes(secret)


def _helloMAC(key, body):
    """
    The HELLO signature: HMAC-SHA256 of the body under the cluster secret.
    """
    return hmac.new(key, body, hashlib.sha256).digest()


def encodeHello(address, timestamp, secret):
    """
    A HELLO v2 payload announcing C{address} (C{host:port}).

    @param timestamp: unix seconds (int).
    @param secret: the cluster secret as given (str or bytes); empty for an
        unsigned HELLO.
    """
    encoded = address.encode("utf-8")
    if not encoded or len(encoded) > HELLO_MAX_ADDRESS:
        raise FrameError(MALFORMED, f"announce address of {len(encoded)} bytes")
    body = bytes((HELLO_VERSION, len(encoded))) + encoded + _U64.pack(int(timestamp))
    key = _asBytes(secret)
    if key:
        return body + bytes((HELLO_HMAC_SIZE,)) + _helloMAC(key, body)
    return body + b"\x00"


def decodeHello(payload, secret, now):
    """
    Parse and authenticate a HELLO v2 payload.

    The signature policy is checked before the timestamp, so an unauthenticated
    timestamp never decides the reason.

    @param secret: the cluster secret as given; empty if this pod has none.
    @param now: unix seconds (int or float).
    @return: a L{Hello}.
    @raise FrameError: with one of the HELLO rejection reasons.
    """
    size = len(payload)
    if size < 2:
        raise FrameError(MALFORMED, f"HELLO of {size} bytes")
    if payload[0] != HELLO_VERSION:
        raise FrameError(MALFORMED, f"HELLO version {payload[0]}")
    addressLength = payload[1]
    bodyEnd = 2 + addressLength + 8
    if addressLength == 0 or size < bodyEnd + 1:
        raise FrameError(MALFORMED, f"HELLO of {size} bytes with addr_len {addressLength}")
    hmacLength = payload[bodyEnd]
    if hmacLength not in (0, HELLO_HMAC_SIZE):
        raise FrameError(MALFORMED, f"HELLO hmac_len {hmacLength}")
    if size != bodyEnd + 1 + hmacLength:
        raise FrameError(MALFORMED, f"HELLO of {size} bytes, expected {bodyEnd + 1 + hmacLength}")
    try:
        address = bytes(payload[2 : 2 + addressLength]).decode("utf-8")
    except UnicodeDecodeError:
        raise FrameError(MALFORMED, "HELLO address is not UTF-8") from None
    (timestamp,) = _U64.unpack_from(payload, 2 + addressLength)

    key = _asBytes(secret)
    if key:
        if hmacLength == 0:
            raise FrameError(UNSIGNED_BUT_REQUIRED, f"unsigned HELLO from {address!r}")
        expected = _helloMAC(key, bytes(payload[:bodyEnd]))
        if not hmac.compare_digest(expected, bytes(payload[bodyEnd + 1 :])):
            raise FrameError(HMAC_MISMATCH, f"HELLO from {address!r}")
    elif hmacLength:
        raise FrameError(
            SIGNED_BUT_UNSUPPORTED, f"signed HELLO from {address!r} but no cluster secret here"
        )

    if abs(now - timestamp) > HELLO_WINDOW:
        raise FrameError(STALE_TIMESTAMP, f"HELLO from {address!r} is {int(now - timestamp)} s off")
    return Hello(address, timestamp, bool(hmacLength))


def helloFrame(address, timestamp, secret):
    return encodeFrame(HELLO, encodeHello(address, timestamp, secret))


def whoHasFrame(peerID):
    return encodeFrame(WHO_HAS, _checkID(peerID))


def iHaveFrame(peerID, seqno):
    return encodeFrame(I_HAVE, _checkID(peerID) + _U32.pack(seqno & 0xFFFFFFFF))


def peerGoneFrame(peerID):
    return encodeFrame(PEER_GONE, _checkID(peerID))


def fwdFrame(destinationID, message):
    # One copy of the message per forwarded packet: no intermediate payload.
    destinationID = _checkID(destinationID)
    length = PEER_ID_SIZE + len(message)
    if length > MAX_PAYLOAD:
        raise FrameError(MALFORMED, f"payload of {length} bytes exceeds {MAX_PAYLOAD}")
    return b"".join((_HEADER.pack(FWD, length), destinationID, message))


# The secured handshake (v3) and sealed frames


def challengeFrame(nonce):
    return encodeFrame(CHALLENGE, bytes((SECURE_VERSION,)) + _checkSize(nonce, NONCE_SIZE, "nonce"))


def decodeChallenge(payload):
    """
    @return: the dialer's nonce.
    @raise FrameError: (C{malformed}) for a wrong size or version.
    """
    if len(payload) != CHALLENGE_SIZE or payload[0] != SECURE_VERSION:
        raise FrameError(MALFORMED, f"CHALLENGE of {len(payload)} bytes")
    return bytes(payload[1:])


def authFrame(nonce, mac):
    return encodeFrame(
        AUTH, _checkSize(nonce, NONCE_SIZE, "nonce") + _checkSize(mac, MAC_SIZE, "mac")
    )


def decodeAuth(payload):
    """
    @return: C{(acceptor nonce, acceptor mac)}.
    @raise FrameError: (C{malformed}) for a wrong size.
    """
    if len(payload) != AUTH_SIZE:
        raise FrameError(MALFORMED, f"AUTH of {len(payload)} bytes")
    return bytes(payload[:NONCE_SIZE]), bytes(payload[NONCE_SIZE:])


def confirmFrame(mac):
    return encodeFrame(CONFIRM, _checkSize(mac, MAC_SIZE, "mac"))


def decodeConfirm(payload):
    """
    @return: the dialer's mac.
    @raise FrameError: (C{malformed}) for a wrong size.
    """
    if len(payload) != MAC_SIZE:
        raise FrameError(MALFORMED, f"CONFIRM of {len(payload)} bytes")
    return bytes(payload)


class Handshake:
    """
    The keys of one secured handshake, from the cluster secret and what both
    sides sent: the dialer's HELLO payload and the two nonces.

    The HELLO's own HMAC uses the secret as given (the original's format);
    everything here uses a key derived from it, so no MAC of one kind can
    stand in for another.
    """

    def __init__(self, secret, helloPayload, dialerNonce, acceptorNonce):
        base = _helloMAC(_asBytes(secret), b"relay cluster v3")
        hello = bytes(helloPayload)
        transcript = hashlib.sha256(
            _U32.pack(len(hello)) + hello + bytes(dialerNonce) + bytes(acceptorNonce)
        ).digest()
        self.acceptorMAC = _helloMAC(base, b"acceptor proof" + transcript)
        self.dialerMAC = _helloMAC(base, b"dialer proof" + transcript)
        self.dialerKey = _helloMAC(base, b"dialer frames" + transcript)
        self.acceptorKey = _helloMAC(base, b"acceptor frames" + transcript)

    def side(self, dialer):
        """
        The handshake as one end sees it, so that both ends run the same
        code: the dialer proves itself with C{dialerMAC} and seals with
        C{dialerKey}, the acceptor with the other two.

        @return: a L{HandshakeSide}.
        """
        if dialer:
            return HandshakeSide(self.dialerMAC, self.acceptorMAC, self.dialerKey, self.acceptorKey)
        return HandshakeSide(self.acceptorMAC, self.dialerMAC, self.acceptorKey, self.dialerKey)


@dataclass(frozen=True)
class HandshakeSide:
    """
    One end's view of a L{Handshake}.

    @ivar ownMAC: the MAC this end sends to prove it holds the secret.
    @ivar remoteMAC: the MAC it expects from the other end.
    @ivar sendKey: the key that seals the frames it sends.
    @ivar receiveKey: the key that checks the frames it receives.
    """

    ownMAC: bytes
    remoteMAC: bytes
    sendKey: bytes
    receiveKey: bytes


class _Tags:
    """
    The tags of one direction of a secured stream, numbered from 0.
    """

    def __init__(self, key):
        self._mac = hmac.new(key, digestmod=hashlib.sha256)
        self._seqno = 0

    def _tag(self, header, body):
        mac = self._mac.copy()
        mac.update(_U64.pack(self._seqno))
        mac.update(header)
        mac.update(body)
        return mac.digest()[:TAG_SIZE]


class Sealer(_Tags):
    """
    Seals the frames of one direction of a secured stream.
    """

    def seal(self, frame):
        """
        @param frame: one whole encoded frame.
        @return: the same frame with its tag appended (and its length
            field grown by L{TAG_SIZE}).
        @raise FrameError: (C{malformed}) if the tag does not fit.
        """
        length = len(frame) - HEADER_SIZE + TAG_SIZE
        if length > MAX_PAYLOAD:
            raise FrameError(MALFORMED, f"payload of {length} bytes exceeds {MAX_PAYLOAD}")
        body = memoryview(frame)[HEADER_SIZE:]
        tag = self._tag(memoryview(frame)[:HEADER_SIZE], body)
        self._seqno += 1
        return b"".join((_HEADER.pack(frame[0], length), body, tag))


class Opener(_Tags):
    """
    Checks and strips the tags of one direction of a secured stream.
    """

    def open(self, frameType, payload):
        """
        @return: the payload without its tag.
        @raise FrameError: (C{auth_mismatch}) for a missing or wrong tag
            (forged, replayed, reordered or dropped frame).
        """
        size = len(payload) - TAG_SIZE
        if size < 0:
            raise FrameError(
                AUTH_MISMATCH, f"{frameName(frameType)} of {len(payload)} bytes has no tag"
            )
        body = payload[:size]
        if not hmac.compare_digest(self._tag(_HEADER.pack(frameType, size), body), payload[size:]):
            raise FrameError(AUTH_MISMATCH, f"{frameName(frameType)} tag at seqno {self._seqno}")
        self._seqno += 1
        return body


def _checkSize(value, size, name):
    if len(value) != size:
        raise FrameError(MALFORMED, f"{name} of {len(value)} bytes, expected {size}")
    return bytes(value)


def pingFrame():
    return encodeFrame(PING)


def pongFrame():
    return encodeFrame(PONG)


def _checkID(peerID, name="peer id"):
    if len(peerID) != PEER_ID_SIZE:
        raise FrameError(MALFORMED, f"{name} of {len(peerID)} bytes, expected {PEER_ID_SIZE}")
    return bytes(peerID)


def _empty(name, payload, value):
    if payload:
        raise FrameError(MALFORMED, f"{name} of {len(payload)} bytes, expected 0")
    return value


def decodePayload(frameType, payload):
    """
    Decode the payload of any frame but HELLO (which needs the secret and the
    clock: see L{decodeHello}).

    @return: a L{WhoHas}, L{IHave}, L{PeerGone}, L{Fwd}, L{Ping}, L{Pong},
        L{Unknown} (for any type not listed, including HELLO).
    @raise FrameError: (C{malformed}) for a known type with a bad payload.
    """
    if frameType == FWD:
        if len(payload) < PEER_ID_SIZE:
            raise FrameError(MALFORMED, f"FWD of {len(payload)} bytes, shorter than an id")
        return Fwd(bytes(payload[:PEER_ID_SIZE]), bytes(payload[PEER_ID_SIZE:]))
    if frameType == WHO_HAS:
        return WhoHas(_checkID(payload, "WHO_HAS"))
    if frameType == I_HAVE:
        if len(payload) != PEER_ID_SIZE + 4:
            raise FrameError(
                MALFORMED, f"I_HAVE of {len(payload)} bytes, expected {PEER_ID_SIZE + 4}"
            )
        return IHave(bytes(payload[:PEER_ID_SIZE]), _U32.unpack_from(payload, PEER_ID_SIZE)[0])
    if frameType == PEER_GONE:
        return PeerGone(_checkID(payload, "PEER_GONE"))
    if frameType == PING:
        return _empty("PING", payload, Ping())
    if frameType == PONG:
        return _empty("PONG", payload, Pong())
    return Unknown(frameType, bytes(payload))


def isTransportMessage(message):
    """
    Whether C{message} looks like a whole peer-protocol Transport message,
    the only thing a FWD may carry to a peer.
    """
    return len(message) >= TRANSPORT_MIN_SIZE and message[:2] == TRANSPORT_HEADER
