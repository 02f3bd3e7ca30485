"""
Load processes of the quic case: QUIC peers (L{relay.quicclient.connectQuic}, the
aioquic client shaped like a Go agent) and, for side-by-side figures, TLS
WebSocket peers (L{relay.client}, Autobahn) on the same relay.

Both clients are Twisted and CPU-heavy, so every role runs in a process of
its own (multiprocessing, spawn: a fresh reactor each) and the harness only
schedules and collects:

  - C{recv}: the receivers of some pairs.  Each message is checked (source
    id, length, the pair's payload pattern, sequence number); every reactor
    turn that delivered something sends one acknowledgement per pair
    (C{next expected sequence number}) to the sender's process over a
    loopback UDP side channel, not through the relay.
  - C{send}: the senders of those pairs, pipelined with a window: a sender
    writes when at least C{batch} of its C{window} is free, counting
    everything below the receiver's next expected sequence number as done
    (QUIC datagrams lost on the way free their room that way); a window
    with nothing acknowledged for C{stall} seconds is written off.
  - C{echo}: ping-pong pairs (both ends in this process), one message in
    flight per pair, round trips timed with perf_counter_ns.

The parent talks to a process over a multiprocessing pipe: C{("ready",
info)} or C{("error", text)} after set-up, C{("go", schedule)}, then
C{("done", result)}; C{("stop", None)} closes the peers and ends it.
"""

import os
import struct
import time

from tests.bench import wire

ACK = struct.Struct("!IQ")  # pair index, next expected sequence number


def _cpu():
    t = os.times()
    return t.user + t.system


def _runq():
    """
    Seconds this process spent runnable but waiting for a CPU.
    """
    try:
        with open("/proc/self/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def _connect(reactor, spec, name):
    pid = wire.peerId(spec["prefix"] + name)
    host, port, timeout = spec["host"], spec["port"], spec.get("connect_timeout", 20.0)
    if spec["transport"] == "quic":
        from relay.quicclient import connectQuic

        return connectQuic(
            reactor, host, port, pid, secret=spec["secret"], cafile=spec["cafile"], timeout=timeout
        )
    from twisted.internet import ssl

    from relay import client

    with open(spec["cafile"], "rb") as f:
        root = ssl.Certificate.loadPEM(f.read())
    return client.connect(
        reactor,
        f"rels://{host}:{port}",
        pid,
        secret=spec["secret"],
        timeout=timeout,
        trustRoot=root,
    )


def _isQuic(peer):
    return hasattr(peer, "quic")


def _closed(peer):
    """
    Why C{peer} is no longer connected, or None.
    """
    if _isQuic(peer):
        ev = peer.closeEvent
        return None if ev is None else f"QUIC closed: code {ev.error_code:#x} {ev.reason_phrase!r}"
    if peer.transport is None or not peer.transport.connected:
        return "WebSocket closed"
    return None


class _Pipe:
    """
    The parent's pipe as a reactor reader.
    """

    def __init__(self, conn, handler):
        self.conn = conn
        self.handler = handler

    def fileno(self):
        return self.conn.fileno()

    def doRead(self):
        while True:
            try:
                if not self.conn.poll():
                    return
                msg = self.conn.recv()
            except (EOFError, OSError):
                self.handler(("stop", None))
                return
            self.handler(msg)

    def connectionLost(self, reason):
        pass

    def logPrefix(self):
        return "bench-pipe"


class _Flow:
    __slots__ = (
        "index",
        "src",
        "dst",
        "tail",
        "head",
        "peer",
        "sent",
        "acked",
        "progressAt",
        "stalls",
        "got",
        "nseq",
        "gaps",
        "gapEvents",
        "reordered",
        "idErrors",
        "dataErrors",
        "ackPort",
    )

    def __init__(self, index, src, dst, size):
        self.index = index
        self.src = src
        self.dst = dst
        self.tail = wire.payloadTail(index, size)
        self.head = bytes([wire.PROTO_VERSION, wire.T_TRANSPORT]) + dst
        self.peer = None
        self.sent = 0
        self.acked = 0
        self.progressAt = 0.0
        self.stalls = 0
        self.got = 0
        self.nseq = 0
        self.gaps = 0
        self.gapEvents = 0
        self.reordered = 0
        self.idErrors = 0
        self.dataErrors = 0
        self.ackPort = None


class _Role:
    def __init__(self, reactor, conn, spec):
        self.reactor = reactor
        self.conn = conn
        self.spec = spec
        self.peers = []
        self.snaps = []
        self.running = False
        self.stopping = False
        self.unexpected = 0

    def report(self, kind, info):
        try:
            self.conn.send((kind, info))
        except OSError:
            self.stop()

    def start(self):
        from twisted.internet import defer

        d = defer.ensureDeferred(self.setUp())

        def ok(info):
            self.report("ready", info)

        def failed(f):
            self.report(
                "error",
                f"set-up ({self.spec['role']}, {self.spec['transport']}): "
                f"{f.getErrorMessage() or f.type.__name__}",
            )
            self.stop()

        d.addCallbacks(ok, failed)

    def command(self, msg):
        kind, arg = msg
        if kind == "go":
            self.go(arg)
        elif kind == "stop":
            self.stop()

    def at(self, t, f, *a):
        return self.reactor.callLater(max(0.0, t - time.monotonic()), f, *a)

    def snapshot(self):
        self.snaps.append(self.snapInfo())

    def stop(self):
        if self.stopping:
            return
        self.stopping = True
        from twisted.internet import defer

        ds = []
        for p in self.peers:
            try:
                ds.append(defer.maybeDeferred(p.close))
            except Exception:
                pass
        d = defer.DeferredList(ds, consumeErrors=True)
        timer = self.reactor.callLater(3.0, self._halt)
        d.addBoth(lambda _: (timer.cancel() if timer.active() else None, self._halt()))

    def _halt(self):
        if self.reactor.running:
            self.reactor.stop()


class Receivers(_Role):
    def __init__(self, reactor, conn, spec):
        super().__init__(reactor, conn, spec)
        prefix = spec["prefix"]
        self.flows = [
            _Flow(i, wire.peerId(f"{prefix}s{i}"), wire.peerId(f"{prefix}r{i}"), spec["size"])
            for i in spec["pairs"]
        ]
        self.dirty = []
        self.ackCall = None
        self.ackPort = None
        self.lastData = 0.0
        self.msgLen = wire.TRANSPORT_HDR + spec["size"]

    async def setUp(self):
        from twisted.internet.protocol import DatagramProtocol

        self.ackPort = self.reactor.listenUDP(0, DatagramProtocol(), interface="127.0.0.1")
        for f in self.flows:
            p = await _connect(self.reactor, self.spec, f"r{f.index}")
            f.peer = p
            p.onTransport = lambda msg, f=f: self.received(f, msg)
            self.peers.append(p)
        return len(self.peers)

    def received(self, f, msg):
        if len(msg) != self.msgLen or msg[2:38] != f.src or msg[46:] != f.tail:
            if len(msg) < wire.TRANSPORT_HDR + wire.SEQ_LEN:
                f.dataErrors += 1
                return
            if msg[2:38] != f.src:
                f.idErrors += 1
            else:
                f.dataErrors += 1
        seq = int.from_bytes(msg[38:46], "big")
        f.got += 1
        if seq == f.nseq:
            f.nseq += 1
        elif seq > f.nseq:
            f.gaps += seq - f.nseq
            f.gapEvents += 1
            f.nseq = seq + 1
        else:
            f.reordered += 1
        self.lastData = time.monotonic()
        if f.ackPort is not None:
            self.dirty.append(f)
            if self.ackCall is None:
                self.ackCall = self.reactor.callLater(0, self.sendAcks)

    def sendAcks(self):
        self.ackCall = None
        dirty, self.dirty = self.dirty, []
        seen = set()
        write = self.ackPort.write
        for f in dirty:
            if f.index in seen:
                continue
            seen.add(f.index)
            try:
                write(ACK.pack(f.index, f.nseq), ("127.0.0.1", f.ackPort))
            except OSError:
                pass

    def go(self, sched):
        acks = sched.get("ack", {})
        for f in self.flows:
            f.ackPort = acks.get(f.index)
        for t in sched["marks"]:
            self.at(t, self.snapshot)
        self.stopAt = sched["stopAt"]
        self.drainUntil = sched["stopAt"] + sched.get("drain", 5.0)
        self.at(self.stopAt, self.checkDrained)

    def snapInfo(self):
        return {
            "t": time.monotonic(),
            "msgs": sum(f.got for f in self.flows),
            "cpu": _cpu(),
            "runq": _runq(),
        }

    def checkDrained(self):
        now = time.monotonic()
        if now < self.drainUntil and now - self.lastData < self.spec.get("quiet", 0.5):
            self.reactor.callLater(0.1, self.checkDrained)
            return
        self.report(
            "done",
            {
                "snapshots": self.snaps,
                "flows": {
                    f.index: {
                        "received": f.got,
                        "seq_gaps": f.gapEvents,
                        "gap_msgs": f.gaps,
                        "reordered": f.reordered,
                        "id_errors": f.idErrors,
                        "payload_errors": f.dataErrors,
                    }
                    for f in self.flows
                },
                "closed_conns": sorted({c for c in (_closed(p) for p in self.peers) if c}),
                "n_closed": sum(1 for p in self.peers if _closed(p)),
            },
        )


class Senders(_Role):
    def __init__(self, reactor, conn, spec):
        super().__init__(reactor, conn, spec)
        prefix = spec["prefix"]
        self.flows = {
            i: _Flow(i, wire.peerId(f"{prefix}s{i}"), wire.peerId(f"{prefix}r{i}"), spec["size"])
            for i in spec["pairs"]
        }
        self.window = spec["window"]
        self.batch = spec["batch"]
        self.stallAfter = spec.get("stall", 0.5)
        self.sending = False
        self.port = None

    async def setUp(self):
        from twisted.internet.protocol import DatagramProtocol

        role = self

        class Acks(DatagramProtocol):
            def datagramReceived(self, data, addr):
                role.ack(data)

        self.port = self.reactor.listenUDP(0, Acks(), interface="127.0.0.1")
        for f in self.flows.values():
            p = await _connect(self.reactor, self.spec, f"s{f.index}")
            f.peer = p
            p.onTransport = lambda msg: setattr(self, "unexpected", self.unexpected + 1)
            self.peers.append(p)
            await p.waitOnline(f.dst, timeout=self.spec.get("connect_timeout", 20.0))
        port = self.port.getHost().port
        return {i: port for i in self.flows}

    def ack(self, data):
        try:
            index, nseq = ACK.unpack(data)
        except struct.error:
            return
        f = self.flows.get(index)
        if f is None:
            return
        if nseq > f.acked:
            f.acked = nseq
            f.progressAt = time.monotonic()
            self.pump(f)

    def pump(self, f):
        if not self.sending:
            return
        room = self.window - (f.sent - f.acked)
        if room < self.batch:
            return
        send = f.peer.sendRaw
        head, tail = f.head, f.tail
        s = f.sent
        for seq in range(s, s + room):
            send(head + seq.to_bytes(8, "big") + tail)
        f.sent = s + room

    def checkStalls(self):
        if not self.sending:
            return
        now = time.monotonic()
        for f in self.flows.values():
            if f.sent - f.acked > self.window - self.batch and now - f.progressAt > self.stallAfter:
                # nothing came back for a while: the rest of the window was lost
                f.stalls += 1
                f.acked = f.sent
                f.progressAt = now
                self.pump(f)
        self.reactor.callLater(0.05, self.checkStalls)

    def go(self, sched):
        self.nmarks = len(sched["marks"])
        for t in sched["marks"]:
            self.at(t, self.snapshot)
        self.at(sched["stopAt"], self.finish)
        self.at(sched["start"], self.begin)

    def begin(self):
        self.sending = True
        now = time.monotonic()
        for f in self.flows.values():
            f.progressAt = now
            self.pump(f)
        self.checkStalls()

    def snapInfo(self):
        return {
            "t": time.monotonic(),
            "sent": sum(f.sent for f in self.flows.values()),
            "cpu": _cpu(),
            "runq": _runq(),
        }

    def finish(self):
        self.sending = False
        while len(self.snaps) < self.nmarks:  # a mark due at stopAt
            self.snapshot()
        self.report(
            "done",
            {
                "snapshots": self.snaps,
                "flows": {
                    f.index: {"sent": f.sent, "window_stalls": f.stalls}
                    for f in self.flows.values()
                },
                "unexpected_msgs": self.unexpected,
                "closed_conns": sorted({c for c in (_closed(p) for p in self.peers) if c}),
                "n_closed": sum(1 for p in self.peers if _closed(p)),
            },
        )


class Echo(_Role):
    """
    Ping-pong pairs: A sends seq n to B, B echoes it, A times the round trip
    and sends n+1.
    """

    def __init__(self, reactor, conn, spec):
        super().__init__(reactor, conn, spec)
        self.pairs = []
        self.pingTimeout = spec.get("ping_timeout", 1.0)

    async def setUp(self):
        prefix = self.spec["prefix"]
        size = self.spec["size"]
        for i in self.spec["pairs"]:
            b = await _connect(self.reactor, self.spec, f"b{i}")
            self.peers.append(b)
            a = await _connect(self.reactor, self.spec, f"a{i}")
            self.peers.append(a)
            p = {
                "i": i,
                "a": a,
                "b": b,
                "aid": wire.peerId(f"{prefix}a{i}"),
                "bid": wire.peerId(f"{prefix}b{i}"),
                "tail": wire.payloadTail(i, size),
                "seq": -1,
                "tSent": 0,
                "samples": [],
                "sent": 0,
                "echoed": 0,
                "timeouts": 0,
                "late": 0,
                "idErrors": 0,
                "dataErrors": 0,
                "done": False,
            }
            p["toB"] = bytes([wire.PROTO_VERSION, wire.T_TRANSPORT]) + p["bid"]
            p["toA"] = bytes([wire.PROTO_VERSION, wire.T_TRANSPORT]) + p["aid"]
            a.onTransport = lambda msg, p=p: self.atA(p, msg)
            b.onTransport = lambda msg, p=p: self.atB(p, msg)
            await a.waitOnline(p["bid"], timeout=self.spec.get("connect_timeout", 20.0))
            await b.waitOnline(p["aid"], timeout=self.spec.get("connect_timeout", 20.0))
            self.pairs.append(p)
        return len(self.peers)

    def go(self, sched):
        off = time.perf_counter_ns() - int(time.monotonic() * 1e9)
        self.fromNs = int(sched["marks"][0] * 1e9) + off
        self.untilNs = int(sched["marks"][1] * 1e9) + off
        self.endAt = sched["marks"][1] + 2.0
        for t in sched["marks"]:
            self.at(t, self.snapshot)
        self.at(sched["start"], self.begin)

    def begin(self):
        for p in self.pairs:
            self.ping(p)
        self.reactor.callLater(0.05, self.check)

    def ping(self, p):
        p["seq"] += 1
        p["sent"] += 1
        p["tSent"] = time.perf_counter_ns()
        p["a"].sendRaw(p["toB"] + p["seq"].to_bytes(8, "big") + p["tail"])

    def check_msg(self, p, msg, src):
        if msg[2:38] != src:
            p["idErrors"] += 1
        if len(msg) != wire.TRANSPORT_HDR + self.spec["size"] or msg[46:] != p["tail"]:
            p["dataErrors"] += 1

    def atB(self, p, msg):
        self.check_msg(p, msg, p["aid"])
        p["b"].sendRaw(p["toA"] + msg[38:])

    def atA(self, p, msg):
        t = time.perf_counter_ns()
        self.check_msg(p, msg, p["bid"])
        seq = int.from_bytes(msg[38:46], "big")
        if p["done"] or seq != p["seq"]:
            p["late"] += 1
            return
        p["echoed"] += 1
        if p["tSent"] >= self.fromNs:
            p["samples"].append(t - p["tSent"])
        if p["tSent"] < self.untilNs:
            self.ping(p)
        else:
            p["done"] = True
            self.maybeFinish()

    def check(self):
        now = time.perf_counter_ns()
        for p in self.pairs:
            if not p["done"] and now - p["tSent"] > self.pingTimeout * 1e9:
                p["timeouts"] += 1
                if now < self.untilNs:
                    self.ping(p)
                else:
                    p["done"] = True
        if not self.maybeFinish():
            self.reactor.callLater(0.05, self.check)

    def maybeFinish(self):
        if getattr(self, "finished", False):
            return True
        if all(p["done"] for p in self.pairs) or time.monotonic() > self.endAt:
            self.finished = True
            samples = sorted(s for p in self.pairs for s in p["samples"])
            self.report(
                "done",
                {
                    "snapshots": self.snaps,
                    "samples_ns": samples,
                    "sent": sum(p["sent"] for p in self.pairs),
                    "echoed": sum(p["echoed"] for p in self.pairs),
                    "timeouts": sum(p["timeouts"] for p in self.pairs),
                    "late": sum(p["late"] for p in self.pairs),
                    "id_errors": sum(p["idErrors"] for p in self.pairs),
                    "payload_errors": sum(p["dataErrors"] for p in self.pairs),
                    "closed_conns": sum(1 for x in self.peers if _closed(x)),
                },
            )
            return True
        return False

    def snapInfo(self):
        return {"t": time.monotonic(), "cpu": _cpu(), "runq": _runq()}


ROLES = {"recv": Receivers, "send": Senders, "echo": Echo}


def worker(conn, spec):
    """
    A load process (multiprocessing target, spawn context): one role, its
    own reactor.
    """
    from twisted.internet import reactor

    role = ROLES[spec["role"]](reactor, conn, spec)
    pipe = _Pipe(conn, role.command)
    reactor.addReader(pipe)
    reactor.callWhenRunning(role.start)
    reactor.run(installSignalHandlers=False)
