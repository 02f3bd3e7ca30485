"""
Resource limits for an internet-facing relay.

Anyone can open a socket to a relay, so every resource a stranger can make it
spend is bounded: connections that have not authenticated yet (shared fairly
between sources, see L{Admission}), descriptors, peers in all, and, when the
operator asks for them, connections and new connections per second per source
and inbound bytes per peer. A limit refuses or drops only what exceeds it;
connections within their limits never notice.

Token buckets are written here rather than taken from a library: the ones on
PyPI are built for threads or asyncio and wall-clock time, while these must
run on the reactor's (testable) clock and cost a few arithmetic operations
per packet.
"""

import ipaddress
import os

from twisted.internet.task import LoopingCall
from twisted.logger import Logger

PRUNE_INTERVAL = 60.0
# A connection waiting for Auth may be evicted for a newcomer only once it
# has waited this long: an agent needs a few round trips (TCP, TLS, upgrade,
# Auth), and a reconnect storm from behind one NAT briefly holds more
# connections than there are slots, all of them young and all of them real.
EVICTABLE_AFTER = 2.0
# Descriptors the peer port leaves to everything else (the metrics port and
# its probes, the fabric, DNS, log files, ACME), so that /healthz still
# answers while a flood holds every descriptor the peer port may use.
DESCRIPTOR_RESERVE = 128


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


def raiseDescriptorLimit():
    """
    Raise the soft limit on open descriptors to the hard one, as the Go
    relay does (its runtime does so since Go 1.19): the soft limit is often
    1,024, a few hundred agents' worth.

    @return: C{(before, now)}, the soft limit before and after; C{(None,
        None)} where there is no such limit.
    """
    try:
        import resource
    except ImportError:
        return None, None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        # An unlimited soft limit is refused; the kernel's ceiling is not.
        try:
            with open("/proc/sys/fs/nr_open") as f:
                target = int(f.read())
        except (OSError, ValueError):
            target = soft
    if soft != resource.RLIM_INFINITY and target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError):
            pass
    now = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return soft, (None if now == resource.RLIM_INFINITY else now)


def descriptorsInUse():
    """
    Descriptors this process has open (0 where that cannot be read).
    """
    try:
        # Less the one listdir itself holds open.
        return len(os.listdir("/proc/self/fd")) - 1
    except OSError:
        return 0


def parseNetworks(value):
    """
    C{"10.0.0.0/8, 192.0.2.7"} into a tuple of networks.

    @raise ValueError: a part that is not an address or network.
    """
    return tuple(
        ipaddress.ip_network(part.strip(), strict=False)
        for part in value.split(",")
        if part.strip()
    )


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

    def __init__(
        self, maxPeers=0, maxPending=0, maxPerIP=0, ratePerIP=0.0, peerByteRate=0, trustedProxies=()
    ):
        self.maxPeers = maxPeers
        self.maxPending = maxPending
        self.maxPerIP = maxPerIP
        self.ratePerIP = ratePerIP
        self.peerByteRate = peerByteRate
        self.trustedProxies = tuple(trustedProxies)

    def shared(self, workers):
        """
        The limits of one of C{workers} processes sharing a port: the
        kernel spreads connections evenly over them (C{SO_REUSEPORT} hashes
        each connection's addresses and ports), so each enforces its share,
        rounded up, and the host as a whole holds the configured limits.
        A peer is served by one worker, so its byte rate stays whole.
        """

        def share(value):
            return -(-value // workers)

        return Limits(
            maxPeers=share(self.maxPeers),
            maxPending=share(self.maxPending),
            maxPerIP=share(self.maxPerIP),
            ratePerIP=self.ratePerIP / workers,
            peerByteRate=self.peerByteRate,
            trustedProxies=self.trustedProxies,
        )


def sourceGroup(address):
    """
    The key a source address is counted under: an IPv4 address itself, an
    IPv6 address by its /64 (what one subscriber is handed: counted by
    address, one home would be 2**64 sources).
    """
    if ":" not in address:
        return address
    try:
        ip = ipaddress.IPv6Address(address.partition("%")[0])
    except ValueError:
        return address
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return f"{ipaddress.IPv6Address(int(ip) >> 64 << 64)}/64"


class Admission:
    """
    Which connections the relay takes on, whatever carries them.

    Three duties, the first and last keyed by source (L{sourceGroup}):

      - L{admit} / L{release}, once per connection: the optional per-source
        limits (open connections, new connections per second).
      - L{accept} / L{closed}, once per connection holding a descriptor: the
        descriptor reserve (L{maxConnections}) that keeps the metrics port
        and the fabric able to accept when the peer port is flooded.
      - L{enter} / L{leave}, per session waiting for Auth: the pending slots
        (C{maxPending}). When they are all taken, the oldest waiting
        connection of the source that holds the most of them makes room for
        the newcomer (L{PeerSession.evict}), if it has waited
        L{EVICTABLE_AFTER} already; if not, the newcomer is let in beyond
        the limit (a burst, bounded by its rate and by the descriptors). A
        flood of connections that never authenticate thus only ever evicts
        itself, and each source, however many addresses it has, keeps a
        share of the slots: an agent from anywhere else is never refused
        for want of a slot.

    QUIC, or any other carrier, calls L{admit} with the source address when
    a connection appears and L{release} when it is gone; its link carries
    the address as C{sourceHost}, which L{PeerSession} hands to L{enter}.

    Per-address state is dropped once an address has no connection and a
    full bucket, so the tables stay as small as the set of addresses
    currently active.

    @ivar maxConnections: connections the descriptor limit leaves room for
        (0: not known, not checked).
    """

    _log = Logger()

    def __init__(self, limits, clock):
        self.limits = limits
        self.clock = clock
        self.maxConnections = 0
        self.connections = 0
        self._open = {}
        self._buckets = {}
        self._pruner = None
        # Pending sessions: each one's source, each source's sessions in
        # arrival order (with the time), and the sources by how many they hold (so the
        # largest is found in O(1) however many sources there are).
        self._pendingSource = {}
        self._bySource = {}
        self._bySize = {}
        self._largest = 0

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

    # Connections

    def accept(self):
        """
        A new connection holding a descriptor.

        @return: None if there is room for it (the caller must call
            L{closed} once it is gone), else the reason it is refused.
        """
        if self.maxConnections and self.connections >= self.maxConnections:
            # Out of descriptors, a connection waiting for Auth makes room
            # whatever its age: an agent must not be refused because a flood
            # holds them all. Its descriptor is freed on the next reactor
            # turn; half the reserve covers those still being closed.
            if self.connections >= self.maxConnections + DESCRIPTOR_RESERVE // 2 or not self._evict(
                force=True
            ):
                return "descriptors"
        self.connections += 1
        return None

    def closed(self):
        self.connections -= 1

    def admit(self, address):
        """
        A new connection from C{address}.

        @return: None if admitted (the caller must L{release} it later with
            the same address), else the reason it was refused.
        """
        limits = self.limits
        source = sourceGroup(address)
        if limits.maxPerIP and self._open.get(source, 0) >= limits.maxPerIP:
            return "per_ip_connections"
        if limits.ratePerIP:
            now = self.clock.seconds()
            bucket = self._buckets.get(source)
            if bucket is None:
                bucket = self._buckets[source] = TokenBucket(
                    limits.ratePerIP, 2 * limits.ratePerIP, now
                )
            if not bucket.take(1, now):
                return "per_ip_rate"
        self._open[source] = self._open.get(source, 0) + 1
        return None

    def release(self, address):
        source = sourceGroup(address)
        count = self._open.get(source, 0) - 1
        if count > 0:
            self._open[source] = count
        else:
            self._open.pop(source, None)

    def prune(self):
        now = self.clock.seconds()
        for address in [a for a, b in self._buckets.items() if a not in self._open and b.full(now)]:
            del self._buckets[address]

    # Sessions waiting for Auth

    @property
    def pending(self):
        return len(self._pendingSource)

    def enter(self, session, address):
        """
        C{session}, from C{address} (None if unknown), waits for Auth. If the
        pending slots are all taken, another waiting session is evicted
        first (see the class docstring).
        """
        maxPending = self.limits.maxPending
        if maxPending and len(self._pendingSource) >= maxPending:
            self._evict()
        self._add(session, "" if address is None else sourceGroup(address), self.clock.seconds())

    def _evict(self, force=False):
        """
        Close the oldest waiting connection of the source that holds the
        most, if it has waited L{EVICTABLE_AFTER} (or C{force}).

        @return: whether one was closed.
        """
        if not self._largest:
            return False
        source = next(iter(self._bySize[self._largest]))
        sessions = self._bySource[source]
        victim = next(iter(sessions))
        if not force and self.clock.seconds() - sessions[victim] < EVICTABLE_AFTER:
            return False
        waiting = len(self._pendingSource)
        self.leave(victim)
        victim.evict("pending_evicted", waiting, source)
        return True

    def move(self, session, address):
        """
        The waiting C{session} turned out to come from C{address} (a trusted
        proxy's C{X-Real-IP}).
        """
        source = self._pendingSource.get(session)
        if source is not None:
            since = self._bySource[source][session]
            self.leave(session)
            self._add(session, sourceGroup(address), since)

    def leave(self, session):
        """
        C{session} no longer waits (authenticated, or gone).

        @return: whether it was waiting.
        """
        source = self._pendingSource.pop(session, None)
        if source is None:
            return False
        sessions = self._bySource[source]
        size = len(sessions)
        del sessions[session]
        self._resize(source, size, size - 1)
        if size == 1:
            del self._bySource[source]
        return True

    def _add(self, session, source, since):
        self._pendingSource[session] = source
        sessions = self._bySource.get(source)
        if sessions is None:
            sessions = self._bySource[source] = {}
        size = len(sessions)
        sessions[session] = since
        self._resize(source, size, size + 1)

    def _resize(self, source, old, new):
        if old:
            sources = self._bySize[old]
            del sources[source]
            if not sources:
                del self._bySize[old]
                if old == self._largest:
                    self._largest = new
        if new:
            self._bySize.setdefault(new, {})[source] = None
            if new > self._largest:
                self._largest = new


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
            "{count} more lines about refused or ignored traffic were not logged in the last "
            "{window:.0f} s (the counters in /metrics have every event)",
            count=self.suppressed,
            window=self.window,
        )
        self.suppressed = 0
        self._until = self.clock.seconds() + self.window
        self._used = 0
