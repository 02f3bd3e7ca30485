"""
A minimal RFC 6455 WebSocket client for tests, written from the RFC alone.

It does only what the conformance tests need and shows everything it sees:
the HTTP upgrade (status line and headers), every frame (data messages, close
frames, control frames) and the raw number of bytes received after the
upgrade.  Frames it sends are masked with a fresh random key each; it can also
send deliberately odd frames (text, fragments, raw bytes) to probe a server.

No Autobahn, no relay code: an independent client.
"""

import base64
import hashlib
import os
import struct
from collections import deque

from twisted.internet import defer, protocol
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA


class ConnectionClosed(Exception):
    """
    The connection ended while a message was awaited.
    """


class ProtocolViolation(Exception):
    """
    The server broke RFC 6455 (or sent something other than binary).
    """


def applyMask(data, key):
    """
    XOR C{data} with the 4-byte C{key} repeated (RFC 6455 5.3).
    """
    n = len(data)
    if not n:
        return b""
    stream = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")


def encodeFrame(opcode, payload, fin=True, mask=True, maskKey=None, rsv=0):
    """
    One frame: 7-bit, 16-bit or 64-bit payload length as the size requires.
    """
    payload = bytes(payload)
    first = (0x80 if fin else 0) | ((rsv & 7) << 4) | (opcode & 0xF)
    maskBit = 0x80 if mask else 0
    n = len(payload)
    if n < 126:
        header = struct.pack(">BB", first, maskBit | n)
    elif n < 0x10000:
        header = struct.pack(">BBH", first, maskBit | 126, n)
    else:
        header = struct.pack(">BBQ", first, maskBit | 127, n)
    if not mask:
        return header + payload
    key = maskKey if maskKey is not None else os.urandom(4)
    return header + key + applyMask(payload, key)


class FrameParser:
    """
    Incremental frame parser: feed bytes, get complete frames as
    C{(fin, rsv, opcode, masked, payload)}.
    """

    def __init__(self):
        self._buffer = b""

    def feed(self, data):
        self._buffer += data
        frames = []
        while True:
            frame = self._one()
            if frame is None:
                return frames
            frames.append(frame)

    def _one(self):
        buf = self._buffer
        if len(buf) < 2:
            return None
        b0, b1 = buf[0], buf[1]
        fin = bool(b0 & 0x80)
        rsv = (b0 >> 4) & 7
        opcode = b0 & 0xF
        masked = bool(b1 & 0x80)
        length = b1 & 0x7F
        offset = 2
        if length == 126:
            if len(buf) < 4:
                return None
            (length,) = struct.unpack(">H", buf[2:4])
            offset = 4
        elif length == 127:
            if len(buf) < 10:
                return None
            (length,) = struct.unpack(">Q", buf[2:10])
            offset = 10
        key = None
        if masked:
            if len(buf) < offset + 4:
                return None
            key = buf[offset : offset + 4]
            offset += 4
        if len(buf) < offset + length:
            return None
        payload = buf[offset : offset + length]
        if masked:
            payload = applyMask(payload, key)
        self._buffer = buf[offset + length :]
        return fin, rsv, opcode, masked, payload


class RawWebSocketClient(protocol.Protocol):
    """
    The client end of one WebSocket connection.

    @ivar status: HTTP status of the upgrade response (None until read).
    @ivar headers: response headers, names lower-cased.
    @ivar handshake: Deferred firing with the status once the response
        headers are read (or failing with L{ConnectionClosed}).
    @ivar closed: Deferred firing with None once the TCP connection is gone
        (the reason is kept in C{closeReason}).
    @ivar messages: all complete data messages received, as C{(opcode, bytes)}.
    @ivar closeFrames: payloads of close frames received.
    @ivar violations: RFC 6455 violations seen in server frames.
    @ivar bytesAfterUpgrade: raw bytes received after the 101 response.
    """

    def __init__(self, host, path="/relay", extraHeaders=(), clock=None):
        self.host = host
        self.path = path
        self.extraHeaders = list(extraHeaders)
        self.clock = clock
        self.key = base64.b64encode(os.urandom(16))
        self.status = None
        self.headers = {}
        self.body = b""
        self.upgraded = False
        self.handshake = defer.Deferred()
        self.closed = defer.Deferred()
        self.isClosed = False
        self.closeReason = None
        self.messages = []
        self.closeFrames = []
        self.pongs = []
        self.violations = []
        self.bytesAfterUpgrade = 0
        self.sentClose = False
        self._response = b""
        self._parser = FrameParser()
        self._fragments = None
        self._queue = deque()
        self._waiters = deque()

    # -- connection --------------------------------------------------------

    def connectionMade(self):
        lines = [
            b"GET " + self.path.encode("ascii") + b" HTTP/1.1",
            b"Host: " + self.host.encode("ascii"),
            b"Upgrade: websocket",
            b"Connection: Upgrade",
            b"Sec-WebSocket-Key: " + self.key,
            b"Sec-WebSocket-Version: 13",
        ]
        for name, value in self.extraHeaders:
            lines.append(name.encode("ascii") + b": " + value.encode("ascii"))
        self.transport.write(b"\r\n".join(lines) + b"\r\n\r\n")

    def dataReceived(self, data):
        if self.upgraded:
            self.bytesAfterUpgrade += len(data)
            self._frames(data)
            return
        if self.status is not None:
            self.body += data
            return
        self._response += data
        end = self._response.find(b"\r\n\r\n")
        if end < 0:
            return
        head, rest = self._response[:end], self._response[end + 4 :]
        self._response = b""
        statusLine, *headerLines = head.split(b"\r\n")
        parts = statusLine.split(b" ", 2)
        try:
            self.status = int(parts[1])
        except (IndexError, ValueError):
            self.status = -1
        for line in headerLines:
            name, _, value = line.partition(b":")
            self.headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
        if self.status == 101:
            expected = base64.b64encode(hashlib.sha1(self.key + GUID).digest()).decode()
            if self.headers.get("sec-websocket-accept") != expected:
                self.violations.append("bad Sec-WebSocket-Accept")
            if self.headers.get("upgrade", "").lower() != "websocket":
                self.violations.append("bad Upgrade header")
            self.upgraded = True
            self.handshake.callback(self.status)
            if rest:
                self.bytesAfterUpgrade += len(rest)
                self._frames(rest)
        else:
            self.body = rest
            self.handshake.callback(self.status)

    def connectionLost(self, reason):
        self.isClosed = True
        self.closeReason = reason
        if not self.handshake.called:
            self.handshake.errback(ConnectionClosed("closed before upgrade response"))
        while self._waiters:
            self._waiters.popleft().errback(ConnectionClosed(reason.getErrorMessage()))
        self.closed.callback(None)

    # -- frames in ---------------------------------------------------------

    def _frames(self, data):
        for fin, rsv, opcode, masked, payload in self._parser.feed(data):
            if masked:
                self.violations.append("server frame masked")
            if rsv:
                self.violations.append(f"RSV bits set: {rsv}")
            if opcode >= 0x8:
                if not fin or len(payload) > 125:
                    self.violations.append("bad control frame")
                self._control(opcode, payload)
            elif opcode == OP_CONTINUATION:
                if self._fragments is None:
                    self.violations.append("continuation without start")
                    continue
                self._fragments[1].append(payload)
                if fin:
                    op, parts = self._fragments
                    self._fragments = None
                    self._message(op, b"".join(parts))
            elif opcode in (OP_TEXT, OP_BINARY):
                if self._fragments is not None:
                    self.violations.append("new message inside a fragmented one")
                if fin:
                    self._message(opcode, payload)
                else:
                    self._fragments = (opcode, [payload])
            else:
                self.violations.append(f"reserved opcode {opcode}")

    def _control(self, opcode, payload):
        if opcode == OP_CLOSE:
            self.closeFrames.append(payload)
            if not self.sentClose:
                # Echo the status code, as RFC 6455 5.5.1 asks; the server
                # then closes the TCP connection.
                self.sentClose = True
                self.transport.write(encodeFrame(OP_CLOSE, payload[:2]))
        elif opcode == OP_PING:
            self.transport.write(encodeFrame(OP_PONG, payload))
        elif opcode == OP_PONG:
            self.pongs.append(payload)
        else:
            self.violations.append(f"reserved control opcode {opcode}")

    def _message(self, opcode, payload):
        self.messages.append((opcode, payload))
        if self._waiters:
            self._deliver(self._waiters.popleft(), opcode, payload)
        else:
            self._queue.append((opcode, payload))

    @staticmethod
    def _deliver(d, opcode, payload):
        if opcode != OP_BINARY:
            d.errback(ProtocolViolation(f"non-binary message {payload!r}"))
        else:
            d.callback(payload)

    # -- API ---------------------------------------------------------------

    def nextMessage(self, timeout=5.0):
        """
        A Deferred firing with the next binary message, failing with
        L{ConnectionClosed} if the connection ends first, or TimeoutError.
        """
        d = defer.Deferred()
        if self._queue:
            opcode, payload = self._queue.popleft()
            self._deliver(d, opcode, payload)
            return d
        if self.isClosed:
            d.errback(ConnectionClosed("already closed"))
            return d
        self._waiters.append(d)
        if timeout is not None:

            def forget(result):
                if d in self._waiters:
                    self._waiters.remove(d)
                return result

            d.addTimeout(timeout, self.clock)
            d.addErrback(forget)
        return d

    def pending(self):
        """
        Data messages received but not yet taken with L{nextMessage}.
        """
        return list(self._queue)

    def whenClosed(self, timeout=5.0):
        """
        A Deferred firing once the connection is closed (TimeoutError after
        C{timeout}).
        """
        d = defer.Deferred()
        if self.isClosed:
            d.callback(None)
            return d

        def fire(result):
            if not d.called:
                d.callback(None)
            return result

        self.closed.addBoth(fire)
        d.addTimeout(timeout, self.clock)
        return d

    def sendFrame(self, opcode, payload, fin=True, mask=True, rsv=0):
        self.transport.write(encodeFrame(opcode, payload, fin=fin, mask=mask, rsv=rsv))

    def sendMessage(self, payload):
        """
        One binary message in one masked frame.
        """
        self.sendFrame(OP_BINARY, payload)

    def sendFragmented(self, payload, pieces):
        """
        One binary message split into frames at the given C{pieces} lengths.
        """
        chunks, rest = [], payload
        for size in pieces:
            chunks.append(rest[:size])
            rest = rest[size:]
        chunks.append(rest)
        for i, chunk in enumerate(chunks):
            opcode = OP_BINARY if i == 0 else OP_CONTINUATION
            self.sendFrame(opcode, chunk, fin=(i == len(chunks) - 1))

    def sendText(self, text):
        self.sendFrame(OP_TEXT, text.encode("utf-8"))

    def sendPing(self, payload=b""):
        self.sendFrame(OP_PING, payload)

    def sendClose(self, code=1000, reason=b""):
        self.sentClose = True
        self.sendFrame(OP_CLOSE, struct.pack(">H", code) + reason)

    def sendRaw(self, data):
        self.transport.write(data)

    @defer.inlineCallbacks
    def sendSlowly(self, data, chunkSize=1):
        """
        Write C{data} C{chunkSize} bytes at a time, one reactor turn apart
        and with Nagle off, so the server sees frames split at every byte
        boundary (partial headers, masks and payloads).
        """
        from twisted.internet.task import deferLater

        self.transport.setTcpNoDelay(True)
        for i in range(0, len(data), chunkSize):
            if self.isClosed:
                return
            self.transport.write(data[i : i + chunkSize])
            yield deferLater(self.clock, 0, lambda: None)

    def abort(self):
        """
        Drop the TCP connection now; returns a Deferred for its end.
        """
        if self.isClosed:
            return defer.succeed(None)
        d = self.whenClosed(timeout=5.0)
        self.transport.abortConnection()
        return d


def connect(reactor, port, path="/relay", extraHeaders=(), hostHeader=None):
    """
    Open a TCP connection to 127.0.0.1:C{port} and start the upgrade.

    @return: Deferred firing with the L{RawWebSocketClient} once TCP is
        connected (wait on its C{handshake} for the response).
    """
    host = hostHeader if hostHeader is not None else f"127.0.0.1:{port}"
    client = RawWebSocketClient(host, path, extraHeaders, clock=reactor)
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5)
    return connectProtocol(endpoint, client)
