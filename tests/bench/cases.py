"""
The benchmark cases: each run returns one dict of figures; L{runCase}
repeats it and takes medians.
"""

import json
import multiprocessing
import os
import shutil
import subprocess
import time

from tests.bench import wire
from tests.bench.loads import EchoLoop, pairWorker, probeRoute
from tests.bench.peers import BenchError, HandshakeRun, connectPeer
from tests.bench.relayproc import (
    ROOT,
    RelayProcess,
    cpuSeconds,
    listenOverflows,
    rssKiB,
    runQueueSeconds,
    udpCounters,
)
from tests.loopback import commonPort, freePort


class Skip(Exception):
    """
    The case cannot run against this relay (the reason is the message).
    """


def _sleepUntil(t):
    while True:
        left = t - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(left, 0.05))


def _relayCpu(target):
    if target.pid is None:
        return None
    try:
        return cpuSeconds(target.pid)
    except OSError:
        return None


def _rss(target):
    if target.pid is None:
        return None
    try:
        return rssKiB(target.pid)
    except (OSError, RuntimeError):
        return None


def _prefix(case, run):
    return f"bench{os.getpid()}-{case}-{run}-{time.monotonic_ns() % 1000000}-"


# ---------------------------------------------------------------------------
# Pipelined pairs: throughput and stalled receiver


def _spawnWorkers(worker, specs, method, timeout, what="load process"):
    """
    Start one process per spec running C{worker(pipe, spec)} (multiprocessing
    start method C{method}), wait until all have connected their peers,
    within C{timeout} seconds in all.

    @return: list of (process, parent end of the pipe, ready info).
    """
    ctx = multiprocessing.get_context(method)
    workers = []
    for spec in specs:
        parent, child = ctx.Pipe()
        p = ctx.Process(target=worker, args=(child, spec), daemon=True)
        p.start()
        child.close()
        workers.append([p, parent, None])
    errors = []
    deadline = time.monotonic() + timeout
    for w in workers:
        p, conn, _ = w
        if not conn.poll(max(0.1, deadline - time.monotonic())):
            errors.append(f"a {what} did not connect its peers within {timeout:g} s")
            continue
        try:
            kind, info = conn.recv()
        except EOFError:
            errors.append("a load process died during set-up")
            continue
        if kind == "error":
            errors.append(info)
        w[2] = info
    if errors:
        _stopWorkers(workers)
        raise BenchError("; ".join(errors))
    return workers


def _stopWorkers(workers, join=8):
    for _p, conn, _ in workers:
        try:
            conn.send(("stop", None))
        except OSError:
            pass
    for p, conn, _ in workers:
        p.join(join)
        if p.is_alive():
            p.kill()
            p.join()
        conn.close()


def _spawnPairWorkers(specs):
    """
    One L{pairWorker} process (forked) per spec.
    """
    return _spawnWorkers(pairWorker, specs, "fork", 120)


def _receiveReports(connections, timeout):
    """
    One report from each load process's pipe, within C{timeout} in all.

    @return: C{(results, errors)}.
    """
    results = []
    errors = []
    deadline = time.monotonic() + timeout
    for conn in connections:
        if not conn.poll(max(0.1, deadline - time.monotonic())):
            errors.append("a load process did not report in time")
            continue
        try:
            kind, info = conn.recv()
        except EOFError:
            errors.append("a load process died")
            continue
        if kind == "error":
            errors.append(info)
        else:
            results.append(info)
    return results, errors


def _collect(workers, timeout):
    results, errors = _receiveReports([conn for _, conn, _ in workers], timeout)
    for p, _conn, _ in workers:
        p.join(10)
        if p.is_alive():
            p.kill()
            p.join()
    if errors:
        raise BenchError("; ".join(errors))
    return results


def _split(indices, procs):
    procs = max(1, min(procs, len(indices) or 1))
    return [indices[k::procs] for k in range(procs)]


def _flowTotals(results):
    tot = {
        "sent": 0,
        "received": 0,
        "lost": 0,
        "seq_gaps": 0,
        "gap_msgs": 0,
        "reordered": 0,
        "id_errors": 0,
        "payload_errors": 0,
        "window_stalls": 0,
    }
    flood = dict(tot)
    for r in results:
        for f in r["flows"]:
            into = flood if f["mode"] == "flood" else tot
            for k in into:
                into[k] += f[k]
    return tot, flood


def _rate(results, i, j, key="msgs"):
    """
    Sum over load processes of (snapshot j - snapshot i) / elapsed.
    """
    total = 0.0
    for r in results:
        a, b = r["snapshots"][i], r["snapshots"][j]
        dt = b["t"] - a["t"]
        if dt > 0:
            total += (b[key] - a[key]) / dt
    return total


def throughputRun(target, o, pairs, run):
    """
    C{pairs} pairs, payload C{o.size}, window C{o.window} per pair, spread
    over C{o.procs} load processes.
    """
    tok = wire.token(target.secret)
    procs = o.procs if o.procs else (1 if pairs <= 10 else 2)
    specs = []
    for part in _split(list(range(pairs)), procs):
        specs.append(
            {
                "host": target.host,
                "port": target.port,
                "token": tok,
                "prefix": _prefix("tput", run),
                "pairs": part,
                "floods": 0,
                "size": o.size,
                "window": o.window,
                "batch": o.batch,
                "tls": getattr(target, "tls", False),
            }
        )
    workers = _spawnPairWorkers(specs)
    start = time.monotonic() + 0.2
    m0 = start + o.warmup
    m1 = m0 + o.duration
    sched = {"start": start, "marks": [m0, m1], "stopAt": m1, "drain": 10.0}
    for _p, conn, _ in workers:
        conn.send(("go", sched))
    _sleepUntil(m0)
    c0, t0 = _relayCpu(target), time.monotonic()
    _sleepUntil(m1)
    c1, t1 = _relayCpu(target), time.monotonic()
    results = _collect(workers, o.duration + o.warmup + 60)
    tot, _ = _flowTotals(results)
    rate = _rate(results, 0, 1)
    res = {
        "pairs": pairs,
        "size": o.size,
        "window": o.window,
        "procs": len(specs),
        "msgs_per_s": round(rate, 1),
        "gbit_per_s": round(rate * o.size * 8 / 1e9, 4),
        "relay_cpu": round((c1 - c0) / (t1 - t0), 3) if c0 is not None else None,
        "loadgen_cpu": round(
            sum((r["snapshots"][1]["cpu"] - r["snapshots"][0]["cpu"]) for r in results) / (t1 - t0),
            3,
        ),
        "unexpected_msgs": sum(r["unexpected_msgs"] for r in results),
        "closed_conns": sum(r["n_closed"] for r in results),
    }
    # the relay's cost per message, which a busy shared machine disturbs less
    # than the rate itself
    res["msgs_per_relay_cpu_s"] = round(rate / res["relay_cpu"], 1) if res["relay_cpu"] else None
    res.update(tot)
    closedWhy = sorted({w for r in results for w in r["closed_conns"]})
    if closedWhy:
        res["closed_why"] = closedWhy
    res["ok"] = (
        tot["lost"] == 0
        and tot["gap_msgs"] == 0
        and tot["reordered"] == 0
        and tot["id_errors"] == 0
        and tot["payload_errors"] == 0
        and res["closed_conns"] == 0
        and res["unexpected_msgs"] == 0
    )
    return res


def stallRun(target, o, run):
    """
    C{o.stall_pairs} windowed pairs measured alone (baseline), then with
    C{o.stall_senders} senders flooding one receiver that does not read, for
    C{o.stall_duration} seconds; the relay's RSS is sampled throughout.
    Afterwards the stalled receiver reads what reached it: every message
    must be intact (drops show as sequence gaps).
    """
    tok = wire.token(target.secret)
    procs = o.procs if o.procs else 1
    parts = _split(list(range(o.stall_pairs)), procs)
    specs = []
    for k, part in enumerate(parts):
        specs.append(
            {
                "host": target.host,
                "port": target.port,
                "token": tok,
                "prefix": _prefix("stall", run),
                "pairs": part,
                "floods": o.stall_senders if k == 0 else 0,
                "size": o.size,
                "window": o.window,
                "batch": o.batch,
            }
        )
    workers = _spawnPairWorkers(specs)
    start = time.monotonic() + 0.2
    b0 = start + o.warmup
    b1 = b0 + o.stall_baseline
    s0 = b1 + 1.0  # the relay's buffers for the stalled peer fill up
    s1 = s0 + o.stall_duration
    sched = {"start": start, "marks": [b0, b1, s0, s1], "floodAt": b1, "stopAt": s1, "drain": 15.0}
    for _p, conn, _ in workers:
        conn.send(("go", sched))
    _sleepUntil(b0)
    cb0 = _relayCpu(target)
    _sleepUntil(b1)
    cb1 = _relayCpu(target)
    rssBefore = _rss(target)
    peak = rssBefore or 0
    samples = []
    cs0 = None
    while time.monotonic() < s1:
        if cs0 is None and time.monotonic() >= s0:
            cs0 = _relayCpu(target)
        r = _rss(target)
        if r is not None:
            peak = max(peak, r)
            samples.append(r)
        time.sleep(0.25)
    cs1 = _relayCpu(target)
    rssEnd = _rss(target)
    results = _collect(workers, o.stall_duration + o.stall_baseline + 90)
    tot, flood = _flowTotals(results)
    base = _rate(results, 0, 1)
    during = _rate(results, 2, 3)
    res = {
        "pairs": o.stall_pairs,
        "stall_senders": o.stall_senders,
        "size": o.size,
        "window": o.window,
        "baseline_msgs_per_s": round(base, 1),
        "stalled_msgs_per_s": round(during, 1),
        "rate_ratio": round(during / base, 3) if base else None,
        "flood_offered_msgs_per_s": round(_rate(results, 2, 3, "flood_sent"), 1),
        "rss_before_kib": rssBefore,
        "rss_peak_kib": peak,
        "rss_end_kib": rssEnd,
        "rss_growth_mib": round((peak - rssBefore) / 1024, 1) if rssBefore else None,
        "relay_cpu_baseline": round((cb1 - cb0) / o.stall_baseline, 3) if cb0 is not None else None,
        "relay_cpu_stalled": round((cs1 - cs0) / o.stall_duration, 3) if cs0 is not None else None,
        "flood_sent": flood["sent"],
        "stalled_delivered": flood["received"],
        "stalled_dropped": flood["sent"] - flood["received"],
        "stalled_payload_errors": flood["payload_errors"] + flood["id_errors"],
        "stalled_reordered": flood["reordered"],
        "stalled_closed": next(
            (r.get("stalled_closed") for r in results if "stalled_closed" in r), None
        ),
        "unexpected_msgs": sum(r["unexpected_msgs"] for r in results),
    }
    res.update({k: v for k, v in tot.items()})
    closed = sum(r["n_closed"] for r in results) - (1 if res["stalled_closed"] else 0)
    res["closed_conns"] = closed
    res["ok"] = (
        tot["lost"] == 0
        and tot["gap_msgs"] == 0
        and tot["reordered"] == 0
        and tot["id_errors"] == 0
        and tot["payload_errors"] == 0
        and closed == 0
        and res["stalled_payload_errors"] == 0
        and res["stalled_reordered"] == 0
    )
    return res


# ---------------------------------------------------------------------------
# Latency


def _connectPairs(endpointA, endpointB, tok, prefix, n, tls=False):
    pairs = []
    try:
        for i in range(n):
            b = connectPeer(endpointB[0], endpointB[1], f"{prefix}b{i}", tok, tls=tls)
            try:
                a = connectPeer(endpointA[0], endpointA[1], f"{prefix}a{i}", tok, tls=tls)
            except BaseException:
                b.close()
                raise
            pairs.append((a, b))
    except BaseException:
        for a, b in pairs:
            a.close()
            b.close()
        raise
    return pairs


def _latencyFigures(s, duration):
    """
    The figures of round trips C{s} (ns, ascending) measured over
    C{duration} seconds.

    @return: C{(dict of figures, round trips per second)}.
    """
    us = lambda ns: None if ns is None else round(ns / 1000, 1)  # noqa: E731
    rt = len(s) / duration
    figures = {
        "samples": len(s),
        "p50_us": us(wire.percentile(s, 0.5)),
        "p90_us": us(wire.percentile(s, 0.9)),
        "p99_us": us(wire.percentile(s, 0.99)),
        "p999_us": us(wire.percentile(s, 0.999)),
        "min_us": us(s[0] if s else None),
        "max_us": us(s[-1] if s else None),
        "mean_us": us(sum(s) / len(s)) if s else None,
        "round_trips_per_s": round(rt, 1),
        "msgs_per_s": round(2 * rt, 1),
    }
    return figures, rt


def latencyRun(target, o, pairs, run, targetB=None, probe=False):
    """
    C{pairs} ping-pong pairs, one message in flight each; A on C{target},
    B on C{targetB} (default the same relay).
    """
    tok = wire.token(target.secret)
    targetB = targetB or target
    conns = _connectPairs(
        (target.host, target.port),
        (targetB.host, targetB.port),
        tok,
        _prefix("lat", run),
        pairs,
        tls=getattr(target, "tls", False),
    )
    routeS = None
    if probe:
        try:
            for a, b in conns:
                t1 = probeRoute(a, b, timeout=o.crosspod_timeout)
                t2 = probeRoute(b, a, timeout=o.crosspod_timeout) if t1 is not None else None
                if t1 is None or t2 is None:
                    raise Skip(
                        "no transport message crossed between the pods within "
                        f"{o.crosspod_timeout:g} s (both relays accepted the cluster options; "
                        "the fabric does not forward yet?)"
                    )
                routeS = max(routeS or 0, t1, t2)
        except BaseException:
            for a, b in conns:
                a.close()
                b.close()
            raise
    loop = EchoLoop(conns, o.size)
    c0, w0 = _relayCpu(target), time.monotonic()
    start = time.monotonic()
    try:
        r = loop.run(start + o.warmup, start + o.warmup + o.duration)
    finally:
        loop.close()
    c1, w1 = _relayCpu(target), time.monotonic()
    s = r.pop("samples_ns")
    figures, _ = _latencyFigures(s, o.duration)
    res = {
        "pairs": pairs,
        "size": o.size,
        **figures,
        "relay_cpu": round((c1 - c0) / (w1 - w0), 3) if c0 is not None else None,
        "loadgen_cpu": round(r.pop("loadgen_cpu_s") / (w1 - w0), 3),
        "lost": r["sent"] - r["echoed"],
    }
    if routeS is not None:
        res["route_setup_s"] = round(routeS, 3)
    res.update(r)
    res["ok"] = (
        res["lost"] == 0
        and r["id_errors"] == 0
        and r["payload_errors"] == 0
        and r["closed_conns"] == 0
        and r["late"] == 0
        and r["unexpected_msgs"] == 0
        and bool(s)
    )
    return res


# ---------------------------------------------------------------------------
# Handshakes and idle memory


def handshakeRun(target, o, run):
    tok = wire.token(target.secret)
    names = [f"{_prefix('hs', run)}{i}" for i in range(o.connections)]
    hs = HandshakeRun(target.host, target.port, names, tok, concurrency=o.concurrency)
    lo0 = listenOverflows()
    c0, w0 = _relayCpu(target), time.monotonic()
    cpu0 = sum(os.times()[:2])
    hs.run()
    cpu1 = sum(os.times()[:2])
    c1, w1 = _relayCpu(target), time.monotonic()
    lo1 = listenOverflows()
    ok = len(hs.socks)
    lat = sorted(hs.latencies)
    ms = lambda v: None if v is None else round(v * 1000, 2)  # noqa: E731
    res = {
        "connections": o.connections,
        "concurrency": o.concurrency,
        "ok_conns": ok,
        "failed": o.connections - ok,
        "elapsed_s": round(hs.elapsed, 3),
        "handshakes_per_s": round(ok / hs.elapsed, 1),
        "handshake_p50_ms": ms(wire.percentile(lat, 0.5)),
        "handshake_p90_ms": ms(wire.percentile(lat, 0.9)),
        "handshake_p99_ms": ms(wire.percentile(lat, 0.99)),
        "handshake_max_ms": ms(lat[-1] if lat else None),
        # a SYN the listen queue dropped is retried after 1 s: these are those
        "over_1s": sum(1 for v in lat if v >= 0.95),
        # system-wide, so other programs' drops count too; normally 0
        "listen_overflows": lo1 - lo0 if lo0 is not None and lo1 is not None else None,
        "relay_cpu": round((c1 - c0) / (w1 - w0), 3) if c0 is not None else None,
        "loadgen_cpu": round((cpu1 - cpu0) / (w1 - w0), 3),
    }
    res["handshakes_per_relay_cpu_s"] = (
        round(ok / (c1 - c0), 1) if c0 is not None and c1 > c0 else None
    )
    if hs.errors:
        res["errors"] = hs.errors
    hs.closeAll()
    time.sleep(o.settle)  # the relay handles the disconnects before the next run
    res["ok"] = res["failed"] == 0
    return res


def idleRun(target, o, run):
    if target.pid is None:
        raise Skip("needs the relay's pid (--pid) to read its RSS")
    tok = wire.token(target.secret)
    time.sleep(1.0)
    before = rssKiB(target.pid)
    names = [f"{_prefix('idle', run)}{i}" for i in range(o.idle_peers)]
    hs = HandshakeRun(target.host, target.port, names, tok, concurrency=o.concurrency)
    hs.run()
    ok = len(hs.socks)
    time.sleep(o.idle_settle)
    after = rssKiB(target.pid)
    # the peers are still connected and authenticated: check one answers
    hs.closeAll()
    res = {
        "peers": o.idle_peers,
        "ok_conns": ok,
        "rss_before_kib": before,
        "rss_after_kib": after,
        "kib_per_peer": round((after - before) / ok, 2) if ok else None,
        "ok": ok == o.idle_peers,
    }
    if hs.errors:
        res["errors"] = hs.errors
    time.sleep(o.settle)
    return res


# ---------------------------------------------------------------------------
# Cross-pod


def clusterRelays(o, logDir):
    """
    Two relays on 127.0.0.2 and 127.0.0.3 joined by the inter-pod fabric.

    @raise Skip: loopback aliases unusable, or the relay rejects the options.
    """
    hosts = ("127.0.0.2", "127.0.0.3")
    try:
        ports = [freePort(h) for h in hosts]
    except OSError as e:
        raise Skip(f"cannot bind the loopback aliases 127.0.0.2/127.0.0.3: {e}") from None
    clusterPort = commonPort(hosts)
    relays = []
    for h, p in zip(hosts, ports):
        extra = (
            [
                "--cluster-headless",
                ",".join(hosts),
                "--pod-ip",
                h,
                "--cluster-port",
                str(clusterPort),
                "--cluster-listen-address",
                f"{h}:{clusterPort}",
                "--cluster-auth-secret",
                o.cluster_secret,
            ]
            + list(o.crosspod_relay_arg or [])
            + list(o.relay_arg or [])
        )
        r = RelayProcess(
            o.secret, host=h, port=p, extra=extra, logDir=logDir, name=f"pod-{h}", root=o.relay_root
        )
        try:
            r.start()
        except RuntimeError as e:
            for x in relays:
                x.stop()
            raise Skip(
                "the relay rejects the cluster options or cannot start in cluster mode: "
                f"{_reason(str(e))} (log: {r.logPath})"
            ) from None
        relays.append(r)
    return relays


def _reason(output):
    """
    The line of a relay's start-up output that says why it stopped.
    """
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for line in reversed(lines):
        low = line.lower()
        if any(
            w in low
            for w in ("not recognized", "error", "must", "required", "cannot", "invalid", "unknown")
        ):
            return line
    return lines[-1] if lines else "no output"


def crosspodRun(pods, o, run):
    """
    Round trip with A and B on the same pod, then with B on the other pod.
    """
    same = latencyRun(pods[0], o, 1, run)
    cross = latencyRun(pods[0], o, 1, run, targetB=pods[1], probe=True)
    res = {
        "same_p50_us": same["p50_us"],
        "same_p99_us": same["p99_us"],
        "cross_p50_us": cross["p50_us"],
        "cross_p99_us": cross["p99_us"],
        "added_p50_us": round(cross["p50_us"] - same["p50_us"], 1)
        if cross["p50_us"] is not None
        else None,
        "added_p99_us": round(cross["p99_us"] - same["p99_us"], 1)
        if cross["p99_us"] is not None
        else None,
        "cross_route_setup_s": cross.get("route_setup_s"),
        "cross_lost": cross["lost"],
        "same_lost": same["lost"],
        "ok": same["ok"] and cross["ok"],
    }
    return res


# ---------------------------------------------------------------------------
# QUIC beside TLS WebSocket (tests.bench.quicload: Twisted clients, one
# process per role)


def _spawnRoles(specs, timeout=60.0):
    """
    One tests.bench.quicload process per spec (spawn: each gets a fresh
    reactor).
    """
    from tests.bench.quicload import worker

    return _spawnWorkers(worker, specs, "spawn", timeout, f"{specs[0]['transport']} load process")


def _collectRoles(workers, timeout):
    results, errors = _receiveReports([conn for _, conn, _ in workers], timeout)
    if errors:
        raise BenchError("; ".join(errors))
    return results


def _roleCpu(results, i, j, key="cpu"):
    return sum(r["snapshots"][j][key] - r["snapshots"][i][key] for r in results)


def _relayRunq(target):
    return None if target.pid is None else runQueueSeconds(target.pid)


def _waitFraction(a, b, dt):
    return round((b - a) / dt, 3) if a is not None and b is not None else None


def quicThroughputRun(target, o, transport, pairs, run, cafile):
    """
    C{pairs} pipelined pairs over C{transport} ("quic" or "wss"), payload
    C{o.quic_size}: receivers in C{o.quic_procs} processes, their senders in
    as many others.  Loss is reported, not failed, for QUIC (the relay drops
    to a slow QUIC receiver by design; datagrams are not retransmitted).
    """
    procs = max(1, o.quic_procs)
    parts = _split(list(range(pairs)), procs)
    common = {
        "host": target.host,
        "port": target.port,
        "secret": target.secret,
        "cafile": cafile,
        "transport": transport,
        "prefix": _prefix(f"{transport}t", run),
        "size": o.quic_size,
        "window": o.quic_window,
        "batch": o.quic_batch,
        "stall": o.quic_stall,
    }
    recv = _spawnRoles([dict(common, role="recv", pairs=part) for part in parts])
    workers = list(recv)
    try:
        send = _spawnRoles([dict(common, role="send", pairs=part) for part in parts])
        workers += send
        acks = {}
        for _, _, info in send:
            acks.update(info)
        start = time.monotonic() + 0.2
        m0 = start + o.warmup
        m1 = m0 + o.duration
        sched = {"start": start, "marks": [m0, m1], "stopAt": m1, "drain": 5.0, "ack": acks}
        u0 = udpCounters()
        for _, conn, _ in workers:
            conn.send(("go", sched))
        _sleepUntil(m0)
        c0, q0, t0 = _relayCpu(target), _relayRunq(target), time.monotonic()
        _sleepUntil(m1)
        c1, q1, t1 = _relayCpu(target), _relayRunq(target), time.monotonic()
        rres = _collectRoles(recv, o.duration + o.warmup + 30)
        sres = _collectRoles(send, 10)
        u1 = udpCounters()
    finally:
        _stopWorkers(workers)
    dt = t1 - t0
    got = {}
    for r in rres:
        got.update(r["flows"])
    sentBy = {}
    for r in sres:
        sentBy.update(r["flows"])
    tot = {
        "sent": 0,
        "received": 0,
        "seq_gaps": 0,
        "gap_msgs": 0,
        "reordered": 0,
        "id_errors": 0,
        "payload_errors": 0,
        "window_stalls": 0,
    }
    for i, s in sentBy.items():
        g = got.get(i, {})
        tot["sent"] += s["sent"]
        tot["window_stalls"] += s["window_stalls"]
        for k in ("received", "seq_gaps", "gap_msgs", "reordered", "id_errors", "payload_errors"):
            tot[k] += g.get(k, 0)
    delivered = sum(r["snapshots"][1]["msgs"] - r["snapshots"][0]["msgs"] for r in rres)
    offered = sum(r["snapshots"][1]["sent"] - r["snapshots"][0]["sent"] for r in sres)
    rate = delivered / dt
    relayCpu = round((c1 - c0) / dt, 3) if c0 is not None else None
    res = {
        "transport": transport,
        "pairs": pairs,
        "size": o.quic_size,
        "window": o.quic_window,
        "procs": 2 * len(parts),
        "msgs_per_s": round(rate, 1),
        "offered_msgs_per_s": round(offered / dt, 1),
        "gbit_per_s": round(rate * o.quic_size * 8 / 1e9, 4),
        "relay_cpu": relayCpu,
        "msgs_per_relay_cpu_s": round(rate / relayCpu, 1) if relayCpu else None,
        "relay_us_per_msg": round(1e6 * relayCpu / rate, 1) if relayCpu and rate else None,
        "client_cpu": round((_roleCpu(rres, 0, 1) + _roleCpu(sres, 0, 1)) / dt, 3),
        "receiver_cpu": round(_roleCpu(rres, 0, 1) / dt, 3),
        "sender_cpu": round(_roleCpu(sres, 0, 1) / dt, 3),
        # share of the wall time spent runnable but waiting for a CPU: well
        # above 0, the machine (2 shared cores), not the relay, set the pace
        "relay_runq_wait": _waitFraction(q0, q1, dt),
        "client_runq_wait": round(_roleCpu(rres + sres, 0, 1, "runq") / dt, 3),
        "lost": tot["sent"] - tot["received"],
        "delivered_ratio": round(tot["received"] / tot["sent"], 5) if tot["sent"] else None,
        "unexpected_msgs": sum(r.get("unexpected_msgs", 0) for r in sres),
        "closed_conns": sum(r["n_closed"] for r in rres + sres),
    }
    if u0 and u1:
        # system-wide, whole run: UDP datagrams the kernel dropped for a full
        # socket buffer (a receiver or the relay behind); the rest of the
        # QUIC loss is the relay's slow-consumer drop
        res["udp_rcvbuf_errors"] = u1.get("RcvbufErrors", 0) - u0.get("RcvbufErrors", 0)
        res["udp_sndbuf_errors"] = u1.get("SndbufErrors", 0) - u0.get("SndbufErrors", 0)
    res.update(tot)
    closedWhy = sorted({w for r in rres + sres for w in r["closed_conns"]})
    if closedWhy:
        res["closed_why"] = closedWhy
    intact = (
        tot["id_errors"] == 0
        and tot["payload_errors"] == 0
        and res["closed_conns"] == 0
        and res["unexpected_msgs"] == 0
        and tot["received"] > 0
    )
    if transport == "quic":
        res["ok"] = intact
    else:
        res["ok"] = intact and res["lost"] == 0 and tot["gap_msgs"] == 0 and tot["reordered"] == 0
    return res


def quicLatencyRun(target, o, transport, pairs, run, cafile):
    """
    C{pairs} ping-pong pairs over C{transport}, both ends in one load
    process (one message in flight per pair).
    """
    spec = {
        "host": target.host,
        "port": target.port,
        "secret": target.secret,
        "cafile": cafile,
        "transport": transport,
        "prefix": _prefix(f"{transport}l", run),
        "size": o.quic_size,
        "role": "echo",
        "pairs": list(range(pairs)),
    }
    workers = _spawnRoles([spec])
    try:
        start = time.monotonic() + 0.2
        m0 = start + o.warmup
        m1 = m0 + o.duration
        for _, conn, _ in workers:
            conn.send(("go", {"start": start, "marks": [m0, m1]}))
        _sleepUntil(m0)
        c0, q0, t0 = _relayCpu(target), _relayRunq(target), time.monotonic()
        _sleepUntil(m1)
        c1, q1, t1 = _relayCpu(target), _relayRunq(target), time.monotonic()
        [r] = _collectRoles(workers, o.duration + o.warmup + 30)
    finally:
        _stopWorkers(workers)
    s = r.pop("samples_ns")
    figures, rt = _latencyFigures(s, o.duration)
    relayCpu = round((c1 - c0) / (t1 - t0), 3) if c0 is not None else None
    res = {
        "transport": transport,
        "pairs": pairs,
        "size": o.quic_size,
        **figures,
        "relay_cpu": relayCpu,
        "relay_us_per_msg": round(1e6 * relayCpu / (2 * rt), 1) if relayCpu and rt else None,
        "client_cpu": round(_roleCpu([r], 0, 1) / (t1 - t0), 3),
        "relay_runq_wait": _waitFraction(q0, q1, t1 - t0),
        "client_runq_wait": round(_roleCpu([r], 0, 1, "runq") / (t1 - t0), 3),
        "lost": r["sent"] - r["echoed"],
    }
    r.pop("snapshots")
    res.update(r)
    res["ok"] = (
        r["id_errors"] == 0
        and r["payload_errors"] == 0
        and r["closed_conns"] == 0
        and bool(s)
        and (transport == "quic" or (res["lost"] == 0 and r["late"] == 0))
    )
    return res


# ---------------------------------------------------------------------------
# QUIC beside TLS WebSocket with the Go load (tests/goquic, -scenario load:
# quic-go and nhooyr websocket, the stacks of the Go agents), so that the
# relay, not the load, sets the pace.

GOPATH = "/usr/share/gocode"
GOQUIC_SOURCE = os.path.join(ROOT, "tests", "goquic")


def buildGoLoad(root=ROOT):
    """
    Build tests/goquic into build/goquic (ignored by git) from Debian's Go
    packages alone (GOPATH mode, nothing downloaded).

    @return: the binary's path.
    @raise Skip: no Go toolchain, or the build failed.
    """
    go = shutil.which("go")
    if go is None:
        raise Skip(
            "the Go load needs go and quic-go (apt-get install golang-go "
            "golang-github-lucas-clemente-quic-go-dev golang-nhooyr-websocket-dev), or "
            "--quic-load python"
        )
    binary = os.path.join(root, "build", "goquic", "goquic")
    env = dict(
        os.environ,
        GO111MODULE="off",
        GOPROXY="off",
        GOFLAGS="",
        GOPATH=GOPATH,
        GOCACHE=os.environ.get("GOCACHE") or os.path.join(root, "build", "go-cache"),
    )
    built = subprocess.run(
        [go, "build", "-o", binary, "."],
        cwd=os.path.join(root, "tests", "goquic"),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if built.returncode != 0:
        raise Skip(
            f"go build of tests/goquic failed: {(built.stdout + built.stderr).strip()[-2000:]}"
        )
    return binary


def _readJSONLine(proc, want, deadline):
    """
    The next line of C{proc}'s stdout holding key C{want}.
    """
    while True:
        if time.monotonic() > deadline:
            raise BenchError(f"Go load: no {want!r} line in time")
        line = proc.stdout.readline()
        if not line:
            raise BenchError(
                f"Go load ended before {want!r} (status {proc.wait()}): "
                f"{proc.stderr.read()[-2000:]}"
            )
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if want in obj:
            return obj


def _goLoad(binary, scenario, target, cafile):
    """
    The Go load's command line for C{scenario} against C{target}.
    """
    return [
        binary,
        "-scenario",
        scenario,
        "-addr",
        f"{target.host}:{target.port}",
        "-ca",
        cafile,
        "-secret",
        target.secret,
    ]


def quicIdleRun(target, o, peers, run, cafile, binary):
    """
    The relay's RSS per idle QUIC peer: two batches of C{peers} quic-go
    connections (the Go load's C{hold} scenario, the agents' 4 min idle
    timeout and 30 s keepalive) held at once, the figure the second
    batch's growth. The first batch's is lower and less steady: it reuses
    what the relay freed since it started.
    """
    if target.pid is None:
        raise Skip("needs the relay's pid to read its RSS")
    procs = []
    marks = []
    try:
        for batch in range(2):
            if batch == 0:
                time.sleep(o.idle_settle)
                marks.append(rssKiB(target.pid))
            proc = subprocess.Popen(
                _goLoad(binary, "hold", target, cafile)
                + ["-n", str(peers), "-tag", _prefix(f"goidle{batch}", run)],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            procs.append(proc)
            ready = _readJSONLine(proc, "ready", time.monotonic() + 60 + peers / 20)
            if ready.get("ready") != peers:
                raise BenchError(f"{ready.get('ready')} of {peers} idle QUIC peers connected")
            time.sleep(o.idle_settle)
            marks.append(rssKiB(target.pid))
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
            proc.stdout.close()
    first, second = marks[1] - marks[0], marks[2] - marks[1]
    return {
        "peers": peers,
        "rss_before_kib": marks[0],
        "rss_after_kib": marks[2],
        "first_batch_kib_per_peer": round(first / peers, 2),
        "kib_per_peer": round(second / peers, 2),
        "ok": True,
    }


def quicGoRun(target, o, transport, pairs, window, run, cafile, binary):
    """
    C{pairs} echo pairs of the Go load over C{transport} ("quic", "wss", or
    "ws" against a relay without a certificate),
    C{window} messages in flight per pair (1: ping-pong, for round trips).
    The relay's CPU time is read when the load marks the measured interval.
    """
    cmd = _goLoad(binary, "load", target, cafile) + [
        "-transport",
        transport,
        "-pairs",
        str(pairs),
        "-window",
        str(window),
        "-size",
        str(o.quic_size),
        "-warmup",
        f"{o.warmup}s",
        "-duration",
        f"{o.duration}s",
        "-stall",
        f"{o.quic_stall}s",
        "-tag",
        _prefix(f"go{transport}{window}", run),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60 + o.warmup + o.duration
        ready = _readJSONLine(proc, "ready", deadline)
        if "summary" in ready:
            raise BenchError(f"Go load could not connect: {ready.get('failures')}")
        _readJSONLine(proc, "mark", deadline)
        c0, q0, t0 = _relayCpu(target), _relayRunq(target), time.monotonic()
        l0 = cpuSeconds(proc.pid, tree=False)
        _readJSONLine(proc, "mark", deadline)
        c1, q1, t1 = _relayCpu(target), _relayRunq(target), time.monotonic()
        l1 = cpuSeconds(proc.pid, tree=False)
        summary = _readJSONLine(proc, "summary", deadline + 30)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    dt = t1 - t0
    rate = summary["msgs_per_s"]
    relayCpu = round((c1 - c0) / dt, 3) if c0 is not None else None
    res = {
        "transport": transport,
        "pairs": pairs,
        "window": window,
        "size": o.quic_size,
        "load": "go",
        "msgs_per_s": round(rate, 1),
        "offered_msgs_per_s": round(summary["offered_msgs_per_s"], 1),
        "gbit_per_s": round(rate * o.quic_size * 8 / 1e9, 4),
        "relay_cpu": relayCpu,
        "relay_us_per_msg": round(1e6 * relayCpu / rate, 2) if relayCpu and rate else None,
        "msgs_per_relay_cpu_s": round(rate / relayCpu, 1) if relayCpu else None,
        "client_cpu": round((l1 - l0) / dt, 3),
        "relay_runq_wait": _waitFraction(q0, q1, dt),
        "p50_us": round(summary["rtt_p50_us"], 1),
        "p90_us": round(summary["rtt_p90_us"], 1),
        "p99_us": round(summary["rtt_p99_us"], 1),
        "max_us": round(summary["rtt_max_us"], 1),
        "sent": summary["sent"],
        "echoed": summary["echoed"],
        "lost": summary["lost"],
        "late": summary["late"],
        "delivered_ratio": round(summary["echoed"] / summary["sent"], 5)
        if summary["sent"]
        else None,
        "failures": summary["failures"],
    }
    res["ok"] = (
        not summary["failures"]
        and summary["echoed"] > 0
        and (transport == "quic" or res["lost"] == 0)
    )
    return res
