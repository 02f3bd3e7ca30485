"""
C{python -m relay.probe URL --secret S}: is this relay working, end to end?

Two throwaway peers authenticate, find each other through a subscription, and
bounce messages through the relay; the probe prints the round trips and exits
non-zero if anything failed or was lost.
"""

import argparse
import os
import statistics
import sys
import time

from twisted.internet import defer, task

from relay import client
from relay import messages as m


@defer.inlineCallbacks
def probe(reactor, url, secret, count, size, timeout):
    tag = os.urandom(6).hex()
    a = yield client.connect(reactor, url, m.peerID(f"probe-a-{tag}"), secret=secret, timeout=timeout)
    b = yield client.connect(reactor, url, m.peerID(f"probe-b-{tag}"), secret=secret, timeout=timeout)
    try:
        yield a.waitOnline(b.factory.peerID, timeout)
        b.onTransport = lambda message: b.sendRaw(message[:2] + a.factory.peerID + message[38:])
        payload = os.urandom(size)
        rtts = []
        for _ in range(count):
            sent = time.perf_counter()
            a.send(b.factory.peerID, payload)
            source, echoed = yield a.transports.get().addTimeout(timeout, reactor)
            rtts.append((time.perf_counter() - sent) * 1000)
            if source != b.factory.peerID or echoed != payload:
                raise ValueError("the relay delivered a wrong message")
    finally:
        yield defer.DeferredList([a.close(), b.close()])
    return a.instanceURL, rtts


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m relay.probe", description=__doc__.strip().splitlines()[0])
    parser.add_argument("url", help="rel://host:port, rels://host:port, ws://… or wss://…")
    parser.add_argument("--secret", default=os.environ.get("OZ_AUTH_SECRET"), help="the relay's auth secret (default: $OZ_AUTH_SECRET)")
    parser.add_argument("--count", type=int, default=100, help="round trips (default 100)")
    parser.add_argument("--size", type=int, default=1400, help="payload bytes (default 1400)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for any step (default 10)")
    args = parser.parse_args(argv)
    if not args.secret:
        parser.error("--secret (or OZ_AUTH_SECRET) is required")
    if not 0 <= args.size <= m.MAX_MESSAGE_SIZE - m.TRANSPORT_HEADER_SIZE or args.count < 1:
        parser.error("--size must fit one message and --count be positive")

    def run(reactor):
        def report(result):
            instanceURL, rtts = result
            rtts.sort()
            p99 = rtts[min(len(rtts) - 1, int(len(rtts) * 0.99))]
            print(f"ok: instance {instanceURL}, {len(rtts)} round trips of {args.size} bytes, median {statistics.median(rtts):.3f} ms, p99 {p99:.3f} ms, max {rtts[-1]:.3f} ms")

        def failed(failure):
            print(f"probe failed: {failure.getErrorMessage() or failure.type.__name__}", file=sys.stderr)
            raise SystemExit(1)

        return probe(reactor, args.url, args.secret, args.count, args.size, args.timeout).addCallbacks(report, failed)

    task.react(run)


if __name__ == "__main__":
    main()
