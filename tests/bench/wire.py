"""
The bytes the load generator puts on the wire and expects back, built once.

Everything here is plain Python with no Twisted and no relay code, so the
benchmark checks the relay with an independent implementation of the peer
protocol (PROTOCOL.md section 2) and of RFC 6455 framing.

Client frames are masked (the relay must unmask them); one random mask per
connection is reused for every frame of that connection, which lets a frame
be pre-built once: only the 8-byte sequence number at the start of the
transport payload changes between messages, and its masked form is one XOR.
"""

import base64
import hashlib
import hmac
import math
import os
import time

PROTO_VERSION = 1
T_TRANSPORT = 3
T_CLOSE = 4
T_HEALTHCHECK = 5
T_AUTH = 6
T_AUTH_RESPONSE = 7
T_SUBSCRIBE = 8
T_PEERS_ONLINE = 10
T_PEERS_GONE = 11

MAGIC = b"\x21\x12\xa4\x42"
ID_LEN = 36
HDR_LEN = 2
TRANSPORT_HDR = HDR_LEN + ID_LEN  # 38
SEQ_LEN = 8
MAX_MESSAGE = 8820
MAX_SIZE = MAX_MESSAGE - TRANSPORT_HDR  # payload bytes after the 38-byte header

OP_CONT = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

HEALTHCHECK = bytes([PROTO_VERSION, T_HEALTHCHECK])


def peerId(name):
    """
    The relay's 36-byte id of a peer name: C{b"sha-" + sha256(name)}.
    """
    if isinstance(name, str):
        name = name.encode()
    return b"sha-" + hashlib.sha256(name).digest()


def token(secret, ttl=3600, now=None):
    """
    An HMAC v2 token: C{[1][HMAC-SHA256(sha256(secret), expiry)][expiry]}.
    """
    if isinstance(secret, str):
        secret = secret.encode()
    key = hashlib.sha256(secret).digest()
    payload = str(int(time.time() if now is None else now) + ttl).encode()
    return b"\x01" + hmac.new(key, payload, hashlib.sha256).digest() + payload


def authMessage(pid, tok):
    return bytes([PROTO_VERSION, T_AUTH]) + MAGIC + pid + tok


def transportMessage(dst, payload):
    return bytes([PROTO_VERSION, T_TRANSPORT]) + dst + payload


def idListMessage(kind, ids):
    return bytes([PROTO_VERSION, kind]) + b"".join(ids)


def payloadTail(pair, size):
    """
    The fixed bytes after the sequence number in pair C{pair}'s payloads
    (a pattern that differs per pair, so a misrouted message shows).
    """
    n = max(0, size - SEQ_LEN)
    return bytes((k * 7 + pair * 13 + 1) & 0xFF for k in range(n))


# ---------------------------------------------------------------------------
# RFC 6455 frames


def applyMask(data, key):
    """
    XOR C{data} with the 4-byte C{key} repeated from offset 0.
    """
    n = len(data)
    if not n:
        return b""
    stream = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")


def frameHeader(n, masked, opcode=OP_BINARY, fin=True):
    first = (0x80 if fin else 0) | opcode
    bit = 0x80 if masked else 0
    if n < 126:
        return bytes([first, bit | n])
    if n < 0x10000:
        return bytes([first, bit | 126]) + n.to_bytes(2, "big")
    return bytes([first, bit | 127]) + n.to_bytes(8, "big")


def clientFrame(payload, key, opcode=OP_BINARY, fin=True):
    """
    A masked client frame (C{key}: the 4-byte mask).
    """
    return frameHeader(len(payload), True, opcode, fin) + key + applyMask(payload, key)


def serverFrame(payload, opcode=OP_BINARY, fin=True):
    """
    An unmasked server frame, as the relay sends it.
    """
    return frameHeader(len(payload), False, opcode, fin) + payload


def upgradeRequest(host, port, path="/relay"):
    """
    C{(request bytes, expected Sec-WebSocket-Accept value)}.
    """
    key = base64.b64encode(os.urandom(16))
    req = (
        b"GET " + path.encode() + b" HTTP/1.1\r\n"
        b"Host: " + f"{host}:{port}".encode() + b"\r\n"
        b"Upgrade: websocket\r\n"
        b"Connection: Upgrade\r\n"
        b"Sec-WebSocket-Key: " + key + b"\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n"
    )
    return req, acceptFor(key)


def acceptFor(key):
    """
    The Sec-WebSocket-Accept value for a Sec-WebSocket-Key (RFC 6455 4.2.2).
    """
    return base64.b64encode(hashlib.sha1(key + WS_GUID).digest())


def checkUpgradeResponse(head, accept):
    """
    Raise L{ValueError} unless C{head} (the response up to the blank line) is
    a 101 with the right accept value.
    """
    lines = head.split(b"\r\n")
    status = lines[0].split(None, 2)
    if len(status) < 2 or status[1] != b"101":
        raise ValueError(f"upgrade refused: {lines[0]!r}")
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"sec-websocket-accept":
            if value.strip() != accept:
                raise ValueError("wrong Sec-WebSocket-Accept")
            return
    raise ValueError("no Sec-WebSocket-Accept")


class ServerFrameReader:
    """
    Incremental parser of the relay's (unmasked) frames into messages.

    C{feed(data)} returns a list of C{(opcode, payload)}: data messages
    reassembled from fragments (C{OP_BINARY} / C{OP_TEXT}) and control
    frames as they come.  A masked server frame, a reserved bit or an
    unknown opcode raises L{ValueError}.
    """

    def __init__(self):
        self.buf = b""
        self._fragments = None
        self._fragOp = None

    def feed(self, data):
        buf = self.buf + data if self.buf else data
        out = []
        pos = 0
        n = len(buf)
        while n - pos >= 2:
            b0 = buf[pos]
            b1 = buf[pos + 1]
            ln = b1 & 0x7F
            hl = 2
            if ln == 126:
                if n - pos < 4:
                    break
                ln = int.from_bytes(buf[pos + 2 : pos + 4], "big")
                hl = 4
            elif ln == 127:
                if n - pos < 10:
                    break
                ln = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                hl = 10
            if b1 & 0x80:
                raise ValueError("masked frame from the server")
            if b0 & 0x70:
                raise ValueError("reserved bits set in a server frame")
            if n - pos < hl + ln:
                break
            payload = buf[pos + hl : pos + hl + ln]
            pos += hl + ln
            op = b0 & 0x0F
            fin = b0 & 0x80
            if op >= 0x8:
                if op not in (OP_CLOSE, OP_PING, OP_PONG):
                    raise ValueError(f"unknown control opcode {op}")
                out.append((op, payload))
            elif op == OP_CONT:
                if self._fragments is None:
                    raise ValueError("continuation without a start")
                self._fragments.append(payload)
                if fin:
                    out.append((self._fragOp, b"".join(self._fragments)))
                    self._fragments = None
            elif op in (OP_BINARY, OP_TEXT):
                if self._fragments is not None:
                    raise ValueError("new data frame inside a fragmented message")
                if fin:
                    out.append((op, payload))
                else:
                    self._fragments = [payload]
                    self._fragOp = op
            else:
                raise ValueError(f"unknown data opcode {op}")
        self.buf = buf[pos:]
        return out


# ---------------------------------------------------------------------------
# Pre-built streams of transport messages


class SendTemplate:
    """
    Masked client frames of transport messages C{[1][3][dst][seq u64][tail]}
    from one connection (mask C{key}), built once.

    C{frames(a, b)} is the byte stream of sequence numbers C{a .. b-1}: a
    join of pre-masked constant parts and one XOR per message.
    """

    def __init__(self, dst, tail, key):
        plain = transportMessage(dst, bytes(SEQ_LEN) + tail)
        frame = clientFrame(plain, key)
        hl = len(frame) - len(plain)  # header + mask key
        self.frameLen = len(frame)
        seqAt = hl + TRANSPORT_HDR
        self.head = frame[:seqAt]
        self.tail = frame[seqAt + SEQ_LEN :]
        self.sep = self.tail + self.head
        # the mask bytes that cover the sequence number (payload offset 38)
        stream = key * 4
        phase = TRANSPORT_HDR % 4
        self.seqMask = int.from_bytes(stream[phase : phase + SEQ_LEN], "big")

    def frame(self, seq):
        return self.head + (seq ^ self.seqMask).to_bytes(SEQ_LEN, "big") + self.tail

    def frames(self, a, b):
        m = self.seqMask
        return (
            self.head + self.sep.join([(s ^ m).to_bytes(8, "big") for s in range(a, b)]) + self.tail
        )


class ExpectTemplate:
    """
    The exact server frames a receiver expects for transport messages from
    C{src} with payload C{[seq u64][tail]}: C{frames(a, b)} is their stream
    for sequence numbers C{a .. b-1}.
    """

    def __init__(self, src, tail):
        plain = transportMessage(src, bytes(SEQ_LEN) + tail)
        frame = serverFrame(plain)
        hl = len(frame) - len(plain)
        self.frameLen = len(frame)
        seqAt = hl + TRANSPORT_HDR
        self.head = frame[:seqAt]
        self.tail = frame[seqAt + SEQ_LEN :]
        self.sep = self.tail + self.head
        self.payloadTail = tail

    def frames(self, a, b):
        return self.head + self.sep.join([s.to_bytes(8, "big") for s in range(a, b)]) + self.tail


# ---------------------------------------------------------------------------
# Statistics


def percentile(sortedValues, p):
    """
    The nearest-rank percentile (C{p} in [0, 1]) of an ascending list; None
    for an empty one.  Same definition as the Go load generator's: the value
    at index C{ceil(p * n) - 1}.
    """
    n = len(sortedValues)
    if not n:
        return None
    idx = min(n - 1, max(0, math.ceil(p * n) - 1))
    return sortedValues[idx]


def median(values):
    vs = sorted(v for v in values if v is not None)
    if not vs:
        return None
    mid = len(vs) // 2
    return vs[mid] if len(vs) % 2 else (vs[mid - 1] + vs[mid]) / 2
