"""
Resource limits for an internet-facing relay.

Anyone can open a socket to a relay, so every resource a stranger can make it
spend is bounded: connections per source address, new connections per source
address per second, connections that have not authenticated yet, peers in
all, and inbound bytes per peer. A limit refuses or drops only what exceeds
it; connections within their limits never notice.

Token buckets are written here rather than taken from a library: the ones on
PyPI are built for threads or asyncio and wall-clock time, while these must
run on the reactor's (testable) clock and cost a few arithmetic operations
per packet.
"""

import ipaddress

from twisted.internet.task import LoopingCall
from twisted.logger import Logger

PRUNE_INTERVAL = 60.0


class TokenBucket:
    """
    C{rate} tokens per second, at most C{burst} saved up.
    """

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate, burst, now):
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = now

    def take(self, amount, now):
        """
        @return: True (and spend C{amount}) if the bucket holds that much.
        """
        tokens = self.tokens + (now - self.stamp) * self.rate
        if tokens > self.burst:
            tokens = self.burst
        self.stamp = now
        if tokens < amount:
            self.tokens = tokens
            return False
        self.tokens = tokens - amount
        return True

    def full(self, now):
        return self.tokens + (now - self.stamp) * self.rate >= self.burst


def parseNetworks(value):
    """
    C{"10.0.0.0/8, 192.0.2.7"} into a tuple of networks.

    @raise ValueError: a part that is not an address or network.
    """
    return tuple(ipaddress.ip_network(part.strip(), strict=False) for part in value.split(",") if part.strip())


class Limits:
    """
    The limits of one relay process (0 turns a limit off).

    @ivar maxPeers: authenticated peers in all.
    @ivar maxPending: connections that have not authenticated yet.
    @ivar maxPerIP: open connections from one source address.
    @ivar ratePerIP: new connections per second from one source address
        (bursts of twice that).
    @ivar peerByteRate: inbound Transport bytes per second from one peer
        (bursts of one second's worth, at least one whole message).
    @ivar trustedProxies: networks whose C{X-Real-IP} header names the real
        source address.
    """

    def __init__(self, maxPeers=0, maxPending=0, maxPerIP=0, ratePerIP=0.0, peerByteRate=0, trustedProxies=()):
        self.maxPeers = maxPeers
        self.maxPending = maxPending
        self.maxPerIP = maxPerIP
        self.ratePerIP = ratePerIP
        self.peerByteRate = peerByteRate
        self.trustedProxies = tuple(trustedProxies)


class ConnectionGate:
    """
    Admits or refuses connections by source address, and counts them.

    Each admitted connection holds a ticket for its address until it calls
    L{release}. Per-address state is dropped once an address has no
    connection and a full bucket, so the tables stay as small as the set of
    addresses currently active.
    """

    _log = Logger()

    def __init__(self, limits, clock):
        self.limits = limits
        self.clock = clock
        self._open = {}
        self._buckets = {}
        self._pruner = None

    def start(self):
        if self.limits.ratePerIP:
            self._pruner = LoopingCall(self.prune)
            self._pruner.clock = self.clock
            self._pruner.start(PRUNE_INTERVAL, now=False)

    def stop(self):
        if self._pruner is not None and self._pruner.running:
            self._pruner.stop()

    def isTrustedProxy(self, address):
        if not self.limits.trustedProxies:
            return False
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self.limits.trustedProxies)

    def admit(self, address):
        """
        A new connection from C{address}.

        @return: None if admitted (the caller must L{release} it later), else
            the reason it was refused.
        """
        limits = self.limits
        if limits.maxPerIP and self._open.get(address, 0) >= limits.maxPerIP:
            return "per_ip_connections"
        if limits.ratePerIP:
            now = self.clock.seconds()
            bucket = self._buckets.get(address)
            if bucket is None:
                bucket = self._buckets[address] = TokenBucket(limits.ratePerIP, 2 * limits.ratePerIP, now)
            if not bucket.take(1, now):
                return "per_ip_rate"
        self._open[address] = self._open.get(address, 0) + 1
        return None

    def release(self, address):
        count = self._open.get(address, 0) - 1
        if count > 0:
            self._open[address] = count
        else:
            self._open.pop(address, None)

    def prune(self):
        now = self.clock.seconds()
        for address in [a for a, b in self._buckets.items() if a not in self._open and b.full(now)]:
            del self._buckets[address]


class LogBudget:
    """
    At most C{burst} log lines per C{window} seconds for events anyone can
    cause at will (refused handshakes, ignored messages): a flood of bad
    connections must not become a flood of log lines. Lines over budget are
    counted and summarised once the window ends; the metrics count every
    event regardless.
    """

    _log = Logger()

    def __init__(self, clock, burst=50, window=10.0):
        self.clock = clock
        self.burst = burst
        self.window = window
        self._until = 0.0
        self._used = 0
        self.suppressed = 0

    def __call__(self, emit, format, **fields):
        """
        C{emit(format, **fields)} (a bound L{Logger} method) if the budget
        allows.
        """
        now = self.clock.seconds()
        if now >= self._until and not self.suppressed:
            self._until = now + self.window
            self._used = 0
        if self._used < self.burst:
            self._used += 1
            emit(format, **fields)
            return
        if not self.suppressed:
            self.clock.callLater(self._until - now, self._summarise)
        self.suppressed += 1

    def _summarise(self):
        self._log.warn(
            "{count} more lines about refused or ignored traffic were not logged in the last {window:.0f} s (the counters in /metrics have every event)",
            count=self.suppressed,
            window=self.window,
        )
        self.suppressed = 0
        self._until = self.clock.seconds() + self.window
        self._used = 0
