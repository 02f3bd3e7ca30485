"""
Who is connected to this relay, and who wants to hear about whom.

The store maps peer ids to their live connection. A peer that authenticates
again replaces its older connection; a connection that ends only removes the
entry if it is still the stored one, so a late close of a replaced connection
never takes a reconnected peer offline.

Interest (docs/protocol.md, "After the handshake"): a subscriber's interest
in an id is consumed when it is told the id came online (once per
subscription), and kept for going offline. Everything here runs in the
reactor thread, so notifications are delivered synchronously and in the
order the events happened.

One peer's interest is bounded (L{MAX_SUBSCRIPTIONS} ids): each id costs
about 200 bytes here and, in a cluster, a lookup across the pods, so an
unbounded set lets one agent grow the relay at will.
"""

# An agent subscribes to one id per peer it opens a relayed connection to
# through this relay, and keeps it until that connection ends (the Go
# client's PeersStateSubscription), so its set is at most its mesh seen
# through one relay. 4,096 lets an agent of a mesh of thousands relay every
# one of its peers through one instance (agents reach most peers directly
# and relay only the rest), and bounds one peer at about 1 MiB.
MAX_SUBSCRIPTIONS = 4096


class Subscriber:
    """
    One peer's interest sets.

    @ivar online: ids whose coming online this subscriber wants to hear of.
    @ivar offline: ids whose going offline this subscriber wants to hear of.
    """

    __slots__ = ("peer", "online", "offline")

    def __init__(self, peer):
        self.peer = peer
        self.online = set()
        self.offline = set()


class Store:
    """
    Connected peers by id and the subscriptions between them.

    Peers are L{relay.interfaces.IPeerConnection} providers that also have
    C{peersOnline(ids)} and C{peersWentOffline(ids)} (see
    L{relay.peer.PeerSession}).
    """

    def __init__(self, maxSubscriptions=MAX_SUBSCRIPTIONS):
        """
        @param maxSubscriptions: most ids one peer may be subscribed to at
            once; 0 = no limit.
        """
        self.maxSubscriptions = maxSubscriptions
        self.peers = {}
        self._subscribers = {}
        # id -> the subscriber interested in it, or a set of them when there
        # are several, so that an event costs one dict lookup however many
        # peers are connected. Most ids have one subscriber; a set for each
        # would be half the memory of a subscription.
        self._interested = {}

    def __len__(self):
        return len(self.peers)

    def add(self, peer):
        """
        Store C{peer}, replacing any connection stored under its id.

        @return: the replaced connection, or None. The caller closes it.
        """
        old = self.peers.get(peer.peerID)
        self.peers[peer.peerID] = peer
        return old

    def remove(self, peer):
        """
        Forget C{peer} if it is still the stored connection for its id.

        @return: True if it was removed (the id went offline).
        """
        if self.peers.get(peer.peerID) is peer:
            del self.peers[peer.peerID]
            return True
        return False

    def admitSubscriptions(self, peer, ids):
        """
        The part of C{ids} that C{peer} may subscribe to: ids it already
        has always, new ones while it stays within L{maxSubscriptions}.

        @return: C{(accepted ids in order, number refused)}.
        """
        if not self.maxSubscriptions:
            return ids, 0
        sub = self._subscribers.get(peer)
        have = sub.offline if sub is not None else frozenset()
        room = self.maxSubscriptions - len(have)
        if len(ids) <= room:
            return ids, 0
        accepted = []
        new = set()
        for pid in ids:
            if pid in have or pid in new:
                accepted.append(pid)
            elif len(new) < room:
                new.add(pid)
                accepted.append(pid)
        return accepted, len(ids) - len(accepted)

    def subscribe(self, peer, ids):
        """
        Register C{peer}'s interest in C{ids}.

        @return: the ids among them that are connected here, in order.
        """
        sub = self._subscribers.get(peer)
        if sub is None:
            sub = self._subscribers[peer] = Subscriber(peer)
        interested = self._interested
        for pid in ids:
            sub.online.add(pid)
            sub.offline.add(pid)
            current = interested.get(pid)
            if current is None:
                interested[pid] = sub
            elif type(current) is set:
                current.add(sub)
            elif current is not sub:
                interested[pid] = {current, sub}
        return [pid for pid in ids if pid in self.peers]

    def unsubscribe(self, peer, ids):
        sub = self._subscribers.get(peer)
        if sub is None:
            return
        for pid in ids:
            sub.online.discard(pid)
            sub.offline.discard(pid)
            self._forget(sub, pid)

    def takeOnlineInterest(self, peer, pid):
        """
        Consume C{peer}'s online interest in C{pid}, if it has one.

        @return: True if it had (the caller then tells it C{pid} is online).
        """
        sub = self._subscribers.get(peer)
        if sub is None or pid not in sub.online:
            return False
        sub.online.discard(pid)
        return True

    def dropSubscriber(self, peer):
        """
        Forget every interest C{peer} registered (its connection ended).
        """
        sub = self._subscribers.pop(peer, None)
        if sub is None:
            return
        for pid in sub.online | sub.offline:
            self._forget(sub, pid)

    def _forget(self, sub, pid):
        current = self._interested.get(pid)
        if current is sub:
            del self._interested[pid]
        elif type(current) is set:
            current.discard(sub)
            if len(current) == 1:
                self._interested[pid] = current.pop()

    def _subscribersOf(self, pid):
        current = self._interested.get(pid)
        if current is None:
            return ()
        if type(current) is set:
            return list(current)
        return (current,)

    def cameOnline(self, pid):
        """
        Tell everyone waiting for C{pid} that it is online, consuming their
        online interest.
        """
        for sub in self._subscribersOf(pid):
            if pid in sub.online:
                sub.online.discard(pid)
                if pid not in sub.offline:
                    self._forget(sub, pid)
                sub.peer.peersOnline([pid])

    def wentOffline(self, pid):
        """
        Tell everyone interested in C{pid} that it went offline.
        """
        for sub in self._subscribersOf(pid):
            if pid in sub.offline:
                sub.peer.peersWentOffline([pid])
