"""
Fakes shared by the unit tests.
"""

from relay import messages as m
from relay.auth import TokenValidator, generateToken
from relay.server import Relay
from relay.session import PeerSession
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


def connect(relay, name, address="192.0.2.1:40000"):
    """
    An authenticated session for C{name}, its link's writes cleared.
    """
    link = FakeLink(address)
    session = PeerSession(relay, link)
    session.messageReceived(authMessage(name))
    assert link.take() == [relay.authResponse], "authentication failed"
    return session, link
