"""
Cross-pod delivery: the relay's L{ICrossPodForwarder}, and the handler of the
frames sibling pods send.

Outgoing: a Transport message for a peer not connected here goes as a FWD
frame to the pod the locator names. While that pod is being looked up, the
destination's packets wait in a small bounded queue (order kept) instead of
blocking the sender's other traffic, as the original's synchronous lookup
did; the whole forward gives up after 5 s.

Lookups are bounded: at most L{MAX_LOOKUPS} destinations at once, of which
one sending peer may hold L{LOOKUPS_PER_PEER} (one agent spraying random
ids must not take every slot from the first packets of other agents) and
subscriptions together L{SUBSCRIPTION_LOOKUPS} (each unknown subscribed id
is a WHO_HAS to every pod). What finds no slot is dropped and counted.

Incoming: FWD delivers the embedded message byte for byte to the local peer
named by the frame (one over 8820 bytes, which no agent may receive, is
dropped and counted); WHO_HAS and I_HAVE go to the locator.

Presence push (Beyond): a peer connecting here is announced to every sibling
as an unsolicited I_HAVE, a new stream gets a snapshot of local peers, and a
peer leaving is announced as PEER_GONE (0x03, ignored by original pods), so
first packets need no broadcast and remote subscribers learn of departures.
"""

from collections import deque

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from relay import messages
from relay.cluster import frames
from relay.cluster.locator import seqnoOf
from relay.cluster.streams import GONE, SENT, IStreamHandler
from relay.interfaces import ICrossPodForwarder

FORWARD_TIMEOUT = 5.0
QUEUE_PACKETS = 16
QUEUE_BYTES = 2 * 1024 * 1024
MAX_LOOKUPS = 1024
# A real agent starts few lookups at once: peers on pods of this relay are
# known from their presence push, so only first packets to peers on original
# pods are looked up, one per new flow, each done in 200 ms at most.
LOOKUPS_PER_PEER = 64
SUBSCRIPTION_LOOKUPS = 256
# The pool of subscription lookups in the slot count.
_SUBSCRIPTIONS = "subscriptions"

_log = Logger()


class _Waiting:
    """
    Packets for one destination whose pod is being looked up.
    """

    __slots__ = ("packets", "timer", "owner")

    def __init__(self, owner):
        self.packets = deque()
        self.timer = None
        self.owner = owner


@implementer(ICrossPodForwarder, IStreamHandler)
class Forwarder:
    """
    Local-or-remote delivery over a L{relay.cluster.streams.ClusterStreams}
    and a L{relay.cluster.locator.Locator}.
    """

    def __init__(
        self,
        streams,
        locator,
        localPeers,
        clock,
        counters,
        forwardTimeout=FORWARD_TIMEOUT,
        queuePackets=QUEUE_PACKETS,
        queueBytes=QUEUE_BYTES,
        maxLookups=MAX_LOOKUPS,
        lookupsPerPeer=LOOKUPS_PER_PEER,
        subscriptionLookups=SUBSCRIPTION_LOOKUPS,
    ):
        """
        @param localPeers: an L{relay.interfaces.ILocalPeers}.
        @param counters: a L{relay.counters.ClusterCounters}.
        @param queuePackets: most packets waiting for one destination.
        @param queueBytes: most bytes waiting for all destinations together.
        @param maxLookups: most destinations being looked up at once (a
            sender spraying random ids must not start a broadcast each).
        @param lookupsPerPeer: most of them one sending peer may hold.
        @param subscriptionLookups: most of them L{locate} may hold.
        """
        self.streams = streams
        self.locator = locator
        self.localPeers = localPeers
        self.clock = clock
        self.counters = counters
        self.forwardTimeout = forwardTimeout
        self.queuePackets = queuePackets
        self.queueBytes = queueBytes
        self.maxLookups = maxLookups
        self.lookupsPerPeer = lookupsPerPeer
        self.subscriptionLookups = subscriptionLookups
        self._waiting = {}
        self._waitingBytes = 0
        self._lookups = 0
        self._lookupsBy = {}

    # ICrossPodForwarder

    def forward(self, destinationID, message):
        try:
            self._forward(destinationID, message)
        except Exception:
            self.counters.forwards["send_error"] += 1
            _log.failure("cluster: forwarding to {peer}", peer=messages.humanID(destinationID))

    def _deliverHere(self, destinationID, message):
        """
        Hand C{message} to its destination if that peer is connected to this
        pod (it may have come here while its pod was being looked up).

        @return: whether it was.
        """
        peer = self.localPeers.localPeer(destinationID)
        if peer is None:
            return False
        peer.sendMessage(message)
        self.counters.forwards["ok"] += 1
        return True

    def _forward(self, destinationID, message):
        if self._deliverHere(destinationID, message):
            return
        waiting = self._waiting.get(destinationID)
        if waiting is not None:
            self._enqueue(waiting, message)
            return
        address = self.locator.cached(destinationID)
        if address is not None:
            self._send(destinationID, address, message)
            return
        if not self.streams.liveStreams():
            self.counters.forwards["peer_not_found"] += 1
            return
        # The id field of a relayed Transport holds its source.
        source = message[messages.HEADER_SIZE : messages.TRANSPORT_HEADER_SIZE]
        refused = self._takeSlot((source, self.lookupsPerPeer))
        if refused is not None:
            self.counters.dropped[refused] += 1
            return
        waiting = self._waiting[destinationID] = _Waiting(source)
        self._enqueue(waiting, message)
        waiting.timer = self.clock.callLater(
            self.forwardTimeout, self._giveUp, destinationID, waiting
        )
        self.locator.lookup(destinationID).addCallback(self._located, destinationID, waiting)

    def _takeSlot(self, *owners):
        """
        Count one more lookup held by each of C{owners} (C{(owner, share)}
        pairs), if the total and every share have room.

        @return: None if taken, else the reason it was refused.
        """
        if self._lookups >= self.maxLookups:
            return "lookup_queue_full"
        for owner, share in owners:
            if self._lookupsBy.get(owner, 0) >= share:
                return "lookup_share_full"
        self._lookups += 1
        for owner, _ in owners:
            self._lookupsBy[owner] = self._lookupsBy.get(owner, 0) + 1
        return None

    def _releaseSlot(self, *owners):
        self._lookups -= 1
        for owner in owners:
            held = self._lookupsBy[owner] - 1
            if held:
                self._lookupsBy[owner] = held
            else:
                del self._lookupsBy[owner]

    def _subscriptionLookupDone(self, result, owners):
        self._releaseSlot(*owners)
        return result

    def _enqueue(self, waiting, message):
        if (
            len(waiting.packets) >= self.queuePackets
            or self._waitingBytes + len(message) > self.queueBytes
        ):
            self.counters.dropped["lookup_queue_full"] += 1
            return
        waiting.packets.append(message)
        self._waitingBytes += len(message)

    def _release(self, destinationID, waiting):
        """
        Take C{waiting} out of the queues.

        @return: its packets, or None if it was already released.
        """
        if self._waiting.get(destinationID) is not waiting:
            return None
        del self._waiting[destinationID]
        self._releaseSlot(waiting.owner)
        if waiting.timer is not None and waiting.timer.active():
            waiting.timer.cancel()
        packets = waiting.packets
        self._waitingBytes -= sum(len(p) for p in packets)
        return packets

    def _located(self, address, destinationID, waiting):
        packets = self._release(destinationID, waiting)
        if packets is None:
            return
        for message in packets:
            if self._deliverHere(destinationID, message):
                continue
            if address is None:
                self.counters.forwards["peer_not_found"] += 1
            else:
                self._send(destinationID, address, message)

    def _giveUp(self, destinationID, waiting):
        waiting.timer = None
        packets = self._release(destinationID, waiting)
        if packets:
            _log.debug(
                "cluster: gave up forwarding {count} packets to {peer}",
                count=len(packets),
                peer=messages.humanID(destinationID),
            )
            self.counters.forwards["peer_not_found"] += len(packets)

    def _send(self, destinationID, address, message):
        stream = self.streams.stream(address)
        if stream is None:
            self.locator.invalidate(destinationID)
            self.counters.forwards["stream_gone"] += 1
            return
        try:
            result = stream.send(frames.fwdFrame(destinationID, message), droppable=True)
        except Exception:
            self.locator.invalidate(destinationID)
            self.counters.forwards["send_error"] += 1
            _log.failure("cluster: FWD to {stream}", stream=stream)
            return
        if result == SENT:
            self.counters.forwards["ok"] += 1
        elif result == GONE:
            self.locator.invalidate(destinationID)
            self.counters.forwards["stream_gone"] += 1

    def locate(self, peerID, requester=None):
        """
        See L{ICrossPodForwarder.locate}. A lookup it starts is charged to
        the subscriptions' pool and, when given, to C{requester} (the
        subscriber's id), within the same share as its packets.
        """
        if self.localPeers.localPeer(peerID) is not None:
            return defer.succeed(True)
        address = self.locator.cached(peerID)
        if address is not None:
            if self.streams.stream(address) is not None:
                return defer.succeed(True)
            # The cached pod is unreachable: ask again instead of having
            # lookup() answer with the same stale address.
            self.locator.invalidate(peerID, address)
        if not self.locator.pending(peerID) and self.streams.liveStreams():
            owners = [(_SUBSCRIPTIONS, self.subscriptionLookups)]
            if requester is not None:
                owners.append((requester, self.lookupsPerPeer))
            refused = self._takeSlot(*owners)
            if refused is not None:
                self.counters.dropped["subscription_" + refused] += 1
                return defer.succeed(False)
            d = self.locator.lookup(peerID)
            d.addBoth(self._subscriptionLookupDone, [owner for owner, _ in owners])
        else:
            d = self.locator.lookup(peerID)
        d.addCallback(lambda found: found is not None)
        d.addTimeout(self.forwardTimeout, self.clock)
        d.addErrback(lambda failure: False)
        return d

    def peerConnected(self, peer):
        self.locator.invalidate(peer.peerID)
        self._broadcast(frames.iHaveFrame(peer.peerID, seqnoOf(peer.registeredAt)))

    def peerDisconnected(self, peer):
        current = self.localPeers.localPeer(peer.peerID)
        if current is not None and current is not peer:
            return
        self._broadcast(frames.peerGoneFrame(peer.peerID))

    def _broadcast(self, frame):
        for stream in self.streams.liveStreams():
            stream.send(frame)

    # IStreamHandler

    def streamUp(self, stream):
        for peer in list(self.localPeers.localPeers()):
            stream.send(frames.iHaveFrame(peer.peerID, seqnoOf(peer.registeredAt)))

    def streamDown(self, stream):
        self.locator.invalidatePod(stream.address)

    def frameReceived(self, stream, frame):
        if isinstance(frame, frames.Fwd):
            self._fwdReceived(stream, frame)
        elif isinstance(frame, frames.WhoHas):
            self.locator.whoHasReceived(stream, frame.peerID)
        elif isinstance(frame, frames.IHave):
            changed, solicited = self.locator.iHaveReceived(
                stream.address, frame.peerID, frame.seqno
            )
            if changed and not solicited:
                self.localPeers.peerOnlineElsewhere(frame.peerID)
        elif isinstance(frame, frames.PeerGone):
            self._peerGoneReceived(stream, frame.peerID)

    def _fwdReceived(self, stream, frame):
        if not frames.isTransportMessage(frame.message):
            self.counters.dropped["fwd_not_transport"] += 1
            _log.debug(
                "cluster: FWD from {stream} carries no Transport message, dropped", stream=stream
            )
            return
        if len(frame.message) > messages.MAX_MESSAGE_SIZE:
            # An agent closes (Go: misreads) a message over 8820 bytes.
            self.counters.dropped["fwd_too_large"] += 1
            _log.debug(
                "cluster: FWD from {stream} carries a {size}-byte message, dropped",
                stream=stream,
                size=len(frame.message),
            )
            return
        peer = self.localPeers.localPeer(frame.destinationID)
        if peer is None:
            self.counters.dropped["fwd_peer_not_here"] += 1
            _log.debug(
                "cluster: FWD from {stream} for {peer}, not connected here, dropped",
                stream=stream,
                peer=messages.humanID(frame.destinationID),
            )
            return
        peer.sendMessage(frame.message)

    def _peerGoneReceived(self, stream, peerID):
        entry = self.locator.cachedEntry(peerID)
        if entry is not None and entry.address != stream.address:
            # The peer has since been announced by another pod.
            return
        self.locator.presenceAnnounced(stream.address)
        self.locator.invalidate(peerID)
        self.localPeers.peerGoneElsewhere(peerID)

    def stop(self):
        """
        Drop every waiting packet (shutdown).
        """
        for destinationID, waiting in list(self._waiting.items()):
            packets = self._release(destinationID, waiting)
            if packets:
                self.counters.dropped["shutdown"] += len(packets)
