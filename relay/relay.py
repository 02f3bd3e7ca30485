"""
The relay: the peers connected to this process and the routing between them.

L{Relay} is what every session talks to: it authenticates (through its token
validator), admits and stores peers, routes Transport messages locally or
hands them to the inter-pod fabric, and runs subscriptions. It knows nothing
of WebSocket, QUIC or TLS. This module also holds the one start-up rule that
is about the protocol: the instance URL peers are told (L{instanceURL}).
"""

from urllib.parse import urlsplit

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from relay import messages as m
from relay.counters import RelayCounters
from relay.interfaces import ILocalPeers, IRelay
from relay.limits import Admission, Limits, LogBudget

SHUTDOWN_WRITE_TIMEOUT = 3.0


class ConfigurationError(Exception):
    """
    A setting the relay cannot start with; the message is for the operator.
    """


def instanceURL(exposedAddress, tls):
    """
    The URL peers are told to reach this relay instance at.

    No scheme gives C{rel://} (C{rels://} with TLS); a scheme must be C{rel}
    or C{rels}; more than one C{://} is invalid; the result must parse as a
    URL with a host.

    @raise ConfigurationError: otherwise.
    """
    parts = exposedAddress.split("://")
    if len(parts) > 2:
        raise ConfigurationError(f"invalid exposed address {exposedAddress!r}: more than one '://'")
    url = exposedAddress if len(parts) == 2 else ("rels://" if tls else "rel://") + exposedAddress
    try:
        split = urlsplit(url)
        split.port  # noqa: B018 (reading it is the check: urlsplit raises ValueError on a bad port)
    except ValueError as e:
        raise ConfigurationError(f"invalid exposed address {exposedAddress!r}: {e}") from None
    if split.scheme not in ("rel", "rels"):
        raise ConfigurationError(
            f"invalid exposed address {exposedAddress!r}: scheme must be rel or rels, not "
            f"{split.scheme!r}"
        )
    if not split.hostname or any(c.isspace() for c in url):
        raise ConfigurationError(f"invalid exposed address {exposedAddress!r}: no host")
    return url


def _noop(value):
    pass


@implementer(ILocalPeers)
class LocalPeers:
    """
    The peers connected to this pod, as the inter-pod fabric sees them
    (L{ILocalPeers}): a view of the L{relay.store.Store} the L{Relay} fills.

    Its own object, not the relay, so the fabric can be built before the
    relay that forwards to it (L{relay.service.makeService}).
    """

    def __init__(self, store):
        self.store = store

    def localPeer(self, peerID):
        return self.store.peers.get(peerID)

    def localPeers(self):
        return list(self.store.peers.values())

    def peerOnlineElsewhere(self, peerID):
        if peerID not in self.store.peers:
            self.store.cameOnline(peerID)

    def peerGoneElsewhere(self, peerID):
        if peerID not in self.store.peers:
            self.store.wentOffline(peerID)


@implementer(IRelay)
class Relay:
    """
    Peers connected here and what passes between them.

    Sessions (L{relay.peer.PeerSession}) see it through L{IRelay}, the
    list of what they may use; the listeners of each carrier (L{relay.listener.ws},
    L{relay.listener.quic}) use C{clock}, C{counters}, C{noisyLog}, C{admission} and
    C{draining}. The collaborators below are given at construction and
    never replaced; the rest (store, forwarder, the metrics' recorders) is
    for the relay itself, the wiring and tests.

    @ivar store: the L{relay.store.Store}.
    @ivar forwarder: an L{ICrossPodForwarder} in cluster mode, else None.
    @ivar counters: the L{RelayCounters} the data path increments.
    @ivar limits: the L{Limits} sessions enforce.
    @ivar admission: the L{Admission} every carrier's connections and
        sessions go through.
    @ivar noisyLog: the L{LogBudget} for lines strangers can cause.
    @ivar clock: the L{IReactorTime} timers and intervals run on.
    @ivar healthCheckThreshold: health checks a peer may miss in a row.
    @ivar authResponse: the encoded AuthResponse every peer is sent.
    @ivar draining: whether the relay is shutting down (no new peer).
    """

    _log = Logger()

    def __init__(
        self,
        validator,
        instanceURL,
        clock,
        store,
        healthCheckThreshold=1,
        counters=None,
        wallClock=None,
        limits=None,
        forwarder=None,
        noisyLog=None,
        recordAuthenticationTime=_noop,
        recordStoreTime=_noop,
    ):
        """
        @param validator: the L{relay.auth.TokenValidator} of peers' tokens.
        @param instanceURL: the URL peers are told to reach this relay at.
        @param wallClock: unix time, for L{register}'s C{registeredAt};
            C{clock} by default.
        @param limits: the L{Limits}; none by default.
        @param forwarder: the inter-pod fabric (L{ICrossPodForwarder}), or
            None in single-pod mode.
        @param noisyLog: the L{LogBudget} shared by every port strangers can
            reach; one of its own by default.
        @param recordAuthenticationTime: called with milliseconds per
            handshake (the metrics' histogram).
        @param recordStoreTime: called with milliseconds per store update.
        """
        self._validator = validator
        self.instanceURL = instanceURL
        self.authResponse = m.encodeAuthResponse(instanceURL)
        self.clock = clock
        # registeredAt orders a peer's registrations across pods: a date.
        self.wallClock = clock if wallClock is None else wallClock
        self.store = store
        self.healthCheckThreshold = healthCheckThreshold
        self.counters = counters if counters is not None else RelayCounters()
        self.forwarder = forwarder
        self.recordAuthenticationTime = recordAuthenticationTime
        self.recordStoreTime = recordStoreTime
        self.draining = False
        self.admission = Admission(Limits() if limits is None else limits, clock)
        self.noisyLog = LogBudget(clock) if noisyLog is None else noisyLog

    @property
    def limits(self):
        return self.admission.limits

    # What a session asks during its handshake

    def authenticate(self, token):
        """
        Check a peer's token.

        @raise relay.auth.AuthError: it is not valid now.
        """
        self._validator.validate(token)

    def refusal(self, peerID):
        """
        Why a peer that authenticated as C{peerID} may not be registered now,
        or None if it may: C{"draining"} while shutting down, C{"max_peers"}
        when the peer limit is reached (a peer replacing its own older
        connection is not counted twice).
        """
        if self.draining:
            return "draining"
        maxPeers = self.admission.limits.maxPeers
        if maxPeers and len(self.store) >= maxPeers and peerID not in self.store.peers:
            return "max_peers"
        return None

    def peerCount(self):
        """
        How many peers are registered here.
        """
        return len(self.store)

    def admitSubscriptions(self, session, ids):
        """
        The part of C{ids} C{session} may subscribe to under the
        per-session limit.

        @return: C{(admitted ids, how many were refused)}.
        """
        return self.store.admitSubscriptions(session, ids)

    @property
    def maxSubscriptions(self):
        """
        Most ids one session may be subscribed to.
        """
        return self.store.maxSubscriptions

    def register(self, session, startedAt):
        """
        Store a freshly authenticated session, replacing an older connection
        of the same peer, and tell whoever waits for it.
        """
        now = self.clock.seconds()
        session.registeredAt = self.wallClock.seconds()
        old = self.store.add(session)
        if old is not None:
            self.counters.reconnections += 1
            self._log.info(
                "{peer}: reconnected, closing the previous connection {old}", peer=session, old=old
            )
            old.close()
        else:
            self._log.info("{peer}: connected", peer=session)
        self.store.cameOnline(session.peerID)
        if self.forwarder is not None:
            self.forwarder.peerConnected(session)
        done = self.clock.seconds()
        self.recordStoreTime((done - now) * 1000)
        self.recordAuthenticationTime((done - startedAt) * 1000)

    def unregister(self, session):
        """
        A stored session ended: forget it and its interests.
        """
        self.store.dropSubscriber(session)
        if self.store.remove(session):
            self._log.debug("{peer}: disconnected", peer=session)
            self.store.wentOffline(session.peerID)
            if self.forwarder is not None:
                self.forwarder.peerDisconnected(session)

    def route(self, destinationID, message, dropped=None):
        """
        Deliver a stamped Transport message to C{destinationID}; a refusal
        by a local destination is told to C{dropped} (see L{IRelay.route}).
        """
        peer = self.store.peers.get(destinationID)
        if peer is not None:
            if peer.sendMessage(message):
                self.counters.transferSentBytes += len(message)
            elif dropped is not None:
                dropped(peer, len(message))
        elif self.forwarder is not None:
            self.counters.transferSentBytes += len(message)
            self.forwarder.forward(destinationID, message)
        else:
            self.counters.dropped["unknown_peer"] += 1

    def subscribe(self, session, ids):
        online = self.store.subscribe(session, ids)
        if online:
            session.peersOnline(online)
        if self.forwarder is not None and len(online) < len(ids):
            known = set(online)
            for pid in ids:
                if pid not in known:
                    self.forwarder.locate(pid, session.peerID).addCallback(
                        self._located, session, pid
                    )

    def _located(self, found, session, pid):
        if found and not session.closed and self.store.takeOnlineInterest(session, pid):
            session.peersOnline([pid])

    def unsubscribe(self, session, ids):
        self.store.unsubscribe(session, ids)

    # Shutdown

    def shutdown(self):
        """
        Send Close to every peer and close it; fire when all are gone or
        after the write timeout.
        """
        self.draining = True
        sessions = list(self.store.peers.values())
        self._log.info("shutting down: closing {count} peer connections", count=len(sessions))
        waits = []
        for session in sessions:
            waits.append(session.link.whenClosed())
            session.closeGracefully()
        done = defer.DeferredList(waits, consumeErrors=True)
        done.addTimeout(SHUTDOWN_WRITE_TIMEOUT, self.clock)
        done.addErrback(lambda f: None)
        return done
