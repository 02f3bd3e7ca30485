"""
Makes C{twistd relay} start the relay (see L{relay.service}).
"""

from twisted.application.service import ServiceMaker

relay = ServiceMaker(
    "relay",
    "relay.service",
    "A packet relay for openZro / NetBird WireGuard agents.",
    "relay",
)
