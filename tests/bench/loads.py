"""
The load loops: pipelined pairs (throughput, stalled receiver) and
ping-pong pairs (latency), each one epoll loop over raw non-blocking
sockets.

A pair is a sender and a receiver.  The sender's frames are pre-built
(L{wire.SendTemplate}); the receiver compares what arrives against the exact
bytes it expects (L{wire.ExpectTemplate}): one C{startswith} per read when
everything is in order.  Only when that fails (a health check in between, a
lost, reordered or damaged message) does it parse frame by frame and count
what went wrong.
"""

import os
import select
import time

from tests.bench import wire
from tests.bench.peers import BenchError, connectPeer

EPOLLIN = select.EPOLLIN
EPOLLOUT = select.EPOLLOUT
EPOLLERR = select.EPOLLERR | select.EPOLLHUP
RECV_SIZE = 256 * 1024


class _Conn:
    """
    A non-blocking socket with an output queue (for health-check answers
    that must not cut a half-written frame).
    """

    __slots__ = (
        "peer",
        "sock",
        "fd",
        "out",
        "wantOut",
        "reader",
        "flows",
        "single",
        "unexpected",
        "closed",
        "stalled",
        "sendFlow",
        "lastData",
    )

    def __init__(self, peer):
        self.peer = peer
        self.sock = peer.sock
        self.sock.setblocking(False)
        self.fd = self.sock.fileno()
        self.out = None
        self.wantOut = False
        self.reader = wire.ServerFrameReader()
        self.reader.buf = peer.pending
        self.flows = {}
        self.single = None
        self.unexpected = 0
        self.closed = None
        self.stalled = False
        self.sendFlow = None
        self.lastData = 0.0


class Flow:
    """
    One direction of one pair: sender -> receiver, sequence numbers from 0.
    """

    __slots__ = (
        "index",
        "mode",
        "size",
        "tmpl",
        "expect",
        "built",
        "got",
        "nseq",
        "gaps",
        "gapEvents",
        "reordered",
        "idErrors",
        "dataErrors",
        "sender",
        "receiver",
        "window",
        "stallSince",
        "stalls",
        "measured",
        "queued",
    )

    def __init__(self, index, mode, sender, receiver, size, window):
        self.index = index
        self.mode = mode  # "window" or "flood"
        self.size = size
        tail = wire.payloadTail(index, size)
        self.tmpl = wire.SendTemplate(receiver.peer.id, tail, sender.peer.key)
        self.expect = wire.ExpectTemplate(sender.peer.id, tail)
        self.built = 0
        self.got = 0
        self.nseq = 0
        self.gaps = 0
        self.gapEvents = 0
        self.reordered = 0
        self.idErrors = 0
        self.dataErrors = 0
        self.sender = sender
        self.receiver = receiver
        self.window = window
        self.stallSince = None
        self.stalls = 0
        self.measured = mode == "window"
        self.queued = False

    def summary(self):
        return {
            "index": self.index,
            "mode": self.mode,
            "sent": self.built,
            "received": self.got,
            "lost": self.built - self.got,
            "seq_gaps": self.gapEvents,
            "gap_msgs": self.gaps,
            "reordered": self.reordered,
            "id_errors": self.idErrors,
            "payload_errors": self.dataErrors,
            "window_stalls": self.stalls,
        }


def _answerControl(conn, op, payload, key):
    """
    Health checks and pings get their answers (queued behind any partial
    frame); returns False for anything else.
    """
    if op == wire.OP_BINARY and payload == wire.HEALTHCHECK:
        _queue(conn, wire.clientFrame(wire.HEALTHCHECK, key))
        return True
    if op == wire.OP_PING:
        _queue(conn, wire.clientFrame(payload, key, opcode=wire.OP_PONG))
        return True
    if op == wire.OP_PONG:
        return True
    return False


def _queue(conn, data):
    if conn.out is not None:
        conn.out = bytes(conn.out) + data
        return
    try:
        n = conn.sock.send(data)
    except BlockingIOError:
        n = 0
    except OSError:
        return
    if n < len(data):
        conn.out = memoryview(data)[n:]


class PairLoop:
    """
    Pipelined pairs in one process.

    @param spec: a dict: host, port, token, prefix, pairs (list of pair
        indices for windowed pairs), floods (number of flood senders to one
        stalled receiver, 0 for none), size, window, batch.
    """

    def __init__(self, spec):
        self.spec = spec
        self.conns = []
        self.flows = []
        self.byFd = {}
        self.stalledConn = None

    # set-up

    def connect(self):
        spec = self.spec
        host, port, tok, prefix = spec["host"], spec["port"], spec["token"], spec["prefix"]
        size, window = spec["size"], spec["window"]

        def peer(name):
            return connectPeer(host, port, prefix + name, tok, tls=spec.get("tls", False))

        # receivers first: once a receiver has its AuthResponse it is registered
        pairs = [(i, peer(f"r{i}")) for i in spec["pairs"]]
        stalled = peer("stalled") if spec.get("floods") else None
        for i, r in pairs:
            rc = self._conn(r)
            sc = self._conn(peer(f"s{i}"))
            self._flow(Flow(i, "window", sc, rc, size, window))
        if stalled is not None:
            self.stalledConn = rc = self._conn(stalled)
            rc.stalled = True
            for j in range(spec["floods"]):
                sc = self._conn(peer(f"f{j}"))
                self._flow(Flow(10000 + j, "flood", sc, rc, size, 0))
        for c in self.conns:
            if c.reader.buf:  # something came right after the AuthResponse
                self._read(c, b"", time.monotonic())

    def _conn(self, p):
        c = _Conn(p)
        self.conns.append(c)
        self.byFd[c.fd] = c
        return c

    def _flow(self, f):
        self.flows.append(f)
        f.sender.sendFlow = f
        f.receiver.flows[f.sender.peer.id] = f
        f.receiver.single = f if len(f.receiver.flows) == 1 else None

    def close(self):
        for c in self.conns:
            c.peer.close()

    # the loop

    def run(self, marks, floodAt=None, stopAt=None, drain=10.0, batch=16):
        """
        Send from now until C{stopAt}; floods start at C{floodAt}; take a
        snapshot at every time in C{marks} (monotonic clock); then drain.

        @return: a result dict.
        """
        ep = select.epoll()
        for c in self.conns:
            if not c.stalled:
                ep.register(c.fd, EPOLLIN)
        self.ep = ep
        marks = sorted(marks)
        snaps = []
        ready = [f for f in self.flows if f.mode == "window"]
        for f in ready:
            f.queued = True
        floods = [f for f in self.flows if f.mode == "flood"]
        floodOn = False
        sending = True
        cpu0 = os.times()
        now = time.monotonic()
        drainUntil = None
        while True:
            now = time.monotonic()
            while marks and now >= marks[0]:
                marks.pop(0)
                snaps.append(self._snapshot(now))
            if sending and stopAt is not None and now >= stopAt:
                sending = False
                drainUntil = now + drain
                if self.stalledConn is not None:
                    # the stalled receiver reads again: what it gets must be intact
                    ep.register(self.stalledConn.fd, EPOLLIN)
                    self.stalledConn.stalled = False
                    self.stalledConn.lastData = now
            if not floodOn and floods and floodAt is not None and now >= floodAt:
                floodOn = True
                for f in floods:
                    f.queued = True
                    ready.append(f)
            if sending:
                if ready:
                    self._pump(ready, batch, now)
            elif drainUntil is not None:
                if now >= drainUntil or self._drained(now):
                    break
            timeout = 0.05
            if sending and any(f.mode == "flood" and f.sender.out is None for f in ready):
                timeout = 0
            elif marks:
                timeout = max(0.0, min(timeout, marks[0] - now))
            for fd, ev in ep.poll(timeout):
                c = self.byFd[fd]
                if ev & EPOLLOUT:
                    self._flush(c)
                    f = c.sendFlow
                    if c.out is None and f is not None and sending and not f.queued:
                        f.queued = True
                        ready.append(f)
                if ev & (EPOLLIN | EPOLLERR):
                    self._readable(c, now, ready if sending else None)
        cpu1 = os.times()
        ep.close()
        res = {
            "snapshots": snaps,
            "flows": [f.summary() for f in self.flows],
            "loadgen_cpu_s": (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system),
            "unexpected_msgs": sum(c.unexpected for c in self.conns),
            "closed_conns": sorted({c.closed for c in self.conns if c.closed}),
            "n_closed": sum(1 for c in self.conns if c.closed),
        }
        if self.stalledConn is not None:
            res["stalled_closed"] = self.stalledConn.closed
        return res

    def _snapshot(self, now):
        msgs = 0
        flood = 0
        floodGot = 0
        for f in self.flows:
            if f.measured:
                msgs += f.got
            else:
                flood += f.built
                floodGot += f.got
        return {
            "t": now,
            "msgs": msgs,
            "flood_sent": flood,
            "flood_got": floodGot,
            "cpu": sum(os.times()[:2]),
        }

    def _drained(self, now):
        for f in self.flows:
            if f.mode == "window" and f.nseq < f.built and not f.receiver.closed:
                return False
        s = self.stalledConn
        if s is not None and not s.closed and now - s.lastData < 1.0:
            return False
        return True

    def _pump(self, ready, batch, now):
        keep = []
        for f in ready:
            f.queued = False
        for f in ready:
            c = f.sender
            if c.out is not None or c.closed:
                continue  # resumes on EPOLLOUT
            if f.mode == "flood":
                k = 64
            else:
                room = f.window - (f.built - f.nseq)
                if room < batch:
                    if room <= 0:
                        # all the window in flight and nothing came back
                        if f.stallSince is None:
                            f.stallSince = now
                        elif now - f.stallSince > 2.0:
                            f.stalls += 1
                            f.stallSince = None
                            f.nseq = f.built  # write the window off (counted as loss)
                    continue  # resumes when the receiver frees room
                f.stallSince = None
                k = room
            data = f.tmpl.frames(f.built, f.built + k)
            f.built += k
            try:
                n = c.sock.send(data)
            except BlockingIOError:
                n = 0
            except OSError as e:
                c.closed = c.closed or f"send: {e}"
                continue
            if n < len(data):
                c.out = memoryview(data)[n:]
                if not c.wantOut:
                    self.ep.modify(c.fd, EPOLLIN | EPOLLOUT)
                    c.wantOut = True
            elif f.mode == "flood":
                keep.append(f)
            else:
                # room may remain if the window was bigger than what was sent
                if f.window - (f.built - f.nseq) >= batch:
                    keep.append(f)
        for f in keep:
            f.queued = True
        ready[:] = keep

    def _flush(self, c):
        if c.out is None:
            if c.wantOut:
                self.ep.modify(c.fd, EPOLLIN)
                c.wantOut = False
            return
        try:
            n = c.sock.send(c.out)
        except BlockingIOError:
            return
        except OSError as e:
            c.closed = c.closed or f"send: {e}"
            c.out = None
            return
        if n < len(c.out):
            c.out = c.out[n:]
        else:
            c.out = None
            self.ep.modify(c.fd, EPOLLIN)
            c.wantOut = False

    def _readable(self, c, now, ready):
        try:
            data = c.sock.recv(RECV_SIZE)
        except BlockingIOError:
            return
        except OSError as e:
            data = b""
            c.closed = f"recv: {e}"
        if not data:
            c.closed = c.closed or "closed by the relay"
            try:
                self.ep.unregister(c.fd)
            except (OSError, ValueError):
                pass
            return
        c.lastData = now
        self._read(c, data, now, ready)

    def _read(self, c, data, now, ready=None):
        reader = c.reader
        f = c.single
        if f is not None and reader._fragments is None:
            buf = reader.buf + data if reader.buf else data
            exp = f.expect
            k = len(buf) // exp.frameLen
            if k == 0:
                if exp.head.startswith(buf[: len(exp.head)]):
                    reader.buf = buf  # the start of the next transport frame
                    return
            elif buf.startswith(exp.frames(f.nseq, f.nseq + k)):
                f.nseq += k
                f.got += k
                reader.buf = buf[k * exp.frameLen :]
                if ready is not None and f.mode == "window" and not f.queued:
                    f.queued = True
                    ready.append(f)
                return
            reader.buf = b""
            data = buf
        try:
            messages = reader.feed(data)
        except ValueError as e:
            c.closed = f"bad frame: {e}"
            self.ep.unregister(c.fd)
            return
        touched = None
        for op, p in messages:
            if op == wire.OP_BINARY and p[:2] == b"\x01\x03" and len(p) >= wire.TRANSPORT_HDR:
                f = c.flows.get(p[2:38])
                if f is None:
                    if c.sendFlow is not None:
                        c.unexpected += 1
                        continue
                    # a transport from a stranger: damaged source id
                    f = c.single
                    if f is None:
                        c.unexpected += 1
                        continue
                    f.idErrors += 1
                if (
                    len(p) != wire.TRANSPORT_HDR + f.size
                    or p[wire.TRANSPORT_HDR + wire.SEQ_LEN :] != f.expect.payloadTail
                ):
                    f.dataErrors += 1
                    if len(p) < wire.TRANSPORT_HDR + wire.SEQ_LEN:
                        continue
                seq = int.from_bytes(p[38:46], "big")
                f.got += 1
                if seq == f.nseq:
                    f.nseq += 1
                elif seq > f.nseq:
                    if seq > f.built:
                        f.dataErrors += 1  # a sequence number never sent
                        continue
                    f.gaps += seq - f.nseq
                    f.gapEvents += 1
                    f.nseq = seq + 1
                else:
                    f.reordered += 1
                touched = f
            elif op == wire.OP_CLOSE:
                c.closed = c.closed or f"WebSocket close {p[:2].hex()}"
            elif not _answerControl(c, op, p, c.peer.key):
                c.unexpected += 1
        if touched is not None and ready is not None:
            for f in c.flows.values():
                if f.mode == "window" and not f.queued:
                    f.queued = True
                    ready.append(f)


def pairWorker(conn, spec):
    """
    A load process: connect, report ready, wait for the schedule, run,
    report the result.  (Run through multiprocessing, or in-process.)
    """
    loop = PairLoop(spec)
    try:
        loop.connect()
    except Exception as e:  # reported to the parent, which fails the run
        conn.send(("error", f"set-up: {type(e).__name__}: {e}"))
        loop.close()
        return
    conn.send(("ready", len(loop.conns)))
    cmd = conn.recv()
    if cmd[0] != "go":
        loop.close()
        return
    sched = cmd[1]
    while time.monotonic() < sched["start"]:
        time.sleep(min(0.01, max(0, sched["start"] - time.monotonic())))
    try:
        res = loop.run(
            sched["marks"],
            floodAt=sched.get("floodAt"),
            stopAt=sched["stopAt"],
            drain=sched.get("drain", 10.0),
            batch=spec.get("batch", 16),
        )
    except Exception as e:
        import traceback

        conn.send(("error", f"run: {type(e).__name__}: {e}\n{traceback.format_exc()}"))
        loop.close()
        return
    loop.close()
    conn.send(("done", res))


# ---------------------------------------------------------------------------
# Ping-pong (latency)


class EchoPair:
    __slots__ = (
        "index",
        "a",
        "b",
        "ab",
        "ba",
        "expB",
        "expA",
        "seq",
        "tSent",
        "samples",
        "sent",
        "echoed",
        "timeouts",
        "late",
        "idErrors",
        "dataErrors",
    )

    def __init__(self, index, a, b, size):
        self.index = index
        self.a = a  # _Conn, the pinger
        self.b = b  # _Conn, the echoer
        tail = wire.payloadTail(index, size)
        self.ab = wire.SendTemplate(b.peer.id, tail, a.peer.key)
        self.ba = wire.SendTemplate(a.peer.id, tail, b.peer.key)
        self.expB = wire.ExpectTemplate(a.peer.id, tail)  # what B receives
        self.expA = wire.ExpectTemplate(b.peer.id, tail)  # what A receives
        self.seq = -1
        self.tSent = 0
        self.samples = []
        self.sent = 0
        self.echoed = 0
        self.timeouts = 0
        self.late = 0
        self.idErrors = 0
        self.dataErrors = 0


class EchoLoop:
    """
    Ping-pong pairs: A sends seq n to B, B echoes it to A, A measures the
    round trip and sends n+1.  One message in flight per pair.
    """

    def __init__(self, pairs, size, pingTimeout=2.0):
        """
        @param pairs: list of (peer A, peer B), authenticated.
        """
        self.pairs = []
        self.byFd = {}
        for i, (a, b) in enumerate(pairs):
            ca, cb = _Conn(a), _Conn(b)
            p = EchoPair(i, ca, cb, size)
            self.byFd[ca.fd] = (p, True)
            self.byFd[cb.fd] = (p, False)
            self.pairs.append(p)
        self.size = size
        self.pingTimeout = pingTimeout

    def _ping(self, p):
        p.seq += 1
        data = p.ab.frame(p.seq)
        p.tSent = time.perf_counter_ns()
        _queue(p.a, data)  # one frame into an idle socket: sent at once
        p.sent += 1

    def run(self, measureFrom, measureUntil, grace=2.0):
        """
        Ping until C{measureUntil} (monotonic); record round trips of pings
        sent at or after C{measureFrom}.
        """
        ep = select.epoll()
        for fd in self.byFd:
            ep.register(fd, EPOLLIN)
        perf = time.perf_counter_ns
        mono = time.monotonic
        # perf_counter_ns and monotonic share CLOCK_MONOTONIC on Linux, but
        # convert explicitly to stay independent of that
        off = perf() - int(mono() * 1e9)
        fromNs = int(measureFrom * 1e9) + off
        untilNs = int(measureUntil * 1e9) + off
        timeoutNs = int(self.pingTimeout * 1e9)
        cpu0 = os.times()
        for p in self.pairs:
            self._ping(p)
        active = len(self.pairs)
        lastCheck = perf()
        while active:
            for fd, _ev in ep.poll(0.05):
                t = perf()
                p, isA = self.byFd[fd]
                c = p.a if isA else p.b
                try:
                    data = c.sock.recv(RECV_SIZE)
                except BlockingIOError:
                    continue
                except OSError as e:
                    data = b""
                    c.closed = f"recv: {e}"
                if not data:
                    c.closed = c.closed or "closed by the relay"
                    ep.unregister(fd)
                    if p.seq >= 0:
                        p.seq = -2
                        active -= 1
                    continue
                reader = c.reader
                buf = reader.buf + data if reader.buf else data
                exp = p.expA if isA else p.expB
                if (
                    len(buf) == exp.frameLen
                    and reader._fragments is None
                    and buf == exp.frames(p.seq, p.seq + 1)
                ):
                    reader.buf = b""
                    seqs = (p.seq,)
                else:
                    reader.buf = b""
                    seqs = self._slow(p, c, isA, buf)
                for seq in seqs:
                    if isA:
                        if seq != p.seq:
                            p.late += 1
                            continue
                        p.echoed += 1
                        if p.tSent >= fromNs:
                            p.samples.append(t - p.tSent)
                        if p.tSent < untilNs:
                            self._ping(p)
                        else:
                            p.seq = -2
                            active -= 1
                    else:
                        try:
                            p.b.sock.send(p.ba.frame(seq))
                        except BlockingIOError:
                            _queue(p.b, p.ba.frame(seq))
            now = perf()
            if now > untilNs + int(grace * 1e9):
                break
            if now - lastCheck < 10_000_000:
                continue
            lastCheck = now
            for p in self.pairs:
                if p.seq >= 0 and now - p.tSent > timeoutNs:
                    p.timeouts += 1
                    if now < untilNs:
                        self._ping(p)
                    else:
                        p.seq = -2
                        active -= 1
        cpu1 = os.times()
        ep.close()
        samples = []
        for p in self.pairs:
            samples.extend(p.samples)
        samples.sort()
        return {
            "samples_ns": samples,
            "sent": sum(p.sent for p in self.pairs),
            "echoed": sum(p.echoed for p in self.pairs),
            "timeouts": sum(p.timeouts for p in self.pairs),
            "late": sum(p.late for p in self.pairs),
            "id_errors": sum(p.idErrors for p in self.pairs),
            "payload_errors": sum(p.dataErrors for p in self.pairs),
            "unexpected_msgs": sum(p.a.unexpected + p.b.unexpected for p in self.pairs),
            "closed_conns": sum(1 for p in self.pairs for c in (p.a, p.b) if c.closed),
            "loadgen_cpu_s": (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system),
        }

    def _slow(self, p, c, isA, buf):
        seqs = []
        try:
            messages = c.reader.feed(buf)
        except ValueError as e:
            c.closed = f"bad frame: {e}"
            return seqs
        src = p.b.peer.id if isA else p.a.peer.id
        tail = (p.expA if isA else p.expB).payloadTail
        for op, m in messages:
            if (
                op == wire.OP_BINARY
                and m[:2] == b"\x01\x03"
                and len(m) >= wire.TRANSPORT_HDR + wire.SEQ_LEN
            ):
                if m[2:38] != src:
                    p.idErrors += 1
                if len(m) != wire.TRANSPORT_HDR + self.size or m[46:] != tail:
                    p.dataErrors += 1
                seqs.append(int.from_bytes(m[38:46], "big"))
            elif op == wire.OP_CLOSE:
                c.closed = c.closed or "WebSocket close"
            elif not _answerControl(c, op, m, c.peer.key):
                c.unexpected += 1
        return seqs

    def close(self):
        for p in self.pairs:
            p.a.peer.close()
            p.b.peer.close()


def probeRoute(a, b, timeout=30.0, interval=0.25):
    """
    Send from peer C{a} to peer C{b} (blocking sockets) until C{b} gets one;
    for routes that need a cluster lookup first.

    @return: seconds until the first delivery, or None.
    """
    t0 = time.monotonic()
    reader = wire.ServerFrameReader()
    reader.buf = b.pending
    b.pending = b""
    b.sock.settimeout(interval)
    probe = wire.transportMessage(b.id, b"probe---")
    try:
        while time.monotonic() - t0 < timeout:
            a.send(probe)
            end = time.monotonic() + interval
            while time.monotonic() < end:
                try:
                    chunk = b.sock.recv(65536)
                except TimeoutError:
                    break
                if not chunk:
                    raise BenchError("the receiver was disconnected while probing the route")
                for op, m in reader.feed(chunk):
                    if op == wire.OP_BINARY and m[:2] == b"\x01\x03" and m[2:38] == a.id:
                        # let the other probes in flight arrive, then forget them
                        _drainFor(b.sock, 0.3)
                        _drainFor(a.sock, 0.05)
                        return time.monotonic() - t0
                    if op == wire.OP_BINARY and m == wire.HEALTHCHECK:
                        b.send(wire.HEALTHCHECK)
        return None
    finally:
        b.sock.settimeout(None)


def _drainFor(sock, seconds):
    end = time.monotonic() + seconds
    while True:
        left = end - time.monotonic()
        if left <= 0:
            break
        sock.settimeout(left)
        try:
            if not sock.recv(65536):
                break
        except TimeoutError:
            break
    sock.settimeout(None)
