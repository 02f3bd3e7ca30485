"""
Two kinds of time: the one timers run on, and the one dates are told in.

Twisted's reactor schedules every C{callLater} on C{time.time()} (Twisted
ticket 2424), so a step of the wall clock moves every deadline with it: a
backward step of an hour holds every timer back an hour (an address refused
for an hour by a token bucket in deficit), a forward step of 45 s fires
every peer's health-check deadline at once, and 30 s idles out every QUIC
connection. Timeouts, rates and health checks only ever measure intervals,
so the relay's reactor runs on C{time.monotonic()} instead.

Some things are dates, compared with other machines' clocks: token expiry
(unix time, set by the management server), the inter-pod HELLO timestamp
(checked within ±5 min by the other pod), the seqno that orders a peer's
registrations across pods, and certificate validity. Those read
L{wallClock}.
"""

import time


def useMonotonicTime(reactor):
    """
    Make C{reactor} schedule on C{time.monotonic()} from now on.

    Calls already scheduled keep their delay: they are moved onto the new
    time scale. Call it once, before the reactor runs.
    """
    if reactor.seconds is time.monotonic:
        return
    offset = time.monotonic() - reactor.seconds()
    for call in reactor.getDelayedCalls():
        call.time += offset
        call.seconds = time.monotonic
    reactor.seconds = time.monotonic


class _WallClock:
    """
    Unix time, for dates (see the module docstring). Only C{seconds()}:
    timers belong on the reactor.
    """

    def seconds(self):
        return time.time()


wallClock = _WallClock()
