"""
Finding sibling pods: a periodic pass over the headless service name.

Every pass (the first at once, then every 10 s) resolves the configured
names (a comma-separated list of DNS names or IP literals) to all their
addresses, drops this pod's own IP, and dials each listed address at the
cluster port. Beyond the original, which only dials addresses that newly
appear, every listed address without a live stream is dialed again, with an
exponential backoff after failed dials (a dial that connected but whose stream
was gone by the next pass, such as one refused at HELLO, counts as failed).
Vanished addresses need nothing: their streams end by themselves.

A DNS failure (or a name listing no address) is retried at the next pass
and logged at warn, at most once a minute per name while it lasts, and its
end at info: a pod whose name stops resolving loses its siblings quietly
otherwise. L{Discovery.whenRun} tells readiness when the first pass has
completed.
"""

import ipaddress

from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IResolutionReceiver
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from relay.addresses import joinAddress

DISCOVERY_INTERVAL = 10.0
MAX_BACKOFF = 160.0
WARN_EVERY = 60.0

_log = Logger()


@implementer(IResolutionReceiver)
class _Addresses:
    """
    Collects the addresses of one L{IHostnameResolver} resolution.
    """

    def __init__(self):
        self.hosts = []
        self.done = defer.Deferred()

    def resolutionBegan(self, resolutionInProgress):
        pass

    def addressResolved(self, address):
        self.hosts.append(address.host)

    def resolutionComplete(self):
        self.done.callback(self.hosts)


class _Redial:
    """
    Dialing history of one listed address without a live stream.
    """

    __slots__ = ("failures", "dialedAt", "connected")

    def __init__(self):
        self.failures = 0
        self.dialedAt = 0.0
        self.connected = False


def _ipLiteral(text):
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


class Discovery:
    """
    Keep a stream open to every pod the headless name lists.
    """

    def __init__(
        self,
        headless,
        port,
        podIP,
        streams,
        resolver,
        clock,
        interval=DISCOVERY_INTERVAL,
        maxBackoff=MAX_BACKOFF,
    ):
        """
        @param headless: comma-separated DNS names and/or IP literals.
        @param port: the cluster port to dial on each address.
        @param podIP: this pod's IP, never dialed.
        @param streams: a L{relay.cluster.streams.ClusterStreams}.
        @param resolver: an L{IHostnameResolver} (C{reactor.nameResolver}).
        @param clock: an L{IReactorTime}.
        """
        self.names = [n.strip() for n in headless.split(",") if n.strip()]
        self.port = port
        self.podIP = podIP
        self._podIP = _ipLiteral(podIP)
        self.streams = streams
        self.resolver = resolver
        self.clock = clock
        self.interval = interval
        self.maxBackoff = maxBackoff
        self.hasRun = False
        self.known = set()
        self._redial = {}
        self._failing = {}
        self._loop = None
        self._whenRun = []

    def start(self):
        if self._loop is not None:
            return
        self._loop = LoopingCall(self.runPass)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=True).addErrback(
            lambda f: _log.failure("cluster discovery stopped", failure=f)
        )

    def stop(self):
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    # One pass

    def runPass(self):
        """
        Resolve, then dial what has no live stream.

        @return: a L{Deferred} firing (never failing) when the pass is done.
        """
        d = defer.gatherResults([self._resolve(name) for name in self.names])
        d.addCallback(self._dialAll)
        d.addErrback(lambda f: _log.failure("cluster discovery pass failed", failure=f))
        d.addBoth(self._passDone)
        return d

    def whenRun(self):
        """
        @return: a L{Deferred} firing once the first pass has completed.
        """
        if self.hasRun:
            return defer.succeed(None)
        d = defer.Deferred()
        self._whenRun.append(d)
        return d

    def _passDone(self, result):
        self.hasRun = True
        waiters, self._whenRun = self._whenRun, []
        for d in waiters:
            d.callback(None)

    def _resolve(self, name):
        if _ipLiteral(name) is not None:
            return defer.succeed([name])
        receiver = _Addresses()
        d = receiver.done
        try:
            self.resolver.resolveHostName(receiver, name, 0, [IPv4Address, IPv6Address], "TCP")
        except Exception as e:
            d = defer.fail(e)
        d.addTimeout(self.interval / 2, self.clock)

        def failed(failure):
            self._resolutionFailed(name, f"resolving failed: {failure.value!r}")
            return []

        def resolved(hosts):
            if hosts:
                self._resolutionWorked(name)
            else:
                self._resolutionFailed(name, "no address")
            return hosts

        return d.addCallbacks(resolved, failed)

    def _resolutionFailed(self, name, why):
        now = self.clock.seconds()
        state = self._failing.get(name)
        if state is None:
            state = self._failing[name] = [0, float("-inf")]
        state[0] += 1
        if now >= state[1] + WARN_EVERY:
            state[1] = now
            _log.warn(
                "cluster discovery: {name}: {why} ({count} passes in a row; next warning in "
                "{every:g} s at the earliest)",
                name=name,
                why=why,
                count=state[0],
                every=WARN_EVERY,
            )

    def _resolutionWorked(self, name):
        state = self._failing.pop(name, None)
        if state is not None:
            _log.info(
                "cluster discovery: {name} resolves again after {count} failed passes",
                name=name,
                count=state[0],
            )

    def _isSelf(self, host):
        ip = _ipLiteral(host)
        if ip is not None and self._podIP is not None:
            return ip == self._podIP
        return host == self.podIP

    def _dialAll(self, results):
        addresses = set()
        for hosts in results:
            for host in hosts:
                if host and not self._isSelf(host):
                    addresses.add(joinAddress(host, self.port))
        addresses.discard(self.streams.announceAddress)
        if addresses != self.known:
            _log.info(
                "cluster discovery: {names} lists {count} other pods: {addresses}",
                names=",".join(self.names),
                count=len(addresses),
                addresses=" ".join(sorted(addresses)),
            )
        self.known = addresses
        for address in list(self._redial):
            if address not in addresses:
                del self._redial[address]
        now = self.clock.seconds()
        for address in sorted(addresses):
            if self.streams.stream(address) is not None:
                self._redial.pop(address, None)
                continue
            if self.streams.isDialing(address):
                continue
            state = self._redial.get(address)
            if state is None:
                state = self._redial[address] = _Redial()
            elif state.connected:
                # Connected, then gone before this pass (refused HELLO, say):
                # as much a failure as a refused connection.
                state.connected = False
                state.failures += 1
            if state.failures and now < state.dialedAt + self._backoff(state.failures):
                continue
            state.dialedAt = now
            self.streams.dial(address).addCallbacks(
                self._dialed, self._dialFailed, (state,), None, (address, state)
            )

    def _backoff(self, failures):
        return min(self.interval * 2 ** (failures - 1), self.maxBackoff)

    def _dialed(self, stream, state):
        state.connected = True

    def _dialFailed(self, failure, address, state):
        state.failures += 1
        _log.debug(
            "cluster discovery: dialing {address} failed ({count} in a row, "
            "next in {delay:g} s): {error}",
            address=address,
            count=state.failures,
            delay=self._backoff(state.failures),
            error=failure.value,
        )
