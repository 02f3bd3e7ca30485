"""
C{python -m relay.probe URL --secret S}: is this relay working, end to end?

Two throwaway peers authenticate, find each other through a subscription, and
bounce messages through the relay; the probe prints the round trips and exits
non-zero if anything failed or was lost. C{--transport quic} makes the peers
connect over QUIC (a C{rels://} URL: QUIC needs TLS) instead of WebSocket, so
each transport of a deployed relay can be checked.
"""

import argparse
import os
import socket
import statistics
import sys
import time
from ssl import CERT_REQUIRED
from urllib.parse import urlsplit

from twisted.internet import defer, ssl, task, threads

from relay import client, quicclient
from relay import messages as m
from relay.listener import quic

# The largest payload one DATAGRAM frame carries to the probe's QUIC peers
# (aioquic's 8-byte connection ids): larger ones would be dropped, not lost.
MAX_QUIC_SIZE = (
    quic._payloadRoom(
        quic.MAX_UDP_PAYLOAD
        - quic.SHORT_HEADER_SIZE
        - quic.CONNECTION_ID_LENGTH
        - quic.AEAD_TAG_SIZE
    )
    - m.TRANSPORT_HEADER_SIZE
)
# The largest a Go agent's QUIC datagram carries (docs/protocol.md, "Carriers").
DEFAULT_QUIC_SIZE = 1377
DEFAULT_WS_SIZE = 1400


def _quicAddress(url):
    """
    The relay's UDP host, port and TLS server name from a C{rels://} URL.

    @raise ValueError: not a C{rels://} URL.
    """
    split = urlsplit(url)
    if split.scheme != "rels":
        raise ValueError(f"QUIC needs TLS: give a rels:// URL, not {url!r}")
    return split.hostname, split.port or 443


@defer.inlineCallbacks
def _connectQuic(reactor, url, peerID, secret, timeout, cafile):
    host, port = _quicAddress(url)
    # connectQuic needs an address; the name stays for the certificate.
    infos = yield threads.deferToThread(socket.getaddrinfo, host, port, type=socket.SOCK_DGRAM)
    address = infos[0][4][0]
    configuration = quicclient.clientConfiguration(cafile=cafile, serverName=host)
    if cafile is None:
        # clientConfiguration skips verification without a cafile (tests);
        # a probe checks the certificate against certifi's roots.
        configuration.verify_mode = CERT_REQUIRED
    peer = yield quicclient.connectQuic(
        reactor, address, port, peerID, secret=secret, timeout=timeout, configuration=configuration
    )
    return peer


def connectPeer(reactor, url, peerID, secret, timeout, transport="ws", cafile=None):
    """
    Connect and authenticate one probe peer.

    @param transport: C{"ws"} or C{"quic"}.
    @param cafile: a PEM certificate to trust instead of the system's roots.
    @return: a Deferred firing with the authenticated peer.
    """
    if transport == "quic":
        return _connectQuic(reactor, url, peerID, secret, timeout, cafile)
    trustRoot = None
    if cafile is not None:
        with open(cafile, "rb") as f:
            trustRoot = ssl.Certificate.loadPEM(f.read())
    return client.connect(reactor, url, peerID, secret=secret, timeout=timeout, trustRoot=trustRoot)


@defer.inlineCallbacks
def probe(reactor, url, secret, count, size, timeout, transport="ws", cafile=None):
    tag = os.urandom(6).hex()
    idA, idB = m.peerID(f"probe-a-{tag}"), m.peerID(f"probe-b-{tag}")
    a = yield connectPeer(reactor, url, idA, secret, timeout, transport, cafile)
    try:
        b = yield connectPeer(reactor, url, idB, secret, timeout, transport, cafile)
    except Exception:
        yield a.close()
        raise
    try:
        yield a.waitOnline(idB, timeout)
        b.onTransport = lambda message: b.sendRaw(
            message[:2] + idA + message[m.TRANSPORT_HEADER_SIZE :]
        )
        payload = os.urandom(size)
        rtts = []
        for _ in range(count):
            sent = time.perf_counter()
            a.send(idB, payload)
            source, echoed = yield a.transports.get().addTimeout(timeout, reactor)
            rtts.append((time.perf_counter() - sent) * 1000)
            if source != idB or echoed != payload:
                raise ValueError("the relay delivered a wrong message")
    finally:
        yield defer.DeferredList([a.close(), b.close()])
    return a.instanceURL, rtts


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m relay.probe", description=__doc__.strip().splitlines()[0]
    )
    parser.add_argument("url", help="rel://host:port, rels://host:port, ws://… or wss://…")
    parser.add_argument(
        "--secret",
        default=os.environ.get("OZ_AUTH_SECRET"),
        help="the relay's auth secret (default: $OZ_AUTH_SECRET)",
    )
    parser.add_argument("--count", type=int, default=100, help="round trips (default 100)")
    parser.add_argument(
        "--size",
        type=int,
        help=f"payload bytes (default {DEFAULT_WS_SIZE}, over QUIC {DEFAULT_QUIC_SIZE})",
    )
    parser.add_argument(
        "--timeout", type=float, default=10.0, help="seconds to wait for any step (default 10)"
    )
    parser.add_argument(
        "--transport",
        choices=("ws", "quic"),
        default="ws",
        help="how the probe peers connect: WebSocket (default) or QUIC (rels:// URLs)",
    )
    parser.add_argument(
        "--cafile",
        help="PEM certificate to trust instead of the system's roots (a self-signed relay)",
    )
    args = parser.parse_args(argv)
    if not args.secret:
        parser.error("--secret (or OZ_AUTH_SECRET) is required")
    quicTransport = args.transport == "quic"
    if args.size is None:
        args.size = DEFAULT_QUIC_SIZE if quicTransport else DEFAULT_WS_SIZE
    largest = MAX_QUIC_SIZE if quicTransport else m.MAX_MESSAGE_SIZE - m.TRANSPORT_HEADER_SIZE
    if not 0 <= args.size <= largest or args.count < 1:
        parser.error(
            f"--size must fit one message (over {args.transport}: at most {largest} bytes) and "
            "--count be positive"
        )
    if quicTransport:
        try:
            _quicAddress(args.url)
        except ValueError as e:
            parser.error(str(e))

    def run(reactor):
        def report(result):
            instanceURL, rtts = result
            rtts.sort()
            p99 = rtts[min(len(rtts) - 1, int(len(rtts) * 0.99))]
            print(
                f"ok ({args.transport}): instance {instanceURL}, {len(rtts)} round trips of "
                f"{args.size} bytes, median {statistics.median(rtts):.3f} ms, p99 {p99:.3f} ms, "
                f"max {rtts[-1]:.3f} ms"
            )

        def failed(failure):
            print(
                f"probe failed: {failure.getErrorMessage() or failure.type.__name__}",
                file=sys.stderr,
            )
            raise SystemExit(1)

        return probe(
            reactor,
            args.url,
            args.secret,
            args.count,
            args.size,
            args.timeout,
            args.transport,
            args.cafile,
        ).addCallbacks(report, failed)

    task.react(run)


if __name__ == "__main__":
    main()
