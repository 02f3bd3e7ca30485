"""
Which pod holds a peer: WHO_HAS / I_HAVE lookups and the id -> pod cache.

On a local miss the forwarder asks here. A cached answer (5 min) is used at
once; otherwise WHO_HAS goes to every live stream and the lookup completes at
the first I_HAVE (Beyond: the original always waits the full 200 ms), or
misses after 200 ms of silence. Concurrent lookups of one id share one
broadcast and get the same answer.

Every I_HAVE, asked for or not, updates the cache unless the cached seqno is
higher. A seqno is the owner's registration time of the peer in 10 ms units,
modulo 2**32, compared with RFC 1982 serial-number arithmetic, so the pod the
peer most recently connected to wins a migration race (the original sends a
per-pod answer counter, which orders nothing).

A cache entry at a pod that announces presence (it has sent PEER_GONE, or
an I_HAVE nobody asked for: pods of this relay push both) is kept for
another 5 min each time it is used, so a long cross-pod flow is not looked
up again every 5 min: such a pod says when the peer leaves, and a pod the
peer moves to says so with a higher seqno. Entries at other pods (the Go
original tells nobody when a peer leaves) expire after 5 min as there.
"""

from twisted.internet import defer
from twisted.logger import Logger

from relay import messages
from relay.cluster import frames

LOOKUP_TIMEOUT = 0.2
CACHE_TTL = 300.0

_SERIAL_MODULO = 2**32
_SERIAL_HALF = 2**31

_log = Logger()


def seqnoOf(registeredAt):
    """
    The seqno announcing a peer registered at C{registeredAt} (seconds).
    """
    return int(registeredAt * 100) % _SERIAL_MODULO


def serialGreater(a, b):
    """
    Whether seqno C{a} is after C{b} in RFC 1982 serial arithmetic (32 bits).
    Two values exactly half the space apart are unordered: neither is greater.
    """
    return (a < b and b - a > _SERIAL_HALF) or (a > b and a - b < _SERIAL_HALF)


class CacheEntry:
    __slots__ = ("address", "seqno", "expiresAt")

    def __init__(self, address, seqno, expiresAt):
        self.address = address
        self.seqno = seqno
        self.expiresAt = expiresAt


class _Lookup:
    __slots__ = ("waiters", "timer", "startedAt")

    def __init__(self, startedAt):
        self.waiters = []
        self.timer = None
        self.startedAt = startedAt


class Locator:
    """
    WHO_HAS / I_HAVE lookups over a L{relay.cluster.streams.ClusterStreams}.
    """

    def __init__(
        self,
        streams,
        localPeers,
        clock,
        lookupObserver=None,
        lookupTimeout=LOOKUP_TIMEOUT,
        cacheTTL=CACHE_TTL,
    ):
        """
        @param streams: gives C{liveStreams()}.
        @param localPeers: an L{relay.interfaces.ILocalPeers}.
        @param clock: an L{IReactorTime}.
        @param lookupObserver: called with the duration in seconds of each
            broadcast lookup, or None.
        """
        self.streams = streams
        self.localPeers = localPeers
        self.clock = clock
        self.lookupObserver = lookupObserver
        self.lookupTimeout = lookupTimeout
        self.cacheTTL = cacheTTL
        self._cache = {}
        self._lookups = {}
        self._announcing = set()
        self._nextSweep = clock.seconds() + cacheTTL

    # Cache

    def cachedEntry(self, peerID):
        """
        @return: the unexpired L{CacheEntry} for C{peerID}, or None; an
            entry at a pod that announces presence is renewed by the use.
        """
        entry = self._cache.get(peerID)
        if entry is None:
            return None
        now = self.clock.seconds()
        if now >= entry.expiresAt:
            del self._cache[peerID]
            return None
        if entry.address in self._announcing:
            entry.expiresAt = now + self.cacheTTL
        return entry

    def cached(self, peerID):
        """
        @return: the cached pod address holding C{peerID}, or None.
        """
        entry = self.cachedEntry(peerID)
        return None if entry is None else entry.address

    def invalidate(self, peerID, address=None):
        """
        Forget where C{peerID} is (only if cached at C{address}, when given).

        @return: whether an entry was dropped.
        """
        entry = self._cache.get(peerID)
        if entry is None or (address is not None and entry.address != address):
            return False
        del self._cache[peerID]
        return True

    def invalidatePod(self, address):
        """
        Forget every peer cached at C{address} (its stream ended).
        """
        self._announcing.discard(address)
        gone = [pid for pid, entry in self._cache.items() if entry.address == address]
        for pid in gone:
            del self._cache[pid]

    def presenceAnnounced(self, address):
        """
        The pod at C{address} pushes presence (it sent PEER_GONE or an
        unsolicited I_HAVE): its entries are renewed by use from now on,
        until its stream ends.
        """
        self._announcing.add(address)

    def _remember(self, peerID, address, seqno):
        """
        Cache C{peerID} at C{address} unless a higher seqno is cached.

        @return: C{(updated, changed)}: whether the entry was written, and
            whether that made C{address} the new owner (no live entry before,
            or another pod).
        """
        now = self.clock.seconds()
        if now >= self._nextSweep:
            self._sweep(now)
        entry = self.cachedEntry(peerID)
        if entry is not None and serialGreater(entry.seqno, seqno):
            return False, False
        changed = entry is None or entry.address != address
        self._cache[peerID] = CacheEntry(address, seqno, now + self.cacheTTL)
        return True, changed

    def _sweep(self, now):
        expired = [pid for pid, entry in self._cache.items() if now >= entry.expiresAt]
        for pid in expired:
            del self._cache[pid]
        self._nextSweep = now + self.cacheTTL

    # Lookups

    def pending(self, peerID):
        return peerID in self._lookups

    def lookup(self, peerID):
        """
        Find the pod holding C{peerID}.

        @return: a L{Deferred} firing with the pod's address, or None on a
            miss; never fails.
        """
        address = self.cached(peerID)
        if address is not None:
            return defer.succeed(address)
        lookup = self._lookups.get(peerID)
        if lookup is None:
            live = self.streams.liveStreams()
            if not live:
                return defer.succeed(None)
            lookup = self._lookups[peerID] = _Lookup(self.clock.seconds())
            lookup.timer = self.clock.callLater(self.lookupTimeout, self._complete, peerID, None)
            whoHas = frames.whoHasFrame(peerID)
            for stream in live:
                stream.send(whoHas)
        d = defer.Deferred()
        lookup.waiters.append(d)
        return d

    def _complete(self, peerID, address):
        lookup = self._lookups.pop(peerID, None)
        if lookup is None:
            return
        if lookup.timer is not None and lookup.timer.active():
            lookup.timer.cancel()
        if address is None:
            _log.debug("cluster: no pod answered WHO_HAS {peer}", peer=messages.humanID(peerID))
        if self.lookupObserver is not None:
            try:
                self.lookupObserver(self.clock.seconds() - lookup.startedAt)
            except Exception:
                _log.failure("cluster: lookup observer failed")
        for d in lookup.waiters:
            d.callback(address)

    def stop(self):
        """
        End every pending lookup as a miss.
        """
        for peerID in list(self._lookups):
            self._complete(peerID, None)

    # Frames from sibling pods

    def iHaveReceived(self, address, peerID, seqno):
        """
        The pod at C{address} says it holds C{peerID}.

        @return: C{(changed, solicited)}: whether the cache now names a new
            owner, and whether a pending lookup asked for this.
        """
        _, changed = self._remember(peerID, address, seqno)
        solicited = peerID in self._lookups
        if not solicited:
            self.presenceAnnounced(address)
        if solicited:
            self._complete(peerID, self.cached(peerID))
        return changed, solicited

    def whoHasReceived(self, stream, peerID):
        """
        Answer I_HAVE if C{peerID} is connected here; stay silent otherwise.
        """
        peer = self.localPeers.localPeer(peerID)
        if peer is not None:
            stream.send(frames.iHaveFrame(peerID, seqnoOf(peer.registeredAt)))
