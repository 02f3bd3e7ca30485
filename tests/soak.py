"""
Load and soak: C{python -m tests.soak} (C{tox -e soak}; not in CI).

Operators need the figures a short benchmark cannot give: whether a relay
holding many peers for a long time stays flat (no memory creep, no growing
CPU, no latency drift) and loses nothing it accepted. This tool holds
C{--peers} authenticated idle peers that answer the relay's health checks
(as agents do, so none is dropped for silence) while C{--pairs} pairs stream
sequence-numbered, timestamped messages both ways for C{--duration} seconds,
on one relay or (C{--cluster}) on three pods on 127.0.0.2-4 with every pair
split across two pods.

The load side is raw non-blocking sockets in a few processes (one epoll loop
each, frames built once per connection, one XOR per message), so the
measurement is of the relay rather than of the load generator. Every message
is checked: source id, sequence, payload. The relay's RSS and CPU are
sampled every 10 s from /proc; latency percentiles come from the first and
the last window of the run.

Each process needs one descriptor per connection: the soft RLIMIT_NOFILE is
raised to the hard limit here, and the relays are spawned after that, so
they inherit it (both are reported). Spawned relays run with the per-address
connection limits off (every load connection comes from 127.0.0.1).

The summary is one JSON object on stdout; progress goes to stderr; the exit
status is 0 when nothing was lost, no idle peer was dropped, the relays
survived and RSS grew at most C{--rss-growth} after warm-up.
"""

import argparse
import array
import errno
import hashlib
import json
import multiprocessing
import os
import resource
import select
import socket
import struct
import sys
import tempfile
import time

from tests.bench import wire
from tests.bench.relayproc import cpuSeconds, raiseFileLimit, rssKiB, startRelays

HC_SERVER_FRAME = b"\x82\x02\x01\x05"
EPOLLIN = select.EPOLLIN
EPOLLOUT = select.EPOLLOUT
RECV_SIZE = 256 * 1024
HEADER = 8 + 8  # sequence number, send time (ns)

CONNECTING, UPGRADING, AUTHING, READY, CLOSED = range(5)


def log(message):
    sys.stderr.write(f"[soak {time.strftime('%H:%M:%S')}] {message}\n")
    sys.stderr.flush()


def processFileLimit(pid):
    try:
        with open(f"/proc/{pid}/limits") as f:
            for line in f:
                if line.startswith("Max open files"):
                    return int(line.split()[3])
    except (OSError, ValueError, IndexError):
        return None
    return None


def runQueueWaitNs(pid):
    """
    Nanoseconds C{pid} has spent runnable but waiting for a CPU
    (/proc/PID/schedstat): on a shared machine, a latency outlier with a
    jump here was the scheduler, not the code.
    """
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None


def percentiles(values):
    """
    Nearest-rank p50/p90/p99/p99.9/max of C{values} (ns) in milliseconds.
    """
    if not values:
        return {"n": 0}
    ordered = sorted(values)
    n = len(ordered)

    def at(p):
        return round(wire.percentile(ordered, p) / 1e6, 3)

    return {
        "n": n,
        "p50": at(0.5),
        "p90": at(0.9),
        "p99": at(0.99),
        "p999": at(0.999),
        "max": round(ordered[-1] / 1e6, 3),
    }


# The load worker


class Conn:
    __slots__ = (
        "sock",
        "fd",
        "state",
        "key",
        "name",
        "id",
        "host",
        "port",
        "buf",
        "out",
        "reader",
        "hcReply",
        "startedAt",
        "flowIn",
        "pair",
        "role",
        "request",
        "authFrame",
    )

    def __init__(self, name, host, port, role, tok):
        self.name = name
        self.id = wire.peerId(name)
        self.host = host
        self.port = port
        self.role = role
        self.key = os.urandom(4)
        self.state = CONNECTING
        self.buf = b""
        self.out = b""
        self.reader = None
        self.hcReply = wire.clientFrame(wire.HEALTHCHECK, self.key)
        self.flowIn = None
        self.pair = None
        self.sock = None
        self.fd = None
        self.startedAt = None
        self.request, _ = wire.upgradeRequest(host, port)
        self.authFrame = wire.clientFrame(wire.authMessage(self.id, tok), self.key)


class Flow:
    """
    One direction of one pair: sequence numbers from 0 at C{rate} a second.
    """

    __slots__ = (
        "sender",
        "receiver",
        "size",
        "tail",
        "headerPlain",
        "sent",
        "expected",
        "lost",
        "reordered",
        "corrupt",
        "foreign",
    )

    def __init__(self, sender, receiver, size, index):
        self.sender = sender
        self.receiver = receiver
        self.size = size
        self.tail = wire.payloadTail(index, size - HEADER + 8)[: max(0, size - HEADER)]
        self.headerPlain = bytes([wire.PROTO_VERSION, wire.T_TRANSPORT]) + receiver.id
        self.sent = 0
        self.expected = 0
        self.lost = 0
        self.reordered = 0
        self.corrupt = 0
        self.foreign = 0

    def frame(self, seq, nowNs):
        plain = self.headerPlain + struct.pack(">QQ", seq, nowNs) + self.tail
        return wire.clientFrame(plain, self.sender.key)


class Worker:
    """
    One load process: its share of idle peers and pairs, one epoll loop.
    """

    def __init__(self, spec, pipe):
        self.spec = spec
        self.pipe = pipe
        self.ep = select.epoll()
        self.conns = {}
        self.pending = []
        self.inFlight = 0
        self.maxInFlight = spec["concurrency"]
        tok = wire.token(spec["secret"], ttl=int(spec["duration"]) + 7200)
        self.idle = [Conn(name, host, port, "idle", tok) for name, host, port in spec["idle"]]
        self.flows = []
        self.pairs = []
        for index, (nameA, hostA, nameB, hostB, port) in spec["pairs"]:
            a = Conn(nameA, hostA, port, "pair", tok)
            b = Conn(nameB, hostB, port, "pair", tok)
            ab = Flow(a, b, spec["size"], 2 * index)
            ba = Flow(b, a, spec["size"], 2 * index + 1)
            a.flowIn, b.flowIn = ba, ab
            a.pair = b.pair = len(self.pairs)
            self.flows += [ab, ba]
            self.pairs.append([a, b, False])
        self.pending = self.idle + [c for p in self.pairs for c in p[:2]]
        self.pending.reverse()
        self.ready = 0
        self.failed = {}
        self.closedAfterReady = {}
        self.healthChecks = 0
        self.unexpected = 0
        self.handshakeNs = array.array("q")
        self.latStart = array.array("q")
        self.latEnd = array.array("q")
        self.latWindow = array.array("q")
        self.progress = []
        self.windows = None
        self.maxGapNs = 0
        self.waitNs = runQueueWaitNs(os.getpid())

    # Plumbing

    def fail(self, c, reason):
        if c.state == READY:
            self.closedAfterReady[reason] = self.closedAfterReady.get(reason, 0) + 1
        else:
            self.failed[reason] = self.failed.get(reason, 0) + 1
            self.inFlight -= 1
        c.state = CLOSED
        if c.fd in self.conns:
            del self.conns[c.fd]
            try:
                self.ep.unregister(c.fd)
            except OSError:
                pass
        try:
            c.sock.close()
        except OSError:
            pass

    def send(self, c, data):
        if c.state == CLOSED:
            return
        if c.out:
            c.out += data
            return
        try:
            n = c.sock.send(data)
        except BlockingIOError:
            n = 0
        except OSError as e:
            self.fail(c, f"send: {e.strerror}")
            return
        if n < len(data):
            c.out = data[n:]
            self.ep.modify(c.fd, EPOLLIN | EPOLLOUT)

    def flush(self, c):
        try:
            n = c.sock.send(c.out)
        except BlockingIOError:
            return
        except OSError as e:
            self.fail(c, f"send: {e.strerror}")
            return
        c.out = c.out[n:]
        if not c.out:
            self.ep.modify(c.fd, EPOLLIN)

    def start(self, c):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c.sock = s
        c.fd = s.fileno()
        c.startedAt = time.perf_counter_ns()
        err = s.connect_ex((c.host, c.port))
        self.inFlight += 1
        self.conns[c.fd] = c
        if err not in (0, errno.EINPROGRESS):
            self.fail(c, f"connect: {os.strerror(err)}")
            return
        self.ep.register(c.fd, EPOLLOUT)

    # Events

    def writable(self, c):
        if c.state == CONNECTING:
            err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.fail(c, f"connect: {os.strerror(err)}")
                return
            c.state = UPGRADING
            self.ep.modify(c.fd, EPOLLIN)
            self.send(c, c.request)
        elif c.out:
            self.flush(c)

    def readable(self, c, nowNs):
        try:
            data = c.sock.recv(RECV_SIZE)
        except BlockingIOError:
            return
        except OSError as e:
            self.fail(c, f"recv: {e.strerror}")
            return
        if not data:
            self.fail(c, "closed by the relay")
            return
        if c.state == READY:
            if data == HC_SERVER_FRAME and not c.reader.buf and c.flowIn is None:
                self.healthChecks += 1
                self.send(c, c.hcReply)
                return
            self.messages(c, data, nowNs)
            return
        if c.state == UPGRADING:
            c.buf += data
            head, sep, rest = c.buf.partition(b"\r\n\r\n")
            if not sep:
                return
            if not head.startswith(b"HTTP/1.1 101"):
                status = head.partition(b"\r\n")[0][:40]
                self.fail(c, f"upgrade refused: {status!r}")
                return
            c.buf = b""
            c.reader = wire.ServerFrameReader()
            c.state = AUTHING
            self.send(c, c.authFrame)
            data = rest
        if c.state == AUTHING and data:
            try:
                messages = c.reader.feed(data)
            except ValueError as e:
                self.fail(c, f"bad frame: {e}")
                return
            if not messages:
                return
            op, payload = messages[0]
            if op != wire.OP_BINARY or payload[:2] != b"\x01\x07":
                self.fail(c, f"expected AuthResponse, got {payload[:2].hex()}")
                return
            c.state = READY
            self.inFlight -= 1
            self.ready += 1
            self.handshakeNs.append(time.perf_counter_ns() - c.startedAt)
            if c.pair is not None:
                self.pairConnected(c)
            for op, payload in messages[1:]:
                self.message(c, op, payload, nowNs)

    def pairConnected(self, c):
        a, b, _ = self.pairs[c.pair]
        if a.state == READY and b.state == READY:
            # The relay answers at once if B is known (locally or, in a
            # cluster, on another pod); else when B comes online.
            self.send(a, wire.clientFrame(wire.idListMessage(wire.T_SUBSCRIBE, [b.id]), a.key))

    def messages(self, c, data, nowNs):
        try:
            messages = c.reader.feed(data)
        except ValueError as e:
            self.fail(c, f"bad frame: {e}")
            return
        for op, payload in messages:
            self.message(c, op, payload, nowNs)

    def message(self, c, op, payload, nowNs):
        if op != wire.OP_BINARY:
            if op == wire.OP_PING:
                self.send(c, wire.clientFrame(payload, c.key, wire.OP_PONG))
            elif op == wire.OP_CLOSE:
                self.fail(c, "WebSocket close from the relay")
            else:
                self.unexpected += 1
            return
        kind = payload[1] if len(payload) > 1 else None
        if kind == wire.T_TRANSPORT and c.flowIn is not None:
            self.transport(c.flowIn, payload, nowNs)
        elif kind == wire.T_HEALTHCHECK:
            self.healthChecks += 1
            self.send(c, c.hcReply)
        elif kind == wire.T_PEERS_ONLINE and c.pair is not None:
            pair = self.pairs[c.pair]
            if pair[1].id in payload:
                pair[2] = True
        elif kind not in (wire.T_PEERS_ONLINE, wire.T_PEERS_GONE):
            self.unexpected += 1

    def transport(self, flow, payload, nowNs):
        if payload[2:38] != flow.sender.id:
            flow.foreign += 1
            return
        if len(payload) != 38 + flow.size:
            flow.corrupt += 1
            return
        seq, sentNs = struct.unpack_from(">QQ", payload, 38)
        if payload[38 + HEADER :] != flow.tail:
            flow.corrupt += 1
        if seq != flow.expected:
            if seq < flow.expected:
                flow.reordered += 1
                return
            flow.lost += seq - flow.expected
        flow.expected = seq + 1
        latency = nowNs - sentNs
        if self.windows is not None:
            if sentNs < self.windows[0]:
                self.latStart.append(latency)
            elif sentNs >= self.windows[1]:
                self.latEnd.append(latency)
        self.latWindow.append(latency)

    # Phases

    def poll(self, timeout):
        events = self.ep.poll(timeout)
        nowNs = time.perf_counter_ns()
        for fd, ev in events:
            c = self.conns.get(fd)
            if c is None:
                continue
            if ev & EPOLLOUT:
                self.writable(c)
                if c.state == CLOSED:
                    continue
            if ev & (EPOLLIN | select.EPOLLERR | select.EPOLLHUP):
                self.readable(c, nowNs)

    def connectAll(self, deadline):
        while time.monotonic() < deadline:
            while self.pending and self.inFlight < self.maxInFlight:
                self.start(self.pending.pop())
            if (
                not self.pending
                and self.inFlight == 0
                and all(p[2] or p[0].state == CLOSED or p[1].state == CLOSED for p in self.pairs)
            ):
                return True
            self.poll(0.05)
        return False

    def command(self):
        if self.pipe.poll():
            return self.pipe.recv()
        return None

    def idleUntilCommand(self):
        while True:
            message = self.command()
            if message is not None:
                return message
            self.poll(0.1)

    def stream(self, startNs, durationNs, rate, windowNs, drainS):
        endNs = startNs + durationNs
        self.windows = (startNs + windowNs, endNs - windowNs)
        interval = 1e9 / rate if rate > 0 else None
        nextReport = startNs + 10 * 10**9
        maxBurst = max(1, int(rate * 0.2))
        last = time.perf_counter_ns()
        while True:
            now = time.perf_counter_ns()
            self.maxGapNs = max(self.maxGapNs, now - last)
            last = now
            if now >= endNs:
                break
            if interval is not None and now >= startNs:
                due = int((now - startNs) / interval) + 1
                for flow in self.flows:
                    if flow.sender.state != READY:
                        continue
                    n = min(due - flow.sent, maxBurst)
                    if n <= 0:
                        continue
                    frames = [flow.frame(flow.sent + k, now) for k in range(n)]
                    flow.sent += n
                    self.send(flow.sender, b"".join(frames))
            if now >= nextReport:
                nextReport += 10 * 10**9
                self.report(now, startNs)
            self.poll(0.005)
        drainUntil = time.monotonic() + drainS
        while time.monotonic() < drainUntil:
            if all(f.expected >= f.sent or f.receiver.state == CLOSED for f in self.flows):
                break
            self.poll(0.02)

    def report(self, now, startNs):
        lat = sorted(self.latWindow)
        self.latWindow = array.array("q")
        wait = runQueueWaitNs(os.getpid())
        entry = {
            "loop_max_gap_ms": round(self.maxGapNs / 1e6, 1),
            "runqueue_wait_ms": round((wait - self.waitNs) / 1e6, 1)
            if wait is not None and self.waitNs is not None
            else None,
            "t": round((now - startNs) / 1e9, 1),
            "sent": sum(f.sent for f in self.flows),
            "received": sum(f.expected - f.lost for f in self.flows),
            "health_checks": self.healthChecks,
            "closed": sum(self.closedAfterReady.values()),
            "p50_ms": round(wire.percentile(lat, 0.5) / 1e6, 3) if lat else None,
            "p99_ms": round(wire.percentile(lat, 0.99) / 1e6, 3) if lat else None,
        }
        self.maxGapNs = 0
        self.waitNs = wait
        self.progress.append(entry)
        self.pipe.send(("progress", entry))

    def results(self):
        flows = self.flows
        return {
            "idle": len(self.idle),
            "pairs": len(self.pairs),
            "ready": self.ready,
            "failed": self.failed,
            "closed_after_ready": self.closedAfterReady,
            "routed_pairs": sum(1 for p in self.pairs if p[2]),
            "health_checks": self.healthChecks,
            "unexpected": self.unexpected,
            "sent": sum(f.sent for f in flows),
            "received": sum(f.expected - f.lost for f in flows),
            "lost": sum(f.lost for f in flows),
            "missing": sum(max(0, f.sent - f.expected) for f in flows),
            "reordered": sum(f.reordered for f in flows),
            "corrupt": sum(f.corrupt for f in flows),
            "foreign": sum(f.foreign for f in flows),
            "handshake_ns": self.handshakeNs.tobytes(),
            "lat_start_ns": self.latStart.tobytes(),
            "lat_end_ns": self.latEnd.tobytes(),
            "progress": self.progress,
            "cpu_s": sum(os.times()[:2]),
        }


def workerMain(spec, pipe):
    raiseFileLimit(None)
    worker = Worker(spec, pipe)
    try:
        finished = worker.connectAll(time.monotonic() + spec["connectTimeout"])
        pipe.send(
            (
                "ready",
                {
                    "ready": worker.ready,
                    "failed": worker.failed,
                    "complete": finished,
                    "routed": sum(1 for p in worker.pairs if p[2]),
                },
            )
        )
        message = worker.idleUntilCommand()
        if message[0] == "go":
            _, startNs, durationNs, rate, windowNs, drainS = message
            worker.stream(startNs, durationNs, rate, windowNs, drainS)
        pipe.send(("done", worker.results()))
        worker.idleUntilCommand()
    except Exception as e:
        pipe.send(("error", f"{type(e).__name__}: {e}"))
    finally:
        for c in list(worker.conns.values()):
            try:
                c.sock.close()
            except OSError:
                pass


# The controller


def spawn(options, logDir):
    extra = ["--max-connections-per-ip", "0", "--connection-rate-per-ip", "0"] + list(
        options.relay_arg or []
    )
    relays, _ = startRelays(
        options.secret,
        extra,
        logDir,
        "soak",
        cluster=options.cluster,
        clusterSecret=options.cluster_secret,
        timeout=60,
    )
    return relays


def plan(options, relays):
    """
    Split idle peers and pairs over the worker processes; in a cluster idle
    peers go round-robin over the pods and pair i joins pod i and pod i+1.
    """
    run = hashlib.sha256(os.urandom(8)).hexdigest()[:8]
    specs = [
        {
            "idle": [],
            "pairs": [],
            "secret": options.secret,
            "size": options.size,
            "duration": options.duration,
            "concurrency": options.concurrency,
            "connectTimeout": options.connect_timeout,
        }
        for _ in range(options.procs)
    ]
    for i in range(options.peers):
        relay = relays[i % len(relays)]
        specs[i % options.procs]["idle"].append((f"soak-{run}-idle-{i}", relay.host, relay.port))
    for i in range(options.pairs):
        a = relays[i % len(relays)]
        b = relays[(i + 1) % len(relays)]
        specs[i % options.procs]["pairs"].append(
            (i, f"soak-{run}-a-{i}", a.host, f"soak-{run}-b-{i}", b.host, a.port)
        )
    for spec in specs:
        spec["pairs"] = [(i, (na, ha, nb, hb, port)) for i, na, ha, nb, hb, port in spec["pairs"]]
    return specs


def sample(relays, samples, t0, last):
    row = {
        "t": round(time.monotonic() - t0, 1),
        "rss_kib": [],
        "cpu_pct": [],
        "runqueue_wait_ms": [],
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }
    for i, relay in enumerate(relays):
        wait = runQueueWaitNs(relay.pid)
        previous = last.get(("wait", i))
        row["runqueue_wait_ms"].append(
            round((wait - previous) / 1e6, 1) if wait is not None and previous is not None else None
        )
        last[("wait", i)] = wait
        try:
            rss = rssKiB(relay.pid)
            cpu = cpuSeconds(relay.pid)
        except (OSError, RuntimeError):
            rss = cpu = None
        row["rss_kib"].append(rss)
        now = time.monotonic()
        if cpu is not None and last.get(i) is not None:
            prevT, prevCpu = last[i]
            row["cpu_pct"].append(round(100 * (cpu - prevCpu) / max(1e-6, now - prevT), 1))
        else:
            row["cpu_pct"].append(None)
        if cpu is not None:
            last[i] = (now, cpu)
    samples.append(row)
    return row


def rssVerdict(samples, relays, warmT, limit):
    out = []
    for i, relay in enumerate(relays):
        series = [(s["t"], s["rss_kib"][i]) for s in samples if s["rss_kib"][i] is not None]
        after = [v for t, v in series if t >= warmT]
        if len(after) < 2:
            out.append({"ok": None, "samples": len(after)})
            continue
        warm = sorted(after[:3])[len(after[:3]) // 2]
        end = sorted(after[-3:])[len(after[-3:]) // 2]
        growth = (end - warm) / warm
        out.append(
            {
                "address": f"{relay.host}:{relay.port}",
                "at_start_kib": series[0][1],
                "after_warmup_kib": warm,
                "end_kib": end,
                "max_kib": max(after),
                "growth_pct": round(100 * growth, 2),
                "ok": growth <= limit,
            }
        )
    return out


def run(options):
    raiseFileLimit(None)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    logDir = options.log_dir or tempfile.mkdtemp(prefix="relay-soak-")
    os.makedirs(logDir, exist_ok=True)
    log(f"RLIMIT_NOFILE soft {soft}, hard {hard}; relay logs in {logDir}")
    relays = spawn(options, logDir)
    workers = []
    try:
        return measure(options, relays, workers, soft, hard)
    finally:
        for process, _ in workers:
            if process.is_alive():
                process.terminate()
        for relay in relays:
            relay.stop()


def measure(options, relays, workers, soft, hard):
    relayLimits = [processFileLimit(r.pid) for r in relays]
    described = [
        f"{r.host}:{r.port} (pid {r.pid}, nofile {lim})" for r, lim in zip(relays, relayLimits)
    ]
    log(f"relays {described}")
    specs = plan(options, relays)
    ctx = multiprocessing.get_context("fork")
    for spec in specs:
        parent, child = ctx.Pipe()
        process = ctx.Process(target=workerMain, args=(spec, child), daemon=True)
        process.start()
        workers.append((process, parent))
    samples = []
    last = {}
    t0 = time.monotonic()
    failures = []
    readiness = []
    connectStarted = time.monotonic()
    for process, pipe in workers:
        while not pipe.poll(1):
            if not process.is_alive():
                raise RuntimeError("a load worker died during set-up")
            if time.monotonic() - t0 > options.connect_timeout + 30:
                raise RuntimeError("load workers did not report ready")
        kind, payload = pipe.recv()
        if kind != "ready":
            raise RuntimeError(f"load worker: {payload}")
        readiness.append(payload)
    connectS = time.monotonic() - connectStarted
    ready = sum(r["ready"] for r in readiness)
    log(
        f"{ready} of {options.peers + 2 * options.pairs} connections authenticated in "
        f"{connectS:.1f} s; {sum(r['routed'] for r in readiness)} of {options.pairs} pairs "
        f"routed; failures {[r['failed'] for r in readiness]}"
    )
    sample(relays, samples, t0, last)
    startNs = time.perf_counter_ns() + 500_000_000
    windowNs = int(options.window * 1e9)
    for _, pipe in workers:
        pipe.send(
            ("go", startNs, int(options.duration * 1e9), options.rate, windowNs, options.drain)
        )
    streamT0 = time.monotonic()
    nextSample = time.monotonic() + 10
    results = [None] * len(workers)
    progress = {}
    timeline = []
    while any(r is None for r in results):
        for i, (process, pipe) in enumerate(workers):
            while results[i] is None and pipe.poll():
                kind, payload = pipe.recv()
                if kind == "progress":
                    slot = int(round(payload["t"] / 10))
                    progress.setdefault(slot, []).append(payload)
                    if len(progress[slot]) == len(workers):
                        rows = progress.pop(slot)
                        p99 = [r["p99_ms"] for r in rows if r["p99_ms"] is not None]
                        timeline.append(
                            {
                                "t": payload["t"],
                                "sent": sum(r["sent"] for r in rows),
                                "received": sum(r["received"] for r in rows),
                                "worst_p99_ms": max(p99) if p99 else None,
                                "rss_kib": samples[-1]["rss_kib"],
                                "load_loop_max_gap_ms": max(r["loop_max_gap_ms"] for r in rows),
                                "load_runqueue_wait_ms": [r["runqueue_wait_ms"] for r in rows],
                                "relay_runqueue_wait_ms": samples[-1]["runqueue_wait_ms"],
                                "cpu_pct": samples[-1]["cpu_pct"],
                                "loadavg_1m": samples[-1]["loadavg_1m"],
                            }
                        )
                        log(
                            f"t={payload['t']:.0f}s sent {sum(r['sent'] for r in rows)} received "
                            f"{sum(r['received'] for r in rows)} hc "
                            f"{sum(r['health_checks'] for r in rows)} closed "
                            f"{sum(r['closed'] for r in rows)} p99 {max(p99) if p99 else None} "
                            f"ms; relay {samples[-1]['rss_kib']} KiB {samples[-1]['cpu_pct']} "
                            f"%CPU, load average {samples[-1]['loadavg_1m']}"
                        )
                elif kind == "done":
                    results[i] = payload
                else:
                    raise RuntimeError(f"load worker: {payload}")
            if results[i] is None and not process.is_alive():
                raise RuntimeError("a load worker died")
        if time.monotonic() >= nextSample:
            nextSample += 10
            sample(relays, samples, t0, last)
            if not all(r.running() for r in relays):
                failures.append("a relay exited during the soak")
        time.sleep(0.2)
    sample(relays, samples, t0, last)
    relayAlive = [r.running() for r in relays]
    for _, pipe in workers:
        pipe.send(("stop",))
    for process, _ in workers:
        process.join(10)
        if process.is_alive():
            process.terminate()
    exitCodes = [r.stop() for r in relays]

    def total(key):
        return sum(r[key] for r in results)

    def merged(key):
        out = {}
        for r in results:
            for k, v in r[key].items():
                out[k] = out.get(k, 0) + v
        return out

    def latencies(key):
        values = array.array("q")
        for r in results:
            values.frombytes(r[key])
        return percentiles(values)

    handshakes = array.array("q")
    for r in results:
        handshakes.frombytes(r["handshake_ns"])
    warmT = (streamT0 - t0) + options.warmup
    rss = rssVerdict(samples, relays, warmT, options.rss_growth / 100)
    cpuRows = [s for s in samples if s["t"] >= streamT0 - t0]
    cpuAvg = []
    for i in range(len(relays)):
        values = [s["cpu_pct"][i] for s in cpuRows if s["cpu_pct"][i] is not None]
        cpuAvg.append(round(sum(values) / len(values), 1) if values else None)
    loss = {
        "sent": total("sent"),
        "received": total("received"),
        "lost_in_sequence": total("lost"),
        "missing_at_end": total("missing"),
        "reordered": total("reordered"),
        "corrupt": total("corrupt"),
        "foreign": total("foreign"),
    }
    closed = merged("closed_after_ready")
    failedConnects = merged("failed")
    expected = options.peers + 2 * options.pairs
    if total("ready") < expected:
        failures.append(
            f"only {total('ready')} of {expected} connections authenticated: {failedConnects}"
        )
    if loss["lost_in_sequence"] or loss["missing_at_end"] or loss["reordered"] or loss["corrupt"]:
        failures.append(f"messages lost or damaged: {loss}")
    if closed:
        failures.append(f"connections closed during the soak: {closed}")
    if not all(relayAlive):
        failures.append("a relay process died")
    for verdict in rss:
        if verdict.get("ok") is False:
            failures.append(
                f"RSS grew {verdict['growth_pct']} % after warm-up on {verdict['address']}"
            )
    if any(code != 0 for code in exitCodes):
        failures.append(f"relay exit codes on SIGTERM: {exitCodes}")
    return {
        "ok": not failures,
        "failures": failures,
        "config": {
            "cluster": options.cluster,
            "peers": options.peers,
            "pairs": options.pairs,
            "duration_s": options.duration,
            "rate_per_flow": options.rate,
            "size": options.size,
            "procs": options.procs,
            "warmup_s": options.warmup,
            "window_s": options.window,
        },
        "fd_limit": {"soft": soft, "hard": hard, "relays": relayLimits},
        "connect": {
            "authenticated": total("ready"),
            "expected": expected,
            "seconds": round(connectS, 1),
            "failed": failedConnects,
            "routed_pairs": total("routed_pairs"),
            "handshake_ms": percentiles(handshakes),
        },
        "loss": loss,
        "idle": {
            "health_checks_answered": total("health_checks"),
            "closed_by_relay": closed,
            "unexpected_messages": total("unexpected"),
        },
        "latency_ms": {"start": latencies("lat_start_ns"), "end": latencies("lat_end_ns")},
        "rss": rss,
        "cpu": {"relay_avg_pct": cpuAvg, "load_cpu_s": round(total("cpu_s"), 1)},
        "timeline": timeline,
        "samples": samples,
        "relays": [
            {
                "address": f"{r.host}:{r.port}",
                "pid": r.pid,
                "alive_at_end": a,
                "exit_code": c,
                "log": r.logPath,
            }
            for r, a, c in zip(relays, relayAlive, exitCodes)
        ],
    }


def parseArgs(argv):
    parser = argparse.ArgumentParser(
        prog="python -m tests.soak", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--peers", type=int, default=10000, help="idle authenticated peers (default 10000)"
    )
    parser.add_argument("--pairs", type=int, default=100, help="streaming pairs (default 100)")
    parser.add_argument(
        "--duration", type=float, default=600.0, help="seconds of streaming (default 600)"
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=20.0,
        help="messages per second each way per pair (default 20)",
    )
    parser.add_argument(
        "--size", type=int, default=1000, help="transport payload bytes (default 1000, at least 16)"
    )
    parser.add_argument(
        "--cluster", action="store_true", help="three pods on 127.0.0.2-4, pairs split across pods"
    )
    parser.add_argument("--procs", type=int, default=2, help="load processes (default 2)")
    parser.add_argument(
        "--concurrency", type=int, default=128, help="handshakes in flight per load process"
    )
    parser.add_argument(
        "--connect-timeout", type=float, default=300.0, help="seconds allowed to connect everything"
    )
    parser.add_argument(
        "--warmup", type=float, default=60.0, help="seconds of streaming before the RSS reference"
    )
    parser.add_argument(
        "--window", type=float, default=60.0, help="seconds of the start and end latency windows"
    )
    parser.add_argument(
        "--drain",
        type=float,
        default=15.0,
        help="seconds to wait for messages in flight at the end",
    )
    parser.add_argument(
        "--rss-growth", type=float, default=5.0, help="allowed RSS growth after warm-up, percent"
    )
    parser.add_argument("--secret", help="auth secret for the spawned relays (default random)")
    parser.add_argument("--cluster-secret", help="inter-pod secret (default random)")
    parser.add_argument(
        "--relay-arg", action="append", help="extra argument for the relays (repeat)"
    )
    parser.add_argument("--log-dir", help="where the relays log")
    options = parser.parse_args(argv)
    if options.size < HEADER:
        parser.error(f"--size must be at least {HEADER}")
    options.secret = options.secret or os.urandom(16).hex()
    options.cluster_secret = options.cluster_secret or os.urandom(16).hex()
    options.window = min(options.window, options.duration / 3)
    options.warmup = min(options.warmup, options.duration / 3)
    return options


def main(argv=None):
    options = parseArgs(sys.argv[1:] if argv is None else argv)
    started = time.time()
    try:
        result = run(options)
    except RuntimeError as e:
        log(f"soak could not run: {e}")
        return 2
    result["wall_s"] = round(time.time() - started, 1)
    sys.stdout.write(json.dumps(result, indent=2) + "\n")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
