"""
python -m tests.bench [CASE ...] [options]

Starts the relay under test as a separate process (or measures one already
running: --url, --secret, --pid) and drives it from raw sockets with
pre-built frames.  Cases: throughput, latency, handshakes, idle, stall,
crosspod (default: all); quic (not in all: QUIC beside TLS WebSocket on a
relay started here with a throwaway certificate, Twisted clients in load
processes of their own).  Every case runs --runs times; the summary shows
medians, --json FILE keeps every run.
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.parse

from tests.bench import cases as C
from tests.bench import wire
from tests.bench.peers import BenchError
from tests.bench.relayproc import (
    ROOT,
    ExternalRelay,
    RelayProcess,
    raiseFileLimit,
    writeCertificate,
)

ALL = ("throughput", "latency", "handshakes", "idle", "stall", "crosspod")
EXTRA = ("compare", "quic")  # not part of "all"
DEFAULT_COMPARE = os.path.join(os.path.dirname(ROOT), "shared", "bench", "compare.py")

# the figures the summary prints per case, first one is the headline
FIGURES = {
    "throughput": ("msgs_per_s", "gbit_per_s", "relay_cpu", "msgs_per_relay_cpu_s", "loadgen_cpu"),
    "latency": ("p50_us", "p90_us", "p99_us", "p999_us", "msgs_per_s", "relay_cpu"),
    "handshakes": (
        "handshakes_per_s",
        "handshake_p99_ms",
        "over_1s",
        "relay_cpu",
        "handshakes_per_relay_cpu_s",
        "loadgen_cpu",
    ),
    "idle": ("kib_per_peer",),
    "stall": (
        "rate_ratio",
        "rss_growth_mib",
        "baseline_msgs_per_s",
        "stalled_msgs_per_s",
        "flood_offered_msgs_per_s",
        "relay_cpu_stalled",
    ),
    "crosspod": ("added_p50_us", "added_p99_us", "same_p50_us", "cross_p50_us"),
    # quic case: "<transport>-tput-..." and "<transport>-lat-..."
    "tput": (
        "msgs_per_s",
        "delivered_ratio",
        "relay_cpu",
        "msgs_per_relay_cpu_s",
        "relay_us_per_msg",
        "client_cpu",
        "relay_runq_wait",
    ),
    "lat": ("p50_us", "p90_us", "p99_us", "msgs_per_s", "relay_cpu", "relay_us_per_msg", "lost"),
}


def _ints(value):
    return [int(v) for v in value.split(",") if v.strip()]


def parseArgs(argv):
    ap = argparse.ArgumentParser(
        prog="python -m tests.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "cases",
        nargs="*",
        help=f"any of {', '.join(ALL)}, or all (default); or compare "
        "(runs the Go side-by-side compare.py against a relay started here); or quic (QUIC "
        "beside TLS WebSocket, --quic-* options)",
    )
    ap.add_argument(
        "--case",
        action="append",
        default=[],
        help="same as a positional case (repeatable, or comma-separated)",
    )
    ap.add_argument(
        "--runs", type=int, default=3, help="runs per case; the summary shows medians (default 3)"
    )
    ap.add_argument("--json", metavar="FILE", help="write every run and the medians to FILE")
    ap.add_argument(
        "--url",
        help=(
            "measure a running relay (ws://127.0.0.1:PORT/relay or rel://127.0.0.1:PORT) instead "
            "of starting one"
        ),
    )
    ap.add_argument(
        "--secret",
        default=None,
        help="its --auth-secret (default: a random one for the relay started here)",
    )
    ap.add_argument(
        "--pid", type=int, help="its pid (relay CPU and RSS figures; the idle case needs it)"
    )
    ap.add_argument(
        "--relay-arg",
        action="append",
        default=[],
        metavar="ARG",
        help=(
            "extra argument for the relays started here (repeatable), e.g. "
            "--relay-arg=--log-level=warn"
        ),
    )
    ap.add_argument(
        "--relay-root",
        metavar="DIR",
        help="run the relay from this checkout (e.g. a git worktree of another commit)",
    )
    ap.add_argument(
        "--duration",
        type=float,
        default=5.0,
        help="seconds measured per throughput/latency run (default 5)",
    )
    ap.add_argument(
        "--warmup", type=float, default=1.0, help="seconds of traffic before measuring (default 1)"
    )
    ap.add_argument(
        "--size",
        type=int,
        default=1400,
        help="transport payload bytes after the 38-byte header (default 1400)",
    )
    ap.add_argument(
        "--pairs",
        type=_ints,
        default=[10, 50],
        help="throughput: comma-separated pair counts (default 10,50)",
    )
    ap.add_argument(
        "--window",
        type=int,
        default=64,
        help="throughput: messages in flight per pair (default 64)",
    )
    ap.add_argument(
        "--batch",
        type=int,
        default=16,
        help="throughput: a sender writes when this much window is free (default 16)",
    )
    ap.add_argument(
        "--procs",
        type=int,
        default=0,
        help="load processes for the pipelined cases (default: 1 up to 10 pairs, else 2)",
    )
    ap.add_argument(
        "--latency-pairs",
        type=_ints,
        default=[1, 50],
        help="latency: comma-separated pair counts (default 1,50)",
    )
    ap.add_argument(
        "--tls",
        choices=("no", "yes", "both"),
        default="no",
        help="throughput and latency: over TLS WebSocket (a relay started here with a throwaway "
        "certificate; cases named ...-tls), or both plain and TLS, each on a relay of its own, "
        "taking turns run by run, with the TLS / plain ratios of each run and their medians "
        "(...-tls-ratio) (default no)",
    )
    ap.add_argument(
        "--connections", type=int, default=2000, help="handshakes: connections (default 2000)"
    )
    ap.add_argument(
        "--concurrency",
        type=int,
        default=64,
        help="handshakes and idle: connections opened at once (default 64)",
    )
    ap.add_argument(
        "--idle-peers", type=int, default=2000, help="idle: authenticated peers held (default 2000)"
    )
    ap.add_argument(
        "--idle-settle",
        type=float,
        default=3.0,
        help="idle: seconds between the last handshake and reading RSS",
    )
    ap.add_argument(
        "--settle", type=float, default=1.0, help="seconds of rest after closing many connections"
    )
    ap.add_argument(
        "--stall-pairs",
        type=int,
        default=9,
        help="stall: measured pairs besides the stalled one (default 9)",
    )
    ap.add_argument(
        "--stall-senders",
        type=int,
        default=10,
        help="stall: senders flooding the receiver that stops reading, at full speed (default 10)",
    )
    ap.add_argument(
        "--stall-duration", type=float, default=30.0, help="stall: seconds of flooding (default 30)"
    )
    ap.add_argument(
        "--stall-baseline",
        type=float,
        default=5.0,
        help="stall: seconds measured before the flood (default 5)",
    )
    ap.add_argument(
        "--crosspod-timeout",
        type=float,
        default=30.0,
        help="crosspod: seconds to wait for the first message to cross",
    )
    ap.add_argument("--cluster-secret", default="bench-cluster-secret")
    ap.add_argument(
        "--crosspod-relay-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for the two cluster relays only",
    )
    ap.add_argument(
        "--compare-script",
        default=DEFAULT_COMPARE,
        help=f"compare: path of compare.py (default {DEFAULT_COMPARE})",
    )
    ap.add_argument(
        "--compare-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="compare: extra argument for compare.py (repeatable), e.g. --compare-arg=--reps=5",
    )
    ap.add_argument(
        "--quic-pairs",
        type=_ints,
        default=[1, 10],
        help="quic: throughput pair counts (default 1,10)",
    )
    ap.add_argument(
        "--quic-latency-pairs",
        type=_ints,
        default=[1],
        help="quic: latency pair counts (default 1)",
    )
    ap.add_argument(
        "--quic-size",
        type=int,
        default=None,
        help=(
            "quic: payload bytes after the 38-byte header (default 1179 with the Go load, "
            "the most quic-go 0.29 takes in a datagram; 1300 with the python load)"
        ),
    )
    ap.add_argument(
        "--quic-window", type=int, default=64, help="quic: messages in flight per pair (default 64)"
    )
    ap.add_argument(
        "--quic-idle-peers",
        type=int,
        default=400,
        help=(
            "quic: idle quic-go peers per batch for the relay's RSS per idle QUIC peer, measured "
            "over a second batch held beside a first (default 400; 0: not measured)"
        ),
    )
    ap.add_argument(
        "--quic-batch",
        type=int,
        default=16,
        help="quic: a sender writes when this much window is free (default 16)",
    )
    ap.add_argument(
        "--quic-stall",
        type=float,
        default=0.5,
        help=(
            "quic: seconds without an acknowledgement before a sender writes its window off as "
            "lost (default 0.5)"
        ),
    )
    ap.add_argument(
        "--quic-procs",
        type=int,
        default=1,
        help="quic: receiver processes, and as many sender processes (default 1)",
    )
    ap.add_argument(
        "--quic-load",
        choices=("go", "python"),
        default="go",
        help=(
            "quic: the load generator: go (tests/goquic on quic-go and nhooyr websocket, "
            "built here; the relay sets the pace) or python (aioquic and Autobahn clients) "
            "(default go)"
        ),
    )
    ap.add_argument(
        "--quic-transports",
        default="quic,wss",
        help=(
            "quic: transports measured side by side, in this order every run: quic, wss (TLS "
            "WebSocket, same relay) and/or ws (plain WebSocket, on a second relay without a "
            "certificate; Go load only); with ws and wss, the TLS / plain ratios of each run "
            "and their medians (wss-...-tls-ratio) (default quic,wss)"
        ),
    )
    ap.add_argument("--keep-logs", action="store_true", help="keep the relay logs (printed path)")
    o = ap.parse_args(argv)
    chosen = []
    for c in o.cases + o.case:
        chosen.extend(x.strip() for x in c.split(",") if x.strip())
    if not chosen or "all" in chosen:
        chosen = list(ALL)
    for c in chosen:
        if c not in ALL + EXTRA:
            ap.error(f"unknown case {c!r}; choose from {', '.join(ALL + EXTRA)}")
    o.chosen = list(dict.fromkeys(chosen))
    if o.url:
        u = urllib.parse.urlparse(o.url if "://" in o.url else "ws://" + o.url)
        host = u.hostname or ""
        if not (host.startswith("127.") or host == "localhost"):
            ap.error("--url: only loopback relays may be measured")
        if o.tls != "no":
            ap.error("--tls: needs a relay started here (with a throwaway certificate), not --url")
        if u.scheme not in ("ws", "rel", ""):
            ap.error("--url: ws:// or rel:// (TLS is not supported by the load generator)")
        if not o.secret:
            ap.error("--url needs --secret")
        o.host = "127.0.0.1" if host == "localhost" else host
        o.port = u.port or 80
    if not o.secret:
        o.secret = "bench-" + os.urandom(12).hex()
    if not 8 <= o.size <= wire.MAX_SIZE:
        ap.error(f"--size must be 8..{wire.MAX_SIZE}")
    if o.runs < 1:
        ap.error("--runs must be at least 1")
    if any(n < 1 for n in o.quic_pairs + o.quic_latency_pairs):
        ap.error(
            "--quic-pairs and --quic-latency-pairs: counts of at least 1 (an empty list measures "
            "none)"
        )
    if o.quic_size is None:
        o.quic_size = 1179 if o.quic_load == "go" else 1300
    if o.quic_load == "go" and not 16 <= o.quic_size <= 1179:
        ap.error(
            "--quic-size must be 16..1179 with the Go load (quic-go 0.29 takes DATAGRAM frames "
            "of at most 1220 bytes)"
        )
    if not 8 <= o.quic_size <= 1400:
        ap.error(
            "--quic-size must be 8..1400 (one relay message per QUIC packet of at most 1452 bytes)"
        )
    if o.quic_window < 1 or not 1 <= o.quic_batch <= o.quic_window:
        ap.error("--quic-window must be at least 1 and --quic-batch 1..window")
    transports = [t.strip() for t in o.quic_transports.split(",") if t.strip()]
    if not transports or any(t not in ("quic", "wss", "ws") for t in transports):
        ap.error("--quic-transports: quic, wss and/or ws")
    if "ws" in transports and o.quic_load != "go":
        ap.error("--quic-transports: ws needs --quic-load go")
    return o


def _median(runs, key):
    vals = [
        r.get(key)
        for r in runs
        if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)
    ]
    return wire.median(vals)


def _medians(runs):
    keys = []
    for r in runs:
        for k, v in r.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in keys:
                keys.append(k)
    return {k: _median(runs, k) for k in keys}


def _ratios(plain, tls):
    """
    The TLS / plain ratio of each figure, run by run (the runs that took
    turns), and the median of each.
    """
    byRun = {r["run"]: r for r in plain["runs"] if "error" not in r}
    runs = []
    for t in tls["runs"]:
        p = byRun.get(t["run"])
        if p is None or "error" in t:
            continue
        ratio = {"run": t["run"], "ok": bool(p.get("ok") and t.get("ok"))}
        for k, v in t.items():
            base = p.get(k)
            if (
                k != "run"
                and isinstance(v, (int, float))
                and not isinstance(v, bool)
                and isinstance(base, (int, float))
                and base
            ):
                ratio[k] = round(v / base, 3)
        runs.append(ratio)
    return {
        "params": {"of": "tls / plain, run by run"},
        "runs": runs,
        "median": _medians(runs),
        "ok": bool(runs) and all(r["ok"] for r in runs),
    }


def _quicTLSRatios(entries):
    """
    The quic case's TLS / plain WebSocket ratios: for each C{wss-...} series
    with a C{ws-...} twin (the same pairs and window, the runs taking turns
    on their two relays), L{_ratios} of the two, as C{wss-...-tls-ratio}.
    """
    return {
        name + "-tls-ratio": _ratios(entries["ws-" + name[4:]], entries[name])
        for name in entries
        if name.startswith("wss-") and "ws-" + name[4:] in entries
    }


def _gitHead():
    try:
        return subprocess.run(
            ["git", "log", "-1", "--format=%h %cI %s"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


class Bench:
    def __init__(self, o):
        self.o = o
        self.logDir = tempfile.mkdtemp(prefix="relay-bench-")
        self.results = {}
        self.problems = []

    def log(self, msg):
        print(msg, file=sys.stderr, flush=True)

    def relay(self, tls=False):
        """
        The relay under test; with C{tls}, one started with a throwaway
        certificate, its C{tls} attribute telling the loads to connect over
        TLS.
        """
        o = self.o
        if o.url:
            return ExternalRelay(o.host, o.port, o.secret, o.pid)
        if not tls:
            return RelayProcess(
                o.secret, extra=o.relay_arg, logDir=self.logDir, root=o.relay_root
            ).start()
        cert, key = writeCertificate(os.path.join(self.logDir, "tls-cert"))
        extra = list(o.relay_arg) + ["--tls-cert-file", cert, "--tls-key-file", key]
        target = RelayProcess(
            o.secret, extra=extra, logDir=self.logDir, name="relay-tls", root=o.relay_root
        ).start()
        target.tls = True
        return target

    def done(self, target):
        """
        Stop a relay started here; note a crash or a bad exit.
        """
        if not target.running():
            self.problems.append(
                f"relay (pid {target.pid}) died during the case:\n{target.logTail()}"
            )
            return
        if isinstance(target, RelayProcess):
            status = target.stop()
            if status not in (0, None):
                self.problems.append(
                    f"relay (pid {target.pid}) exited with status {status} on SIGTERM:\n"
                    f"{target.logTail()}"
                )

    def series(self, name, params, runOnce, freshRelay=False, tls=False):
        """
        Run C{runOnce(target, run)} --runs times and record medians.
        """
        return self.interleaved([(name, params, runOnce, tls)], freshRelay)[0]

    def recorded(self, name, target, run, r, entry):
        """
        Record C{r}, the figures of run C{run} of case C{name}, in C{entry}
        and the log.

        @return: whether C{target}, the relay measured, is still running (if
            not, the problem is recorded with the tail of its log).
        """
        r["run"] = run
        entry["runs"].append(r)
        self.log(
            "    " + json.dumps({k: v for k, v in r.items() if not isinstance(v, (list, dict))})
        )
        if target.running():
            return True
        self.problems.append(
            f"{name}: relay (pid {target.pid}) died in run {run + 1}:\n{target.logTail()}"
        )
        return False

    def interleaved(self, variants, freshRelay=False):
        """
        Run each of C{variants}, C{(name, params, runOnce, tls)}, --runs
        times and record medians: run 1 of each, then run 2 of each, and so
        on, each variant on a relay of its own. On a shared machine, load
        that comes and goes then weighs on all the variants alike, and their
        ratios hold better than between series run one after the other.

        @return: the entries recorded, in the order of C{variants}.
        """
        o = self.o
        entries, targets, live = [], [None] * len(variants), list(range(len(variants)))
        for name, params, _, _ in variants:
            entry = {"params": params, "runs": []}
            self.results[name] = entry
            entries.append(entry)
        try:
            for run in range(o.runs):
                for i in list(live):
                    name, _, runOnce, tls = variants[i]
                    entry = entries[i]
                    try:
                        if targets[i] is None:
                            targets[i] = self.relay(tls)
                        target = targets[i]
                        self.log(f"[{time.strftime('%H:%M:%S')}] {name} run {run + 1}/{o.runs} ...")
                        try:
                            r = runOnce(target, run)
                        except (BenchError, OSError) as e:
                            r = {"ok": False, "error": f"{type(e).__name__}: {e}"}
                    except C.Skip as e:
                        entry["skipped"] = str(e)
                        self.log(f"    skipped: {e}")
                        live.remove(i)
                        continue
                    if not self.recorded(name, target, run, r, entry):
                        targets[i] = None
                        continue
                    if freshRelay and not o.url:
                        self.done(target)
                        targets[i] = None
        finally:
            for target in targets:
                if target is not None:
                    self.done(target)
        for entry in entries:
            runs = entry["runs"]
            good = [r for r in runs if "error" not in r]
            entry["median"] = _medians(good)
            entry["ok"] = bool(runs) and all(r.get("ok") for r in runs)
        return entries

    def overTLSSeries(self, name, params, runOnce):
        """
        The series of one case over plain and/or TLS WebSocket, as --tls
        asks; with both, taking turns (L{interleaved}), and the TLS / plain
        ratio of each figure recorded per run and its median (case
        C{name-tls-ratio}).
        """
        variants = [
            (name + ("-tls" if tls else ""), dict(params, tls=tls), runOnce, tls)
            for tls in self.overTLS()
        ]
        entries = self.interleaved(variants)
        if len(entries) == 2:
            self.results[name + "-tls-ratio"] = _ratios(*entries)

    def run(self):
        o = self.o
        for case in o.chosen:
            if case == "throughput":
                for n in o.pairs:
                    self.overTLSSeries(
                        f"throughput-p{n}-{o.size}",
                        {"pairs": n, "size": o.size, "window": o.window},
                        lambda t, run, n=n: C.throughputRun(t, o, n, run),
                    )
            elif case == "latency":
                for n in o.latency_pairs:
                    self.overTLSSeries(
                        f"latency-p{n}-{o.size}",
                        {"pairs": n, "size": o.size},
                        lambda t, run, n=n: C.latencyRun(t, o, n, run),
                    )
            elif case == "handshakes":
                self.series(
                    f"handshakes-{o.connections}",
                    {"connections": o.connections, "concurrency": o.concurrency},
                    lambda t, run: C.handshakeRun(t, o, run),
                )
            elif case == "idle":
                self.series(
                    f"idle-{o.idle_peers}",
                    {"peers": o.idle_peers},
                    lambda t, run: C.idleRun(t, o, run),
                    freshRelay=True,
                )
            elif case == "stall":
                self.series(
                    f"stall-{o.stall_senders}x{o.stall_pairs}p",
                    {
                        "pairs": o.stall_pairs,
                        "stall_senders": o.stall_senders,
                        "duration": o.stall_duration,
                        "baseline": o.stall_baseline,
                        "size": o.size,
                        "window": o.window,
                    },
                    lambda t, run: C.stallRun(t, o, run),
                )
            elif case == "crosspod":
                self.crosspod()
            elif case == "compare":
                self.compare()
            elif case == "quic":
                self.quic()

    def overTLS(self):
        """
        The throughput and latency variants --tls asks for: C{False} for
        plain WebSocket, C{True} for TLS.
        """
        return {"no": (False,), "yes": (True,), "both": (False, True)}[self.o.tls]

    def compare(self):
        """
        compare.py (Go reference relay vs ours, the Go load generator) against
        a relay started here, fresh, as compare.py asks.
        """
        o = self.o
        entry = {"params": {"script": o.compare_script, "args": o.compare_arg}}
        self.results["compare"] = entry
        if not os.path.exists(o.compare_script):
            entry["skipped"] = f"{o.compare_script} not found"
            return
        target = self.relay()
        try:
            cmd = (
                [
                    sys.executable,
                    o.compare_script,
                    "--url",
                    f"ws://{target.host}:{target.port}/relay",
                    "--secret",
                    o.secret,
                ]
                + (["--pid", str(target.pid)] if target.pid else [])
                + o.compare_arg
            )
            self.log(f"[{time.strftime('%H:%M:%S')}] compare: {' '.join(cmd)}")
            proc = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
            lines = []
            for line in proc.stdout:
                lines.append(line.rstrip("\n"))
                self.log("    " + line.rstrip("\n"))
            proc.wait()
            entry["exit_status"] = proc.returncode
            entry["table"] = [text for text in lines if text and not text.startswith("{")]
            for text in reversed(lines):
                if text.startswith('{"summary"'):
                    entry["summary"] = json.loads(text)["summary"]
                    break
            entry["runs"] = [
                json.loads(text)
                for text in lines
                if text.startswith("{") and not text.startswith('{"summary"')
            ]
            entry["ok"] = proc.returncode == 0 and all(
                v.get("subject_ok", True)
                for v in entry.get("summary", {}).values()
                if isinstance(v, dict) and "subject_ok" in v
            )
        finally:
            self.done(target)

    def quic(self):
        """
        QUIC and TLS WebSocket side by side on one relay started here with a
        throwaway certificate, and plain WebSocket (ws) on a second relay
        without one (with a certificate the peer listener speaks only TLS);
        every run measures each transport in turn, so that load coming and
        going on a shared machine weighs on all of them alike.
        """
        o = self.o
        transports = [t.strip() for t in o.quic_transports.split(",") if t.strip()]
        plan = []
        binary = []
        if o.quic_load == "go":
            for n in o.quic_pairs:
                for tr in transports:
                    plan.append(
                        (
                            f"{tr}-tput-p{n}-{o.quic_size}",
                            {
                                "pairs": n,
                                "size": o.quic_size,
                                "window": o.quic_window,
                                "load": "go",
                            },
                            lambda t, run, tr=tr, n=n: C.quicGoRun(
                                t, o, tr, n, o.quic_window, run, cert, binary[0]
                            ),
                            tr != "ws",
                        )
                    )
            for n in o.quic_latency_pairs:
                for tr in transports:
                    plan.append(
                        (
                            f"{tr}-lat-p{n}-{o.quic_size}",
                            {"pairs": n, "size": o.quic_size, "load": "go"},
                            lambda t, run, tr=tr, n=n: C.quicGoRun(
                                t, o, tr, n, 1, run, cert, binary[0]
                            ),
                            tr != "ws",
                        )
                    )
            if o.quic_idle_peers:
                n = o.quic_idle_peers
                plan.append(
                    (
                        f"quic-idle-{n}",
                        {"peers": n, "load": "go"},
                        lambda t, run, n=n: C.quicIdleRun(t, o, n, run, cert, binary[0]),
                        # A relay of its own each run: the held connections
                        # end only at the idle timeout.
                        "idle",
                    )
                )
        for n in o.quic_pairs if o.quic_load == "python" else ():
            for tr in transports:
                plan.append(
                    (
                        f"{tr}-tput-p{n}-{o.quic_size}",
                        {"pairs": n, "size": o.quic_size, "window": o.quic_window},
                        lambda t, run, tr=tr, n=n: C.quicThroughputRun(t, o, tr, n, run, cert),
                        True,
                    )
                )
        for n in o.quic_latency_pairs if o.quic_load == "python" else ():
            for tr in transports:
                plan.append(
                    (
                        f"{tr}-lat-p{n}-{o.quic_size}",
                        {"pairs": n, "size": o.quic_size},
                        lambda t, run, tr=tr, n=n: C.quicLatencyRun(t, o, tr, n, run, cert),
                        True,
                    )
                )
        entries = {}
        for name, params, _, _ in plan:
            entries[name] = self.results[name] = {
                "params": dict(params, transports=transports),
                "runs": [],
            }
        if o.url:
            for e in entries.values():
                e["skipped"] = "needs a relay started here with a certificate (not with --url)"
            self.log(f"quic skipped: {next(iter(entries.values()))['skipped']}")
            return
        if o.quic_load == "go":
            try:
                binary.append(C.buildGoLoad())
            except C.Skip as e:
                for e2 in entries.values():
                    e2["skipped"] = str(e)
                self.log(f"quic skipped: {e}")
                return
        cert, key = writeCertificate(os.path.join(self.logDir, "quic-cert"))
        targets = {}  # with a certificate (True) or without (False, for ws)
        try:
            for run in range(o.runs):
                for name, _, runOnce, tls in plan:
                    if targets.get(tls) is None:
                        targets[tls] = self.quicRelay(cert, key) if tls else self.relay(False)
                    target = targets[tls]
                    self.log(f"[{time.strftime('%H:%M:%S')}] {name} run {run + 1}/{o.runs} ...")
                    try:
                        r = runOnce(target, run)
                    except (BenchError, OSError) as e:
                        r = {"ok": False, "error": f"{type(e).__name__}: {e}"}
                    except Exception:
                        r = {"ok": False, "error": "harness error: " + traceback.format_exc()}
                    if not self.recorded(name, target, run, r, entries[name]):
                        targets[tls] = None
                    elif tls == "idle":
                        self.done(target)
                        targets[tls] = None
        finally:
            for target in targets.values():
                if target is not None:
                    self.done(target)
        for e in entries.values():
            good = [r for r in e["runs"] if "error" not in r]
            e["median"] = _medians(good)
            e["ok"] = bool(e["runs"]) and all(r.get("ok") for r in e["runs"])
        self.results.update(_quicTLSRatios(entries))

    def quicRelay(self, cert, key):
        """
        The quic case's relay: C{cert} and C{key} for QUIC and TLS WebSocket.
        """
        o = self.o
        return RelayProcess(
            o.secret,
            extra=list(o.relay_arg) + ["--tls-cert-file", cert, "--tls-key-file", key],
            logDir=self.logDir,
            name="relay-quic",
            root=o.relay_root,
        ).start()

    def crosspod(self):
        o = self.o
        name = f"crosspod-{o.size}"
        entry = {"params": {"size": o.size, "pairs": 1}, "runs": []}
        if o.url:
            entry["skipped"] = "needs two relays started here (not with --url)"
            self.results[name] = entry
            self.log(f"{name} skipped: {entry['skipped']}")
            return
        try:
            pods = C.clusterRelays(o, self.logDir)
        except C.Skip as e:
            entry["skipped"] = str(e)
            self.results[name] = entry
            self.log(f"{name} skipped: {e}")
            return
        runs = entry["runs"]
        self.results[name] = entry
        try:
            for run in range(o.runs):
                self.log(f"[{time.strftime('%H:%M:%S')}] {name} run {run + 1}/{o.runs} ...")
                try:
                    r = C.crosspodRun(pods, o, run)
                except (BenchError, OSError) as e:
                    r = {"ok": False, "error": f"{type(e).__name__}: {e}"}
                r["run"] = run
                runs.append(r)
                self.log("    " + json.dumps(r))
                if not all(p.running() for p in pods):
                    self.problems.append(
                        f"{name}: a cluster relay died:\n" + "\n".join(p.logTail() for p in pods)
                    )
                    break
        except C.Skip as e:
            entry["skipped"] = str(e)
            self.log(f"    skipped: {e}")
        finally:
            for p in pods:
                self.done(p)
        good = [r for r in runs if "error" not in r]
        entry["median"] = _medians(good)
        entry["ok"] = bool(runs) and all(r.get("ok") for r in runs) and "skipped" not in entry

    def summary(self):
        lines = []
        # Names up to 26 characters line up as before; a longer one (the
        # ...-tls-ratio cases) widens the column.
        w = max([26] + [len(name) + 1 for name in self.results])
        lines.append(f"{'case':<{w}}{'ok':<5}{'runs':<6}medians")
        for name, e in self.results.items():
            kind = name.split("-")[0]
            if kind not in FIGURES and len(name.split("-")) > 1:
                kind = name.split("-")[1]
            if kind == "compare":
                if "skipped" in e:
                    lines.append(f"{name:<{w}}{'-':<5}{0:<6}skipped: {e['skipped']}")
                else:
                    lines.append(
                        f"{name:<{w}}{('yes' if e.get('ok') else 'NO'):<5}{'':<6}compare.py table:"
                    )
                    lines.extend("    " + row for row in e.get("table", []))
                continue
            if "skipped" in e and not e.get("runs"):
                lines.append(f"{name:<{w}}{'-':<5}{0:<6}skipped: {e['skipped'][:200]}")
                continue
            med = e.get("median", {})
            figs = "  ".join(f"{k}={_fmt(med.get(k))}" for k in FIGURES.get(kind, ()) if k in med)
            errs = [r["error"] for r in e["runs"] if "error" in r]
            extra = f"  errors: {errs[0][:160]}" if errs else ""
            if "skipped" in e:
                extra += f"  skipped: {e['skipped'][:160]}"
            lines.append(
                f"{name:<{w}}{('yes' if e.get('ok') else 'NO'):<5}{len(e['runs']):<6}{figs}{extra}"
            )
        return "\n".join(lines)


def _fmt(v):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def main(argv=None):
    o = parseArgs(sys.argv[1:] if argv is None else argv)
    raiseFileLimit(max(8192, 2 * max(o.connections, o.idle_peers) + 1024))
    bench = Bench(o)
    started = datetime.datetime.now(datetime.UTC)
    try:
        bench.run()
    except KeyboardInterrupt:
        bench.problems.append("interrupted")
    except Exception:
        bench.problems.append("harness error:\n" + traceback.format_exc())
    out = {
        "meta": {
            "started": started.isoformat(timespec="seconds"),
            "finished": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "git": _gitHead(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "relay": o.url or f"started here from {o.relay_root or ROOT}",
            "relay_args": o.relay_arg,
            "runs": o.runs,
            "duration_s": o.duration,
            "warmup_s": o.warmup,
            "logs": bench.logDir,
        },
        "cases": bench.results,
        "problems": bench.problems,
    }
    if o.json:
        with open(o.json, "w") as f:
            json.dump(out, f, indent=1)
    print(bench.summary())
    for p in bench.problems:
        print("PROBLEM: " + p)
    ok = all(e.get("ok") or "skipped" in e for e in bench.results.values()) and not bench.problems
    clean = ok and not any("skipped" in e for e in bench.results.values())
    if not o.keep_logs and clean:
        import shutil

        shutil.rmtree(bench.logDir, ignore_errors=True)
    else:
        print(f"relay logs kept in {bench.logDir}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
