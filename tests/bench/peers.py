"""
Raw-socket relay peers: the WebSocket upgrade and the relay Auth by hand.

L{connectPeer} is the blocking set-up used before a measurement starts;
L{HandshakeRun} opens many connections at once without blocking (the
handshakes/s and idle-memory cases).
"""

import errno
import os
import select
import socket
import ssl
import time

from tests.bench import wire


class BenchError(Exception):
    """
    The relay did something the benchmark cannot measure around.
    """


class Peer:
    """
    One authenticated connection.

    @ivar sock: the socket (blocking until the caller changes it).
    @ivar id: the 36-byte peer id.
    @ivar key: the 4-byte mask this connection uses for every frame.
    @ivar pending: bytes received after the AuthResponse (not yet parsed).
    """

    __slots__ = ("id", "sock", "key", "pending")

    def __init__(self, name, sock, key, pending):
        self.id = wire.peerId(name)
        self.sock = sock
        self.key = key
        self.pending = pending

    def send(self, payload):
        """
        Send one relay message (blocking), masked with this peer's key.
        """
        self.sock.sendall(wire.clientFrame(payload, self.key))

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


class TLSSocket:
    """
    A client TLS socket that the loads drive as they drive a plain one.

    A non-blocking C{ssl.SSLSocket} raises C{SSLWantReadError} /
    C{SSLWantWriteError} where a plain socket raises C{BlockingIOError};
    and one C{recv} returns at most one TLS record, while the loads wait
    on epoll for the next read: the rest of what OpenSSL has decrypted
    (C{pending}) would wait for more bytes from the relay. Here C{recv}
    returns all of it and both errors become C{BlockingIOError}.
    """

    __slots__ = ("_tls",)

    def __init__(self, tls):
        self._tls = tls

    def send(self, data):
        try:
            return self._tls.send(data)
        except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
            raise BlockingIOError(errno.EAGAIN, "TLS write would block") from None

    def recv(self, size):
        tls = self._tls
        try:
            data = tls.recv(size)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise BlockingIOError(errno.EAGAIN, "TLS read would block") from None
        if not data or not tls.pending():
            return data
        chunks = [data]
        while tls.pending():
            try:
                more = tls.recv(size)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                break
            if not more:
                break
            chunks.append(more)
        return b"".join(chunks)

    def sendall(self, data):
        self._tls.sendall(data)

    def settimeout(self, value):
        self._tls.settimeout(value)

    def setblocking(self, flag):
        self._tls.setblocking(flag)

    def setsockopt(self, *args):
        self._tls.setsockopt(*args)

    def fileno(self):
        return self._tls.fileno()

    def close(self):
        self._tls.close()


def _clientTLS(sock):
    """
    Wrap a connected socket in TLS, trusting any certificate: the relay
    under test serves a throwaway self-signed one.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return TLSSocket(context.wrap_socket(sock))


def _recvUntil(sock, marker, limit, deadline):
    data = b""
    while marker not in data:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise BenchError("timed out waiting for the relay")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            raise BenchError("timed out waiting for the relay") from None
        if not chunk:
            raise BenchError("the relay closed the connection during the handshake")
        data += chunk
        if len(data) > limit:
            raise BenchError("oversized handshake response")
    return data


def connectPeer(host, port, name, tok, timeout=10.0, tls=False):
    """
    Connect, upgrade, authenticate as C{name} and wait for the AuthResponse.

    @param tls: over TLS (a L{TLSSocket}).
    @return: a L{Peer} with a blocking socket.
    """
    deadline = time.monotonic() + timeout
    sock = socket.create_connection((host, port), timeout=timeout)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls:
            sock = _clientTLS(sock)
        req, accept = wire.upgradeRequest(host, port)
        sock.sendall(req)
        data = _recvUntil(sock, b"\r\n\r\n", 16384, deadline)
        head, _, rest = data.partition(b"\r\n\r\n")
        try:
            wire.checkUpgradeResponse(head, accept)
        except ValueError as e:
            raise BenchError(str(e)) from None
        key = os.urandom(4)
        pid = wire.peerId(name)
        sock.sendall(wire.clientFrame(wire.authMessage(pid, tok), key))
        reader = wire.ServerFrameReader()
        messages = reader.feed(rest)
        while True:
            for i, (op, payload) in enumerate(messages):
                if op == wire.OP_BINARY and payload[:2] == bytes(
                    [wire.PROTO_VERSION, wire.T_AUTH_RESPONSE]
                ):
                    if i + 1 < len(messages):
                        raise BenchError(
                            "the relay sent a message right after the AuthResponse that the "
                            "set-up consumed"
                        )
                    sock.settimeout(None)
                    return Peer(name, sock, key, reader.buf)
                raise BenchError(f"expected AuthResponse, got opcode {op} {payload[:2].hex()}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BenchError("no AuthResponse in time")
            sock.settimeout(remaining)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                raise BenchError("no AuthResponse in time") from None
            if not chunk:
                raise BenchError("the relay closed the connection instead of answering Auth")
            messages = reader.feed(chunk)
    except BaseException:
        sock.close()
        raise


def sourceAddress(i):
    """
    A distinct loopback source address for connection C{i} (127.64.0.1 on),
    so that many connections look like many agents to per-address limits.
    """
    n = i + 1
    return f"127.{64 + (n >> 16) % 64}.{(n >> 8) & 255}.{n & 255}"


class HandshakeRun:
    """
    Open C{n} connections, C{concurrency} at a time, each doing TCP connect,
    WebSocket upgrade, Auth and waiting for the AuthResponse; keep them open.

    Everything the clients send is built before the clock starts.
    """

    def __init__(self, host, port, names, tok, concurrency=64):
        self.distinctSources = host.startswith("127.")
        self.host = host
        self.port = port
        self.concurrency = concurrency
        self.timeout = 10.0
        self.jobs = []
        for name in names:
            key = os.urandom(4)
            req, accept = wire.upgradeRequest(host, port)
            auth = wire.clientFrame(wire.authMessage(wire.peerId(name), tok), key)
            self.jobs.append((req, accept, auth))
        self.socks = []
        self.latencies = []
        self.errors = {}
        self.elapsed = None

    def _fail(self, reason):
        self.errors[reason] = self.errors.get(reason, 0) + 1

    def run(self):
        ep = select.epoll()
        live = {}  # fd -> [sock, job index, state, buffer, t_start, deadline]
        nextJob = 0
        done = 0
        total = len(self.jobs)
        t0 = time.monotonic()
        addr = (self.host, self.port)

        def start(i):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.distinctSources:
                s.bind((sourceAddress(i), 0))
            now = time.monotonic()
            err = s.connect_ex(addr)
            if err not in (0, errno.EINPROGRESS):
                s.close()
                self._fail(f"connect: {os.strerror(err)}")
                return False
            live[s.fileno()] = [s, i, 0, b"", now, now + self.timeout]
            ep.register(s.fileno(), select.EPOLLOUT)
            return True

        def finish(fd, ok, reason=None):
            st = live.pop(fd)
            try:
                ep.unregister(fd)
            except OSError:
                pass
            if ok:
                self.latencies.append(time.monotonic() - st[4])
                self.socks.append(st[0])
            else:
                self._fail(reason)
                st[0].close()

        while done < total:
            while nextJob < total and len(live) < self.concurrency:
                i = nextJob
                nextJob += 1
                if not start(i):
                    done += 1
            if not live:
                continue
            events = ep.poll(0.1)
            for fd, _ev in events:
                st = live.get(fd)
                if st is None:
                    continue
                s, i, state, buf = st[0], st[1], st[2], st[3]
                req, accept, auth = self.jobs[i]
                if state == 0:  # connected (or failed)
                    err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        finish(fd, False, f"connect: {os.strerror(err)}")
                        done += 1
                        continue
                    try:
                        s.send(req)  # a few hundred bytes: one send suffices on a fresh socket
                    except OSError as e:
                        finish(fd, False, f"send: {e}")
                        done += 1
                        continue
                    st[2] = 1
                    ep.modify(fd, select.EPOLLIN)
                    continue
                try:
                    chunk = s.recv(65536)
                except BlockingIOError:
                    continue
                except OSError as e:
                    finish(fd, False, f"recv: {e}")
                    done += 1
                    continue
                if not chunk:
                    finish(
                        fd,
                        False,
                        "closed by the relay" if state == 2 else "closed during the upgrade",
                    )
                    done += 1
                    continue
                buf += chunk
                if state == 1:
                    head, sep, rest = buf.partition(b"\r\n\r\n")
                    if not sep:
                        st[3] = buf
                        continue
                    try:
                        wire.checkUpgradeResponse(head, accept)
                    except ValueError as e:
                        finish(fd, False, str(e))
                        done += 1
                        continue
                    s.send(auth)
                    st[2] = 2
                    buf = rest
                if state >= 1 and st[2] == 2:
                    # AuthResponse: a short unmasked binary frame [1][7]url
                    if len(buf) >= 2:
                        n = buf[1] & 0x7F
                        if n >= 126:
                            finish(fd, False, "oversized AuthResponse")
                            done += 1
                            continue
                        if len(buf) >= 2 + n:
                            if buf[0] == 0x82 and buf[2:4] == b"\x01\x07":
                                finish(fd, True)
                            else:
                                finish(fd, False, f"unexpected first message {buf[:4].hex()}")
                            done += 1
                            continue
                    st[3] = buf
            now = time.monotonic()
            for fd in [fd for fd, st in live.items() if st[5] < now]:
                finish(fd, False, "timeout")
                done += 1
        self.elapsed = time.monotonic() - t0
        ep.close()
        return self

    def closeAll(self):
        for s in self.socks:
            try:
                s.close()
            except OSError:
                pass
        self.socks = []
