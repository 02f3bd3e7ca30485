"""
Makes C{twistd relay} start the relay: its options are L{relay.config}'s,
its service tree L{relay.service.makeService}.
"""

from twisted.application.service import ServiceMaker

relay = ServiceMaker(
    "relay",
    "relay.service",
    "A packet relay for openZro / NetBird WireGuard agents.",
    "relay",
)
