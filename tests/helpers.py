"""
Fakes shared by the unit tests.
"""

from relay import messages as m
from relay.auth import TokenValidator, generateToken
from relay.peer import PeerSession
from relay.relay import Relay
from relay.store import Store

SECRET = "relay-secret"
NOW = 1_800_000_000


class FakeLink:
    """
    The link side of a L{PeerSession}: records what the session writes.
    """

    transportName = "fake"

    def __init__(self, address="192.0.2.1:40000"):
        self.peerAddress = address
        self.written = []
        self.aborted = False
        self.graceful = False
        self.accept = True

    def writeMessage(self, message):
        if self.aborted or not self.accept:
            return False
        self.written.append(bytes(message))
        return True

    def closeLink(self):
        self.aborted = True

    def closeGracefully(self):
        self.writeMessage(m.CLOSE_MESSAGE)
        self.graceful = True

    def whenClosed(self):
        from twisted.internet.defer import succeed

        return succeed(None)

    def take(self):
        written, self.written = self.written, []
        return written


def makeRelay(clock, **kwargs):
    clock.advance(NOW - clock.seconds())
    return Relay(
        validator=TokenValidator(SECRET, clock),
        instanceURL="rel://127.0.0.1:33080",
        clock=clock,
        store=Store(),
        **kwargs,
    )


def authMessage(name, expiresAt=NOW + 3600, secret=SECRET):
    return m.encodeAuth(m.peerID(name), generateToken(secret, expiresAt))


def stamped(message, source):
    """
    The Transport C{message} as the relay delivers it: the same payload,
    from C{source} (the relay writes the sender's id over the destination's).
    """
    return m.encodeTransport(source, m.decodeTransport(message)[1])


def subscriptionCount(store, peer):
    """
    How many ids C{peer} is subscribed to in C{store} (its bounded set; the
    relay itself never needs the number, only L{Store.admitSubscriptions}).
    """
    subscriber = store._subscribers.get(peer)
    return 0 if subscriber is None else len(subscriber.offline)


def connect(relay, name, address="192.0.2.1:40000"):
    """
    An authenticated session for C{name}, its link's writes cleared.
    """
    link = FakeLink(address)
    session = PeerSession(relay, link)
    session.messageReceived(authMessage(name))
    assert link.take() == [relay.authResponse], "authentication failed"
    return session, link


CI_PROFILE = "relay-ci"
FUZZ_PROFILE = "fuzz"


def hypothesisProfile(examples=200):
    """
    The hypothesis settings every property test uses, registering the two
    profiles in one place: C{relay-ci}, bounded and derandomized with no
    example database (the same examples on every run, so CI never flakes),
    and C{fuzz}, the long randomized run (20000 examples) that tox's fuzz env
    selects with C{HYPOTHESIS_PROFILE=fuzz}.  Any other value of
    C{HYPOTHESIS_PROFILE}, or none, means C{relay-ci}.

    @param examples: C{max_examples} of the bounded run; the fuzz run keeps
        its 20000.
    """
    import os

    from hypothesis import HealthCheck, settings

    common = dict(
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    settings.register_profile(CI_PROFILE, derandomize=True, max_examples=200, **common)
    settings.register_profile(FUZZ_PROFILE, derandomize=False, max_examples=20000, **common)
    if os.environ.get("HYPOTHESIS_PROFILE") == FUZZ_PROFILE:
        return settings.get_profile(FUZZ_PROFILE)
    return settings(settings.get_profile(CI_PROFILE), max_examples=examples)
